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
then a correction of each IDP's own (:func:`shrunk_maps`), and one map for the joint deviation's
centile. Each IDP's correction is measured at a few central levels and shrunk towards none by empirical
Bayes over the IDPs: where the IDPs' held-out quantiles scatter around the pooled ones no more than
their sampling error, every correction is nil; where the model gets some IDPs' shapes wrong, those are
corrected in proportion to how far beyond chance they lie. It is stored in the model bundle as plain
numbers. (Bundles of earlier versions may also hold per-site maps, which replace the pooled map for
their site; they are applied as they were learnt.)
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri

from normdiff_bids.scoring.centiles import CENTILE_FLOOR, normal_pdf

__all__ = ["CentileCalibration", "ProbitMap", "shrunk_maps"]

#: Held-out values per knot of a map, and the knot count's bounds.
VALUES_PER_KNOT = 25
MAX_KNOTS = 99
#: Fewest held-out values a map is learnt from (20 give a near-affine map in probit space).
MIN_VALUES = 20
#: Fewest unseen values that may correct a map (:meth:`ProbitMap.corrected`): on the synthetic regime
#: cohorts 20 unseen controls corrected by noise (held-out joint KS 0.08 -> 0.14 at N=200), 50 and 100
#: corrected real bias (0.17 -> 0.05 at N=500, D=100; 0.07 -> 0.04 at N=1000, D=20).
MIN_CHECK_VALUES = 40
#: Probability levels at which each IDP's own correction is measured (:func:`shrunk_maps`); beyond the
#: outer ones the correction stays the outer shift (the pooled map has set the tails' slope).
IDP_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
#: Probit of the knots that carry the outer shifts out to the tails (slope 1 beyond the levels).
_OUTER_Z = 6.0
#: An IDP's own correction the model card names: a shift above this many probit units at some level.
NOTABLE_SHIFT = 0.05


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

    def shifted(self, shift: float) -> ProbitMap:
        """This map with ``shift`` subtracted from its output in probit space: for values that lie
        ``shift`` higher than those the map was learnt from."""
        if self.is_identity or shift == 0:
            return self
        return ProbitMap(self.x, self.y - float(shift))

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


