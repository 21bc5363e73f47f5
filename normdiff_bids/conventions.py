"""Naming conventions declared once: id columns, sex spellings, BIDS labels, short previews in messages.

Plain Python (no numpy, pandas or torch) so that every layer (data, model, outputs, cli) may import it.
"""

from __future__ import annotations

import re

from normdiff_bids.errors import InputError

__all__ = ["ID_COLUMNS", "NON_IDP_COLUMNS", "ROW_ID_COLUMNS", "SEX_ALIASES", "clean_label", "clean_labels",
           "preview"]

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


_LABEL = re.compile(r"^[0-9A-Za-z]+$")


def clean_label(value: object, entity: str = "sub") -> str:
    """Return the bare label of a BIDS entity value, accepting ``"01"`` or ``"sub-01"`` for ``sub``.

    Raises :class:`InputError` for anything that is not a BIDS label (letters and digits only), so a
    path-like value such as ``"../x"`` can never leave the output folder.
    """
    text = str(value).strip() if value is not None else ""
    prefix = f"{entity}-"
    if text.startswith(prefix):
        text = text[len(prefix):]
    if not _LABEL.match(text):
        raise InputError(
            f"{entity} label {str(value)!r} is not a valid BIDS label; labels hold letters and digits only "
            f"(for example '{entity}-01' or '01'), without '-', '_', '/', '.' or spaces")
    return text


def clean_labels(values, entity: str = "sub") -> tuple[list[str], list[str]]:
    """The bare labels of ``values`` (:func:`clean_label` of each; repeats dropped, order kept) and the
    problem of every value that is not a BIDS label."""
    labels, problems = [], []
    for value in values:
        try:
            labels.append(clean_label(value, entity))
        except InputError as exc:
            problems.extend(exc.problems)
    return list(dict.fromkeys(labels)), problems
