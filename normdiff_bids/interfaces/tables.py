"""Tables passed between Nipype nodes: BIDS-style TSV (``n/a`` for missing), labels kept as text."""

from __future__ import annotations

import os

import pandas as pd

from normdiff_bids.bidsio import write_tsv


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> str:
    """Write ``table`` tab-separated with ``n/a`` for missing values (:func:`normdiff_bids.bidsio.write_tsv`);
    return the path. Read it back with :func:`read_table` (label columns as text, flags as booleans)."""
    return os.fspath(write_tsv(table, path))


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_table`."""
    from normdiff_bids.outputs.score_files import read_scores_table

    return read_scores_table(path)


def subject_scores(scores_path: str | os.PathLike, participant_id: str, session_id: str | None = None):
    """The one row of a wide score table belonging to a subject (and session), as a one-row DataFrame."""
    return select_row(read_table(scores_path), participant_id, session_id, scores_path)


def select_row(wide: pd.DataFrame, participant_id: str, session_id: str | None = None,
               source: str | os.PathLike = "the score table") -> pd.DataFrame:
    """The one row of ``wide`` (read from ``source``) belonging to a subject (and session)."""
    mask = wide["participant_id"].astype(str) == participant_id
    if session_id and "session_id" in wide.columns:
        mask &= wide["session_id"].astype(str) == session_id
    rows = wide.loc[mask]
    if len(rows) != 1:
        what = participant_id + (f" {session_id}" if session_id else "")
        raise ValueError(f"expected one row for {what} in {source}, found {len(rows)}")
    return rows.reset_index(drop=True)


def subject_row(scores_path: str | os.PathLike, participant_id: str, session_id: str | None = None):
    """The subject's wide score row as a Series."""
    return subject_scores(scores_path, participant_id, session_id).iloc[0]
