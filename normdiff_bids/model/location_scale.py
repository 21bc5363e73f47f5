"""The location-scale stage: per-IDP mean and spread on the covariates, with partially pooled sites.

Each IDP ``j`` is modelled as ``y = m_j(x) + u_j[site] + s_j(x) exp(v_j[site] / 2) r``: a smooth function
of the continuous covariates (cubic B-splines), fixed effects of the other categorical covariates (sex),
and a random effect of the site on the location (``u ~ N(0, tau_j^2)``) and on the log-variance
(``v ~ N(0, omega_j^2)``), as hierarchical normative models (HBR) do. The variance components are
estimated by EM from every site at once, so a site of 3 people borrows strength from the others: its
effects are shrunk toward the population in proportion to how little it says, and a site never seen
gets the population (with its between-site spread when scored under the marginal). The residual ``r``
has mean 0 and variance 1 at every covariate value; its shape and its dependence between IDPs are left
to the diffusion model.

Pure numpy: ``[R, D]`` arrays in, ``[R, D]`` arrays out; the state is exported to plain dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import special

__all__ = ["LocationScaleConfig", "LocationScaleStage", "SITE_UNKNOWN"]

#: Site index that means "not seen in training" (no random effect: the population).
SITE_UNKNOWN = -1
#: E[log chi^2_1] and Var[log chi^2_1]: the log of a squared standard-normal residual has this mean and
#: variance, which makes log r^2 a regression target with a known noise level.
_LOG_CHI2_MEAN = float(special.digamma(0.5) + np.log(2.0))
_LOG_CHI2_VAR = float(np.pi**2 / 2)
#: Bounds of the log residual variance (IDPs are standardised first, so their variance is about 1): an
#: IDP that is often exactly 0 or constant within a site cannot drive the weights to 0 or infinity.
LOGVAR_RANGE = (np.log(1e-6), np.log(1e2))
#: Largest Fisher-scoring step of the log-variance per row (the working response's r^2 / var - 1).
MAX_WORKING_STEP = 20.0
#: Smallest prior variance of a new site's location effect (as a share of the residual variance) and of
#: its log-variance effect, in :meth:`LocationScaleStage.site_effects`.
NEW_SITE_PRIOR = (0.25, 0.09)


@dataclass(frozen=True)
class LocationScaleConfig:
    """Settings of :class:`LocationScaleStage` (saved in the model bundle).

    n_knots, degree : B-spline basis of each continuous covariate (knots at quantiles of the training
        values; linear beyond them).
    ridge : penalty on the spline and fixed-effect coefficients (in units of the standardised IDP).
    n_iter : outer iterations (location given spread, spread given location).
    em_iter : EM iterations of the variance components inside each outer iteration.
    """

    n_knots: int = 5
    degree: int = 3
    ridge: float = 1.0
    n_iter: int = 4
    em_iter: int = 15

    def to_dict(self) -> dict:
        return asdict(self)


class LocationScaleStage:
    """Per-IDP location and scale on the covariates, with partially pooled site effects.

    >>> stage = LocationScaleStage().fit(cont, fixed, site, y)     # [R, c], [R, f] int, [R] int, [R, D]
    >>> r = stage.standardise(cont, fixed, site, y)                  # residuals, ~ mean 0 / SD 1
    >>> y2 = stage.destandardise(cont, fixed, site, r)

    ``cont`` holds the continuous covariates (already standardised), ``fixed`` the integer codes of the
    categorical covariates with fixed effects (e.g. sex), ``site`` the integer site codes (``-1``: a
    site the stage has no effect for).
    """

    def __init__(self, config: LocationScaleConfig | None = None):
        self.config = config or LocationScaleConfig()

    # ------------------------------------------------------------------ design
    def _spline_basis(self, cont: np.ndarray) -> np.ndarray:
        blocks = []
        for c, knots in enumerate(self.knots_):
            blocks.append(_bspline(cont[:, c], knots, self.config.degree))
        return np.concatenate(blocks, axis=1) if blocks else np.empty((len(cont), 0))

    def _fixed_design(self, cont: np.ndarray, fixed: np.ndarray) -> np.ndarray:
        cols = [np.ones((len(cont), 1)), self._spline_basis(cont)]
        for f, n_levels in enumerate(self.fixed_levels_):
            codes = fixed[:, f]
            cols.append((codes[:, None] == np.arange(1, n_levels)[None, :]).astype(np.float64))
        return np.concatenate(cols, axis=1)

    # ------------------------------------------------------------------ fit
    def fit(self, cont: np.ndarray, fixed: np.ndarray, site: np.ndarray, y: np.ndarray,
            n_sites: int | None = None) -> LocationScaleStage:
        """Fit on ``cont [R, c]``, ``fixed [R, f]`` codes, ``site [R]`` codes, ``y [R, D]``; a NaN in ``y``
        is a missing value: that entry has no weight in its IDP's fit (the row still counts for the
        others)."""
        cfg = self.config
        cont = np.asarray(cont, dtype=np.float64).reshape(len(y), -1)
        fixed = np.asarray(fixed, dtype=np.int64).reshape(len(y), -1)
        site = np.asarray(site, dtype=np.int64).reshape(-1)
        y = np.asarray(y, dtype=np.float64)
        observed = np.isfinite(y)
        mask = observed.astype(np.float64)
        y = np.where(observed, y, 0.0)
        n, d = y.shape
        self.n_sites_ = int(n_sites if n_sites is not None else (site.max() + 1 if len(site) else 0))
        inner = max(2, cfg.n_knots)
        self.knots_ = [np.quantile(cont[:, c], np.linspace(0, 1, inner)) for c in range(cont.shape[1])]
        self.fixed_levels_ = [int(max(fixed[:, f].max() + 1, 2)) for f in range(fixed.shape[1])]
        F = self._fixed_design(cont, fixed)
        Z = _site_dummies(site, self.n_sites_)
        self.n_site_rows_ = Z.sum(axis=0).astype(np.int64)
        pen = np.full(F.shape[1], cfg.ridge)
        pen[0] = 0.0

        var = np.ones((n, d))
        w_log = mask / _LOG_CHI2_VAR
        logvar = None
        for _ in range(cfg.n_iter):
            beta, u, tau2, u_var = _mixed_model(F, Z, y, mask / var, pen, cfg.em_iter)
            resid = np.where(observed, y - F @ beta - Z @ u, 0.0)
            if logvar is None:
                # start from the regression of log r^2 (robust to any start), then Fisher scoring of the
                # normal likelihood of the log-variance (a gamma GLM with log link): working response
                # eta + (r^2 / var - 1), whose noise variance is 2 instead of log chi^2's 4.9
                target = np.maximum(np.log(resid**2 + 1e-10) - _LOG_CHI2_MEAN, LOGVAR_RANGE[0])
                weights, scale = w_log, _LOG_CHI2_VAR
            else:
                # capped: a residual of 0 (an IDP with many zeros) or of 50 SD must not throw a step
                target = logvar + np.clip(resid**2 / var - 1.0, -1.0, MAX_WORKING_STEP)
                weights, scale = 0.5 * mask, 2.0
            gamma, v, omega2, _ = _mixed_model(F, Z, target, weights, pen * scale, cfg.em_iter)
            logvar = np.clip(F @ gamma + Z @ v, *LOGVAR_RANGE)
            var = np.exp(logvar)
        # log r^2 is biased for non-normal residuals: put the residual variance at exactly 1
        ratio = np.sum(resid**2 / var * mask, axis=0) / np.maximum(mask.sum(axis=0), 1.0)
        gamma[0] += np.log(ratio)
        self.beta_, self.u_, self.tau2_, self.u_var_ = beta, u, tau2, u_var
        self.gamma_, self.v_, self.omega2_ = gamma, v, omega2
        self.n_features_ = d
        return self

    # ------------------------------------------------------------------ apply
    def location_scale(self, cont, fixed, site, marginal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(location [R, D], scale [R, D])`` at each row's covariates.

        A row whose site code is ``-1`` gets the population (no site effect); with ``marginal=True`` its
        scale also takes in the spread between sites (the distribution over a site drawn at random).
        """
        cont = np.asarray(cont, dtype=np.float64).reshape(len(site), -1)
        fixed = np.asarray(fixed, dtype=np.int64).reshape(len(site), -1)
        site = np.asarray(site, dtype=np.int64).reshape(-1)
        F = self._fixed_design(cont, fixed)
        Z = _site_dummies(site, self.n_sites_)
        loc = F @ self.beta_ + Z @ self.u_
        logvar = np.clip(F @ self.gamma_ + Z @ self.v_, *LOGVAR_RANGE)
        # a site's location is known only up to its posterior variance (large for a site of 3 people)
        var = np.exp(logvar) + Z @ self.u_var_
        if marginal:
            unknown = (site < 0)[:, None]
            var = np.where(unknown, var * np.exp(self.omega2_ / 2) + self.tau2_, var)
        return loc, np.sqrt(var)

    def standardise(self, cont, fixed, site, y, marginal: bool = False) -> np.ndarray:
        loc, scale = self.location_scale(cont, fixed, site, marginal)
        return (np.asarray(y, dtype=np.float64) - loc) / scale

    def destandardise(self, cont, fixed, site, r, marginal: bool = False) -> np.ndarray:
        """Inverse of :meth:`standardise`; ``r`` may be ``[R, D]`` or ``[R, S, D]``."""
        loc, scale = self.location_scale(cont, fixed, site, marginal)
        r = np.asarray(r, dtype=np.float64)
        if r.ndim == 3:
            return loc[:, None, :] + scale[:, None, :] * r
        return loc + scale * r

    # ------------------------------------------------------------------ new sites
    def site_effects(self, cont, fixed, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Empirical-Bayes effects of ONE new site from its rows: location, its posterior variance and
        log-variance, each ``[D]``.

        The population part and the variance components stay as fitted, so this is the empirical-Bayes
        estimate a new site gets from ``len(y)`` controls: a handful moves it little, many move it to the
        site's own mean and spread.
        """
        cont = np.asarray(cont, dtype=np.float64).reshape(len(y), -1)
        fixed = np.asarray(fixed, dtype=np.int64).reshape(len(y), -1)
        F = self._fixed_design(cont, fixed)
        y = np.asarray(y, dtype=np.float64)
        base_var = np.exp(np.clip(F @ self.gamma_, *LOGVAR_RANGE))
        resid = y - F @ self.beta_
        # A new scanner may differ from the training sites more than they differ from each other, so
        # its prior is never narrower than a quarter of the IDP's residual variance (and a log-variance
        # SD of 0.3): 5 controls move it about halfway, 40 nearly all the way.
        tau2 = np.maximum(self.tau2_, NEW_SITE_PRIOR[0] * np.median(base_var, axis=0))
        omega2 = np.maximum(self.omega2_, NEW_SITE_PRIOR[1])
        v = np.zeros(y.shape[1])
        for _ in range(20):
            # posterior mode of (u, v): u given v in closed form, then a Fisher-scoring step in v of the
            # normal likelihood of the log-variance with its N(0, omega2) prior
            w = 1.0 / (base_var * np.exp(v))
            precision = w.sum(axis=0) + 1.0 / tau2
            u = (w * resid).sum(axis=0) / precision
            r2 = (resid - u) ** 2 * w
            step = (0.5 * (r2 - 1.0).sum(axis=0) - v / omega2) / (0.5 * len(y) + 1.0 / omega2)
            v = v + np.clip(step, -1.0, 1.0)
        return u, 1.0 / precision, v

    def with_sites(self, effects: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> LocationScaleStage:
        """A copy that knows ``len(effects)`` more sites (codes ``n_sites_``, ``n_sites_ + 1``, ...), each
        given as :meth:`site_effects` returns it (none: a plain copy); the known sites are untouched, and
        the copy's site arrays are its own."""
        out = LocationScaleStage(self.config)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k != "config"})
        empty = np.empty((0, self.u_.shape[1]))
        u_new, u_var_new, v_new = ((np.stack(part) for part in zip(*effects)) if effects
                                   else (empty, empty, empty))
        out.u_ = np.concatenate([self.u_, u_new])
        out.u_var_ = np.concatenate([self.u_var_, u_var_new])
        out.v_ = np.concatenate([self.v_, v_new])
        out.n_site_rows_ = np.concatenate([self.n_site_rows_, np.zeros(len(effects), dtype=np.int64)])
        out.n_sites_ = self.n_sites_ + len(effects)
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "n_sites": self.n_sites_,
                "knots": [k.tolist() for k in self.knots_], "fixed_levels": list(self.fixed_levels_),
                "n_site_rows": self.n_site_rows_.tolist(),
                **{name: getattr(self, f"{name}_").tolist()
                   for name in ("beta", "u", "u_var", "tau2", "gamma", "v", "omega2")}}

    @classmethod
    def from_dict(cls, data: dict) -> LocationScaleStage:
        out = cls(LocationScaleConfig(**data["config"]))
        out.n_sites_ = int(data["n_sites"])
        out.knots_ = [np.asarray(k, dtype=np.float64) for k in data["knots"]]
        out.fixed_levels_ = [int(n) for n in data["fixed_levels"]]
        out.n_site_rows_ = np.asarray(data["n_site_rows"], dtype=np.int64)
        for name in ("beta", "u", "u_var", "tau2", "gamma", "v", "omega2"):
            setattr(out, f"{name}_", np.asarray(data[name], dtype=np.float64))
        d = out.beta_.shape[1]
        out.u_ = out.u_.reshape(out.n_sites_, d)
        out.v_ = out.v_.reshape(out.n_sites_, d)
        out.u_var_ = out.u_var_.reshape(out.n_sites_, d)
        out.n_features_ = d
        return out


