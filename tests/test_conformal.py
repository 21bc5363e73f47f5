"""The calibration layer: monotone maps that make held-out centiles uniform."""

import numpy as np
import pytest
from scipy import stats

from normdiff_bids.scoring.conformal import CentileCalibration, ProbitMap


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


def test_layer_uses_site_maps_where_there_are_enough_controls_and_round_trips():
    rng = np.random.default_rng(2)
    sites = np.repeat([0, 1], [400, 5])
    z = rng.standard_normal((405, 3))
    z[sites == 0] *= 1.4                        # site 0: the model is too narrow there
    cal = CentileCalibration.fit(stats.norm.cdf(z), sites, stats.norm.cdf(rng.standard_normal(405)))
    assert sorted(cal.sites) == [0]
    again = CentileCalibration.from_dict(cal.to_dict())
    u = rng.uniform(size=(10, 3))
    codes = np.array([0, 1] * 5)
    np.testing.assert_array_equal(cal.transform(u, codes), again.transform(u, codes))
    np.testing.assert_allclose(cal.inverse(cal.transform(u, codes), codes), u, atol=1e-10)


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
