"""The calibration layer: monotone maps that make held-out centiles uniform."""

import numpy as np
import pytest
from scipy import stats

from normdiff_bids.scoring.conformal import CentileCalibration, ProbitMap, shrunk_maps


def _ks(u):
    return stats.kstest(np.ravel(u), "uniform").statistic


@pytest.mark.parametrize("scale, shift", [(1.5, 0.0), (0.7, 0.0), (1.0, 0.25)])
def test_map_fixes_a_too_wide_too_narrow_or_shifted_model(scale, shift):
    rng = np.random.default_rng(0)
    # a model whose centiles are Phi((z - shift) / scale) for true normal scores z
    held_out = stats.norm.cdf((rng.standard_normal(10000) - shift) / scale)
    new = stats.norm.cdf((rng.standard_normal(5000) - shift) / scale)
    assert _ks(new) > 0.05
    mapping = ProbitMap.fit(held_out)
    assert _ks(mapping.transform(new)) < 0.035


def test_map_of_a_calibrated_model_is_near_identity_and_invertible():
    rng = np.random.default_rng(1)
    mapping = ProbitMap.fit(rng.uniform(size=2000))
    u = np.linspace(0.01, 0.99, 50)
    assert np.max(np.abs(mapping.transform(u) - u)) < 0.04
    np.testing.assert_allclose(mapping.inverse(mapping.transform(u)), u, atol=1e-10)
    assert np.all(np.diff(mapping.transform(u)) > 0)
    tails = mapping.transform(np.array([1e-12, 1 - 1e-12]))
    assert 0 < tails[0] < 1e-6 and 1 - 1e-6 < tails[1] < 1


def test_too_few_controls_leave_the_model_as_it_is():
    assert ProbitMap.fit(np.array([0.1, 0.5, 0.9])).is_identity


def _probit_median(mapping, u):
    return float(np.median(stats.norm.ppf(mapping.transform(u))))


def test_shrunk_maps_correct_only_the_idps_that_are_off_beyond_chance():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((1000, 20))
    z[:, :3] = 0.35 + 1.2 * z[:, :3]          # three IDPs the model gets wrong: shifted and too narrow
    maps = shrunk_maps(stats.norm.cdf(z))
    new = rng.standard_normal((4000, 20))
    new[:, :3] = 0.35 + 1.2 * new[:, :3]
    for j in range(3):                        # corrected most of the way (median 0.35 -> near 0)
        fixed = maps[j].transform(stats.norm.cdf(new[:, j]))
        assert abs(float(np.median(stats.norm.ppf(fixed)))) < 0.12
        assert _ks(fixed) < 0.5 * _ks(stats.norm.cdf(new[:, j]))


def test_shrunk_maps_of_idps_that_differ_only_by_chance_barely_move_them():
    rng = np.random.default_rng(3)
    maps = shrunk_maps(rng.uniform(size=(700, 11)))
    # each column's median is off by chance (SD 0.047 in probit units); unshrunk maps would move the
    # medians by as much (the largest of 11 by about 0.08)
    u = np.full(1, 0.5)
    assert max(abs(_probit_median(m, u)) for m in maps) < 0.03
    # too few values for a column: identity, whatever they show
    few = shrunk_maps(stats.norm.cdf(1.0 + rng.standard_normal((10, 4))))
    assert all(m.is_identity for m in few)


def test_layer_applies_pooled_then_own_maps_round_trips_and_reads_site_maps_of_earlier_bundles():
    rng = np.random.default_rng(4)
    sites = np.repeat([0, 1], [400, 5])
    z = 1.3 * rng.standard_normal((405, 4))   # every IDP too narrow: the pooled map
    z[:, 0] += 0.5                            # one IDP also shifted: its own correction
    cal = CentileCalibration.fit(stats.norm.cdf(z), sites, stats.norm.cdf(rng.standard_normal(405)))
    assert not cal.pooled.is_identity and cal.sites == {}
    card = cal.summary(["a", "b", "c", "d"])["idp_corrections"]
    assert card["n_idps"] >= 1 and list(card["largest_shift_z"])[0] == "a"
    assert card["largest_shift_z"]["a"] > 0.2
    u = rng.uniform(size=(10, 4))
    codes = np.array([0, 1] * 5)
    again = CentileCalibration.from_dict(cal.to_dict())
    np.testing.assert_array_equal(cal.transform(u, codes), again.transform(u, codes))
    np.testing.assert_allclose(cal.inverse(cal.transform(u, codes), codes), u, atol=1e-10)
    with pytest.raises(ValueError, match="maps for 4 IDPs"):
        cal.transform(u[:, :3], codes)
    # an earlier bundle: a site map of its own replaces the pooled map at that site
    old = cal.to_dict()
    old.pop("idps")
    old["sites"] = {"0": ProbitMap(np.array([-2.0, 2.0]), np.array([-1.0, 1.0])).to_dict()}
    layer = CentileCalibration.from_dict(old)
    half = np.full((2, 4), stats.norm.cdf(1.0))
    out = layer.transform(half, np.array([0, 1]))
    np.testing.assert_allclose(out[0], stats.norm.cdf(0.5))
    np.testing.assert_allclose(out[1], cal.pooled.transform(half[1]))
    assert layer.summary()["sites_with_own_map"] == [0]


def test_a_biased_map_is_corrected_by_enough_unseen_values():
    rng = np.random.default_rng(3)
    mapping = ProbitMap.fit(rng.uniform(size=2000))
    # unseen controls that are systematically more extreme than the map expects: corrected
    biased = stats.norm.cdf(0.8 + 1.3 * rng.standard_normal(400))
    fixed = mapping.corrected(biased)
    new = stats.norm.cdf(0.8 + 1.3 * rng.standard_normal(5000))
    assert _ks(fixed.transform(new)) < 0.06 and _ks(mapping.transform(new)) > 0.2
    # a shift of 1.8 standard errors, which a 2-SE threshold left alone, is corrected too
    small = stats.norm.cdf(0.18 + rng.standard_normal(100))
    shifted = stats.norm.cdf(0.18 + rng.standard_normal(20000))
    assert _ks(mapping.corrected(small).transform(shifted)) < _ks(mapping.transform(shifted))
    # unseen controls consistent with the map change it by no more than their noise; too few: kept
    consistent = rng.uniform(size=100)
    fresh = rng.uniform(size=20000)
    assert _ks(mapping.corrected(consistent).transform(fresh)) < 0.12
    assert mapping.corrected(biased[:10]) is mapping
