"""What one covariate point's draws give the scores that look at several IDPs at once: the joint
deviation over any subset of IDPs (rows with missing IDPs) and conditional centiles (an IDP given others).

Both work on the draws' normal scores (each IDP's rank among the point's draws, the same rule a
subject's value gets), so they are invariant to each IDP's marginal shape, and both are calibrated the
same way: the subject's statistic is ranked among the same statistic of draws that were not used to
estimate it, so a subject drawn from the model is exchangeable with them.

**Joint deviation over a subset.** The marginal of a joint model over a subset of IDPs is the subset of
its draws' coordinates, so a row with missing IDPs is scored by :mod:`~normdiff_bids.scoring.joint`'s
statistic on its present IDPs, against the draws restricted to the same IDPs (computed once per point and
subset).

**Conditional centile of IDP j given the set G.** In normal scores, IDP j is regressed on the IDPs of G
across the point's S draws (least squares with an intercept); the subject's conditional centile is the
mid-rank of its own residual ``u_j - [1, u_G] beta`` among the draws' leave-one-out residuals
``e_i / (1 - h_ii)`` (``h`` the hat matrix), with the tail rule beyond them. The regression carries the
dependence the model learnt at the subject's covariates, including how the spread given G shrinks;
ranking residuals instead of assuming them Gaussian keeps a skewed or heavy-tailed conditional
calibrated. Leave-one-out residuals are what makes a subject (whose residual is out of sample)
exchangeable with the draws even when G holds most of the IDPs: in-sample residuals would be too small
by about ``sqrt((S - p - 1) / S)``. It is exact when the dependence is a Gaussian copula (conditional
means linear in normal scores) and a linear approximation otherwise.
"""

from __future__ import annotations

import numpy as np

from normdiff_bids.scoring.centiles import empirical_centiles
from normdiff_bids.scoring.joint import ledoit_wolf_covariance, mahalanobis, normal_scores_loo

__all__ = ["MIN_SPARE_DRAWS", "PointDraws", "conditional_centiles", "joint_subset_scores"]

#: Draws needed beyond the number of given IDPs (plus the intercept) for the conditional regression.
MIN_SPARE_DRAWS = 20


class PointDraws:
    """One covariate point's draws ``[S, D]`` (model space) and what scoring against them needs,
    computed once per point (and per IDP subset or given set) and shared by the rows at the point.
    ``shrinkage``: the joint covariance's shrinkage floor
    (:func:`~normdiff_bids.scoring.joint.model_shrinkage`)."""

    def __init__(self, samples: np.ndarray, shrinkage: float = 0.0):
        self.z = normal_scores_loo(np.asarray(samples, dtype=np.float64)[None])[0]  # [S, D]
        self.shrinkage = float(shrinkage)
        self._joint: dict = {}
        self._conditional: dict = {}

    def joint(self, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(chol [k, k], ref [S // 2])`` of the joint deviation over the IDPs ``present`` (a boolean
        mask; ``None``: all): the Cholesky factor of the (floored) Ledoit-Wolf covariance of the even-position
        draws' normal scores and the statistic of the odd-position draws."""
        key = None if present is None or bool(np.all(present)) else np.asarray(present, bool).tobytes()
        if key not in self._joint:
            z = (self.z if key is None else self.z[:, np.asarray(present, bool)])[None]
            chol = np.linalg.cholesky(ledoit_wolf_covariance(z[:, 0::2], self.shrinkage))
            self._joint[key] = (chol[0], mahalanobis(z[:, 1::2], chol)[0])
        return self._joint[key]

    def conditional(self, given: tuple[int, ...], targets: tuple[int, ...]):
        """``(beta [p + 1, T], loo [S, T])``: the regression of the ``targets`` IDPs' normal scores on
        the ``given`` ones (intercept first) and the draws' leave-one-out residuals."""
        key = (given, targets)
        if key not in self._conditional:
            n = len(self.z)
            x = np.column_stack([np.ones(n), self.z[:, list(given)]])
            y = self.z[:, list(targets)]
            q, r = np.linalg.qr(x)
            beta = np.linalg.solve(r, q.T @ y)
            leverage = np.sum(q ** 2, axis=1)
            loo = (y - x @ beta) / (1.0 - leverage)[:, None]
            self._conditional[key] = (beta, loo)
        return self._conditional[key]


def joint_subset_scores(z_row: np.ndarray, draws: PointDraws) -> tuple[float, float, int]:
    """Joint statistic, its centile among the point's draws and the number of IDPs it used, over the
    finite entries of one row's normal scores ``z_row [D]`` (NaN, NaN, k when fewer than 2 are finite)."""
    present = np.isfinite(z_row)
    k = int(present.sum())
    if k < 2:
        return np.nan, np.nan, k
    chol, ref = draws.joint(present)
    stat = float(mahalanobis(z_row[present][None, None, :], chol[None])[0, 0])
    centile, _ = empirical_centiles(np.array([[stat]]), ref[None, :, None])
    return stat, float(centile[0, 0]), k


def conditional_centiles(u_rows: np.ndarray, draws: PointDraws, given: tuple[int, ...],
                         targets: tuple[int, ...]) -> np.ndarray:
    """Conditional centiles ``[r, T]`` of the ``targets`` IDPs given the ``given`` ones, for rows
    ``u_rows [r, D]`` (calibrated normal scores) that share the point ``draws``. Rows whose given IDPs
    are not all finite get NaN (a NaN target too)."""
    beta, loo = draws.conditional(given, targets)
    u = np.asarray(u_rows, dtype=np.float64)
    x = np.column_stack([np.ones(len(u)), u[:, list(given)]])
    ok = np.all(np.isfinite(x), axis=1)
    resid = u[:, list(targets)] - np.where(ok[:, None], x, 0.0) @ beta
    out = np.full(resid.shape, np.nan)
    if ok.any():
        c, _ = empirical_centiles(resid[ok], np.broadcast_to(loo, (int(ok.sum()),) + loo.shape))
        out[ok] = c
    return out
