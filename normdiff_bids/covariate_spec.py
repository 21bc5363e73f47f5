"""The covariates of a BIDS-App run declared once: each one's name, source column, kind and role.

:class:`CovariateSpecs` is built from the command line (``--age-column``, ``--sex-column``,
``--site-column``, ``--covariate``), checked, and passed as plain JSON to every node of the workflows and
to the run record, so that reading ``participants.tsv``, training, scoring, evaluation, sidecars and
reports agree on which covariate is which. Plain Python (no numpy, pandas or torch), like
:mod:`normdiff_bids.conventions`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from normdiff_bids.conventions import ROW_ID_COLUMNS, preview
from normdiff_bids.errors import InputError, ProblemCollector

__all__ = ["KINDS", "ROLES", "ROLE_OPTIONS", "CovariateSpec", "CovariateSpecs", "parse_covariate_option"]

#: Kinds of covariate: standardised numbers, or levels with a learned embedding.
KINDS: tuple[str, ...] = ("continuous", "categorical")
#: The covariates the BIDS-App gives a meaning to, and the kind each must have. ``age`` is the axis of the
#: centile curves and of the age-binned evaluation; ``sex`` stratifies the split and the evaluation;
#: ``site`` is pooled by the location-scale stage, may be scored as unknown, and is evaluated per level.
ROLES: dict[str, str] = {"age": "continuous", "sex": "categorical", "site": "categorical"}
#: The command-line option that chooses each role's column.
ROLE_OPTIONS: dict[str, str] = {role: f"--{role}-column" for role in ROLES}
_FORBIDDEN = set("\t\n\r")


@dataclass(frozen=True)
class CovariateSpec:
    """One covariate of the model.

    ``name``: its column in the IDP table and its name in the model (a role's name is the role itself,
    whatever ``participants.tsv`` calls it); ``column``: the ``participants.tsv`` column it is read from;
    ``kind``: ``"continuous"``, ``"categorical"`` or ``None`` (not yet known: inferred from the values,
    numbers making it continuous, as the estimator does); ``role``: ``"age"``, ``"sex"``, ``"site"`` or
    ``None`` for any other covariate. A role's kind is fixed (:data:`ROLES`).
    """

    name: str
    column: str
    kind: str | None = None
    role: str | None = None

    def __post_init__(self):
        problems = ProblemCollector()
        for field in ("name", "column"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip() or _FORBIDDEN & set(value):
                problems.add(f"covariate {field} {value!r} is not a column name; give a non-empty name "
                             f"without tabs or line breaks")
        if self.kind is not None and self.kind not in KINDS:
            problems.add(f"covariate {self.name!r}: kind {self.kind!r} is unknown; use one of "
                         f"{', '.join(KINDS)}")
        if self.role is not None:
            if self.role not in ROLES:
                problems.add(f"covariate {self.name!r}: role {self.role!r} is unknown; use one of "
                             f"{', '.join(ROLES)} or none")
            elif self.name != self.role:
                problems.add(f"the {self.role} covariate is named {self.role!r} in the IDP table, not "
                             f"{self.name!r}; choose its participants.tsv column with "
                             f"{ROLE_OPTIONS[self.role]}")
            elif self.kind is None:
                object.__setattr__(self, "kind", ROLES[self.role])
            elif self.kind != ROLES[self.role]:
                problems.add(f"the {self.role} covariate is {ROLES[self.role]}, not {self.kind}")
        problems.raise_if_any(header="the covariate specification is not valid")

    def to_dict(self) -> dict:
        return {"name": self.name, "column": self.column, "kind": self.kind, "role": self.role}

    @classmethod
    def from_dict(cls, data: Mapping) -> CovariateSpec:
        if not isinstance(data, Mapping) or "name" not in data:
            raise InputError(f"a covariate is described by a mapping with name, column, kind and role; got "
                             f"{data!r}")
        unknown = sorted(set(data) - {"name", "column", "kind", "role"})
        if unknown:
            raise InputError(f"covariate {data['name']!r}: unknown fields {unknown}; a covariate has name, "
                             f"column, kind and role")
        return cls(name=data["name"], column=data.get("column", data["name"]), kind=data.get("kind"),
                   role=data.get("role"))


def parse_covariate_option(text: str) -> CovariateSpec:
    """The covariate of one ``--covariate COLUMN[:KIND]`` value: named after its column, of the kind given
    (``continuous`` or ``categorical``) or, without one, inferred from the column's values."""
    column, sep, kind = str(text).rpartition(":")
    if not sep:
        column, kind = str(text), None
    elif kind not in KINDS:
        raise InputError(f"--covariate {text!r}: {kind!r} is not a kind; write COLUMN, COLUMN:continuous or "
                         f"COLUMN:categorical")
    column = column.strip()
    return CovariateSpec(name=column, column=column, kind=kind)


