"""Calibration on held-out reference controls (split-conformal): monotone maps of the model's centiles.

A model's centiles can be systematically too wide, too narrow or shifted where training data were few.
Reference controls that neither trained the model nor chose its checkpoint are exchangeable with the
controls it will score, so their centiles show the miscalibration directly: a calibrated model gives
them uniform centiles.

:class:`ProbitMap` is one monotone map ``u -> Phi(g(Phi^-1(u)))`` with ``g`` piecewise linear through
the held-out normal scores' quantiles (so ``g`` sends them to the normal quantiles) and linear beyond
the outer knots (tails stay Gaussian-like, z-scores stay finite). Its knots are as many as the held-out
sample supports (one per ~25 values, between 2 and 99; none below 20 values), so a few dozen controls
give a near-affine correction and thousands a free-form one. Applied to held-out data it is the
split-conformal recalibration of the empirical CDF, smoothed.

:class:`CentileCalibration` holds the maps a model uses: one for the per-IDP centiles pooled over IDPs,
one per site with enough held-out controls, and one for the joint deviation's centile. It is stored in
the model bundle as plain numbers.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from normdiff_bids.scoring.centiles import CENTILE_FLOOR

__all__ = ["CentileCalibration", "ProbitMap", "MIN_SITE_CONTROLS"]

#: Held-out controls a site needs for a map of its own (fewer: the pooled map serves it).
MIN_SITE_CONTROLS = 50
#: Held-out values per knot of a map, and the knot count's bounds.
VALUES_PER_KNOT = 25
MAX_KNOTS = 99
#: Fewest held-out values a map is learnt from (20 give a near-affine map in probit space).
MIN_VALUES = 20
#: Fewest unseen values that may correct a map (:meth:`ProbitMap.corrected`): on the synthetic regime
#: cohorts 20 unseen controls corrected by noise (held-out joint KS 0.08 -> 0.14 at N=200), 50 and 100
#: corrected real bias (0.17 -> 0.05 at N=500, D=100; 0.07 -> 0.04 at N=1000, D=20).
MIN_CHECK_VALUES = 40


class ProbitMap:
    """A monotone map of centiles learned from held-out centiles ``u`` (which it makes uniform)."""

    def __init__(self, x: np.ndarray | None = None, y: np.ndarray | None = None):
        # identity unless fitted: g(z) = z
        self.x = np.array([-1.0, 1.0]) if x is None else np.asarray(x, dtype=np.float64)
        self.y = np.array([-1.0, 1.0]) if y is None else np.asarray(y, dtype=np.float64)

    @classmethod
    def fit(cls, centiles: np.ndarray) -> ProbitMap:
        u = np.asarray(centiles, dtype=np.float64).ravel()
        u = u[np.isfinite(u)]
        if len(u) < MIN_VALUES:
            return cls()
        n_knots = int(np.clip(len(u) // VALUES_PER_KNOT, 2, MAX_KNOTS))
        # knots at probabilities p_k spread over the range the sample resolves
        edge = max(1.0 / (n_knots + 1), 2.0 / len(u))
        p = np.linspace(edge, 1 - edge, n_knots)
        x = np.quantile(ndtri(np.clip(u, CENTILE_FLOOR, 1 - CENTILE_FLOOR)), p)
        y = ndtri(p)
        keep = np.concatenate([[True], np.diff(x) > 1e-9])  # ties (discrete centiles) give one knot
        return cls(x[keep], y[keep]) if keep.sum() >= 2 else cls()

    def _slopes(self) -> tuple[float, float]:
        """Slopes of the linear tails: over the outer tenth of the knots, not the last pair, whose
        quantiles are the noisiest (two adjacent outer knots from 2,000 values put the slope 20-40%
        off and stretched every tail z-score by as much)."""
        k = max(1, len(self.x) // 10)
        lo = (self.y[k] - self.y[0]) / (self.x[k] - self.x[0])
        hi = (self.y[-1] - self.y[-1 - k]) / (self.x[-1] - self.x[-1 - k])
        return lo, hi

    def transform_z(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float64)
        lo, hi = self._slopes()
        out = np.interp(z, self.x, self.y)
        out = np.where(z < self.x[0], self.y[0] + lo * (z - self.x[0]), out)
        return np.where(z > self.x[-1], self.y[-1] + hi * (z - self.x[-1]), out)

    def inverse_z(self, z: np.ndarray) -> np.ndarray:
        return ProbitMap(self.y, self.x).transform_z(z)

    def transform(self, centiles: np.ndarray) -> np.ndarray:
        """Calibrated centiles (NaN stays NaN), strictly inside (0, 1)."""
        u = np.clip(np.asarray(centiles, dtype=np.float64), CENTILE_FLOOR, 1 - CENTILE_FLOOR)
        out = ndtr(self.transform_z(ndtri(u)))
        return np.clip(out, CENTILE_FLOOR, 1 - CENTILE_FLOOR)

    def inverse(self, centiles: np.ndarray) -> np.ndarray:
        """The model centile whose calibrated centile is ``centiles``."""
        u = np.clip(np.asarray(centiles, dtype=np.float64), CENTILE_FLOOR, 1 - CENTILE_FLOOR)
        return np.clip(ndtr(self.inverse_z(ndtri(u))), CENTILE_FLOOR, 1 - CENTILE_FLOOR)

    def corrected(self, held_out: np.ndarray) -> ProbitMap:
        """This map, followed by the affine correction in probit space that makes ``held_out`` centiles
        (of data this map was not learnt from) standard normal in mean and spread.

        It lets a map learnt from many slightly biased values be checked and corrected by a few unbiased
        ones. The correction is always applied (from :data:`MIN_CHECK_VALUES` values on): with a map
        whose bias is systematic, a 2-standard-error threshold left real shifts uncorrected (synthetic
        N=500, D=100, 20 sites, 50 unseen controls, three seeds: held-out joint KS 0.132, 0.136, 0.031
        with the threshold, 0.061, 0.066, 0.031 always corrected; N=1000, D=20: 0.039 and 0.055 against
        0.040 and 0.057, the noise the few unseen values add).
        """
        u = np.asarray(held_out, dtype=np.float64).ravel()
        u = u[np.isfinite(u)]
        if len(u) < MIN_CHECK_VALUES:
            return self
        z = self.transform_z(ndtri(np.clip(u, CENTILE_FLOOR, 1 - CENTILE_FLOOR)))
        shift, spread = float(z.mean()), float(z.std(ddof=1))
        if not spread > 0:
            return self
        return ProbitMap(self.x, (self.y - shift) / spread)

    @property
    def is_identity(self) -> bool:
        return bool(np.allclose(self.x, self.y))

    def to_dict(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ProbitMap:
        x, y = np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2 or np.any(np.diff(x) <= 0) or np.any(
                np.diff(y) <= 0) or not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise ValueError("a calibration map needs two increasing, finite knot lists of equal length")
        return cls(x, y)


class CentileCalibration:
    """The calibration layer of a model: per-IDP centile maps (pooled, or per site) and a joint map.

    >>> cal = CentileCalibration.fit(u_heldout [n, D], site_codes [n], joint_u_heldout [n])
    >>> u_cal = cal.transform(u [R, D], site_codes [R]); j_cal = cal.transform_joint(j [R])
    """

    def __init__(self, pooled: ProbitMap, sites: dict[int, ProbitMap], joint: ProbitMap, n_controls: int,
                 site_controls: dict[int, int] | None = None):
        self.pooled = pooled
        self.sites = dict(sites)
        self.joint = joint
        self.n_controls = int(n_controls)
        self.site_controls = dict(site_controls or {})

    @classmethod
    def fit(cls, centiles: np.ndarray, sites: np.ndarray, joint_centiles: np.ndarray | None = None,
            min_site_controls: int = MIN_SITE_CONTROLS,
            joint_unseen: np.ndarray | None = None) -> CentileCalibration:
        """Maps from held-out ``centiles [n, D]`` of controls at ``sites [n]`` and their joint centiles;
        ``joint_unseen``: joint centiles of controls no part of the model has seen, which check (and
        correct) the joint map (:meth:`ProbitMap.corrected`)."""
        centiles = np.asarray(centiles, dtype=np.float64)
        sites = np.asarray(sites, dtype=np.int64).reshape(-1)
        counts = {int(s): int((sites == s).sum()) for s in np.unique(sites)}
        own = {s: ProbitMap.fit(centiles[sites == s]) for s, n in counts.items()
               if n >= min_site_controls and s >= 0}
        joint = ProbitMap.fit(joint_centiles) if joint_centiles is not None else ProbitMap()
        if joint_unseen is not None:
            joint = joint.corrected(joint_unseen)
        return cls(ProbitMap.fit(centiles), own, joint, len(centiles), counts)

    def _map_rows(self, sites: np.ndarray):
        sites = np.asarray(sites, dtype=np.int64).reshape(-1)
        for code in np.unique(sites):
            yield sites == code, self.sites.get(int(code), self.pooled)

    def transform(self, centiles: np.ndarray, sites: np.ndarray) -> np.ndarray:
        out = np.array(centiles, dtype=np.float64)
        for rows, mapping in self._map_rows(sites):
            out[rows] = mapping.transform(out[rows])
        return out

    def inverse(self, centiles: np.ndarray, sites: np.ndarray) -> np.ndarray:
        """Model centiles of the calibrated ``centiles [R, ...]`` of each row."""
        out = np.array(centiles, dtype=np.float64)
        for rows, mapping in self._map_rows(sites):
            out[rows] = mapping.inverse(out[rows])
        return out

    def transform_joint(self, centiles: np.ndarray) -> np.ndarray:
        return self.joint.transform(centiles)

    def to_dict(self) -> dict:
        return {"n_controls": self.n_controls,
                "site_controls": {str(k): v for k, v in self.site_controls.items()},
                "pooled": self.pooled.to_dict(), "joint": self.joint.to_dict(),
                "sites": {str(k): m.to_dict() for k, m in self.sites.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> CentileCalibration:
        return cls(ProbitMap.from_dict(data["pooled"]),
                   {int(k): ProbitMap.from_dict(m) for k, m in data["sites"].items()},
                   ProbitMap.from_dict(data["joint"]), int(data["n_controls"]),
                   {int(k): int(v) for k, v in data.get("site_controls", {}).items()})

    def summary(self) -> dict:
        """What the model card shows: how many controls calibrated it, and which sites have own maps."""
        return {"n_controls": self.n_controls, "sites_with_own_map": sorted(self.sites),
                "pooled_is_identity": self.pooled.is_identity, "joint_is_identity": self.joint.is_identity}
