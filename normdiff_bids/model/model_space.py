"""The space the diffusion model learns, and how a row's IDP values get there and back.

``location_scale="off"``: the per-IDP preprocessing alone (``IDPScaler``); the site is a covariate of
the network. ``location_scale="pooled"`` (two-stage): after preprocessing, the ``LocationScaleStage``
standardises each IDP by its mean and spread at the row's covariates, with site effects partially
pooled; the network learns the joint distribution of those residuals given the covariates other than
the site (their shape and dependence may still change with age and sex). Both maps are monotone per
IDP at fixed covariates, so a value's centile in model space is its centile in original units.

This module also splits the encoded categorical covariates into what the network sees and what the
location-scale stage sees, and fits the stage with out-of-fold residuals for the calibration layer.
"""

from __future__ import annotations

import numpy as np

from normdiff_bids.model.covariates import CovariateSchema
from normdiff_bids.model.location_scale import LocationScaleStage

__all__ = ["ModelSpace", "crossfit_residuals", "heldout_residuals", "site_folds"]

#: Folds of the cross-fitted residuals that calibrate the model on every reference control.
CALIBRATION_FOLDS = 5


class ModelSpace:
    """Row-dependent map between original IDP units and the network's space.

    ``schema`` is the full covariate schema; ``site`` the name of the categorical covariate whose levels
    the location-scale stage pools, so that the network does not see it (``None``: the network sees
    every covariate, as with ``location_scale="off"``); ``stage`` the fitted stage, or ``None`` (before
    it is fitted, or ``location_scale="off"``).
    """

    def __init__(self, schema: CovariateSchema, scaler, stage: LocationScaleStage | None, site: str | None):
        self.schema = schema
        self.scaler = scaler
        self.stage = stage
        names = [c.name for c in schema.categorical]
        self.site_index = names.index(site) if site in names else None
        self.network_columns = [i for i in range(len(names)) if i != self.site_index]

    # -- covariates ---------------------------------------------------------------------------------
    def network_schema(self) -> CovariateSchema:
        """The covariates the network conditions on (all but the pooled site when there is a stage)."""
        if self.site_index is None:
            return self.schema
        keep = [c for i, c in enumerate(self.schema.categorical) if i != self.site_index]
        dropped = self.schema.categorical[self.site_index].name
        return CovariateSchema(names=[n for n in self.schema.names if n != dropped],
                               continuous=list(self.schema.continuous), categorical=keep)

    def network_cat(self, cat: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(cat[:, self.network_columns])

    def site_codes(self, cat: np.ndarray) -> np.ndarray:
        """0-based site codes; -1 for a site the model has no effect for (unknown); -2 when missing."""
        if self.site_index is None:
            return np.full(len(cat), -1, dtype=np.int64)
        return cat[:, self.site_index].astype(np.int64) - 1

    def stage_inputs(self, cont: np.ndarray, cat: np.ndarray):
        """``(cont, fixed codes, site codes)`` for the stage; unknown fixed levels count as the first."""
        fixed = np.maximum(self.network_cat(cat).astype(np.int64) - 1, 0)
        return np.nan_to_num(np.asarray(cont, dtype=np.float64)), fixed, np.maximum(self.site_codes(cat), -1)

    # -- values -------------------------------------------------------------------------------------
    def to_model(self, values: np.ndarray, cont: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Original units ``[R, D]`` -> model space (an unknown site scores under the marginal)."""
        x = self.scaler.transform(values)
        if self.stage is None:
            return x
        return self.stage.standardise(*self.stage_inputs(cont, cat), x, marginal=True)

    def from_model(self, x: np.ndarray, cont: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """Model space ``[R, D]`` or ``[R, S, D]`` -> original units."""
        x = np.asarray(x, dtype=np.float64)
        if self.stage is not None:
            x = self.stage.destandardise(*self.stage_inputs(cont, cat), x, marginal=True)
        return self.scaler.inverse_transform(x)


def site_folds(site: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold of each row, balanced within every site (a site of 3 spreads over 3 folds)."""
    rng = np.random.default_rng([int(seed), 7])
    folds = np.empty(len(site), dtype=np.int64)
    offset = 0
    for code in np.unique(site):
        rows = np.flatnonzero(site == code)
        folds[rows[rng.permutation(len(rows))]] = (np.arange(len(rows)) + offset) % n_folds
        offset += len(rows)
    return folds


def crossfit_residuals(stage: LocationScaleStage, cont, fixed, site, x, seed: int,
                       n_folds: int = CALIBRATION_FOLDS) -> np.ndarray:
    """Each row's residual under a stage fitted without its fold: what a new control of its site sees.

    The calibration layer learns from these, so every reference control calibrates the model and none
    is held out of the fit.
    """
    folds = site_folds(site, n_folds, seed)
    out = np.empty_like(np.asarray(x, dtype=np.float64))
    for f in range(n_folds):
        test = folds == f
        if test.any():
            out[test] = heldout_residuals(stage, cont, fixed, site, x, test)
    return out


def heldout_residuals(stage: LocationScaleStage, cont, fixed, site, x, held: np.ndarray) -> np.ndarray:
    """Residuals of the rows ``held`` (a boolean or index mask) under a stage with ``stage``'s settings
    and sites, fitted on the other rows."""
    rest = np.ones(len(x), dtype=bool)
    rest[held] = False
    part = LocationScaleStage(stage.config).fit(cont[rest], fixed[rest], site[rest], x[rest],
                                                n_sites=stage.n_sites_)
    return part.standardise(cont[held], fixed[held], site[held], x[held])
