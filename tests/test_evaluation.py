"""The evaluation metrics answer known cases: calibrated vs shifted, copies vs fresh, dependent vs not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normdiff_bids.errors import InputError
from normdiff_bids.evaluation import (
    absolute_centile_error,
    balance_by_age_sex,
    benjamini_hochberg,
    by_group,
    centile_error,
    correlation_matrix_error,
    empirical_coverage,
    fisher_combined,
    ks_by_age_bin,
    ks_permutation_test,
    mantel_test,
    memorisation_ratio,
    pair_of_pair_comparison,
    pairwise_dependence,
    pit_summary,
    product_of_marginals,
    stouffer_combined,
    wilson_interval,
)
from normdiff_bids.evaluation.calibration import binomial_noise_floor

IDPS = ["a", "b", "c", "d"]
CORR = 0.7


def population(n: int, seed: int, shift: float = 0.0, independent: bool = False) -> pd.DataFrame:
    """Ages 20-60, sex, two sites; four IDPs with mean and SD depending on age, equicorrelated (rho=0.7)."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 60, n)
    sex = rng.choice(["F", "M"], n)
    site = rng.choice(["s1", "s2"], n)
    cov = np.full((4, 4), CORR) + (1 - CORR) * np.eye(4)
    z = rng.multivariate_normal(np.zeros(4), cov, size=n)
    if independent:
        z = rng.standard_normal((n, 4))
    mean = 10 + 0.1 * (age[:, None] - 40) + np.array([0, 1, 2, 3])
    sd = 1 + 0.02 * (age[:, None] - 20)
    values = mean + sd * (z + shift)
    table = pd.DataFrame({"age": age, "sex": sex, "site": site})
    return pd.concat([table, pd.DataFrame(values, columns=IDPS)], axis=1)


def true_centiles(table: pd.DataFrame) -> pd.DataFrame:
    age = table["age"].to_numpy()[:, None]
    mean = 10 + 0.1 * (age - 40) + np.array([0, 1, 2, 3])
    sd = 1 + 0.02 * (age - 20)
    return pd.DataFrame(stats.norm.cdf((table[IDPS].to_numpy() - mean) / sd), columns=IDPS, index=table.index)


@pytest.fixture(scope="module")
def real():
    return population(3000, seed=1)


# ---------------------------------------------------------------------- ACE
def test_ace_of_true_distribution_is_at_its_noise_floor_and_a_shift_is_not(real):
    """Samples from the true distribution give ACE at the binomial noise floor; a +1 SD shift gives about
    mean_q |Phi(Phi^-1(q) + 1) - q| = 0.21."""
    truth = absolute_centile_error(real, population(20000, seed=2), idps=IDPS)
    shifted = absolute_centile_error(real, population(20000, seed=3, shift=1.0), idps=IDPS)
    assert truth["n_bins"] == 40
    assert abs(truth["ace"] - truth["noise_floor"]) < 0.015
    assert truth["ace"] < 0.08
    assert shifted["ace"] > 0.17
    assert shifted["ace"] > 2.5 * truth["ace"]
    assert list(truth["per_idp"].index) == IDPS
    assert set(truth["per_bin"].columns) >= {"bin", "idp", "n_real", "n_generated", "q=0.02", "q=0.98"}


def test_ace_by_hand_on_one_bin():
    """One bin, real values 1..10, generated 0..100: the 0.5-quantile is 50, so p = 1 and |p - q| = 0.5."""
    real = pd.DataFrame({"age": 30.5, "x": np.arange(1, 11, dtype=float)})
    generated = pd.DataFrame({"age": 30.2, "x": np.arange(0, 101, dtype=float)})
    result = absolute_centile_error(real, generated, centiles=(0.5,))
    assert result["per_idp"].loc["x", "q=0.5"] == pytest.approx(0.5)
    assert result["ace"] == pytest.approx(0.5)


