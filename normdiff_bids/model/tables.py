"""Reading IDP and covariate columns of a user's table the way the estimator needs them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError

__all__ = ["idp_matrix", "present"]


def idp_matrix(table: pd.DataFrame, idps: list[str], purpose: str) -> np.ndarray:
    """IDP columns as float64 [R, D]; non-numeric columns are an error naming them (NaN stays NaN)."""
    bad = []
    columns = []
    for name in idps:
        col = table[name]
        if pd.api.types.is_bool_dtype(col):
            bad.append(f"'{name}' (true/false values)")
            continue
        if pd.api.types.is_numeric_dtype(col):
            columns.append(col.to_numpy(dtype=np.float64, na_value=np.nan))
            continue
        conv = pd.to_numeric(col, errors="coerce")
        text = col.astype("string").str.strip().str.lower()
        wrong = conv.isna() & col.notna() & ~text.isin(["", "n/a", "na", "nan"])
        if wrong.any():
            first = wrong.to_numpy().nonzero()[0][0]
            bad.append(f"'{name}' (row {table.index[first]}: {col.iloc[first]!r})")
            continue
        columns.append(conv.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad:
        raise InputError(f"IDP columns must be numeric for {purpose}: {', '.join(bad)}; fix or drop those "
                         f"columns (write 'n/a' for missing values)")
    return np.column_stack(columns) if columns else np.empty((len(table), 0))


def present(column: pd.Series) -> pd.Series:
    """Whether each covariate value is present (not NaN/None/'n/a'/empty/inf)."""
    if pd.api.types.is_numeric_dtype(column):
        return pd.Series(np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan)), index=column.index)
    text = column.astype("string").str.strip().str.lower()
    return column.notna() & ~text.isin(["", "n/a", "na", "nan", "none", "null"]).fillna(True)
