"""Probability integral transform (PIT): held-out centiles are Uniform(0, 1) under a calibrated model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import idp_values, ks_uniform_distance, resolve_idps


def pit_values(model, table: pd.DataFrame) -> pd.DataFrame:
    """PIT values: the model's centile of each held-out value at its own covariates (``predict_centiles``)."""
    return model.predict_centiles(table)


def pit_summary(centiles: pd.DataFrame, idps: Sequence[str] | None = None, n_bins: int = 20) -> dict:
    """Uniformity of PIT values: 20-bin histograms and the KS distance to Uniform(0, 1), per IDP and pooled.

    Returns
    -------
    dict with ``ks`` (mean per-IDP KS distance), ``ks_max``, ``ks_pooled`` (all IDPs pooled), ``n``,
    ``per_idp`` (DataFrame: ``ks``, ``p_value`` (one-sample KS test), ``n``), ``histogram`` (DataFrame
    [IDPs, bins] of densities, 1.0 everywhere for a flat PIT), ``histogram_pooled`` (array) and
    ``bin_edges``.
    """
    idps = resolve_idps(centiles, idps=idps, names=("centiles",))
    if n_bins < 2:
        raise InputError(f"n_bins must be at least 2, got {n_bins}")
    u = idp_values(centiles, idps)
    if np.any((u < 0) | (u > 1)):
        raise InputError("PIT values must lie in [0, 1]; pass model centiles")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows, hist = {}, {}
    for j, name in enumerate(idps):
        col = u[:, j][~np.isnan(u[:, j])]
        if col.size:
            p_value = float(stats.kstest(col, "uniform").pvalue)
            counts = np.histogram(col, bins=edges)[0]
            hist[name] = counts / col.size * n_bins
        else:
            p_value = float("nan")
            hist[name] = np.full(n_bins, np.nan)
        rows[name] = {"ks": ks_uniform_distance(col), "p_value": p_value, "n": int(col.size)}
    per_idp = pd.DataFrame.from_dict(rows, orient="index")
    per_idp.index.name = "idp"
    histogram = pd.DataFrame.from_dict(hist, orient="index", columns=[f"{a:.2f}-{b:.2f}"
                                                                      for a, b in zip(edges[:-1], edges[1:])])
    pooled = u[~np.isnan(u)]
    pooled_hist = (np.histogram(pooled, bins=edges)[0] / max(pooled.size, 1) * n_bins)
    return {
        "ks": float(per_idp["ks"].mean()),
        "ks_max": float(per_idp["ks"].max()),
        "ks_pooled": ks_uniform_distance(pooled),
        "n": int((~np.isnan(u)).any(axis=1).sum()),
        "per_idp": per_idp,
        "histogram": histogram,
        "histogram_pooled": pooled_hist,
        "bin_edges": edges,
    }
