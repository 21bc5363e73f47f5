"""Evaluation suite: calibration, coverage, PIT, fidelity, dependence and memorisation."""

from normdiff_bids.evaluation._common import (
    ACE_CENTILES,
    COVERAGE_LEVELS,
    benjamini_hochberg,
    fisher_combined,
    stouffer_combined,
    wilson_interval,
)
from normdiff_bids.evaluation.calibration import (
    absolute_centile_error,
    centile_error,
    per_subject_centile_error,
)
from normdiff_bids.evaluation.coverage import empirical_coverage
from normdiff_bids.evaluation.dependence import (
    correlation_matrix_error,
    mantel_test,
    pair_of_pair_comparison,
    pairwise_dependence,
    product_of_marginals,
)
from normdiff_bids.evaluation.evaluate import evaluate, generated_table, summary
from normdiff_bids.evaluation.fidelity import ks_by_age_bin, ks_permutation_test
from normdiff_bids.evaluation.grouping import by_group
from normdiff_bids.evaluation.memorisation import balance_by_age_sex, memorisation_ratio
from normdiff_bids.evaluation.pit import pit_summary, pit_values

__all__ = [
    "ACE_CENTILES", "COVERAGE_LEVELS", "absolute_centile_error", "balance_by_age_sex", "benjamini_hochberg",
    "by_group", "centile_error", "correlation_matrix_error", "empirical_coverage", "evaluate",
    "fisher_combined", "generated_table", "ks_by_age_bin", "ks_permutation_test", "mantel_test",
    "memorisation_ratio", "pair_of_pair_comparison", "pairwise_dependence", "per_subject_centile_error",
    "pit_summary", "pit_values", "product_of_marginals", "stouffer_combined", "summary", "wilson_interval",
]
