"""The reports' charts as inline SVG, written directly rather than rasterised: the subject report's
deviation profile, centile curves, joint deviation and map slices, and the group report's joint
deviation of the cohort.

A subject report used to spend most of its time in matplotlib laying out and rasterising about a
hundred tick labels; here the browser draws the text, so a chart costs about a millisecond, stays sharp
at any zoom, and every point carries its exact value as a tooltip (``<title>``). The map slices' pixels
are a PNG (Pillow) inside their SVG. Each function returns the ``<svg>`` element as
:class:`markupsafe.Markup`; text from the data (IDP names, units) is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from markupsafe import Markup, escape

from normdiff_bids.outputs.flags import BLUE as _BLUE
from normdiff_bids.outputs.flags import GREY as _GREY
from normdiff_bids.outputs.flags import MEASURE_ORDER as _MEASURE_ORDER
from normdiff_bids.outputs.flags import Z_FLAG, Z_STRONG, flag_colour
from normdiff_bids.outputs.flags import short_name as _short
from normdiff_bids.scoring.centiles import normal_pdf

__all__ = ["centile_curves", "deviation_profile", "joint_deviation", "map_slices"]

_FONT = "-apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
_GRID, _BAND, _STEM = "#e5e5e5", "#eef3f8", "#c8c8c8"
_NUMBER = (int, float, np.integer, np.floating)
#: Approximate advance of one character of the tick-label font, in px per px of font size.
_CHAR_WIDTH = 0.52


class _Panel:
    """A plotting area: ``(left, top, width, height)`` in px and the data limits it maps onto."""

    def __init__(self, left: float, top: float, width: float, height: float,
                 xlim: tuple[float, float], ylim: tuple[float, float]):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.xlim, self.ylim = xlim, ylim

    def x(self, value) -> np.ndarray | float:
        lo, hi = self.xlim
        return self.left + (np.asarray(value, dtype=float) - lo) / (hi - lo) * self.width

    def y(self, value) -> np.ndarray | float:
        lo, hi = self.ylim
        return self.top + (hi - np.asarray(value, dtype=float)) / (hi - lo) * self.height

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width


def _n(value: float) -> str:
    """A coordinate, to 0.1 px."""
    return f"{float(value):.1f}"


def _points(xs, ys) -> str:
    return " ".join(f"{_n(a)},{_n(b)}" for a, b in zip(xs, ys))


def _el(tag: str, title: str | None = None, text: str | None = None, **attrs) -> str:
    """One SVG element: numbers as coordinates (0.1 px; give opacities as strings), ``stroke_width=`` as
    ``stroke-width``, strings escaped; ``title``: its tooltip; ``text``: its content."""
    fields = " ".join(f'{k.replace("_", "-")}="{_n(v) if isinstance(v, _NUMBER) else escape(v)}"'
                      for k, v in attrs.items() if v is not None)
    inner = (f"<title>{escape(title)}</title>" if title else "") + (escape(text) if text is not None else "")
    return f"<{tag} {fields}>{inner}</{tag}>" if inner else f"<{tag} {fields}/>"


def _text(x: float, y: float, text: str, size: float = 11, anchor: str = "start", **attrs) -> str:
    return _el("text", text=text, x=x, y=y, font_size=size, text_anchor=anchor, **attrs)


def _rotated(x: float, y: float, text: str, size: float, anchor: str) -> str:
    """Text read bottom to top, its anchor at ``(x, y)``."""
    return _el("text", text=text, transform=f"translate({_n(x)},{_n(y)}) rotate(-90)", font_size=size,
               text_anchor=anchor)


def _line(x1, y1, x2, y2, colour: str, width: float = 0.8, dash: str | None = None, title=None) -> str:
    return _el("line", title, x1=x1, y1=y1, x2=x2, y2=y2, stroke=colour, stroke_width=width,
               stroke_dasharray=dash)


def _hline(panel: _Panel, value: float, colour: str, width: float = 0.8, dash: str | None = None) -> str:
    y = panel.y(value)
    return _line(panel.left, y, panel.right, y, colour, width, dash)


def _vline(panel: _Panel, value: float, colour: str, width: float = 0.8, dash: str | None = None,
           title: str | None = None) -> str:
    x = panel.x(value)
    return _line(x, panel.top, x, panel.bottom, colour, width, dash, title)


def _rect(x, y, width, height, fill: str, **attrs) -> str:
    return _el("rect", x=x, y=y, width=width, height=height, fill=fill, **attrs)


def _ticks(lo: float, hi: float, n: int) -> np.ndarray:
    """At most about ``n`` round tick values within ``[lo, hi]``: multiples of 1, 2, 2.5 or 5 times a power
    of ten."""
    span = hi - lo
    if not span > 0:
        return np.array([lo])
    raw = span / max(n, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    values = np.arange(first, hi + 1e-9 * span, step)
    return np.round(values / step) * step


def _tick_labels(ticks: np.ndarray) -> list[str]:
    """The labels of ``ticks``, all with as many decimals as their step needs (2.5 -> 1, 0.25 -> 2)."""
    step = float(np.min(np.diff(ticks))) if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 6 and step > 0 and abs(round(step, decimals) - step) > 1e-9 * step:
        decimals += 1
    texts = (f"{value:.{decimals}f}" for value in ticks)
    return ["0" if text.lstrip("-").strip("0.") == "" else text.replace("-", "\u2212") for text in texts]


def _axes(panel: _Panel, xticks, yticks, size: float = 10, grid: str = "both") -> list[str]:
    """Grid lines, tick labels and the frame (``xticks=None``: no x ticks; ``grid``: "both", "x", "y")."""
    parts = []
    for value, label in zip(yticks, _tick_labels(yticks)):
        if grid in ("both", "y"):
            parts.append(_hline(panel, value, _GRID, 0.5))
        parts.append(_text(panel.left - 5, panel.y(value) + size * 0.35, label, size, "end"))
    xticks = [] if xticks is None else xticks
    for value, label in zip(xticks, _tick_labels(xticks)):
        if grid in ("both", "x"):
            parts.append(_vline(panel, value, _GRID, 0.5))
        parts.append(_text(panel.x(value), panel.bottom + size + 4, label, size, "middle"))
    parts.append(_rect(panel.left, panel.top, panel.width, panel.height, "none", stroke="#444",
                       stroke_width=0.8))
    return parts


def _svg(width: float, height: float, label: str, parts: Sequence[str]) -> Markup:
    return Markup(f'<svg class="figure" viewBox="0 0 {_n(width)} {_n(height)}" width="{_n(width)}" '
                  f'height="{_n(height)}" role="img" aria-label="{escape(label)}" font-family="{_FONT}" '
                  f'fill="#1d2430">' + "".join(parts) + "</svg>")


def _clipped(panel: _Panel, key: str, parts: Sequence[str]) -> str:
    """``parts`` clipped to the panel (``key``: an id unique within the chart)."""
    box = _rect(panel.left, panel.top, panel.width, panel.height, "none")
    return f'<clipPath id="{key}">{box}</clipPath><g clip-path="url(#{key})">' + "".join(parts) + "</g>"


def _label(idp: str, measure: str) -> str:
    """An IDP's name without its measure (the panel title names it): ``lh_insula``, not ``lh_insula_area``."""
    return idp[: -len(measure) - 1] if idp.endswith(f"_{measure}") else idp


