"""Covariates as the network sees them: a schema learned from the training table, and the encoder's
configuration (the encoder module is :mod:`~normdiff_bids.model.encoder`, loaded with torch on first use).

Continuous covariates (age, any extra numeric one) are standardised with the training mean and SD;
categorical ones (sex, site, any non-numeric one) become learned embeddings. Every categorical covariate
has an ``unknown`` level (index 0); for site it is trained by embedding dropout, so scoring a person
from a site never seen in training can use the model's marginal over sites when asked to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from normdiff_bids.conventions import SEX_ALIASES
from normdiff_bids.covariate_spec import KINDS
from normdiff_bids.errors import InputError, ProblemCollector

#: Covariates that are categorical whatever their dtype (sex is often coded 0/1, sites as integers).
CATEGORICAL_NAMES = ("sex", "site")
#: Categorical covariates whose ``unknown`` level is trained (embedding dropout) and so can be scored
#: as the marginal over levels.
MARGINAL_NAMES = ("site",)
_MISSING_STRINGS = {"", "n/a", "na", "nan", "none", "null"}
#: Index of the ``unknown`` level in every categorical embedding.
UNKNOWN_INDEX = 0


def _level_string(value, name: str) -> str | None:
    """One categorical value as the level string stored in the schema (None when missing)."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return None
        if float(value).is_integer():
            value = int(value)
    if isinstance(value, np.integer | bool | np.bool_):
        value = int(value)
    text = str(value).strip()
    if text.lower() in _MISSING_STRINGS:
        return None
    if name == "sex":
        text = SEX_ALIASES.get(text.lower(), text)
    return text


@dataclass
class ContinuousCovariate:
    """A numeric covariate, standardised with the training mean and SD; min/max bound the training range."""

    name: str
    mean: float
    sd: float
    min: float
    max: float


@dataclass
class CategoricalCovariate:
    """A categorical covariate: sorted training levels; level ``i`` is embedding index ``i + 1``."""

    name: str
    levels: list[str]
    marginal: bool = False  # the unknown level is trained, so unseen levels may be scored as the marginal
    #: Per level, the training range ``[min, max]`` of each continuous covariate (kept for the site: a
    #: 70-year-old at a site that had only children is extrapolated even inside the global age range).
    ranges: dict[str, list[list[float]]] | None = None

    def index(self, level: str) -> int:
        return self.levels.index(level) + 1


