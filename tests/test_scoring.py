"""Scoring: centiles, the tail rule, quantiles and the joint deviation score on known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.special import ndtr, ndtri

from normdiff_bids.scoring import (
    CENTILE_FLOOR,
    centiles_to_z,
    empirical_centiles,
    interpolate_quantile_functions,
    joint_deviation,
    sample_quantiles,
)
from normdiff_bids.scoring.joint import (
    MAX_MODEL_SHRINKAGE,
    insample_shift,
    ledoit_wolf_covariance,
    model_shrinkage,
    normal_scores_loo,
)


def test_mid_rank_centiles_on_a_hand_example():
    samples = np.array([1.0, 2.0, 2.0, 3.0])[None, :, None]  # S = 4
    values = np.array([[0.5], [1.0], [2.0], [2.5], [3.0]])
    c, tail = empirical_centiles(values, np.repeat(samples, 5, axis=0))
    # 1.0: (0 + 0.5 + 0.5)/5; 2.0: (1 + 1 + 0.5)/5; 2.5: (3 + 0.5)/5; 3.0: (3 + 0.5 + 0.5)/5
    assert c[1:, 0] == pytest.approx([0.2, 0.5, 0.7, 0.8])
    assert c[0, 0] < 0.2 and tail[:, 0].tolist() == [-1, 0, 0, 0, 0]


def test_centiles_of_values_from_the_same_distribution_are_uniform():
    # 2000 rows x 3 features, each value drawn like its 199 samples (different distributions per row)
    rng = np.random.default_rng(0)
    loc, scale = rng.normal(size=(2000, 1, 3)), rng.uniform(0.5, 2, size=(2000, 1, 3))
    samples = loc + scale * rng.standard_gamma(3.0, size=(2000, 199, 3))
    values = (loc + scale * rng.standard_gamma(3.0, size=(2000, 1, 3)))[:, 0]
    c, tail = empirical_centiles(values, samples)
    assert c.shape == (2000, 3) and tail.dtype == np.int8
    assert np.all((c > 0) & (c < 1))
    assert stats.kstest(c.ravel(), "uniform").statistic < 0.03
    # about 1/(S+1) of values fall beyond each end of the samples
    assert abs(np.mean(tail == 1) - 1 / 200) < 0.004 and abs(np.mean(tail == -1) - 1 / 200) < 0.004


def test_tail_rule_is_monotone_finite_and_gaussian_in_a_gaussian_tail():
    rng = np.random.default_rng(1)
    samples = rng.normal(size=(1, 1000, 1))
    grid = np.concatenate([np.linspace(-60, -3, 200), np.linspace(-3, 3, 400), np.linspace(3, 60, 200)])
    c, tail = empirical_centiles(grid[:, None], np.repeat(samples, len(grid), axis=0))
    z = centiles_to_z(c[:, 0])
    assert np.all(np.isfinite(z)) and np.all(np.diff(c[:, 0]) >= 0)
    beyond = tail[:, 0] != 0
    assert np.all(np.diff(z[beyond & (grid > 0) & (c[:, 0] < 1 - CENTILE_FLOOR)]) > 0)
    # beyond the largest of 1000 N(0,1) samples, z continues like the Gaussian: at 4.5 SD the tail
    # rule scores 4.46 on average with an SD of 0.59 (200 rows: the mean is within 0.2 of 4.5)
    many = rng.normal(size=(200, 1000, 1))
    c45, t45 = empirical_centiles(np.tile([[4.5]], (200, 1)), many)
    assert np.all(t45 == 1)
    z45 = centiles_to_z(c45[:, 0])
    assert abs(z45.mean() - 4.5) < 0.2 and z45.std() < 0.75
    # extreme values saturate at the float64 floor symmetrically, never at 0 or 1
    assert c[0, 0] == CENTILE_FLOOR and c[-1, 0] == 1 - CENTILE_FLOOR


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tail_rule_follows_a_skewed_tail_on_both_sides(sign):
    """Log-normal(0.5) samples, the value at a true z of 4.5: a Gaussian tail scored it 6.1 on average.

    The rule's curve follows the skew (measured: 4.40 +- 0.46 over 400 rows) in the long tail and
    in the short one of the mirror image, where a straight line would under-flag.
    """
    rng = np.random.default_rng(7)
    sigma, z_true = 0.5, 4.5
    long_tail = np.exp(sigma * rng.normal(size=(200, 1000, 1)))
    value = np.exp(sigma * z_true)
    c, t = empirical_centiles(np.full((200, 1), sign * value), sign * long_tail)
    z = centiles_to_z(c[:, 0]) * sign
    assert np.mean(t != 0) > 0.95
    assert abs(z.mean() - z_true) < 0.3, z.mean()
    # the short tail: the mirror image's upper end lies at the value with true z 4.5 of -exp(-sigma Z)
    short = -np.exp(-sigma * rng.normal(size=(200, 1000, 1)))
    c, _ = empirical_centiles(np.full((200, 1), -np.exp(-sigma * z_true)), short)
    z_short = centiles_to_z(c[:, 0])
    assert abs(z_short.mean() - z_true) < 0.4, z_short.mean()


def test_quantiles_beyond_the_samples_invert_the_tail_rule():
    rng = np.random.default_rng(8)
    samples = np.exp(0.5 * rng.normal(size=(4, 1000, 2)))
    z_levels = np.array([-6.0, -5.0, -4.0, 4.0, 5.0, 6.0])
    x = sample_quantiles(samples, ndtr(z_levels))
    assert np.all(np.diff(x, axis=1) > 0)
    back = np.stack([centiles_to_z(empirical_centiles(x[:, i], samples)[0]) for i in range(len(z_levels))], 1)
    np.testing.assert_allclose(back, np.broadcast_to(z_levels[None, :, None], back.shape), atol=1e-9)


def test_tail_rule_with_tied_samples_stays_finite():
    samples = np.zeros((2, 50, 1))
    samples[:, 25:] = 1.0
    c, tail = empirical_centiles(np.array([[5.0], [-5.0]]), samples)
    assert np.all(np.isfinite(centiles_to_z(c))) and tail[:, 0].tolist() == [1, -1]


def test_nan_values_give_nan_centiles_and_bad_shapes_are_named():
    samples = np.random.default_rng(2).normal(size=(2, 30, 2))
    c, tail = empirical_centiles(np.array([[np.nan, 0.0], [0.0, 0.0]]), samples)
    assert np.isnan(c[0, 0]) and tail[0, 0] == 0 and np.isfinite(c[0, 1])
    with pytest.raises(ValueError, match=r"values must be \[rows, features\]"):
        empirical_centiles(np.zeros((3, 2)), samples)
    with pytest.raises(ValueError, match="NaN or inf"):
        empirical_centiles(np.zeros((2, 2)), np.full((2, 30, 2), np.nan))


def test_quantiles_invert_centiles_and_extrapolate_with_the_tail_rule():
    rng = np.random.default_rng(3)
    samples = rng.normal(2.0, 3.0, size=(100, 999, 2))
    q = np.array([1e-4, 0.02, 0.25, 0.5, 0.75, 0.98, 1 - 1e-4])
    quant = sample_quantiles(samples, q)
    assert quant.shape == (100, 7, 2) and np.all(np.diff(quant, axis=1) > 0)
    inner = quant[:, 1:-1]
    for j in range(inner.shape[1]):
        c, _ = empirical_centiles(inner[:, j], samples)
        assert c == pytest.approx(q[1 + j], abs=1.0 / 1000)
    # beyond the samples, the tail line: unbiased to within 0.15 SD on average over rows
    assert quant[:, 0].mean() == pytest.approx(2 + 3 * ndtri(1e-4), abs=0.45)
    assert quant[:, -1].mean() == pytest.approx(2 - 3 * ndtri(1e-4), abs=0.45)
    with pytest.raises(ValueError, match="strictly inside"):
        sample_quantiles(samples, [0.5, 1.0])


def test_ledoit_wolf_matches_scikit_learn():
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(4).normal(size=(3, 40, 25)) @ np.random.default_rng(5).normal(size=(25, 25))
    ours = ledoit_wolf_covariance(x)
    for r in range(3):
        assert ours[r] == pytest.approx(sklearn_cov.LedoitWolf().fit(x[r]).covariance_, rel=1e-8, abs=1e-10)


def test_ledoit_wolf_floor_shrinks_at_least_that_far_towards_the_identity():
    x = np.random.default_rng(4).normal(size=(2, 400, 6)) @ np.random.default_rng(5).normal(size=(6, 6))
    own = ledoit_wolf_covariance(x)
    assert ledoit_wolf_covariance(x, floor=0.001) == pytest.approx(own)  # below Ledoit-Wolf's own: unchanged
    full = ledoit_wolf_covariance(x, floor=1.0)
    mu = np.trace(own, axis1=1, axis2=2) / 6
    assert full == pytest.approx(mu[:, None, None] * np.eye(6))
    half = ledoit_wolf_covariance(x, floor=0.5)
    off = ~np.eye(6, dtype=bool)
    sample = np.stack([np.cov(r.T, bias=True) for r in x])
    assert half[:, off] == pytest.approx(0.5 * sample[:, off])


def test_model_shrinkage_vanishes_for_large_cohorts_and_is_capped():
    assert model_shrinkage(20, 6000) == pytest.approx(20 / 6000)
    assert model_shrinkage(100, 216) == pytest.approx(100 / 216)
    assert model_shrinkage(150, 216) == pytest.approx(150 / 216)
    assert model_shrinkage(200, 200) == MAX_MODEL_SHRINKAGE == 0.9
    assert model_shrinkage(212, 0) == 0.9


def test_leave_one_out_normal_scores_are_standard_normal_like():
    z = normal_scores_loo(np.random.default_rng(6).exponential(size=(2, 500, 3)))
    assert z.shape == (2, 500, 3) and np.all(np.isfinite(z))
    assert np.abs(z.mean(axis=1)).max() < 0.02 and np.abs(z.std(axis=1) - 1).max() < 0.05


def test_leave_one_out_normal_scores_give_tied_samples_their_average_rank():
    samples = np.random.default_rng(8).integers(0, 6, size=(2, 50, 3)).astype(float)  # many ties
    z = normal_scores_loo(samples)
    ranks = stats.rankdata(samples, axis=1, method="average")
    inner = (samples > samples.min(axis=1, keepdims=True)) & (samples < samples.max(axis=1, keepdims=True))
    np.testing.assert_allclose(z[inner], ndtri((ranks[inner] - 0.5) / 50), rtol=0, atol=1e-12)
    for row in range(2):  # tied samples share one score
        for d in range(3):
            for value in np.unique(samples[row, :, d]):
                assert np.ptp(z[row, samples[row, :, d] == value, d]) == 0


def _correlated(rng, rows, n, d, rho=0.6):
    cov = rho * np.ones((d, d)) + (1 - rho) * np.eye(d)
    chol = np.linalg.cholesky(cov)
    return np.exp(rng.normal(size=(rows, n, d)) @ chol.T)  # log-normal marginals, correlated


def test_joint_centile_is_uniform_in_distribution_and_large_for_an_outlier():
    rng = np.random.default_rng(7)
    rows, s, d = 400, 400, 12
    samples = _correlated(rng, rows, s, d)
    values = _correlated(rng, rows, 1, d)[:, 0]
    out = joint_deviation(values, samples)
    assert list(out.columns) == ["joint_stat", "joint_centile", "joint_z"] and len(out) == rows
    assert np.all((out.joint_centile > 0) & (out.joint_centile < 1))
    assert stats.kstest(out.joint_centile, "uniform").statistic < 0.08
    # a profile that breaks the correlation (each IDP at an ordinary centile, signs alternating) is
    # unusual jointly although no single IDP is
    # (Mahalanobis length 8.2 where the chi_12 99.9th centile is 5.7)
    pattern = np.tile(np.exp(np.where(np.arange(d) % 2 == 0, 1.5, -1.5)), (5, 1))
    ref = _correlated(rng, 5, 1000, d)
    assert np.all(np.abs(centiles_to_z(empirical_centiles(pattern, ref)[0])) < 1.7)
    odd = joint_deviation(pattern, ref)
    assert np.all(odd.joint_centile > 0.995) and np.all(odd.joint_z > 2.5)
    np.testing.assert_allclose(out.joint_z, ndtri(out.joint_centile))
    # with the covariance half-way to the identity the centile stays uniform (it is taken among the
    # draws' own statistics under the same covariance) and the pattern is still flagged
    half = joint_deviation(values, samples, shrinkage=0.5)
    assert stats.kstest(half.joint_centile, "uniform").statistic < 0.08
    assert not np.allclose(half.joint_stat, out.joint_stat)
    assert np.all(joint_deviation(pattern, ref, shrinkage=0.5).joint_centile > 0.99)


def test_joint_deviation_handles_d_close_to_s_and_missing_values():
    rng = np.random.default_rng(8)
    samples = rng.normal(size=(3, 200, 150))
    values = rng.normal(size=(3, 150))
    values[1, 3] = np.nan
    out = joint_deviation(values, samples, index=["a", "b", "c"])
    assert list(out.index) == ["a", "b", "c"]
    assert np.isnan(out.loc["b", "joint_centile"]) and np.isfinite(out.loc[["a", "c"], "joint_z"]).all()
    with pytest.raises(ValueError, match="at least 20 samples"):
        joint_deviation(values, samples[:, :10])


def _rank_probit(lengths, reference):
    return float(ndtri((np.searchsorted(np.sort(reference), lengths) + 0.5) / (len(reference) + 1)).mean())


def test_the_insample_shift_is_the_left_out_lengths_rank_among_the_in_sample_ones():
    from normdiff_bids.scoring.joint import _ledoit_wolf_parts

    rng = np.random.default_rng(3)
    rows = _correlated(rng, 1, 40, 5)[0]
    for floor in (0.0, 0.3):
        cov, mu, shrink = (a[0] for a in _ledoit_wolf_parts(rows[None], floor))
        centred = rows - rows.mean(axis=0)
        full = (1 - shrink) * cov + shrink * mu * np.eye(5)
        inside = np.einsum("ni,ij,nj->n", centred, np.linalg.inv(full), centred)
        left_out = np.empty(len(rows))
        for i in range(len(rows)):  # the covariance of the other rows, by brute force
            others = np.delete(centred, i, axis=0)
            s_i = (1 - shrink) * others.T @ others / (len(rows) - 1) + shrink * mu * np.eye(5)
            left_out[i] = centred[i] @ np.linalg.solve(s_i, centred[i])
        assert left_out.mean() > inside.mean()  # a row far out moves the covariance towards itself
        assert insample_shift(rows, floor) == pytest.approx(_rank_probit(left_out, inside), abs=1e-9)


def test_the_insample_shift_predicts_how_much_less_typical_new_rows_look():
    """Rows whose covariance was learnt from them look more typical than new rows: by about 0.3 in
    probit for 20 IDPs from 200 rows, by little for 5 IDPs from 1000; the closed form says how much."""
    rng = np.random.default_rng(11)
    for n, d, low, high in ((200, 20, 0.2, 0.6), (1000, 5, 0.0, 0.08)):
        predicted, measured = [], []
        for _ in range(20):
            rows, new = np.log(_correlated(rng, 1, n, d)[0]), np.log(_correlated(rng, 1, 2000, d)[0])
            chol = np.linalg.cholesky(ledoit_wolf_covariance(rows[None])[0])
            centre = rows.mean(axis=0)
            inside = np.sum(np.linalg.solve(chol, (rows - centre).T) ** 2, axis=0)
            outside = np.sum(np.linalg.solve(chol, (new - centre).T) ** 2, axis=0)
            measured.append(_rank_probit(outside, inside))
            predicted.append(insample_shift(rows))
        assert low < np.mean(measured) < high
        assert np.mean(predicted) == pytest.approx(np.mean(measured), abs=0.04)


def test_joint_deviation_is_row_independent():
    rng = np.random.default_rng(9)
    samples, values = rng.normal(size=(4, 100, 5)), rng.normal(size=(4, 5))
    full = joint_deviation(values, samples)
    alone = joint_deviation(values[2:3], samples[2:3])
    np.testing.assert_array_equal(full.iloc[2].to_numpy(), alone.iloc[0].to_numpy())


def test_interpolated_quantile_functions_keep_the_nearer_points_ranks():
    rng = np.random.default_rng(10)
    a = rng.normal(0.0, 1.0, size=(2, 300, 2))
    b = rng.normal(4.0, 2.0, size=(2, 300, 2))
    mid = interpolate_quantile_functions(a, b, np.array([1.0, 0.5]))
    np.testing.assert_allclose(mid[0], a[0])
    assert mid[1].mean(axis=0) == pytest.approx(0.5 * a[1].mean(0) + 0.5 * b[1].mean(0))
    np.testing.assert_array_equal(np.argsort(mid[1], axis=0), np.argsort(a[1], axis=0))
