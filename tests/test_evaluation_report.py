"""evaluate() on a model with a known answer, its figures, and the calibration report (page and fragment)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.errors import InputError
from normdiff_bids.evaluation import evaluate, summary
from normdiff_bids.evaluation.figures import make_figures
from normdiff_bids.evaluation.report import render_calibration_report


class OracleModel:
    """A synthetic cohort's true distribution behind the estimator API; ``scale`` widens it."""

    covariates = ("age", "sex", "site")

    def __init__(self, cohort: SyntheticCohort, scale: float = 1.0):
        self.cohort, self.scale, self.idps_ = cohort, scale, list(cohort.idps)

    def _widen(self, values, covariates):
        median = self.cohort.ppf(covariates, [0.5])[:, 0, :]
        return median[:, None, :] + self.scale * (values - median[:, None, :])

    def sample(self, covariates, n_samples):
        return self._widen(self.cohort.sample_idps(covariates, n_samples, seed=7), covariates)

    def predict_centiles(self, table):
        median = self.cohort.ppf(table, [0.5])[:, 0, :]
        narrowed = table.copy()
        narrowed[self.idps_] = median + (table[self.idps_].to_numpy() - median) / self.scale
        return self.cohort.cdf(narrowed).clip(1e-6, 1 - 1e-6)

    def predict_quantiles(self, covariates, q):
        values = self._widen(self.cohort.ppf(covariates, q), covariates)        # [R, Q, D]
        columns = pd.MultiIndex.from_product([self.idps_, list(q)], names=["idp", "q"])
        return pd.DataFrame(values.transpose(0, 2, 1).reshape(len(covariates), -1), columns=columns,
                            index=covariates.index)


@pytest.fixture(scope="module")
def cohort():
    return SyntheticCohort(n_idps=4, n_sites=3, seed=0)


@pytest.fixture(scope="module")
def data(cohort):
    return cohort.sample(1500, seed=1), cohort.sample(400, seed=2)


@pytest.fixture(scope="module")
def results(cohort, data):
    train, holdout = data
    return evaluate(OracleModel(cohort), train, holdout, n_samples=40, n_permutations=99,
                    truth=cohort.cdf(holdout))


def test_the_true_model_evaluates_as_calibrated_and_unmemorised(results):
    assert results["centile_mae"] < 1e-6
    assert abs(results["ace"] - results["ace_noise_floor"]) < 0.03
    assert results["coverage95_abs_error"] < 0.03
    assert results["pit_ks"] < 0.08
    assert results["ks_frac_reject"] < 0.1
    assert 0.85 < results["nn_median_ratio"] < 1.15
    assert results["nn_near_duplicate_rate"] == 0.0
    assert results["corr_frobenius"] < 3 * results["corr_noise_floor"]
    assert set(results["groups"]) == {"sex", "site"}
    assert list(results["groups"]["sex"].index) == ["F", "M"]
    assert {"ace", "coverage95", "pit_ks", "nn_median_ratio"} <= set(results["groups"]["site"].columns)
    assert list(results["per_idp"].index) == results["config"]["idps"]


def test_a_too_wide_model_is_caught_by_coverage_and_pit(cohort, data):
    train, holdout = data
    wide = evaluate(OracleModel(cohort, scale=1.6), train, holdout, n_samples=40, n_permutations=49,
                    group_by=(), curves=False)
    assert wide["coverage95"] > 0.99
    assert wide["pit_ks"] > 0.1
    assert wide["groups"] == {}


def test_summary_is_json_safe(results):
    text = json.dumps(summary(results))
    assert '"ace"' in text and "NaN" not in text


@pytest.mark.slow
def test_figures_are_png_and_the_report_embeds_them(results):
    figures = make_figures(results)
    assert set(figures) == {"centile_curves", "pit", "coverage", "nn_ratio", "correlation"}
    assert all(png.startswith(b"\x89PNG") for png in figures.values())
    page = render_calibration_report(results, figures)
    fragment = render_calibration_report(results, figures, standalone=False)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert fragment.lstrip().startswith('<div class="ndc">') and "<html" not in fragment
    assert page.count("data:image/png;base64,") == 5
    assert "By site" in fragment and "Memorisation" in fragment
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched


def test_evaluate_names_missing_columns(cohort, data):
    train, holdout = data
    with pytest.raises(InputError, match="holdout: missing column"):
        evaluate(OracleModel(cohort), train, holdout.drop(columns=cohort.idps[0]), n_samples=5)


