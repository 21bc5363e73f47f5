"""The group report's figures (matplotlib, object API: no pyplot state, safe in worker processes), as PNG
data URIs. The subject report draws without matplotlib (:mod:`normdiff_bids.outputs.svg`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import norm

from normdiff_bids.outputs.flags import BLUE as _BLUE
from normdiff_bids.outputs.flags import GREY as _GREY
from normdiff_bids.outputs.flags import RED as _RED
from normdiff_bids.outputs.flags import Z_FLAG, Z_STRONG, flag_colour
from normdiff_bids.outputs.flags import short_name as _short


def to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as a base64 PNG ``data:`` URI (reports embed every figure: no external files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def joint_deviation(joint_z: float, cohort_joint_z: Sequence[float] | None = None) -> Figure:
    """The subject's joint z against the standard normal reference (and the cohort, when given)."""
    fig = Figure(figsize=(6.5, 2.6), layout="constrained")
    ax = fig.subplots()
    lim = max(4.0, abs(joint_z) + 0.5 if np.isfinite(joint_z) else 4.0)
    if cohort_joint_z is not None:
        spread = np.abs(np.asarray(cohort_joint_z, dtype=float))
        spread = spread[np.isfinite(spread)]
        if spread.size:
            lim = max(lim, min(float(spread.max()) + 0.5, 9.0))
    x = np.linspace(-lim, lim, 400)
    ax.fill_between(x, norm.pdf(x), color="#dfe8f2", lw=0)
    ax.plot(x, norm.pdf(x), color=_BLUE, lw=1.2, label="reference N(0, 1)")
    if cohort_joint_z is not None:
        values = np.asarray(cohort_joint_z, dtype=float)
        values = values[np.isfinite(values)]
        if values.size >= 20:
            bins = int(np.clip(np.sqrt(values.size), 10, 40))
            ax.hist(values, bins=bins, range=(-lim, lim), density=True, color=_GREY, alpha=0.45,
                    label=f"cohort (n = {values.size})")
        elif values.size:
            # Too few for a histogram: one tick per subject.
            ax.plot(np.clip(values, -lim, lim), np.full(values.size, 0.02), "|", color="#555555",
                    markersize=14, label=f"cohort (n = {values.size})")
    for level in (Z_FLAG, Z_STRONG):  # upper tail only: the joint deviation is a distance
        ax.axvline(level, color=_GREY, lw=0.8, ls="--" if level == Z_FLAG else ":")
    if np.isfinite(joint_z):
        # One-sided: only a large joint distance is atypical; a low one means "closer to typical than most".
        ax.axvline(joint_z, color=flag_colour(max(joint_z, 0.0)), lw=2.2,
                   label=f"this subject: {joint_z:+.2f}")
    ax.set_xlabel("joint deviation z")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(0, max(0.5, ax.get_ylim()[1]))
    ax.set_yticks([])
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return fig


def joint_histogram(joint_z: Sequence[float]) -> Figure:
    """Cohort distribution of the joint deviation z against N(0, 1)."""
    return joint_deviation(np.nan, cohort_joint_z=joint_z)


def flag_rates(table: pd.DataFrame, top: int = 30) -> Figure:
    """Share of subjects with |z| > 1.96 per IDP (``table``: idp, rate), against the 5% expected by chance."""
    rows = table.sort_values("rate", ascending=False).head(top).iloc[::-1]
    fig = Figure(figsize=(7.5, 0.6 + 0.22 * len(rows)), layout="constrained")
    ax = fig.subplots()
    ax.barh(np.arange(len(rows)), rows["rate"] * 100, color=_BLUE, alpha=0.8)
    ax.axvline(5.0, color=_RED, lw=1, ls="--", label="5% expected by chance")
    ax.set_yticks(np.arange(len(rows)), [_short(i, 40) for i in rows["idp"]], fontsize=7)
    ax.set_xlabel("subjects with |z| > 1.96 (%)")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig
