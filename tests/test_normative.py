"""NormativeDiffusion: contracts, reproducibility, batch independence, persistence, bad input, calibration."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from model_helpers import centile_errors
from scipy.special import ndtri

from normdiff_bids import NormativeDiffusion, load_model
from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.errors import InputError
from normdiff_bids.model.bundle import BundleError
from normdiff_bids.model.normative import _POINT_CACHE
from normdiff_bids.scoring.conformal import ProbitMap
from normdiff_bids.scoring.joint import joint_deviation, model_shrinkage

TINY = {"hidden": 32, "n_blocks": 2, "time_embed_dim": 16}
SCORE_COLUMNS = ["participant_id", "idp", "value", "centile", "z", "tail", "extrapolated", "unknown_site",
                 "joint_stat",
                 "joint_centile", "joint_z", "joint_n_idps"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def train(cohort):
    return cohort.sample(400, seed=1)


@pytest.fixture(scope="module")
def test(cohort):
    return cohort.sample(12, seed=2)


def tiny_model(**overrides):
    params = dict(seed=0, epochs=8, n_samples=60, steps=8, backbone_config=TINY, verbose=False)
    return NormativeDiffusion(**{**params, **overrides})


@pytest.fixture(scope="module")
def model(train):
    return tiny_model().fit(train)


# ----------------------------------------------------------------------------------------------- contracts
def test_fit_learns_documented_attributes(model, cohort, train):
    assert model.idps_ == cohort.idps  # idps=None: every numeric column but covariates and ids
    assert model.n_features_in_ == 3 and model.n_dropped_ == 0
    assert model.n_train_ == 360  # validation_fraction=0.1
    assert list(model.history_.columns) == ["epoch", "train_loss", "val_loss", "lr"]
    assert np.isfinite(model.history_["train_loss"]).all()
    assert model.training_summary_["checkpoint"] == "best"
    assert [c.name for c in model.covariate_schema_.categorical] == ["sex", "site"]
    card = model.model_card()
    json.dumps(card)
    assert card["idps"] == cohort.idps and card["sampler"] == "dpmpp2m"
    assert card["scoring_grid"]["covariate"] == "age"


def test_init_only_stores_and_params_round_trip():
    m = NormativeDiffusion(backbone="nonsense", lr=-1)  # validated by fit, not by __init__
    assert m.get_params()["backbone"] == "nonsense"
    m.set_params(backbone="film-mlp", lr=1e-3)
    assert m.backbone == "film-mlp" and "lr=0.001" in repr(m)
    with pytest.raises(ValueError, match="invalid parameter 'depth'"):
        m.set_params(depth=3)
    with pytest.raises(ValueError, match="backbone='nonsense'"):
        NormativeDiffusion(backbone="nonsense").fit(pd.DataFrame({"age": [1.0]}))


def test_prediction_shapes_and_ranges(model, test, cohort):
    samples = model.sample(test, n_samples=25)
    assert samples.shape == (12, 25, 3) and np.isfinite(samples).all()
    q = model.predict_quantiles(test, [0.1, 0.5, 0.9])
    assert q.shape == (12, 9) and list(q.columns.names) == ["idp", "q"]
    assert (q[(cohort.idps[0], 0.1)] < q[(cohort.idps[0], 0.9)]).all()
    centiles = model.predict_centiles(test)
    assert list(centiles.columns) == cohort.idps and centiles.index.equals(test.index)
    assert ((centiles > 0) & (centiles < 1)).all().all()
    z = model.predict_zscores(test)
    np.testing.assert_allclose(z.to_numpy(), ndtri(centiles.to_numpy()))


def test_quantiles_and_centiles_invert_each_other_under_per_idp_corrections(model, test):
    # a layer whose IDPs each have a correction of their own (a shift in probit units)
    shifted = copy.deepcopy(model)
    layer = shifted.calibration_
    layer.idps = [ProbitMap(np.array([-6.0, 6.0]) + s, np.array([-6.0, 6.0])) for s in (0.3, -0.2, 0.0)]
    levels = [0.1, 0.5, 0.9]
    q = shifted.predict_quantiles(test, levels)
    for level in levels:
        values = test.copy()
        for idp in shifted.idps_:
            values[idp] = q[(idp, level)].to_numpy()
        back = shifted.predict_centiles(values)
        np.testing.assert_allclose(back.to_numpy(), level, atol=0.03)
    # the corrections move the quantiles: the first IDP's up, the second's down, the third's not at all
    none = copy.deepcopy(model)
    none.calibration_.idps = []
    plain = none.predict_quantiles(test, levels)
    first, second, third = shifted.idps_
    assert (q[(first, 0.5)] > plain[(first, 0.5)]).all()
    assert (q[(second, 0.5)] < plain[(second, 0.5)]).all()
    np.testing.assert_allclose(q[(third, 0.5)], plain[(third, 0.5)])


def test_score_is_tidy_with_joint_deviation(model, test, cohort):
    scores = model.score(test)
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == 12 * 3
    assert scores["idp"].tolist()[:3] == cohort.idps
    first = scores[scores["participant_id"] == test["participant_id"].iloc[0]]
    np.testing.assert_allclose(first["value"], test.loc[test.index[0], cohort.idps].to_numpy(float))
    assert first["joint_centile"].nunique() == 1 and 0 < first["joint_centile"].iloc[0] < 1
    assert set(scores["tail"]) <= {-1, 0, 1} and not scores["extrapolated"].any()
    # without ids the table index names the rows; sessions are carried
    no_id = model.score(test.drop(columns="participant_id").assign(session_id="ses-1"))
    assert list(no_id.columns[:3]) == ["row", "session_id", "idp"]
    np.testing.assert_array_equal(no_id["centile"], scores["centile"])


# ------------------------------------------------------------------------------- exactness and sharing
def test_a_subject_scored_alone_gets_exactly_its_cohort_scores(model, test):
    together = model.score(test)
    for i in (0, 7):
        _POINT_CACHE.clear()  # draw the participant's points afresh, not from the cohort's run
        alone = model.score(test.iloc[[i]])
        mine = together[together["participant_id"] == test["participant_id"].iloc[i]]
        for col in ("centile", "z", "joint_stat", "joint_centile"):
            np.testing.assert_array_equal(alone[col].to_numpy(), mine[col].to_numpy())
    exact = model.set_params(covariate_grid="off")
    try:
        together = exact.predict_centiles(test)
        _POINT_CACHE.clear()
        alone = exact.predict_centiles(test.iloc[[3]])
        np.testing.assert_array_equal(alone.to_numpy(), together.iloc[[3]].to_numpy())
    finally:
        model.set_params(covariate_grid="auto")


def test_reused_draws_equal_fresh_draws_and_belong_to_their_weights(model, test, train):
    _POINT_CACHE.clear()
    fresh = model.sample(test.iloc[:5], n_samples=64)
    assert len(_POINT_CACHE._items) > 0
    np.testing.assert_array_equal(model.sample(test.iloc[:5], n_samples=64), fresh)
    other = NormativeDiffusion(**{**model.get_params(), "seed": model.seed + 1}).fit(train)
    assert other._weights_token() != model._weights_token()
    assert not np.array_equal(other.sample(test.iloc[:5], n_samples=64), fresh)


def test_identical_covariates_share_samples_and_seed_changes_them(model, test):
    twins = pd.concat([test.iloc[[0]], test.iloc[[0]], test.iloc[[1]]], ignore_index=True)
    s = model.sample(twins, n_samples=30)
    np.testing.assert_array_equal(s[0], s[1])
    assert not np.array_equal(s[0], s[2])
    other = model.set_params(seed=1)
    try:
        assert not np.array_equal(other.sample(twins.iloc[[0]], n_samples=30)[0], s[0])
    finally:
        model.set_params(seed=0)


def test_same_seed_gives_bit_identical_models_and_scores(train, test):
    a = tiny_model(epochs=3).fit(train)
    b = tiny_model(epochs=3).fit(train)
    for (k, va), (_, vb) in zip(a.network_.state_dict().items(), b.network_.state_dict().items()):
        assert torch.equal(va, vb), k
    pd.testing.assert_frame_equal(a.score(test), b.score(test))
    c = tiny_model(epochs=3, seed=5).fit(train)
    assert not torch.equal(a.network_.head.weight, c.network_.head.weight)


def test_grid_scoring_agrees_with_exact_scoring(model, cohort):
    table = cohort.sample(40, seed=3)
    grid = model.set_params(n_samples=400).predict_centiles(table).to_numpy()
    exact = model.set_params(covariate_grid="off").predict_centiles(table).to_numpy()
    model.set_params(covariate_grid="auto", n_samples=60)
    # the two differ by Monte Carlo noise (independent draws, SD about 0.02 at 400 draws) and the
    # interpolation error, which is much smaller
    assert np.abs(grid - exact).mean() < 0.03
    assert np.abs(grid - exact).max() < 0.15


def test_joint_scores_equal_the_scoring_module_on_the_same_draws(model, test, cohort):
    # the raw score against the draws (the calibration layer maps the joint centile afterwards)
    assert model.joint_shrinkage_ == model_shrinkage(len(cohort.idps), model.n_train_) > 0
    fitted = model.joint_shrinkage_
    model.set_params(covariate_grid="off", calibration="off")
    try:
        # exact draws at each row (the ones scoring used), in the preprocessed units the model scores in:
        # the tail rule beyond the draws is fitted there (the per-row standardisation after it is affine)
        samples = model.scaler_.transform(model.sample(test))
        values = model.scaler_.transform(test[cohort.idps].to_numpy(float))
        for floor in (fitted, 0.9):  # 0.9: far above Ledoit-Wolf's own, so it changes the statistic
            model.joint_shrinkage_ = floor
            scores = model.score(test)
            expected = joint_deviation(values, samples, shrinkage=floor)
            got = scores.groupby("participant_id", sort=False)[["joint_stat", "joint_centile"]].first()
            np.testing.assert_allclose(got["joint_stat"], expected["joint_stat"], rtol=1e-6)
            np.testing.assert_allclose(got["joint_centile"], expected["joint_centile"], rtol=1e-9)
        assert not np.allclose(expected["joint_stat"], joint_deviation(values, samples)["joint_stat"])
    finally:
        model.joint_shrinkage_ = fitted
        model.set_params(covariate_grid="auto", calibration="conformal")


# ---------------------------------------------------------------------------------------- persistence
def test_save_load_round_trip_gives_identical_scores(model, test, tmp_path):
    path = model.save(tmp_path / "model")
    loaded = load_model(path)
    pd.testing.assert_frame_equal(loaded.score(test), model.score(test))
    assert loaded.model_card()["idps"] == model.idps_
    pd.testing.assert_frame_equal(loaded.history_, model.history_, check_dtype=False)
    with pytest.raises(FileExistsError):
        model.save(path)
    model.save(path, overwrite=True)


def test_tampered_bundle_is_refused(model, tmp_path):
    path = model.save(tmp_path / "model")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_model(path)
    meta = json.loads((path / "model.json").read_text())
    meta["estimator"] = "SomethingElse"
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_model(path)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_training_tables_are_refused_with_named_columns(train, cohort):
    m = tiny_model(epochs=1)
    with pytest.raises(InputError, match=r"covariate columns missing from the table: \['site'\]"):
        m.fit(train.drop(columns="site"))
    with pytest.raises(InputError, match=r"IDP columns missing from the table: \['Left-Nothing'\]"):
        m.fit(train, idps=[cohort.idps[0], "Left-Nothing"])
    with pytest.raises(InputError, match=r"constant in the training rows: \['flat'\]"):
        m.fit(train.assign(flat=1.0))
    with pytest.raises(InputError, match="'words'"):
        m.fit(train.assign(words="x"), idps=[cohort.idps[0], "words"])
    few = train.head(30).copy()
    few.loc[few.index[:15], cohort.idps[0]] = np.nan
    with pytest.raises(InputError, match=r"fewer than 20 values in the training rows: \['" + cohort.idps[0]):
        with pytest.warns(UserWarning, match="15 of 30 training rows miss some IDPs"):
            m.fit(few)
    with pytest.raises(InputError, match="only 15 of 30 rows"):
        tiny_model(epochs=1, missing_idps="drop").fit(few)


def test_rows_with_missing_values_are_dropped_and_counted(train, cohort):
    dirty = train.copy()
    dirty.loc[dirty.index[:5], cohort.idps[1]] = np.nan
    dirty.loc[dirty.index[5], cohort.idps[2]] = np.inf
    dirty.loc[dirty.index[6], "age"] = np.nan
    with pytest.warns(UserWarning, match="7 of 400 training rows"):
        m = tiny_model(epochs=1, missing_idps="drop").fit(dirty)
    assert m.n_dropped_ == 7 and m.training_summary_["n_dropped"] == 7
    # by default a row missing some IDPs trains on the others; one without its covariates is dropped
    with pytest.warns(UserWarning) as caught:
        m = tiny_model(epochs=1).fit(dirty)
    messages = [str(w.message) for w in caught]
    assert any("1 of 400 training rows" in m for m in messages)
    assert any("6 of 399 training rows miss some IDPs" in m for m in messages)
    assert m.n_dropped_ == 1 and m.n_partial_ == 6
    assert np.isfinite(m.predict_centiles(train.head(5)).to_numpy()).all()


def test_scoring_marks_missing_values_and_names_missing_idps(model, test, cohort):
    with pytest.raises(InputError, match=r"lacks 1 of the model's 3 IDP columns: \['" + cohort.idps[2]):
        model.score(test.drop(columns=cohort.idps[2]))
    holes = test.copy()
    holes.loc[holes.index[0], cohort.idps[1]] = np.nan
    holes.loc[holes.index[1], "age"] = np.nan
    with pytest.warns(UserWarning, match="1 row has a missing covariate"):
        c = model.predict_centiles(holes)
    assert np.isnan(c.iloc[0, 1]) and np.isfinite(c.iloc[0, [0, 2]]).all()
    assert c.iloc[1].isna().all() and np.isfinite(c.iloc[2:].to_numpy()).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = model.score(holes)
    first = scores.loc[scores["participant_id"] == holes["participant_id"].iloc[0]]
    # the joint deviation of a row with a missing IDP is computed over the IDPs it has
    assert np.isfinite(first["joint_z"]).all() and (first["joint_n_idps"] == 2).all()
    rest = scores.loc[scores["participant_id"].isin(holes["participant_id"].iloc[2:])]
    assert (rest["joint_n_idps"] == 3).all()
    no_covariate = scores["participant_id"] == holes["participant_id"].iloc[1]
    assert scores.loc[no_covariate, "joint_n_idps"].isna().all()


def test_unseen_site_and_out_of_range_age(model, test):
    new_site = test.head(2).assign(site="siteX")
    with pytest.raises(InputError, match=r"never seen in training: \['siteX'\].*unknown_site='marginal'"):
        model.score(new_site)
    no_site = test.head(2).assign(site=[None, test["site"].iloc[1]], participant_id=["sub-a", "sub-b"])
    with pytest.warns(UserWarning, match="1 row has a missing covariate"):
        counts = model.score(no_site).groupby("participant_id", sort=False)["centile"].count()
    assert counts.tolist() == [0, 3]
    model.set_params(unknown_site="marginal")
    try:
        c = model.predict_centiles(new_site)
        assert np.isfinite(c.to_numpy()).all()
        # unseen and missing sites are scored under the marginal over sites, and say so
        flags = model.score(pd.concat([new_site, no_site])).groupby("participant_id", sort=False)
        assert flags["unknown_site"].first().tolist() == [True, True, True, False]
        assert flags["centile"].count().tolist() == [3, 3, 3, 3]
    finally:
        model.set_params(unknown_site="error")
    old = test.head(3).assign(age=[40.0, 150.0, 1.0])
    scores = model.score(old).groupby("participant_id", sort=False)["extrapolated"].first()
    assert scores.tolist() == [False, True, True]


def test_paper_preset_and_ema_options_run(train, test):
    m = tiny_model(preset="paper", epochs=2, n_samples=20, steps=None).fit(train)
    assert m.diffusion_config_.prediction == "eps" and m.model_card()["sampler"] == "ddpm"
    assert m.model_card()["steps"] == 100 and m.training_summary_["checkpoint"] == "final"
    assert np.isfinite(m.predict_centiles(test.head(2)).to_numpy()).all()
    e = tiny_model(ema_decay=0.9, epochs=2, validation_fraction=0.0).fit(train)
    assert e.training_summary_["n_validation"] == 0 and e.training_summary_["checkpoint"] == "final"


def test_the_weight_average_forgets_the_initial_weights_within_a_short_fit():
    from normdiff_bids.model.training import _EMA

    net = torch.nn.Linear(3, 2)
    ema = _EMA(net, 0.999)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # the trained weights, 1 away from the initial ones
    trained = [p.detach().clone() for p in net.parameters()]
    for _ in range(20):  # a small cohort: one optimiser step per epoch
        ema.update(net)
    gap = max(float((s - t).abs().max()) for s, t in zip(ema.shadow.parameters(), trained))
    assert gap < 1e-3  # a fixed 0.999 keeps 0.999^20 = 98% of the initial weights
    for _ in range(10000):  # long fits average over the last 1 / (1 - decay) steps, as asked
        ema.update(net)
    before = [s.detach().clone() for s in ema.shadow.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    step = [float((s - b).mean()) for s, b in zip(ema.shadow.parameters(), before)]
    assert np.allclose(step, 0.001, rtol=1e-3, atol=0)


def test_several_networks_share_their_validation_rows_and_split_each_points_draws(model, train, test,
                                                                                   tmp_path):
    pooled = tiny_model(n_networks=2).fit(train)
    first, second = pooled.network_
    # the first network is the one-network model's (same seed, rows and validation split); the second
    # has a seed of its own and the same validation rows
    for a, b in zip(first.state_dict().values(), model.network_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(second.state_dict().values(),
                                                     first.state_dict().values()))
    nets = pooled.training_summary_["networks"]
    assert len(nets) == 2 and nets[0]["n_validation"] == nets[1]["n_validation"] > 0
    second_settings = pooled._training_settings(1)
    assert (second_settings.seed, second_settings.split_seed) == (pooled.seed + 100, pooled.seed)
    assert pooled.model_card()["n_networks"] == 2 and model.model_card()["n_networks"] == 1
    # a point's first half of draws comes from the first network, from the one-network model's noise:
    # the same order within each IDP, whatever the other half
    one, two = model.sample(test.iloc[:3], n_samples=64), pooled.sample(test.iloc[:3], n_samples=64)
    np.testing.assert_array_equal(np.argsort(one[:, :32], axis=1), np.argsort(two[:, :32], axis=1))
    assert not np.array_equal(np.argsort(one[:, 32:], axis=1), np.argsort(two[:, 32:], axis=1))
    assert np.isfinite(pooled.sample(test.iloc[:2], n_samples=1)).all()  # fewer draws than networks
    scores = pooled.score(test)
    pooled.save(tmp_path / "pooled")
    loaded = load_model(tmp_path / "pooled")
    pd.testing.assert_frame_equal(loaded.score(test), scores)  # from the draw table
    loaded.set_params(draw_table="off")
    pd.testing.assert_frame_equal(loaded.score(test), scores)  # both networks rebuilt from the bundle
    assert isinstance(loaded.network_, torch.nn.ModuleList) and len(loaded.network_) == 2


def test_the_report_learns_from_the_model_whether_its_draws_alone_decide_the_joint_centile(model):
    from normdiff_bids.evaluation.evaluate import joint_source

    assert not model.calibration_.joint.is_identity  # the cross-fitted controls give the joint a map
    assert joint_source(model) == {"joint_from_draws": False, "n_networks": 1}
    unmapped = copy.copy(model)
    unmapped.calibration_ = copy.copy(model.calibration_)
    unmapped.calibration_.joint = ProbitMap()  # too few controls for a joint map
    assert joint_source(unmapped)["joint_from_draws"] is True
    mapped = copy.copy(model)
    mapped.calibration = "off"  # a layer switched off corrects nothing
    assert joint_source(mapped)["joint_from_draws"] is True
    assert joint_source(object()) == {}  # a model that does not say


def test_quantile_normal_preprocessing_round_trips(train, test, tmp_path):
    m = tiny_model(preprocessing="quantile-normal", epochs=2).fit(train)
    scores = m.score(test)
    assert scores["centile"].between(0, 1, inclusive="neither").all()
    q = m.predict_quantiles(test.head(2), [0.5])
    assert (q.to_numpy() > 0).all()  # back in original units (volumes, thickness, area)
    pd.testing.assert_frame_equal(load_model(m.save(tmp_path / "qn")).score(test), scores)


# ------------------------------------------------------------------------------------------ calibration
@pytest.mark.slow
def test_centiles_are_calibrated_against_the_true_distribution(cohort):
    """Given a synthetic cohort with exact conditional CDFs, model centiles track the true ones."""
    train = cohort.sample(1500, seed=11)
    test = cohort.sample(150, seed=12)
    m = NormativeDiffusion(seed=0, epochs=60, n_samples=200, backbone_config={"hidden": 64, "n_blocks": 2},
                           verbose=False).fit(train)
    err, wrong = centile_errors(m, test, cohort.cdf(test).to_numpy())
    assert err < 0.08
    assert wrong > err + 0.04


def test_an_age_outside_its_own_sites_range_is_extrapolated(one_thread, tmp_path):
    cohort = SyntheticCohort(n_idps=2, n_sites=2, seed=1)
    train = cohort.sample(300, seed=1)
    old_at_site1 = (train["site"] == "site1") & (train["age"] > 40)
    train = train.loc[~old_at_site1]  # site1 trained on people of 40 and under only
    model = NormativeDiffusion(epochs=2, n_samples=40, seed=0, verbose=False).fit(train)
    row = train.head(1).assign(age=60.0).reset_index(drop=True)
    rows = pd.concat([row.assign(site="site1"), row.assign(site="site2", participant_id="sub-x")])
    flags = model.score(rows).groupby("participant_id", sort=False)["extrapolated"].first()
    assert flags.tolist() == [True, False]  # 60 is inside the global range, not inside site1's
    saved = load_model(model.save(tmp_path / "m"))
    assert saved.covariate_schema_.categorical[-1].ranges == model.covariate_schema_.categorical[-1].ranges


def test_the_joint_map_is_shifted_by_the_seen_rows_bias_or_checked_on_unseen_rows(model, train, monkeypatch,
                                                                                   tmp_path):
    import normdiff_bids.model.calibration as calibration

    # 3 IDPs from 400 rows: the map from the cross-fitted controls, lowered in probit by the in-sample
    # bias of the network's training rows' dependence, as the seen rows' share of the map's rows
    assert model.n_features_in_ / model.n_train_ < calibration.JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW
    assert not model.calibration_.joint.is_identity
    card = model.model_card()["calibration"]
    assert not card["joint_is_identity"]
    assert card["joint_correction"]["method"] == "in-sample bias of the learnt dependence"
    assert card["joint_correction"]["shift_z"] > 0
    assert load_model(model.save(tmp_path / "m")).model_card()["calibration"] == card
    space = model._model_space()
    cont, cat = model.covariate_schema_.encode(train)
    x = model.scaler_.transform(train[model.idps_].to_numpy(float))
    refit = calibration.fit_calibration(model, space, x, cont, cat)
    np.testing.assert_allclose(refit.joint.y, model.calibration_.joint.y)  # the fit's own layer
    asked = []
    monkeypatch.setattr(calibration, "insample_shift", lambda rows, floor: asked.append((rows, floor)) or 1.0)
    unit = calibration.fit_calibration(model, space, x, cont, cat)
    (rows, floor), = asked
    n_seen = model.training_summary_["n_train"]
    assert rows.shape == (n_seen, model.n_features_in_) and floor == model.joint_shrinkage_
    np.testing.assert_allclose(unit.joint.x, refit.joint.x)
    lowered = (unit.joint.y + 1.0 * n_seen / len(x)) - refit.joint.y  # the unshifted map less the shift
    np.testing.assert_allclose(lowered, lowered[0])
    assert lowered[0] > 0  # rows the network has seen look more typical than new people
    # 8 IDPs from 40 rows (0.2 per row) without fold models: the unseen rows check the map; no shift
    asked.clear()
    wide = SyntheticCohort(n_idps=8, n_sites=2, seed=0).sample(40, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        few = tiny_model(joint_folds=0).fit(wide)
    assert few.n_features_in_ / few.n_train_ >= calibration.JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW
    assert not few.calibration_.joint.is_identity and not asked
    assert few.model_card()["calibration"]["joint_correction"] == {
        "method": "unseen controls (mean and spread in probit)", "n_unseen": 4, "applied": False}
    from normdiff_bids.evaluation.evaluate import joint_source

    assert joint_source(few)["joint_unchecked_controls"] == 4  # the report says the map went unchecked
    assert "joint_unchecked_controls" not in joint_source(model)


def test_fold_models_learn_the_joint_map_where_too_few_unseen_controls_would_check_it():
    from types import SimpleNamespace

    from normdiff_bids.model.calibration import JOINT_FOLDS, joint_folds

    def folds(n_rows, setting="auto", fraction=0.1, n_idps=3):
        return joint_folds(SimpleNamespace(joint_folds=setting, validation_fraction=fraction, seed=0,
                                           n_features_in_=n_idps), n_rows)

    # at 0.12 IDPs per row or more the validation rows check the map: 39 are too few, 40 enough
    assert folds(390, n_idps=47) == JOINT_FOLDS == 5 and folds(394, n_idps=200) == 5
    assert folds(400, n_idps=48) == 0 and folds(400, n_idps=200) == 0
    assert folds(1000, fraction=0.0, n_idps=120) == 5  # no validation rows at all
    # below it the closed-form shift corrects the map, however few the validation rows
    assert folds(390, n_idps=46) == 0 and folds(100, n_idps=3) == 0
    assert folds(100, setting=0, n_idps=50) == 0 and folds(5000, setting=3) == 3  # as asked


def test_at_few_controls_fold_models_that_never_saw_a_control_learn_the_joint_map(tmp_path):
    import normdiff_bids.model.calibration as calibration

    fits, scored = [], []

    class Spy(NormativeDiffusion):  # its fold models are Spies too: they are built from type(model)
        def fit(self, table, idps=None):
            fits.append((self.seed, set(table.index), dict(table["site"].value_counts())))
            return super().fit(table, idps=idps)

        def _score_arrays(self, table, with_joint=True, given=None):
            scored.append((self.seed, set(table.index)))
            return super()._score_arrays(table, with_joint=with_joint, given=given)

    wide = SyntheticCohort(n_idps=16, n_sites=3, seed=0, site_sizes="zipf").sample(60, seed=1)
    wide = pd.concat([wide, wide.iloc[[0]].assign(site="site9", participant_id="sub-lone")],
                     ignore_index=True)  # a site of one person: never held out of a fold's training
    params = dict(seed=0, epochs=8, n_samples=60, steps=8, backbone_config=TINY, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Spy(**params).fit(wide)
    (_, everyone, _), *folds = fits
    assert len(folds) == calibration.JOINT_FOLDS == len(scored)
    held_out = set()
    for (seed, trained, sites), (scoring_seed, held) in zip(folds, scored, strict=True):
        assert seed == scoring_seed != model.seed and not trained & held and trained | held == everyone
        assert set(sites) == set(wide["site"])  # every site keeps training rows in every fold
        held_out |= held
    assert held_out == everyone - {len(wide) - 1}  # each control scored once, the lone one never
    correction = model.model_card()["calibration"]["joint_correction"]
    assert correction == {"method": "fold models that never saw the control", "n_folds": 5,
                          "n_controls": len(held_out)}
    assert not model.calibration_.joint.is_identity
    saved = load_model(model.save(tmp_path / "m"))
    assert saved.model_card()["calibration"]["joint_correction"] == correction
    assert len({seed for seed, *_ in fits}) == len(fits)  # fold models are seeded apart from the model
    with pytest.raises(ValueError, match=r"joint_folds=1 \('auto', 0 \(off\)"):
        tiny_model(joint_folds=1).fit(wide)
    # every control alone in its combination of levels: none can be held out, so no fold model is fitted
    # and the map falls back to the validation rows' check
    fits.clear()
    alone = np.arange(len(wide))[:, None]
    assert calibration.crossfit_joint_centiles(model, wide, alone, 5) is None and not fits


