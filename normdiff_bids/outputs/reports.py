"""HTML reports: one per subject[/session] (``sub-<label>[_ses-<label>].html``) and one for the group.

Reports are single self-contained files (charts as inline SVG, images as base64 PNG, styles inline, no
scripts, no external URLs), rendered from the jinja2 templates in ``outputs/templates/`` with autoescaping on
(:mod:`normdiff_bids.templating`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from markupsafe import Markup

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.conventions import preview
from normdiff_bids.outputs import flags, names, svg
from normdiff_bids.outputs.regions import describe_idp
from normdiff_bids.outputs.score_tables import covariate_columns, given_idps, idps_of_wide, scores_to_wide
from normdiff_bids.templating import render

#: Centiles drawn on the centile curves (the 0.5/99.5 and 2.5/97.5 bands match the |z| flags).
CURVE_QUANTILES: tuple[float, ...] = (0.005, 0.025, 0.25, 0.5, 0.75, 0.975, 0.995)


# -------------------------------------------------------------------------------------------------------
# subject report
# -------------------------------------------------------------------------------------------------------

def _subject_idp_table(row: pd.Series) -> pd.DataFrame:
    idps = [i for i in idps_of_wide(row.to_frame().T)]
    records = []
    for idp in idps:
        info = describe_idp(idp)
        z = _float(row.get(f"{idp}_z"))
        tail = row.get(f"{idp}_tail")
        records.append({
            "idp": idp, "measure": info.measure, "units": info.units, "structure": info.description,
            "value": _float(row.get(f"{idp}_value")), "centile": _float(row.get(f"{idp}_centile")), "z": z,
            "cond_centile": _float(row.get(f"{idp}_cond_centile")),
            "cond_z": _float(row.get(f"{idp}_cond_z")),
            "tail": int(tail) if tail is not None and not pd.isna(tail) else 0,
            "flag": "**" if abs(z) > flags.Z_STRONG else "*" if abs(z) > flags.Z_FLAG else "",
        })
    return pd.DataFrame.from_records(records)


def _is_true(value) -> bool:
    if value is None or value is pd.NA:
        return False
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value) if not pd.isna(value) else False


def _float(value) -> float:
    try:
        return float(value) if value is not None and not pd.isna(value) else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _grid_covariates(model, row: pd.Series, ages: np.ndarray, age: str = "age") -> pd.DataFrame:
    names_ = list(getattr(model, "covariates", ("age", "sex", "site")))
    grid = pd.DataFrame({age: ages})
    for name in names_:
        if name == age:
            continue
        grid[name] = row.get(name)
    return grid


def _age_range(model, subject_age: float, age: str = "age") -> tuple[float, float]:
    schema = getattr(model, "covariate_schema_", None)
    for cov in getattr(schema, "continuous", []) or []:
        if getattr(cov, "name", None) == age:
            lo, hi = float(cov.min), float(cov.max)
            if np.isfinite(subject_age):
                lo, hi = min(lo, subject_age), max(hi, subject_age)
            return lo, hi
    if np.isfinite(subject_age):
        return max(0.0, subject_age - 20.0), subject_age + 20.0
    raise ValueError(f"no age range: the model has no {age!r} covariate and the subject no age")


def _age_name(covariates) -> str:
    """The age covariate's name in a covariate specification (``"age"`` without one)."""
    if covariates is None:
        return "age"
    from normdiff_bids.covariate_spec import CovariateSpecs

    name = CovariateSpecs.coerce(covariates).name_of("age")
    if name is None:
        raise ValueError("the covariates have no age, the axis of the centile curves")
    return name


def centile_curve_data(model, row: pd.Series, idps: Sequence[str], *, n_ages: int = 15,
                       quantiles: Sequence[float] = CURVE_QUANTILES, age: str = "age") -> list[dict]:
    """Normative centile curves over age for ``idps`` at the subject's other covariates (sex, site, ...).

    Uses ``model.predict_quantiles`` on a grid of the age covariate (named ``age``) spanning the training
    range (and the subject's age), every other covariate at the subject's own value; each entry also
    carries the subject's own age, value and z for the plot.
    """
    if not idps:
        return []
    subject_age = _float(row.get(age))
    lo, hi = _age_range(model, subject_age, age)
    ages = model.curve_ages(lo, hi, n_ages) if hasattr(model, "curve_ages") else np.linspace(lo, hi, n_ages)
    q = model.predict_quantiles(_grid_covariates(model, row, ages, age), list(quantiles))
    curves = []
    for idp in idps:
        block = q[idp]
        block.columns = [float(c) for c in block.columns]
        curves.append({"idp": idp, "age": ages, "quantiles": block.reset_index(drop=True),
                       "subject_age": subject_age, "value": _float(row.get(f"{idp}_value")),
                       "z": _float(row.get(f"{idp}_z")), "units": describe_idp(idp).units})
    return curves


