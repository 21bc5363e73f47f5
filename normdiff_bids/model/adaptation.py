"""Adapting a fitted two-stage model to sites it has not seen, from their reference controls.

Only the location-scale stage's effects of the new sites are estimated (empirical Bayes, under the prior
the training sites gave); the network, the known sites and the calibration layer are shared unchanged.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from normdiff_bids.errors import InputError, ProblemCollector
from normdiff_bids.model.covariates import CovariateSchema, level_ranges
from normdiff_bids.model.model_space import ModelSpace
from normdiff_bids.model.tables import idp_matrix, present

__all__ = ["adapt_to_new_sites"]


def adapt_to_new_sites(model, table: pd.DataFrame, refine: bool = False):
    """What :meth:`NormativeDiffusion.adapt <normdiff_bids.model.estimator.NormativeDiffusion.adapt>`
    returns: a shallow copy of ``model`` with a covariate schema and a stage that know the new sites."""
    model._check_fitted()
    space = model._model_space()
    if space.site_index is None:
        raise ValueError("adapt needs a two-stage model with a site covariate (location_scale='pooled', "
                         f"site_covariate in the covariates); this one has location_scale="
                         f"{model.location_scale!r}, site_covariate={model.site_covariate!r}")
    problems = ProblemCollector()
    missing_cov = [c for c in model.covariates if c not in table.columns]
    missing_idps = [c for c in model.idps_ if c not in table.columns]
    if missing_cov:
        problems.add(f"covariate columns missing: {missing_cov}")
    if missing_idps:
        problems.add(f"{len(missing_idps)} of the model's IDP columns missing: {missing_idps[:10]}")
    problems.raise_if_any(header="the adaptation table does not match the model")
    values = idp_matrix(table, model.idps_, "adaptation")
    site_name = model.site_covariate
    site_cov = model.covariate_schema_.categorical[space.site_index]
    labels = table[site_name].map(lambda v: None if pd.isna(v) else str(v).strip())
    usable = np.isfinite(values).all(axis=1) & present(table[site_name]).to_numpy()
    for name in model.covariates:
        usable &= present(table[name]).to_numpy()
    counts = labels[usable].value_counts().to_dict()
    known = sorted(s for s in counts if s in site_cov.levels)
    if known and not refine:
        raise InputError(f"the model already knows {site_name} {known}; adapt learns new {site_name}s "
                         f"only: drop those rows, or pass refine=True to re-estimate them from these "
                         f"rows")
    few = sorted(s for s in labels.dropna().unique() if counts.get(s, 0) < 2)
    if few or not counts:
        raise InputError(f"each new {site_name} needs at least 2 controls with every covariate and IDP; "
                         f"usable controls: {({s: int(counts.get(s, 0)) for s in few}) or 'none'}")
    new_levels = sorted(s for s in counts if s not in site_cov.levels)
    schema = CovariateSchema.from_dict(model.covariate_schema_.to_dict())
    schema.categorical[space.site_index].levels = list(site_cov.levels) + new_levels
    if site_cov.ranges is not None:  # the new (and refined) sites' own covariate ranges
        fresh = level_ranges(table.loc[usable], site_name, model.covariates, model.covariate_kinds)
        schema.categorical[space.site_index].ranges = {**site_cov.ranges, **fresh}
    cont, cat = schema.encode(table.loc[usable])
    x = model.scaler_.transform(values[usable])
    adapted_space = ModelSpace(schema, model.scaler_, model.stage_, site_name)
    inputs = adapted_space.stage_inputs(cont, cat)
    sites = labels[usable].to_numpy()
    effects = {s: model.stage_.site_effects(inputs[0][sites == s], inputs[1][sites == s], x[sites == s])
               for s in counts}
    stage = model.stage_.with_sites([effects[s] for s in new_levels])
    for s in known:
        k = site_cov.levels.index(s)
        stage.set_site(k, effects[s])
    out = copy.copy(model)
    out.covariate_schema_ = schema
    out.stage_ = stage
    out.adaptations_ = [*model.adaptations_, {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "sites": {s: int(counts[s]) for s in sorted(counts)}, "refined": known}]
    return out
