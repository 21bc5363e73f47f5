"""Nipype interfaces that train a normative model (with its held-out evaluation) and score deviations."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.conventions import ID_COLUMNS
from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.data.reference import (  # noqa: F401  (re-exported: older callers import them here)
    MIN_REFERENCE_ROWS,
    select_reference,
)
from normdiff_bids.errors import InputError
from normdiff_bids.interfaces.tables import read_table, write_table
from normdiff_bids.model.backbones import backbone_names


def split_reference(reference: pd.DataFrame, holdout_fraction: float, seed: int,
                    strata=("site", "sex"),
                    min_train: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the reference into training and held-out rows, by participant, stratified by site and sex.

    All sessions of one participant go to the same side, so held-out scores are out of sample. Each
    stratum keeps at least one participant in training (a site missing from training could not be scored).
    ``min_train``: fewest training rows accepted (default: what a model needs to be fitted).
    """
    rng = np.random.default_rng(seed)
    people = reference.drop_duplicates("participant_id")
    keys = [c for c in strata if c in people.columns]
    groups = people.groupby(keys, dropna=False, sort=True) if keys else [(None, people)]
    held = []
    for _, group in groups:
        ids = np.sort(group["participant_id"].to_numpy(dtype=str))
        n_hold = min(int(round(holdout_fraction * len(ids))), len(ids) - 1)
        if n_hold > 0:
            held.extend(rng.choice(ids, size=n_hold, replace=False).tolist())
    is_held = reference["participant_id"].isin(set(held))
    train, holdout = reference[~is_held], reference[is_held]
    from normdiff_bids.model.normative import MIN_TRAIN_ROWS

    min_train = MIN_TRAIN_ROWS if min_train is None else min_train
    if len(train) < min_train:
        raise InputError(f"the normative reference has {len(reference)} rows; after holding out "
                         f"{len(holdout)} to evaluate the model, {len(train)} remain to train it, fewer "
                         f"than the {min_train} a model needs; widen the reference or lower "
                         f"--holdout-fraction")
    if holdout.empty:
        raise InputError(f"the reference ({len(reference)} rows) is too small to hold out "
                         f"{holdout_fraction:.0%} for evaluation; add participants or raise "
                         f"--holdout-fraction")
    return train, holdout


def idp_columns(table: pd.DataFrame, covariates) -> list[str]:
    """IDP columns of a collected table: every numeric column that is neither an id nor a covariate."""
    skip = set(ID_COLUMNS) | set(covariates)
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])]


def covariate_settings(covariates) -> tuple[list[str], CovariateSpecs | None]:
    """The covariate names and, when ``covariates`` is a covariate specification (a list of mappings,
    :meth:`CovariateSpecs.to_list <normdiff_bids.covariate_spec.CovariateSpecs.to_list>`) rather than
    names, the specification."""
    items = list(covariates)
    if items and all(isinstance(item, str) for item in items):
        return items, None
    spec = CovariateSpecs.from_list(items)
    return list(spec.names), spec


class _TrainInputSpec(BaseInterfaceInputSpec):
    idp_table = File(exists=True, mandatory=True, desc="IDP table (TSV) as written by CollectIDPs")
    covariates = traits.Either(traits.List(traits.Str), traits.List(traits.Dict()),
                               default=["age", "sex", "site"], usedefault=True,
                               desc="covariate columns the model is conditioned on (kinds inferred), or a "
                                    "covariate specification (CovariateSpecs.to_list(): name, column, kind "
                                    "and role of each), which also declares their kinds, the site covariate "
                                    "and the covariates the split is stratified by")
    idps = traits.List(traits.Str, desc="IDP columns to model; default: every other numeric column")
    freesurfer_stream = traits.Enum("cross-sectional", "longitudinal",
                                    desc="which FreeSurfer stream the IDP table was read from; kept in the "
                                         "model card (training_data), so that scoring IDPs of the other "
                                         "stream is noticed")
    reference_participants = traits.List(traits.Str, desc="participants forming the normative reference; "
                                                          "default: every row")
    reference_query = traits.Str(desc="query over the table's columns selecting the reference rows, e.g. "
                                     "\"diagnosis == 'HC' and age >= 18\" (grammar: "
                                     "normdiff_bids.data.query; no code is run)")
    holdout_fraction = traits.Range(low=0.0, high=0.9, value=0.2, usedefault=True, exclude_low=True,
                                    desc="share of the reference held out (by participant, stratified by "
                                         "site and sex) to evaluate the model")
    backbone = traits.Enum(*backbone_names(), usedefault=True, desc="denoising network")
    epochs = traits.Int(desc="training epochs; default: a budget chosen from N and D with early stopping")
    n_samples = traits.Int(desc="model samples per row when scoring; default: the model's")
    seed = traits.Int(0, usedefault=True, desc="random seed (split, initialisation, batches, sampling)")
    device = traits.Str("auto", usedefault=True, desc="torch device: auto, cpu, cuda, cuda:N")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tell Nipype's MultiProc plugin that this node occupies a GPU slot")
    num_threads = traits.Int(desc="CPU threads torch may use (match the node's n_procs); default: torch's")
    model_options = traits.Dict(traits.Str, traits.Any,
                                desc="further NormativeDiffusion hyper-parameters (e.g. backbone_config)")
    evaluate = traits.Bool(True, usedefault=True, desc="evaluate on the held-out rows and write the "
                                                       "calibration report")


