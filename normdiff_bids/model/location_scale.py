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

A new person's scale is the stage's posterior predictive one: the residual variance plus what the fit
does not know, the posterior variance of the population curve and of the site's location at the
person's covariates (with their covariance), and the log-variance's posterior variance (a log-normal
scale mixture, ``exp(s^2 / 2)``). The spread is fitted to the in-sample squared residuals with their
leverage added back (an in-sample residual has variance ``sigma^2 - x' Sigma x`` under the model, as
REML counts), so it is not shrunk by the rows it was fitted to. On 12 sites of 5 people (40 IDPs,
four seeds) new people's mean squared residual was 1.9 to 2.2 with the plug-in scale (95% coverage
0.85) and is 1.04 to 1.13 (0.93 to 0.94); on sites of 20 people 1.18 to 1.22 and 1.03 to 1.06. Beyond
the training range of a continuous covariate the spread and these variances are the range edge's,
while the location goes on linearly.

The spline's penalty is on its bending, not on its coefficients: the basis drops its first function (the
intercept carries it), so a ridge on the coefficients pulled every curve towards its value at the youngest
age, most at the ends of the range, where people are few (a steep age trend came out 1 to 2 residual SDs
off at the ends; on the synthetic regime cohorts mean |centile - truth| fell by 1.5 to 6% with the
bending penalty).

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
#: Penalties of the spline coefficients (:class:`LocationScaleConfig`), as the model card names them.
PENALTIES = {"difference": "bending (second differences of the spline)",
             "ridge": "ridge on the spline coefficients"}