def _z_text(z: float) -> str:
    return f"{z:+.2f}".replace("-", "\u2212") if np.isfinite(z) else "n/a"


# ---------------------------------------------------------------------------------------------------
def deviation_profile(table: pd.DataFrame, max_labels: int = 70) -> Markup:
    """z of every IDP (``table``: idp, measure, z, optionally centile), one panel per measure; flagged
    points coloured; each point's tooltip gives the IDP, z and centile. A panel of more than
    ``max_labels`` IDPs names only its flagged ones, beside their points."""
    groups = [m for m in _MEASURE_ORDER if m in set(table["measure"])]
    groups += sorted(set(table["measure"]) - set(groups))
    width, left, right, title_h, plot_h, label_size = 1100.0, 48.0, 12.0, 26.0, 170.0, 10
    z_all = table["z"].to_numpy(dtype=float)
    zmax = max(3.5, float(np.nanmax(np.abs(z_all))) + 0.5) if np.isfinite(z_all).any() else 3.5
    centiles = table["centile"] if "centile" in table else pd.Series(np.nan, index=table.index)
    parts, top = [], 6.0
    for measure in groups:
        rows = table.index[table["measure"] == measure]
        labels = [_short(_label(i, measure)) for i in table.loc[rows, "idp"]]
        named = len(rows) <= max_labels
        room = 8 + (max(map(len, labels), default=0) * label_size * _CHAR_WIDTH if named else 0)
        panel = _Panel(left, top + title_h, width - left - right, plot_h, (-0.7, len(rows) - 0.3),
                       (-zmax, zmax))
        parts.append(_text(left, top + 17, f"{measure} ({len(rows)} IDPs)", 13, font_weight="600"))
        band_top = panel.y(Z_FLAG)
        parts.append(_rect(panel.left, band_top, panel.width, panel.y(-Z_FLAG) - band_top, _BAND))
        parts += _axes(panel, None, _ticks(-zmax, zmax, 8), grid="y")
        for level, dash in ((Z_FLAG, "5 3"), (Z_STRONG, "1.5 2.5")):
            parts += [_hline(panel, level, _GREY, dash=dash), _hline(panel, -level, _GREY, dash=dash)]
        parts.append(_hline(panel, 0.0, "black", 0.6))
        parts.append(_text(14, panel.y(0) + 4, "z", 12, "middle"))
        y0 = panel.y(0.0)
        for k, (row, label) in enumerate(zip(rows, labels)):
            x, idp, z, centile = panel.x(k), table.at[row, "idp"], float(table.at[row, "z"]), centiles[row]
            if named:
                parts.append(_rotated(x + 3.5, panel.bottom + 6, label, label_size, "end"))
            if not np.isfinite(z):
                continue
            tip = f"{idp}: z = {_z_text(z)}"
            if np.isfinite(centile):
                tip += f", centile {100 * float(centile):.1f}%"
            parts.append(_line(x, y0, x, panel.y(z), _STEM))
            parts.append(_el("circle", tip, cx=x, cy=panel.y(z), r=3.6, fill=flag_colour(z)))
            if not named and abs(z) > Z_FLAG:
                parts.append(_text(x + 4, panel.y(z) - 4, _short(_label(idp, measure)), label_size))
        top = panel.bottom + room + 4
    return _svg(width, top + 4, "deviation profile", parts)