def render_subject_report(row: pd.Series, *, model=None, maps: Mapping[str, str | os.PathLike] | None = None,
                          label_volume: str | os.PathLike | None = None,
                          cohort_joint_z: Sequence[float] | None = None,
                          files: Sequence[str | os.PathLike] = (), n_curves: int = 6,
                          model_name: str | None = None, output_dir: str | os.PathLike | None = None,
                          covariates=None) -> str:
    """HTML of one subject's report from its wide score row.

    ``model``: the fitted ``NormativeDiffusion`` (for centile curves; without it that section says so).
    ``covariates``: the covariate specification (:class:`~normdiff_bids.covariate_spec.CovariateSpecs` or
    its list form), whose age covariate is the curves' axis (default: the covariate named ``age``).
    ``maps``: ``{measure: path to the NIfTI deviation map}`` and ``label_volume`` (the ``aparc+aseg``
    they were painted into) for the slice figures. ``files``: derivative files to list (relative to
    ``output_dir`` when given).
    """
    table = _subject_idp_table(row)
    if table.empty:
        raise ValueError("the score row has no IDP scores ('<idp>_centile' and '<idp>_z')")
    entities = names.subject_entities(row["participant_id"], row.get("session_id"))
    flagged = table.loc[table["z"].abs() > flags.Z_FLAG].copy()
    flagged = flagged.reindex(flagged["z"].abs().sort_values(ascending=False).index)
    ranked = table.reindex(table["z"].abs().sort_values(ascending=False).index)
    top = ranked.head(max(n_curves, 1))

    profile = svg.deviation_profile(table)

    curves_svg, curves_note = None, None
    if model is None:
        curves_note = "No model was given to the report, so the centile curves are not drawn."
    else:
        try:
            curves = centile_curve_data(model, row, list(top["idp"].head(n_curves)),
                                        age=_age_name(covariates))
            curves_svg = svg.centile_curves(curves) if curves else None
        except (ValueError, KeyError) as err:
            curves_note = f"The centile curves could not be drawn: {err}"

    joint_z = _float(row.get("joint_z"))
    joint_svg = svg.joint_deviation(joint_z, cohort_joint_z) if np.isfinite(joint_z) else None

    slices_svg, slices_note = None, None
    if maps and label_volume is not None:
        slices_svg, slices_note = _map_slices(maps, label_volume)
    else:
        slices_note = "No deviation map was written for this subject (no FreeSurfer aparc+aseg was given)."

    covariates = {c: row.get(c) for c in covariate_columns(row.to_frame().T)
                  if c not in ("participant_id", "session_id")}
    listed = []
    for f in files:
        f = Path(f)
        rel = f.relative_to(output_dir) if output_dir is not None and f.is_absolute() else f
        listed.append(rel.as_posix())

    n_idps = len(table)
    given = given_idps(row.to_frame().T)
    conditional = table.loc[~table["idp"].isin(given) & np.isfinite(table["cond_z"])]
    conditional = conditional.reindex(conditional["cond_z"].abs().sort_values(ascending=False).index)
    joint_n = _float(row.get("joint_n_idps"))
    context = {
        "title": f"normdiff-bids: {_subject_title(entities)}",
        "subject": _subject_title(entities),
        "version": __version__,
        "created": _now(),
        "model_name": model_name,
        "covariates": covariates,
        "extrapolated": _is_true(row.get("extrapolated")),
        "n_idps": n_idps,
        "n_flagged": int((table["z"].abs() > flags.Z_FLAG).sum()),
        "n_strong": int((table["z"].abs() > flags.Z_STRONG).sum()),
        "expected_flagged": 0.05 * n_idps,
        "expected_strong": 0.01 * n_idps,
        "flagged": flagged.to_dict(orient="records"),
        "top": ranked.head(5).to_dict(orient="records"),
        "n_tail": int((table["tail"] != 0).sum()),
        "joint": {"stat": _float(row.get("joint_stat")), "centile": _float(row.get("joint_centile")),
                  "z": joint_z},
        "profile_svg": profile,
        "curves_svg": curves_svg, "curves_note": curves_note,
        "curve_quantiles": CURVE_QUANTILES,
        "joint_svg": joint_svg,
        "slices_svg": slices_svg, "slices_note": slices_note,
        "files": listed,
        "given": given, "given_missing": _is_true(row.get("cond_given_missing")),
        "conditional": conditional.head(15).to_dict(orient="records"),
        "joint_n_idps": int(joint_n) if np.isfinite(joint_n) else None,
        "missing_idps": list(table.loc[~np.isfinite(table["value"]), "idp"]),
    }
    return render("subject_report.html", **context)


