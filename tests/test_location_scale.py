"""The location-scale stage: smooth population curves, partially pooled site effects, new sites."""

import numpy as np
import pytest

from normdiff_bids.model.location_scale import LOGVAR_RANGE, LocationScaleConfig, LocationScaleStage


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
    u3, var3, _, v_var3 = estimates[3]
    u200, var200, v200, v_var200 = estimates[200]
    assert np.all(np.abs(u3) < np.abs(new_shift))             # shrunk with 3 controls
    np.testing.assert_allclose(u200, new_shift, atol=0.15)   # the site's own mean with 200
    np.testing.assert_allclose(v200, 2 * new_logsd, atol=0.35)
    assert np.all(var3 > var200) and np.all(v_var3 > v_var200)
    adapted = stage.with_sites([estimates[200]])
    assert adapted.n_sites_ == 13
    np.testing.assert_array_equal(adapted.u_[:12], stage.u_)   # known sites untouched


def test_state_round_trips_exactly(truth):
    shifts, log_sd = truth
    age, sex, site, y, _, _ = _cohort(500, 6, shifts, log_sd)
    stage = LocationScaleStage().fit(age, sex, site, y, n_sites=12)
    again = LocationScaleStage.from_dict(stage.to_dict(), stage.posterior_arrays())
    a, b = stage.location_scale(age, sex, site), again.location_scale(age, sex, site)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # a stage saved by an earlier version (no posterior arrays) scales rows as it did then
    old = LocationScaleStage.from_dict(stage.to_dict())
    assert not old.has_parameter_variance and not old.config.parameter_uncertainty
    np.testing.assert_array_equal(old.location_scale(age, sex, site)[0], a[0])
    plain = np.sqrt(np.exp(np.clip(old._fixed_design(age, sex) @ old.gamma_ + old.v_[site], *LOGVAR_RANGE))
                    + old.u_var_[site])
    np.testing.assert_allclose(old.location_scale(age, sex, site)[1], plain)
    # their config has no penalty: their curves were fitted with a ridge, which their refits keep
    data = stage.to_dict()
    del data["config"]["penalty"]
    earlier = LocationScaleStage.from_dict(data, stage.posterior_arrays())
    assert earlier.config.penalty == "ridge" and stage.config.penalty == "difference"
    np.testing.assert_array_equal(earlier.location_scale(age, sex, site)[1], a[1])


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


