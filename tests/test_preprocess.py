"""IDP preprocessing: z-scoring and the monotone quantile-normal transform, exact inverses, dict state."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from normdiff_bids.model.preprocess import IDPScaler


@pytest.fixture
def skewed():
    rng = np.random.default_rng(0)
    return np.column_stack([rng.lognormal(8, 0.5, 3000), rng.normal(2.5, 0.1, 3000),
                            rng.integers(0, 5, 3000).astype(float)])  # last one heavily tied


def test_zscore_standardises_with_training_stats(skewed):
    scaler = IDPScaler().fit(skewed)
    z = scaler.transform(skewed)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(z.std(axis=0), 1, atol=1e-10)
    np.testing.assert_allclose(scaler.inverse_transform(z), skewed, rtol=1e-12)


def test_log_standardises_the_log_of_positive_idps_only_and_inverts_everywhere(skewed):
    scaler = IDPScaler("log").fit(skewed)
    z = scaler.transform(skewed)
    assert abs(stats.skew(z[:, 0])) < 0.1  # the log of a lognormal is normal
    np.testing.assert_allclose(z[:, 0], stats.zscore(np.log(skewed[:, 0])), atol=1e-10)
    np.testing.assert_allclose(z[:, 2], stats.zscore(skewed[:, 2]), atol=1e-10)  # has zeros: not logged
    np.testing.assert_allclose(scaler.inverse_transform(z), skewed, rtol=1e-12)
    # a new person's zero or negative value of a logged IDP still maps, below every training value
    x = np.array([[0.0, 2.5, 1.0], [-50.0, 2.4, 1.0], [1e6, 2.6, 1.0]])
    out = scaler.transform(x)
    assert np.isfinite(out).all() and out[1, 0] < out[0, 0] < z[:, 0].min() and out[2, 0] > z[:, 0].max()
    np.testing.assert_allclose(scaler.inverse_transform(out), x, rtol=1e-9, atol=1e-9)
    # quantiles in model space come back positive however low: the model's bands never reach zero
    assert (scaler.inverse_transform(np.full((1, 3), -5.0))[0, :2] > 0).all()
    grid = np.linspace(-100, 1e5, 20001)
    assert (np.diff(scaler.transform(np.column_stack([grid] * 3)), axis=0) > 0).all()
    state = IDPScaler.from_dict(scaler.to_dict())
    np.testing.assert_allclose(state.transform(x), out)


def test_quantile_normal_makes_skewed_idps_normal_and_inverts_exactly(skewed):
    scaler = IDPScaler("quantile-normal").fit(skewed)
    z = scaler.transform(skewed)
    assert abs(stats.skew(z[:, 0])) < 0.05  # lognormal skew 1.75 removed
    assert stats.kstest(z[:, 0], "norm").statistic < 0.02
    # exact inverse inside and far outside the training range (linear tails)
    x = np.array([[1.0, 1.0, -3.0], [1e5, 4.0, 12.0], [3000.0, 2.5, 2.5]])
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(x)), x, rtol=1e-9)
    grid = np.linspace(-8, 8, 101)
    back = scaler.transform(scaler.inverse_transform(np.column_stack([grid] * 3)))
    np.testing.assert_allclose(back, np.column_stack([grid] * 3), atol=1e-9)


def test_quantile_normal_is_strictly_increasing_so_centiles_are_unchanged(skewed):
    scaler = IDPScaler("quantile-normal").fit(skewed)
    for j in range(3):
        x = np.sort(np.r_[skewed[:, j], skewed[:, j].min() - 10, skewed[:, j].max() + 10, np.linspace(
            skewed[:, j].min() - 5, skewed[:, j].max() + 5, 500)])
        z = scaler.transform(x[:, None].repeat(3, axis=1))[:, j]
        assert (np.diff(z)[np.diff(x) > 0] > 0).all()


def test_nan_passes_through_and_state_round_trips(skewed):
    for method in ("zscore", "quantile-normal"):
        scaler = IDPScaler(method).fit(skewed)
        again = IDPScaler.from_dict(scaler.to_dict())
        x = skewed[:10].copy()
        x[0, 1] = np.nan
        a, b = scaler.transform(x), again.transform(x)
        assert np.isnan(a[0, 1]) and np.isfinite(np.delete(a.ravel(), 1)).all()
        np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_refused(skewed):
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        IDPScaler("rank")
    with pytest.raises(ValueError, match="constant"):
        IDPScaler().fit(np.column_stack([skewed[:, 0], np.ones(len(skewed))]))
    with pytest.raises(ValueError, match="finite"):
        IDPScaler().fit(np.array([[1.0], [np.inf], [2.0]]))
    with pytest.raises(ValueError, match="at least one value per IDP"):
        IDPScaler().fit(np.array([[1.0, np.nan], [3.0, np.nan], [2.0, np.nan]]))
    # NaN marks a missing value: the statistics are those of the values present
    scaler = IDPScaler().fit(np.array([[1.0], [np.nan], [3.0]]))
    assert scaler.mean_[0] == 2.0 and np.isnan(scaler.transform(np.array([[np.nan]]))[0, 0])
    with pytest.raises(ValueError, match="expected 3 IDP columns"):
        IDPScaler().fit(skewed).transform(skewed[:, :2])