def _map_slices(maps: Mapping[str, str | os.PathLike], label_volume) -> tuple[Markup | None, str | None]:
    import nibabel as nib

    from normdiff_bids.outputs.maps import load_label_volume

    labels, img = load_label_volume(label_volume)
    arrays = {}
    for measure, path in maps.items():
        zimg = nib.load(path)
        if zimg.shape != labels.shape or not np.allclose(zimg.affine, img.affine, atol=1e-4):
            return None, f"The {measure} map does not share the label volume's grid; slices not drawn."
        arrays[measure] = np.asarray(zimg.dataobj, dtype=np.float32)
    return svg.map_slices(arrays, labels, img.affine), None


def _subject_title(entities: Mapping[str, str]) -> str:
    return " ".join(f"{k}-{v}" for k, v in entities.items())


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def write_subject_report(output_dir: str | os.PathLike, row: pd.Series, **kwargs) -> Path:
    """Render and write ``sub-<label>[_ses-<label>].html`` at the top of ``output_dir``.

    ``kwargs`` go to :func:`render_subject_report` (``model``, ``maps``, ``label_volume``, ``files``,
    ``cohort_joint_z``, ``model_name``, ``covariates``).
    """
    output_dir = Path(output_dir)
    entities = names.subject_entities(row["participant_id"], row.get("session_id"))
    html = render_subject_report(row, output_dir=output_dir, **kwargs)
    path = output_dir / names.subject_report_path(entities)
    atomic_write_text(path, html)
    return path


# -------------------------------------------------------------------------------------------------------
# group report
# -------------------------------------------------------------------------------------------------------

_BODY = re.compile(r"<body[^>]*>(.*)</body>", re.S | re.I)
_H1 = re.compile(r"<h1[^>]*>.*?</h1>", re.S | re.I)


def calibration_fragment(html: str) -> Markup:
    """The embeddable part of a calibration report (trusted HTML from the evaluation library).

    A fragment (``render_calibration_report(..., standalone=False)``) is embedded as it is. A full document
    is reduced to its body without its page title: the styles in its head are page-wide rules (``body``)
    that would restyle the group report, while its own scoped styles live in the body.
    """
    body = _BODY.search(html)
    if body is None:
        return Markup(html)
    return Markup(_H1.sub("", body.group(1), count=1))


#: Model-card fields shown first in the group report (the rest sit in a folded table).
_CARD_HEADLINE = {
    "estimator", "backbone", "package_version", "version", "created", "n_train", "idps", "covariates",
    "preprocessing", "sampler", "steps", "n_samples", "n_networks", "unknown_site", "seed",
    "training_summary.epochs_run",
    "training_summary.stopped_early", "training_summary.best_val_loss", "training_summary.n_parameters",
    "training_summary.device", "training_summary.seconds",
}


def _covariate_text(cov: Mapping) -> str:
    """One covariate of the model card as a reader wants it: ``age (continuous, 8.4 to 84.5)``."""
    name, kind = cov.get("name", "?"), cov.get("kind", "?")
    if kind == "continuous" and isinstance(cov.get("range"), list | tuple) and len(cov["range"]) == 2:
        low, high = cov["range"]
        return f"{name} (continuous, {low:.4g} to {high:.4g})"
    levels = cov.get("levels")
    if isinstance(levels, list):
        return f"{name} ({kind}: {preview([str(v) for v in levels], n=8)})"
    return f"{name} ({kind})"


