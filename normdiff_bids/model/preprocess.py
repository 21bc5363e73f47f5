"""IDP preprocessing before diffusion: per-IDP z-scoring (the scaler's default), z-scoring of the log of
positive IDPs (the estimator's default), or a quantile-normal transform.

All maps are strictly increasing per IDP, so a centile computed in the transformed space equals the
centile in original units; the state is a plain dict stored in the model bundle.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

METHODS = ("zscore", "log", "quantile-normal")


class IDPScaler:
    """Per-IDP monotone transform fitted on training data.

    ``method="zscore"``: ``(x - mean) / sd`` with the training mean and SD (the paper's choice).
    ``method="log"``: the same on ``log(x)`` for every IDP whose training values are all positive
    (volumes, areas, thicknesses; the others are z-scored as they are), so that the model's spread grows
    with the IDP's size and its quantiles stay positive down to far below the smallest training value.
    Below half the smallest training value ``a`` the log continues along its tangent at ``a``
    (``log a + (x - a) / a``), so the map is defined and increasing for every value a new person may
    have, a zero included.
    ``method="quantile-normal"``: the training empirical CDF mapped through the normal quantile
    function (as TabDDPM), stored as up to ``n_quantiles`` knots per IDP and applied by piecewise-linear
    interpolation. Outside the outermost knots the map continues linearly with the slope of the outer
    5% of knots, so it stays strictly increasing and its inverse (the same interpolation with axes
    swapped) is exact everywhere.
    """

    def __init__(self, method: str = "zscore", n_quantiles: int = 1000):
        if method not in METHODS:
            raise ValueError(f"preprocessing must be one of {METHODS}, not {method!r}")
        self.method = method
        self.n_quantiles = n_quantiles

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, x: np.ndarray) -> IDPScaler:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"IDPScaler.fit needs a [rows >= 2, IDPs] array, got shape {x.shape}")
        if np.isinf(x).any() or (np.isnan(x).all(axis=0)).any():
            raise ValueError("IDPScaler.fit needs finite values (NaN marks a missing one) and at least "
                             "one value per IDP")
        if self.method in ("zscore", "log"):
            if self.method == "log":
                self.log_floor_ = np.where(np.nanmin(x, axis=0) > 0, 0.5 * np.nanmin(x, axis=0), np.nan)
                x = self._log(x)
            self.mean_ = np.nanmean(x, axis=0)
            self.scale_ = np.nanstd(x, axis=0)
            if not (self.scale_ > 0).all():
                raise ValueError(f"constant IDP columns at positions {np.flatnonzero(self.scale_ <= 0)}")
        else:
            self.knots_x_, self.knots_z_ = [], []
            n = min(self.n_quantiles, len(x))
            probs = (np.arange(n) + 0.5) / n
            for column in x.T:
                column = column[np.isfinite(column)]
                kx = np.quantile(column, probs)
                kx, first = np.unique(kx, return_index=True)
                if len(kx) < 2:
                    raise ValueError("a constant IDP column cannot be quantile-normalised")
                # tied knots keep the normal score of their middle probability
                last = np.r_[first[1:], n] - 1
                kz = ndtri((probs[first] + probs[last]) / 2)
                self.knots_x_.append(kx)
                self.knots_z_.append(kz)
        self.n_features_ = x.shape[1]
        return self

    # -- applying ---------------------------------------------------------------------------------
    def transform(self, x: np.ndarray) -> np.ndarray:
        """Original units -> model space; NaN stays NaN. Works on [..., D] arrays."""
        x = np.asarray(x, dtype=np.float64)
        self._check(x)
        if self.method == "log":
            return (self._log(x) - self.mean_) / self.scale_
        if self.method == "zscore":
            return (x - self.mean_) / self.scale_
        out = np.empty_like(x)
        for j in range(self.n_features_):
            out[..., j] = _interp_linear_tails(x[..., j], self.knots_x_[j], self.knots_z_[j])
        return out

    def inverse_transform(self, z: np.ndarray) -> np.ndarray:
        """Model space -> original units. Works on [..., D] arrays."""
        z = np.asarray(z, dtype=np.float64)
        self._check(z)
        if self.method == "log":
            return self._exp(z * self.scale_ + self.mean_)
        if self.method == "zscore":
            return z * self.scale_ + self.mean_
        out = np.empty_like(z)
        for j in range(self.n_features_):
            out[..., j] = _interp_linear_tails(z[..., j], self.knots_z_[j], self.knots_x_[j])
        return out

    def _log(self, x: np.ndarray) -> np.ndarray:
        """``log x`` for the positive IDPs (tangent-continued below ``log_floor_``), ``x`` for the others."""
        a = self.log_floor_
        logged = ~np.isnan(a)
        safe_a = np.where(logged, a, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log = np.where(x >= safe_a, np.log(np.maximum(x, safe_a)), np.log(safe_a) + (x - safe_a) / safe_a)
        return np.where(logged, log, x)

    def _exp(self, y: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`_log`."""
        a = self.log_floor_
        logged = ~np.isnan(a)
        safe_a = np.where(logged, a, 1.0)
        la = np.log(safe_a)
        with np.errstate(over="ignore"):
            out = np.where(y >= la, np.exp(np.minimum(y, 700.0)), safe_a + (y - la) * safe_a)
        return np.where(logged, out, y)

    def _check(self, x: np.ndarray) -> None:
        if not hasattr(self, "n_features_"):
            raise RuntimeError("IDPScaler is not fitted; call fit first")
        if x.shape[-1] != self.n_features_:
            raise ValueError(f"expected {self.n_features_} IDP columns, got {x.shape[-1]}")

    # -- persistence ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        state = {"method": self.method, "n_quantiles": self.n_quantiles, "n_features": self.n_features_}
        if self.method in ("zscore", "log"):
            state.update(mean=self.mean_.tolist(), scale=self.scale_.tolist())
            if self.method == "log":  # JSON has no NaN: None marks an IDP that is not logged
                state["log_floor"] = [None if np.isnan(v) else float(v) for v in self.log_floor_]
        else:
            state.update(knots_x=[k.tolist() for k in self.knots_x_],
                         knots_z=[k.tolist() for k in self.knots_z_])
        return state

    @classmethod
    def from_dict(cls, state: dict) -> IDPScaler:
        scaler = cls(state["method"], state.get("n_quantiles", 1000))
        scaler.n_features_ = int(state["n_features"])
        if scaler.method in ("zscore", "log"):
            scaler.mean_ = np.asarray(state["mean"], dtype=np.float64)
            scaler.scale_ = np.asarray(state["scale"], dtype=np.float64)
            if scaler.method == "log":
                scaler.log_floor_ = np.array([np.nan if v is None else v for v in state["log_floor"]],
                                             dtype=np.float64)
        else:
            scaler.knots_x_ = [np.asarray(k, dtype=np.float64) for k in state["knots_x"]]
            scaler.knots_z_ = [np.asarray(k, dtype=np.float64) for k in state["knots_z"]]
        return scaler


def _interp_linear_tails(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp`` continued linearly beyond the ends with the slope of the outer 5% of knots."""
    out = np.interp(x, xp, fp)
    k = max(1, len(xp) // 20)
    lo_slope = (fp[k] - fp[0]) / (xp[k] - xp[0])
    hi_slope = (fp[-1] - fp[-1 - k]) / (xp[-1] - xp[-1 - k])
    below, above = x < xp[0], x > xp[-1]
    out[below] = fp[0] + (x[below] - xp[0]) * lo_slope
    out[above] = fp[-1] + (x[above] - xp[-1]) * hi_slope
    return out
