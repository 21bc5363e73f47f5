"""A multivariate deviation score per subject, calibrated against the model's own samples.

Statistic: the Mahalanobis length of the subject's normal-score vector (one z per IDP, from the IDP's own
samples) under a Ledoit-Wolf shrunk covariance of the samples' normal scores. Normal scores make the
statistic invariant to each IDP's marginal shape (skewed or bimodal IDPs count like Gaussian ones), and
the shrinkage keeps the inverse stable when D is close to or above the number of samples. A model learnt
from few people per IDP learns their dependence only roughly, and a Mahalanobis length under a roughly
estimated covariance makes every new person look atypical; ``shrinkage`` (:func:`model_shrinkage`) then
sets a floor on the shrinkage towards the identity, so the statistic leans on the dependence only as
far as the training cohort supports it.

Calibration (split): the samples at the subject's covariates are split in two halves. The first half
estimates the covariance; the statistic of every sample of the second half (its normal scores taken
leave-one-out among all samples) is the reference distribution, and the subject's centile is its
mid-rank among them, with the tail rule of :mod:`normdiff_bids.scoring.centiles` beyond the largest.
A subject drawn from the model's distribution is exchangeable with the second half given the first, so
``joint_centile`` is uniform for in-distribution subjects whatever D, the marginals or the dependence.
``joint_z = Phi^-1(joint_centile)``: large positive values mean an unusual profile.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtri

from normdiff_bids.scoring.centiles import CENTILE_FLOOR, centiles_to_z, empirical_centiles, tail_score

__all__ = ["MAX_MODEL_SHRINKAGE", "joint_deviation", "joint_reference", "joint_scores",
           "insample_shift", "ledoit_wolf_covariance", "mahalanobis", "model_shrinkage",
           "normal_scores_loo"]

#: Element budget per chunk of rows for [rows, S, D] work arrays.
_CHUNK_ELEMENTS = 4_000_000
#: Largest shrinkage floor :func:`model_shrinkage` gives (reached when D is 0.9 of the training rows).
MAX_MODEL_SHRINKAGE = 0.9


def model_shrinkage(n_features: int, n_train: int) -> float:
    """The shrinkage floor of a model that learnt ``n_features`` IDPs from ``n_train`` rows:
    ``min(0.9, D / N)``, which vanishes for large cohorts, is half-way to the identity where D is half
    of N, and near it where there are as many IDPs as people.

    Measured on synthetic cohorts of 20 Zipf-sized sites, 600 held-out people (docs/method.md): at
    N=216, D=100 the held-out joint KS went from 0.20 and 0.15 (two seeds) to 0.05 and 0.08 with a floor
    of 0.5; at N=500, D=100 from 0.061 to 0.056; at N=200, D=20 from 0.057 to 0.035. The power to flag
    people with a tenth of their IDPs 1 SD low, at the held-out controls' own 95th centile, stayed the
    same (0.21 / 0.22 and 0.13 / 0.12). At N=200, D=200 a floor of 0.5 (the earlier cap) left the joint
    KS at 0.169 and 0.166 (two seeds), 0.75 gave 0.108 and 0.104, 0.9 gave 0.081 and 0.038; that power
    fell from 0.175 / 0.142 to 0.128 / 0.093, and the power against a profile that breaks the IDPs'
    correlation was at the nominal 0.05 with any floor there.
    """
    return float(min(MAX_MODEL_SHRINKAGE, n_features / max(int(n_train), 1)))


def _average_ranks(srt: np.ndarray) -> np.ndarray:
    """1-based ranks of values sorted along the last axis, ties given their average rank (as
    ``scipy.stats.rankdata(method="average")``, whose module is slow to import)."""
    n = srt.shape[-1]
    position = np.broadcast_to(np.arange(n), srt.shape)
    starts = np.ones(srt.shape, dtype=bool)
    starts[..., 1:] = srt[..., 1:] != srt[..., :-1]
    ends = np.ones(srt.shape, dtype=bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, position, n - 1), axis=-1), axis=-1), axis=-1)
    return (first + last) / 2 + 1


def normal_scores_loo(samples: np.ndarray) -> np.ndarray:
    """Normal score of every sample among the other ``S - 1`` samples of its row: ``[R, S, D]``.

    The same rule as a subject's value gets from :func:`empirical_centiles`: a sample of rank ``i``
    (1-based; ties get their average rank) has ``i - 1`` others below it, so its mid-rank centile is
    ``(i - 1 + 0.5) / S``; the smallest and largest samples lie beyond the range of the others and are
    scored by the tail rule against them. This keeps a subject exchangeable with the samples.
    """
    n = samples.shape[1]
    x = np.ascontiguousarray(np.swapaxes(samples, 1, 2))  # [R, D, S]: sorting along a contiguous axis
    order = np.argsort(x, axis=-1)
    srt = np.take_along_axis(x, order, axis=-1)
    if np.any(srt[..., 1:] == srt[..., :-1]):
        zs = ndtri((_average_ranks(srt) - 0.5) / n)
    else:
        # ranks are a permutation of 1..S: the scores are one table, scattered back below
        zs = np.broadcast_to(ndtri((np.arange(1, n + 1) - 0.5) / n), x.shape).copy()
    srt_rsd = np.swapaxes(srt, 1, 2)  # [R, S, D] view for the tail rule
    z_min = tail_score(srt[..., 0], srt_rsd[:, 1:], -1)
    z_max = tail_score(srt[..., -1], srt_rsd[:, :-1], 1)
    zs[..., 0] = np.where(srt[..., 0] < srt[..., 1], z_min, zs[..., 0])
    zs[..., -1] = np.where(srt[..., -1] > srt[..., -2], z_max, zs[..., -1])
    np.clip(zs, ndtri(CENTILE_FLOOR), -ndtri(CENTILE_FLOOR), out=zs)
    z = np.empty_like(zs)
    np.put_along_axis(z, order, zs, axis=-1)
    return np.swapaxes(z, 1, 2)


def ledoit_wolf_covariance(x: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Ledoit-Wolf (2004) shrinkage towards a scaled identity, batched: ``x [R, n, D] -> [R, D, D]``.

    Same estimator as ``sklearn.covariance.LedoitWolf`` (centred data, biased covariance), vectorised
    over rows; ``floor``: the least shrinkage intensity used (0: Ledoit-Wolf's own).
    """
    cov, mu, shrink = _ledoit_wolf_parts(x, floor)
    out = (1 - shrink)[:, None, None] * cov
    idx = np.arange(x.shape[2])
    out[:, idx, idx] += (shrink * mu)[:, None]
    return out


