"""The BIDS side of the inputs: subjects and sessions, covariates, and where FreeSurfer put its outputs.

pybids indexes the raw dataset (subjects, sessions); covariates come from ``participants.tsv`` and, when
age changes per visit, ``sub-<label>/sub-<label>_sessions.tsv``. FreeSurfer folders are found under
``--fs-dir``, ``derivatives/freesurfer`` or ``derivatives/{fmriprep,smriprep}/sourcedata/freesurfer``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from normdiff_bids.conventions import SEX_ALIASES
from normdiff_bids.covariate_spec import ROLE_OPTIONS, CovariateSpec, CovariateSpecs
from normdiff_bids.errors import InputError, ProblemCollector

#: Where FreeSurfer outputs are looked for, relative to the BIDS root, after an explicit ``--fs-dir``.
FREESURFER_LOCATIONS: tuple[str, ...] = (
    "derivatives/freesurfer",
    "derivatives/fmriprep/sourcedata/freesurfer",
    "derivatives/smriprep/sourcedata/freesurfer",
)

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_FS_SUBJECT_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?$")
_FS_LONG_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?\.long\.(?P<base>.+)$")


# -------------------------------------------------------------------------------------------------------
# Subjects and sessions
# -------------------------------------------------------------------------------------------------------

def bids_subjects_sessions(bids_dir: str | Path) -> dict[str, list[str]]:
    """``{"sub-01": ["ses-1", "ses-2"], "sub-02": []}`` as indexed by pybids (derivatives not indexed)."""
    bids_dir = _check_bids_dir(bids_dir)
    from bids import BIDSLayout  # imported here: pybids is slow to import

    try:
        layout = BIDSLayout(bids_dir, validate=False, derivatives=False)
    except Exception as exc:  # pybids raises a zoo of errors on broken datasets
        raise InputError(f"{bids_dir}: pybids cannot index this dataset ({type(exc).__name__}: {exc}); "
                         "check dataset_description.json and the folder names") from None
    # One pass over the indexed files (per-subject get_sessions queries are slow on large datasets).
    sessions: dict[str, set[str]] = {}
    for bids_file in layout.get(return_type="object"):
        entities = bids_file.get_entities()
        if "subject" not in entities:
            continue
        found = sessions.setdefault(f"sub-{entities['subject']}", set())
        if entities.get("session") is not None:
            found.add(f"ses-{entities['session']}")
    return {sub: sorted(sessions[sub]) for sub in sorted(sessions)}


def _check_bids_dir(bids_dir: str | Path) -> Path:
    bids_dir = Path(bids_dir).expanduser().absolute()
    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: BIDS folder not found")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing")
    return bids_dir


# -------------------------------------------------------------------------------------------------------
# Covariates
# -------------------------------------------------------------------------------------------------------

def read_tsv(path: Path) -> pd.DataFrame:
    """A BIDS TSV as strings with ``n/a`` (and empty cells) as missing; the header line is line 1."""
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[],
                            skipinitialspace=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid tab-separated table ({exc})") from None
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: the file is empty; expected a header line with participant_id") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table.apply(lambda col: col.str.strip()).replace({"n/a": np.nan, "": np.nan})


@dataclass
class CovariateColumns:
    """Which participants.tsv/sessions.tsv columns hold age, sex and site (``site=None``: no site).

    The shorthand of :class:`~normdiff_bids.covariate_spec.CovariateSpecs` for the three roles alone.
    """

    age: str = "age"
    sex: str = "sex"
    site: str | None = "site"

    def as_dict(self) -> dict[str, str]:
        return {spec.name: spec.column for spec in self.spec()}

    def spec(self) -> CovariateSpecs:
        return CovariateSpecs.from_options(age_column=self.age, sex_column=self.sex, site_column=self.site)


@dataclass
class Covariates:
    """Covariates per subject (``participants``) and, when age is per visit, per session (``sessions``)."""

    participants: pd.DataFrame  # participant_id + the covariates under their names (age, sex, site, ...)
    sessions: pd.DataFrame | None  # participant_id, session_id, age (when sessions.tsv carries it)
    notes: list[str] = field(default_factory=list)
    #: The covariates read, every kind known (those not given were inferred from the values).
    spec: CovariateSpecs = field(default_factory=CovariateSpecs.default)


def read_covariates(bids_dir: str | Path, subjects: dict[str, list[str]] | None = None,
                    columns: CovariateColumns | CovariateSpecs | None = None,
                    problems: ProblemCollector | None = None) -> Covariates:
    """Read ``participants.tsv`` (and ``sessions.tsv`` files) into covariates under their names.

    ``columns``: the covariates to read (:class:`~normdiff_bids.covariate_spec.CovariateSpecs`, or the
    :class:`CovariateColumns` of the three roles); default age, sex and site. Age and continuous
    covariates become numbers, sex is normalised (:data:`~normdiff_bids.conventions.SEX_ALIASES`), other
    categorical covariates are kept as written; a covariate of no given kind is continuous when every
    value present is a number, else categorical (``Covariates.spec`` says which).
    Problems (missing file or column, duplicate participants, non-numeric ages) are added to
    ``problems`` when given (so a cohort's problems are reported together), else raised at once.
    """
    bids_dir = Path(bids_dir)
    spec = columns.spec() if isinstance(columns, CovariateColumns) else CovariateSpecs.coerce(columns)
    own = problems is None
    problems = problems if problems is not None else ProblemCollector()
    path = bids_dir / "participants.tsv"
    if not path.is_file():
        problems.add(f"{path} not found; add a participants.tsv with participant_id and "
                     f"{', '.join(spec.columns)} columns")
        problems.raise_if_any(header="covariates could not be read")
    raw = read_tsv(path)
    if "participant_id" not in raw.columns:
        problems.add(f"{path}, line 1: no 'participant_id' column; columns are {list(raw.columns)}")
        problems.raise_if_any(header="covariates could not be read")

    ids = raw["participant_id"]
    missing_id = ids.isna()
    for i in np.flatnonzero(missing_id.to_numpy()):
        problems.add(f"{path}, line {i + 2}: participant_id is empty")
    ids = pd.Series([pid if pd.isna(pid) or str(pid).startswith("sub-") else f"sub-{pid}" for pid in ids],
                    index=raw.index, dtype=object)
    # Only the selected participants' rows are checked and kept: a bad row of someone else (another
    # array job's participant) must not stop this selection.
    in_scope = ~missing_id if not subjects else ids.isin(list(subjects))
    duplicated = ids[ids.duplicated(keep=False) & in_scope]
    for pid in dict.fromkeys(duplicated):
        lines = [str(i + 2) for i in np.flatnonzero((ids == pid).to_numpy())]
        problems.add(f"{path}: participant {pid!r} is listed more than once (lines {', '.join(lines)}); "
                     "keep one row per participant")
    raw = raw[in_scope].copy()
    raw["participant_id"] = ids[in_scope].to_numpy()

    # Age may live in sessions.tsv instead (longitudinal data): look there before calling it missing.
    age = spec.role("age")
    sessions = _read_sessions(bids_dir, subjects or {}, age.column, problems) if age is not None else None
    out = pd.DataFrame({"participant_id": raw["participant_id"].to_numpy()})
    lines = raw.index.to_numpy() + 2
    inferred: dict[str, str] = {}
    for cov in spec:
        if cov.column not in raw.columns:
            if cov.role == "age" and sessions is not None:
                out[cov.name] = np.nan
                continue
            problems.add(f"{path}, line 1: no {cov.column!r} column for {_covariate_text(cov)}; columns are "
                         f"{list(raw.columns)} ({_column_fix(cov)})")
            continue
        values = raw[cov.column]
        if cov.role == "age":
            out[cov.name] = _numeric(values, path, cov.column, lines, problems)
        elif cov.role == "sex":
            out[cov.name] = [_normalise_sex(v) for v in values]
        elif cov.kind == "continuous":
            out[cov.name] = _numeric(values, path, cov.column, lines, problems,
                                     f"{_covariate_text(cov)} is continuous: write numbers (or n/a when "
                                     f"unknown), or declare it with --covariate {cov.column}:categorical")
        elif cov.kind is None and _all_numbers(values):
            inferred[cov.name] = "continuous"
            out[cov.name] = pd.to_numeric(values).to_numpy(dtype=float)
        else:
            inferred[cov.name] = "categorical"
            out[cov.name] = values.to_numpy()
    if own:
        problems.raise_if_any(header="covariates could not be read")
    return Covariates(participants=out, sessions=sessions, spec=spec.resolved(inferred))


def _covariate_text(cov: CovariateSpec) -> str:
    return cov.role if cov.role is not None else f"the covariate {cov.name!r}"


def _column_fix(cov: CovariateSpec) -> str:
    if cov.role is not None:
        return f"choose the column with {ROLE_OPTIONS[cov.role]}"
    return f"add the column, or leave out --covariate {cov.column} (and models trained with it)"


def _all_numbers(values: pd.Series) -> bool:
    """Every value present is a number (and one is present): the covariate is continuous."""
    present = values.dropna()
    return bool(len(present)) and bool(pd.to_numeric(present, errors="coerce").notna().all())


def _numeric(values: pd.Series, path: Path, column: str, lines, problems: ProblemCollector,
             fix: str = "write age in years as a number (or n/a when unknown)") -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(numbers) & values.notna().to_numpy()
    for line, value in zip(lines[bad], values[bad]):
        problems.add(f"{path}, line {line}, column {column!r}: {value!r} is not a number; {fix}")
    return numbers


def _normalise_sex(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.nan
    return SEX_ALIASES.get(str(value).strip().lower(), str(value).strip())


def _read_sessions(bids_dir: Path, subjects: dict[str, list[str]], age_column: str,
                   problems: ProblemCollector) -> pd.DataFrame | None:
    """Per-visit ages from ``sub-X/sub-X_sessions.tsv`` (None when no sessions file has the age column)."""
    rows = []
    found_column = False
    for sub, sessions in subjects.items():
        if not sessions:
            continue
        path = bids_dir / sub / f"{sub}_sessions.tsv"
        if not path.is_file():
            continue
        try:
            table = read_tsv(path)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        if "session_id" not in table.columns:
            problems.add(f"{path}, line 1: no 'session_id' column; columns are {list(table.columns)}")
            continue
        if age_column not in table.columns:
            continue
        found_column = True
        ages = _numeric(table[age_column], path, age_column, table.index.to_numpy() + 2, problems)
        for sid, age in zip(table["session_id"], ages):
            sid = str(sid) if str(sid).startswith("ses-") else f"ses-{sid}"
            rows.append({"participant_id": sub, "session_id": sid, "age": age})
    if not found_column:
        return None
    return pd.DataFrame(rows, columns=["participant_id", "session_id", "age"])


# -------------------------------------------------------------------------------------------------------
# FreeSurfer folders
# -------------------------------------------------------------------------------------------------------

def find_freesurfer_dir(bids_dir: str | Path, fs_dir: str | Path | None = None) -> Path | None:
    """The FreeSurfer SUBJECTS_DIR: ``fs_dir`` when given (it must exist), else the first of
    :data:`FREESURFER_LOCATIONS` under ``bids_dir`` that exists; None when there is none."""
    if fs_dir is not None:
        fs_dir = Path(fs_dir).expanduser().absolute()
        if not fs_dir.is_dir():
            raise InputError(f"FreeSurfer folder {fs_dir} not found; give the SUBJECTS_DIR that holds "
                             "sub-<label> folders")
        return fs_dir
    for rel in FREESURFER_LOCATIONS:
        candidate = Path(bids_dir).expanduser().absolute() / rel
        if candidate.is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class FreeSurferSubject:
    """One FreeSurfer subject folder: ``sub-X``, ``sub-X_ses-Y`` or a longitudinal ``<tp>.long.<base>``."""

    path: Path
    participant_id: str
    session_id: str | None
    longitudinal: bool = False


@dataclass
class FreeSurferFolders:
    """FreeSurfer subject folders, cross-sectional and longitudinal kept apart, and what was skipped."""

    root: Path
    cross: dict[tuple[str, str | None], FreeSurferSubject]
    longitudinal: dict[tuple[str, str | None], FreeSurferSubject]
    skipped: list[str]


def list_freesurfer_subjects(fs_dir: str | Path) -> FreeSurferFolders:
    """Index a SUBJECTS_DIR by (participant_id, session_id).

    ``fsaverage*`` and other non-BIDS folders are skipped; longitudinal templates (folders holding
    ``base-tps``) are skipped; ``<timepoint>.long.<template>`` folders are listed apart from the
    cross-sectional ones so the two are never mixed.
    """
    root = Path(fs_dir)
    cross: dict = {}
    longitudinal: dict = {}
    skipped: list[str] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        name = entry.name
        if name.startswith("fsaverage") or name.startswith("."):
            continue
        m_long = _FS_LONG_RE.match(name)
        if m_long:
            key = (f"sub-{m_long['sub']}", f"ses-{m_long['ses']}" if m_long["ses"] else None)
            longitudinal[key] = FreeSurferSubject(entry, key[0], key[1], longitudinal=True)
            continue
        m = _FS_SUBJECT_RE.match(name)
        if not m:
            skipped.append(name)
            continue
        if (entry / "base-tps").is_file():
            skipped.append(f"{name} (longitudinal template)")
            continue
        key = (f"sub-{m['sub']}", f"ses-{m['ses']}" if m["ses"] else None)
        cross[key] = FreeSurferSubject(entry, key[0], key[1])
    return FreeSurferFolders(root=root, cross=cross, longitudinal=longitudinal, skipped=skipped)


def match_freesurfer_subject(folders: FreeSurferFolders, participant_id: str, session_id: str | None,
                             n_sessions: int, longitudinal: bool = False) -> FreeSurferSubject | None:
    """The folder of one (participant, session): ``sub-X_ses-Y``, or ``sub-X`` when the participant has a
    single session (FreeSurfer habit: one folder per participant). Longitudinal folders only when asked."""
    index = folders.longitudinal if longitudinal else folders.cross
    if (participant_id, session_id) in index:
        return index[(participant_id, session_id)]
    if session_id is None or n_sessions <= 1:
        return index.get((participant_id, None))
    return None