def _card_rows(card: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in card.items():
        name = f"{prefix}{key}"
        if name == "covariates" and isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            rows.append((name, "; ".join(_covariate_text(v) for v in value)))
        elif isinstance(value, Mapping) and value:
            rows.extend(_card_rows(value, prefix=f"{name}."))
        elif isinstance(value, list) and len(value) > 12:
            rows.append((name, f"{len(value)} items: " + ", ".join(map(str, value[:8])) + ", \u2026"))
        elif isinstance(value, Mapping | list):
            rows.append((name, json.dumps(value, default=str)))
        else:
            rows.append((name, f"{value:.6g}" if isinstance(value, float | np.floating) else str(value)))
    return rows


def render_group_report(scores: pd.DataFrame, *, model_card: Mapping | None = None,
                        calibration_html: str | None = None, subject_reports: Sequence[str] = (),
                        model_name: str | None = None, covariates=None) -> str:
    """HTML of the group report: cohort, model card, calibration report, and the deviations of the cohort.

    ``scores``: the wide (or tidy) score table of the cohort. ``calibration_html``: the output of
    ``normdiff_bids.evaluation.render_calibration_report`` (a fragment or a full document; embedded as is,
    it is trusted HTML). ``subject_reports``: report file names to link (relative to the output folder).
    ``covariates``: the covariate specification (:class:`~normdiff_bids.covariate_spec.CovariateSpecs`
    or its list form): the cohort section summarises each covariate by its kind (default: age, sex and
    site).
    """
    from normdiff_bids.covariate_spec import CovariateSpecs
    from normdiff_bids.outputs import figures  # matplotlib: only the group report needs it

    spec = CovariateSpecs.coerce(covariates)
    wide = scores_to_wide(scores) if "idp" in scores.columns else scores
    idps = idps_of_wide(wide)
    n = len(wide)
    zcols = [f"{i}_z" for i in idps]
    z = wide[zcols].to_numpy(dtype=float) if idps else np.empty((n, 0))
    rates = pd.DataFrame({"idp": idps, "rate": np.nanmean(np.abs(z) > flags.Z_FLAG, axis=0) if n else 0.0})
    joint_z = wide["joint_z"].to_numpy(dtype=float) if "joint_z" in wide.columns else np.array([])

    cohort = {"n_rows": n,
              "n_participants": int(wide["participant_id"].nunique()) if "participant_id" in wide else n,
              "n_idps": len(idps), "ranges": {}}
    for col in spec.of_kind("continuous"):
        if col in wide.columns and wide[col].notna().any():
            values = pd.to_numeric(wide[col], errors="coerce")
            cohort["ranges"][col] = (float(values.min()), float(values.median()), float(values.max()))
    counts = {}
    for col in spec.of_kind("categorical"):
        if col in wide.columns:
            counts[col] = wide[col].astype("str").value_counts().sort_index().to_dict()

    top = pd.DataFrame()
    if joint_z.size and np.isfinite(joint_z).any():
        keep = [c for c in ("participant_id", "session_id", *spec.names, "joint_centile", "joint_z")
                if c in wide.columns]
        top = wide.loc[np.argsort(-np.nan_to_num(joint_z, nan=-np.inf))[:10], keep].copy()
        available = set(map(str, subject_reports))
        paths = [names.subject_report_path(names.subject_entities(r["participant_id"], r.get("session_id")))
                 .as_posix() for _, r in top.iterrows()]
        top["report"] = [p if p in available else "" for p in paths]
    flagged_total = float(np.nanmean(np.abs(z) > flags.Z_FLAG)) if z.size else float("nan")
    card_rows = _card_rows(model_card) if model_card else []

    context = {
        "title": "normdiff-bids: group report",
        "version": __version__,
        "created": _now(),
        "model_name": model_name,
        "cohort": cohort,
        "counts": counts,
        "card_rows": [r for r in card_rows if r[0] in _CARD_HEADLINE],
        "card_more": [r for r in card_rows if r[0] not in _CARD_HEADLINE],
        "card_json": json.dumps(model_card, indent=2, default=str) if model_card else None,
        "calibration": calibration_fragment(calibration_html) if calibration_html else None,
        "joint_svg": svg.joint_deviation(np.nan, joint_z) if joint_z.size > 1 else None,
        "rates_uri": figures.to_data_uri(figures.flag_rates(rates)) if len(rates) and n else None,
        "flagged_total": flagged_total,
        "n_extrapolated": int(wide["extrapolated"].fillna(False).astype(bool).sum())
        if "extrapolated" in wide.columns else 0,
        "top": top.to_dict(orient="records"),
        "subject_reports": list(map(str, subject_reports)),
    }
    return render("group_report.html", **context)


def write_group_report(output_dir: str | os.PathLike, scores: pd.DataFrame, **kwargs) -> Path:
    """Render and write ``group.html`` at the top of ``output_dir``; links the subject reports found there.

    ``kwargs`` go to :func:`render_group_report` (``model_card``, ``calibration_html``, ``model_name``).
    """
    output_dir = Path(output_dir)
    kwargs.setdefault("subject_reports", sorted(p.name for p in output_dir.glob("sub-*.html")))
    path = output_dir / names.group_report_path()
    atomic_write_text(path, render_group_report(scores, **kwargs))
    return path
