"""Run any evaluation metric per group (sex, site, ...) and collect its scalar results in one table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError


def scalars(result: dict) -> dict:
    """The scalar (number or string) entries of a metric's result dict."""
    out = {}
    for key, value in result.items():
        if isinstance(value, bool | int | float | np.integer | np.floating | str):
            out[key] = value.item() if isinstance(value, np.generic) else value
    return out


def by_group(metric: Callable[..., dict], *tables: pd.DataFrame, by: str, min_rows: int = 1,
             **kwargs) -> pd.DataFrame:
    """Apply ``metric(*subtables, **kwargs)`` to each level of column ``by`` and tabulate its scalars.

    Every table is split by its own ``by`` column (so a generated table split by site holds the samples
    drawn at that site's covariates). Levels with fewer than ``min_rows`` rows in the first table are
    skipped; a level whose metric cannot be computed gets an ``error`` entry rather than stopping the
    others. Returns a DataFrame indexed by level with ``n`` (rows of the first table) and the scalars.

    >>> by_group(absolute_centile_error, holdout, generated, by="site", idps=idps)  # doctest: +SKIP
    """
    for i, table in enumerate(tables):
        if by not in table.columns:
            raise InputError(f"table {i + 1} passed to by_group has no column {by!r}; add the covariate "
                             "column (e.g. join the covariates onto a centile table) or choose another `by`")
    levels = pd.unique(tables[0][by].dropna())
    rows = {}
    for level in sorted(levels, key=str):
        subsets = [t[t[by] == level] for t in tables]
        if len(subsets[0]) < min_rows:
            continue
        row = {"n": len(subsets[0])}
        try:
            row.update(scalars(metric(*subsets, **kwargs)))
        except (ValueError, ZeroDivisionError) as exc:
            row["error"] = str(exc).splitlines()[0]
        rows[str(level)] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = by
    return out
