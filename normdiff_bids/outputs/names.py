"""Names of every file in the derivatives dataset, built from BIDS entities in one place.

Per-subject files go to ``sub-<label>[/ses-<label>]/anat/`` with entities in the order the BIDS
specification fixes; reports sit at the top level (``sub-<label>[_ses-<label>].html``, as fMRIPrep and
MRIQC do); group tables are phenotype files; trained models live under ``models/``; run records and the
methods text under ``logs/``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from normdiff_bids.conventions import clean_label
from normdiff_bids.errors import InputError

#: Entities this package writes, in the order of the BIDS entity table (``sub`` first, ``desc`` last).
ENTITY_ORDER: tuple[str, ...] = ("sub", "ses", "hemi", "space", "desc")

#: Long entity names accepted as keys, as pybids spells them.
_ENTITY_ALIASES = {"subject": "sub", "session": "ses", "hemisphere": "hemi", "description": "desc"}

#: File extensions this package writes.
EXTENSIONS: tuple[str, ...] = (".tsv", ".json", ".nii.gz", ".func.gii", ".surf.gii", ".html")

_LABEL = re.compile(r"^[0-9A-Za-z]+$")
_SUFFIX = re.compile(r"^[0-9A-Za-z]+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

#: Suffixes of the derivatives (BIDS has no name for these: declared in ``.bidsignore``).
SCORES_SUFFIX = "scores"
ZMAP_SUFFIX = "zmap"
#: The per-subject deviation table: ``sub-01[_ses-1]_desc-deviations_scores.tsv``.
SCORES_DESC = "deviations"

#: Every ``desc-<label>`` the derivatives use and what it means: ``descriptions.tsv`` at the root.
DESCRIPTIONS: dict[str, str] = {
    SCORES_DESC: "Normative deviation scores of the subject's FreeSurfer IDPs under the normdiff-bids model: "
                 "one row per IDP with its value, centile, z-score and tail flag, and the joint deviation of "
                 "all IDPs",
    "volume": "Normative deviation (z) of each region's volume, painted into the subject's FreeSurfer "
              "aparc+aseg (NIfTI) or onto its white surface (GIfTI); NaN where no region was scored",
    "thickness": "Normative deviation (z) of each cortical region's mean thickness, painted into the "
                 "subject's FreeSurfer aparc+aseg (NIfTI) or onto its white surface (GIfTI); NaN where no "
                 "region was scored",
    "area": "Normative deviation (z) of each cortical region's white-surface area, painted into the "
            "subject's FreeSurfer aparc+aseg (NIfTI) or onto its white surface (GIfTI); NaN where no region "
            "was scored",
}
DESCRIPTIONS_TABLE = "descriptions.tsv"
DESCRIPTIONS_SIDECAR = "descriptions.json"

#: Group tables: BIDS phenotype files (``phenotype/<name>.tsv``).
PHENOTYPE_DIR = "phenotype"
GROUP_TABLE_NAME = "normdiff_deviations"
GROUP_REPORT_NAME = "group.html"
MODELS_DIR = "models"
#: Run records, crash reports and the methods text (``logs/`` is free-form in BIDS derivatives).
LOGS_DIR = "logs"
_RUN_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$")


def _ordered_entities(entities: Mapping[str, object]) -> list[tuple[str, str]]:
    normalised: dict[str, str] = {}
    for key, value in entities.items():
        if value is None:
            continue
        name = _ENTITY_ALIASES.get(key, key)
        if name not in ENTITY_ORDER:
            raise ValueError(f"entity {key!r} is not one this package writes; use one of {ENTITY_ORDER}")
        if name in normalised:
            raise ValueError(f"entity {name!r} given twice (as {key!r} and its alias)")
        normalised[name] = clean_label(value, name)
    if "hemi" in normalised and normalised["hemi"] not in ("L", "R"):
        raise ValueError(f"hemi must be 'L' or 'R', got {normalised['hemi']!r}")
    return [(name, normalised[name]) for name in ENTITY_ORDER if name in normalised]


def derivative_path(entities: Mapping[str, object], suffix: str | None, extension: str,
                    *, datatype: str | None = "anat") -> Path:
    """Relative path of a derivative file, e.g. ``sub-01/ses-1/anat/sub-01_ses-1_desc-deviations_scores.tsv``.

    ``entities`` maps BIDS entities (``sub``, ``ses``, ``hemi``, ``space``, ``desc``; pybids' long names
    are accepted too) to labels; ``sub-``/``ses-`` prefixes on values are stripped. ``suffix=None``
    names a file by its entities alone (the reports). ``datatype=None`` puts the file at the top level
    of the dataset; otherwise under ``sub-<label>[/ses-<label>]/<datatype>/``.
    """
    ordered = _ordered_entities(entities)
    if not ordered or ordered[0][0] != "sub":
        raise ValueError(f"a derivative name needs a 'sub' entity; got {dict(entities)!r}")
    if extension not in EXTENSIONS:
        raise ValueError(f"extension {extension!r} is not one this package writes: {EXTENSIONS}")
    if suffix is not None and not _SUFFIX.match(suffix):
        raise ValueError(f"suffix {suffix!r} must be letters and digits only")
    parts = [f"{name}-{label}" for name, label in ordered]
    if suffix is not None:
        parts.append(suffix)
    filename = "_".join(parts) + extension
    if datatype is None:
        return Path(filename)
    if not _SUFFIX.match(datatype):
        raise ValueError(f"datatype {datatype!r} must be letters and digits only")
    folder = Path(f"sub-{ordered[0][1]}")
    ses = dict(ordered).get("ses")
    if ses is not None:
        folder = folder / f"ses-{ses}"
    return folder / datatype / filename


def subject_entities(participant_id: object, session_id: object = None) -> dict[str, str]:
    """Entities of one subject (and session) from table ids (``sub-01``, ``ses-1``; NaN session = none)."""
    entities = {"sub": clean_label(participant_id, "sub")}
    if session_id is not None and not _is_missing(session_id):
        entities["ses"] = clean_label(session_id, "ses")
    return entities


def scores_table_path(entities: Mapping[str, object]) -> Path:
    """Per-subject deviation table: ``sub-01[/ses-1]/anat/sub-01[_ses-1]_desc-deviations_scores.tsv``."""
    return derivative_path({**_base(entities), "desc": SCORES_DESC}, SCORES_SUFFIX, ".tsv")


def deviation_map_path(entities: Mapping[str, object], measure: str) -> Path:
    """Volumetric deviation map of one measure: ``..._desc-<measure>_zmap.nii.gz``."""
    return derivative_path({**_base(entities), "desc": measure}, ZMAP_SUFFIX, ".nii.gz")


def surface_map_path(entities: Mapping[str, object], measure: str, hemi: str) -> Path:
    """Per-vertex deviation map: ``..._hemi-L_space-fsnative_desc-<measure>_zmap.func.gii``."""
    return derivative_path({**_base(entities), "hemi": _hemi_letter(hemi), "space": "fsnative",
                            "desc": measure}, ZMAP_SUFFIX, ".func.gii")


def surface_path(entities: Mapping[str, object], hemi: str, surface: str = "white") -> Path:
    """The subject's surface in GIfTI form: ``..._hemi-L_white.surf.gii`` (as sMRIPrep names it)."""
    return derivative_path({**_base(entities), "hemi": _hemi_letter(hemi)}, surface, ".surf.gii")