def shrunk_maps(centiles: np.ndarray, levels=IDP_LEVELS) -> list[ProbitMap]:
    """One map per column of held-out ``centiles [n, D]``: the shift of the column's probit quantiles at
    ``levels`` from the normal ones, shrunk towards 0 by empirical Bayes over the columns.

    At level ``p`` a column's quantile of ``n`` values has sampling variance ``s2 = p (1 - p) / (n
    phi(t)^2)`` (``t = Phi^-1(p)``); the columns' true shifts are taken to scatter with variance
    ``tau2``, estimated as the mean squared shift less the mean ``s2`` (at least 0), and each shift is
    multiplied by ``tau2 / (tau2 + s2)``. So shifts no larger than chance give identity maps, and a
    column with few values is corrected less than one with many. A column with fewer than
    :data:`MIN_VALUES` values gets the identity.
    """
    u = np.asarray(centiles, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    t = ndtri(levels)
    z = ndtri(np.clip(u, CENTILE_FLOOR, 1 - CENTILE_FLOOR))
    n = np.isfinite(z).sum(axis=0)
    used = n >= MIN_VALUES
    if not used.any():
        return [ProbitMap() for _ in range(u.shape[1])]
    shift = np.zeros((u.shape[1], len(levels)))
    for j in np.flatnonzero(used):
        shift[j] = np.quantile(z[np.isfinite(z[:, j]), j], levels) - t
    s2 = levels * (1 - levels) / (np.maximum(n, 1)[:, None] * normal_pdf(t) ** 2)
    tau2 = np.maximum(0.0, np.mean(shift[used] ** 2, axis=0) - np.mean(s2[used], axis=0))
    shift = np.where(used[:, None], shift * tau2 / (tau2 + s2), 0.0)
    maps = []
    for d in shift:
        x = np.concatenate([[-_OUTER_Z + d[0]], t + d, [_OUTER_Z + d[-1]]])
        y = np.concatenate([[-_OUTER_Z], t, [_OUTER_Z]])
        maps.append(ProbitMap(x, y) if np.any(d != 0) and np.all(np.diff(x) > 0) else ProbitMap())
    return maps


class CentileCalibration:
    """The calibration layer of a model: a pooled centile map, each IDP's shrunk correction after it, and
    a joint map.

    >>> cal = CentileCalibration.fit(u_heldout [n, D], site_codes [n], joint_u_heldout [n])
    >>> u_cal = cal.transform(u [R, D], site_codes [R]); j_cal = cal.transform_joint(j [R])

    ``sites`` holds per-site maps of bundles from earlier versions (each replaces the pooled map for its
    site); :meth:`fit` learns none: on every cohort measured the sites' held-out quantiles scattered no
    more than chance around the pooled ones once the location-scale stage had its site effects, and maps
    of their own made the per-site calibration worse on real data (``docs/method.md``, section 3b).
    """

    def __init__(self, pooled: ProbitMap, sites: dict[int, ProbitMap], joint: ProbitMap, n_controls: int,
                 site_controls: dict[int, int] | None = None, idps: list[ProbitMap] | None = None,
                 joint_correction: dict | None = None):
        self.pooled = pooled
        self.sites = dict(sites)
        self.joint = joint
        self.n_controls = int(n_controls)
        self.site_controls = dict(site_controls or {})
        self.idps = list(idps or [])
        #: How the joint map was made right for new people (the model card shows it; empty for
        #: bundles of earlier versions and where no joint map was learnt).
        self.joint_correction = dict(joint_correction or {})

    @classmethod
    def fit(cls, centiles: np.ndarray, sites: np.ndarray, joint_centiles: np.ndarray | None = None,
            joint_unseen: np.ndarray | None = None, joint_shift: float = 0.0,
            joint_method: dict | None = None) -> CentileCalibration:
        """Maps from held-out ``centiles [n, D]`` of controls at ``sites [n]`` (counted for the model
        card) and their joint centiles; ``joint_unseen``: joint centiles of controls no part of the model
        has seen, which check (and correct) the joint map (:meth:`ProbitMap.corrected`);
        ``joint_shift``: how much higher in probit new people's joint centiles lie than the controls'
        (:meth:`ProbitMap.shifted`); ``joint_method``: what the model card says of joint centiles that
        need neither (e.g. of controls each scored by a model that never saw them)."""
        centiles = np.asarray(centiles, dtype=np.float64)
        sites = np.asarray(sites, dtype=np.int64).reshape(-1)
        counts = {int(s): int((sites == s).sum()) for s in np.unique(sites)}
        pooled = ProbitMap.fit(centiles)
        idps = shrunk_maps(pooled.transform(centiles))
        joint = ProbitMap.fit(joint_centiles) if joint_centiles is not None else ProbitMap()
        correction = {}
        if not joint.is_identity and joint_method:
            correction = dict(joint_method)
        elif not joint.is_identity and joint_unseen is not None:
            checked = joint.corrected(joint_unseen)  # the map itself where too few unseen values
            correction = {"method": "unseen controls (mean and spread in probit)",
                          "n_unseen": int(np.isfinite(np.asarray(joint_unseen, dtype=np.float64)).sum()),
                          "applied": checked is not joint}
            joint = checked
        elif not joint.is_identity and joint_shift:
            correction = {"method": "in-sample bias of the learnt dependence",
                          "shift_z": round(float(joint_shift), 4)}
            joint = joint.shifted(joint_shift)
        return cls(pooled, {}, joint, len(centiles), counts, idps, correction)

    def _map_rows(self, sites: np.ndarray):
        sites = np.asarray(sites, dtype=np.int64).reshape(-1)
        for code in np.unique(sites):
            yield sites == code, self.sites.get(int(code), self.pooled)

    def _own_maps(self, centiles: np.ndarray):
        """``(column, map)`` of every IDP with a correction of its own; the IDPs are the last axis."""
        if self.idps and centiles.shape[-1] != len(self.idps):
            raise ValueError(f"the calibration layer has maps for {len(self.idps)} IDPs, got centiles of "
                             f"{centiles.shape[-1]}")
        return [(j, m) for j, m in enumerate(self.idps) if not m.is_identity]

    def transform(self, centiles: np.ndarray, sites: np.ndarray) -> np.ndarray:
        """Calibrated ``centiles [R, ..., D]`` of rows at ``sites [R]``."""
        out = np.array(centiles, dtype=np.float64)
        for rows, mapping in self._map_rows(sites):
            out[rows] = mapping.transform(out[rows])
        for j, mapping in self._own_maps(out):
            out[..., j] = mapping.transform(out[..., j])
        return out

    def inverse(self, centiles: np.ndarray, sites: np.ndarray) -> np.ndarray:
        """Model centiles of the calibrated ``centiles [R, ..., D]`` of each row."""
        out = np.array(centiles, dtype=np.float64)
        for j, mapping in self._own_maps(out):
            out[..., j] = mapping.inverse(out[..., j])
        for rows, mapping in self._map_rows(sites):
            out[rows] = mapping.inverse(out[rows])
        return out

    def transform_joint(self, centiles: np.ndarray) -> np.ndarray:
        return self.joint.transform(centiles)

    def to_dict(self) -> dict:
        return {"n_controls": self.n_controls,
                "site_controls": {str(k): v for k, v in self.site_controls.items()},
                "pooled": self.pooled.to_dict(), "joint": self.joint.to_dict(),
                "sites": {str(k): m.to_dict() for k, m in self.sites.items()},
                "idps": [m.to_dict() for m in self.idps], "joint_correction": dict(self.joint_correction)}

    @classmethod
    def from_dict(cls, data: dict) -> CentileCalibration:
        return cls(ProbitMap.from_dict(data["pooled"]),
                   {int(k): ProbitMap.from_dict(m) for k, m in data["sites"].items()},
                   ProbitMap.from_dict(data["joint"]), int(data["n_controls"]),
                   {int(k): int(v) for k, v in data.get("site_controls", {}).items()},
                   [ProbitMap.from_dict(m) for m in data.get("idps", [])],
                   _plain_dict(data.get("joint_correction")))

    def summary(self, idp_names: list[str] | None = None) -> dict:
        """What the model card shows: how many controls calibrated it, which maps are not the identity,
        and the IDPs whose own correction is largest (by name, or column index without ``idp_names``):
        ``idp_corrections`` counts those moved by more than :data:`NOTABLE_SHIFT` in probit units at
        some level and gives up to five, largest first, with that shift (sites only for bundles of
        earlier versions that have them)."""
        names = idp_names if idp_names else list(range(len(self.idps)))
        shifts = [float(np.max(np.abs(m.x - m.y))) if not m.is_identity else 0.0 for m in self.idps]
        notable = sorted((j for j, v in enumerate(shifts) if v > NOTABLE_SHIFT), key=lambda j: -shifts[j])
        out = {"n_controls": self.n_controls,
               "idp_corrections": {"n_idps": len(notable),
                                   "largest_shift_z": {str(names[j]): round(shifts[j], 3)
                                                       for j in notable[:5]}},
               "pooled_is_identity": self.pooled.is_identity, "joint_is_identity": self.joint.is_identity}
        if self.joint_correction:
            out["joint_correction"] = dict(self.joint_correction)
        if self.sites:
            out["sites_with_own_map"] = sorted(self.sites)
        return out


def _plain_dict(value) -> dict:
    """A bundle's ``joint_correction``: a dict of strings, numbers and booleans, or nothing."""
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str | int | float | bool)}
