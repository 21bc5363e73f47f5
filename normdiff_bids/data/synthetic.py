"""Synthetic data with a known answer: a ground-truth IDP generator and a BIDS + FreeSurfer dataset writer.

:class:`SyntheticCohort` draws FreeSurfer-like IDPs (aseg volumes, DK thickness/area/volume) conditional
on age, sex and site, and exposes the exact conditional CDF and quantiles, so calibration can be checked
against the truth. :func:`write_synthetic_dataset` writes a cohort as a valid BIDS raw dataset with a
FreeSurfer derivatives folder in the real file formats.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_directory
from normdiff_bids.bidsio import json_text, tsv_text
from normdiff_bids.data.atlases import (
    ASEG_LABELS,
    DK_CTAB,
    DK_REGIONS,
    DK_RGB,
    HEMISPHERES,
    aparc_aseg_labels,
)
from normdiff_bids.data.freesurfer import FS7_TO_FS6

# ---------------------------------------------------------------------------------------------------------
# IDP catalogue: names, kinds and typical adult values
# ---------------------------------------------------------------------------------------------------------

#: Typical adult aseg volumes (mm^3), roughly those of healthy adults in FreeSurfer 7. Structures that
#: FreeSurfer reports as (nearly) always zero are left out of the generator.
_ASEG_TYPICAL: dict[str, float] = {
    "Left-Hippocampus": 4200.0, "Right-Hippocampus": 4300.0,
    "Left-Lateral-Ventricle": 9000.0, "Right-Lateral-Ventricle": 8500.0,
    "Left-Thalamus": 7600.0, "Right-Thalamus": 7400.0,
    "Left-Amygdala": 1600.0, "Right-Amygdala": 1700.0,
    "Left-Putamen": 4900.0, "Right-Putamen": 4950.0,
    "Left-Caudate": 3500.0, "Right-Caudate": 3600.0,
    "3rd-Ventricle": 950.0, "4th-Ventricle": 1700.0,
    "Left-Pallidum": 2000.0, "Right-Pallidum": 1950.0,
    "Left-Accumbens-area": 560.0, "Right-Accumbens-area": 590.0,
    "Left-VentralDC": 4000.0, "Right-VentralDC": 4050.0,
    "Brain-Stem": 21000.0,
    "Left-Inf-Lat-Vent": 350.0, "Right-Inf-Lat-Vent": 380.0,
    "Left-Cerebellum-Cortex": 51000.0, "Right-Cerebellum-Cortex": 52000.0,
    "Left-Cerebellum-White-Matter": 14500.0, "Right-Cerebellum-White-Matter": 14200.0,
    "CSF": 1100.0, "WM-hypointensities": 1500.0,
    "Left-choroid-plexus": 650.0, "Right-choroid-plexus": 700.0,
    "Left-vessel": 25.0, "Right-vessel": 30.0,
    "Optic-Chiasm": 200.0,
    "CC_Posterior": 950.0, "CC_Mid_Posterior": 480.0, "CC_Central": 470.0,
    "CC_Mid_Anterior": 480.0, "CC_Anterior": 850.0,
}
#: aseg structures whose volume is fluid or lesion: log-normal, growing steeply with age.
_ASEG_FLUID = {
    "Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "3rd-Ventricle", "4th-Ventricle",
    "Left-Inf-Lat-Vent", "Right-Inf-Lat-Vent", "CSF", "WM-hypointensities", "Left-choroid-plexus",
    "Right-choroid-plexus", "Left-vessel", "Right-vessel",
}
#: Typical adult DK values per hemisphere: (mean thickness mm, white-surface area mm^2). Grey-matter volume
#: is close to area x thickness, which is how the generator sets it.
_DK_TYPICAL: dict[str, tuple[float, float]] = {
    "bankssts": (2.5, 1000), "caudalanteriorcingulate": (2.6, 650), "caudalmiddlefrontal": (2.6, 2200),
    "cuneus": (1.9, 1650), "entorhinal": (3.3, 450), "fusiform": (2.7, 3100), "inferiorparietal": (2.5, 5000),
    "inferiortemporal": (2.8, 3400), "isthmuscingulate": (2.4, 1100), "lateraloccipital": (2.2, 4600),
    "lateralorbitofrontal": (2.6, 2600), "lingual": (2.0, 3300), "medialorbitofrontal": (2.4, 1800),
    "middletemporal": (2.9, 3200), "parahippocampal": (2.6, 650), "paracentral": (2.4, 1450),
    "parsopercularis": (2.6, 1600), "parsorbitalis": (2.7, 600), "parstriangularis": (2.5, 1400),
    "pericalcarine": (1.7, 1400), "postcentral": (2.1, 4300), "posteriorcingulate": (2.5, 1100),
    "precentral": (2.6, 5000), "precuneus": (2.4, 4200), "rostralanteriorcingulate": (2.8, 650),
    "rostralmiddlefrontal": (2.4, 5800), "superiorfrontal": (2.8, 7500), "superiorparietal": (2.3, 5500),
    "superiortemporal": (2.8, 3700), "supramarginal": (2.5, 4200), "frontalpole": (2.7, 250),
    "temporalpole": (3.6, 450), "transversetemporal": (2.3, 400), "insula": (3.0, 2100),
}
#: DK regions listed first, so that small cohorts get the regions people look at first.
_DK_FIRST = ("superiorfrontal", "entorhinal", "precuneus", "superiortemporal", "insula", "lateraloccipital",
             "parahippocampal", "precentral", "middletemporal", "fusiform")

#: Parameter ranges per kind of IDP: relative spread ``cv``; age effect on log(mu)
#: ``c1 t + c2 t^2 + c3 tanh((age - a0) / width)``; male location shift ``sex_loc``; spread slope ``h1``.
_KIND_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    # kind:        cv            c1              c2              c3             a0        width
    #              sex_loc       h1
    "subcortical": ((0.08, 0.12), (-0.15, -0.05), (-0.10, -0.02), (0.00, 0.05), (10, 20), (4, 7),
                    (0.05, 0.10), (0.05, 0.30)),
    "fluid": ((0.30, 0.45), (0.40, 0.70), (0.20, 0.40), (-0.05, 0.0), (10, 20), (4, 7),
              (0.05, 0.15), (0.05, 0.25)),
    "thickness": ((0.05, 0.08), (-0.10, -0.05), (0.00, 0.03), (-0.05, -0.01), (12, 25), (4, 8),
                  (-0.01, 0.02), (0.00, 0.20)),
    "area": ((0.10, 0.15), (-0.06, -0.02), (-0.04, 0.00), (0.02, 0.06), (8, 14), (3, 6),
             (0.07, 0.12), (0.00, 0.20)),
    "volume": ((0.10, 0.15), (-0.15, -0.08), (-0.05, 0.00), (0.00, 0.04), (10, 18), (3, 6),
               (0.06, 0.10), (0.00, 0.20)),
}

_KIND_FIELDS = ("cv", "c1", "c2", "c3", "a0", "width", "sex_loc", "h1")
_FAMILIES = ("normal", "shash", "lognormal", "mixture")
_NORMAL, _SHASH, _LOGNORMAL, _MIXTURE = range(4)
#: Age is centred and scaled as t = (age - 45) / 40 inside the generator.
_AGE_CENTRE, _AGE_SCALE = 45.0, 40.0


def _candidate_idps() -> list[tuple[str, str]]:
    """(name, kind) for every real IDP the generator can use, interleaving aseg/thickness/area/volume."""
    assert set(_ASEG_TYPICAL) <= set(ASEG_LABELS)
    aseg = [(n, "fluid" if n in _ASEG_FLUID else "subcortical") for n in _ASEG_TYPICAL]
    regions = list(_DK_FIRST) + [r for r in DK_REGIONS if r not in _DK_FIRST]
    pools = [aseg]
    for measure in ("thickness", "area", "volume"):
        pools.append([(f"{h}_{r}_{measure}", measure) for r in regions for h in HEMISPHERES])
    out: list[tuple[str, str]] = []
    for i in range(max(len(p) for p in pools)):
        out.extend(p[i] for p in pools if i < len(p))
    return out


def _homolog_key(name: str) -> str:
    """The name without its hemisphere, so left and right copies of a structure share a factor."""
    for prefix in ("Left-", "Right-", "lh_", "rh_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


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
        candidates = _candidate_idps()
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
        homolog_keys = list(dict.fromkeys(_homolog_key(_strip_repeat(n)) for n in names))
        loadings = np.zeros((D, 1 + len(groups) + len(homolog_keys)))
        for j, (name, kind) in enumerate(zip(names, kinds)):
            real = _strip_repeat(name)
            key = _homolog_key(real)
            shared = np.random.default_rng([self.seed, 2, zlib.crc32(key.encode())])
            own = np.random.default_rng([self.seed, 1, j])
            for f, (lo, hi) in zip(_KIND_FIELDS, _KIND_RANGES[kind]):
                p[f][j] = shared.uniform(lo, hi)
            if kind in ("subcortical", "fluid"):
                base = _ASEG_TYPICAL[real]
            else:
                thickness, area = _DK_TYPICAL[real.split("_")[1]]
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
            x = _mixture_quantile(zm, w[..., m], self._sep[m], self._ratio[m])
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
        out[:, m] = _mixture_cdf(x_log[:, m], p.weight[:, m], self._sep[m], self._ratio[m], upper=upper)
        out[np.isnan(y)] = np.nan
        return out


def _strip_repeat(name: str) -> str:
    """``lh_x_thickness_2`` -> ``lh_x_thickness`` (names past the real catalogue carry a repeat suffix)."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


