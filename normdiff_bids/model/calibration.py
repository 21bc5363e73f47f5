"""Fitting the calibration layer of a two-stage model at ``fit``: the conformal maps
(:class:`~normdiff_bids.scoring.conformal.CentileCalibration`) from the reference controls' scores."""

from __future__ import annotations

import numpy as np

from normdiff_bids.model.model_space import ModelSpace, crossfit_residuals, heldout_residuals
from normdiff_bids.scoring.conformal import CentileCalibration
from normdiff_bids.scoring.joint import insample_shift

__all__ = ["JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW", "fit_calibration"]

#: How the joint map is made right for new people. The map is learnt from the reference controls'
#: out-of-fold joint centiles, and the network has seen those controls, which makes them look more
#: typical jointly than new people. Below this many IDPs per row (D / N) the network follows its
#: training rows' dependence closely, and the map is lowered by that dependence's in-sample bias,
#: computed in closed form (:func:`~normdiff_bids.scoring.joint.insample_shift`). Held-out joint KS of
#: one-network fits (three network seeds per cohort), the draws alone (earlier versions) / the shifted
#: map: fcon1000 at 11 to 20 IDPs (12 cohorts of splits and IDP sets) mean 0.081 / 0.054, fits above
#: the 5% critical value 20 / 2 of 36; synthetic 20-site cohorts at N=200 to 1000 mean 0.054 / 0.054,
#: above 0.08 3 / 1 of 15 (docs/method.md). At or above it the network follows its rows only in part
#: (on the synthetic cohorts that bias over-predicts the gap 2 to 5 times), and the network's
#: validation rows check and correct the map (:meth:`~normdiff_bids.scoring.conformal.ProbitMap.corrected`).
JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW = 0.2


def fit_calibration(model, space: ModelSpace, x, cont, cat) -> CentileCalibration:
    """The calibration layer of ``model`` (a fitted two-stage ``NormativeDiffusion``) from its
    training rows: ``x`` [R, D] in the scaler's units, their encoded covariates ``cont``, ``cat``.

    Per-IDP maps and the joint map: every reference control's out-of-fold residual (cross-fitting
    the location-scale stage, which carries what a small sample gets wrong). The joint statistic sums
    D squared deviations, so it is far more sensitive than one centile to the network having seen a
    row (synthetic N=500, D=100: median joint centile 0.1 for training rows, 0.5 out of fold, 0.7
    for unseen controls). Where the model has fewer than :data:`JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW`
    IDPs per training row, the joint map is shifted by the in-sample bias of the network's training
    rows' dependence; otherwise it is checked on controls no part of the model has seen (the
    network's validation rows, with a stage fitted without them), which set its mean and spread in
    probit space (a map from a few dozen unseen rows alone is noisy: N=200, D=20, 20 unseen rows gave a
    held-out joint KS of 0.19, the out-of-fold rows 0.08).
    """
    from normdiff_bids.model.training import validation_split

    inputs = space.stage_inputs(cont, cat)
    missing = np.zeros(len(x), dtype=bool)
    residuals = crossfit_residuals(model.stage_, *inputs, x, seed=int(model.seed))
    crossfit = model._score_model_space(residuals, cont, cat, missing, with_joint=True)
    # the joint map is over every IDP: rows missing some are scored on a subset, so they are left out
    joint = crossfit["joint_centile"][crossfit["joint_n_idps"] == x.shape[1]]
    unseen, seen = validation_split(len(x), model.validation_fraction, int(model.seed))
    if x.shape[1] / len(x) < JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW:
        rows = model.stage_.standardise(*(a[seen] for a in inputs), x[seen])
        rows = rows[np.isfinite(rows).all(axis=1)]
        # the map's unseen controls carry no such bias: the shift is the seen rows' share of it
        shift = insample_shift(rows, model.joint_shrinkage_) * len(rows) / max(len(joint), 1)
        return CentileCalibration.fit(crossfit["centiles"], inputs[2], joint, joint_shift=shift)
    checked = None
    if len(unseen):
        held = heldout_residuals(model.stage_, *inputs, x, unseen)
        scored = model._score_model_space(held, cont[unseen], cat[unseen], missing[unseen],
                                          with_joint=True)
        checked = scored["joint_centile"][scored["joint_n_idps"] == x.shape[1]]
    return CentileCalibration.fit(crossfit["centiles"], inputs[2], joint, joint_unseen=checked)
