"""Score tables on disk: the per-subject deviation tables and the group and reference phenotype files
(TSV + JSON sidecar), and reading them back with their types.

Per-subject files hold that subject's tidy rows; group tables are BIDS phenotype files, one per session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from normdiff_bids import bidsio
from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import output_lock
from normdiff_bids.outputs.score_tables import BOOLEAN_COLUMNS, idps_of_wide, subject_rows, subject_table
from normdiff_bids.outputs.sidecars import SPLIT_LEVELS, phenotype_sidecar, reference_sidecar, subject_sidecar

#: Columns read as text whatever they look like (a site "01" must stay "01").
TEXT_COLUMNS: tuple[str, ...] = ("participant_id", "session_id", "sex", "site", "idp", "measure", "units")


def write_tsv(table: pd.DataFrame, path: str | os.PathLike, sidecar: Mapping) -> tuple[Path, Path]:
    """Write ``table`` (tab-separated, ``n/a`` for missing, booleans as true/false) and its JSON sidecar."""
    path = Path(path)
    undocumented = [c for c in table.columns if c not in sidecar]
    if undocumented:
        raise ValueError(f"the sidecar of {path.name} does not describe the columns {undocumented}")
    bidsio.write_tsv(table, path, float_format="%.10g")
    return path, bidsio.write_json(path.with_suffix(".json"), dict(sidecar), ensure_ascii=False)


def read_scores_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy, wide or per-subject table written here, with labels as text and types restored."""
    header = pd.read_csv(path, sep="\t", nrows=0).columns
    dtype = {c: "str" for c in header if c in TEXT_COLUMNS}
    table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=dtype)
    for col in table.columns:
        if col == "tail" or col.endswith("_tail"):
            table[col] = table[col].astype("Int8")
        elif col in BOOLEAN_COLUMNS:
            table[col] = table[col].map({"true": True, "false": False, True: True, False: False}
                                        ).astype("boolean")
        elif col == "joint_n_idps":
            table[col] = table[col].astype("Int16")
    return table


def write_subject_scores(output_dir: str | os.PathLike, scores: pd.DataFrame) -> list[Path]:
    """Write one deviation table (TSV + JSON) per subject[/session] of ``scores`` (tidy or wide).

    Files: ``sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_desc-deviations_scores.tsv``,
    one row per IDP plus the subject's joint deviation and extrapolation flag on each row.
    Returns the written paths (TSV, JSON, TSV, JSON, ...).
    """
    output_dir = Path(output_dir)
    written = []
    for entities, rows in subject_rows(scores):
        table = subject_table(rows)
        path = output_dir / names.scores_table_path(entities)
        written.extend(write_tsv(table, path, subject_sidecar(table)))
    return written


def write_group_table(output_dir: str | os.PathLike, wide: pd.DataFrame, *,
                      name: str = names.GROUP_TABLE_NAME, merge: bool = True, covariates=None) -> list[Path]:
    """Write the group tables (BIDS phenotype files, TSV + JSON) from a wide table; return the paths.

    BIDS phenotype files hold one row per participant, so rows with a session go to one file per session,
    ``phenotype/<name>_ses-<label>.tsv``, and rows without one to ``phenotype/<name>.tsv``.
    With ``merge=True`` the rows already in a file are kept unless ``wide`` has a row for the same
    participant, which replaces it: parallel participant-level jobs can each add their subjects. The
    read-merge-write happens under the output folder's lock. ``covariates``: the covariate specification
    the sidecar describes the covariate columns by
    (:func:`~normdiff_bids.outputs.sidecars.column_descriptions`).
    """
    if "participant_id" not in wide.columns:
        raise ValueError("a phenotype table needs a participant_id column")
    if wide["participant_id"].isna().any():
        raise ValueError("every row of a group table needs a participant_id")
    output_dir = Path(output_dir)
    written: list[Path] = []
    with output_lock(output_dir):
        for session, rows in _split_by_session(wide):
            table_name = name if session is None else f"{name}_ses-{names.clean_label(session, 'ses')}"
            path = output_dir / names.phenotype_path(table_name)
            table = rows
            if merge and path.exists():
                old = read_scores_table(path)
                keep = ~old["participant_id"].isin(rows["participant_id"])
                table = _restore_column_order(pd.concat([old.loc[keep], rows], ignore_index=True), old, rows)
            if table["participant_id"].duplicated().any():
                dup = sorted(set(table.loc[table["participant_id"].duplicated(), "participant_id"]))
                raise ValueError(f"participants repeated within one session of the group table: {dup}")
            table = _phenotype_columns(table)
            written.extend(write_tsv(table, path, phenotype_sidecar(table, idps_of_wide(table), covariates)))
    return written


#: The phenotype table naming each scored row's role in the model (``phenotype/<name>[_ses-<label>].tsv``).
REFERENCE_TABLE_NAME = "normdiff_reference"


def write_reference_table(output_dir: str | os.PathLike, reference: pd.DataFrame, *,
                          name: str = REFERENCE_TABLE_NAME) -> list[Path]:
    """Write each scored row's role in the model (``split``: train, holdout or none) as phenotype files.

    ``reference``: ids (``participant_id``, optionally ``session_id``) and ``split``. As the group tables,
    rows with a session go to one file per session (``phenotype/<name>_ses-<label>.tsv``), since BIDS
    phenotype files hold one row per participant. Returns the written paths (TSV, JSON, ...).
    """
    unknown = sorted(set(reference["split"].dropna()) - set(SPLIT_LEVELS))
    if unknown:
        raise ValueError(f"split values {unknown} are not one of {sorted(SPLIT_LEVELS)}")
    output_dir = Path(output_dir)
    written: list[Path] = []
    for session, rows in _split_by_session(reference):
        table_name = name if session is None else f"{name}_ses-{names.clean_label(session, 'ses')}"
        table = _phenotype_columns(rows.reset_index(drop=True))
        written.extend(write_tsv(table, output_dir / names.phenotype_path(table_name),
                                 reference_sidecar(table, session)))
    return written


def read_group_table(output_dir: str | os.PathLike, name: str = names.GROUP_TABLE_NAME) -> pd.DataFrame:
    """All rows of the group tables (every session file), as one wide table."""
    folder = Path(output_dir) / names.PHENOTYPE_DIR
    paths = sorted([*folder.glob(f"{name}.tsv"), *folder.glob(f"{name}_ses-*.tsv")])
    if not paths:
        raise FileNotFoundError(f"no group table {name}*.tsv in {folder}")
    return pd.concat([read_scores_table(p) for p in paths], ignore_index=True)


def _split_by_session(wide: pd.DataFrame):
    if "session_id" not in wide.columns:
        yield None, wide
        return
    missing = wide["session_id"].isna()
    if missing.any():
        yield None, wide.loc[missing]
    present = wide.loc[~missing]
    for session in dict.fromkeys(present["session_id"]):
        yield session, present.loc[present["session_id"] == session]


def _restore_column_order(table: pd.DataFrame, old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys([*new.columns, *old.columns]))
    return table[order]


def _phenotype_columns(table: pd.DataFrame) -> pd.DataFrame:
    # BIDS phenotype files start with participant_id (then session_id for longitudinal data).
    front = [c for c in ("participant_id", "session_id") if c in table.columns]
    rest = [c for c in table.columns if c not in front and c != "row"]
    return table[[*front, *rest]]
