"""Naming conventions declared once: id columns, sex spellings, BIDS labels, short previews in messages.

Plain Python (no pandas, no torch) so that every layer (data, model, outputs, cli) may import it.
"""

from __future__ import annotations

__all__ = ["ID_COLUMNS", "ROW_ID_COLUMNS", "NON_IDP_COLUMNS", "SEX_ALIASES", "preview"]

#: Columns that identify a subject/session row of an IDP or covariate table.
ID_COLUMNS: tuple[str, ...] = ("participant_id", "session_id")
#: Id columns of a score table: ``row`` stands in for ``participant_id`` when a table has none.
ROW_ID_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "row")
#: Columns never taken as IDPs when the IDPs are not named (ids and common index spellings).
NON_IDP_COLUMNS: tuple[str, ...] = (*ROW_ID_COLUMNS, "index", "subject", "subject_id", "run")

#: Spellings of sex read as ``F`` / ``M`` (case-insensitive, after stripping).
SEX_ALIASES: dict[str, str] = {"f": "F", "female": "F", "w": "F", "woman": "F",
                               "m": "M", "male": "M", "man": "M"}


def preview(items, n: int = 8) -> str:
    """The first ``n`` items and a count of the rest, for messages: ``"a, b and 3 more"`` (``"none"``)."""
    items = list(items)
    if not items:
        return "none"
    shown = ", ".join(map(str, items[:n]))
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
