"""The ground-truth generator: FreeSurfer-like IDPs given age, sex and site, with exact CDFs and quantiles."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from normdiff_bids.data.synthetic.catalogue import (
    ASEG_TYPICAL,
    DK_TYPICAL,
    candidate_idps,
    homolog_key,
    strip_repeat,
)
from normdiff_bids.data.synthetic.mixture import mixture_cdf, mixture_quantile
from normdiff_bids.data.synthetic.resources import table_rows

#: Per-IDP parameters drawn uniformly from ranges per kind of IDP (``kind_ranges.tsv``): relative spread
#: ``cv``; age effect on log(mu) ``c1 t + c2 t^2 + c3 tanh((age - a0) / width)``; male location shift
#: ``sex_loc``; spread slope ``h1``. They are drawn in this order, which fixes every IDP's random stream.
_KIND_FIELDS = ("cv", "c1", "c2", "c3", "a0", "width", "sex_loc", "h1")


def _read_kind_ranges() -> dict[str, tuple[tuple[float, float], ...]]:
    """kind -> the (low, high) range of each of :data:`_KIND_FIELDS`, in that order."""
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for row in table_rows("kind_ranges.tsv"):
        ranges.setdefault(row["kind"], {})[row["parameter"]] = (float(row["low"]), float(row["high"]))
    missing = {kind: sorted(set(_KIND_FIELDS) - set(r)) for kind, r in ranges.items()
               if not set(_KIND_FIELDS) <= set(r)}
    if missing:
        raise ValueError(f"tables/kind_ranges.tsv lacks parameters {missing}")
    return {kind: tuple(r[f] for f in _KIND_FIELDS) for kind, r in ranges.items()}


_KIND_RANGES = _read_kind_ranges()

_FAMILIES = ("normal", "shash", "lognormal", "mixture")
_NORMAL, _SHASH, _LOGNORMAL, _MIXTURE = range(4)
#: Age is centred and scaled as t = (age - 45) / 40 inside the generator.
_AGE_CENTRE, _AGE_SCALE = 45.0, 40.0

#: How :class:`SyntheticCohort` sizes its sites: ``dirichlet`` (similar sizes) or ``zipf`` (weight of the
#: k-th site ~ 1/k: with 20 sites and 200 people, the smallest sites have about 3).
SITE_SIZES = ("dirichlet", "zipf")


@dataclass(frozen=True)
class _Params:
    """Per-row, per-IDP distribution parameters [R, D]."""

    mu: np.ndarray      # location (median of the main component), original units
    scale: np.ndarray   # relative spread s: SD / mu for the additive normal, SD of log(y) otherwise
    weight: np.ndarray  # mixture weight of the second component (0 where not a mixture)


class SyntheticCohort:
    """A ground-truth joint distribution of IDPs given age, sex and site, with exact marginals.

    Each IDP j has a conditional marginal ``F_j(y | age, sex, site)`` from one of four families:

    - ``normal``: ``y = mu (1 + s z)``, ``z ~ N(0, 1)``;
    - ``shash`` (sinh-arcsinh: skewed, heavy/light tails): ``y = mu exp(s sinh((asinh(z) + eps) / delta))``;
    - ``lognormal`` (ventricles, CSF, lesions): ``y = mu exp(s z)``;
    - ``mixture`` (bimodal): ``y = mu exp(s x)`` with ``x ~ (1 - w(age)) N(0, 1) + w(age) N(sep, ratio^2)``,
      a weight that rises with age, so a second mode appears in older people.

    ``mu`` and the relative spread ``s`` depend non-linearly on age (quadratic plus a developmental
    sigmoid, on the log scale; the spread changes with age too) and on sex and site (location and scale).
    IDPs are tied together by a Gaussian copula: ``z ~ N(0, R)`` with ``R`` a well-conditioned factor-model
    correlation (a global size factor, one factor per measure kind, a strong left/right homolog factor).
    ``y_j = F_j^{-1}(Phi(z_j))``, so ``F_j`` is exactly the conditional marginal of IDP j.

    ``site_sizes="zipf"`` gives a consortium of a few large sites and many small ones, and
    ``site_effect`` multiplies every site's location and scale effects (1: scanner-like effects of about
    2% in location and 8% in spread; 3: effects as large as a fraction of an SD in every IDP).

    Attributes: ``idps`` (real aseg and DK names, interleaved; a ``_2`` suffix past the 243 real ones),
    ``sites`` (``site1``...), ``kinds``, ``families``, ``correlation`` (R). Each IDP's parameters come from
    its own random stream, so the first k IDPs are the same model whatever ``n_idps`` is.

    >>> gen = SyntheticCohort(n_idps=20, n_sites=3, seed=0)
    >>> table = gen.sample(500, seed=1)            # participant_id, age, sex, site, *gen.idps
    >>> u = gen.cdf(table)                         # exact conditional centiles, uniform per IDP
    """

    #: Names of the columns the generator conditions on.
    covariates = ("age", "sex", "site")

    def __init__(self, n_idps: int = 20, n_sites: int = 3, seed: int = 0,
                 age_range: tuple[float, float] = (8.0, 85.0), site_sizes: str = "dirichlet",
                 site_effect: float = 1.0):
        if site_sizes not in SITE_SIZES:
            raise ValueError(f"site_sizes must be one of {SITE_SIZES}, got {site_sizes!r}")
        if not float(site_effect) >= 0:
            raise ValueError(f"site_effect must be >= 0, got {site_effect!r}")
        if int(n_idps) < 1:
            raise ValueError(f"n_idps must be at least 1, got {n_idps}")
        if int(n_sites) < 1:
            raise ValueError(f"n_sites must be at least 1, got {n_sites}")
        if not age_range[0] < age_range[1]:
            raise ValueError(f"age_range must be (low, high) with low < high, got {age_range}")
        self.n_idps = int(n_idps)
        self.n_sites = int(n_sites)
        self.seed = int(seed)
        self.age_range = (float(age_range[0]), float(age_range[1]))
        self.site_sizes = site_sizes
        self.site_effect = float(site_effect)
        self._build()

    # -- construction ------------------------------------------------------------------------------------
    def _build(self) -> None:
        candidates = candidate_idps()
        names, kinds = [], []
        for j in range(self.n_idps):
            name, kind = candidates[j % len(candidates)]
            repeat = j // len(candidates)
            names.append(name if repeat == 0 else f"{name}_{repeat + 1}")
            kinds.append(kind)
        self.idps: list[str] = names
        self.kinds: list[str] = kinds
        self.sites: list[str] = [f"site{k + 1}" for k in range(self.n_sites)]
        D, K = self.n_idps, self.n_sites
        # Every IDP draws its parameters from its own stream (and left/right copies share one for their
        # age and sex effects), so the first k IDPs are the same whatever n_idps is: a small cohort is
        # exactly the marginal of a larger one with the same seed.
        fields = ("base", "cv", "c1", "c2", "c3", "a0", "width", "sex_loc", "h1", "h2", "sex_scale", "eps",
                  "delta", "sep", "ratio", "w_lo", "w_hi", "w_age", "w_width")
        p = {f: np.empty(D) for f in fields}
        site_loc, site_scale = np.empty((K, D)), np.empty((K, D))
        groups = {"subcortical": 0, "fluid": 1, "thickness": 2, "area": 3, "volume": 4}
        homolog_keys = list(dict.fromkeys(homolog_key(strip_repeat(n)) for n in names))
        loadings = np.zeros((D, 1 + len(groups) + len(homolog_keys)))
        for j, (name, kind) in enumerate(zip(names, kinds)):
            real = strip_repeat(name)
            key = homolog_key(real)
            shared = np.random.default_rng([self.seed, 2, zlib.crc32(key.encode())])
            own = np.random.default_rng([self.seed, 1, j])
            for f, (lo, hi) in zip(_KIND_FIELDS, _KIND_RANGES[kind]):
                p[f][j] = shared.uniform(lo, hi)
            if kind in ("subcortical", "fluid"):
                base = ASEG_TYPICAL[real]
            else:
                thickness, area = DK_TYPICAL[real.split("_")[1]]
                base = {"thickness": thickness, "area": area, "volume": 1.15 * thickness * area}[kind]
            p["base"][j] = base * np.exp(own.normal(0.0, 0.02))  # small left/right asymmetry
            p["h2"][j] = own.uniform(0.0, 0.15)
            p["sex_scale"][j] = own.uniform(-0.05, 0.10)
            p["eps"][j] = own.uniform(0.25, 0.6) * own.choice([-1.0, 1.0])
            p["delta"][j] = own.uniform(0.8, 1.25)
            p["sep"][j] = own.uniform(3.0, 4.5) * own.choice([-1.0, 1.0])
            p["ratio"][j] = own.uniform(0.7, 1.2)
            p["w_lo"][j] = own.uniform(0.05, 0.15)
            p["w_hi"][j] = own.uniform(0.45, 0.65)
            p["w_age"][j] = own.uniform(35.0, 60.0)
            p["w_width"][j] = own.uniform(6.0, 12.0)
            # Copula loadings: head size drives volumes and areas (thickness and fluid barely load on it),
            # one factor per measure kind, a strong one shared by the left and right copies.
            loadings[j, 0] = {"thickness": 0.1, "fluid": 0.2}.get(kind, 0.4) * own.uniform(0.8, 1.2)
            loadings[j, 1 + groups[kind]] = own.uniform(0.25, 0.45)
            loadings[j, 1 + len(groups) + homolog_keys.index(key)] = own.uniform(0.45, 0.65)
            site_loc[:, j] = own.normal(0.0, 0.02, size=K)
            site_scale[:, j] = own.normal(0.0, 0.08, size=K)

        # Families: fluids are log-normal; among the rest every 6th (from the 4th) is bimodal and every
        # 3rd (from the 2nd) skewed, so even a handful of IDPs includes each family.
        family = np.full(D, _NORMAL)
        for j in range(D):
            if kinds[j] == "fluid":
                family[j] = _LOGNORMAL
            elif j % 6 == 3:
                family[j] = _MIXTURE
            elif j % 3 == 1:
                family[j] = _SHASH
        self._family = family
        self.families: list[str] = [_FAMILIES[f] for f in family]
        shash, mixture = family == _SHASH, family == _MIXTURE
        # Additive normals are kept narrow enough that a negative value needs z < -7.
        p["cv"] = np.where(family == _NORMAL, np.minimum(p["cv"], 0.09), p["cv"])
        self._base, self._cv = p["base"], p["cv"]
        self._c1, self._c2, self._c3 = p["c1"], p["c2"], p["c3"]
        self._a0, self._width, self._h1, self._h2 = p["a0"], p["width"], p["h1"], p["h2"]
        self._sex_loc, self._sex_scale = p["sex_loc"], p["sex_scale"]
        self._eps = np.where(shash, p["eps"], 0.0)
        self._delta = np.where(shash, p["delta"], 1.0)
        self._sep = np.where(mixture, p["sep"], 0.0)
        self._ratio = np.where(mixture, p["ratio"], 1.0)
        self._w_lo = np.where(mixture, p["w_lo"], 0.0)
        self._w_hi = np.where(mixture, p["w_hi"], 0.0)
        self._w_age, self._w_width = p["w_age"], p["w_width"]

        # Site: a scanner offset shared by all IDPs plus an IDP-specific one (location), and a scale
        # multiplier; the first site is the reference scanner.
        site_rng = np.random.default_rng([self.seed, 3, K])
        self._site_loc = self.site_effect * (site_rng.normal(0.0, 0.02, size=(K, 1)) + site_loc)
        self._site_scale = self.site_effect * site_scale
        self._site_loc[0] = 0.0
        self._site_scale[0] = 0.0
        self._site_weights = site_rng.dirichlet(np.full(K, 6.0)) if K > 1 else np.ones(1)
        if self.site_sizes == "zipf":
            # consortium-like: a few large sites and a long tail of small ones (weight ~ 1 / rank)
            self._site_weights = 1.0 / np.arange(1, K + 1)
            self._site_weights /= self._site_weights.sum()
        self._site_age_beta = site_rng.uniform(0.8, 1.6, size=(K, 2))

        # Rows of the loadings have squared norm < 0.85, so every uniqueness is >= 0.15 and R stays
        # well conditioned.
        common = loadings @ loadings.T
        self.correlation: np.ndarray = common + np.diag(1.0 - np.diag(common))
        self._chol = np.linalg.cholesky(self.correlation)

    # -- covariates --------------------------------------------------------------------------------------
    def sample_covariates(self, n: int, seed: int = 0) -> pd.DataFrame:
        """Draw ``n`` participants: ``participant_id``, ``age`` (years), ``sex`` (``"F"``/``"M"``), ``site``.

        Sites have unequal sizes and slightly different age mixes; every site spans the full age range.
        """
        n = int(n)
        rng = np.random.default_rng([int(seed), 1])
        site = rng.choice(self.n_sites, size=n, p=self._site_weights)
        a, b = self._site_age_beta[site].T
        lo, hi = self.age_range
        age = lo + (hi - lo) * rng.beta(a, b)
        sex = np.where(rng.random(n) < 0.5, "F", "M")
        width = max(3, len(str(n)))
        return pd.DataFrame({
            "participant_id": [f"sub-{i + 1:0{width}d}" for i in range(n)],
            "age": np.round(age, 2),
            "sex": sex,
            "site": np.array(self.sites, dtype=object)[site],
        })

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        """Draw ``n`` participants with their IDPs: ``participant_id, age, sex, site, *idps``.

        The covariates are those of :meth:`sample_covariates` with the same seed; the IDPs use a stream of
        their own, so they never coincide with :meth:`sample_idps` draws made with the same seed.
        """
        table = self.sample_covariates(n, seed)
        rng = np.random.default_rng([int(seed), 3])
        z = rng.standard_normal((len(table), self.n_idps)) @ self._chol.T
        values = self.idps_from_normal_scores(table, z)
        return pd.concat([table, pd.DataFrame(values, columns=self.idps, index=table.index)], axis=1)

    # -- exact distribution ------------------------------------------------------------------------------
    def sample_idps(self, covariates: pd.DataFrame, n_samples: int, seed: int = 0) -> np.ndarray:
        """Oracle draws ``[rows, n_samples, D]`` from the true joint distribution at each row's covariates."""
        params = self._params(covariates)
        rng = np.random.default_rng([int(seed), 2])
        R, S, D = len(covariates), int(n_samples), self.n_idps
        z = rng.standard_normal((R, S, D)) @ self._chol.T
        return self._quantile_z(params, z)

    def idps_from_normal_scores(self, covariates: pd.DataFrame, z: np.ndarray) -> np.ndarray:
        """Map normal scores ``z`` (``[rows, D]`` or ``[rows, S, D]``) to IDP values: ``F^-1(Phi(z))``.

        The true centile of the result is ``Phi(z)``; shifting ``z`` makes a known deviation.
        """
        z = np.asarray(z, dtype=float)
        params = self._params(covariates)
        if z.ndim == 2:
            return self._quantile_z(params, z[:, None, :])[:, 0, :]
        return self._quantile_z(params, z)

    def cdf(self, table: pd.DataFrame) -> pd.DataFrame:
        """Exact conditional marginal CDF of each IDP at each row's covariates (the true centiles)."""
        missing = [c for c in self.idps if c not in table.columns]
        if missing:
            raise ValueError(f"table lacks IDP columns {missing[:5]}{'...' if len(missing) > 5 else ''}")
        y = table[self.idps].to_numpy(dtype=float)
        u = self._cdf(self._params(table), y)
        return pd.DataFrame(u, index=table.index, columns=self.idps)

    def normal_scores(self, table: pd.DataFrame) -> pd.DataFrame:
        """``Phi^-1`` of :meth:`cdf`, computed without losing the far tails."""
        y = table[self.idps].to_numpy(dtype=float)
        params = self._params(table)
        lower = self._cdf(params, y)
        upper = self._cdf(params, y, upper=True)
        z = np.where(lower < 0.5, ndtri(lower), -ndtri(upper))
        return pd.DataFrame(z, index=table.index, columns=self.idps)

    def ppf(self, covariates: pd.DataFrame, q) -> np.ndarray:
        """Exact conditional quantiles ``[rows, len(q), D]`` at probabilities ``q`` (each in (0, 1))."""
        q = np.atleast_1d(np.asarray(q, dtype=float))
        if np.any((q <= 0) | (q >= 1)) or q.ndim != 1:
            raise ValueError(f"q must be a 1-D list of probabilities strictly inside (0, 1), got {q}")
        params = self._params(covariates)
        z = np.broadcast_to(ndtri(q)[None, :, None], (len(covariates), len(q), self.n_idps))
        return self._quantile_z(params, z)

    def mean_curve(self, ages, sex: str = "F", site: str | None = None, q: float = 0.5) -> pd.DataFrame:
        """True ``q``-quantile of every IDP along ``ages`` for one sex and site (for plots)."""
        ages = np.asarray(ages, dtype=float)
        cov = pd.DataFrame({"age": ages, "sex": sex, "site": site or self.sites[0]})
        return pd.DataFrame(self.ppf(cov, [q])[:, 0, :], index=ages, columns=self.idps)

    # -- internals ---------------------------------------------------------------------------------------
    def _covariate_arrays(self, covariates: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        missing = [c for c in self.covariates if c not in covariates.columns]
        if missing:
            raise ValueError(f"covariates lack columns {missing}; expected {list(self.covariates)}")
        age = pd.to_numeric(covariates["age"], errors="coerce").to_numpy(dtype=float)
        if np.isnan(age).any():
            raise ValueError("covariate 'age' has missing or non-numeric values; every row needs an age")
        sex_raw = covariates["sex"]
        if pd.api.types.is_numeric_dtype(sex_raw):
            sex_num = sex_raw.to_numpy(dtype=float)
            bad = ~np.isin(sex_num, (0.0, 1.0))
            male = sex_num == 1.0
        else:
            s = sex_raw.astype(str).str.strip().str.upper()
            bad = ~s.isin(["F", "M"]).to_numpy()
            male = (s == "M").to_numpy()
        if bad.any():
            raise ValueError(f"covariate 'sex' must be 'F'/'M' (or 0/1 with 1 = M); got "
                             f"{sorted(set(map(str, sex_raw[bad])))}")
        site_map = {s: k for k, s in enumerate(self.sites)}
        site_str = covariates["site"].astype(str).to_numpy()
        unknown = sorted(set(site_str) - set(site_map))
        if unknown:
            raise ValueError(f"covariate 'site' has levels {unknown} unknown to the generator; "
                             f"expected {self.sites}")
        site = np.array([site_map[s] for s in site_str], dtype=int)
        return age, male.astype(float), site

    def _params(self, covariates: pd.DataFrame) -> _Params:
        age, male, site = self._covariate_arrays(covariates)
        a = age[:, None]
        t = (a - _AGE_CENTRE) / _AGE_SCALE
        log_mu = (np.log(self._base) + self._c1 * t + self._c2 * t**2
                  + self._c3 * np.tanh((a - self._a0) / self._width)
                  + self._sex_loc * male[:, None] + self._site_loc[site])
        log_scale = (np.log(self._cv) + self._h1 * t + self._h2 * t**2
                     + self._sex_scale * male[:, None] + self._site_scale[site])
        w = self._w_lo + (self._w_hi - self._w_lo) / (1.0 + np.exp(-(a - self._w_age) / self._w_width))
        w = np.where(self._family == _MIXTURE, w, 0.0)
        return _Params(mu=np.exp(log_mu), scale=np.exp(log_scale), weight=w)

    def _quantile_z(self, p: _Params, z: np.ndarray) -> np.ndarray:
        """Quantile function in normal-score form, ``z [R, S, D] -> y [R, S, D]``."""
        mu, sc, w = p.mu[:, None, :], p.scale[:, None, :], p.weight[:, None, :]
        fam = self._family
        y = np.empty(np.broadcast_shapes(z.shape, mu.shape))
        m = fam == _NORMAL
        y[..., m] = mu[..., m] * (1.0 + sc[..., m] * z[..., m])
        m = fam == _SHASH
        e = np.sinh((np.arcsinh(z[..., m]) + self._eps[m]) / self._delta[m])
        y[..., m] = mu[..., m] * np.exp(sc[..., m] * e)
        m = fam == _LOGNORMAL
        y[..., m] = mu[..., m] * np.exp(sc[..., m] * z[..., m])
        m = fam == _MIXTURE
        if m.any():
            zm = np.broadcast_to(z[..., m], y[..., m].shape)
            x = mixture_quantile(zm, w[..., m], self._sep[m], self._ratio[m])
            y[..., m] = mu[..., m] * np.exp(sc[..., m] * x)
        return y

    def _cdf(self, p: _Params, y: np.ndarray, upper: bool = False) -> np.ndarray:
        """``P(Y <= y)`` (or ``P(Y > y)`` with ``upper``), ``y [R, D]``."""
        fam = self._family
        sign = -1.0 if upper else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            x = (y / p.mu - 1.0) / p.scale  # standardised residual of the additive normal
            # Every other family is a location-scale family of log(y): x_log = log(y / mu) / s.
            x_log = np.where(y > 0, np.log(np.where(y > 0, y, 1.0) / p.mu), -np.inf) / p.scale
        out = np.empty_like(y)
        m = fam == _NORMAL
        out[:, m] = ndtr(sign * x[:, m])
        m = fam == _SHASH
        out[:, m] = ndtr(sign * np.sinh(self._delta[m] * np.arcsinh(x_log[:, m]) - self._eps[m]))
        m = fam == _LOGNORMAL
        out[:, m] = ndtr(sign * x_log[:, m])
        m = fam == _MIXTURE
        out[:, m] = mixture_cdf(x_log[:, m], p.weight[:, m], self._sep[m], self._ratio[m], upper=upper)
        out[np.isnan(y)] = np.nan
        return out
