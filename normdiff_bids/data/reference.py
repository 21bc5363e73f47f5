"""Choosing the normative reference: the participants (and rows) a model is trained on.

One place for the command line and the Nipype interfaces alike; queries go through
:mod:`normdiff_bids.data.query`, which parses them and never evaluates code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from normdiff_bids.data.query import QueryError, query_mask
from normdiff_bids.errors import InputError

#: Fewest reference rows a model is trained on (below this the held-out evaluation is meaningless).
MIN_REFERENCE_ROWS = 10


def _sub(pid) -> str:
    pid = str(pid)
    return pid if pid.startswith("sub-") else f"sub-{pid}"


def select_reference(table: pd.DataFrame, participants=None, query: str | None = None,
                     min_rows: int = MIN_REFERENCE_ROWS) -> pd.DataFrame:
    """Rows of ``table`` forming the normative reference: listed participants and/or a query over columns.

    ``min_rows``: fewest rows accepted (training needs :data:`MIN_REFERENCE_ROWS`; adapting a trained
    model to new sites needs 2 per site, which :meth:`NormativeDiffusion.adapt` checks itself).
    """
    reference = table
    if participants:
        wanted = {_sub(p) for p in participants}
        reference = reference[reference["participant_id"].isin(wanted)]
    if query:
        try:
            reference = reference[query_mask(reference, query)]
        except QueryError as exc:
            raise QueryError(f"reference query over the IDP table: {exc}") from None
    if len(reference) < min_rows:
        raise InputError(f"the normative reference has {len(reference)} rows; at least {min_rows} "
                         f"are needed to train and evaluate a model; widen the reference selection")
    return reference


def _blank_as_missing(value):
    return (value.strip() or None) if isinstance(value, str) else value


def read_participants_table(path: Path) -> pd.DataFrame:
    """participants.tsv with inferred column types (numbers as numbers), ``n/a`` and empty cells as
    missing (as the covariate reader has them).

    A UTF-8 byte-order mark and Windows line ends are accepted.
    """
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", ""], keep_default_na=False,
                            dtype={"participant_id": str}, encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; the reference query is evaluated on participants.tsv") \
            from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid tab-separated table ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    for column in table.columns:
        if table[column].dtype == object or pd.api.types.is_string_dtype(table[column]):
            values = table[column].astype(object).map(_blank_as_missing)
            values = values.where(values != "n/a", None)
            numbers = pd.to_numeric(values, errors="coerce")
            # a column of numbers whose blanks were padded with spaces is still a column of numbers
            table[column] = numbers if column != "participant_id" and values.notna().any() \
                and numbers.notna().sum() == values.notna().sum() else values
    return table


def reference_participants(bids_dir: Path, query: str | None, table: pd.DataFrame) -> list[str]:
    """Participants (``sub-`` ids) of ``table`` forming the reference: ``query`` over participants.tsv,
    else everyone."""
    present = sorted(set(table["participant_id"]))
    if not query:
        return present
    path = Path(bids_dir) / "participants.tsv"
    participants = read_participants_table(path)
    try:
        chosen = participants[query_mask(participants, query)]
    except QueryError as exc:
        raise QueryError(f"--reference-query over {path}: {exc}") from None
    ids = {_sub(p) for p in chosen["participant_id"].astype(str)}
    selected = [p for p in present if p in ids]
    if not selected:
        raise InputError(f"--reference-query {query!r} selects no participant with IDPs "
                         f"({len(chosen)} rows of {path} match); check the query")
    return selected
