"""Read FreeSurfer ``stats/*.stats`` files (FreeSurfer 5.3 to 7.x) into plain data and named IDPs.

:func:`read_stats` parses one file as it is (header, ``# Measure`` lines, ``# ColHeaders`` table);
:func:`read_subject_idps` reads a subject's ``stats`` folder into IDPs named as FreeSurfer's
``asegstats2table`` / ``aparcstats2table`` name them, harmonised to FreeSurfer 7 spelling by
:data:`FS6_TO_FS7`.

One module (about 400 lines) on purpose: it is the one reader of one file format, and its tables
(:data:`FS6_TO_FS7`, :data:`PARCELLATIONS`, the table columns) serve both the parser and the IDP naming.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from normdiff_bids.errors import InputError, ProblemCollector

#: Older FreeSurfer spellings and their FreeSurfer 7 equivalents: the one harmonisation table.
#: Applied to aseg/wmparc structure names, parcellation region names and ``# Measure`` names.
FS6_TO_FS7: dict[str, str] = {
    # aseg (FreeSurfer <= 6 ``ASegStatsLUT.txt``)
    "Left-Thalamus-Proper": "Left-Thalamus",
    "Right-Thalamus-Proper": "Right-Thalamus",
    # Destrieux (aparc.a2009s): FreeSurfer <= 6 wrote "&" where FreeSurfer 7 writes "_and_"
    "G&S_frontomargin": "G_and_S_frontomargin",
    "G&S_occipital_inf": "G_and_S_occipital_inf",
    "G&S_paracentral": "G_and_S_paracentral",
    "G&S_subcentral": "G_and_S_subcentral",
    "G&S_transv_frontopol": "G_and_S_transv_frontopol",
    "G&S_cingul-Ant": "G_and_S_cingul-Ant",
    "G&S_cingul-Mid-Ant": "G_and_S_cingul-Mid-Ant",
    "G&S_cingul-Mid-Post": "G_and_S_cingul-Mid-Post",
    "G_Ins_lg&S_cent_ins": "G_Ins_lg_and_S_cent_ins",
    "S_intrapariet&P_trans": "S_intrapariet_and_P_trans",
    "S_oc_middle&Lunatus": "S_oc_middle_and_Lunatus",
    "S_oc_sup&transversal": "S_oc_sup_and_transversal",
    "S_oc-temp_med&Lingual": "S_oc-temp_med_and_Lingual",
    # aseg ``# Measure`` names of FreeSurfer 5.3 (renamed in 6.0)
    "lhCorticalWhiteMatterVol": "lhCerebralWhiteMatterVol",
    "rhCorticalWhiteMatterVol": "rhCerebralWhiteMatterVol",
    "CorticalWhiteMatterVol": "CerebralWhiteMatterVol",
}

#: FreeSurfer 7 name -> older spelling (the synthetic writer uses it to write FreeSurfer 6 files).
FS7_TO_FS6: dict[str, str] = {new: old for old, new in FS6_TO_FS7.items() if "Cortical" not in old}

#: Per-region measures of ``mris_anatomical_stats`` tables, as ``aparcstats2table --meas`` names them.
SURFACE_MEASURES: dict[str, str] = {
    "thickness": "ThickAvg",
    "area": "SurfArea",
    "volume": "GrayVol",
    "thicknessstd": "ThickStd",
    "meancurv": "MeanCurv",
}

#: Parcellation files read by :func:`read_subject_idps`: file stem (after ``lh.``/``rh.``) -> atlas tag
#: in the IDP name (``""`` for the Desikan-Killiany ``aparc``, whose IDPs carry no tag).
PARCELLATIONS: dict[str, str] = {
    "aparc": "",
    "aparc.a2009s": "a2009s",
    "aparc.DKTatlas": "DKTatlas",
    "aparc.pial": "pial",
    "BA_exvivo": "BA_exvivo",
    "BA_exvivo.thresh": "BA_exvivo.thresh",
}

_SEGSTATS_COLUMNS = ("Index", "SegId", "NVoxels", "Volume_mm3", "StructName")
_SURFACE_COLUMNS = ("StructName", "NumVert", "SurfArea", "GrayVol", "ThickAvg", "ThickStd")
_MEASURE_RE = re.compile(r"^#\s*Measure\s+(.*)$")


@dataclass(frozen=True)
class Measure:
    """One ``# Measure`` line: ``# Measure <structure>, <name>, <description>, <value>, <units>``."""

    structure: str
    name: str
    description: str
    value: float
    units: str