@dataclass(frozen=True)
class LocationScaleConfig:
    """Settings of :class:`LocationScaleStage` (saved in the model bundle).

    n_knots, degree : B-spline basis of each continuous covariate (knots at quantiles of the training
        values; linear beyond them).
    ridge : strength of the penalty on the spline coefficients, and of the ridge on the fixed effects
        (in units of the standardised IDP).
    penalty : ``"difference"``: the spline's bending (second divided differences of its coefficients),
        which leaves its level and slope free; ``"ridge"``: the coefficients themselves (earlier
        versions), which pulls the curve towards its value at the youngest age, most where people are
        few (the ends of the range).
    n_iter : outer iterations (location given spread, spread given location).
    em_iter : EM iterations of the variance components inside each outer iteration.
    parameter_uncertainty : scale new rows by the posterior predictive variance (module docstring);
        ``False``: the residual variance and the site's location variance only (bundles of earlier
        versions, which kept no posterior covariances).
    """

    n_knots: int = 5
    degree: int = 3
    ridge: float = 1.0
    penalty: str = "difference"
    n_iter: int = 4
    em_iter: int = 15
    parameter_uncertainty: bool = True

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"LocationScaleConfig.penalty must be one of {tuple(PENALTIES)}, got "
                             f"{self.penalty!r}")

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

    def _penalty(self, p: int) -> np.ndarray:
        """Penalty matrix ``[p, p]`` of the fixed part's coefficients: the intercept is free, each spline's
        bending (or, with ``penalty="ridge"``, its coefficients) and the fixed effects' ridge."""
        cfg = self.config
        pen = np.diag(np.full(p, cfg.ridge))
        pen[0, 0] = 0.0
        if cfg.penalty == "ridge":
            return pen
        col = 1
        for knots in self.knots_:
            bend = _difference_penalty(knots, cfg.degree)
            block = slice(col, col + len(bend))
            pen[block, block] = cfg.ridge * bend
            col += len(bend)
        return pen

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
        pen = self._penalty(F.shape[1])

        var = np.ones((n, d))
        w_log = mask / _LOG_CHI2_VAR
        logvar = None
        for _ in range(cfg.n_iter):
            beta, u, tau2, u_var, loc_post = _mixed_model(F, Z, y, mask / var, pen, cfg.em_iter)
            resid = np.where(observed, y - F @ beta - Z @ u, 0.0)
            # an in-sample residual has variance sigma^2 - x' Sigma x: the spread is fitted to r^2 with
            # that leverage term added back, so it learns sigma^2 (as REML does), not the fit's leftovers
            leverage = _quadratic_terms(*_split_posterior(loc_post, F.shape[1]), F, site) \
                if cfg.parameter_uncertainty else 0.0
            r2 = resid**2 + leverage * mask
            if logvar is None:
                # start from the regression of log r^2 (robust to any start), then Fisher scoring of the
                # normal likelihood of the log-variance (a gamma GLM with log link): working response
                # eta + (r^2 / var - 1), whose noise variance is 2 instead of log chi^2's 4.9
                target = np.maximum(np.log(r2 + 1e-10) - _LOG_CHI2_MEAN, LOGVAR_RANGE[0])
                weights, scale = w_log, _LOG_CHI2_VAR
            else:
                # capped: a residual of 0 (an IDP with many zeros) or of 50 SD must not throw a step
                target = logvar + np.clip(r2 / var - 1.0, -1.0, MAX_WORKING_STEP)
                weights, scale = 0.5 * mask, 2.0
            gamma, v, omega2, _, lv_post = _mixed_model(F, Z, target, weights, pen * scale, cfg.em_iter)
            logvar = np.clip(F @ gamma + Z @ v, *LOGVAR_RANGE)
            var = np.exp(logvar)
        # log r^2 is biased for non-normal residuals: put the residual variance at exactly 1 (with each
        # in-sample residual's leverage term added back)
        ratio = np.sum(r2 / var * mask, axis=0) / np.maximum(mask.sum(axis=0), 1.0)
        gamma[0] += np.log(ratio)
        self.beta_, self.u_, self.tau2_, self.u_var_ = beta, u, tau2, u_var
        self.gamma_, self.v_, self.omega2_ = gamma, v, omega2
        self.n_features_ = d
        if cfg.parameter_uncertainty:
            # the location's posterior at the final residual variance; the log-variance's as fitted
            var = np.exp(np.clip(F @ gamma + Z @ v, *LOGVAR_RANGE))
            post = _posterior(F, Z, mask / var, pen, tau2)
            self.beta_cov_, self.beta_site_cov_, self.u_var_ = _split_posterior(post, F.shape[1])
            self.gamma_cov_, self.gamma_site_cov_, self.v_var_ = _split_posterior(lv_post, F.shape[1])
        return self

    # ------------------------------------------------------------------ apply
    @property
    def has_parameter_variance(self) -> bool:
        """Whether new rows get the posterior predictive scale (a stage fitted with
        ``parameter_uncertainty``; bundles of earlier versions kept no posterior covariances)."""
        return getattr(self, "beta_cov_", None) is not None

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
        # the spread, and what the fit does not know, at the nearest covariates inside the training range:
        # a log-variance carried on along its boundary slope took one IDP's variance from e^0.6 at the
        # oldest training age to e^6.5 a range beyond it, and another's to e^-5 (then every person there
        # is extreme); the location goes on linearly
        inside = np.column_stack([np.clip(cont[:, c], k[0], k[-1]) for c, k in enumerate(self.knots_)]) \
            if self.knots_ else cont
        F_in = F if np.array_equal(inside, cont) else self._fixed_design(inside, fixed)
        logvar = np.clip(F_in @ self.gamma_ + Z @ self.v_, *LOGVAR_RANGE)
        if self.has_parameter_variance:
            # posterior predictive: what the fit does not know of the location and the log-variance
            loc_var = _quadratic_terms(self.beta_cov_, self.beta_site_cov_, self.u_var_, F_in, site)
            logvar_var = _quadratic_terms(self.gamma_cov_, self.gamma_site_cov_, self.v_var_, F_in, site)
            var = np.exp(np.clip(logvar + logvar_var / 2, *LOGVAR_RANGE)) + loc_var
        else:
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
    def site_effects(self, cont, fixed, y) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Empirical-Bayes effects of ONE new site from its rows: location, its posterior variance,
        log-variance and its posterior variance, each ``[D]``.

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
        return u, 1.0 / precision, v, 1.0 / (0.5 * len(y) + 1.0 / omega2)

    def with_sites(self, effects: list[tuple[np.ndarray, ...]]) -> LocationScaleStage:
        """A copy that knows ``len(effects)`` more sites (codes ``n_sites_``, ``n_sites_ + 1``, ...), each
        given as :meth:`site_effects` returns it (none: a plain copy); the known sites are untouched, and
        the copy's site arrays are its own."""
        out = LocationScaleStage(self.config)
        out.__dict__.update({k: v for k, v in self.__dict__.items() if k != "config"})
        for name in _SITE_ARRAYS:
            if getattr(self, name, None) is not None:
                current = getattr(self, name)
                setattr(out, name, np.concatenate([current, np.zeros((len(effects), *current.shape[1:]))]))
        out.n_site_rows_ = np.concatenate([self.n_site_rows_, np.zeros(len(effects), dtype=np.int64)])
        out.n_sites_ = self.n_sites_ + len(effects)
        for k, site in enumerate(effects):
            out.set_site(self.n_sites_ + k, site)
        return out

    def set_site(self, code: int, effects: tuple[np.ndarray, ...]) -> None:
        """Give site ``code`` the effects :meth:`site_effects` estimated (in place). The population part
        stays as fitted, so the site's effects no longer covary with it."""
        self.u_[code], self.u_var_[code], self.v_[code] = effects[:3]
        if self.has_parameter_variance:
            self.v_var_[code] = effects[3]
            self.beta_site_cov_[code] = 0.0
            self.gamma_site_cov_[code] = 0.0

    # ------------------------------------------------------------------ persistence
    def posterior_arrays(self) -> dict[str, np.ndarray]:
        """The posterior covariances of the predictive scale (none for a stage without them), which the
        model bundle keeps with its tensors: ``[D, p, p]`` and ``[sites, D, p]`` arrays."""
        if not self.has_parameter_variance:
            return {}
        return {name: np.ascontiguousarray(getattr(self, f"{name}_")) for name in _POSTERIOR_ARRAYS}

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "n_sites": self.n_sites_,
                "knots": [k.tolist() for k in self.knots_], "fixed_levels": list(self.fixed_levels_),
                "n_site_rows": self.n_site_rows_.tolist(),
                **{name: getattr(self, f"{name}_").tolist()
                   for name in ("beta", "u", "u_var", "tau2", "gamma", "v", "omega2")}}

    @classmethod
    def from_dict(cls, data: dict, arrays: dict[str, np.ndarray] | None = None) -> LocationScaleStage:
        """The stage :meth:`to_dict` and :meth:`posterior_arrays` wrote; a stage saved without the
        arrays (earlier versions) scales new rows as it did then."""
        arrays = arrays or {}
        config = dict(data["config"])
        config.setdefault("penalty", "ridge")  # earlier versions' only penalty
        config["parameter_uncertainty"] = bool(config.get("parameter_uncertainty", False)) and bool(arrays)
        out = cls(LocationScaleConfig(**config))
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
        if out.config.parameter_uncertainty:
            p = out.beta_.shape[0]
            k = out.n_sites_
            shapes = {"beta_cov": (d, p, p), "beta_site_cov": (k, d, p), "v_var": (k, d),
                      "gamma_cov": (d, p, p), "gamma_site_cov": (k, d, p)}
            for name in _POSTERIOR_ARRAYS:
                value = np.asarray(arrays[name], dtype=np.float64)
                if value.shape != shapes[name]:
                    raise ValueError(f"location-scale array {name} has shape {value.shape}, expected "
                                     f"{shapes[name]}")
                setattr(out, f"{name}_", value.copy())
        return out


