"""Benchmark helpers behind published numbers: the Gaussian baseline, the real-data split, skip rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402
from baselines import GaussianSplineBaseline  # noqa: E402


def heteroscedastic_cohort(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """y = mu(age, site) + sigma(age) * eps; returns the table and the true centiles."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(10, 80, n)
    sex = rng.choice(["F", "M"], n)
    site = rng.choice(["a", "b", "c"], n)
    mu = 3000 - 8 * age + 0.05 * (age - 45) ** 2
    mu = mu + np.where(site == "b", 150.0, 0.0) + np.where(sex == "M", 200.0, 0.0)
    sigma = 100 + 3 * age
    y = mu + sigma * rng.standard_normal(n)
    table = pd.DataFrame({"age": age, "sex": sex, "site": site, "vol": y})
    truth = pd.DataFrame({"vol": stats.norm.cdf((y - mu) / sigma)})
    return table, truth


def test_gaussian_baseline_recovers_a_heteroscedastic_gaussian():
    train, _ = heteroscedastic_cohort(4000, seed=1)
    test, truth = heteroscedastic_cohort(1000, seed=2)
    model = GaussianSplineBaseline().fit(train, idps=["vol"])
    centiles = model.predict_centiles(test)
    assert float(np.mean(np.abs(centiles["vol"] - truth["vol"]))) < 0.02
    inside = ((centiles["vol"] > 0.025) & (centiles["vol"] < 0.975)).mean()
    assert abs(inside - 0.95) < 0.025
    samples = model.sample(test.iloc[:5], n_samples=4000)
    assert samples.shape == (5, 4000, 1)
    # the sampled median sits at the fitted median
    median = model.predict_quantiles(test.iloc[:5], q=[0.5]).to_numpy()[:, 0]
    assert np.allclose(np.median(samples[:, :, 0], axis=1), median, rtol=0.01)


def test_gaussian_baseline_names_an_unseen_site():
    train, _ = heteroscedastic_cohort(500, seed=1)
    model = GaussianSplineBaseline().fit(train, idps=["vol"])
    test = train.iloc[:3].assign(site="z")
    with pytest.raises(ValueError, match="'site'.*never seen"):
        model.predict_centiles(test)


def test_real_split_is_70_30_within_site_and_keeps_tiny_sites_in_training():
    table = pd.DataFrame({"site": ["A"] * 100 + ["B"] * 40 + ["C"] * 3, "x": np.arange(143)})
    train, test, small = peers.split_by_site(table, seed=0)
    assert test.groupby("site").size().to_dict() == {"A": 30, "B": 12}
    assert (train["site"] == "C").sum() == 3 and small == ["C (3)"]
    assert sorted([*train["x"], *test["x"]]) == list(range(143))
    again = peers.split_by_site(table, seed=0)[1]
    assert again["x"].tolist() == test["x"].tolist()


def test_skipped_methods_keep_their_row_with_the_reason(tmp_path):
    data = peers.synthetic_dataset(3, n_train=50, n_test=20, seed=0)
    args = peers.parse_args(["--saint-max-idps", "2", "--pcn-python", str(tmp_path / "missing-python")])
    saint = peers.run_method("saint", data, args)
    assert "skipped: 3 IDPs exceed --saint-max-idps=2" in saint["note"]
    pcn = peers.run_method("pcn-blr", data, args)
    assert "PCNtoolkit environment not found" in pcn["note"] and "--pcn-python" in pcn["note"]
    line = peers.format_row(data, "pcn-blr", pcn, args.methods)
    assert line.startswith("PCNtoolkit BLR") and "not found" in line


def test_saint_rows_use_their_own_sampling_settings():
    args = peers.parse_args(["--saint-score-samples", "123", "--saint-samples", "7", "--n-samples", "200"])
    saint = peers.saint_args(args)
    assert (saint.n_score_samples, saint.n_samples, saint.grid_step) == (123, 7, 1.0)
    assert args.n_samples == 200 and args.n_score_samples == 1000