@dataclass
class StatsFile:
    """A parsed FreeSurfer stats file, as written (names are not harmonised here).

    ``kind`` is ``"segstats"`` (``mri_segstats``: aseg, wmparc), ``"surface"`` (``mris_anatomical_stats``:
    ?h.aparc*, ?h.BA_exvivo*) or ``"measures"`` (``brainvol.stats``: no table).
    ``measures`` is keyed by the measure's name (second field; ``eTIV`` for the intracranial volume).
    """

    path: Path
    kind: str
    header: dict[str, str]
    measures: dict[str, Measure]
    table: pd.DataFrame | None
    table_columns: list[str] = field(default_factory=list)

    @property
    def version(self) -> str | None:
        """The FreeSurfer version string of the ``cvs_version`` header line, when present."""
        return self.header.get("cvs_version")


def harmonise_name(name: str) -> str:
    """FreeSurfer 7 spelling of a structure, region or measure name (unchanged when already current)."""
    return FS6_TO_FS7.get(name, name)


def read_stats(path: str | Path) -> StatsFile:
    """Parse one FreeSurfer stats file.

    Raises :class:`~normdiff_bids.errors.InputError` naming the file, line and what was expected when the
    file is empty, truncated, garbled or not in a known FreeSurfer stats format.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
        if "\x00" in text:
            raise InputError(f"{path}: binary content, not a FreeSurfer stats text file") from None
    if not text.strip():
        raise InputError(f"{path}: file is empty; expected a FreeSurfer stats file (rerun recon-all or "
                         "remove the file)")
    problems = ProblemCollector()
    lines = text.splitlines()
    header: dict[str, str] = {}
    measures: dict[str, Measure] = {}
    columns: list[str] | None = None
    data: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = _MEASURE_RE.match(stripped)
            if m:
                measure = _parse_measure(m.group(1), path, lineno, problems)
                if measure is not None:
                    measures.setdefault(measure.name, measure)
                continue
            body = stripped[1:].strip()
            key, _, value = body.partition(" ")
            if key == "ColHeaders":
                columns = value.split()
            elif key and key != "TableCol":
                header.setdefault(key, value.strip())
            continue
        if columns is None:
            problems.add(f"{path}, line {lineno}: table row before the '# ColHeaders' line "
                         f"({stripped[:40]!r}); the header is missing or garbled, or this is not a "
                         "FreeSurfer stats file")
            break
        data.append((lineno, stripped.split()))

    truncation: list[str] = []
    if not text.endswith("\n"):
        truncation.append(f"it ends in the middle of line {len(lines)}")
        if data and data[-1][0] == len(lines):
            data.pop()  # the partial row says nothing more than "truncated"
    if columns is None and not measures and not problems:
        problems.add(f"{path}: no '# Measure' lines and no '# ColHeaders' table; not a FreeSurfer stats "
                     "file (expected aseg.stats, wmparc.stats, brainvol.stats or ?h.aparc*.stats)")
    kind = "measures"
    table = None
    if columns is not None:
        kind = _table_kind(columns)
        if kind is None:
            problems.add(f"{path}: unknown stats format: table columns {columns}; expected mri_segstats "
                         f"columns {list(_SEGSTATS_COLUMNS)} or mris_anatomical_stats columns "
                         f"{list(_SURFACE_COLUMNS)} ...")
        else:
            table = _parse_table(path, columns, data, header, problems, truncation)
    if truncation:
        problems.add(f"{path}: the file is truncated: {'; '.join(truncation)} (copy it again or rerun "
                     "recon-all)")
    problems.raise_if_any(header=f"{path} could not be read")
    return StatsFile(path=path, kind=kind, header=header, measures=measures, table=table,
                     table_columns=list(columns or []))


#: What to do about a NaN or infinite value in a stats file (FreeSurfer never writes one for a good run).
_NON_FINITE_FIX = ("the FreeSurfer run of this subject failed or the file was edited; rerun its stats "
                   "(recon-all -segstats / -parcstats) or leave the subject out with --participant-label")


def _parse_measure(body: str, path: Path, lineno: int, problems: ProblemCollector) -> Measure | None:
    fields = [f.strip() for f in body.split(",")]
    if len(fields) == 4 and " " in fields[1]:
        # FreeSurfer 6 mris_anatomical_stats writes "Cortex, CortexVol Total cortical gray matter volume"
        # with the comma after the name missing.
        name, _, description = fields[1].partition(" ")
        fields = [fields[0], name, description.strip(), fields[2], fields[3]]
    if len(fields) != 5:
        problems.add(f"{path}, line {lineno}: garbled '# Measure' line; expected "
                     f"'# Measure <structure>, <name>, <description>, <value>, <units>', got {body!r}")
        return None
    try:
        value = float(fields[3])
    except ValueError:
        problems.add(f"{path}, line {lineno}: '# Measure {fields[1]}' has value {fields[3]!r}, "
                     "which is not a number")
        return None
    if not math.isfinite(value):
        problems.add(f"{path}, line {lineno}: '# Measure {fields[1]}' has value {fields[3]!r}, which is "
                     f"not a finite number; {_NON_FINITE_FIX}")
        return None
    return Measure(structure=fields[0], name=fields[1], description=fields[2], value=value, units=fields[4])


def _table_kind(columns: list[str]) -> str | None:
    if all(c in columns for c in _SEGSTATS_COLUMNS):
        return "segstats"
    if all(c in columns for c in _SURFACE_COLUMNS):
        return "surface"
    return None


def _parse_table(path: Path, columns: list[str], data: list[tuple[int, list[str]]], header: dict[str, str],
                 problems: ProblemCollector, truncation: list[str]) -> pd.DataFrame | None:
    n_before = len(problems)
    declared = header.get("NTableCols")
    if declared is not None and declared.split() and declared.split()[0] != str(len(columns)):
        problems.add(f"{path}: header says NTableCols {declared.split()[0]} but '# ColHeaders' names "
                     f"{len(columns)} columns; the header is garbled")
    rows: list[list] = []
    name_col = columns.index("StructName")
    for lineno, parts in data:
        if len(parts) != len(columns):
            problems.add(f"{path}, line {lineno}: expected {len(columns)} columns ({' '.join(columns)}), "
                         f"found {len(parts)}; the file is truncated or garbled")
            continue
        row: list = []
        for col, value in zip(columns, parts):
            if col == "StructName":
                row.append(value)
                continue
            try:
                number = float(value)
            except ValueError:
                problems.add(f"{path}, line {lineno}, column {col}: {value!r} is not a number")
                number = math.nan
            else:
                if not math.isfinite(number) and (col == "Volume_mm3" or col in SURFACE_MEASURES.values()):
                    problems.add(f"{path}, line {lineno}, column {col}: {value!r} is not a finite number; "
                                 f"{_NON_FINITE_FIX}")
            row.append(number)
        rows.append(row)
    n_rows = header.get("NRows")
    if n_rows is not None and n_rows.split() and n_rows.split()[0].isdigit():
        expected = int(n_rows.split()[0])
        if len(data) < expected:
            truncation.append(f"the header says NRows {expected} but the table has {len(data)} complete rows")
        elif len(data) > expected:
            problems.add(f"{path}: the header says NRows {expected} but the table has {len(data)} rows; "
                         "the file is garbled")
    if not data:
        truncation.append("the '# ColHeaders' table has no rows")
    names = [r[name_col] for r in rows]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        problems.add(f"{path}: structures listed more than once: {duplicated}; the file is garbled")
    if len(problems) > n_before or truncation:
        return None
    table = pd.DataFrame(rows, columns=columns)
    for col in columns:
        if col != "StructName":
            table[col] = table[col].astype(float)
    return table


# -------------------------------------------------------------------------------------------------------
# Subject-level IDPs
# -------------------------------------------------------------------------------------------------------

#: Stats files read by :func:`read_subject_idps`, in reading order.
def subject_stats_files() -> list[str]:
    """File names :func:`read_subject_idps` looks for in a ``stats`` folder."""
    names = ["aseg.stats", "brainvol.stats", "wmparc.stats"]
    for stem in PARCELLATIONS:
        names.extend(f"{hemi}.{stem}.stats" for hemi in ("lh", "rh"))
    return names


def idps_from_stats(stats: StatsFile) -> dict[str, float]:
    """IDPs of one parsed stats file, named as ``asegstats2table``/``aparcstats2table`` (FS 7 spelling).

    The file's role is taken from its name (``aseg.stats``, ``lh.aparc.a2009s.stats``, ...).
    """
    name = stats.path.name
    out: dict[str, float] = {}
    if name in ("aseg.stats", "brainvol.stats"):
        for key, m in stats.measures.items():
            idp = m.structure if key == "eTIV" else harmonise_name(key)
            out[idp] = m.value
    if name in ("aseg.stats", "wmparc.stats") and stats.table is not None:
        for struct, vol in zip(stats.table["StructName"], stats.table["Volume_mm3"]):
            out[harmonise_name(struct)] = float(vol)
        return out
    parsed = _parcellation_of(name)
    if parsed is None:
        return out
    hemi, stem = parsed
    atlas = PARCELLATIONS[stem]
    prefix = f"{hemi}_{atlas}_" if atlas else f"{hemi}_"
    if stats.table is not None:
        for _, row in stats.table.iterrows():
            region = harmonise_name(row["StructName"])
            for measure, column in SURFACE_MEASURES.items():
                if column in stats.table.columns:
                    out[f"{prefix}{region}_{measure}"] = float(row[column])
    # Whole-cortex summaries: DK and pial ones only (the other parcellations repeat the DK values).
    if stem == "aparc":
        for key, suffix in (("MeanThickness", "thickness"), ("WhiteSurfArea", "area")):
            if key in stats.measures:
                out[f"{hemi}_{key}_{suffix}"] = stats.measures[key].value
    elif stem == "aparc.pial" and "PialSurfArea" in stats.measures:
        out[f"{hemi}_pial_PialSurfArea_area"] = stats.measures["PialSurfArea"].value
    return out


def _parcellation_of(filename: str) -> tuple[str, str] | None:
    """``lh.aparc.a2009s.stats`` -> (``lh``, ``aparc.a2009s``); None for files that are not parcellations."""
    if not filename.endswith(".stats") or filename[:3] not in ("lh.", "rh."):
        return None
    stem = filename[3:-len(".stats")]
    return (filename[:2], stem) if stem in PARCELLATIONS else None


@dataclass
class SubjectStats:
    """What :func:`read_subject_stats` found: IDPs, and the FreeSurfer version string of each file read."""

    idps: dict[str, float]
    versions: dict[str, str | None]

    @property
    def version(self) -> str | None:
        """The FreeSurfer version of the subject (of aseg.stats, else of the first file with one)."""
        if self.versions.get("aseg.stats"):
            return self.versions["aseg.stats"]
        return next((v for v in self.versions.values() if v), None)


def read_subject_stats(stats_dir: str | Path, files: list[str] | None = None) -> SubjectStats:
    """Read the recognised stats files of a subject's ``stats`` folder (all of them, or only ``files``).

    Files that are absent are skipped (their IDPs are simply missing); files that are present but
    unreadable are all reported together in one :class:`~normdiff_bids.errors.InputError`.
    A folder with none of the wanted files raises as well.
    """
    stats_dir = Path(stats_dir)
    if not stats_dir.is_dir():
        raise InputError(f"{stats_dir}: FreeSurfer stats folder not found; expected <subject>/stats with "
                         "aseg.stats and ?h.aparc.stats")
    wanted = subject_stats_files() if files is None else list(files)
    unknown = [f for f in wanted if f not in subject_stats_files()]
    if unknown:
        raise ValueError(f"unknown stats files {unknown}; known: {subject_stats_files()}")
    problems = ProblemCollector()
    idps: dict[str, float] = {}
    versions: dict[str, str | None] = {}
    for filename in wanted:
        path = stats_dir / filename
        if not path.is_file():
            continue
        try:
            stats = read_stats(path)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        versions[filename] = stats.version
        expected_kind = "measures" if filename == "brainvol.stats" else (
            "segstats" if filename in ("aseg.stats", "wmparc.stats") else "surface")
        if stats.kind != expected_kind:
            problems.add(f"{path}: holds a {stats.kind!r} table but a {filename} file must hold a "
                         f"{expected_kind!r} one; the file is misnamed or corrupt")
            continue
        for key, value in idps_from_stats(stats).items():
            idps.setdefault(key, value)
    if not versions and not problems:
        problems.add(f"{stats_dir}: none of the FreeSurfer stats files {wanted[:4]}"
                     f"{'...' if len(wanted) > 4 else ''} is present")
    problems.raise_if_any(header=f"FreeSurfer stats in {stats_dir} could not be read")
    return SubjectStats(idps=idps, versions=versions)


def read_subject_idps(stats_dir: str | Path, files: list[str] | None = None) -> dict[str, float]:
    """Read a subject's ``stats`` folder into one ``{idp: value}`` dict (see :func:`read_subject_stats`).

    Names follow ``asegstats2table``/``aparcstats2table`` in FreeSurfer 7 spelling: ``Left-Hippocampus``,
    ``EstimatedTotalIntraCranialVol``, ``lh_superiorfrontal_thickness``,
    ``lh_a2009s_G_and_S_frontomargin_area``.
    """
    return read_subject_stats(stats_dir, files).idps
