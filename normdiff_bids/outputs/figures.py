"""Report figures (matplotlib, object API: no pyplot state, safe in worker processes), as PNG data URIs: the
group report's and the subject report's map slices (the subject report's charts are inline SVG,
:mod:`normdiff_bids.outputs.svg`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from scipy.stats import norm

#: |z| thresholds of the flags: outside the central 95% and 99% of the normative distribution.
Z_FLAG, Z_STRONG = 1.959963984540054, 2.5758293035489004
_GREY, _AMBER, _RED, _BLUE = "#8c8c8c", "#e08a00", "#c0392b", "#1f5fa8"
_MEASURE_ORDER = ("volume", "thickness", "area")


def flag_colour(z: float) -> str:
    a = abs(z)
    return _RED if a > Z_STRONG else _AMBER if a > Z_FLAG else _GREY


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


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(data, ornt)


def map_slices(maps: Mapping[str, np.ndarray], labels: np.ndarray, affine: np.ndarray,
               n_slices: int = 5) -> Figure:
    """A few axial slices of each deviation map over its label volume (rows: measures).

    Arrays are reoriented to RAS: axial slices shown in neurological convention (the subject's left on
    the image's left, anterior up), as the figure says. Unscored voxels (NaN) show the grey anatomy.
    The slices of a row are tiled into one image (one axes per measure keeps the figure cheap to draw).
    """
    lab = _canonical(labels, affine)
    brain = lab > 0
    zs = np.where(brain.any(axis=(0, 1)))[0]
    if zs.size == 0:
        raise ValueError("the label volume is empty")
    fractions = np.linspace(0.3, 0.8, n_slices)
    slices = sorted({int(zs[0] + f * (zs[-1] - zs[0])) for f in fractions})
    xs, ys = np.where(brain.any(axis=2))
    crop = (slice(max(xs.min() - 3, 0), xs.max() + 4), slice(max(ys.min() - 3, 0), ys.max() + 4))
    grey = np.where(brain, 0.78, 1.0)
    grey = np.where(lab >= 1000, 0.62, grey)  # cortex a shade darker than the rest of the brain
    grey_tiles = _tile([grey[crop[0], crop[1], k].T for k in slices], fill=1.0)
    tile_width = grey[crop[0], crop[1], 0].shape[0]
    arrays = {m: _canonical(v, affine) for m, v in maps.items()}
    finite = np.concatenate([np.abs(a[np.isfinite(a)]) for a in arrays.values()] or [np.zeros(1)])
    vlim = max(3.0, float(finite.max()) if finite.size else 3.0)
    normaliser = TwoSlopeNorm(vmin=-vlim, vcenter=0.0, vmax=vlim)
    height = grey_tiles.shape[0] / grey_tiles.shape[1] * 9.0
    fig = Figure(figsize=(10.0, (height + 0.45) * len(arrays) + 0.3), layout="constrained")
    axes = fig.subplots(len(arrays), 1, squeeze=False)[:, 0]
    image = None
    for ax, (measure, zmap) in zip(axes, arrays.items()):
        ax.imshow(grey_tiles, origin="lower", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        overlay = np.ma.masked_invalid(_tile([zmap[crop[0], crop[1], k].T for k in slices], fill=np.nan))
        image = ax.imshow(overlay, origin="lower", cmap="RdBu_r", norm=normaliser, interpolation="nearest")
        ax.set_xticks([(tile_width + _GAP) * i + tile_width / 2 for i in range(len(slices))],
                      [f"axial slice {k}" for k in slices], fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(measure, fontsize=10)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="z", pad=0.01)
    return fig


_GAP = 4


def _tile(images: Sequence[np.ndarray], fill: float) -> np.ndarray:
    gap = np.full((images[0].shape[0], _GAP), fill, dtype=np.float32)
    parts = []
    for i, image in enumerate(images):
        if i:
            parts.append(gap)
        parts.append(image.astype(np.float32))
    return np.concatenate(parts, axis=1)


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


def _short(idp: str, width: int = 28) -> str:
    return idp if len(idp) <= width else idp[: width - 1] + "\u2026"
