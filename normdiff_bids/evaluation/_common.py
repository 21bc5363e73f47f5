"""Shared checks and small statistics used by every evaluation metric (IDP selection, age bins, CIs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from normdiff_bids.errors import InputError

#: Columns that describe a row rather than measure the brain; never treated as IDPs when idps=None.
NON_IDP_COLUMNS = frozenset({"participant_id", "session_id", "sub_id", "row", "sample", "age", "sex", "site"})

#: The centiles of the paper's absolute centile error.
ACE_CENTILES = (0.02, 0.25, 0.5, 0.75, 0.98)

#: Central-interval levels of the coverage curve: 0.50..0.95 in steps of 0.05, then 0.99.
COVERAGE_LEVELS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)


def resolve_idps(*tables: pd.DataFrame, idps: Sequence[str] | None = None,
                 names: Sequence[str] = ("table",)) -> list[str]:
    """The IDP columns: ``idps`` when given, else the numeric non-covariate columns of the first table.

    Every table must hold every IDP; a missing column raises :class:`InputError` naming table and column.
    """
    if idps is None:
        first = tables[0]
        idps = [c for c in first.columns
                if c not in NON_IDP_COLUMNS and pd.api.types.is_numeric_dtype(first[c])
                and not pd.api.types.is_bool_dtype(first[c])]
        if not idps:
            raise InputError(f"{names[0]}: no numeric IDP columns found among {list(first.columns)}; "
                             "pass idps=[...] naming the IDP columns")
    idps = list(idps)
    problems = []
    for table, name in zip(tables, list(names) + [f"table {i}" for i in range(len(names), len(tables))]):
        missing = [c for c in idps if c not in table.columns]
        if missing:
            more = " ..." if len(missing) > 10 else ""
            problems.append(f"{name}: missing IDP column(s) {missing[:10]}{more}")
        else:
            bad = [c for c in idps if not pd.api.types.is_numeric_dtype(table[c])]
            if bad:
                problems.append(f"{name}: IDP column(s) {bad[:10]} are not numeric; convert them to float")
    if problems:
        raise InputError(problems, header="the tables do not hold the IDPs to evaluate")
    return idps


def require_columns(table: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{name}: missing column(s) {missing}; the evaluation needs them "
                         f"(present: {list(table.columns)[:12]}{' ...' if table.shape[1] > 12 else ''})")


def idp_values(table: pd.DataFrame, idps: Sequence[str]) -> np.ndarray:
    """IDP block as float64 [N, D] (NaN stays NaN)."""
    return table.loc[:, list(idps)].to_numpy(dtype=np.float64, na_value=np.nan)


def age_bin(age, bin_width: float = 1.0) -> np.ndarray:
    """Left edge of the age bin of each value: floor(age / width) * width (1-year bins by default)."""
    if not bin_width > 0:
        raise ValueError(f"bin_width must be positive, got {bin_width!r}")
    age = np.asarray(age, dtype=np.float64)
    return np.floor(age / bin_width) * bin_width


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (well behaved near 0 and 1, unlike the Wald one)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    z = stats.norm.ppf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1); NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    out[ok] = result
    return out


def fisher_combined(p_values) -> float:
    """Fisher's combined p: chi2 with 2k degrees of freedom of -2 sum log p."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[~np.isnan(p)]
    if p.size == 0:
        return float("nan")
    return float(stats.chi2.sf(-2.0 * np.log(np.clip(p, 1e-300, 1.0)).sum(), 2 * p.size))


def stouffer_combined(p_values) -> float:
    """Stouffer's combined p (unweighted): Z = sum Phi^-1(1 - p) / sqrt(k)."""
    p = np.asarray(p_values, dtype=np.float64)
    p = p[~np.isnan(p)]
    if p.size == 0:
        return float("nan")
    z = stats.norm.isf(np.clip(p, 1e-300, 1 - 1e-16))
    return float(stats.norm.sf(z.sum() / np.sqrt(p.size)))


def ks_uniform_distance(u: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``u`` (NaN dropped) and Uniform(0, 1)."""
    u = np.sort(np.asarray(u, dtype=np.float64)[~np.isnan(u)])
    n = u.size
    if n == 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))