@dataclass(frozen=True)
class CovariateSpecs:
    """The covariates of a model, in order: the roles first (age, sex, site), then any others.

    >>> spec = CovariateSpecs.from_options(age_column="Age", site_column="none", covariates=["tiv"])
    >>> spec.names, spec.columns, spec.name_of("site")
    (('age', 'sex', 'tiv'), ('Age', 'sex', 'tiv'), None)
    """

    items: tuple[CovariateSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "items", tuple(self.items))
        problems = ProblemCollector()
        if not self.items:
            problems.add("no covariates: a normative model needs at least one")
        names: dict[str, CovariateSpec] = {}
        columns: dict[str, CovariateSpec] = {}
        for spec in self.items:
            if not isinstance(spec, CovariateSpec):
                raise TypeError(f"CovariateSpecs holds CovariateSpec items, not {type(spec).__name__}")
            if spec.name in ROW_ID_COLUMNS:
                problems.add(f"{_what(spec)}: {spec.name!r} is an id column of the IDP table, not a "
                             f"covariate")
            elif spec.role is None and spec.name in ROLES:
                problems.add(f"{_what(spec)}: {spec.name!r} is the name of the {spec.name} covariate; choose "
                             f"its participants.tsv column with {ROLE_OPTIONS[spec.name]}")
            elif spec.name in names:
                problems.add(f"{_what(spec)} is given more than once")
            elif spec.column in columns:
                problems.add(f"participants.tsv column {spec.column!r} is read twice, as "
                             f"{_what(columns[spec.column])} and as {_what(spec)}; a column is one covariate")
            names.setdefault(spec.name, spec)
            columns.setdefault(spec.column, spec)
        problems.raise_if_any(header="the covariates cannot be used")

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def from_options(cls, age_column: str = "age", sex_column: str = "sex", site_column: str | None = "site",
                     covariates: Iterable[str | CovariateSpec] = ()) -> CovariateSpecs:
        """The specification of the command line: the three roles read from their columns (``site_column``
        ``None`` or ``"none"``: no site) and the ``--covariate COLUMN[:KIND]`` values."""
        if site_column is not None and str(site_column).strip().lower() == "none":
            site_column = None
        items = [CovariateSpec("age", age_column, role="age"), CovariateSpec("sex", sex_column, role="sex")]
        if site_column is not None:
            items.append(CovariateSpec("site", site_column, role="site"))
        items += [c if isinstance(c, CovariateSpec) else parse_covariate_option(c) for c in covariates or ()]
        return cls(tuple(items))

    @classmethod
    def default(cls) -> CovariateSpecs:
        """Age, sex and site, read from the ``participants.tsv`` columns of the same names."""
        return cls.from_options()

    @classmethod
    def coerce(cls, value) -> CovariateSpecs:
        """A specification from what a caller may hold: ``None`` (the default), a :class:`CovariateSpecs`,
        its :meth:`to_list` form, or its :meth:`to_json` text."""
        if value is None:
            return cls.default()
        if isinstance(value, CovariateSpecs):
            return value
        if isinstance(value, str):
            return cls.from_json(value)
        return cls.from_list(value)

    # -- lookups --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[CovariateSpec]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, name: object) -> bool:
        return any(spec.name == name for spec in self.items)

    def __getitem__(self, name: str) -> CovariateSpec:
        for spec in self.items:
            if spec.name == name:
                return spec
        raise KeyError(f"no covariate {name!r}; the covariates are {list(self.names)}")

    @property
    def names(self) -> tuple[str, ...]:
        """Column names in the IDP table and covariate names of the model, in order."""
        return tuple(spec.name for spec in self.items)

    @property
    def columns(self) -> tuple[str, ...]:
        """The ``participants.tsv`` columns read, in order."""
        return tuple(spec.column for spec in self.items)

    @property
    def extras(self) -> tuple[CovariateSpec, ...]:
        """The covariates without a role (``--covariate``)."""
        return tuple(spec for spec in self.items if spec.role is None)

    @property
    def kinds(self) -> dict[str, str]:
        """``{name: kind}`` of every covariate whose kind is known."""
        return {spec.name: spec.kind for spec in self.items if spec.kind is not None}

    def of_kind(self, kind: str) -> tuple[str, ...]:
        """Names of the covariates of ``kind`` (``"continuous"`` or ``"categorical"``)."""
        return tuple(spec.name for spec in self.items if spec.kind == kind)

    def role(self, role: str) -> CovariateSpec | None:
        """The covariate playing ``role`` (``"age"``, ``"sex"``, ``"site"``), or ``None``."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is unknown; roles are {', '.join(ROLES)}")
        return next((spec for spec in self.items if spec.role == role), None)

    def name_of(self, role: str) -> str | None:
        """The name of the covariate playing ``role``, or ``None`` when there is none."""
        spec = self.role(role)
        return spec.name if spec is not None else None

    def names_of(self, *roles: str) -> tuple[str, ...]:
        """The names of the covariates playing ``roles``, in that order, leaving out roles no covariate
        plays: ``names_of("site", "sex")`` are what the reference split is stratified by."""
        return tuple(name for name in map(self.name_of, roles) if name is not None)

    # -- completing and checking ----------------------------------------------------------------------
    def resolved(self, kinds: Mapping[str, str]) -> CovariateSpecs:
        """A copy with the unknown kinds taken from ``kinds`` (``{name: kind}``, e.g. inferred from the
        values); a kind already given is kept."""
        items = []
        for spec in self.items:
            kind = spec.kind if spec.kind is not None else kinds.get(spec.name)
            items.append(CovariateSpec(spec.name, spec.column, kind, spec.role))
        return CovariateSpecs(tuple(items))

    def check_names(self, taken: Iterable[str], what: str) -> None:
        """Refuse covariate names that are also ``taken`` names (``what`` they are: e.g. the IDPs)."""
        taken = set(taken)
        clashes = [spec for spec in self.items if spec.name in taken]
        if clashes:
            raise InputError([f"{_what(spec)} has the name of {what}, and one table cannot hold both: "
                              f"rename the participants.tsv column, or leave the covariate out"
                              for spec in clashes], header="the covariates cannot be used")

    def for_model(self, names: Sequence[str], kinds: Mapping[str, str]) -> CovariateSpecs:
        """This (command-line) specification as a model trained on the covariates ``names`` of ``kinds``
        (``{name: kind}``) needs it: the model's covariates in its order, the roles read from this
        specification's columns, the other covariates from the columns of their names.

        Raises :class:`InputError` when a covariate given here is not the model's (another kind, or
        unknown to it) or a role the model uses has no column (``--site-column none``).
        """
        problems = ProblemCollector()
        ours = {spec.name: spec for spec in self.items}
        items = []
        for name in names:
            kind = kinds.get(name)
            spec = ours.get(name)
            if spec is None and name in ROLES:
                problems.add(f"the model was trained with a {name} covariate, and this run reads none; give "
                             f"its participants.tsv column with {ROLE_OPTIONS[name]}")
                continue
            if spec is None:
                spec = CovariateSpec(name, name, kind)
            elif spec.kind is not None and kind is not None and spec.kind != kind:
                problems.add(f"{_what(spec)} is {spec.kind} here but {kind} in the model; write "
                             f"--covariate {spec.column}:{kind}, or leave the kind out")
                continue
            items.append(CovariateSpec(spec.name, spec.column, kind or spec.kind, spec.role))
        foreign = [spec for spec in self.extras if spec.name not in names]
        for spec in foreign:
            problems.add(f"{_what(spec)} is not one of the model's covariates ({preview(names)}); leave out "
                         f"--covariate {spec.column}, or score against a model trained with it")
        problems.raise_if_any(header="the covariates do not match the model")
        return CovariateSpecs(tuple(items))

    # -- plain data -----------------------------------------------------------------------------------
    def to_list(self) -> list[dict]:
        """Plain data (a list of ``{name, column, kind, role}``): Nipype inputs, the run record, JSON."""
        return [spec.to_dict() for spec in self.items]

    @classmethod
    def from_list(cls, items: Iterable[Mapping | CovariateSpec]) -> CovariateSpecs:
        if isinstance(items, str | bytes | Mapping):
            raise InputError(f"a covariate specification is a list of covariates; got {items!r}")
        return cls(tuple(i if isinstance(i, CovariateSpec) else CovariateSpec.from_dict(i) for i in items))

    def to_json(self) -> str:
        return json.dumps(self.to_list())

    @classmethod
    def from_json(cls, text: str) -> CovariateSpecs:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"the covariate specification is not valid JSON ({exc}): {text!r}") from None
        return cls.from_list(data)


def _what(spec: CovariateSpec) -> str:
    if spec.role is not None:
        return f"the {spec.role} covariate (participants.tsv column {spec.column!r})"
    return f"covariate {spec.name!r} (--covariate)"