class _TrainOutputSpec(TraitedSpec):
    model_dir = Directory(exists=True,
                          desc="the trained model bundle (model.safetensors, model.json, manifest.json)")
    metrics = File(exists=True, desc="JSON: held-out evaluation metrics and the train/held-out split")
    calibration_report = File(desc="HTML calibration report of the held-out evaluation (a page)")
    calibration_fragment = File(desc="the same report as a fragment to embed (what the group report takes)")
    split = File(exists=True, desc="TSV: participant_id, session_id, split (train/holdout) of the reference")


class TrainNormativeModel(SimpleInterface):
    """Fit a :class:`~normdiff_bids.NormativeDiffusion` on reference rows; evaluate it on held-out ones."""

    input_spec = _TrainInputSpec
    output_spec = _TrainOutputSpec

    def _run_interface(self, runtime):
        from normdiff_bids.model.normative import NormativeDiffusion

        set_threads(self.inputs.num_threads)
        table = read_table(self.inputs.idp_table)
        reference = select_reference(
            table,
            participants=self.inputs.reference_participants if isdefined(self.inputs.reference_participants)
            else None,
            query=self.inputs.reference_query if isdefined(self.inputs.reference_query) else None)
        covariates, spec = covariate_settings(self.inputs.covariates)
        strata = ("site", "sex") if spec is None else spec.names_of("site", "sex")
        train, holdout = split_reference(reference, self.inputs.holdout_fraction, self.inputs.seed, strata)
        idps = list(self.inputs.idps) if isdefined(self.inputs.idps) and self.inputs.idps \
            else idp_columns(table, covariates)

        options = {} if spec is None else {"covariate_kinds": spec.kinds,
                                           "site_covariate": spec.name_of("site")}
        options.update(self.inputs.model_options if isdefined(self.inputs.model_options) else {})
        if isdefined(self.inputs.epochs):
            options["epochs"] = self.inputs.epochs
        if isdefined(self.inputs.n_samples):
            options["n_samples"] = self.inputs.n_samples
        model = NormativeDiffusion(backbone=self.inputs.backbone, covariates=tuple(covariates),
                                   seed=self.inputs.seed, device=self.inputs.device, **options)
        model.fit(train, idps=idps)
        if isdefined(self.inputs.freesurfer_stream):
            model.training_data_ = {"freesurfer_stream": self.inputs.freesurfer_stream}
        self._results.update(write_fit_outputs(runtime.cwd, model, reference, train, holdout,
                                               self.inputs.holdout_fraction, self.inputs.seed,
                                               self.inputs.evaluate, covariates=spec))
        return runtime


