"""The group report's flag-rate figure (matplotlib, object API: no pyplot state, safe in worker processes),
as a PNG data URI. The other charts of both reports are inline SVG (:mod:`normdiff_bids.outputs.svg`)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from normdiff_bids.outputs.flags import BLUE as _BLUE
from normdiff_bids.outputs.flags import RED as _RED
from normdiff_bids.outputs.flags import short_name as _short


def to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as a base64 PNG ``data:`` URI (reports embed every figure: no external files)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