#: The stage's arrays of posterior covariances (``name_`` attributes), kept with the bundle's tensors.
_POSTERIOR_ARRAYS = ("beta_cov", "beta_site_cov", "v_var", "gamma_cov", "gamma_site_cov")
#: Per-site arrays (first axis: the site), extended when sites are added.
_SITE_ARRAYS = ("u_", "u_var_", "v_", "v_var_", "beta_site_cov_", "gamma_site_cov_")


# ---------------------------------------------------------------------------------------------------
def _posterior(F, Z, w, pen, tau2) -> np.ndarray:
    """Posterior covariance ``[D, P, P]`` of ``(beta, u)`` of :func:`_mixed_model` at weights ``w`` and
    site variances ``tau2``."""
    return _gram_posterior(_weighted_grams(np.concatenate([F, Z], axis=1), w), pen, tau2, F.shape[1])


def _gram_posterior(gram, pen, tau2, p) -> np.ndarray:
    """Posterior covariance ``[D, P, P]`` from the weighted grams ``[D, P, P]`` of ``[F, Z]`` (``p``
    columns of ``F``): the penalty matrix ``pen [p, p]`` on ``beta`` and the prior variances ``tau2`` of
    the sites."""
    A = gram.copy()
    sites = np.arange(p, gram.shape[1])
    A[:, :p, :p] += pen
    A[:, sites, sites] += (1.0 / tau2)[:, None]
    return _spd_inverse(A)


