"""The draw table: scoring from the bundle's stored grid draws is the sampling path, bit for bit."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.model import draw_table as dt
from normdiff_bids.model import sampling
from normdiff_bids.model.normative import NormativeDiffusion, load_model

SCORES = ["centile", "z", "joint_stat", "joint_centile"]


@pytest.fixture(scope="module")
def unsaved(one_thread):
    """A fitted model that has scored a test cohort in memory, and what it held before being saved."""
    cohort = SyntheticCohort(n_idps=4, n_sites=3, seed=3)
    train, test = cohort.sample(300, seed=1), cohort.sample(60, seed=2)
    model = NormativeDiffusion(epochs=20, n_samples=60, seed=0, verbose=False).fit(train)
    after_fit = int(model.draw_table_.drawn.sum())
    card = model.model_card()["draw_table"]
    scores = model.score(test)
    return SimpleNamespace(model=model, test=test, drawn_after_fit=after_fit,
                           drawn_after_score=int(model.draw_table_.drawn.sum()), card=card, scores=scores)


@pytest.fixture(scope="module")
def fitted(unsaved, tmp_path_factory):
    model = unsaved.model
    path = model.save(tmp_path_factory.mktemp("m") / "model")
    return model, path, unsaved.test


def _full_grid(model):
    """Every point of the complete table: the grid over the training range for both sexes."""
    age = model.covariate_schema_.continuous[0]
    return dt.grid_points(model._grid(), age.min, age.max, [[1, 2]])


def _exact(model, fn):
    """``fn(model)`` with the table switched off and no cached draws: every point drawn by the network."""
    sampling._POINT_CACHE.clear()
    model.draw_table = "off"
    try:
        return fn(model)
    finally:
        model.draw_table = "auto"
        sampling._POINT_CACHE.clear()


def test_table_covers_the_training_range_for_every_sex(fitted):
    model, _, _ = fitted
    table = model.draw_table_
    assert table is not None and table.samples.shape[1:] == (60, 4)
    age = model.covariate_schema_.continuous[0]
    ages = age.mean + table.points_cont[:, 0].astype(float) * age.sd
    step = model._grid_step()
    for code in (1, 2):  # both sexes (the site is the stage's, not the network's)
        at = ages[table.points_cat[:, 0] == code]
        assert at.min() <= age.min and at.max() >= age.max
        assert np.allclose(np.diff(np.sort(at)), step, rtol=1e-3)
    assert model.model_card()["draw_table"]["points"] == len(table)


def test_scores_from_the_loaded_table_equal_sampling(fitted):
    model, path, test = fitted
    loaded = load_model(path)
    assert loaded.draw_table_ is not None
    sampling._POINT_CACHE.clear()
    from_table = loaded.score(test)
    drawn = _exact(loaded, lambda m: m.score(test))
    cols = ["centile", "z", "joint_stat", "joint_centile"]
    np.testing.assert_array_equal(from_table[cols].to_numpy(), drawn[cols].to_numpy())
    q_table = loaded.predict_quantiles(test.iloc[:8])
    q_drawn = _exact(loaded, lambda m: m.predict_quantiles(test.iloc[:8]))
    np.testing.assert_array_equal(q_table.to_numpy(), q_drawn.to_numpy())


def _inside(model, table):
    age = model.covariate_schema_.continuous[0]
    return table[(table["age"] > age.min) & (table["age"] < age.max)]


def test_table_scoring_builds_no_network_and_imports_no_torch(fitted, tmp_path):
    model, path, test = fitted
    inside = _inside(model, test)
    inside.to_csv(tmp_path / "inside.csv", index=False)
    code = f"""
import sys
import pandas as pd
from normdiff_bids.model.normative import load_model
model = load_model({str(path)!r})
scores = model.score(pd.read_csv({str(tmp_path / "inside.csv")!r}))
curves = model.predict_quantiles(pd.read_csv({str(tmp_path / "inside.csv")!r}).iloc[:3])
assert "_unbuilt" in model.__dict__, "the network was built"
assert "torch" not in sys.modules, "torch was imported"
scores.to_csv({str(tmp_path / "scores.csv")!r}, index=False)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sampling._POINT_CACHE.clear()
    want = _exact(load_model(path), lambda m: m.score(inside))
    got = pd.read_csv(tmp_path / "scores.csv")
    np.testing.assert_allclose(got[SCORES].to_numpy(), want[SCORES].to_numpy(), rtol=1e-12, atol=0)


