"""Fitting the calibration layer of a two-stage model at ``fit``: the conformal maps
(:class:`~normdiff_bids.scoring.conformal.CentileCalibration`) from the reference controls' scores."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from normdiff_bids.model.model_space import ModelSpace, crossfit_residuals, heldout_residuals, site_folds
from normdiff_bids.model.tables import MIN_TRAIN_ROWS
from normdiff_bids.progress import progress
from normdiff_bids.scoring.conformal import MIN_CHECK_VALUES, MIN_VALUES, CentileCalibration
from normdiff_bids.scoring.joint import insample_shift

__all__ = ["JOINT_FOLDS", "JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW", "crossfit_joint_centiles", "fit_calibration",
           "joint_folds"]

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
#: Earlier versions put the line at 0.2; between 0.12 and 0.18 the shifted map failed where the check
#: held (synthetic, 50 and 100 validation rows, shift / check: N=500, D=90 0.166, 0.225 / 0.092, 0.149;
#: N=1000, D=120 0.134 / 0.062; N=1000, D=150 0.205 / 0.047), and at 0.1 neither was the better (N=1000,
#: D=100, two cohorts: 0.059, 0.092 / 0.158, 0.047; ``docs/method.md``, "Cross-fitted networks").
JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW = 0.12
#: Folds of ``joint_folds="auto"`` where the validation rows would check the map and fewer than
#: ``MIN_CHECK_VALUES`` are left (at :data:`JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW` IDPs per row or more and
#: under about 400 controls at ``validation_fraction=0.1``): the models that learn the joint map from
#: controls they never saw (:func:`crossfit_joint_centiles`). Held-out joint KS, fold models / the
#: earlier map, synthetic 20-site cohorts at N=200 and 300 and 0.2 IDPs per row or more (the map went
#: unchecked), ten fits: mean 0.067 / 0.118, above 0.08 3 / 6. Below that line the closed-form shift
#: stays: on fcon1000's 11 IDPs with 303 training controls (four splits) it gave 0.070 where fold models
#: gave 0.091, though on synthetic N=200, D=20 fold models were the better (0.052 / 0.067). Where 50 to 100
#: validation rows check the map, the check measured about as well as fold models (synthetic N=500 to
#: 1000 at D/N 0.12 to 0.2 and fcon1000's 208 IDPs, nine fits: 0.073 / 0.068) at a quarter to a fifth of
#: the fit time (``docs/method.md``, "Cross-fitted networks").
JOINT_FOLDS = 5
#: Fold models are seeded ``seed + FOLD_SEED_STEP * (fold + 1)``, apart from the model's own networks
#: (``seed + 100 * k``).
FOLD_SEED_STEP = 1009


def joint_folds(model, n_rows: int) -> int:
    """How many fold models learn ``model``'s joint map from ``n_rows`` reference controls (0: none).

    ``"auto"``: :data:`JOINT_FOLDS` where the network's validation rows would check the map
    (:data:`JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW` IDPs per row or more) and are fewer than
    ``MIN_CHECK_VALUES``, else none."""
    from normdiff_bids.model.training import validation_split

    folds = model.joint_folds
    if folds == "auto":
        unseen, _ = validation_split(n_rows, model.validation_fraction, int(model.seed))
        checked = model.n_features_in_ / n_rows >= JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW
        folds = JOINT_FOLDS if checked and len(unseen) < MIN_CHECK_VALUES else 0
    return int(folds)


def crossfit_joint_centiles(model, table: pd.DataFrame, cat: np.ndarray, n_folds: int) -> np.ndarray | None:
    """Each reference control's raw joint centile under a model fitted without its fold, with
    ``model``'s settings: ``table`` holds the controls ``model`` was fitted on (at least covariates and IDPs),
    ``cat`` their encoded categorical covariates. NaN for a control scored on a subset of the IDPs or
    kept in every fold's training; ``None`` (nothing fitted) when a fold would leave fewer than
    ``MIN_TRAIN_ROWS`` rows or fewer than ``MIN_VALUES`` controls could be held out (the map needs them).

    Folds are balanced within each combination of categorical levels, and a combination with one row
    stays in every fold's training, so no fold model meets a site or level it was not trained on.
    A fold model learns from ``(n_folds - 1) / n_folds`` of the controls, so its joint centiles are a
    little less typical than ``model``'s of new people; 10 folds measured no better than 5 (synthetic
    N=500, D=100: held-out joint KS 0.081 against 0.071; ``docs/method.md``, "Cross-fitted networks").
    """
    _, combination = np.unique(np.asarray(cat).reshape(len(table), -1), axis=0, return_inverse=True)
    combination = combination.reshape(-1)
    folds = site_folds(combination, n_folds, int(model.seed))
    folds[np.bincount(combination)[combination] < 2] = -1
    largest = np.bincount(folds[folds >= 0], minlength=n_folds).max()
    if len(table) - largest < MIN_TRAIN_ROWS or (folds >= 0).sum() < MIN_VALUES:
        return None
    params = {**model.get_params(), "calibration": "off", "joint_folds": 0, "draw_table": "off",
              "verbose": False}
    out = np.full(len(table), np.nan)
    for fold in progress(range(n_folds), total=n_folds, desc="fitting fold models for the joint map",
                         verbose=model.verbose, unit="fold"):
        held = folds == fold
        if not held.any():
            continue
        seed = int(model.seed) + FOLD_SEED_STEP * (fold + 1)
        with warnings.catch_warnings():  # the full fit has said what there is to say about these rows
            warnings.simplefilter("ignore")
            fold_model = type(model)(**{**params, "seed": seed}).fit(table[~held], idps=model.idps_)
            scored = fold_model._score_arrays(table[held], with_joint=True)
        complete = scored["joint_n_idps"] == model.n_features_in_
        out[np.flatnonzero(held)] = np.where(complete, scored["joint_centile"], np.nan)
    return out


def fit_calibration(model, space: ModelSpace, x, cont, cat, table: pd.DataFrame | None = None
                    ) -> CentileCalibration:
    """The calibration layer of ``model`` (a fitted two-stage ``NormativeDiffusion``) from its
    training rows: ``x`` [R, D] in the scaler's units, their encoded covariates ``cont``, ``cat``, and
    the rows themselves (``table``, holding at least the covariates and IDPs), which the fold models of
    the joint map (``joint_folds``) are fitted on.

    Per-IDP maps and the joint map: every reference control's out-of-fold residual (cross-fitting
    the location-scale stage, which carries what a small sample gets wrong). The joint statistic sums
    D squared deviations, so it is far more sensitive than one centile to the network having seen a
    row (synthetic N=500, D=100: median joint centile 0.1 for training rows, 0.5 out of fold, 0.7
    for unseen controls). Where the model has fewer than :data:`JOINT_UNSEEN_CHECK_MIN_IDPS_PER_ROW`
    IDPs per training row, the joint map is shifted by the in-sample bias of the network's training
    rows' dependence; otherwise it is checked on controls no part of the model has seen (the
    network's validation rows, with a stage fitted without them), which set its mean and spread in
    probit space (a map from a few dozen unseen rows alone is noisy: N=200, D=20, 20 unseen rows gave a
    held-out joint KS of 0.19, the out-of-fold rows 0.08). With ``joint_folds`` fold models (by default
    where those unseen rows would check the map and are fewer than 40, :func:`joint_folds`), neither
    correction is made: the joint map is learnt from every control's joint centile under a model that
    never saw it (:func:`crossfit_joint_centiles`).
    """
    from normdiff_bids.model.training import validation_split

    inputs = space.stage_inputs(cont, cat)
    missing = np.zeros(len(x), dtype=bool)
    residuals = crossfit_residuals(model.stage_, *inputs, x, seed=int(model.seed))
    n_folds = joint_folds(model, len(x)) if table is not None else 0
    never_seen = crossfit_joint_centiles(model, table, cat, n_folds) if n_folds else None
    # the full model's joint scores of its own controls are needed only when no fold model scored them
    crossfit = model._score_model_space(residuals, cont, cat, missing, with_joint=never_seen is None)
    if never_seen is not None:
        never_seen = never_seen[np.isfinite(never_seen)]
        return CentileCalibration.fit(crossfit["centiles"], inputs[2], never_seen, joint_method={
            "method": "fold models that never saw the control", "n_folds": n_folds,
            "n_controls": int(len(never_seen))})
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