def write_fit_outputs(cwd, model, reference, train, holdout, holdout_fraction, seed, evaluate_model,
                      covariates: CovariateSpecs | None = None, **extra) -> dict:
    """What a fitted (or adapted) model leaves in its node folder: the bundle, the train/held-out split,
    the metrics and, with ``evaluate_model``, the held-out calibration report. Returns the outputs.

    ``covariates``: the covariate specification, which names the age, sex and site the evaluation bins
    and groups by (default: the covariates of those names)."""
    out = {"model_dir": os.path.join(cwd, "model")}
    model.save(out["model_dir"], overwrite=True)  # a rerun of the node replaces its own previous bundle
    split = reference[[c for c in ID_COLUMNS if c in reference.columns]].copy()
    split["split"] = np.where(reference["participant_id"].isin(set(holdout["participant_id"])),
                              "holdout", "train")
    out["split"] = write_table(split, os.path.join(cwd, "split.tsv"))
    metrics = {**extra, "n_reference": len(reference), "n_train": len(train), "n_holdout": len(holdout),
               "holdout_fraction": holdout_fraction, "seed": seed, "idps": list(model.idps_),
               "covariates": list(model.covariates)}
    if evaluate_model and len(holdout):
        from normdiff_bids.evaluation import evaluate, summary
        from normdiff_bids.evaluation.figures import make_figures
        from normdiff_bids.evaluation.report import render_calibration_report

        roles = {} if covariates is None else {
            "group_by": covariates.names_of("sex", "site"),
            **{role: name for role in ("age", "sex") if (name := covariates.name_of(role)) is not None}}
        results = evaluate(model, train, holdout, seed=seed, **roles)
        metrics["evaluation"] = summary(results)
        figures = make_figures(results)
        out["calibration_report"] = os.path.join(cwd, "calibration_report.html")
        atomic_write_text(out["calibration_report"], render_calibration_report(results, figures=figures))
        out["calibration_fragment"] = os.path.join(cwd, "calibration_fragment.html")
        atomic_write_text(out["calibration_fragment"],
                          render_calibration_report(results, figures=figures, standalone=False))
    out["metrics"] = os.fspath(atomic_write_text(
        os.path.join(cwd, "metrics.json"), json.dumps(metrics, indent=2, default=str) + "\n"))
    return out


#: Held-out controls of the new sites below which an adaptation is not evaluated (and uses them all).
MIN_ADAPT_HOLDOUT = 20


class _AdaptInputSpec(BaseInterfaceInputSpec):
    base_model_dir = Directory(exists=True, mandatory=True,
                               desc="a trained model bundle to adapt (it is read, never changed)")
    idp_table = File(exists=True, mandatory=True, desc="IDP table (TSV) as written by CollectIDPs")
    reference_participants = traits.List(traits.Str, desc="participants forming the reference of the new "
                                                          "sites; default: every row")
    reference_query = traits.Str(desc="query selecting the reference rows (grammar: "
                                      "normdiff_bids.data.query; no code is run)")
    holdout_fraction = traits.Range(low=0.0, high=0.9, value=0.2, usedefault=True, exclude_low=True,
                                    desc="share of the new sites' reference held out to evaluate the "
                                         "adapted model")
    seed = traits.Int(0, usedefault=True, desc="random seed of the split")
    device = traits.Str("auto", usedefault=True, desc="torch device: auto, cpu, cuda, cuda:N")
    num_threads = traits.Int(desc="CPU threads torch may use (match the node's n_procs); default: torch's")
    evaluate = traits.Bool(True, usedefault=True, desc="evaluate on the held-out rows and write the "
                                                       "calibration report")


class AdaptNormativeModel(SimpleInterface):
    """Adapt a trained model to the sites of a new dataset from their reference controls
    (:meth:`~normdiff_bids.NormativeDiffusion.adapt`: only the new sites' effects are learnt)."""

    input_spec = _AdaptInputSpec
    output_spec = _TrainOutputSpec

    def _run_interface(self, runtime):
        from normdiff_bids.model.normative import load_model

        set_threads(self.inputs.num_threads)
        base = load_model(self.inputs.base_model_dir, device=self.inputs.device)
        table = read_table(self.inputs.idp_table)
        reference = select_reference(
            table,
            participants=self.inputs.reference_participants if isdefined(self.inputs.reference_participants)
            else None,
            query=self.inputs.reference_query if isdefined(self.inputs.reference_query) else None,
            min_rows=2)
        site = base.site_covariate
        known = set(base.covariate_schema_.categorical[base._model_space().site_index].levels) \
            if base._model_space().site_index is not None else set()
        new_rows = reference[~reference[site].astype(str).isin(known)] if site in reference else reference
        if not len(new_rows):
            raise InputError(f"every reference participant is from a {site} the model already knows "
                             f"({sorted(known)}); there is nothing to adapt: score with --model instead")
        train, holdout = split_reference(new_rows, self.inputs.holdout_fraction, self.inputs.seed,
                                         min_train=2)
        if len(holdout) < MIN_ADAPT_HOLDOUT:  # too few to evaluate: every control adapts the model
            train, holdout = new_rows, new_rows.iloc[:0]
        model = base.adapt(train)
        self._results.update(write_fit_outputs(
            runtime.cwd, model, new_rows, train, holdout, self.inputs.holdout_fraction, self.inputs.seed,
            self.inputs.evaluate, adapted_from=os.fspath(self.inputs.base_model_dir),
            adaptation=model.adaptations_[-1]))
        return runtime