@dataclass
class CovariateSchema:
    """What the model knows about its covariates: names, kinds, standardisation, levels.

    >>> schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    >>> cont, cat = schema.encode(test)   # float32 [R, n_cont], int64 [R, n_cat]

    Missing values encode as NaN (continuous) and -1 (categorical); :meth:`missing_rows` finds them.
    """

    names: list[str]
    continuous: list[ContinuousCovariate] = field(default_factory=list)
    categorical: list[CategoricalCovariate] = field(default_factory=list)

    # -- learning ---------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: pd.DataFrame, names: Sequence[str],
                   marginal: Iterable[str] = MARGINAL_NAMES,
                   kinds: Mapping[str, str] | None = None) -> CovariateSchema:
        """Learn the schema from the rows of ``table`` that will train the model.

        ``kinds``: ``{name: "continuous" | "categorical"}`` for covariates whose kind is declared rather
        than inferred (e.g. a scanner coded 1, 2, 3 is categorical); the others are inferred.
        """
        names = list(names)
        marginal = set(marginal)
        problems = ProblemCollector()
        if len(set(names)) != len(names):
            problems.add(f"covariates are listed more than once: {names}")
        missing = [n for n in names if n not in table.columns]
        if missing:
            problems.add(f"covariate columns missing from the table: {missing}; "
                         f"the table has {list(table.columns)}")
        problems.extend(kind_problems(kinds, names))
        problems.raise_if_any(header="the covariates cannot be used")
        schema = cls(names=names)
        for name in names:
            column = table[name]
            if _is_categorical(name, column, kinds):
                levels = sorted({lv for lv in (_level_string(v, name) for v in column) if lv is not None})
                if not levels:
                    problems.add(f"covariate '{name}' has no values")
                    continue
                schema.categorical.append(CategoricalCovariate(name, levels, marginal=name in marginal))
                if name in marginal:
                    schema.categorical[-1].ranges = level_ranges(table, name, names, kinds)
            else:
                values = _numeric_column(column, name, problems)
                finite = values[np.isfinite(values)]
                if finite.size == 0:
                    problems.add(f"covariate '{name}' has no values")
                    continue
                sd = float(finite.std())
                if not sd > 0:
                    problems.add(f"covariate '{name}' is constant ({finite[0]!r}) in the training rows; "
                                 f"drop it from the covariates")
                    continue
                schema.continuous.append(ContinuousCovariate(
                    name, float(finite.mean()), sd, float(finite.min()), float(finite.max())))
        problems.raise_if_any(header="the covariates cannot be used")
        return schema

    # -- encoding ---------------------------------------------------------------------------------
    @property
    def n_continuous(self) -> int:
        return len(self.continuous)

    @property
    def n_categorical(self) -> int:
        return len(self.categorical)

    def encode(self, table: pd.DataFrame, unknown: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """Encode ``table`` as ``(cont float32 [R, n_cont], cat int64 [R, n_cat])``.

        ``unknown="error"`` raises :class:`InputError` naming levels never seen in training;
        ``unknown="marginal"`` maps unseen levels of the covariates trained with an unknown level
        (site) to that level, i.e. scores them under the model's marginal over sites, and so does a
        missing value of such a covariate (a row without a site is scored, not dropped).
        """
        if unknown not in ("error", "marginal"):
            raise ValueError(f"unknown must be 'error' or 'marginal', not {unknown!r}")
        problems = ProblemCollector()
        missing = [n for n in self.names if n not in table.columns]
        if missing:
            raise InputError(f"covariate columns missing from the table: {missing}; the model was "
                             f"trained with covariates {self.names}")
        cont = np.empty((len(table), self.n_continuous), dtype=np.float32)
        for j, cov in enumerate(self.continuous):
            values = _numeric_column(table[cov.name], cov.name, problems)
            cont[:, j] = ((values - cov.mean) / cov.sd).astype(np.float32)
        cat = np.empty((len(table), self.n_categorical), dtype=np.int64)
        for j, cov in enumerate(self.categorical):
            lookup = {lv: i + 1 for i, lv in enumerate(cov.levels)}
            levels = [_level_string(v, cov.name) for v in table[cov.name]]
            unseen = sorted({lv for lv in levels if lv is not None and lv not in lookup})
            if unseen and not (unknown == "marginal" and cov.marginal):
                fix = (f"pass unknown_site='marginal' to score them under the model's marginal over "
                       f"{cov.name}s, or drop those rows" if cov.marginal else "recode or drop those rows")
                problems.add(f"covariate '{cov.name}' has levels never seen in training: {unseen}; "
                             f"known levels are {cov.levels}; {fix}")
                continue
            absent = UNKNOWN_INDEX if unknown == "marginal" and cov.marginal else -1
            cat[:, j] = [absent if lv is None else lookup.get(lv, UNKNOWN_INDEX) for lv in levels]
        problems.raise_if_any(header="the covariates cannot be encoded")
        return cont, cat

    def marginal_rows(self, cat: np.ndarray) -> np.ndarray:
        """Rows encoded with the unknown level of a covariate (an unseen or missing site scored under
        the marginal, ``unknown="marginal"``)."""
        cols = [j for j, cov in enumerate(self.categorical) if cov.marginal]
        if not cols:
            return np.zeros(len(cat), dtype=bool)
        return (cat[:, cols] == UNKNOWN_INDEX).any(axis=1)

    def missing_rows(self, cont: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Rows with a missing covariate (they cannot be scored)."""
        return ~np.isfinite(cont).all(axis=1) | (cat < 0).any(axis=1)

    def out_of_range(self, cont: np.ndarray) -> np.ndarray:
        """Rows whose continuous covariates lie outside the training range (scored by extrapolation)."""
        flags = np.zeros(len(cont), dtype=bool)
        for j, cov in enumerate(self.continuous):
            lo, hi = (cov.min - cov.mean) / cov.sd, (cov.max - cov.mean) / cov.sd
            # float32 encoding: allow its rounding at the boundary itself
            tol = 1e-6 * max(1.0, abs(lo), abs(hi))
            flags |= (cont[:, j] < lo - tol) | (cont[:, j] > hi + tol)
        return flags

    def out_of_level_range(self, cont: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Rows whose continuous covariates lie outside the training range of their own site (levels with
        a recorded range; an unknown level has none)."""
        flags = np.zeros(len(cont), dtype=bool)
        for j, cov in enumerate(self.categorical):
            if not cov.ranges:
                continue
            for code, level in enumerate(cov.levels, start=1):
                bounds = cov.ranges.get(level)
                rows = cat[:, j] == code
                if bounds is None or not rows.any():
                    continue
                for k, c in enumerate(self.continuous):
                    lo, hi = ((b - c.mean) / c.sd for b in bounds[k])
                    tol = 1e-6 * max(1.0, abs(lo), abs(hi))
                    flags[rows] |= (cont[rows, k] < lo - tol) | (cont[rows, k] > hi + tol)
        return flags

    def decode_continuous(self, cont: np.ndarray) -> np.ndarray:
        """Standardised continuous covariates back in original units."""
        means = np.array([c.mean for c in self.continuous])
        sds = np.array([c.sd for c in self.continuous])
        return cont.astype(np.float64) * sds + means

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"names": list(self.names),
                "continuous": [asdict(c) for c in self.continuous],
                "categorical": [asdict(c) for c in self.categorical]}

    @classmethod
    def from_dict(cls, state: dict) -> CovariateSchema:
        return cls(names=list(state["names"]),
                   continuous=[ContinuousCovariate(**c) for c in state["continuous"]],
                   categorical=[CategoricalCovariate(**{**c, "levels": list(c["levels"])})
                                for c in state["categorical"]])


def level_ranges(table: pd.DataFrame, name: str, names: Sequence[str],
                 kinds: Mapping[str, str] | None = None) -> dict[str, list[list[float]]]:
    """``{level: [[min, max] per continuous covariate]}`` of the rows of ``table`` at each level of
    ``name`` (the continuous covariates among ``names``, in order; ``kinds`` as in
    :meth:`CovariateSchema.from_table`)."""
    continuous = [n for n in names if n in table.columns and not _is_categorical(n, table[n], kinds)]
    labels = table[name].map(lambda v: _level_string(v, name))
    out = {}
    for level, rows in table.groupby(labels, sort=True):
        bounds = []
        for n in continuous:
            values = pd.to_numeric(rows[n], errors="coerce").to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if not values.size:
                break
            bounds.append([float(values.min()), float(values.max())])
        else:
            out[str(level)] = bounds
    return out


def kind_problems(kinds: Mapping[str, str] | None, names: Sequence[str]) -> list[str]:
    """What is wrong with declared covariate ``kinds`` for the covariates ``names`` (empty: nothing)."""
    if kinds is None:
        return []
    if not isinstance(kinds, Mapping):
        return [f"covariate kinds must be a mapping {{name: kind}}, not {type(kinds).__name__}"]
    out = [f"covariate '{n}': kind {k!r} is unknown; use one of {KINDS}"
           for n, k in kinds.items() if k not in KINDS]
    unknown = [n for n in kinds if n not in names]
    if unknown:
        out.append(f"covariate kinds are given for {unknown}, which are not covariates ({list(names)})")
    return out


def _is_categorical(name: str, column: pd.Series, kinds: Mapping[str, str] | None = None) -> bool:
    if kinds and name in kinds:
        return kinds[name] == "categorical"
    if name in CATEGORICAL_NAMES:
        return True
    return not (pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column))


