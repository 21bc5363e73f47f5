"""Report figures (matplotlib, object API: no pyplot state, safe in worker processes), as PNG data URIs."""

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


def deviation_profile(table: pd.DataFrame, title: str | None = None) -> Figure:
    """z of every IDP (``table``: idp, measure, z), one panel per measure, flagged points coloured."""
    groups = [m for m in _MEASURE_ORDER if m in set(table["measure"])]
    groups += sorted(set(table["measure"]) - set(groups))
    # Axes placed by hand (in inches), not by a layout engine: the engine measured every tick label
    # twice and was half of a report's rendering time. The room under a panel fits its longest label.
    panels = []
    for measure in groups:
        names = [_short(i[: -len(measure) - 1] if i.endswith(f"_{measure}") else i)
                 for i in table.loc[table["measure"] == measure, "idp"]]
        longest = max(map(len, names), default=0) if len(names) <= 70 else 0
        panels.append(0.25 + longest * 7 * 0.6 / 72)  # label room: 7-pt characters, rotated
    width, left, right, top, plot_h, title_h = 11.0, 0.6, 0.15, 0.15, 1.7, 0.3
    height = top + sum(title_h + plot_h + room for room in panels) + 0.1
    fig = Figure(figsize=(width, height))
    axes, y = [], height - top
    for room in panels:
        y -= title_h + plot_h
        axes.append(fig.add_axes(((left) / width, y / height, (width - left - right) / width,
                                  plot_h / height)))
        y -= room
    zmax = max(3.5, float(np.nanmax(np.abs(table["z"]))) + 0.5) if table["z"].notna().any() else 3.5
    for ax, measure in zip(axes, groups):
        rows = table[table["measure"] == measure].reset_index(drop=True)
        x = np.arange(len(rows))
        z = rows["z"].to_numpy(dtype=float)
        ax.axhspan(-Z_FLAG, Z_FLAG, color="#eef3f8", zorder=0)
        for level, style in ((Z_FLAG, "--"), (Z_STRONG, ":")):
            ax.axhline(level, color=_GREY, lw=0.8, ls=style, zorder=1)
            ax.axhline(-level, color=_GREY, lw=0.8, ls=style, zorder=1)
        ax.axhline(0, color="black", lw=0.6, zorder=1)
        ax.vlines(x, 0, np.nan_to_num(z), color="#c8c8c8", lw=0.8, zorder=2)
        ax.scatter(x, z, c=[flag_colour(v) for v in np.nan_to_num(z)], s=22, zorder=3, edgecolors="none")
        ax.set_ylim(-zmax, zmax)
        ax.set_xlim(-0.7, len(rows) - 0.3)
        ax.set_ylabel("z")
        ax.set_title(f"{measure} ({len(rows)} IDPs)", loc="left", fontsize=10)
        # The panel title names the measure, so tick labels drop it ("lh_insula", not "lh_insula_area").
        labels = [i[: -len(measure) - 1] if i.endswith(f"_{measure}") else i for i in rows["idp"]]
        if len(rows) <= 70:
            ax.set_xticks(x, [_short(i) for i in labels], rotation=90, fontsize=7)
        else:
            ax.set_xticks([])
            for xi, zi, idp in zip(x, z, labels):
                if np.isfinite(zi) and abs(zi) > Z_FLAG:
                    ax.annotate(_short(idp), (xi, zi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.grid(axis="y", color="#e5e5e5", lw=0.5)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def centile_curves(curves: Sequence[Mapping], ncols: int = 3) -> Figure:
    """Small multiples of normative centile curves over age with the subject's point.

    Each curve: ``idp``, ``age`` [A], ``quantiles`` DataFrame [A, q] (q as columns), ``units``, and the
    subject's ``subject_age``, ``value`` (may be NaN) and ``z``.
    """
    n = len(curves)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig = Figure(figsize=(3.7 * ncols, 3.0 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    # fixed margins (titles and labels have a known size): a layout engine doubled the rendering time
    fig.subplots_adjust(left=0.75 / (3.7 * ncols), right=1 - 0.1 / (3.7 * ncols), bottom=0.5 / (3.0 * nrows),
                        top=1 - 0.5 / (3.0 * nrows), wspace=0.32, hspace=0.62)
    for ax, curve in zip(axes, curves):
        q = curve["quantiles"]
        age = np.asarray(curve["age"], dtype=float)
        for lo, hi, alpha in ((0.005, 0.995, 0.10), (0.025, 0.975, 0.18), (0.25, 0.75, 0.30)):
            a, b = _quantile_column(q, lo), _quantile_column(q, hi)
            if a is not None and b is not None:
                ax.fill_between(age, a, b, color=_BLUE, alpha=alpha, lw=0)
        median = _quantile_column(q, 0.5)
        if median is not None:
            ax.plot(age, median, color=_BLUE, lw=1.4)
        value, z = curve.get("value", np.nan), curve.get("z", np.nan)
        if value is not None and np.isfinite(value):
            ax.scatter([curve["subject_age"]], [value], s=60, marker="D", color=flag_colour(z),
                       edgecolors="black", linewidths=0.8, zorder=5)
        ax.set_title(f"{_short(curve['idp'], 34)}\nz = {z:+.2f}", fontsize=9)
        ax.set_xlabel("age (years)", fontsize=8)
        units = curve.get("units")
        ax.set_ylabel(units if units and units != "n/a" else "value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(color="#e5e5e5", lw=0.5)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _quantile_column(q: pd.DataFrame, target: float) -> np.ndarray | None:
    for column in q.columns:
        if abs(float(column) - target) < 1e-9:
            return q[column].to_numpy(dtype=float)
    return None


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
