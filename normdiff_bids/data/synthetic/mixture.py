"""The bimodal family of the generator: exact CDF and quantile of a two-component normal mixture."""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr


def mixture_cdf(x, w, sep, ratio, upper: bool = False):
    """CDF (or survival) of ``(1 - w) N(0, 1) + w N(sep, ratio^2)`` at ``x``."""
    if upper:
        return (1.0 - w) * ndtr(-x) + w * ndtr(-(x - sep) / ratio)
    return (1.0 - w) * ndtr(x) + w * ndtr((x - sep) / ratio)


def mixture_quantile(z, w, sep, ratio, tol: float = 1e-13, max_iter: int = 100) -> np.ndarray:
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