def _mixture_cdf(x, w, sep, ratio, upper: bool = False):
    """CDF (or survival) of ``(1 - w) N(0, 1) + w N(sep, ratio^2)`` at ``x``."""
    if upper:
        return (1.0 - w) * ndtr(-x) + w * ndtr(-(x - sep) / ratio)
    return (1.0 - w) * ndtr(x) + w * ndtr((x - sep) / ratio)


def _mixture_quantile(z, w, sep, ratio, tol: float = 1e-13, max_iter: int = 100) -> np.ndarray:
    """Solve ``F_mix(x) = Phi(z)`` for every entry: safeguarded Newton inside an exact bracket.

    The answer lies between the two component quantiles ``z`` and ``sep + ratio z`` (the mixture CDF is a
    convex combination of the component CDFs), which gives a tight bracket. Upper-half targets are solved
    on the survival function so probabilities near 1 keep their precision. Only unconverged entries are
    iterated on.
    """
    z, w, sep, ratio = (np.array(a, dtype=float) for a in np.broadcast_arrays(z, w, sep, ratio))
    shape = z.shape
    z, w, sep, ratio = z.ravel(), w.ravel(), sep.ravel(), ratio.ravel()
    qb = sep + ratio * z
    lo, hi = np.minimum(z, qb), np.maximum(z, qb)
    # sign -1 turns the problem into one on the survival function: S(x) = Phi(-z) for z > 0.
    sign = np.where(z > 0, -1.0, 1.0)
    target = ndtr(sign * z)
    x = np.clip((1.0 - w) * z + w * qb, lo, hi)
    active = np.flatnonzero(hi - lo > tol * (1.0 + np.abs(x)))
    norm = 1.0 / np.sqrt(2.0 * np.pi)
    for _ in range(max_iter):
        if active.size == 0:
            break
        xa, wa, sa, ra, sg = x[active], w[active], sep[active], ratio[active], sign[active]
        xb = (xa - sa) / ra
        resid = sg * ((1.0 - wa) * ndtr(sg * xa) + wa * ndtr(sg * xb) - target[active])  # increasing in x
        lo_a = np.where(resid <= 0, xa, lo[active])
        hi_a = np.where(resid >= 0, xa, hi[active])
        dens = norm * ((1.0 - wa) * np.exp(-0.5 * xa**2) + wa / ra * np.exp(-0.5 * xb**2))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            newton = xa - resid / dens
        ok = np.isfinite(newton) & (newton > lo_a) & (newton < hi_a)
        x_new = np.where(ok, newton, 0.5 * (lo_a + hi_a))
        scale = tol * (1.0 + np.abs(x_new))
        done = (np.abs(x_new - xa) <= scale) | (hi_a - lo_a <= scale) | (resid == 0)
        x[active], lo[active], hi[active] = x_new, lo_a, hi_a
        active = active[~done]
    return x.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Synthetic BIDS + FreeSurfer dataset
