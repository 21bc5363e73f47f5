"""The subject report's SVG charts: well-formed, every value where it belongs, data text escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from normdiff_bids.outputs import svg
from normdiff_bids.outputs.flags import AMBER as _AMBER
from normdiff_bids.outputs.flags import GREY as _GREY
from normdiff_bids.outputs.flags import RED as _RED

NS = "{http://www.w3.org/2000/svg}"


def _parse(markup) -> ET.Element:
    # inline SVG in HTML needs no namespace; an XML parser does
    return ET.fromstring(str(markup).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


def _all(root, tag):
    return root.iter(f"{NS}{tag}")


@pytest.fixture
def table():
    return pd.DataFrame({
        "idp": ["Left-Hippocampus", "Right-Hippocampus", "CSF", "lh_insula_thickness", "rh_insula_thickness"],
        "measure": ["volume", "volume", "volume", "thickness", "thickness"],
        "z": [3.1, -2.2, np.nan, 0.3, -0.5],
        "centile": [0.999, 0.014, np.nan, 0.62, 0.31],
    })


def test_the_profile_draws_one_point_per_scored_idp_coloured_by_its_flag(table):
    root = _parse(svg.deviation_profile(table))
    circles = list(_all(root, "circle"))
    assert len(circles) == 4  # CSF has no z: no point
    tips = [c.find(f"{NS}title").text for c in circles]
    assert tips[0] == "Left-Hippocampus: z = +3.10, centile 99.9%"
    assert [c.get("fill") for c in circles] == [_RED, _AMBER, _GREY, _GREY]
    texts = [t.text for t in _all(root, "text")]
    assert "volume (3 IDPs)" in texts and "thickness (2 IDPs)" in texts
    assert "lh_insula" in texts and "lh_insula_thickness" not in texts  # the panel names the measure


def test_the_profile_puts_each_point_at_its_z(table):
    root = _parse(svg.deviation_profile(table))
    circles = list(_all(root, "circle"))
    y = np.array([float(c.get("cy")) for c in circles])
    # within a panel, a larger z is higher on the page (smaller y), zero is the centre line
    assert y[0] < y[1] and y[2] < y[3]
    lines = {round(float(e.get("y1")), 1) for e in _all(root, "line") if e.get("stroke") == "black"}
    first_zero = min(lines)
    # the point of z = 3.1 lies 3.1 / 2.2 as far above zero as the point of z = -2.2 lies below it
    assert (first_zero - y[0]) / (y[1] - first_zero) == pytest.approx(3.1 / 2.2, rel=1e-2)


def test_a_long_panel_names_only_its_flagged_points():
    table = pd.DataFrame({"idp": [f"roi{i}_area" for i in range(80)], "measure": "area",
                          "z": np.r_[2.4, np.zeros(79)]})
    texts = [t.text for t in _all(_parse(svg.deviation_profile(table)), "text")]
    assert "roi0" in texts and "roi1" not in texts


def _curve(value=3.0, z=2.7, units="mm"):
    ages = np.linspace(20, 80, 7)
    quantiles = pd.DataFrame({q: 2.5 + 0.2 * np.sign(q - 0.5) * abs(q - 0.5) * 4 + 0 * ages
                              for q in (0.005, 0.025, 0.25, 0.5, 0.75, 0.975, 0.995)})
    return {"idp": "lh_<bad>_thickness", "age": ages, "quantiles": quantiles, "units": units,
            "subject_age": 50.0, "value": value, "z": z}


def test_centile_curves_draw_three_bands_a_median_and_the_subject_where_it_is():
    root = _parse(svg.centile_curves([_curve(), _curve(value=np.nan, z=np.nan)]))
    polygons = list(_all(root, "polygon"))
    bands = [p for p in polygons if p.find(f"{NS}title").text.endswith("centiles")]
    assert len(bands) == 6 and len(list(_all(root, "polyline"))) == 2
    diamonds = [p for p in polygons if p.find(f"{NS}title").text.startswith("this subject")]
    assert len(diamonds) == 1  # the second subject has no value
    assert diamonds[0].get("fill") == _RED
    # the diamond's centre sits between the median line and the top of the panel: value 3.0 > median 2.5
    xs, ys = zip(*(map(float, p.split(",")) for p in diamonds[0].get("points").split()))
    median = next(iter(_all(root, "polyline")))
    median_y = float(median.get("points").split()[0].split(",")[1])
    assert np.mean(ys) < median_y
    # and at the subject's age: halfway along the 20-80 axis (padded equally both sides)
    first = [float(p.split(",")[0]) for p in median.get("points").split()]
    assert np.mean(xs) == pytest.approx((first[0] + first[-1]) / 2, abs=0.2)


def test_text_from_the_data_is_escaped():
    markup = str(svg.centile_curves([_curve(units="<script>")]))
    assert "<script>" not in markup and "&lt;script&gt;" in markup and "&lt;bad&gt;" in markup
    _parse(markup)  # still well-formed


def test_joint_deviation_marks_the_subject_and_the_cohort():
    rng = np.random.default_rng(0)
    cohort = rng.normal(size=200)
    root = _parse(svg.joint_deviation(2.8, cohort))
    subject = [e for e in _all(root, "line") if e.find(f"{NS}title") is not None]
    assert len(subject) == 1 and subject[0].get("stroke") == _RED
    assert any(t.text == "cohort (n = 200)" for t in _all(root, "text"))
    bars = [r for r in _all(root, "rect") if r.get("fill-opacity") == "0.45"]
    lim = max(4.0, np.abs(cohort).max() + 0.5)
    assert len(bars) == np.count_nonzero(np.histogram(cohort, bins=14, range=(-lim, lim))[0])
    few = _parse(svg.joint_deviation(-0.3, [0.1, 0.5, 1.2]))
    assert sum(1 for e in _all(few, "line") if e.get("stroke") == "#555555") == 3
    assert not re.search(r"nan|inf", str(svg.joint_deviation(np.nan)))


def test_map_slices_paint_each_map_over_the_grey_anatomy_in_neurological_view():
    import base64
    import io

    from PIL import Image

    labels = np.zeros((20, 20, 20), dtype=np.int32)
    labels[4:16, 4:16, 4:16] = 2  # brain
    labels[4:10, 4:16, 4:16] = 17  # the subject's left half (low x in RAS) is a scored region
    z = np.where(labels == 17, 4.0, np.nan).astype(np.float32)
    root = _parse(svg.map_slices({"volume": z, "thickness": -z}, labels, np.eye(4)))
    images = list(_all(root, "image"))
    assert len(images) == 2 and "volume" in [t.text for t in _all(root, "text")]
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(i.get("href").split(",", 1)[1]))))
              for i in images]
    row = pixels[0][pixels[0].shape[0] // 2]  # a line through the middle of the slices
    row = row.astype(int)
    red = (row[:, 0] > row[:, 1] + 50) & (row[:, 0] > row[:, 2] + 50)
    grey = (row[:, 0] == row[:, 1]) & (row[:, 1] == row[:, 2]) & (row[:, 0] < 230)
    assert red.any() and grey.any()
    # neurological view: the subject's left (the scored half) is on the left of each slice, so within
    # the first slice the red run lies left of the grey one
    first = slice(0, pixels[0].shape[1] // 5)
    assert np.flatnonzero(red[first]).max() < np.flatnonzero(grey[first]).min()
    other = pixels[1][pixels[1].shape[0] // 2].astype(int)
    assert ((other[:, 2] > other[:, 0] + 50) & (other[:, 2] > other[:, 1] + 20)).any()  # negative: blue
    assert not ((other[:, 0] > other[:, 1] + 50) & (other[:, 0] > other[:, 2] + 50)).any()
