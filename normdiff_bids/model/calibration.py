"""Fitting the calibration layer of a two-stage model at ``fit``: the conformal maps
(:class:`~normdiff_bids.scoring.conformal.CentileCalibration`) from the reference controls' scores."""

from __future__ import annotations

import numpy as np

from normdiff_bids.model.model_space import ModelSpace, crossfit_residuals, heldout_residuals
from normdiff_bids.scoring.conformal import CentileCalibration

__all__ = ["JOINT_MAP_MIN_IDPS_PER_ROW", "fit_calibration"]

#: The joint map is learnt where a model has at least this many IDPs per training row (D / N). Below it
#: the model's own draws calibrate the joint deviation of new people better than a map
#: learnt from its training rows, which the network has seen (synthetic cohorts and fcon1000, held-out
#: joint KS from the draws / with the map: N=200, D=20 0.067 / 0.107 and 0.038 / 0.091; N=1000, D=100
#: 0.050 / 0.138; fcon1000's 11 IDPs over four splits 0.061 / 0.065; at D / N >= 0.2 the map is needed:
#: N=500, D=100 0.065 / 0.040; N=500, D=200 0.166 / 0.043; fcon1000's 212 IDPs 0.181 / 0.073).
JOINT_MAP_MIN_IDPS_PER_ROW = 0.2


def fit_calibration(model, space: ModelSpace, x, cont, cat) -> CentileCalibration:
    """The calibration layer of ``model`` (a fitted two-stage ``NormativeDiffusion``) from its
    training rows: ``x`` [R, D] in the scaler's units, their encoded covariates ``cont``, ``cat``.

    Per-IDP maps and the joint map: every reference control's out-of-fold residual (cross-fitting
    the location-scale stage, which carries what a small sample gets wrong). The joint map is then
    checked on controls no part of the model has seen (the network's validation rows, with a stage
    fitted without them), which set its mean and spread in probit space. The joint statistic sums
    D squared deviations, so it is far more sensitive than one centile to the network having seen a
    row (synthetic N=500, D=100: median joint centile 0.1 for training rows, 0.5 out of fold, 0.7
    for unseen controls), while a map from a few dozen unseen rows alone is noisy (N=200, D=20: 20
    unseen rows gave a held-out joint KS of 0.19, the out-of-fold rows 0.08). Where the model has
    fewer than :data:`JOINT_MAP_MIN_IDPS_PER_ROW` IDPs per training row no joint map is learnt: its
    draws calibrate the joint deviation, and a map from rows the network has seen would make new
    people look more atypical than they are.
    """
    from normdiff_bids.model.training import validation_split

    inputs = space.stage_inputs(cont, cat)
    missing = np.zeros(len(x), dtype=bool)
    residuals = crossfit_residuals(model.stage_, *inputs, x, seed=int(model.seed))
    with_joint = x.shape[1] / len(x) >= JOINT_MAP_MIN_IDPS_PER_ROW
    crossfit = model._score_model_space(residuals, cont, cat, missing, with_joint=with_joint)
    if not with_joint:
        return CentileCalibration.fit(crossfit["centiles"], inputs[2])
    unseen, _ = validation_split(len(x), model.validation_fraction, int(model.seed))
    checked = None
    if len(unseen):
        held = heldout_residuals(model.stage_, *inputs, x, unseen)
        scored = model._score_model_space(held, cont[unseen], cat[unseen], missing[unseen],
                                          with_joint=True)
        checked = scored["joint_centile"][scored["joint_n_idps"] == x.shape[1]]
    # the joint map is over every IDP: rows missing some are scored on a subset, so they are left out
    joint = crossfit["joint_centile"][crossfit["joint_n_idps"] == x.shape[1]]
    return CentileCalibration.fit(crossfit["centiles"], inputs[2], joint, joint_unseen=checked)