# ---------------------------------------------------------------------------------------------------
def _site_dummies(site: np.ndarray, n_sites: int) -> np.ndarray:
    """``[R, K]`` indicators; a code of -1 (unknown) or beyond ``n_sites`` is a row of zeros."""
    Z = np.zeros((len(site), n_sites))
    known = (site >= 0) & (site < n_sites)
    Z[np.flatnonzero(known), site[known]] = 1.0
    return Z


def _mixed_model(F, Z, y, w, pen, em_iter):
    """Weighted linear mixed model per column: ``y_j = F beta_j + Z u_j + e``, ``e_i ~ N(0, 1 / w_ij)``,
    ``u_j ~ N(0, tau2_j I)``, small ridge ``pen`` on ``beta``; ``tau2`` by EM.

    Shapes: F [R, p], Z [R, K], y and w [R, D] -> beta [p, D], u [K, D], tau2 [D], and the posterior
    variance of each site effect u_var [K, D]. The D columns are independent problems, solved together
    as a batch of (p + K)-square systems (a loop over columns spent most of a 200-IDP fit in the
    per-call overhead of small solves).
    """
    n, p = F.shape
    k = Z.shape[1]
    d = y.shape[1]
    X = np.concatenate([F, Z], axis=1)
    tau2 = np.full(d, 0.1 * np.var(y, axis=0).clip(1e-6))
    u_var = np.zeros((k, d))
    if k == 0:
        em_iter = 1
    gram = _weighted_grams(X, w)  # [D, P, P]: X^T diag(w_j) X
    rhs = (X.T @ (w * y)).T  # [D, P]
    fixed, sites = np.arange(p), np.arange(p, p + k)
    for _ in range(em_iter):
        A = gram.copy()
        A[:, fixed, fixed] += pen
        A[:, sites, sites] += (1.0 / tau2)[:, None]
        inv = _spd_inverse(A)
        theta = np.einsum("dij,dj->di", inv, rhs)
        beta, u = theta[:, :p].T, theta[:, p:].T
        if k:
            inv_u = inv[:, p:, p:]
            u_var = np.diagonal(inv_u, axis1=1, axis2=2).T.copy()
            tau2 = np.maximum((np.sum(u * u, axis=0) + np.trace(inv_u, axis1=1, axis2=2)) / k, 1e-8)
    return beta, u, tau2, u_var


