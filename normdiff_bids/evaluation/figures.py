"""Calibration figures (matplotlib, no display needed): each function returns PNG bytes for a report."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: At most this many IDPs get their own panel; with more, the worst by ACE are shown (the caption says so).
MAX_PANELS = 9

_SEX_COLOURS = ("#1f5fa8", "#b03024", "#2e7d32", "#6a3d9a")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in a single self-contained HTML file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return int(np.ceil(n / cols)), cols


def choose_idps(idps: Sequence[str], per_idp: pd.DataFrame | None = None, column: str = "ace",
                max_panels: int = MAX_PANELS) -> list[str]:
    """The IDPs to draw: all when few, else the ``max_panels`` worst by ``column`` of ``per_idp``."""
    idps = list(idps)
    if len(idps) <= max_panels or per_idp is None or column not in per_idp:
        return idps[:max_panels]
    return list(per_idp[column].reindex(idps).sort_values(ascending=False).index[:max_panels])


def plot_centile_curves(curves: pd.DataFrame, holdout: pd.DataFrame, idps: Sequence[str],
                        age: str = "age", sex: str = "sex") -> bytes:
    """Model centile curves over age (one line style per centile, one colour per sex) with held-out data.

    ``curves`` is the long table of :func:`normdiff_bids.evaluation.evaluate.centile_curves`.
    """
    rows, cols = _grid(len(idps))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    sexes = [s for s in pd.unique(curves["sex"])]
    site = curves["site"].iloc[0] if "site" in curves and curves["site"].notna().any() else None
    for k, name in enumerate(idps):
        ax = fig.add_subplot(rows, cols, k + 1)
        for i, level in enumerate(sexes):
            colour = _SEX_COLOURS[i % len(_SEX_COLOURS)]
            if sex in holdout.columns and level is not None:
                points = holdout[holdout[sex].astype(str) == str(level)]
            else:
                points = holdout
            ax.scatter(points[age], points[name], s=5, alpha=0.35, color=colour, linewidths=0)
            block = curves[(curves["idp"] == name) & (curves["sex"].astype(str) == str(level))]
            for q, line in block.groupby("q"):
                style = "-" if q == 0.5 else ("--" if 0.1 < q < 0.9 else ":")
                ax.plot(line["age"], line["value"], style, color=colour, lw=1.3,
                        label=f"{sex} {level}" if q == 0.5 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(age, fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    centiles = ", ".join(f"{q:g}" for q in sorted(pd.unique(curves["q"])))
    fig.suptitle(f"Centile curves ({centiles})" + (f" at site {site}" if site is not None else "")
                 + "; dots: held-out data (all sites)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_pit_histograms(pit: dict, idps: Sequence[str]) -> bytes:
    """PIT histograms (density; a calibrated model is flat at 1) per IDP, plus all IDPs pooled."""
    edges = pit["bin_edges"]
    panels = [("all IDPs pooled", pit["histogram_pooled"])]
    panels += [(name, pit["histogram"].loc[name].to_numpy(dtype=float)) for name in idps]
    rows, cols = _grid(len(panels))
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows))
    n = pit["n"]
    band = 1.96 * np.sqrt((len(edges) - 1) / max(n, 1))  # binomial 95% band around density 1
    for k, (name, density) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(edges[:-1], density, width=np.diff(edges), align="edge", color="#9db7d5", edgecolor="white")
        ax.axhline(1.0, color="black", lw=0.8)
        if k > 0:
            ax.axhspan(1 - band, 1 + band, color="grey", alpha=0.15, lw=0)
            ks = pit["per_idp"].loc[name, "ks"]
            name = f"{name} (KS {ks:.3f})"
        ax.set_title(name, fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    fig.suptitle("PIT histograms (flat = calibrated; grey: 95% band for a calibrated model)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_coverage_curve(coverage: dict, groups: dict[str, pd.DataFrame] | None = None) -> bytes:
    """Empirical vs nominal coverage of central intervals: mean over IDPs and the per-IDP spread."""
    curve = coverage["curve"]
    levels = np.asarray(curve.columns, dtype=float)
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.45, 1.0], [0.45, 1.0], color="black", lw=0.8, label="ideal")
    ax.fill_between(levels, curve.min(axis=0).to_numpy(), curve.max(axis=0).to_numpy(), color="#9db7d5",
                    alpha=0.5, lw=0, label="range over IDPs")
    ax.plot(levels, curve.mean(axis=0).to_numpy(), "o-", color="#1f5fa8", ms=3, label="mean over IDPs")
    ax.set_xlabel("nominal central-interval level")
    ax.set_ylabel("empirical coverage")
    ax.set_xlim(0.45, 1.0)
    ax.set_ylim(max(0.0, float(np.nanmin(curve.to_numpy())) - 0.05), 1.0)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_title(f"Coverage; |ECP - 0.95| = {coverage['abs_error']:.3f}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_nn_ratio_histogram(memorisation: dict) -> bytes:
    """Histogram of r = d_NN(train) / d_NN(held-out) per generated sample (no memorisation: centred at 1)."""
    ratios = np.asarray(memorisation["ratios"], dtype=float)
    fig = Figure(figsize=(4.8, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    upper = float(np.quantile(ratios, 0.995)) if ratios.size else 2.0
    ax.hist(np.clip(ratios, 0, upper), bins=50, color="#9db7d5", edgecolor="white")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(memorisation["median_ratio"], color="#b03024", lw=1.2, ls="--", label="median")
    ax.set_xlabel("d_NN(train) / d_NN(held-out)")
    ax.set_ylabel("generated samples")
    lo, hi = memorisation["p_lt_1_ci"]
    ax.set_title(f"Memorisation: median r = {memorisation['median_ratio']:.3f}, "
                 f"P[r<1] = {memorisation['p_lt_1']:.3f} [{lo:.3f}, {hi:.3f}]", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def plot_correlation_matrices(correlation: dict, max_idps: int = 40) -> bytes:
    """Real and generated IDP correlation matrices side by side, and their difference."""
    real, generated = correlation["real"], correlation["generated"]
    if len(real) > max_idps:
        keep = real.index[:max_idps]
        real, generated = real.loc[keep, keep], generated.loc[keep, keep]
    fig = Figure(figsize=(13, 4.4))
    panels = [("held-out data", real, "RdBu_r", (-1, 1)), ("model samples", generated, "RdBu_r", (-1, 1)),
              ("difference (model - data)", generated - real, "PuOr_r", (-0.5, 0.5))]
    for k, (title, matrix, cmap, (vmin, vmax)) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        image = ax.imshow(matrix.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
        if len(matrix) <= 20:
            ax.set_xticks(range(len(matrix)), matrix.columns, rotation=90, fontsize=6)
            ax.set_yticks(range(len(matrix)), matrix.index, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    shown = f" (first {max_idps} IDPs)" if len(correlation["real"]) > max_idps else ""
    fig.suptitle(f"Correlation matrices{shown}; Frobenius error {correlation['frobenius']:.3f} "
                 f"(sampling-noise level {correlation['noise_floor']:.3f})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def make_figures(results: dict, max_panels: int = MAX_PANELS) -> dict[str, bytes]:
    """All calibration figures of :func:`~normdiff_bids.evaluation.evaluate.evaluate` results, as PNG bytes.

    Keys: ``centile_curves`` (when the model could draw them), ``pit``, ``coverage``, ``nn_ratio``
    (when memorisation was computed), ``correlation`` (when D >= 2).
    """
    tables = results["tables"]
    idps = results["config"]["idps"]
    shown = choose_idps(idps, results.get("per_idp"), "ace", max_panels)
    figures = {}
    if "centile_curves" in tables:
        figures["centile_curves"] = plot_centile_curves(tables["centile_curves"], tables["holdout"], shown)
    figures["pit"] = plot_pit_histograms(tables["pit"], shown)
    figures["coverage"] = plot_coverage_curve(tables["coverage"])
    if "memorisation" in tables:
        figures["nn_ratio"] = plot_nn_ratio_histogram(tables["memorisation"])
    if "correlation" in tables:
        figures["correlation"] = plot_correlation_matrices(tables["correlation"])
    return figures