def centile_curves(curves: Sequence[Mapping], ncols: int = 3) -> Markup:
    """Small multiples of normative centile curves over age with the subject's point.

    Each curve: ``idp``, ``age`` [A], ``quantiles`` DataFrame [A, q] (q as columns; the median and the
    pairs 0.005/0.995, 0.025/0.975 and 0.25/0.75, drawn as bands), ``units``, and the subject's
    ``subject_age``, ``value`` (may be NaN) and ``z``.
    """
    n = len(curves)
    ncols = max(1, min(ncols, n))
    nrows = int(math.ceil(n / ncols))
    cell_w, cell_h = 370.0, 300.0
    margin_left, margin_right, margin_top, margin_bottom = 62.0, 12.0, 44.0, 42.0
    parts = []
    for k, curve in enumerate(curves):
        col, row = k % ncols, k // ncols
        q = curve["quantiles"]
        age = np.asarray(curve["age"], dtype=float)
        value, z = float(curve.get("value", np.nan)), float(curve.get("z", np.nan))
        subject_age = float(curve.get("subject_age", np.nan))
        panel = _Panel(col * cell_w + margin_left, row * cell_h + margin_top,
                       cell_w - margin_left - margin_right, cell_h - margin_top - margin_bottom,
                       _padded([age, [subject_age]], 0.03),
                       _padded([np.asarray(q, dtype=float), [value]], 0.06))
        parts += _axes(panel, _ticks(*panel.xlim, 6), _ticks(*panel.ylim, 6), 10)
        middle = panel.left + panel.width / 2
        parts.append(_text(middle, row * cell_h + 16, _short(str(curve["idp"]), 40), 12, "middle",
                           font_weight="600"))
        parts.append(_text(middle, row * cell_h + 32, f"z = {_z_text(z)}", 11, "middle"))
        parts.append(_text(middle, panel.bottom + 34, "age (years)", 11, "middle"))
        units = curve.get("units")
        parts.append(_rotated(col * cell_w + 14, panel.top + panel.height / 2,
                              units if units and units != "n/a" else "value", 11, "middle"))
        body = []
        for q_lo, q_hi, alpha in ((0.005, 0.995, 0.10), (0.025, 0.975, 0.18), (0.25, 0.75, 0.30)):
            a, b = _quantile_column(q, q_lo), _quantile_column(q, q_hi)
            if a is None or b is None:
                continue
            keep = np.isfinite(a) & np.isfinite(b)
            xs = panel.x(age[keep])
            outline = _points(np.r_[xs, xs[::-1]], np.r_[panel.y(a[keep]), panel.y(b[keep])[::-1]])
            body.append(_el("polygon", f"{100 * q_lo:g}\u2013{100 * q_hi:g} centiles", points=outline,
                            fill=_BLUE, fill_opacity=f"{alpha:g}"))
        median = _quantile_column(q, 0.5)
        if median is not None:
            keep = np.isfinite(median)
            body.append(_el("polyline", "median", points=_points(panel.x(age[keep]), panel.y(median[keep])),
                            fill="none", stroke=_BLUE, stroke_width=1.6))
        if np.isfinite(value) and np.isfinite(subject_age):
            x0, y0, r = panel.x(subject_age), panel.y(value), 6.5
            tip = f"this subject: age {subject_age:g}, value {value:.4g}, z = {_z_text(z)}"
            diamond = _points([x0, x0 + r, x0, x0 - r], [y0 - r, y0, y0 + r, y0])
            body.append(_el("polygon", tip, points=diamond, fill=flag_colour(z), stroke="black",
                            stroke_width=1))
        parts.append(_clipped(panel, f"curve{k}", body))
    return _svg(cell_w * ncols, cell_h * nrows, "centile curves", parts)


