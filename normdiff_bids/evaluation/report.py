"""HTML calibration report (jinja2): a standalone page or a fragment for the group report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from normdiff_bids import __version__
from normdiff_bids.evaluation.figures import data_uri
from normdiff_bids.scoring.conformal import MIN_CHECK_VALUES
from normdiff_bids.templating import render

_FIGURE_CAPTIONS = [
    ("centile_curves", ("Centile curves", "Model centiles over age for each sex at the most common site; "
                        "dots are held-out people from every site.")),
    ("pit", ("PIT histograms", "Centile of each held-out value under the model. Flat means calibrated; "
                               "a U shape means intervals too narrow, a hump too wide, a slope a shifted "
                               "median.")),
    ("coverage", ("Coverage curve", "Share of held-out values inside the model's central intervals; on the "
                                    "diagonal is ideal, below it the intervals are too narrow.")),
    ("nn_ratio", ("Memorisation", "Nearest-neighbour distance ratio of model samples; mass well below 1 "
                                  "would mean samples copy training people.")),
    ("correlation", ("Dependence between IDPs", "Correlation matrices of held-out data and model samples.")),
]

#: Columns shown in the per-sex / per-site tables: (result key, header, digits).
_GROUP_COLUMNS = [
    ("n_holdout", "n", 0), ("ace", "ACE", 3), ("ace_noise_floor", "ACE floor", 3),
    ("coverage95", "coverage 95%", 3), ("pit_ks", "PIT-KS", 3), ("ks_frac_reject", "KS reject", 3),
    ("corr_frobenius", "corr. error", 3), ("nn_median_ratio", "NN ratio", 3),
    ("centile_mae", "|c - truth|", 3),
]
_IDP_COLUMNS = [
    ("ace", "ACE", 3), ("ace_noise_floor", "ACE floor", 3), ("coverage95", "coverage 95%", 3),
    ("pit_ks", "PIT-KS", 3), ("ks_mean_stat", "KS mean", 3), ("ks_fisher_p", "KS Fisher p", 3),
    ("centile_mae", "|c - truth|", 3),
]


#: What the joint deviation's card adds when it fails and one network's draws alone decide it (the
#: calibration layer is off, or it had too few reference controls for a joint map).
JOINT_REMEDY = ("; no joint map corrects it (the calibration layer is off or had too few reference "
                "controls), so the joint centile is taken among one network's draws, whose dependence "
                "between IDPs varies from fit to fit: refit with the calibration layer on, or with "
                "n_networks=3 (BIDS-App: --model-options '{\"n_networks\": 3}'), which pools three "
                "networks' draws at about three times the training time")

#: What the card adds when it fails and the joint map could not be checked on unseen controls (a model
#: with 0.12 IDPs per training row or more, fewer unseen controls than the check needs, and no fold
#: models: ``joint_folds=0``).
JOINT_UNCHECKED = ("; the joint map was learnt from reference controls the network has seen, and {n} "
                   "controls that no part of the model saw were left to check it ({needed} needed), so "
                   "it is uncorrected: refit with joint_folds=5 (BIDS-App: --model-options "
                   "'{{\"joint_folds\": 5}}'), which learns it from fold models that never saw the controls "
                   "they score, at about six times the training time; or use more reference controls, or "
                   "fewer IDPs (below 0.12 per control the map is corrected without them)")


def _joint_advice(get) -> str:
    if get("joint_from_draws") and get("n_networks") == 1:
        return JOINT_REMEDY
    if get("joint_unchecked_controls") is not None:
        return JOINT_UNCHECKED.format(n=get("joint_unchecked_controls"), needed=MIN_CHECK_VALUES)
    return ""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float | np.floating):
        if not math.isfinite(value):
            return "n/a"
        if digits == 0:
            return f"{value:.0f}"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(frame: pd.DataFrame, columns) -> dict:
    present = [(key, header, digits) for key, header, digits in columns if key in frame.columns]
    rows = []
    for index, row in frame.iterrows():
        rows.append([str(index)] + [_fmt(row.get(key), digits) if pd.notna(row.get(key)) else "n/a"
                                    for key, _, digits in present])
    return {"columns": [header for _, header, _ in present], "rows": rows}


def _cards(results: dict) -> list[dict]:
    def get(key):
        value = results.get(key)
        return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value

    cards = []
    ace, floor = get("ace"), get("ace_noise_floor")
    if ace is not None:
        cards.append({"label": "ACE", "value": _fmt(ace),
                      "bad": floor is not None and ace > 1.5 * floor + 0.01,
                      "hint": f"perfect model on these bins: {_fmt(floor)}"})
    if get("centile_mae") is not None:
        cards.append({"label": "mean |centile - truth|", "value": _fmt(get("centile_mae")),
                      "bad": get("centile_mae") > 0.05, "hint": "synthetic truth; 0 is perfect"})
    if get("coverage95") is not None:
        err = get("coverage95_abs_error")
        tolerance = get("coverage95_tolerance") or 0.03
        cards.append({"label": "coverage of 95% interval", "value": _fmt(get("coverage95")),
                      "bad": err is not None and err > tolerance,
                      "hint": f"mean |ECP - 0.95| over IDPs: {_fmt(err)}; a calibrated model stays within "
                              f"{_fmt(tolerance)} at n = {get('n_holdout')}"})
    if get("pit_ks") is not None:
        critical = get("pit_ks_critical") or 0.1
        bad = get("pit_ks") > critical
        rejected = get("pit_n_rejected")
        cards.append({"label": "PIT-KS per IDP", "value": _fmt(get("pit_ks")), "bad": bad,
                      "hint": ("FAILS: per-IDP centiles are not uniform on held-out people; " if bad else
                               "uniform: ")
                      + f"mean over IDPs against the 5% critical value {_fmt(critical)} at n = "
                        f"{get('n_holdout')}; worst IDP {_fmt(get('pit_ks_max'))}"
                      + ("" if rejected is None else
                         f"; {rejected} of {get('pit_n_idps')} IDPs rejected (KS, 5% FDR)")})
    if get("joint_pit_ks") is not None:
        bad = get("joint_pit_ks") > get("joint_pit_ks_critical")
        cards.append({"label": "PIT-KS of the joint deviation", "value": _fmt(get("joint_pit_ks")),
                      "bad": bad,
                      "hint": ("FAILS: held-out joint centiles are not uniform; " if bad else "uniform: ")
                      + f"5% critical value {_fmt(get('joint_pit_ks_critical'))} at n = {get('joint_n')}; "
                        f"above 0.95: {_fmt(get('joint_share_95'))} (nominal 0.05), above 0.99: "
                        f"{_fmt(get('joint_share_99'))} (0.01)"
                      + (_joint_advice(get) if bad else "")})
    if get("ks_frac_reject") is not None:
        cards.append({"label": "KS tests rejected", "value": _fmt(get("ks_frac_reject")),
                      "bad": get("ks_frac_reject") > 0.1,
                      "hint": f"{results.get('ks_n_tests', 0)} IDP x age-bin tests, BH 5% within IDP"})
    if get("corr_frobenius") is not None:
        cards.append({"label": "correlation-matrix error", "value": _fmt(get("corr_frobenius")),
                      "bad": get("corr_noise_floor") is not None
                      and get("corr_frobenius") > 2 * get("corr_noise_floor"),
                      "hint": f"Frobenius; sampling-noise level {_fmt(get('corr_noise_floor'))}"})
    if get("dep_frac_pairs_beat_pom") is not None:
        cards.append({"label": "pairs closer than independent", "value": _fmt(get("dep_frac_pairs_beat_pom")),
                      "bad": False, "hint": f"energy {_fmt(get('dep_energy'))} vs "
                                            f"{_fmt(get('dep_energy_pom'))} product of marginals"})
    if get("mantel_r") is not None:
        cards.append({"label": "Mantel r (pair shapes)", "value": _fmt(get("mantel_r")),
                      "bad": get("mantel_r") < 0.5, "hint": f"p = {_fmt(get('mantel_p'))}; 1 is perfect"})
    if get("nn_median_ratio") is not None:
        cards.append({"label": "NN distance ratio (median)", "value": _fmt(get("nn_median_ratio")),
                      "bad": get("nn_median_ratio") < 0.9 or (get("nn_near_duplicate_rate") or 0) > 0,
                      "hint": f"P[r<1] {_fmt(get('nn_p_lt_1'))} [{_fmt(get('nn_p_lt_1_ci_low'))}, "
                              f"{_fmt(get('nn_p_lt_1_ci_high'))}]; near-duplicates "
                              f"{_fmt(get('nn_near_duplicate_rate'))}"})
    return cards


def render_calibration_report(results: dict, figures: dict[str, bytes] | None = None, standalone: bool = True,
                              title: str = "Normative model calibration") -> str:
    """Render :func:`~normdiff_bids.evaluation.evaluate.evaluate` results and their figures as HTML.

    ``figures`` maps names (``centile_curves``, ``pit``, ``coverage``, ``nn_ratio``, ``correlation``) to
    PNG bytes (see :func:`~normdiff_bids.evaluation.figures.make_figures`); they are embedded as base64,
    so the page is one self-contained file. ``standalone=False`` returns a fragment (a single ``<div>``
    with scoped styles) for embedding in another report; mark it safe there (``markupsafe.Markup``).
    """
    figures = figures or {}
    per_idp = results.get("per_idp", pd.DataFrame())
    if "ace" in per_idp:
        per_idp = per_idp.sort_values("ace", ascending=False)
    min_rows = results.get("config", {}).get("min_group_rows")
    groups = [(name, _table(table, _GROUP_COLUMNS)) for name, table in results.get("groups", {}).items()]
    return render(
        "calibration_report.html",
        standalone=standalone,
        title=title,
        version=__version__,
        n_holdout=results.get("n_holdout", "?"),
        n_idps=results.get("n_idps", "?"),
        n_samples=results.get("n_samples", "?"),
        n_train=results.get("n_train", "?"),
        cards=_cards(results),
        figures={key: data_uri(png) for key, png in figures.items()},
        figure_captions=_FIGURE_CAPTIONS,
        group_tables=groups,
        group_note=(f"Levels with fewer than {min_rows} held-out rows show their count only. Smaller groups "
                    "have higher ACE noise floors; compare each ACE with its floor.") if groups else "",
        per_idp=_table(per_idp, _IDP_COLUMNS),
        config=[(k, v if not isinstance(v, list) or len(v) <= 12 else f"{len(v)} items")
                for k, v in results.get("config", {}).items()],
    )