def _ledoit_wolf_parts(x: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(biased sample covariance [R, D, D], mean variance mu [R], shrinkage intensity [R])`` of
    :func:`ledoit_wolf_covariance`."""
    n, d = x.shape[1], x.shape[2]
    xc = x - x.mean(axis=1, keepdims=True)
    cov = np.einsum("rni,rnj->rij", xc, xc, optimize=True) / n
    mu = np.trace(cov, axis1=1, axis2=2) / d
    frob2 = np.sum(cov ** 2, axis=(1, 2))
    delta = frob2 - 2 * mu * np.trace(cov, axis1=1, axis2=2) + d * mu ** 2  # ||cov - mu I||_F^2
    sq_norms = np.sum(xc ** 2, axis=2)
    beta_bar = (np.sum(sq_norms ** 2, axis=1) / n - frob2) / n
    beta = np.minimum(beta_bar, delta)
    shrink = np.maximum(np.where(delta > 0, beta / np.where(delta > 0, delta, 1), 0.0), floor)
    return cov, mu, shrink


def insample_shift(rows: np.ndarray, shrinkage: float = 0.0) -> float:
    """How much less typical new rows look jointly than ``rows [n, D]`` themselves, under a covariance
    learnt from ``rows``: the mean probit of each row's leave-one-out squared Mahalanobis length, as a
    centile among the rows' in-sample lengths (both under :func:`ledoit_wolf_covariance` with the
    shrinkage floor ``shrinkage``, its intensity held at the full sample's).

    A network that learns the dependence of its training rows makes those rows look more typical than
    new people by about this much: a Mahalanobis length under a covariance fitted to the very row it
    measures is biased low by about ``D (D + 2) / n`` (of a spread ``sqrt(2 D)``). Leaving row ``i`` out
    changes the shrunk covariance by a rank-one term, so its length follows in closed form
    (Sherman-Morrison): with ``A = (1 - s) n / (n - 1) C + s mu I`` and ``b = (1 - s) / (n - 1)``,
    ``q = r' A^-1 r`` and the leave-one-out length is ``q + b q^2 / (1 - b q)``.
    """
    rows = np.asarray(rows, dtype=np.float64)
    n, d = rows.shape
    if n < 3 or d < 1:
        return 0.0
    cov, mu, shrink = (a[0] for a in _ledoit_wolf_parts(rows[None], float(shrinkage)))
    centred = rows - rows.mean(axis=0)
    eye = np.eye(d)
    full = (1 - shrink) * cov + shrink * mu * eye
    inside = np.einsum("ni,ij,nj->n", centred, np.linalg.pinv(full, hermitian=True), centred)
    b = (1 - shrink) / (n - 1)
    q = np.einsum("ni,ij,nj->n", centred,
                  np.linalg.pinv((1 - shrink) * n / (n - 1) * cov + shrink * mu * eye, hermitian=True),
                  centred)
    left_out = q + b * q ** 2 / np.maximum(1 - b * q, 1e-12)
    ranks = (np.searchsorted(np.sort(inside), left_out) + 0.5) / (n + 1)
    return float(ndtri(ranks).mean())


def mahalanobis(z: np.ndarray, chol: np.ndarray) -> np.ndarray:
    """``sqrt(z^T cov^-1 z)`` for ``z [R, m, D]`` given ``chol [R, D, D]``, the Cholesky factor of each
    row's covariance -> ``[R, m]``. Triangular solves, one row at a time (R is small where it is hot)."""
    from scipy.linalg import solve_triangular

    out = np.empty(z.shape[:2])
    for r in range(z.shape[0]):
        out[r] = np.sqrt(np.sum(solve_triangular(chol[r], z[r].T, lower=True) ** 2, axis=0))
    return out


def joint_reference(samples: np.ndarray, shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """What scoring against ``samples [R, S, D]`` needs, computed once per row of samples.

    Returns ``chol [R, D, D]``, the Cholesky factor of the Ledoit-Wolf covariance (shrinkage at least
    ``shrinkage``) of the normal scores of the even-position samples, and ``ref [R, S // 2]``, the
    statistic of the odd-position samples: a subject's centile is taken among those, so it is
    calibrated against the model's own draws.
    """
    z = normal_scores_loo(samples)
    chol = np.linalg.cholesky(ledoit_wolf_covariance(z[:, 0::2], shrinkage))
    return chol, mahalanobis(z[:, 1::2], chol)


def joint_scores(z_values: np.ndarray, chol: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint statistic and its centile of each row's normal scores ``z_values [R, D]`` against that row's
    :func:`joint_reference` (``chol [R, D, D]``, ``ref [R, M]``): two ``[R]`` arrays, NaN where a
    score is not finite."""
    ok = np.all(np.isfinite(z_values), axis=1)
    stat = np.full(z_values.shape[0], np.nan)
    if ok.any():
        stat[ok] = mahalanobis(z_values[ok][:, None, :], chol[ok])[:, 0]
    c, _ = empirical_centiles(np.where(ok, stat, 0.0)[:, None], ref[:, :, None])
    return stat, np.where(ok, c[:, 0], np.nan)


def joint_deviation(values, samples, index=None, shrinkage: float = 0.0) -> pd.DataFrame:
    """Joint deviation of each row's ``values [R, D]`` from its ``samples [R, S, D]`` (``shrinkage``: the
    covariance's shrinkage floor, see :func:`model_shrinkage`).

    Returns a DataFrame with ``joint_stat`` (Mahalanobis length of the normal-score vector),
    ``joint_centile`` (strictly in (0, 1), uniform for in-distribution rows) and ``joint_z``, indexed
    by ``index`` (default ``0..R-1``). Rows with any NaN value get NaN. Needs ``S >= 20``.
    The split is deterministic (even/odd positions), so the result depends only on the row's data.
    """
    values = np.asarray(values, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3 or values.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(f"need values [R, D] and samples [R, S, D], got {values.shape} and {samples.shape}")
    n_rows, n, d = samples.shape
    if n < 20:
        raise ValueError(f"joint_deviation needs at least 20 samples per row, got {n}")
    stat = np.full(n_rows, np.nan)
    centile = np.full(n_rows, np.nan)
    chunk = max(1, _CHUNK_ELEMENTS // (n * d))
    for lo in range(0, n_rows, chunk):
        sl = slice(lo, lo + chunk)
        smp = samples[sl]
        z_value = centiles_to_z(empirical_centiles(values[sl], smp)[0])
        stat[sl], centile[sl] = joint_scores(z_value, *joint_reference(smp, shrinkage))
    return pd.DataFrame({"joint_stat": stat, "joint_centile": centile, "joint_z": centiles_to_z(centile)},
                        index=index if index is not None else pd.RangeIndex(n_rows))