def test_a_loaded_model_builds_its_network_when_a_point_is_not_in_the_table(fitted):
    model, path, test = fitted
    loaded = load_model(path)
    loaded.predict_centiles(_inside(model, test))
    assert "_unbuilt" in loaded.__dict__ and "network_" not in loaded.__dict__
    far = test.iloc[:2].copy()
    far["age"] = model.covariate_schema_.continuous[0].max + 15.0
    loaded.predict_centiles(far)
    assert "_unbuilt" not in loaded.__dict__ and loaded.backbone_config_ == model.backbone_config_
    assert loaded.model_card()["backbone_config"] == model.model_card()["backbone_config"]


def test_a_bundle_without_the_weights_order_builds_its_network_and_scores_from_its_table(fitted, tmp_path):
    """Bundles of earlier versions do not list the weights in the modules' order, which the weights token
    follows: their model builds its network at load to take the token, and scores from its table."""
    model, path, test = fitted
    old = tmp_path / "old"
    shutil.copytree(path, old)
    meta = json.loads((old / "model.json").read_text())
    assert meta.pop("weights_order") == list(model._weight_arrays())
    data = (json.dumps(meta, indent=2) + "\n").encode()
    (old / "model.json").write_bytes(data)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["files"]["model.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (old / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_model(old)
    assert "_unbuilt" not in loaded.__dict__ and loaded._weights_token() == model._weights_token()
    sampling._POINT_CACHE.clear()
    np.testing.assert_array_equal(loaded.score(test)[SCORES].to_numpy(),
                                  load_model(path).score(test)[SCORES].to_numpy())


def test_ages_beyond_the_table_are_drawn_as_before(fitted):
    model, path, test = fitted
    loaded = load_model(path)
    far = test.iloc[:3].copy()
    far["age"] = model.covariate_schema_.continuous[0].max + 15.0
    sampling._POINT_CACHE.clear()
    got = loaded.predict_centiles(far)
    want = _exact(loaded, lambda m: m.predict_centiles(far))
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_other_sampling_settings_do_not_use_the_table(fitted):
    model, path, test = fitted
    loaded = load_model(path)
    loaded.n_samples = 40  # a participant-level --n-samples: the table's 60 draws are not these
    sampling._POINT_CACHE.clear()
    got = loaded.predict_centiles(test.iloc[:5])
    want = _exact(loaded, lambda m: m.predict_centiles(test.iloc[:5]))
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_off_and_oversized_tables_are_not_built(one_thread, monkeypatch, tmp_path):
    cohort = SyntheticCohort(n_idps=3, n_sites=2, seed=0)
    train = cohort.sample(200, seed=1)
    off = NormativeDiffusion(epochs=3, n_samples=30, seed=0, verbose=False, draw_table="off").fit(train)
    assert off.draw_table_ is None and off.model_card()["draw_table"] is None
    assert load_model(off.save(tmp_path / "off")).draw_table_ is None
    monkeypatch.setattr("normdiff_bids.model.estimator.MAX_TABLE_BYTES", 1000)
    big = NormativeDiffusion(epochs=3, n_samples=30, seed=0, verbose=False).fit(train)
    assert big.draw_table_ is None and big.model_card()["draw_table"] is None
    assert load_model(big.save(tmp_path / "big")).draw_table_ is None


# ------------------------------------------------------------------ the table is completed when saved
def test_fit_and_score_draw_only_their_points_and_score_as_the_saved_model(unsaved, fitted):
    _, path, test = fitted
    n_points = len(_full_grid(unsaved.model)[0])
    # the calibration's and the test rows' points are drawn, not the whole grid
    assert 0 < unsaved.drawn_after_fit <= unsaved.drawn_after_score < n_points
    loaded = load_model(path)
    sampling._POINT_CACHE.clear()
    from_bundle = loaded.score(test)
    np.testing.assert_array_equal(unsaved.scores[SCORES].to_numpy(), from_bundle[SCORES].to_numpy())


def test_the_bundle_holds_the_whole_table_as_one_pass_would_draw_it(unsaved, fitted):
    model, path, _ = fitted
    cont, cat = _full_grid(model)
    table = load_model(path).draw_table_
    assert table.is_complete and table.samples.shape == (len(cont), 60, 4)
    assert table.nbytes == len(cont) * 60 * 4 * 4
    np.testing.assert_array_equal(table.points_cont, cont)
    np.testing.assert_array_equal(table.points_cat, cat)
    # the card written before any table point was drawn already described the complete table
    assert unsaved.card == model.model_card()["draw_table"] == {
        "points": len(cont), "draws_per_point": 60, "megabytes": round(table.nbytes / 2**20, 1), "used": True}
    sampling._POINT_CACHE.clear()
    drawer = model._drawer(use_table=False)
    fresh = dt.DrawTable.planned(drawer.table_settings(60), cont, cat, 4).complete(drawer)
    sampling._POINT_CACHE.clear()
    np.testing.assert_array_equal(table.samples, fresh.samples)


def test_a_table_is_written_only_once_complete():
    cont, cat = dt.grid_points(sampling.Grid(mean=40.0, sd=10.0, step=1.0), 20.0, 22.0, [[1]])
    table = dt.DrawTable.planned({"n_samples": 2}, cont, cat, 1)
    assert not table.is_complete and table.find(cont[0], cat[0]) is None
    with pytest.raises(ValueError, match="complete it"):
        table.to_tensors()
    table.keep(cont[0], cat[0], np.ones((2, 1), dtype=np.float32))
    np.testing.assert_array_equal(table.find(cont[0], cat[0]), np.ones((2, 1)))


def test_a_model_saved_with_other_sampling_settings_saves_their_table(fitted, tmp_path):
    model, _, test = fitted
    other = copy.copy(model)
    other.n_samples = 40  # the fitted table's 60 draws are not what this model draws
    loaded = load_model(other.save(tmp_path / "model"))
    assert loaded.draw_table_.samples.shape[1] == 40 and len(loaded.draw_table_) == len(model.draw_table_)
    assert model.draw_table_.samples.shape[1] == 60  # the original keeps its own
    sampling._POINT_CACHE.clear()
    got = loaded.predict_centiles(test.iloc[:5])
    want = _exact(loaded, lambda m: m.predict_centiles(test.iloc[:5]))
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_points_drawn_together_in_full_calls_equal_points_drawn_alone(fitted, monkeypatch):
    model, _, _ = fitted
    drawer = model._drawer(use_table=False)
    cont, cat = (a[:12] for a in _full_grid(model))
    n_samples = 1024  # 4 points per network call
    sampling._POINT_CACHE.clear()
    alone = np.concatenate([drawn for i in range(12)
                            for _, drawn in drawer.draw(cont[i:i + 1], cat[i:i + 1], n_samples, "t")])
    sampling._POINT_CACHE.clear()
    list(drawer.draw(cont[::3], cat[::3], n_samples, "t"))  # 4 of the 12 points are cached
    calls = []
    sample = model._diffusion.sample
    monkeypatch.setattr(model._diffusion, "sample", lambda *a, **k: calls.append(1) or sample(*a, **k))
    together = np.concatenate([drawn for _, drawn in drawer.draw(cont, cat, n_samples, "t")])
    sampling._POINT_CACHE.clear()
    assert len(calls) == 2  # the 8 others in two full calls, not one call for each group of 4
    np.testing.assert_array_equal(together, alone)


def test_grid_points_match_the_scoring_plan():
    grid = sampling.Grid(mean=40.0, sd=10.0, step=0.5)
    cont, cat = dt.grid_points(grid, 20.0, 22.0, [[1, 2]])
    rows = np.column_stack([(np.array([20.3, 21.7]) - 40.0) / 10.0]).astype(np.float32)
    pc, pk, _, _, _ = sampling.plan_points(rows, np.array([[2], [1]]), np.arange(2), grid)
    table = dt.DrawTable({}, cont, cat, np.zeros((len(cont), 2, 1), dtype=np.float32))
    assert all(table.find(c, k) is not None for c, k in zip(pc, pk))

