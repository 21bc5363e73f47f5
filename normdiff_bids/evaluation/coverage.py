"""Empirical coverage of central centile intervals (|ECP - 0.95| and the coverage curve)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import COVERAGE_LEVELS, idp_values, resolve_idps


def empirical_coverage(centiles: pd.DataFrame, idps: Sequence[str] | None = None,
                       levels: Sequence[float] = COVERAGE_LEVELS, nominal: float = 0.95) -> dict:
    """Fraction of held-out values inside the model's central interval, per IDP and level.

    A value is inside the central interval of level L when its centile u (the model's CDF at the
    value, at the row's own covariates) lies in [(1 - L) / 2, (1 + L) / 2]; this is the same event as
    the value lying between the model's (1 - L) / 2 and (1 + L) / 2 quantiles.

    Parameters
    ----------
    centiles : DataFrame of centiles in [0, 1], one row per held-out row (e.g. ``model.predict_centiles``);
        other columns (covariates) are ignored when ``idps`` names the IDP columns.
    levels : interval levels of the curve (default 0.50..0.95 by 0.05 and 0.99).
    nominal : the headline level.

    Returns
    -------
    dict with ``coverage`` (mean ECP over IDPs at ``nominal``), ``abs_error`` (mean over IDPs of
    |ECP - nominal|), ``max_abs_error``, ``n`` (rows), ``per_idp`` (DataFrame: ``coverage``,
    ``abs_error``, ``n``), ``curve`` (DataFrame [IDPs, levels] of ECP) and ``curve_mean`` (Series over
    levels: mean ECP across IDPs).
    """
    idps = resolve_idps(centiles, idps=idps, names=("centiles",))
    levels = sorted({float(v) for v in levels} | {float(nominal)})
    if any(not 0 < v < 1 for v in levels):
        raise InputError(f"coverage levels must lie strictly between 0 and 1, got {levels}")
    u = idp_values(centiles, idps)
    if np.any((u < 0) | (u > 1)):
        raise InputError("centiles must lie in [0, 1]; pass model centiles, not raw IDP values or z-scores")
    observed = ~np.isnan(u)
    n = observed.sum(axis=0)
    curve = {}
    for level in levels:
        lo, hi = (1 - level) / 2, (1 + level) / 2
        with np.errstate(invalid="ignore"):
            inside = ((u >= lo) & (u <= hi)).sum(axis=0)
        curve[level] = np.where(n > 0, inside / np.maximum(n, 1), np.nan)
    curve_df = pd.DataFrame(curve, index=pd.Index(idps, name="idp"))
    curve_df.columns.name = "level"
    at_nominal = curve_df[float(nominal)]
    per_idp = pd.DataFrame({"coverage": at_nominal, "abs_error": (at_nominal - nominal).abs(), "n": n})
    return {
        "coverage": float(at_nominal.mean()),
        "abs_error": float(per_idp["abs_error"].mean()),
        "max_abs_error": float(per_idp["abs_error"].max()),
        "n": int(observed.any(axis=1).sum()),
        "nominal": float(nominal),
        "per_idp": per_idp,
        "curve": curve_df,
        "curve_mean": curve_df.mean(axis=0),
    }
