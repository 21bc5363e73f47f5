"""HTML reports: the promised sections, the flagged IDPs, self-contained (no external URLs), escaped text."""

from __future__ import annotations

import re

import numpy as np
import pytest
from outputs_helpers import FakeModel, tiny_scores, write_tiny_freesurfer_subject

from normdiff_bids.outputs.maps import write_deviation_maps
from normdiff_bids.outputs.reports import (
    calibration_fragment,
    centile_curve_data,
    write_group_report,
    write_subject_report,
)
from normdiff_bids.outputs.tables import scores_to_wide

_DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
_EXTERNAL = re.compile(r"""(?:https?:)?//[^\s"'<>]+|(?:src|href)\s*=\s*["'](?!data:|#|sub-|group\.html)""",
                       re.I)


def _external_references(html: str) -> list[str]:
    # The only references allowed: inline data URIs, in-page anchors and relative links to derivative files.
    return _EXTERNAL.findall(_DATA_URI.sub("data:", html))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    fs = root / "fs" / "sub-01"
    write_tiny_freesurfer_subject(fs)
    tidy, cov = tiny_scores()
    wide = scores_to_wide(tidy, cov)
    out = root / "deriv"
    maps = write_deviation_maps(out, wide.iloc[0], fs)
    volumes = {m: paths[0] for m, paths in maps.items() if m != "surfaces"}
    model = FakeModel()
    path = write_subject_report(out, wide.iloc[0], model=model, maps=volumes,
                                label_volume=fs / "mri" / "aparc+aseg.mgz",
                                files=[p for paths in maps.values() for p in paths],
                                cohort_joint_z=wide["joint_z"], model_name="default")
    return {"out": out, "path": path, "html": path.read_text(), "wide": wide, "model": model}


def test_subject_report_is_named_and_has_every_section(rendered):
    assert rendered["path"] == rendered["out"] / "sub-01_ses-1.html"
    html = rendered["html"]
    for section in ("summary", "profile", "extreme", "centiles", "joint", "maps", "files", "methods"):
        assert f'<section id="{section}">' in html, section
    slices = html.split('aria-label="deviation map slices"')[1].split("</svg>")[0]
    assert html.count("data:image/png;base64,") == slices.count("data:image/png;base64,") > 0  # one per map
    for chart in ("deviation profile", "centile curves", "joint deviation"):  # inline SVG
        assert '<svg class="figure" ' in html and f'aria-label="{chart}"' in html, chart


def test_the_extreme_idps_are_flagged_with_their_centiles(rendered):
    extreme = rendered["html"].split('<section id="extreme">')[1].split("</section>")[0]
    # tiny_scores gives sub-01 z = 3.1 (Left-Hippocampus) and z = -2.2 (lh_superiorfrontal_thickness)
    assert extreme.index("Left-Hippocampus") < extreme.index("lh_superiorfrontal_thickness")
    assert 'class="flag2">**</td>' in extreme and 'class="flag1">*</td>' in extreme
    assert "99.9%" in extreme and "1.4%" in extreme
    assert "above every model sample" in extreme  # the tail flag of the z = 3.1 value


def test_centile_curves_come_from_the_model_at_the_subjects_covariates(rendered):
    grid = rendered["model"].calls[0]
    assert set(grid["sex"]) == {"F"} and set(grid["site"]) == {"siteA"}
    assert grid["age"].min() == 20.0 and grid["age"].max() == 80.0  # the training range
    curves = centile_curve_data(rendered["model"], rendered["wide"].iloc[0], ["Left-Hippocampus"])
    assert curves[0]["subject_age"] == 40.0 and np.isfinite(curves[0]["value"])
    assert list(curves[0]["quantiles"].columns) == [0.005, 0.025, 0.25, 0.5, 0.75, 0.975, 0.995]


def test_reports_reference_nothing_outside_themselves(rendered):
    assert _external_references(rendered["html"]) == []
    assert "<script" not in rendered["html"]


def test_a_report_without_model_or_maps_says_what_is_missing(tmp_path):
    tidy, cov = tiny_scores()
    row = scores_to_wide(tidy, cov).iloc[2]
    html = write_subject_report(tmp_path, row).read_text()
    assert "No model was given" in html and "No deviation map was written" in html
    assert "outside the range the model was trained on" in html  # sub-03 is extrapolated


def test_text_from_the_data_is_escaped(tmp_path):
    tidy, cov = tiny_scores()
    cov["site"] = "<script>alert(1)</script>"
    html = write_subject_report(tmp_path, scores_to_wide(tidy, cov).iloc[0]).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_group_report_embeds_the_model_card_and_the_calibration_report(rendered):
    calibration = ("<!DOCTYPE html><html><head><title>t</title><style>body{margin:9px}</style></head>"
                   "<body><h1>Calibration</h1><div class='ndc'><style>.ndc .v{color:#123}</style>"
                   "<p class='v'>Calibration: ACE 0.012</p></div></body></html>")
    path = write_group_report(rendered["out"], rendered["wide"], model_card=rendered["model"].model_card(),
                              calibration_html=calibration, model_name="default")
    html = path.read_text()
    assert path.name == "group.html"
    for section in ("cohort", "model-card", "calibration", "deviations", "subjects"):
        assert f'<section id="{section}">' in html, section
    assert "Calibration: ACE 0.012" in html and ".ndc .v{color:#123}" in html
    # the standalone page's own frame (title, page-wide styles, h1) stays out of the group report
    assert html.count("<html") == 1 and "<title>t</title>" not in html and "body{margin:9px}" not in html
    assert "<h1>Calibration</h1>" not in html
    assert "film-mlp" in html and "training_summary.best_val_loss" in html and "0.91" in html
    assert '<a href="sub-01_ses-1.html">' in html
    assert _external_references(html) == []


def test_group_report_summarises_each_covariate_by_its_kind(rendered, tmp_path):
    from normdiff_bids.covariate_spec import CovariateSpecs

    wide = rendered["wide"].assign(field=[3, 15, 15], tiv=[1400.0, 1500.0, 1650.0])
    spec = CovariateSpecs.from_options(covariates=["field:categorical", "tiv:continuous"])
    html = write_group_report(tmp_path, wide, covariates=spec.to_list()).read_text()
    assert "<h3>field</h3>" in html and "<h3>site</h3>" in html  # level counts of the categorical ones
    assert "tiv (min / median / max)" in html and "1,400.0 / 1,500.0 / 1,650.0" in html
    assert "age (min / median / max)" in html


def test_group_report_without_calibration_says_so(tmp_path):
    tidy, cov = tiny_scores()
    html = write_group_report(tmp_path, tidy).read_text()
    assert "No calibration report is available" in html and "No model card was given" in html


def test_calibration_fragments_are_embedded_as_they_are():
    assert str(calibration_fragment("<div>ok</div>")) == "<div>ok</div>"


def test_the_model_cards_covariates_read_as_text_not_json():
    from normdiff_bids.outputs.reports import _card_rows

    age = {"name": "age", "kind": "continuous", "mean": 51.1, "sd": 21.3, "range": [8.36, 84.5]}
    site = {"name": "site", "kind": "categorical", "levels": ["site1", "site2"]}
    rows = _card_rows({"covariates": [age, site]})
    assert rows == [("covariates", "age (continuous, 8.36 to 84.5); site (categorical: site1, site2)")]