def _padded(arrays, fraction: float) -> tuple[float, float]:
    """The finite range of ``arrays``, widened by ``fraction`` of its span each side."""
    values = np.concatenate([np.ravel(np.asarray(a, dtype=float)) for a in arrays])
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    pad = fraction * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - pad, hi + pad


def _quantile_column(q: pd.DataFrame, target: float) -> np.ndarray | None:
    for column in q.columns:
        if abs(float(column) - target) < 1e-9:
            return q[column].to_numpy(dtype=float)
    return None


def joint_deviation(joint_z: float, cohort_joint_z: Sequence[float] | None = None) -> Markup:
    """The subject's joint z against the standard normal reference (and the cohort, when given: a
    histogram from 20 people, one tick per person below that). ``joint_z=NaN``: the cohort alone (the
    group report)."""
    width, height = 650.0, 260.0
    lim = max(4.0, abs(joint_z) + 0.5 if np.isfinite(joint_z) else 4.0)
    values = np.asarray(cohort_joint_z if cohort_joint_z is not None else [], dtype=float)
    values = values[np.isfinite(values)]
    if values.size:
        lim = max(lim, min(float(np.abs(values).max()) + 0.5, 9.0))
    density_max, hist = float(normal_pdf(0)), None
    if values.size >= 20:
        bins = int(np.clip(np.sqrt(values.size), 10, 40))
        hist = np.histogram(np.clip(values, -lim, lim), bins=bins, range=(-lim, lim), density=True)
        density_max = max(density_max, float(hist[0].max()))
    panel = _Panel(20.0, 12.0, width - 36.0, height - 56.0, (-lim, lim), (0.0, max(0.5, 1.05 * density_max)))
    parts = _axes(panel, _ticks(-lim, lim, 9), [], 10, grid="x")
    x = np.linspace(-lim, lim, 200)
    xs, ys = panel.x(x), panel.y(normal_pdf(x))
    parts.append(_el("polygon", points=_points(np.r_[xs, panel.right, panel.left],
                                               np.r_[ys, panel.bottom, panel.bottom]), fill="#dfe8f2"))
    legend = [(_BLUE, "reference N(0, 1)")]
    if hist is not None:
        density, edges = hist
        for h, a, b in zip(density, edges[:-1], edges[1:]):
            if h > 0:
                parts.append(_rect(panel.x(a), panel.y(h), panel.x(b) - panel.x(a), panel.bottom - panel.y(h),
                                   _GREY, fill_opacity="0.45"))
    else:
        parts += [_line(panel.x(v), panel.bottom, panel.x(v), panel.bottom - 14, "#555555", 1)
                  for v in np.clip(values, -lim, lim)]
    if values.size:
        legend.append((_GREY, f"cohort (n = {values.size})"))
    parts.append(_el("polyline", points=_points(xs, ys), fill="none", stroke=_BLUE, stroke_width=1.3))
    for level, dash in ((Z_FLAG, "5 3"), (Z_STRONG, "1.5 2.5")):  # upper tail only: the joint is a distance
        parts.append(_vline(panel, level, _GREY, dash=dash))
    if np.isfinite(joint_z):
        # one-sided: only a large joint distance is atypical; a low one means "closer to typical than most"
        colour = flag_colour(max(joint_z, 0.0))
        parts.append(_vline(panel, joint_z, colour, 2.4, title=f"this subject: joint z = {_z_text(joint_z)}"))
        legend.append((colour, f"this subject: {_z_text(joint_z)}"))
    for i, (colour, text) in enumerate(legend):
        y = panel.top + 14 + 16 * i
        parts += [_rect(panel.left + 8, y - 8, 14, 8, colour), _text(panel.left + 28, y, text, 11)]
    parts.append(_text(panel.left + panel.width / 2, height - 10, "joint deviation z", 12, "middle"))
    return _svg(width, height, "joint deviation", parts)