def test_report_says_plainly_when_the_joint_deviation_fails():
    from normdiff_bids.evaluation.report import _cards

    def card(ks):
        results = {"pit_ks": 0.03, "pit_ks_max": 0.05, "joint_pit_ks": ks, "joint_pit_ks_critical": 0.076,
                   "joint_share_95": 0.2, "joint_share_99": 0.05, "joint_n": 324}
        return next(c for c in _cards(results) if c["label"] == "PIT-KS of the joint deviation")

    assert card(0.05)["bad"] is False and card(0.05)["hint"].startswith("uniform")
    assert card(0.16)["bad"] is True and card(0.16)["hint"].startswith("FAILS")
    assert "n_networks=3" not in card(0.16)["hint"]  # unknown what decided it: no advice


def test_a_failing_joint_deviation_from_one_networks_draws_says_how_to_pool_several():
    from normdiff_bids.evaluation.report import _cards

    def hint(ks, **model):
        results = {"joint_pit_ks": ks, "joint_pit_ks_critical": 0.076, "joint_share_95": 0.03,
                   "joint_share_99": 0.0, "joint_n": 324, **model}
        return next(c for c in _cards(results) if c["label"] == "PIT-KS of the joint deviation")["hint"]

    assert "n_networks=3" in hint(0.107, joint_from_draws=True, n_networks=1)
    assert "n_networks=3" not in hint(0.05, joint_from_draws=True, n_networks=1)  # it passes
    assert "n_networks=3" not in hint(0.107, joint_from_draws=False, n_networks=1)  # a joint map decides
    assert "n_networks=3" not in hint(0.107, joint_from_draws=True, n_networks=3)  # already pooled
    # a joint map that too few unseen controls could check: say so, and what would let it be checked
    unchecked = hint(0.188, joint_from_draws=False, n_networks=1, joint_unchecked_controls=22)
    assert "22 controls that no part of the model saw were left to check it (40 needed)" in unchecked
    assert "more reference controls, or fewer IDPs" in unchecked and "n_networks=3" not in unchecked
    assert "refit with joint_folds=5 (BIDS-App: --model-options '{\"joint_folds\": 5}')" in unchecked
    passing = hint(0.05, joint_from_draws=False, n_networks=1, joint_unchecked_controls=22)
    assert "left to check" not in passing


@pytest.mark.parametrize("n", [54, 1000])
def test_per_idp_verdicts_hold_for_a_calibrated_model_and_fail_for_a_shifted_one_at_any_n(n):
    """The verdicts scale with the number of held-out people: exact centiles of 54 people are not
    'failing', and a 0.25 SD shift of 1000 people is."""
    import numpy as np
    from scipy.special import ndtr

    from normdiff_bids.evaluation import empirical_coverage, pit_summary
    from normdiff_bids.evaluation.evaluate import uniformity_limits
    from normdiff_bids.evaluation.report import _cards

    rng = np.random.default_rng(n)
    z = rng.standard_normal((n, 20))

    def cards(centiles):
        frame = pd.DataFrame(centiles, columns=[f"idp{j}" for j in range(20)])
        pit, cov = pit_summary(frame), empirical_coverage(frame)
        results = {"n_holdout": n, "pit_ks": pit["ks"], "pit_ks_max": pit["ks_max"],
                   "coverage95": cov["coverage"], "coverage95_abs_error": cov["abs_error"],
                   **uniformity_limits(pit)}
        return {c["label"]: c for c in _cards(results)}

    calibrated = cards(ndtr(z))
    assert not calibrated["PIT-KS per IDP"]["bad"] and not calibrated["coverage of 95% interval"]["bad"]
    if n >= 1000:
        shifted = cards(ndtr(z + 0.25))
        assert shifted["PIT-KS per IDP"]["bad"] and shifted["PIT-KS per IDP"]["hint"].startswith("FAILS")
        wide = cards(ndtr(z / 1.5))
        assert wide["coverage of 95% interval"]["bad"]


def test_centile_curves_hold_a_categorical_covariate_coded_with_numbers_at_its_most_common_level():
    from types import SimpleNamespace

    from normdiff_bids.evaluation.evaluate import centile_curves

    class Recorder:
        covariates = ("age", "sex", "field", "tiv")
        covariate_schema_ = SimpleNamespace(categorical=[SimpleNamespace(name="sex"),
                                                         SimpleNamespace(name="field")])
        grids = []

        def predict_quantiles(self, grid, q):
            self.grids.append(grid)
            columns = pd.MultiIndex.from_product([["idp"], list(q)])
            return pd.DataFrame(np.zeros((len(grid), len(q))), columns=columns)

    train = pd.DataFrame({"age": [20.0, 30.0, 40.0, 50.0], "sex": ["F", "M", "F", "M"],
                          "field": [1, 2, 9, 9], "tiv": [1.0, 2.0, 3.0, 10.0]})
    model = Recorder()
    centile_curves(model, train, list(model.covariates), ["idp"], centiles=(0.5,), n_ages=3)
    grid = model.grids[0]
    assert set(grid["field"]) == {9}  # its most common level, not its median 5.5
    assert set(grid["tiv"]) == {2.5}   # a continuous covariate at its median