def _small_sites(n_per, seed, n_idps=40, n_sites=12):
    """``(train, new)`` rows of sites of ``n_per`` people (new: 300 per site), IDPs with site effects in
    location and spread."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(0, 0.5, (n_sites, n_idps))
    log_sd = rng.normal(0, 0.2, (n_sites, n_idps))

    def draw(per):
        site = np.repeat(np.arange(n_sites), per)
        age = rng.uniform(-1.5, 1.5, (len(site), 1))
        sex = rng.integers(0, 2, (len(site), 1))
        loc = np.sin(1.5 * age) + 0.4 * sex + shift[site]
        return age, sex, site, loc + np.exp(0.3 * age + log_sd[site]) * rng.standard_normal(loc.shape)

    return draw(n_per), draw(300)


@pytest.mark.parametrize("n_per", [5, 20])
def test_new_people_get_the_posterior_predictive_spread(n_per):
    """Sites of 5 and 20 people: a new person's residual has variance 1 and 95% of them lie in +-1.96,
    because the scale carries what the fit does not know (the plug-in scale of the noise and the site's
    location alone gave a mean square of 1.6 and a coverage of 0.88 with 5 people per site, 1.16 and 0.93
    with 20; the predictive scale 1.04 and 0.94 with either)."""
    train, new = _small_sites(n_per, seed=0)
    for name, stage in [("predictive", LocationScaleStage()),
                        ("plug-in", LocationScaleStage(LocationScaleConfig(parameter_uncertainty=False)))]:
        r = stage.fit(*train, n_sites=12).standardise(*new)
        ok = 0.9 < np.mean(r**2) < 1.1 and 0.937 < np.mean(np.abs(r) < 1.959964) < 0.96
        assert ok == (name == "predictive"), (name, np.mean(r**2), np.mean(np.abs(r) < 1.959964))


def test_beyond_the_training_ages_the_spread_is_the_edges():
    """The fit's own uncertainty widens a new person's scale more at the edge of the age range than in
    its middle; beyond the training ages the scale stays the edge's (a log-variance carried on along its
    boundary slope sent some IDPs' variance to e^6 and others' to e^-5), while the location goes on."""
    train, _ = _small_sites(20, seed=1)
    stage = LocationScaleStage().fit(*train, n_sites=12)
    plain = LocationScaleStage.from_dict(stage.to_dict())  # no posterior arrays: the plug-in scale
    ages = np.array([[0.0], [train[0].max()], [3.0], [4.0]])
    sex, site = np.zeros((4, 1), dtype=int), np.full(4, -1)
    loc, scale = stage.location_scale(ages, sex, site)
    extra = scale**2 - plain.location_scale(ages, sex, site)[1] ** 2
    assert np.all(extra > 0) and np.all(extra[1] > extra[0])
    np.testing.assert_allclose(scale[2:], np.broadcast_to(scale[1], (2, scale.shape[1])), rtol=1e-12)
    slope = loc[3] - loc[2]  # per unit of age beyond the edge: the location is linear there
    np.testing.assert_allclose(loc[2] - loc[1], (3.0 - ages[1, 0]) * slope, atol=1e-9)


def test_the_curve_is_not_pulled_towards_a_level_at_the_ends_of_the_ages():
    """A steep age trend with few people at the ends of the range (40 IDPs, 300 people, 10 sites): the
    fitted location and spread at the oldest and youngest ages match the truth. A ridge on the spline's
    coefficients pulls the curve towards the youngest age's level (its basis drops that function), which
    put the location 1.1 to 2.2 residual SDs off at the ends and the scale 3 times too wide at the
    youngest; the default penalises the curve's bending only."""
    rng = np.random.default_rng(0)
    n, d, k = 300, 40, 10
    age = (rng.beta(2, 2, n) * 4 - 2)[:, None]
    sex, site = rng.integers(0, 2, (n, 1)), rng.integers(0, k, n)
    slope, spread = rng.uniform(1, 2, d), rng.uniform(0.3, 0.6, d)
    y = age * slope + rng.normal(0, 0.3, (k, d))[site] + np.exp(spread * age) * rng.standard_normal((n, d))
    ends = np.array([[-1.9], [1.9]])
    for penalty in ("difference", "ridge"):
        stage = LocationScaleStage(LocationScaleConfig(penalty=penalty)).fit(age, sex, site, y, n_sites=k)
        loc, scale = stage.location_scale(ends, np.zeros((2, 1), dtype=int), np.full(2, -1))
        loc_error = np.abs((loc - ends * slope).mean(axis=1))
        scale_error = np.abs(np.log(scale / np.exp(ends * spread)).mean(axis=1))
        ok = np.all(loc_error < 0.3) and np.all(scale_error < 0.3)
        assert ok == (penalty == "difference"), (penalty, loc_error, scale_error)
    assert LocationScaleConfig().penalty == "difference"


def test_the_bending_penalty_leaves_straight_lines_free():
    from normdiff_bids.model.location_scale import _difference_penalty, _knot_vector

    knots, degree = np.quantile(np.random.default_rng(1).normal(size=200), np.linspace(0, 1, 5)), 3
    t = _knot_vector(knots, degree)
    greville = np.array([t[i + 1:i + degree + 1].mean() for i in range(len(t) - degree - 1)])
    pen = _difference_penalty(knots, degree)
    line = greville[1:] - greville[0]  # the coefficients of f(x) = x, relative to the intercept's
    bent = greville[1:] ** 2 - greville[0] ** 2
    assert abs(line @ pen @ line) < 1e-9 * (bent @ pen @ bent) and bent @ pen @ bent > 0