# ---------------------------------------------------------------------------------------------------
#: ColorBrewer's RdBu, blue (low z) to red (high z): the colour scale of the map slices.
_DIVERGING = ("#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582",
              "#d6604d", "#b2182b", "#67001f")
#: Pixels between two slices of a row, in voxels.
_GAP = 4


def _diverging_rgb(t: np.ndarray) -> np.ndarray:
    """``t`` in [0, 1] -> RGB in [0, 1] along :data:`_DIVERGING` (piecewise linear)."""
    stops = np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in _DIVERGING])
    knots = np.linspace(0, 1, len(stops))
    return np.stack([np.interp(t, knots, stops[:, k]) for k in range(3)], axis=-1)


def _canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))


def _tile(images: Sequence[np.ndarray], fill: float) -> np.ndarray:
    gap = np.full((images[0].shape[0], _GAP), fill, dtype=np.float32)
    parts = []
    for i, image in enumerate(images):
        if i:
            parts.append(gap)
        parts.append(image.astype(np.float32))
    return np.concatenate(parts, axis=1)


def _png_uri(rgb: np.ndarray, scale: int) -> str:
    """``rgb [H, W, 3]`` in [0, 1], rows top to bottom, as a PNG data URI enlarged ``scale`` times."""
    import base64
    import io

    from PIL import Image

    image = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def map_slices(maps: Mapping[str, np.ndarray], labels: np.ndarray, affine: np.ndarray,
               n_slices: int = 5, width_px: int = 900) -> Markup:
    """A few axial slices of each deviation map over its label volume (rows: measures), with a z colour
    bar. Arrays are reoriented to RAS: slices in neurological view (the subject's left on the left,
    anterior up). Unscored voxels (NaN) show the grey anatomy (cortex a shade darker); colours run from
    blue (below the normative median) to red, symmetric about 0 out to at least |z| = 3. A row is
    enlarged by a whole factor (nearest neighbour) to about ``width_px`` pixels."""
    lab = _canonical(labels, affine)
    brain = lab > 0
    zs = np.where(brain.any(axis=(0, 1)))[0]
    if zs.size == 0:
        raise ValueError("the label volume is empty")
    slices = sorted({int(zs[0] + f * (zs[-1] - zs[0])) for f in np.linspace(0.3, 0.8, n_slices)})
    xs, ys = np.where(brain.any(axis=2))
    crop = (slice(max(xs.min() - 3, 0), xs.max() + 4), slice(max(ys.min() - 3, 0), ys.max() + 4))
    grey = np.where(lab >= 1000, 0.62, np.where(brain, 0.78, 1.0))
    grey_tiles = _tile([grey[crop[0], crop[1], k].T for k in slices], fill=1.0)
    tile_width = grey[crop[0], crop[1], 0].shape[0]
    arrays = {m: _canonical(v, affine) for m, v in maps.items()}
    finite = np.concatenate([np.abs(a[np.isfinite(a)]) for a in arrays.values()] or [np.zeros(1)])
    vlim = max(3.0, float(finite.max()) if finite.size else 3.0)
    scale = max(1, round(width_px / grey_tiles.shape[1]))
    height, width = grey_tiles.shape[0] * scale, grey_tiles.shape[1] * scale
    left, bar_w, row_gap = 90.0, 16.0, 30.0
    parts, top = [], 8.0
    for measure, zmap in arrays.items():
        overlay = _tile([zmap[crop[0], crop[1], k].T for k in slices], fill=np.nan)
        rgb = np.repeat(grey_tiles[..., None], 3, axis=-1)
        shown = np.isfinite(overlay)
        rgb[shown] = _diverging_rgb(np.clip(0.5 + overlay[shown] / (2 * vlim), 0, 1))
        parts.append(f'<image x="{_n(left)}" y="{_n(top)}" width="{width}" height="{height}" '
                     f'href="{_png_uri(rgb[::-1], scale)}" style="image-rendering: pixelated"/>')
        parts.append(_rotated(left - 16, top + height / 2, measure, 13, "middle"))
        for i, k in enumerate(slices):
            parts.append(_text(left + ((tile_width + _GAP) * i + tile_width / 2) * scale, top + height + 16,
                               f"axial slice {k}", 10, "middle"))
        top += height + row_gap
    bar_x, bar_top, bar_h = left + width + 24, 8.0, top - row_gap - 8.0
    gradient = "".join(f'<stop offset="{i / (len(_DIVERGING) - 1):.3f}" stop-color="{c}"/>'
                       for i, c in enumerate(reversed(_DIVERGING)))  # top of the bar: high z
    parts.append(f'<linearGradient id="zbar" x1="0" y1="0" x2="0" y2="1">{gradient}</linearGradient>')
    parts.append(_rect(bar_x, bar_top, bar_w, bar_h, "url(#zbar)", stroke="#444", stroke_width=0.6))
    bar = _Panel(bar_x, bar_top, bar_w, bar_h, (0.0, 1.0), (-vlim, vlim))
    ticks = _ticks(-vlim, vlim, 6)
    for value, label in zip(ticks, _tick_labels(ticks)):
        y = bar.y(value)
        parts += [_line(bar_x + bar_w, y, bar_x + bar_w + 4, y, "#444"),
                  _text(bar_x + bar_w + 7, y + 3.5, label, 10)]
    parts.append(_rotated(bar_x + bar_w + 48, bar_top + bar_h / 2, "z", 12, "middle"))
    return _svg(bar_x + bar_w + 60, top - row_gap + 24, "deviation map slices", parts)