def _split_posterior(post: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fixed [D, p, p], fixed-site [K, D, p], site variances [K, D])`` of a posterior covariance."""
    fixed = np.ascontiguousarray(post[:, :p, :p])
    cross = np.ascontiguousarray(np.transpose(post[:, :p, p:], (2, 0, 1)))
    sites = np.diagonal(post[:, p:, p:], axis1=1, axis2=2).T.copy()
    return fixed, cross, sites


def _quadratic_terms(fixed_cov, cross_cov, site_var, F, site) -> np.ndarray:
    """Posterior variance ``[R, D]`` of ``F beta + u[site]`` per row: ``f' C f + 2 f' c_site + v_site``
    (the site terms vanish for a site code of -1 or beyond the known sites).

    Summed term by term over the ``p`` design columns, elementwise: each row's value is then the same
    whichever rows it is scored with (a batched product sums in an order that can depend on the batch,
    and a row's centiles must not change with its neighbours).
    """
    n_sites = len(site_var)
    known = (site >= 0) & (site < n_sites)
    codes = np.where(known, site, 0)
    on = known[:, None]
    p = F.shape[1]
    out = np.zeros((len(F), fixed_cov.shape[0]))
    for a in range(p):
        for b in range(a, p):
            weight = 1.0 if a == b else 2.0
            out += (weight * F[:, a] * F[:, b])[:, None] * fixed_cov[None, :, a, b]
    if n_sites:
        site_part = site_var[codes]
        for a in range(p):
            site_part = site_part + 2.0 * F[:, a, None] * cross_cov[codes, :, a]
        out += np.where(on, site_part, 0.0)
    return np.maximum(out, 0.0)


def _site_dummies(site: np.ndarray, n_sites: int) -> np.ndarray:
    """``[R, K]`` indicators; a code of -1 (unknown) or beyond ``n_sites`` is a row of zeros."""
    Z = np.zeros((len(site), n_sites))
    known = (site >= 0) & (site < n_sites)
    Z[np.flatnonzero(known), site[known]] = 1.0
    return Z


def _mixed_model(F, Z, y, w, pen, em_iter):
    """Weighted linear mixed model per column: ``y_j = F beta_j + Z u_j + e``, ``e_i ~ N(0, 1 / w_ij)``,
    ``u_j ~ N(0, tau2_j I)``, a penalty matrix ``pen [p, p]`` on ``beta``; ``tau2`` by EM.

    Shapes: F [R, p], Z [R, K], y and w [R, D] -> beta [p, D], u [K, D], tau2 [D], the posterior
    variance of each site effect u_var [K, D] and the posterior covariance of ``(beta, u)`` that gave
    them, [D, p + K, p + K]. The D columns are independent problems, solved together
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
    for _ in range(em_iter):
        inv = _gram_posterior(gram, pen, tau2, p)
        theta = np.einsum("dij,dj->di", inv, rhs)
        beta, u = theta[:, :p].T, theta[:, p:].T
        if k:
            inv_u = inv[:, p:, p:]
            u_var = np.diagonal(inv_u, axis1=1, axis2=2).T.copy()
            tau2 = np.maximum((np.sum(u * u, axis=0) + np.trace(inv_u, axis1=1, axis2=2)) / k, 1e-8)
    return beta, u, tau2, u_var, inv


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


def _difference_penalty(knots: np.ndarray, degree: int) -> np.ndarray:
    """``D' D`` for the second divided differences of a B-spline's coefficients over their Greville
    abscissae, on the basis :func:`_bspline` keeps (the first coefficient is the intercept's, 0 here):
    it penalises the curve's bending, not its level or slope. Empty where the basis is (a constant
    covariate)."""
    if knots[-1] <= knots[0]:
        return np.empty((0, 0))
    t = _knot_vector(knots, degree)
    n_basis = len(t) - degree - 1
    g = np.array([t[i + 1:i + degree + 1].mean() for i in range(n_basis)])
    gap = np.diff(g)
    if n_basis < 3 or np.any(gap <= 1e-9 * (g[-1] - g[0])):
        return np.eye(n_basis - 1)
    slopes = np.diff(np.eye(n_basis), axis=0) / gap[:, None]  # [n - 1, n]
    D = np.diff(slopes, axis=0)  # [n - 2, n]
    return D[:, 1:].T @ D[:, 1:]


def _knot_vector(knots: np.ndarray, degree: int) -> np.ndarray:
    """The B-spline knot vector of :func:`_bspline`: ``knots`` with the boundary ones repeated."""
    return np.concatenate([[knots[0]] * degree, knots, [knots[-1]] * degree])


def _bspline(x: np.ndarray, knots: np.ndarray, degree: int) -> np.ndarray:
    """Cubic B-spline basis on ``knots`` (boundary knots repeated), linear beyond the boundary; the first
    basis function is dropped (the intercept carries it)."""
    from scipy.interpolate import BSpline

    lo, hi = float(knots[0]), float(knots[-1])
    if hi <= lo:
        return np.empty((len(x), 0))
    t = _knot_vector(knots, degree)
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