def _weighted_grams(X: np.ndarray, w: np.ndarray, chunk_elements: int = 8_000_000) -> np.ndarray:
    """``X^T diag(w[:, j]) X`` for every column ``j`` of ``w``: ``[D, P, P]``, in chunks of columns."""
    n, size = X.shape
    d = w.shape[1]
    out = np.empty((d, size, size))
    step = max(1, chunk_elements // max(n * size, 1))
    for lo in range(0, d, step):
        cols = slice(lo, lo + step)
        out[cols] = np.swapaxes(X[None] * w.T[cols, :, None], 1, 2) @ X
    return out


def _spd_inverse(A: np.ndarray) -> np.ndarray:
    """Inverses of a batch of symmetric positive-definite matrices ``[D, P, P]``; a matrix that is not
    numerically positive definite gets a jitter of ``1e-8`` times its mean diagonal first."""
    try:
        np.linalg.cholesky(A)  # the batch at once; a failure names no matrix, so look one by one
    except np.linalg.LinAlgError:
        ok = np.array([_is_positive_definite(a) for a in A])
        A = A.copy()
        size = A.shape[1]
        jitter = 1e-8 * np.trace(A[~ok], axis1=1, axis2=2) / size
        A[np.flatnonzero(~ok)[:, None], np.arange(size), np.arange(size)] += jitter[:, None]
    inv = np.linalg.inv(A)
    return 0.5 * (inv + np.swapaxes(inv, 1, 2))


def _is_positive_definite(a: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return False
    return True


def _bspline(x: np.ndarray, knots: np.ndarray, degree: int) -> np.ndarray:
    """Cubic B-spline basis on ``knots`` (boundary knots repeated), linear beyond the boundary; the first
    basis function is dropped (the intercept carries it)."""
    from scipy.interpolate import BSpline

    lo, hi = float(knots[0]), float(knots[-1])
    if hi <= lo:
        return np.empty((len(x), 0))
    t = np.concatenate([[lo] * degree, knots, [hi] * degree])
    n_basis = len(t) - degree - 1
    inside = np.clip(x, lo, hi)
    basis = BSpline.design_matrix(inside, t, degree).toarray()
    # linear extrapolation: value at the boundary plus the derivative times the distance beyond it
    for edge, mask in ((lo, x < lo), (hi, x > hi)):
        if mask.any():
            deriv = np.stack([BSpline(t, np.eye(n_basis)[b], degree).derivative()(edge)
                              for b in range(n_basis)])
            basis[mask] += (x[mask] - edge)[:, None] * deriv[None, :]
    return basis[:, 1:]

