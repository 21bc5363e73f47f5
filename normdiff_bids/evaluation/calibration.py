"""Centile calibration: the paper's absolute centile error (ACE) and, with known truth, per-subject error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation._common import (
    ACE_CENTILES,
    age_bin,
    idp_values,
    require_columns,
    resolve_idps,
)


def _centile_label(q: float) -> str:
    return f"q={q:g}"


def binomial_noise_floor(n: np.ndarray, q: float) -> np.ndarray:
    """E|K/n - q| for K ~ Binomial(n, q): the ACE a perfect model still gets in a bin of n real values."""
    n = np.asarray(n, dtype=np.int64)
    out = np.full(n.shape, np.nan)
    for value in np.unique(n[n > 0]):
        k = np.arange(value + 1)
        out[n == value] = float(np.sum(stats.binom.pmf(k, value, q) * np.abs(k / value - q)))
    return out


def absolute_centile_error(real: pd.DataFrame, generated: pd.DataFrame, idps: Sequence[str] | None = None,
                           centiles: Sequence[float] = ACE_CENTILES, bin_width: float = 1.0,
                           age: str = "age", min_count: int = 1) -> dict:
    """Absolute centile error of generated samples against real held-out data, in age bins (the paper's ACE).

    For each age bin b (``bin_width`` years, left-closed) and centile q: g = q-quantile of the generated
    values in b, p = fraction of real values in b that are <= g; ACE_q = mean over bins of |p - q|.
    The per-IDP ACE is the mean over q; the scalar ACE is the mean over IDPs.

    Only bins holding at least ``min_count`` real values (per IDP, NaN ignored) and at least one generated
    value count. Because a bin with n real values gives |p - q| > 0 even for a perfect model, the expected
    ACE of a perfect model on the same bins (``noise_floor``, exact binomial expectation) is returned too:
    a model is as good as the data can tell when ``ace`` is close to ``noise_floor``.

    Parameters
    ----------
    real, generated : DataFrames with an ``age`` column and the IDP columns. ``generated`` is typically
        the model's samples at the real rows' covariates, one row per sample.

    Returns
    -------
    dict with ``ace`` (float), ``noise_floor`` (float), ``n_bins`` (int), ``per_idp`` (DataFrame indexed
    by IDP: one column per centile, ``ace``, ``noise_floor``, ``n_bins``) and ``per_bin`` (long DataFrame:
    ``bin``, ``idp``, ``n_real``, ``n_generated``, one column per centile with |p - q|).
    """
    idps = resolve_idps(real, generated, idps=idps, names=("real", "generated"))
    require_columns(real, [age], "real")
    require_columns(generated, [age], "generated")
    q = np.asarray(centiles, dtype=np.float64)
    if q.ndim != 1 or q.size == 0 or np.any((q <= 0) | (q >= 1)):
        raise InputError(f"centiles must be values strictly between 0 and 1, got {list(centiles)}")
    if min_count < 1:
        raise InputError(f"min_count must be at least 1, got {min_count}")

    real_bins = age_bin(real[age].to_numpy(dtype=np.float64, na_value=np.nan), bin_width)
    gen_bins = age_bin(generated[age].to_numpy(dtype=np.float64, na_value=np.nan), bin_width)
    real_values = idp_values(real, idps)
    gen_values = idp_values(generated, idps)
    labels = [_centile_label(v) for v in q]

    bins = np.intersect1d(real_bins[~np.isnan(real_bins)], gen_bins[~np.isnan(gen_bins)])
    records = []
    for b in bins:
        r = real_values[real_bins == b]
        g = gen_values[gen_bins == b]
        n_real = np.sum(~np.isnan(r), axis=0)
        n_gen = np.sum(~np.isnan(g), axis=0)
        quantile = np.nanquantile if np.isnan(g).any() else np.quantile
        with np.errstate(invalid="ignore"):
            gq = quantile(g, q, axis=0)                                  # [Q, D]
            below = np.sum(r[None, :, :] <= gq[:, None, :], axis=1)       # [Q, D]; NaN compares False
            p = below / np.where(n_real > 0, n_real, 1)
        err = np.abs(p - q[:, None])
        valid = (n_real >= min_count) & (n_gen > 0)
        err[:, ~valid] = np.nan
        for j, name in enumerate(idps):
            records.append((float(b), name, int(n_real[j]), int(n_gen[j]), *err[:, j]))
    per_bin = pd.DataFrame.from_records(records, columns=["bin", "idp", "n_real", "n_generated", *labels])

    rows = {}
    for name in idps:
        block = per_bin[per_bin["idp"] == name]
        used = block.dropna(subset=labels)
        floor = np.mean([binomial_noise_floor(used["n_real"].to_numpy(), v).mean() if len(used) else np.nan
                         for v in q])
        row = {lab: float(used[lab].mean()) if len(used) else np.nan for lab in labels}
        row["ace"] = float(np.mean([row[lab] for lab in labels]))
        row["noise_floor"] = float(floor)
        row["n_bins"] = len(used)
        rows[name] = row
    per_idp = pd.DataFrame.from_dict(rows, orient="index")
    per_idp.index.name = "idp"
    return {
        "ace": float(per_idp["ace"].mean()) if len(per_idp) else float("nan"),
        "noise_floor": float(per_idp["noise_floor"].mean()) if len(per_idp) else float("nan"),
        "n_bins": int(per_idp["n_bins"].max()) if len(per_idp) else 0,
        "per_idp": per_idp,
        "per_bin": per_bin,
    }


def centile_error(predicted: pd.DataFrame, truth: pd.DataFrame, idps: Sequence[str] | None = None) -> dict:
    """Per-subject |predicted centile - true centile| (synthetic data, where the true CDF is known).

    Rows are matched by index; both tables hold one column per IDP with centiles in [0, 1].
    Returns ``mean_abs_error`` (float), ``per_idp`` (DataFrame: mean, median, p95, max) and ``errors``
    (DataFrame [rows, IDPs]).
    """
    idps = resolve_idps(truth, predicted, idps=idps, names=("truth", "predicted"))
    if not truth.index.equals(predicted.index):
        missing = truth.index.difference(predicted.index)
        if len(missing):
            raise InputError(f"predicted centiles lack {len(missing)} row(s) of the truth table "
                             f"(first: {list(missing[:5])}); compute both on the same table")
        predicted = predicted.loc[truth.index]
    errors = (predicted[idps].astype(float) - truth[idps].astype(float)).abs()
    per_idp = pd.DataFrame({
        "mean": errors.mean(),
        "median": errors.median(),
        "p95": errors.quantile(0.95),
        "max": errors.max(),
    })
    per_idp.index.name = "idp"
    return {"mean_abs_error": float(np.nanmean(errors.to_numpy())), "per_idp": per_idp, "errors": errors}


def per_subject_centile_error(model, table: pd.DataFrame, truth: pd.DataFrame,
                              idps: Sequence[str] | None = None) -> dict:
    """:func:`centile_error` of ``model.predict_centiles(table)`` against the true centiles ``truth``."""
    return centile_error(model.predict_centiles(table), truth, idps=idps)
