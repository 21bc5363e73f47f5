"""Conditional deviations (an IDP given others) and scoring with missing IDPs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.special import ndtr

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.errors import InputError
from normdiff_bids.model.normative import NormativeDiffusion
from normdiff_bids.scoring.conditional import PointDraws, conditional_centiles, joint_subset_scores

LEFT, RIGHT = "Left-Hippocampus", "Right-Hippocampus"


# -- the method on exact Gaussian draws -------------------------------------------------------------

def _copula(d: int, rho: float, seed: int):
    corr = np.full((d, d), rho) + np.eye(d) * (1 - rho)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(corr)
    return corr, lambda n: rng.standard_normal((n, d)) @ chol.T


@pytest.mark.parametrize(("n_given", "tolerance"), [(1, 0.02), (5, 0.025), (39, 0.05)])
def test_conditional_centiles_match_the_exact_gaussian_conditional(n_given, tolerance):
    d = 40
    corr, draw = _copula(d, 0.5, seed=n_given)
    draws, subjects = PointDraws(draw(1000)), draw(4000)
    given, targets = tuple(range(n_given)), tuple(range(n_given, d))
    ours = conditional_centiles(subjects, draws, given, targets)
    coef = np.linalg.solve(corr[np.ix_(given, given)], corr[np.ix_(given, targets)]).T
    sigma = np.sqrt(1 - np.sum(coef * corr[np.ix_(targets, given)], axis=1))
    truth = ndtr((subjects[:, list(targets)] - subjects[:, list(given)] @ coef.T) / sigma)
    # all but one given: the regression on 39 IDPs from 1000 draws carries estimation noise (about
    # sqrt(39 / 1000) of the conditional SD), yet stays calibrated
    assert np.abs(ours - truth).mean() < tolerance
    # leave-one-out residuals keep the intervals honest even with 39 of the draws' dimensions given
    inside = ((ours > 0.025) & (ours < 0.975)).mean()
    assert abs(inside - 0.95) < 0.015


def test_an_independent_given_idp_leaves_the_marginal():
    rng = np.random.default_rng(1)
    draws = PointDraws(rng.standard_normal((1000, 3)))
    subjects = rng.standard_normal((3000, 3))
    cond = conditional_centiles(subjects, draws, (0,), (1, 2))
    assert np.abs(cond - ndtr(subjects[:, 1:])).mean() < 0.02


def test_joint_over_present_idps_uses_the_draws_of_the_same_idps():
    rng = np.random.default_rng(2)
    samples = rng.standard_normal((400, 5))
    point = PointDraws(samples)
    z = rng.standard_normal(5)
    z[[1, 3]] = np.nan
    stat, centile, k = joint_subset_scores(z, point)
    assert k == 3 and 0 < centile < 1
    alone = PointDraws(samples[:, [0, 2, 4]])
    stat_alone, centile_alone, _ = joint_subset_scores(z[[0, 2, 4]], alone)
    assert stat == pytest.approx(stat_alone) and centile == pytest.approx(centile_alone)
    assert np.isnan(joint_subset_scores(np.array([0.1, np.nan, np.nan, np.nan, np.nan]), point)[1])


# -- through the estimator --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted(one_thread):
    cohort = SyntheticCohort(n_idps=6, n_sites=2, seed=0)
    train = cohort.sample(1500, seed=1)
    rng = np.random.default_rng(5)
    train["noise"] = rng.normal(10.0, 2.0, len(train))  # an IDP independent of everything
    model = NormativeDiffusion(epochs=60, n_samples=400, seed=0, verbose=False).fit(train)
    test = cohort.sample(600, seed=2)
    test["noise"] = rng.normal(10.0, 2.0, len(test))
    return cohort, model, test


def test_a_large_correlated_idp_lowers_the_conditional_centile(fitted):
    cohort, model, test = fitted
    typical = test.iloc[:200].copy()
    low, high = typical.copy(), typical.copy()
    q = cohort.ppf(typical, [0.1, 0.9])  # [rows, 2, D] true quantiles at each row's covariates
    j = cohort.idps.index(RIGHT)
    low[RIGHT], high[RIGHT] = q[:, 0, j], q[:, 1, j]
    given_low = model.predict_centiles(low, given=[RIGHT])[LEFT]
    given_high = model.predict_centiles(high, given=[RIGHT])[LEFT]
    marginal = model.predict_centiles(typical)[LEFT]
    # the same left hippocampus is unusually small beside a large right one, and large beside a small one
    assert (given_high < marginal).mean() > 0.9 and (given_low > marginal).mean() > 0.9
    assert given_high.mean() < marginal.mean() - 0.1 < given_low.mean() - 0.2


def test_conditioning_on_an_independent_idp_gives_the_marginal(fitted):
    _, model, test = fitted
    cond = model.predict_centiles(test, given=["noise"])
    marginal = model.predict_centiles(test)[cond.columns]
    assert list(cond.columns) == [i for i in model.idps_ if i != "noise"]
    assert np.abs(cond - marginal).to_numpy().mean() < 0.04


def test_conditional_scores_are_calibrated_on_held_out_people(fitted):
    cohort, model, test = fitted
    cond = model.predict_centiles(test, given=[RIGHT])[LEFT].to_numpy()
    z = cohort.normal_scores(test)
    rho = cohort.correlation[cohort.idps.index(LEFT), cohort.idps.index(RIGHT)]
    truth = ndtr((z[LEFT] - rho * z[RIGHT]) / np.sqrt(1 - rho ** 2)).to_numpy()
    assert np.abs(cond - truth).mean() < 0.06
    assert abs(((cond > 0.025) & (cond < 0.975)).mean() - 0.95) < 0.04


def test_missing_idps_leave_the_other_centiles_bit_identical(fitted):
    _, model, test = fitted
    holed = test.copy()
    holed.loc[holed.index[::3], LEFT] = np.nan
    holed.loc[holed.index[1::4], "noise"] = np.nan
    full, part = model.score(test), model.score(holed)
    present = np.isfinite(part["value"].to_numpy())
    np.testing.assert_array_equal(part["centile"].to_numpy()[present], full["centile"].to_numpy()[present])
    assert np.isnan(part["centile"].to_numpy()[~present]).all()
    n_idps = part.drop_duplicates("participant_id")["joint_n_idps"].to_numpy(dtype=float)
    assert set(n_idps) == {5.0, 6.0, 7.0} and np.isfinite(part["joint_centile"]).all()


def test_score_with_given_adds_conditional_columns_and_marks_rows(fitted):
    _, model, test = fitted
    rows = test.iloc[:20].copy()
    rows.loc[rows.index[3], RIGHT] = np.nan
    with pytest.warns(UserWarning, match="1 rows lack a value of a given IDP"):
        scores = model.score(rows, given=[RIGHT])
    assert {"cond_centile", "cond_z", "cond_given_missing"} <= set(scores.columns)
    assert scores.loc[scores["idp"] == RIGHT, "cond_centile"].isna().all()
    marked = scores.groupby("participant_id", sort=False)["cond_given_missing"].first()
    assert marked.sum() == 1 and marked.iloc[3]
    others = scores[(scores["participant_id"] != rows["participant_id"].iloc[3]) & (scores["idp"] != RIGHT)]
    assert np.isfinite(others["cond_centile"]).all()


def test_bad_given_sets_are_refused_by_name(fitted):
    _, model, test = fitted
    with pytest.raises(InputError, match=r"\['Left-Hipocampus'\] are not IDPs of this model"):
        model.predict_centiles(test, given=["Left-Hipocampus"])
    with pytest.raises(InputError, match="every one of the model's 7 IDPs is given"):
        model.predict_centiles(test, given=model.idps_)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.predict_centiles(test.iloc[:3], given=[]).shape == (3, 7)  # nothing given: marginals