# ---------------------------------------------------------------------------------------------------------

#: Where the ground truth goes: ``sourcedata/`` is outside the validator's and pybids' view.
GROUND_TRUTH_DIR = Path("sourcedata") / "groundtruth"

#: Known deviation of patients, as a shift of the normal score (so the true centile is Phi(z + shift)):
#: medial-temporal atrophy and the matching ventricular enlargement.
PATIENT_SHIFTS: dict[str, float] = {
    "*-Hippocampus": -2.5,
    "*-Amygdala": -2.0,
    "*_entorhinal_thickness": -2.0,
    "*_entorhinal_volume": -2.0,
    "*_parahippocampal_thickness": -1.5,
    "*_parahippocampal_volume": -1.5,
    "*_middletemporal_thickness": -1.0,
    "*-Inf-Lat-Vent": 2.0,
    "*-Lateral-Ventricle": 1.5,
}

#: Within-subject correlation of normal scores across sessions (longitudinal data stay coherent).
_SESSION_CORRELATION = 0.85

_FS_HEADERS = {
    "7": {"segstats": "7.4.1", "surface": "7.4.1"},
    "6": {"segstats": "$Id: mri_segstats.c,v 1.121 2016/05/31 17:27:11 greve Exp $",
          "surface": "$Id: mris_anatomical_stats.c,v 1.79 2016/03/14 15:15:34 greve Exp $"},
}


def real_idp_names() -> list[str]:
    """Every IDP the generator can write into FreeSurfer files (aseg volumes, DK thickness/area/volume)."""
    return [name for name, _ in _candidate_idps()]


def write_synthetic_dataset(out_dir: str | os.PathLike, n_subjects: int = 20, seed: int = 0, *,
                            n_idps: int | None = None, n_sites: int = 3, sessions: int = 1,
                            fs_version: str = "7", patients: float = 0.0,
                            overwrite: bool = False) -> Path:
    """Write a synthetic BIDS raw dataset with a FreeSurfer derivatives folder and its ground truth.

    - ``participants.tsv`` (+ ``.json``): ``participant_id, age, sex, site, diagnosis`` (``HC``/``patient``);
      with ``sessions > 1`` the age of each visit is in ``sub-<label>/sub-<label>_sessions.tsv`` and
      ``participants.tsv`` holds the age at the first visit.
    - one tiny T1w NIfTI per subject (and session);
    - ``derivatives/freesurfer/<sub-X or sub-X_ses-Y>/``: ``stats/aseg.stats``, ``stats/brainvol.stats``,
      ``stats/?h.aparc.stats`` in the real FreeSurfer formats (FreeSurfer 6 spellings with
      ``fs_version="6"``, a per-subject mix with ``"mixed"``), ``mri/aparc+aseg.mgz`` with the real label
      ids, ``surf/?h.white`` and ``label/?h.aparc.annot``;
    - ``sourcedata/groundtruth/``: ``centiles.tsv`` (the true centile of every written value of the
      generator's first ``n_idps`` IDPs, with diagnosis) and ``generator.json`` (how to rebuild the
      generator, the patient shifts).

    Every value in the stats files comes from ``SyntheticCohort(n_idps=len(real_idp_names()), n_sites,
    seed)``, whose first ``n_idps`` IDPs are exactly ``SyntheticCohort(n_idps, n_sites, seed)``.
    Patients (a ``patients`` fraction of subjects) have the normal scores of :data:`PATIENT_SHIFTS` moved.
    The whole folder is built aside and moved into place, so a failed run leaves nothing behind.
    """
    n_subjects, sessions, n_sites = int(n_subjects), int(sessions), int(n_sites)
    catalogue = real_idp_names()
    n_idps = len(catalogue) if n_idps is None else int(n_idps)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if not 1 <= n_idps <= len(catalogue):
        raise ValueError(f"n_idps must be between 1 and {len(catalogue)} (the aseg and DK IDPs FreeSurfer "
                         f"files can hold), got {n_idps}")
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if str(fs_version) not in ("6", "7", "mixed"):
        raise ValueError(f"fs_version must be '7', '6' or 'mixed', got {fs_version!r}")
    if not 0.0 <= float(patients) <= 1.0:
        raise ValueError(f"patients must be a fraction between 0 and 1, got {patients}")

    gen = SyntheticCohort(n_idps=len(catalogue), n_sites=n_sites, seed=seed)
    subjects = gen.sample_covariates(n_subjects, seed)
    rng = np.random.default_rng([int(seed), 7])
    n_patients = int(round(float(patients) * n_subjects))
    diagnosis = np.full(n_subjects, "HC", dtype=object)
    diagnosis[rng.choice(n_subjects, size=n_patients, replace=False)] = "patient"
    subjects["diagnosis"] = diagnosis
    # "mixed": half FreeSurfer 6, half 7, in random order (both present from two participants on).
    versions = {"6": ["6"] * n_subjects, "7": ["7"] * n_subjects,
                "mixed": list(rng.permutation(np.resize(["6", "7"], n_subjects)))}[str(fs_version)]
    subjects["fs_version"] = versions

    # One row per visit; normal scores share a subject component across visits.
    visits = subjects.loc[subjects.index.repeat(sessions)].reset_index(drop=True)
    visit_number = np.tile(np.arange(sessions), n_subjects)
    intervals = rng.uniform(1.0, 3.0, size=(n_subjects, sessions))
    intervals[:, 0] = 0.0
    visits["age"] = np.round(visits["age"].to_numpy() + np.cumsum(intervals, axis=1).ravel(), 2)
    visits["session_id"] = [f"ses-{k + 1:02d}" for k in visit_number] if sessions > 1 else None
    chol = gen._chol
    z_subject = rng.standard_normal((n_subjects, len(catalogue))) @ chol.T
    z_visit = rng.standard_normal((len(visits), len(catalogue))) @ chol.T
    z = (np.sqrt(_SESSION_CORRELATION) * np.repeat(z_subject, sessions, axis=0)
         + np.sqrt(1.0 - _SESSION_CORRELATION) * z_visit)
    shift = _patient_shift(catalogue)
    z += np.where(visits["diagnosis"].to_numpy() == "patient", 1.0, 0.0)[:, None] * shift[None, :]
    values = pd.DataFrame(gen.idps_from_normal_scores(visits, z), columns=catalogue)
    values = _round_as_written(values)
    truth = gen.cdf(pd.concat([visits[["age", "sex", "site"]], values], axis=1))[catalogue[:n_idps]]

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, durable=False) as tmp:
        _write_raw(tmp, subjects, visits, sessions, seed)
        fs_root = tmp / "derivatives" / "freesurfer"
        _write_json(fs_root / "dataset_description.json", {
            "Name": "FreeSurfer outputs of the normdiff-bids synthetic cohort",
            "BIDSVersion": _BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "normdiff-synth", "Version": __version__,
                             "Description": "Synthetic stand-in for FreeSurfer recon-all outputs "
                                            "(stats files in the real formats, small images)"}],
        })
        surfaces = _icosphere(3)
        for i, visit in visits.iterrows():
            fs_label = visit["participant_id"] + (f"_{visit['session_id']}" if sessions > 1 else "")
            sub_rng = np.random.default_rng([int(seed), 8, i])
            _write_freesurfer_subject(fs_root / fs_label, fs_label, values.iloc[i], visit, sub_rng, surfaces)
        gt = tmp / GROUND_TRUTH_DIR
        ids = ["participant_id"] + (["session_id"] if sessions > 1 else [])
        table = pd.concat([visits[ids + ["age", "sex", "site", "diagnosis", "fs_version"]], truth], axis=1)
        _write_tsv(gt / "centiles.tsv", table, float_format="%.12g")
        _write_json(gt / "generator.json", {
            "generator": "normdiff_bids.data.synthetic.SyntheticCohort",
            "seed": int(seed), "n_sites": n_sites, "n_idps": n_idps,
            "n_idps_written": len(catalogue), "idps": catalogue[:n_idps],
            "families": gen.families[:n_idps], "sessions": sessions,
            "session_correlation": _SESSION_CORRELATION, "fs_version": str(fs_version),
            "patient_fraction": float(patients),
            "patient_shifts": {k: v for k, v in PATIENT_SHIFTS.items()},
            "centiles": "centiles.tsv holds, per visit, the true conditional centile F(value | age, sex, "
                        "site) of each written value under the healthy model; patients' values were "
                        "drawn with the normal scores of patient_shifts moved",
            "package_version": __version__,
        })
    return out_dir