def test_binomial_noise_floor_matches_simulation():
    rng = np.random.default_rng(0)
    simulated = np.mean(np.abs(rng.binomial(7, 0.25, 200000) / 7 - 0.25))
    assert binomial_noise_floor(np.array([7]), 0.25)[0] == pytest.approx(simulated, abs=0.002)


def test_ace_names_the_missing_column(real):
    with pytest.raises(InputError, match="missing IDP column"):
        absolute_centile_error(real, real.drop(columns="b"), idps=IDPS)


def test_per_subject_centile_error_is_zero_for_the_truth_and_known_for_an_offset(real):
    truth = true_centiles(real)
    assert centile_error(truth, truth)["mean_abs_error"] == 0.0
    off = (truth + 0.01).clip(upper=1.0)
    assert centile_error(off, truth)["mean_abs_error"] == pytest.approx(0.01, abs=1e-3)


# ---------------------------------------------------------------------- coverage and PIT
def test_calibrated_centiles_cover_95_percent_and_too_narrow_ones_do_not():
    """Uniform centiles cover 0.95; a model 1.5 times too narrow covers P(|Z| < 1.96 / 1.5) = 0.809."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, 3))
    good = empirical_coverage(pd.DataFrame(stats.norm.cdf(z), columns=list("xyz")))
    narrow = empirical_coverage(pd.DataFrame(stats.norm.cdf(1.5 * z), columns=list("xyz")))
    assert good["abs_error"] < 0.01
    assert list(good["curve"].columns) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]
    assert np.allclose(good["curve_mean"].to_numpy(), good["curve"].columns.to_numpy(), atol=0.01)
    expected = 2 * stats.norm.cdf(1.96 / 1.5) - 1
    assert narrow["coverage"] == pytest.approx(expected, abs=0.01)


def test_calibrated_pit_is_flat_and_miscalibrated_pit_is_not():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((5000, 2))
    flat = pit_summary(pd.DataFrame(stats.norm.cdf(z), columns=["x", "y"]))
    shifted = pit_summary(pd.DataFrame(stats.norm.cdf(z + 0.3), columns=["x", "y"]))
    assert flat["ks"] < 0.03
    assert flat["histogram"].shape == (2, 20)
    assert np.allclose(flat["histogram"].to_numpy(), 1.0, atol=0.3)
    assert shifted["ks"] > 0.1
    assert shifted["per_idp"]["p_value"].max() < 1e-6


def test_coverage_rejects_values_outside_unit_interval():
    with pytest.raises(InputError, match="centiles must lie in"):
        empirical_coverage(pd.DataFrame({"x": [0.2, 1.7]}))


# ---------------------------------------------------------------------- KS, BH, combined p
def test_ks_statistic_matches_scipy_including_ties():
    rng = np.random.default_rng(2)
    x = np.round(rng.normal(size=40), 1)
    y = np.round(rng.normal(0.2, 1, size=55), 1)
    stat, p = ks_permutation_test(x, y, n_permutations=200)
    assert stat == pytest.approx(stats.ks_2samp(x, y).statistic)
    assert 1 / 201 <= p <= 1


def test_ks_permutation_p_is_roughly_uniform_under_the_null_and_tiny_under_a_shift():
    rng = np.random.default_rng(3)
    p_null = [ks_permutation_test(rng.normal(size=30), rng.normal(size=60), 200, seed=i)[1]
              for i in range(80)]
    assert 0.35 < np.mean(p_null) < 0.65
    assert np.mean(np.asarray(p_null) < 0.05) < 0.15
    _, p_shift = ks_permutation_test(rng.normal(size=50), rng.normal(1.0, 1, size=200), 500)
    assert p_shift < 0.01


def test_ks_by_age_bin_rejects_a_shift_and_skips_small_bins(real):
    same = ks_by_age_bin(real, population(6000, seed=4), idps=IDPS, n_permutations=99, bin_width=5.0)
    shifted = ks_by_age_bin(real, population(6000, seed=5, shift=0.6), idps=IDPS, n_permutations=99,
                            bin_width=5.0)
    assert same["n_tests"] == 32  # 8 five-year bins x 4 IDPs
    assert same["frac_reject"] <= 0.1
    assert shifted["frac_reject"] > 0.8
    assert shifted["per_idp"]["fisher_p"].max() < 1e-3
    few = ks_by_age_bin(real.iloc[:30], population(600, seed=6), idps=IDPS, n_permutations=20)
    assert (few["per_bin"]["n_real"] >= 10).all()


def test_benjamini_hochberg_matches_a_hand_computation():
    # sorted p: .005 .01 .03 .04 -> x m/rank: .02 .02 .04 .04 -> monotone from the top: same
    adjusted = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    assert np.allclose(adjusted, [0.02, 0.04, 0.04, 0.02])
    assert np.allclose(benjamini_hochberg([0.01, 0.02, 0.9]), [0.03, 0.03, 0.9])
    p = np.random.default_rng(0).uniform(size=50)
    assert np.allclose(benjamini_hochberg(p), stats.false_discovery_control(p))


def test_fisher_and_stouffer_match_scipy():
    p = [0.04, 0.2, 0.5, 0.01]
    assert fisher_combined(p) == pytest.approx(stats.combine_pvalues(p, method="fisher").pvalue)
    assert stouffer_combined(p) == pytest.approx(stats.combine_pvalues(p, method="stouffer").pvalue)


def test_wilson_interval_on_a_textbook_case():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


# ---------------------------------------------------------------------- dependence
def test_independent_samples_show_a_large_correlation_error(real):
    dependent = correlation_matrix_error(real, population(3000, seed=7), idps=IDPS)
    independent = correlation_matrix_error(real, population(3000, seed=8, independent=True), idps=IDPS)
    assert dependent["frobenius"] < 2 * dependent["noise_floor"] + 0.05
    # Marginal correlation here is about 0.7 on each of 12 off-diagonal entries: sqrt(12 * 0.49) = 2.4.
    assert independent["frobenius"] > 1.5
    assert independent["frobenius"] > 10 * dependent["frobenius"]


def test_pairwise_energy_and_mmd_prefer_the_dependent_model_to_the_product_of_marginals(real):
    result = pairwise_dependence(real, population(3000, seed=9), idps=IDPS, max_rows=300)
    assert result["n_pairs"] == 6
    assert result["frac_pairs_beat_pom"] == 1.0
    assert result["energy_ratio"] < 0.5
    assert result["mmd2_ratio"] < 0.5
    capped = pairwise_dependence(real, population(1000, seed=9), idps=IDPS, max_pairs=3, max_rows=100, seed=5)
    assert capped["n_pairs"] == 3 and capped["n_pairs_total"] == 6 and capped["seed"] == 5


def test_product_of_marginals_keeps_each_group_marginal():
    table = pd.DataFrame({"row": np.repeat([0, 1, 2], 50), "x": np.arange(150.0), "y": np.arange(150.0)})
    shuffled = product_of_marginals(table, ["x", "y"], within="row", seed=1)
    for _, group in shuffled.groupby("row"):
        assert sorted(group["x"]) == sorted(table.loc[group.index, "x"])
    assert abs(np.corrcoef(shuffled["x"], shuffled["y"])[0, 1]) < 0.99
    assert not shuffled["x"].equals(table["x"])


def test_mantel_test_on_identical_and_unrelated_matrices():
    rng = np.random.default_rng(0)
    a = rng.random((12, 12))
    a = a + a.T
    r_same, p_same = mantel_test(a, a, n_permutations=199)
    assert r_same == pytest.approx(1.0) and p_same < 0.02
    b = rng.random((12, 12))
    r_other, _ = mantel_test(a, b + b.T, n_permutations=99)
    assert abs(r_other) < 0.4


def test_pair_of_pair_mantel_is_high_for_the_true_model_and_low_for_independent_samples():
    """Pairs with different dependence (rho from -0.6 to 0.9) have different shapes; the true model keeps
    which pairs look alike, independent samples make every pair look the same."""
    cov = np.array([[1.0, 0.9, 0.0, -0.6, 0.3],
                    [0.9, 1.0, 0.1, -0.5, 0.3],
                    [0.0, 0.1, 1.0, 0.0, 0.6],
                    [-0.6, -0.5, 0.0, 1.0, 0.0],
                    [0.3, 0.3, 0.6, 0.0, 1.0]])
    names = list("vwxyz")

    def draw(seed, independent=False):
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((3000, 5)) if independent else rng.multivariate_normal(np.zeros(5), cov, 3000)
        return pd.DataFrame(z, columns=names)

    real = draw(0)
    good = pair_of_pair_comparison(real, draw(1), n_permutations=199)
    independent = pair_of_pair_comparison(real, draw(2, independent=True), n_permutations=199)
    assert good["n_pairs"] == 10 and good["real"].shape == (10, 10)
    assert good["mantel_r"] > 0.8 and good["mantel_p"] < 0.05
    assert independent["mantel_r"] < good["mantel_r"] - 0.4
    assert pair_of_pair_comparison(real, real, max_idps=3)["skipped"]


# ---------------------------------------------------------------------- memorisation
def test_a_copy_of_the_training_set_has_ratio_near_zero_and_a_fresh_draw_near_one():
    train, holdout = population(2000, seed=11), population(1000, seed=12)
    copied = memorisation_ratio(train, holdout, train.copy(), idps=IDPS)
    fresh = memorisation_ratio(train, holdout, population(1000, seed=13), idps=IDPS)
    # Balancing keeps about half of the training rows, so only those copies are exact duplicates.
    assert copied["median_ratio"] < 0.1
    assert copied["p_lt_1"] > 0.65
    assert copied["near_duplicate_rate"] > 0.3
    kept, _ = balance_by_age_sex(train, holdout)
    exact = memorisation_ratio(train, holdout, kept.copy(), idps=IDPS)
    assert exact["median_ratio"] == 0.0 and exact["near_duplicate_rate"] == 1.0
    assert 0.85 < fresh["median_ratio"] < 1.15
    assert 0.4 < fresh["p_lt_1"] < 0.6
    assert fresh["p_lt_1_ci"][0] < fresh["p_lt_1"] < fresh["p_lt_1_ci"][1]
    assert fresh["near_duplicate_rate"] == 0.0


def test_balancing_gives_equal_counts_in_every_age_sex_cell():
    train, holdout = population(2000, seed=14), population(300, seed=15)
    tb, hb = balance_by_age_sex(train, holdout, bin_width=5.0)
    assert len(tb) == len(hb) > 200

    def key(t):
        return pd.Series(list(zip(np.floor(t["age"] / 5), t["sex"])))

    assert key(tb).value_counts().sort_index().equals(key(hb).value_counts().sort_index())


# ---------------------------------------------------------------------- groups
def test_by_group_reports_every_metric_per_sex_and_per_site(real):
    generated = population(6000, seed=16)
    per_sex = by_group(absolute_centile_error, real, generated, by="sex", idps=IDPS)
    assert list(per_sex.index) == ["F", "M"]
    assert (per_sex["ace"] < 0.12).all()
    centiles = true_centiles(real).join(real[["site"]])
    per_site = by_group(empirical_coverage, centiles, by="site", idps=IDPS)
    assert list(per_site.index) == ["s1", "s2"]
    assert (per_site["abs_error"] < 0.03).all()
    with pytest.raises(InputError, match="no column 'scanner'"):
        by_group(empirical_coverage, centiles, by="scanner", idps=IDPS)