def subject_report_path(entities: Mapping[str, object]) -> Path:
    """Top-level subject report: ``sub-01[_ses-1].html``."""
    return derivative_path(_base(entities), None, ".html", datatype=None)


def group_report_path() -> Path:
    return Path(GROUP_REPORT_NAME)


def phenotype_path(name: str = GROUP_TABLE_NAME, extension: str = ".tsv") -> Path:
    """A group table: ``phenotype/<name>.tsv`` (BIDS phenotype files take any name)."""
    if not _NAME.match(name) or "." in name:
        raise ValueError(f"phenotype table name {name!r} must be letters, digits, '_' or '-'")
    if extension not in (".tsv", ".json"):
        raise ValueError(f"phenotype files are .tsv or .json, got {extension!r}")
    return Path(PHENOTYPE_DIR) / f"{name}{extension}"


def model_dir(name: str = "default") -> Path:
    """Folder of a trained model bundle: ``models/<name>/``."""
    _check_model_name(name)
    return Path(MODELS_DIR) / name


def model_card_path(name: str = "default", extension: str = ".json") -> Path:
    """The model card beside its bundle: ``models/<name>_modelcard.json`` (or ``.md``)."""
    _check_model_name(name)
    if extension not in (".json", ".md"):
        raise ValueError(f"model cards are .json or .md, got {extension!r}")
    return Path(MODELS_DIR) / f"{name}_modelcard{extension}"


def run_record_path(run_id: str) -> Path:
    """The record of one run: ``logs/run-<run_id>.json`` (``run_id``: UTC start, ``20260102T130405Z``,
    with ``-2``, ``-3``, ... when runs started in the same second)."""
    return Path(LOGS_DIR) / f"run-{_check_run_id(run_id)}.json"


def run_crash_dir(run_id: str) -> Path:
    """Crash reports of the steps that failed in one run: ``logs/run-<run_id>/``."""
    return Path(LOGS_DIR) / f"run-{_check_run_id(run_id)}"


def citation_path(extension: str = ".md") -> Path:
    """The methods text of the last run, ``logs/CITATION.md``, and its references, ``logs/CITATION.bib``."""
    if extension not in (".md", ".bib"):
        raise ValueError(f"the citation files are .md or .bib, got {extension!r}")
    return Path(LOGS_DIR) / f"CITATION{extension}"


def _check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} is not a UTC time stamp like '20260102T130405Z' (or with '-2')")
    return run_id


def _check_model_name(name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise InputError(
            f"model name {name!r} is not valid; use letters, digits, '.', '_' or '-' (no slashes)")


def _base(entities: Mapping[str, object]) -> dict[str, object]:
    keep = {"sub", "ses", "subject", "session"}
    return {k: v for k, v in entities.items() if k in keep}


def _hemi_letter(hemi: str) -> str:
    letters = {"lh": "L", "rh": "R", "L": "L", "R": "R"}
    if hemi not in letters:
        raise ValueError(f"hemisphere must be 'lh', 'rh', 'L' or 'R', got {hemi!r}")
    return letters[hemi]


def _is_missing(value: object) -> bool:
    # Plain Python on purpose: the output-folder checks run without pandas.
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() in ("", "n/a")
    try:
        return bool(value != value)  # NaN and NaT are the values unequal to themselves
    except TypeError:  # pandas.NA refuses to be a truth value
        return True