def load_ground_truth(bids_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read what :func:`write_synthetic_dataset` recorded: (true centiles table, generator description).

    ``SyntheticCohort(meta["n_idps"], meta["n_sites"], meta["seed"])`` rebuilds the true model.
    """
    gt = Path(bids_dir) / GROUND_TRUTH_DIR
    table = pd.read_csv(gt / "centiles.tsv", sep="\t", dtype={"participant_id": str})
    meta = json.loads((gt / "generator.json").read_text())
    return table, meta


def _patient_shift(names: list[str]) -> np.ndarray:
    shift = np.zeros(len(names))
    for j, name in enumerate(names):
        for pattern, dz in PATIENT_SHIFTS.items():
            if fnmatch.fnmatchcase(name, pattern):
                shift[j] = dz
    return shift


def _round_as_written(values: pd.DataFrame) -> pd.DataFrame:
    """Round each IDP as FreeSurfer writes it: aseg 0.1 mm^3, area and volume 1, thickness 0.001 mm."""
    out = values.copy()
    for col in out.columns:
        decimals = 3 if col.endswith("_thickness") else (0 if col.endswith(("_area", "_volume")) else 1)
        out[col] = np.round(out[col].to_numpy(), decimals)
    return out


# -- raw BIDS ----------------------------------------------------------------------------------------------

_BIDS_VERSION = "1.10.0"


def _write_raw(root: Path, subjects: pd.DataFrame, visits: pd.DataFrame, sessions: int, seed: int) -> None:
    _write_json(root / "dataset_description.json", {
        "Name": "normdiff-bids synthetic cohort",
        "BIDSVersion": _BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["normdiff-bids developers"],
        "GeneratedBy": [{"Name": "normdiff-synth", "Version": __version__,
                         "Description": f"normdiff-synth --n-subjects {len(subjects)} --seed {seed}"}],
    })
    _write_text(root / "README", (
        "Synthetic cohort written by normdiff-synth (normdiff-bids).\n\n"
        "Covariates (age, sex, site) and FreeSurfer IDPs are drawn from a known model, so normative models\n"
        "fitted to these data can be checked against the truth. FreeSurfer-style outputs are in\n"
        "derivatives/freesurfer; the true centiles and the generator description are in\n"
        f"{GROUND_TRUTH_DIR.as_posix()}. The T1w images are tiny placeholders, not brain images.\n"
    ))
    _write_text(root / "CHANGES", "1.0.0 synthetic\n  - Written by normdiff-synth.\n")
    _write_tsv(root / "participants.tsv", subjects[["participant_id", "age", "sex", "site", "diagnosis"]])
    _write_json(root / "participants.json", {
        "age": {"Description": "age at the first visit" if sessions > 1 else "age at the scan",
                "Units": "year"},
        "sex": {"Description": "sex of the participant", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "acquisition site (scanner)"},
        "diagnosis": {"Description": "group", "Levels": {
            "HC": "healthy control", "patient": "synthetic patient with medial-temporal atrophy"}},
    })
    for _, visit in visits.iterrows():
        sub = visit["participant_id"]
        anat = root / sub
        stem = sub
        if sessions > 1:
            anat, stem = anat / visit["session_id"], f"{sub}_{visit['session_id']}"
        _write_t1w(anat / "anat" / f"{stem}_T1w.nii.gz")
    if sessions > 1:
        for sub, rows in visits.groupby("participant_id", sort=False):
            _write_tsv(root / sub / f"{sub}_sessions.tsv", rows[["session_id", "age"]])
        _write_json(root / "sessions.json", {"age": {"Description": "age at the visit", "Units": "year"}})


def _write_t1w(path: Path) -> None:
    data = np.zeros((8, 8, 8), dtype=np.int16)
    x, y, zz = np.mgrid[:8, :8, :8] - 3.5
    data[x**2 + y**2 + zz**2 < 12] = 100
    affine = np.diag([24.0, 24.0, 24.0, 1.0])
    affine[:3, 3] = -84.0
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


# -- FreeSurfer subject ------------------------------------------------------------------------------------

def _write_freesurfer_subject(subject_dir: Path, label: str, values: pd.Series, visit: pd.Series,
                              rng: np.random.Generator, surfaces: tuple[np.ndarray, np.ndarray]) -> None:
    version = str(visit["fs_version"])
    aseg = {name: float(values[name]) if name in values.index else 0.0 for name in ASEG_LABELS}
    regions = {hemi: {r: (float(values[f"{hemi}_{r}_thickness"]), float(values[f"{hemi}_{r}_area"]),
                          float(values[f"{hemi}_{r}_volume"])) for r in DK_REGIONS} for hemi in HEMISPHERES}
    measures = _global_measures(aseg, regions, float(visit["age"]), rng)
    stats = subject_dir / "stats"
    _write_text(stats / "aseg.stats", _format_aseg(label, aseg, measures, version, rng))
    _write_text(stats / "brainvol.stats", _format_brainvol(measures))
    for hemi in HEMISPHERES:
        _write_text(stats / f"{hemi}.aparc.stats",
                    _format_aparc(label, hemi, regions[hemi], measures, version, rng))
    _write_aparc_aseg(subject_dir / "mri" / "aparc+aseg.mgz", rng)
    vertices, faces = surfaces
    for hemi in HEMISPHERES:
        side = -1.0 if hemi == "lh" else 1.0
        coords = vertices * np.array([32.0, 68.0, 55.0]) + np.array([side * 36.0, -15.0, 10.0])
        (subject_dir / "surf").mkdir(parents=True, exist_ok=True)
        nib.freesurfer.write_geometry(str(subject_dir / "surf" / f"{hemi}.white"),
                                      coords.astype(np.float32), faces.astype(np.int32),
                                      create_stamp=f"created by normdiff-synth for {label}")
        _write_annot(subject_dir / "label" / f"{hemi}.aparc.annot", vertices, rng)


_SUBCORTICAL_GRAY = ("Thalamus", "Caudate", "Putamen", "Pallidum", "Hippocampus", "Amygdala",
                     "Accumbens-area", "VentralDC")
_VENTRICLES = ("Left-Lateral-Ventricle", "Right-Lateral-Ventricle", "Left-Inf-Lat-Vent",
               "Right-Inf-Lat-Vent", "3rd-Ventricle", "4th-Ventricle", "5th-Ventricle", "Left-choroid-plexus",
               "Right-choroid-plexus")


def _global_measures(aseg: dict[str, float], regions: dict, age: float,
                     rng: np.random.Generator) -> dict[str, float]:
    """Whole-brain measures consistent with the structure volumes, as FreeSurfer derives them."""
    m: dict[str, float] = {}
    for hemi in HEMISPHERES:
        m[f"{hemi}Cortex"] = sum(v for _, _, v in regions[hemi].values()) * rng.uniform(0.99, 1.01)
        wm_age = np.exp(-0.12 * ((age - 45.0) / 40.0) ** 2)
        m[f"{hemi}CerebralWhiteMatter"] = m[f"{hemi}Cortex"] * rng.uniform(0.9, 1.05) * wm_age
    m["Cortex"] = m["lhCortex"] + m["rhCortex"]
    m["CerebralWhiteMatter"] = m["lhCerebralWhiteMatter"] + m["rhCerebralWhiteMatter"]
    m["SubCortGray"] = sum(aseg[f"{side}-{s}"] for side in ("Left", "Right") for s in _SUBCORTICAL_GRAY)
    cerebellum_gray = aseg["Left-Cerebellum-Cortex"] + aseg["Right-Cerebellum-Cortex"]
    cerebellum_white = aseg["Left-Cerebellum-White-Matter"] + aseg["Right-Cerebellum-White-Matter"]
    m["TotalGray"] = m["Cortex"] + m["SubCortGray"] + cerebellum_gray
    m["VentricleChoroidVol"] = sum(aseg[s] for s in _VENTRICLES)
    corpus_callosum = sum(v for k, v in aseg.items() if k.startswith("CC_"))
    m["BrainSeg"] = (m["TotalGray"] + m["CerebralWhiteMatter"] + cerebellum_white + aseg["Brain-Stem"]
                     + m["VentricleChoroidVol"] + corpus_callosum + aseg["WM-hypointensities"])
    m["BrainSegNotVent"] = m["BrainSeg"] - m["VentricleChoroidVol"]
    m["SupraTentorial"] = m["BrainSeg"] - cerebellum_gray - cerebellum_white - aseg["Brain-Stem"]
    m["SupraTentorialNotVent"] = m["SupraTentorial"] - m["VentricleChoroidVol"]
    ratio = np.clip(0.83 - 0.0022 * max(age - 20.0, 0.0) + rng.normal(0.0, 0.02), 0.55, 0.92)
    m["eTIV"] = m["BrainSeg"] / ratio
    m["Mask"] = m["eTIV"] * rng.uniform(1.1, 1.25)
    holes = rng.poisson(20, size=2)
    m["lhSurfaceHoles"], m["rhSurfaceHoles"] = float(holes[0]), float(holes[1])
    m["SurfaceHoles"] = float(holes.sum())
    # The values as written (6 decimals), so derived ratios match what a reader recomputes.
    return {k: round(v, 6) for k, v in m.items()}


def _measure_lines(m: dict[str, float], kind: str, version: str = "7") -> list[str]:
    """``# Measure`` lines in FreeSurfer's order for ``aseg``, ``brainvol`` or ``aparc`` stats files."""
    f = "{:.12f}" if kind == "brainvol" else "{:.6f}"
    rows = {
        "BrainSeg": ("BrainSeg", "BrainSegVol", "Brain Segmentation Volume", m["BrainSeg"], "mm^3"),
        "BrainSegNotVent": ("BrainSegNotVent", "BrainSegVolNotVent", "Brain Segmentation Volume Without "
                            "Ventricles", m["BrainSegNotVent"], "mm^3"),
        "BrainSegNotVentSurf": ("BrainSegNotVentSurf", "BrainSegVolNotVentSurf", "Brain Segmentation Volume "
                                "Without Ventricles from Surf", m["BrainSegNotVent"], "mm^3"),
        "VentricleChoroidVol": ("VentricleChoroidVol", "VentricleChoroidVol", "Volume of ventricles and "
                                "choroid plexus", m["VentricleChoroidVol"], "mm^3"),
        "lhCortex": ("lhCortex", "lhCortexVol", "Left hemisphere cortical gray matter volume", m["lhCortex"],
                     "mm^3"),
        "rhCortex": ("rhCortex", "rhCortexVol", "Right hemisphere cortical gray matter volume", m["rhCortex"],
                     "mm^3"),
        "Cortex": ("Cortex", "CortexVol", "Total cortical gray matter volume", m["Cortex"], "mm^3"),
        "lhCerebralWhiteMatter": ("lhCerebralWhiteMatter", "lhCerebralWhiteMatterVol", "Left hemisphere "
                                  "cerebral white matter volume", m["lhCerebralWhiteMatter"], "mm^3"),
        "rhCerebralWhiteMatter": ("rhCerebralWhiteMatter", "rhCerebralWhiteMatterVol", "Right hemisphere "
                                  "cerebral white matter volume", m["rhCerebralWhiteMatter"], "mm^3"),
        "CerebralWhiteMatter": ("CerebralWhiteMatter", "CerebralWhiteMatterVol", "Total cerebral white "
                                "matter volume", m["CerebralWhiteMatter"], "mm^3"),
        "SubCortGray": ("SubCortGray", "SubCortGrayVol", "Subcortical gray matter volume", m["SubCortGray"],
                        "mm^3"),
        "TotalGray": ("TotalGray", "TotalGrayVol", "Total gray matter volume", m["TotalGray"], "mm^3"),
        "SupraTentorial": ("SupraTentorial", "SupraTentorialVol", "Supratentorial volume",
                           m["SupraTentorial"], "mm^3"),
        "SupraTentorialNotVent": ("SupraTentorialNotVent", "SupraTentorialVolNotVent", "Supratentorial "
                                  "volume", m["SupraTentorialNotVent"], "mm^3"),
        "SupraTentorialNotVentVox": ("SupraTentorialNotVentVox", "SupraTentorialVolNotVentVox",
                                     "Supratentorial volume voxel count", m["SupraTentorialNotVent"], "mm^3"),
        "Mask": ("Mask", "MaskVol", "Mask Volume", m["Mask"], "mm^3"),
        "BrainSegVol-to-eTIV": ("BrainSegVol-to-eTIV", "BrainSegVol-to-eTIV", "Ratio of BrainSegVol to eTIV",
                                m["BrainSeg"] / m["eTIV"], "unitless"),
        "MaskVol-to-eTIV": ("MaskVol-to-eTIV", "MaskVol-to-eTIV", "Ratio of MaskVol to eTIV",
                            m["Mask"] / m["eTIV"], "unitless"),
        "lhSurfaceHoles": ("lhSurfaceHoles", "lhSurfaceHoles", "Number of defect holes in lh surfaces prior "
                           "to fixing", m["lhSurfaceHoles"], "unitless"),
        "rhSurfaceHoles": ("rhSurfaceHoles", "rhSurfaceHoles", "Number of defect holes in rh surfaces prior "
                           "to fixing", m["rhSurfaceHoles"], "unitless"),
        "SurfaceHoles": ("SurfaceHoles", "SurfaceHoles", "Total number of defect holes in surfaces prior to "
                         "fixing", m["SurfaceHoles"], "unitless"),
        "eTIV": ("EstimatedTotalIntraCranialVol", "eTIV", "Estimated Total Intracranial Volume", m["eTIV"],
                 "mm^3"),
    }
    order = {
        "aseg": ["BrainSeg", "BrainSegNotVent", "VentricleChoroidVol", "lhCortex", "rhCortex", "Cortex",
                 "lhCerebralWhiteMatter", "rhCerebralWhiteMatter", "CerebralWhiteMatter", "SubCortGray",
                 "TotalGray", "SupraTentorial", "SupraTentorialNotVent", "Mask", "BrainSegVol-to-eTIV",
                 "MaskVol-to-eTIV", "lhSurfaceHoles", "rhSurfaceHoles", "SurfaceHoles", "eTIV"],
        "brainvol": ["BrainSeg", "BrainSegNotVent", "SupraTentorial", "SupraTentorialNotVent", "SubCortGray",
                     "lhCortex", "rhCortex", "Cortex", "TotalGray", "lhCerebralWhiteMatter",
                     "rhCerebralWhiteMatter", "CerebralWhiteMatter", "Mask", "SupraTentorialNotVentVox",
                     "BrainSegNotVentSurf", "VentricleChoroidVol"],
        "aparc": ["BrainSeg", "BrainSegNotVent", "BrainSegNotVentSurf", "Cortex", "SupraTentorial",
                  "SupraTentorialNotVent", "eTIV"],
    }[kind]
    lines = []
    for key in order:
        short, name, description, value, units = rows[key]
        number = f"{int(value)}" if "Holes" in key else f.format(value)
        if kind == "aparc" and key == "Cortex" and version == "6":
            # FreeSurfer 6 mris_anatomical_stats drops the comma after this measure's name.
            lines.append(f"# Measure {short}, {name} {description}, {number}, {units}")
        else:
            lines.append(f"# Measure {short}, {name}, {description}, {number}, {units}")
    return lines


def _table_col_lines(columns: list[tuple[str, str, str]]) -> list[str]:
    lines = [f"# NTableCols {len(columns)}"]
    for i, (header, field_name, units) in enumerate(columns, start=1):
        lines += [f"# TableCol {i:2d} ColHeader {header}", f"# TableCol {i:2d} FieldName {field_name}",
                  f"# TableCol {i:2d} Units     {units}"]
    return lines


def _format_aseg(label: str, aseg: dict[str, float], m: dict[str, float], version: str,
                 rng: np.random.Generator) -> str:
    names = {n: (FS7_TO_FS6.get(n, n) if version == "6" else n) for n in ASEG_LABELS}
    lines = [
        "# Title Segmentation Statistics ", "# ", "# generating_program mri_segstats",
        f"# cvs_version {_FS_HEADERS[version]['segstats']}",
        f"# cmdline mri_segstats --seed 1234 --seg mri/aseg.mgz --sum stats/aseg.stats --pv mri/norm.mgz "
        f"--empty --brainmask mri/brainmask.mgz --brain-vol-from-seg --excludeid 0 --excl-ctxgmwm "
        f"--supratent --subcortgray --in mri/norm.mgz --in-intensity-name norm --in-intensity-units MR "
        f"--etiv --surf-wm-vol --surf-ctx-vol --totalgray --euler --ctab ASegStatsLUT.txt --subject {label} ",
        "# sysname  Linux", "# hostname normdiff-synth", "# machine  x86_64", "# user     synthetic",
        "# anatomy_type volume", "# ", "# SUBJECTS_DIR derivatives/freesurfer", f"# subjectname {label}",
        "# BrainVolStatsFixed-NotNeeded because voxelvolume=1mm3",
        *_measure_lines(m, "aseg", version),
        "# SegVolFile mri/aseg.mgz ", "# ColorTable ASegStatsLUT.txt ", "# InVolFile  mri/norm.mgz ",
        "# InVolFrame 0 ", "# PVVolFile  mri/norm.mgz ", "# Excluding Cortical Gray and White Matter",
        "# ExcludeSegId 0 2 3 41 42 ", "# VoxelVolume_mm3 1 ",
    ]
    columns = [("Index", "Index", "NA"), ("SegId", "Segmentation Id", "NA"),
               ("NVoxels", "Number of Voxels", "unitless"), ("Volume_mm3", "Volume", "mm^3"),
               ("StructName", "Structure Name", "NA"), ("normMean", "Intensity normMean", "MR"),
               ("normStdDev", "Itensity normStdDev", "MR"), ("normMin", "Intensity normMin", "MR"),
               ("normMax", "Intensity normMax", "MR"), ("normRange", "Intensity normRange", "MR")]
    table_cols = _table_col_lines(columns)
    lines += table_cols[1:] + [f"# NRows {len(ASEG_LABELS)} ", table_cols[0] + " ",
                               "# ColHeaders  Index SegId NVoxels Volume_mm3 StructName normMean normStdDev "
                               "normMin normMax normRange  "]
    for i, (name, seg_id) in enumerate(ASEG_LABELS.items(), start=1):
        volume = aseg[name]
        if volume > 0:
            n_vox = int(round(volume * rng.uniform(0.97, 1.03)))
            mean = rng.uniform(40.0, 100.0)
            sd, lo = rng.uniform(3.0, 15.0), rng.uniform(10.0, 40.0)
            hi = min(255.0, mean + rng.uniform(15.0, 40.0))
        else:
            n_vox, mean, sd, lo, hi = 0, 0.0, 0.0, 0.0, 0.0
        lines.append(f"{i:3d} {seg_id:3d} {n_vox:9d} {volume:10.1f}  {names[name]:<32s} {mean:10.4f} "
                     f"{sd:10.4f} {round(lo):10.4f} {round(hi):10.4f} {round(hi) - round(lo):10.4f} ")
    return "\n".join(lines) + "\n"


def _format_brainvol(m: dict[str, float]) -> str:
    return "\n".join(_measure_lines(m, "brainvol")) + "\n"


def _format_aparc(label: str, hemi: str, regions: dict[str, tuple[float, float, float]], m: dict[str, float],
                  version: str, rng: np.random.Generator) -> str:
    total_area = sum(a for _, a, _ in regions.values())
    mean_thickness = sum(t * a for t, a, _ in regions.values()) / total_area
    n_vert = {r: int(round(a * rng.uniform(1.35, 1.55))) for r, (_, a, _) in regions.items()}
    lines = [
        "# Table of FreeSurfer cortical parcellation anatomical statistics ", "# ",
        "# CreationTime 2024/01/01-00:00:00-GMT", "# generating_program mris_anatomical_stats",
        f"# cvs_version {_FS_HEADERS[version]['surface']}",
        f"# mrisurf.c-cvs_version {_FS_HEADERS[version]['surface']}",
        f"# cmdline mris_anatomical_stats -th3 -mgz -cortex ../label/{hemi}.cortex.label -f "
        f"../stats/{hemi}.aparc.stats -b -a ../label/{hemi}.aparc.annot -c ../label/aparc.annot.ctab {label} "
        f"{hemi} white ",
        "# sysname  Linux", "# hostname normdiff-synth", "# machine  x86_64", "# user     synthetic", "# ",
        "# SUBJECTS_DIR derivatives/freesurfer", "# anatomy_type surface", f"# subjectname {label}",
        f"# hemi {hemi}", f"# AnnotationFile ../label/{hemi}.aparc.annot",
        "# AnnotationFileTimeStamp 2024/01/01 00:00:00",
        f"# Measure Cortex, NumVert, Number of Vertices, {sum(n_vert.values())}, unitless",
        f"# Measure Cortex, WhiteSurfArea, White Surface Total Area, {total_area:.6g}, mm^2",
        f"# Measure Cortex, MeanThickness, Mean Thickness, {mean_thickness:.6g}, mm",
        *_measure_lines(m, "aparc", version),
    ]
    lines += _table_col_lines([
        ("StructName", "Structure Name", "NA"), ("NumVert", "Number of Vertices", "unitless"),
        ("SurfArea", "Surface Area", "mm^2"), ("GrayVol", "Gray Matter Volume", "mm^3"),
        ("ThickAvg", "Average Thickness", "mm"), ("ThickStd", "Thickness StdDev", "mm"),
        ("MeanCurv", "Integrated Rectified Mean Curvature", "mm^-1"),
        ("GausCurv", "Integrated Rectified Gaussian Curvature", "mm^-2"),
        ("FoldInd", "Folding Index", "unitless"), ("CurvInd", "Intrinsic Curvature Index", "unitless")])
    lines.append("# ColHeaders StructName NumVert SurfArea GrayVol ThickAvg ThickStd MeanCurv GausCurv "
                 "FoldInd CurvInd")
    for region, (thickness, area, volume) in regions.items():
        lines.append(
            f"{region:<40s} {n_vert[region]:5d} {int(area):6d} {int(volume):6d} {thickness:6.3f} "
            f"{thickness * rng.uniform(0.15, 0.25):5.3f} {rng.uniform(0.09, 0.15):9.3f} "
            f"{rng.uniform(0.01, 0.04):9.3f} {int(round(area * rng.uniform(0.005, 0.015))):8d} "
            f"{area * rng.uniform(0.0005, 0.0015):7.1f}")
    return "\n".join(lines) + "\n"


# -- images and surfaces -----------------------------------------------------------------------------------

_MGZ_SHAPE = 32
_MGZ_VOXEL_MM = 6.0


def _write_aparc_aseg(path: Path, rng: np.random.Generator) -> None:
    """A small ``aparc+aseg.mgz``: every label of :func:`aparc_aseg_labels` present as a compact blob.

    An ellipsoidal brain: a cortical ribbon (DK labels, split by hemisphere), white matter beneath it,
    and a core of aseg structures (left ones on the left, right ones on the right, midline ones between).
    Inside each zone voxels go to the nearest of that zone's label seeds, so every label owns its seed.
    """
    n = _MGZ_SHAPE
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij"), axis=-1)
    centre, radii = (n - 1) / 2.0, np.array([13.0, 15.0, 12.0])
    # Voxel axes follow FreeSurfer's conformed LIA orientation: axis 0 runs right-to-left.
    rel = (grid - centre) / radii
    r = np.sqrt((rel**2).sum(-1))
    left = grid[..., 0] > centre  # LIA: larger first index is further left
    x_mm = np.abs(grid[..., 0] - centre)
    labels = aparc_aseg_labels()
    zones = {
        "ctx-lh": (r < 1.0) & (r >= 0.78) & left,
        "ctx-rh": (r < 1.0) & (r >= 0.78) & ~left,
        "wm-lh": (r < 0.78) & (r >= 0.6) & left,
        "wm-rh": (r < 0.78) & (r >= 0.6) & ~left,
        "mid": (r < 0.6) & (x_mm < 1.6),
        "core-lh": (r < 0.6) & (x_mm >= 1.6) & left,
        "core-rh": (r < 0.6) & (x_mm >= 1.6) & ~left,
    }
    members: dict[str, list[int]] = {z: [] for z in zones}
    for name, label_id in labels.items():
        if name.startswith("ctx-lh-"):
            members["ctx-lh"].append(label_id)
        elif name.startswith("ctx-rh-"):
            members["ctx-rh"].append(label_id)
        elif name == "Left-Cerebral-White-Matter":
            members["wm-lh"].append(label_id)
        elif name == "Right-Cerebral-White-Matter":
            members["wm-rh"].append(label_id)
        elif name.startswith("Left-"):
            members["core-lh"].append(label_id)
        elif name.startswith("Right-"):
            members["core-rh"].append(label_id)
        else:
            members["mid"].append(label_id)
    volume = np.zeros((n, n, n), dtype=np.int32)
    for zone, mask in zones.items():
        ids = np.array(members[zone], dtype=np.int32)
        where = np.argwhere(mask)
        seeds = where[rng.choice(len(where), size=len(ids), replace=False)].astype(float)
        dist = ((where[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
        volume[tuple(where.T)] = ids[np.argmin(dist, axis=1)]
    s = _MGZ_VOXEL_MM
    half = s * n / 2.0
    affine = np.array([[-s, 0.0, 0.0, half], [0.0, 0.0, s, -half], [0.0, -s, 0.0, half],
                       [0.0, 0.0, 0.0, 1.0]])
    img = nib.MGHImage(volume, affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _icosphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere (vertices [V, 3], faces [F, 3], outward-facing): 642 vertices at 3 subdivisions."""
    t = (1.0 + np.sqrt(5.0)) / 2.0
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5),
             (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]
    vertices = [np.array(v, dtype=float) / np.linalg.norm(v) for v in verts]

    def midpoint(a: int, b: int, cache: dict[tuple[int, int], int]) -> int:
        key = (min(a, b), max(a, b))
        if key not in cache:
            mid = vertices[a] + vertices[b]
            vertices.append(mid / np.linalg.norm(mid))
            cache[key] = len(vertices) - 1
        return cache[key]

    for _ in range(subdivisions):
        cache: dict[tuple[int, int], int] = {}
        new_faces = []
        for a, b, c in faces:
            ab, bc, ca = midpoint(a, b, cache), midpoint(b, c, cache), midpoint(c, a, cache)
            new_faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new_faces
    return np.array(vertices), np.array(faces, dtype=np.int32)


def _write_annot(path: Path, unit_vertices: np.ndarray, rng: np.random.Generator) -> None:
    """``?h.aparc.annot`` with the DK colour table; each of the 34 regions owns a patch of vertices."""
    region_index = np.array([DK_CTAB.index(r) for r in DK_REGIONS])
    seeds = unit_vertices[rng.choice(len(unit_vertices), size=len(DK_REGIONS), replace=False)]
    nearest = np.argmax(unit_vertices @ seeds.T, axis=1)
    vertex_labels = region_index[nearest].astype(np.int32)
    ctab = np.array([[*DK_RGB[name], 0, 0] for name in DK_CTAB], dtype=np.int32)
    ctab[:, 4] = ctab[:, 0] + ctab[:, 1] * 256 + ctab[:, 2] * 65536
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.freesurfer.write_annot(str(path), vertex_labels, ctab, list(DK_CTAB), fill_ctab=False)


# -- small writers (inside the dataset's temporary folder, which atomic_directory moves into place) --------

def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json_text(obj))


def _write_tsv(path: Path, table: pd.DataFrame, float_format: str | None = None) -> None:
    _write_text(path, tsv_text(table, float_format))
