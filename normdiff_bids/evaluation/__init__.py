"""Evaluation suite: calibration, coverage, PIT, fidelity, dependence and memorisation."""