class _ScoreInputSpec(BaseInterfaceInputSpec):
    model_dir = Directory(exists=True, mandatory=True, desc="a model bundle written by TrainNormativeModel")
    idp_table = File(exists=True, mandatory=True, desc="IDP table (TSV) of the rows to score")
    n_samples = traits.Int(desc="model samples per row; default: the model's")
    unknown_site = traits.Enum("error", "marginal", usedefault=True,
                               desc="rows from a site the model never saw: error, or the marginal over sites")
    device = traits.Str("auto", usedefault=True, desc="torch device: auto, cpu, cuda, cuda:N")
    use_gpu = traits.Bool(False, usedefault=True,
                          desc="tell Nipype's MultiProc plugin that this node occupies a GPU slot")
    num_threads = traits.Int(desc="CPU threads torch may use (match the node's n_procs); default: torch's")
    condition_on = traits.List(traits.Str, desc="IDPs to condition on: every other IDP also gets its "
                                                "centile given the subject's own values of these "
                                                "(<idp>_cond_centile, <idp>_cond_z)")


class _ScoreOutputSpec(TraitedSpec):
    scores = File(exists=True, desc="wide TSV, one row per participant (and session): ids, covariates, "
                                    "joint_stat, joint_centile, joint_z, extrapolated, then per IDP "
                                    "<idp>_centile, <idp>_z, <idp>_tail")


class ScoreDeviations(SimpleInterface):
    """Score every row of an IDP table against a trained model: centiles, z-scores and joint deviation."""

    input_spec = _ScoreInputSpec
    output_spec = _ScoreOutputSpec

    def _run_interface(self, runtime):
        from normdiff_bids.model.normative import load_model
        from normdiff_bids.outputs.score_tables import scores_to_wide

        set_threads(self.inputs.num_threads)
        model = load_model(self.inputs.model_dir, device=self.inputs.device)
        params = {"unknown_site": self.inputs.unknown_site}
        if isdefined(self.inputs.n_samples):
            params["n_samples"] = self.inputs.n_samples
        model.set_params(**params)
        table = read_table(self.inputs.idp_table)
        given = list(self.inputs.condition_on) if isdefined(self.inputs.condition_on) else None
        tidy = model.score(table, given=given or None)
        covariates = table[[c for c in (*ID_COLUMNS, *model.covariates) if c in table.columns]]
        wide = scores_to_wide(tidy, covariates)
        self._results["scores"] = write_table(wide, os.path.join(runtime.cwd, "scores.tsv"))
        return runtime


def jsonable(value):
    """Evaluation results as JSON-ready data: tables become records, arrays lists, NaN null."""
    if isinstance(value, pd.DataFrame):
        return jsonable(value.reset_index().to_dict(orient="records")
                        if not isinstance(value.index, pd.RangeIndex) else value.to_dict(orient="records"))
    if isinstance(value, pd.Series):
        return jsonable(value.to_dict())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def set_threads(num_threads) -> None:
    """Limit torch's CPU threads in this (worker) process: parallel nodes must not oversubscribe cores.

    Without torch imported yet (a model that scores from its draw table may never import it) the limit
    is left in ``OMP_NUM_THREADS``, which torch takes as its thread count when it is imported."""
    if isdefined(num_threads) and num_threads and num_threads > 0:
        if "torch" not in sys.modules:
            os.environ["OMP_NUM_THREADS"] = str(int(num_threads))
            return
        import torch

        torch.set_num_threads(int(num_threads))
