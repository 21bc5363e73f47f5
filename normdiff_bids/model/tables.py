"""Reading IDP and covariate columns of a user's table the way the estimator needs them, and choosing the
columns and rows it trains on."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from normdiff_bids.conventions import NON_IDP_COLUMNS
from normdiff_bids.errors import InputError, ProblemCollector

__all__ = ["MIN_TRAIN_ROWS", "idp_matrix", "present", "select_idps", "training_rows"]

#: Training refuses to start with fewer complete rows than this.
MIN_TRAIN_ROWS = 20


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


def select_idps(table: pd.DataFrame, idps, covariates: list[str]) -> list[str]:
    """The IDP columns ``fit`` learns: ``idps`` checked against ``table`` and the covariates, or (``None``)
    every numeric column that is not a covariate or an id column. Every problem is reported at once."""
    problems = ProblemCollector()
    missing_cov = [c for c in covariates if c not in table.columns]
    if missing_cov:
        problems.add(f"covariate columns missing from the table: {missing_cov}")
    if idps is None:
        idps = [c for c in table.columns
                if c not in covariates and str(c) not in NON_IDP_COLUMNS
                and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
        if not idps:
            problems.add(f"no numeric IDP columns besides the covariates {covariates}; the table has "
                         f"{list(table.columns)}")
    else:
        idps = [idps] if isinstance(idps, str) else list(idps)
        missing = [c for c in idps if c not in table.columns]
        if missing:
            problems.add(f"IDP columns missing from the table: {missing}")
        both = [c for c in idps if c in covariates]
        if both:
            problems.add(f"columns are both IDPs and covariates: {both}")
        if len(set(idps)) != len(idps):
            problems.add("IDP columns are listed more than once: "
                         f"{sorted({c for c in idps if idps.count(c) > 1})}")
        if not idps:
            problems.add("idps is empty; pass None to use every numeric column")
    problems.raise_if_any(header="the table cannot be used to fit a model")
    return idps


def training_rows(table: pd.DataFrame, idps: list[str], covariates: list[str], missing_idps: str,
                  min_rows: int) -> tuple[pd.DataFrame, np.ndarray, int, int]:
    """The rows ``fit`` trains on: ``(kept rows, their IDP values [R, D] with NaN for missing or non-finite
    entries, rows dropped, kept rows missing some IDPs)``.

    A row needs every covariate and an IDP (``missing_idps="use"``) or every IDP (``"drop"``); dropped
    and partial rows are warned about (as ``fit``'s caller). Too few rows, and IDPs with fewer than
    ``min_rows`` values or none that differ, are errors naming the fix.
    """
    values = idp_matrix(table, idps, "training")
    values = np.where(np.isfinite(values), values, np.nan)  # inf is as unusable as a missing value
    has_covariates = np.ones(len(table), dtype=bool)
    for name in covariates:
        has_covariates &= present(table[name]).to_numpy()
    observed = np.isfinite(values)
    if missing_idps == "use":  # a row missing some IDPs still informs the others
        usable = has_covariates & observed.any(axis=1)
    else:
        usable = has_covariates & observed.all(axis=1)
    n_dropped = int((~usable).sum())
    what = "every IDP and covariate" if missing_idps == "drop" else "its covariates and an IDP"
    if usable.sum() < min_rows:
        raise InputError(f"only {int(usable.sum())} of {len(table)} rows have {what} ({n_dropped} have "
                         f"missing or non-finite values); at least {min_rows} are needed to fit "
                         f"a model")
    if n_dropped:
        warnings.warn(f"{n_dropped} of {len(table)} training rows have missing or non-finite "
                      f"{'IDPs or ' if missing_idps == 'drop' else ''}covariates"
                      f"{'' if missing_idps == 'drop' else ' (or no IDP at all)'} and were "
                      f"dropped", stacklevel=3)
    kept = table.loc[usable]
    values, observed = values[usable], observed[usable]
    n_partial = int((~observed.all(axis=1)).sum())
    if n_partial:
        warnings.warn(f"{n_partial} of {len(kept)} training rows miss some IDPs; they train the model "
                      f"on the IDPs they have (missing_idps='use')", stacklevel=3)
    scarce = [name for name, n in zip(idps, observed.sum(axis=0)) if n < min_rows]
    if scarce:
        raise InputError(f"IDP columns with fewer than {min_rows} values in the training rows: "
                         f"{scarce[:10]}; drop them (pass idps=[...] without them)")
    constant = [name for name, col in zip(idps, values.T) if np.nanmax(col) == np.nanmin(col)]
    if constant:
        raise InputError(f"IDP columns are constant in the training rows: {constant}; a normative model "
                         f"needs variation; drop them (pass idps=[...] without them)")
    return kept, values, n_dropped, n_partial