def _numeric_column(column: pd.Series, name: str, problems: ProblemCollector) -> np.ndarray:
    """A column as float64; values that are present but not numbers are reported, missing ones are NaN."""
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = [(idx, raw) for idx, raw, v in zip(column.index, column, values)
               if np.isnan(v) and _level_string(raw, name) is not None]
        if bad:
            shown = ", ".join(f"row {idx}: {raw!r}" for idx, raw in bad[:5])
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            problems.add(f"covariate '{name}' must be numeric; {shown}{more}; write numbers, "
                         f"or 'n/a' for missing")
    values = values.copy()
    values[~np.isfinite(values)] = np.nan
    return values


@dataclass
class CovariateEncoderConfig:
    """Hyper-parameters of :class:`CovariateEncoder` (saved in the model bundle).

    ``embedding_dim``: width of each categorical embedding, capped by the number of levels + 1 (a
    2-level sex needs no more than 3 numbers). ``unknown_dropout``: probability, per training row, of
    replacing a site by the unknown level, so the unknown level learns the marginal over sites (10%
    leaves each known site 90% of its rows while giving the unknown level a sample of every site).
    """

    embedding_dim: int = 8
    unknown_dropout: float = 0.1


def __getattr__(name):
    if name == "CovariateEncoder":  # the network's module (and torch) load on first use
        from normdiff_bids.model.encoder import CovariateEncoder

        return CovariateEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
