"""Distributional fidelity per age bin: two-sample Kolmogorov-Smirnov with permutation p-values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import (
    age_bin,
    benjamini_hochberg,
    fisher_combined,
    idp_values,
    require_columns,
    resolve_idps,
    stouffer_combined,
)

#: IDPs processed together in one permutation block; bounds memory at B * n * chunk int64 values.
_CHUNK = 8


def _ks_block(x: np.ndarray, y: np.ndarray, n_permutations: int, rng: np.random.Generator):
    """Two-sample KS statistic and permutation p-value for each column of x [n1, D] against y [n2, D].

    No NaN allowed. All columns share one set of label permutations (valid: each column's test is a
    permutation test on its own), which lets the work run as array operations.
    """
    n1, n2 = x.shape[0], y.shape[0]
    n = n1 + n2
    pooled = np.concatenate([x, y], axis=0)
    order = np.argsort(pooled, axis=0, kind="stable")
    sorted_values = np.take_along_axis(pooled, order, axis=0)
    # The ECDF difference is only evaluated where the pooled value changes (ties move together).
    last_of_tie = np.ones_like(sorted_values, dtype=bool)
    last_of_tie[:-1] = sorted_values[:-1] != sorted_values[1:]
    k = np.arange(1, n + 1)
    base = np.zeros(n, dtype=np.int64)
    base[:n1] = 1
    perms = rng.permuted(np.broadcast_to(base, (n_permutations, n)), axis=1)

    def statistic(labels_sorted, mask):
        # |F1 - F2| * n1 * n2 = |c1 * n2 - (k - c1) * n1| = |c1 * n - k * n1|, integer arithmetic.
        c1 = np.cumsum(labels_sorted, axis=-2)
        diff = np.abs(c1 * n - k[:, None] * n1)
        return np.where(mask, diff, 0).max(axis=-2) / (n1 * n2)

    observed = statistic(base[order], last_of_tie)
    exceed = np.zeros(x.shape[1], dtype=np.int64)
    for start in range(0, x.shape[1], _CHUNK):
        cols = slice(start, start + _CHUNK)
        labels = perms[:, order[:, cols]]                     # [B, n, c]
        null = statistic(labels, last_of_tie[None, :, cols])   # [B, c]
        exceed[cols] = np.sum(null >= observed[cols] - 1e-12, axis=0)
    p_value = (1 + exceed) / (n_permutations + 1)
    return observed, p_value


def ks_permutation_test(x, y, n_permutations: int = 500, seed: int = 0) -> tuple[float, float]:
    """Two-sample KS statistic of two 1-D samples and its permutation p-value ((1 + #exceed) / (B + 1))."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if x.size == 0 or y.size == 0:
        raise InputError("both samples need at least one non-missing value for a KS test")
    stat, p = _ks_block(x[:, None], y[:, None], n_permutations, np.random.default_rng(seed))
    return float(stat[0]), float(p[0])


def ks_by_age_bin(real: pd.DataFrame, generated: pd.DataFrame, idps: Sequence[str] | None = None,
                  bin_width: float = 1.0, age: str = "age", n_permutations: int = 500,
                  min_count: int = 10, max_generated: int | None = 500, alpha: float = 0.05,
                  seed: int = 0) -> dict:
    """Per IDP and age bin, two-sample KS between real and generated values with permutation p-values.

    A bin is tested for an IDP when it holds at least ``min_count`` real and generated values. Generated
    values in a bin are subsampled to at most ``max_generated`` (seeded by ``seed``) to bound the cost;
    the test's power is set by the real sample, which is never subsampled. p-values are adjusted with
    Benjamini-Hochberg within each IDP (across its bins) and combined across bins with Fisher's and
    Stouffer's methods.

    Returns
    -------
    dict with ``mean_stat``, ``max_stat``, ``n_tests``, ``frac_reject`` (fraction of tests with BH
    q < alpha), ``frac_idps_fisher_reject`` (fraction of IDPs whose Fisher p < alpha), ``per_idp``
    (DataFrame: ``n_bins``, ``mean_stat``, ``max_stat``, ``fisher_p``, ``stouffer_p``, ``n_reject``) and
    ``per_bin`` (long DataFrame: ``idp``, ``bin``, ``n_real``, ``n_generated``, ``stat``, ``p_value``,
    ``q_value``, ``reject``).
    """
    idps = resolve_idps(real, generated, idps=idps, names=("real", "generated"))
    require_columns(real, [age], "real")
    require_columns(generated, [age], "generated")
    if n_permutations < 1:
        raise InputError(f"n_permutations must be at least 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    real_bins = age_bin(real[age].to_numpy(dtype=np.float64, na_value=np.nan), bin_width)
    gen_bins = age_bin(generated[age].to_numpy(dtype=np.float64, na_value=np.nan), bin_width)
    real_values = idp_values(real, idps)
    gen_values = idp_values(generated, idps)

    records = []
    for b in np.intersect1d(real_bins[~np.isnan(real_bins)], gen_bins[~np.isnan(gen_bins)]):
        r = real_values[real_bins == b]
        g = gen_values[gen_bins == b]
        if r.shape[0] < min_count or g.shape[0] < min_count:
            continue
        if max_generated is not None and g.shape[0] > max_generated:
            g = g[rng.choice(g.shape[0], size=max_generated, replace=False)]
        complete = ~(np.isnan(r).any(axis=0) | np.isnan(g).any(axis=0))
        stat = np.full(len(idps), np.nan)
        p = np.full(len(idps), np.nan)
        if complete.any():
            stat[complete], p[complete] = _ks_block(r[:, complete], g[:, complete], n_permutations, rng)
        for j in np.flatnonzero(~complete):
            rj, gj = r[:, j][~np.isnan(r[:, j])], g[:, j][~np.isnan(g[:, j])]
            if rj.size >= min_count and gj.size >= min_count:
                s, pv = _ks_block(rj[:, None], gj[:, None], n_permutations, rng)
                stat[j], p[j] = s[0], pv[0]
        n_real = np.sum(~np.isnan(r), axis=0)
        n_gen = np.sum(~np.isnan(g), axis=0)
        for j, name in enumerate(idps):
            if not np.isnan(p[j]):
                records.append((name, float(b), int(n_real[j]), int(n_gen[j]), float(stat[j]), float(p[j])))
    per_bin = pd.DataFrame.from_records(
        records, columns=["idp", "bin", "n_real", "n_generated", "stat", "p_value"])
    per_bin["q_value"] = np.nan
    rows = {}
    for name in idps:
        mask = per_bin["idp"] == name
        pv = per_bin.loc[mask, "p_value"].to_numpy()
        per_bin.loc[mask, "q_value"] = benjamini_hochberg(pv)
        stats_ = per_bin.loc[mask, "stat"]
        rows[name] = {
            "n_bins": int(mask.sum()),
            "mean_stat": float(stats_.mean()) if mask.any() else np.nan,
            "max_stat": float(stats_.max()) if mask.any() else np.nan,
            "fisher_p": fisher_combined(pv),
            "stouffer_p": stouffer_combined(pv),
            "n_reject": int((per_bin.loc[mask, "q_value"] < alpha).sum()),
        }
    per_bin["reject"] = per_bin["q_value"] < alpha
    per_idp = pd.DataFrame.from_dict(rows, orient="index")
    per_idp.index.name = "idp"
    tested = per_idp[per_idp["n_bins"] > 0]
    return {
        "mean_stat": float(per_bin["stat"].mean()) if len(per_bin) else float("nan"),
        "max_stat": float(per_bin["stat"].max()) if len(per_bin) else float("nan"),
        "n_tests": len(per_bin),
        "frac_reject": float(per_bin["reject"].mean()) if len(per_bin) else float("nan"),
        "frac_idps_fisher_reject": (float((tested["fisher_p"] < alpha).mean()) if len(tested)
                                    else float("nan")),
        "alpha": alpha,
        "n_permutations": n_permutations,
        "per_idp": per_idp,
        "per_bin": per_bin,
    }
