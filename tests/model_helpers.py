"""Shared checks of the estimator tests."""

from __future__ import annotations

import numpy as np


def centile_errors(model, test, truth) -> tuple[float, float]:
    """Mean |centile - true centile| of ``model`` on ``test``, and the same with age, sex and site
    shuffled between rows (the model asked about the wrong people), which must be clearly worse."""
    err = np.abs(model.predict_centiles(test).to_numpy() - truth).mean()
    rng = np.random.default_rng(0)
    shuffled = test.assign(**{c: test[c].to_numpy()[rng.permutation(len(test))]
                              for c in ("age", "sex", "site")})
    wrong = np.abs(model.predict_centiles(shuffled).to_numpy() - truth).mean()
    return float(err), float(wrong)
