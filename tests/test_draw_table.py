"""The draw table: scoring from the bundle's stored grid draws is the sampling path, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.model import draw_table as dt
from normdiff_bids.model import sampling
from normdiff_bids.model.normative import NormativeDiffusion, load_model


@pytest.fixture(scope="module")
def fitted(one_thread, tmp_path_factory):
    cohort = SyntheticCohort(n_idps=4, n_sites=3, seed=3)
    train, test = cohort.sample(300, seed=1), cohort.sample(60, seed=2)
    model = NormativeDiffusion(epochs=20, n_samples=60, seed=0, verbose=False).fit(train)
    path = model.save(tmp_path_factory.mktemp("m") / "model")
    return model, path, test


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


def test_table_scoring_needs_no_network(fitted, monkeypatch):
    model, path, test = fitted
    loaded = load_model(path)
    sampling._POINT_CACHE.clear()
    inside = test[(test["age"] > model.covariate_schema_.continuous[0].min)
                  & (test["age"] < model.covariate_schema_.continuous[0].max)]

    def no_network(*args, **kwargs):
        raise AssertionError("the network was evaluated although every point is in the table")

    monkeypatch.setattr(loaded._diffusion, "sample", no_network)
    assert np.isfinite(loaded.predict_centiles(inside).to_numpy()).all()


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


def test_off_and_oversized_tables_are_not_built(one_thread, monkeypatch):
    cohort = SyntheticCohort(n_idps=3, n_sites=2, seed=0)
    train = cohort.sample(200, seed=1)
    off = NormativeDiffusion(epochs=3, n_samples=30, seed=0, verbose=False, draw_table="off").fit(train)
    assert off.draw_table_ is None and off.model_card()["draw_table"] is None
    monkeypatch.setattr("normdiff_bids.model.estimator.MAX_TABLE_BYTES", 1000)
    big = NormativeDiffusion(epochs=3, n_samples=30, seed=0, verbose=False).fit(train)
    assert big.draw_table_ is None


def test_grid_points_match_the_scoring_plan():
    grid = sampling.Grid(mean=40.0, sd=10.0, step=0.5)
    cont, cat = dt.grid_points(grid, 20.0, 22.0, [[1, 2]])
    rows = np.column_stack([(np.array([20.3, 21.7]) - 40.0) / 10.0]).astype(np.float32)
    pc, pk, _, _, _ = sampling.plan_points(rows, np.array([[2], [1]]), np.arange(2), grid)
    table = dt.DrawTable({}, cont, cat, np.zeros((len(cont), 2, 1), dtype=np.float32))
    assert all(table.find(c, k) is not None for c, k in zip(pc, pk))

