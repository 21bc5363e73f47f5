"""The location-scale stage: smooth population curves, partially pooled site effects, new sites."""

import numpy as np
import pytest

from normdiff_bids.model.location_scale import LocationScaleStage


def _cohort(n, seed, shifts, log_sd, n_sites=None):
    """y = curve(age) + shift[site] + exp(0.3 age + log_sd[site]) e, two IDPs; sites drawn 1/k-sized."""
    rng = np.random.default_rng(seed)
    k = len(shifts) if n_sites is None else n_sites
    weights = 1 / np.arange(1, k + 1)
    site = rng.choice(k, size=n, p=weights / weights.sum())
    age = rng.uniform(-1.7, 1.7, size=n)
    sex = rng.integers(0, 2, size=n)
    sd = np.exp(0.3 * age[:, None] + log_sd[site])
    loc = np.column_stack([np.sin(1.5 * age), 0.5 * age**2]) + 0.4 * sex[:, None] + shifts[site]
    y = loc + sd * rng.standard_normal((n, 2))
    return age[:, None], sex[:, None], site, y, loc, sd


@pytest.fixture(scope="module")
def truth():
    rng = np.random.default_rng(0)
    return rng.normal(0, 0.6, size=(12, 2)), rng.normal(0, 0.3, size=(12, 2))


def _check_recovery(stage, truth, site):
    """A fresh sample of the cohort; the stage's location and spread match the truth at the big sites."""
    fresh = _cohort(2000, 2, *truth)
    a2, s2, t2, _, loc2, sd2 = fresh
    est_loc, est_sd = stage.location_scale(a2, s2, t2)
    big = np.isin(t2, np.flatnonzero(np.bincount(site, minlength=12) >= 150))
    assert np.abs(est_loc - loc2)[big].mean() < 0.1 * sd2[big].mean()
    assert np.abs(np.log(est_sd / sd2))[big].mean() < 0.1
    return fresh, big


def test_recovers_location_and_scale(truth):
    shifts, log_sd = truth
    age, sex, site, y, loc, sd = _cohort(4000, 1, shifts, log_sd)
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    (a2, s2, t2, y2, _, _), big = _check_recovery(stage, truth, site)
    r = stage.standardise(a2, s2, t2, y2)
    assert abs(r[big].mean()) < 0.1 and abs(r[big].std() - 1) < 0.05
    np.testing.assert_allclose(stage.destandardise(a2, s2, t2, r), y2, atol=1e-9)


def test_small_sites_are_shrunk_towards_the_population(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(600, 3, shifts, log_sd)
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    counts = np.bincount(site, minlength=12)
    smallest = int(np.argmin(counts))
    assert counts[smallest] <= 15
    # the estimated effect of the smallest site is pulled toward 0, relative to its true shift
    assert np.all(np.abs(stage.u_[smallest]) < np.abs(shifts[smallest]) + 0.3)
    assert np.all(stage.u_var_[smallest] > stage.u_var_[int(np.argmax(counts))])
    # its predictive spread includes the uncertainty of its effect
    _, sd_small = stage.location_scale(age[:1], sex[:1], np.array([smallest]))
    _, sd_pop = stage.location_scale(age[:1], sex[:1], np.array([-1]))
    _, sd_marg = stage.location_scale(age[:1], sex[:1], np.array([-1]), marginal=True)
    assert np.all(sd_marg > sd_pop)
    assert sd_small.shape == (1, 2)


def test_new_site_effects_from_few_controls(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(2000, 4, shifts, log_sd)
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    new_shift, new_logsd = np.array([1.5, -1.0]), np.array([0.4, -0.3])
    rng = np.random.default_rng(5)
    estimates = {}
    for k in (3, 200):
        a = rng.uniform(-1.5, 1.5, size=(k, 1))
        s = rng.integers(0, 2, size=(k, 1))
        loc = np.column_stack([np.sin(1.5 * a[:, 0]), 0.5 * a[:, 0] ** 2]) + 0.4 * s + new_shift
        yk = loc + np.exp(0.3 * a + new_logsd) * rng.standard_normal((k, 2))
        estimates[k] = stage.site_effects(a, s, yk)
    u3, var3, _ = estimates[3]
    u200, var200, v200 = estimates[200]
    assert np.all(np.abs(u3) < np.abs(new_shift))             # shrunk with 3 controls
    np.testing.assert_allclose(u200, new_shift, atol=0.15)   # the site's own mean with 200
    np.testing.assert_allclose(v200, 2 * new_logsd, atol=0.35)
    assert np.all(var3 > var200)
    adapted = stage.with_sites([estimates[200]])
    assert adapted.n_sites_ == 13
    np.testing.assert_array_equal(adapted.u_[:12], stage.u_)   # known sites untouched


def test_state_round_trips_exactly(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(500, 6, shifts, log_sd)
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    again = LocationScaleStage.from_dict(stage.to_dict())
    a, b = stage.location_scale(age, sex, site), again.location_scale(age, sex, site)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_an_idp_that_is_mostly_zero_keeps_the_fit_finite(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(600, 7, shifts, log_sd)
    rng = np.random.default_rng(8)
    lesions = np.where(rng.random(len(y)) < 0.97, 0.0, rng.exponential(1.0, len(y)))  # like 5th-Ventricle
    y = np.column_stack([y, (lesions - lesions.mean()) / lesions.std()])
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    loc, scale = stage.location_scale(age, sex, site)
    assert np.isfinite(loc).all() and np.isfinite(scale).all() and (scale > 0).all()
    assert np.isfinite(stage.standardise(age, sex, site, y)).all()


def test_missing_values_have_no_weight_and_the_rest_still_fit(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(4000, 1, shifts, log_sd)
    holed = y.copy()
    holes = np.random.default_rng(3).random(len(y)) < 0.3
    holed[holes, 0] = np.nan
    stage = LocationScaleStage().fit(age, sex, site, holed, n_sites=12)
    (a2, s2, t2, _, loc2, _), _ = _check_recovery(stage, truth, site)
    r = stage.standardise(age, sex, site, holed)
    assert np.isnan(r[holes, 0]).all() and np.isfinite(r[~holes]).all() and np.isfinite(r[:, 1]).all()
    # IDP 1 has every value, so it is fitted exactly as without the holes in IDP 0
    full = LocationScaleStage().fit(age, sex, site, np.column_stack([y[:, 1], y[:, 1]]), n_sites=12)
    np.testing.assert_allclose(stage.standardise(a2, s2, t2, np.column_stack([loc2[:, 0], loc2[:, 1]]))[:, 1],
                               full.standardise(a2, s2, t2, np.column_stack([loc2[:, 1], loc2[:, 1]]))[:, 1],
                               rtol=1e-6, atol=1e-8)
