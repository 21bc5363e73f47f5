"""Every input the command line names, checked before anything is written: a bad one stops the run with
one message naming the culprit; the checked inputs become the run's :class:`~normdiff_bids.cli.plan.Plan`."""

from __future__ import annotations

import json
from pathlib import Path

from normdiff_bids.cli.execution import n_cores, plugin_settings
from normdiff_bids.cli.plan import Plan, say
from normdiff_bids.cli.validation import finish_validation, start_validation, stop_validation
from normdiff_bids.conventions import clean_labels, preview
from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.errors import InputError, NormdiffError, OutputError, ProblemCollector


def check_inputs(opts, levels) -> Plan:
    """Validate every input named on the command line; raise :class:`NormdiffError` naming the culprit."""
    if getattr(opts, "reports_only", False) and "group" in levels:
        raise InputError("--reports-only re-writes the participant level's reports; run it with "
                         "'participant' alone (the group level writes its report when it runs)")
    from normdiff_bids.outputs.dataset import check_output_dir
    from normdiff_bids.outputs.names import model_dir

    bids_dir = opts.bids_dir.expanduser().absolute()
    if not bids_dir.is_dir():
        raise InputError(f"BIDS dataset folder not found: {bids_dir}; give the folder that holds "
                         f"dataset_description.json and participants.tsv")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json")
    output_dir = check_output_dir(opts.output_dir, bids_dir)

    problems = ProblemCollector()
    participant_label = _labels(opts.participant_label, "sub", problems)
    session_label = _labels(opts.session_label, "ses", problems)
    fs_dir = None
    if opts.fs_dir is not None:
        fs_dir = opts.fs_dir.expanduser().absolute()
        if not fs_dir.is_dir():
            problems.add(f"--fs-dir {fs_dir} is not a folder; give the FreeSurfer SUBJECTS_DIR")
    if opts.model is not None and not opts.model.expanduser().exists():
        problems.add(f"--model {opts.model} does not exist; give a model folder written by the group level")
    if opts.from_model is not None and not opts.from_model.expanduser().is_dir():
        problems.add(f"--from-model {opts.from_model} is not a folder; give a model folder written by the "
                     f"group level")
    if opts.from_model is not None and "group" not in levels:
        problems.add("--from-model adapts a model at the group level; add 'group' to the analysis levels "
                     "(or score against an adapted model with --model)")
    problems.raise_if_any(header="the command line names inputs that cannot be used")

    plan = Plan(bids_dir=bids_dir, output_dir=output_dir, levels=levels, participant_label=participant_label,
                session_label=session_label, fs_dir=fs_dir, covariates=covariate_spec(opts),
                longitudinal=bool(getattr(opts, "longitudinal", False)))
    plan.model_dir = (opts.model.expanduser().absolute() if opts.model is not None
                      else output_dir / model_dir(opts.model_name))
    if opts.model_options:
        try:
            plan.model_options = json.loads(opts.model_options)
        except ValueError as exc:
            raise InputError(f"--model-options is not valid JSON ({exc}): {opts.model_options!r}") from None
        if not isinstance(plan.model_options, dict):
            raise InputError(f"--model-options must be a JSON object; got {opts.model_options!r}")
        check_model_options(plan.model_options, opts.backbone)
    plugin_settings(opts)  # a malformed --plugin-args stops the run here, before anything is written
    if (opts.plugin or "MultiProc") in _LOCAL_PLUGINS:  # a cluster's nodes may have devices this host lacks
        check_device(opts.device)
        threads, nprocs = getattr(opts, "omp_nthreads", None), n_cores(opts)
        if threads and threads > nprocs:
            say(f"normdiff-bids: warning: --omp-nthreads {threads} is more than the {nprocs} CPU cores of "
                 f"--nprocs; training and scoring will compete for cores (lower --omp-nthreads or raise "
                 f"--nprocs)", always=True)

    # The validator runs while the other inputs are read; its errors come first, as if it had run alone.
    validation = start_validation(opts, plan)
    try:
        if "group" in levels:
            _check_group(opts, plan)
            idps = plan.base_model.idps_ if plan.base_model is not None else _idp_columns(plan.table, plan)
        elif "participant" in levels:
            check_model(opts, plan, plan.model_dir)
            idps = plan.model.idps_
    except NormdiffError:
        finish_validation(opts, plan, validation)
        raise
    except BaseException:
        stop_validation(validation)
        raise
    plan.validation = finish_validation(opts, plan, validation)
    _check_condition_on(opts.condition_on, idps)
    if getattr(opts, "reports_only", False):
        _check_reports_only(plan)
    return plan


def covariate_spec(opts) -> CovariateSpecs:
    """The covariates the command line names (``--age-column``, ``--sex-column``, ``--site-column``,
    ``--covariate``), checked against the names the score tables use for themselves."""
    from normdiff_bids.outputs.score_tables import SUBJECT_SCORE_COLUMNS, TIDY_COLUMNS

    spec = CovariateSpecs.from_options(age_column=opts.age_column, sex_column=opts.sex_column,
                                       site_column=opts.site_column,
                                       covariates=getattr(opts, "covariate", None) or ())
    spec.check_names({*TIDY_COLUMNS, *SUBJECT_SCORE_COLUMNS}, "a column of the score tables")
    return spec


def _model_covariates(plan: Plan, model) -> CovariateSpecs:
    """The run's covariates as ``model`` needs them (its own, with the command line's columns)."""
    schema = model.covariate_schema_
    kinds = {**{c.name: "continuous" for c in schema.continuous},
             **{c.name: "categorical" for c in schema.categorical}}
    return plan.covariates.for_model(list(model.covariates), kinds)


def _check_reports_only(plan: Plan) -> None:
    """``--reports-only`` re-writes participant reports: it needs the group tables holding every row
    (kept in ``plan.group_table`` for the workflow)."""
    import pandas as pd

    from normdiff_bids.outputs.tables import read_group_table

    try:
        table = read_group_table(plan.output_dir)
    except FileNotFoundError:
        raise InputError(f"--reports-only needs the group tables in {plan.output_dir / 'phenotype'}; run "
                         f"the group level first (or the participant level without --reports-only)") from None
    sessions = table["session_id"] if "session_id" in table.columns else pd.Series([None] * len(table))
    have = {(str(p), "" if pd.isna(s) else str(s)) for p, s in zip(table["participant_id"], sessions)}
    lacking = [r["participant_id"] + (f" {r['session_id']}" if r.get("session_id") else "") for r in plan.rows
               if (r["participant_id"], r.get("session_id") or "") not in have]
    if lacking:
        raise InputError(f"--reports-only: {preview(lacking)} are not in the group tables of "
                         f"{plan.output_dir}; score them first (the participant level without "
                         f"--reports-only)")
    plan.group_table = table


def _idp_columns(table, plan: Plan) -> list[str]:
    from normdiff_bids.interfaces.model import idp_columns

    return idp_columns(table, plan.covariates.names)


def _check_condition_on(given, idps) -> None:
    """``--condition-on`` names IDPs the model scores, and leaves at least one to score conditionally."""
    from normdiff_bids.data.idps import IDP_SETS

    if not given:
        return
    unknown = [g for g in given if g not in idps]
    if unknown:
        hint = (" (EstimatedTotalIntraCranialVol and the other whole-brain measures are in --idp-set global)"
                if any(g in IDP_SETS["global"] for g in unknown) else "")
        raise InputError(f"--condition-on names {unknown}, which the model does not score; name IDPs of "
                         f"the model's {len(idps)} (from --idp-set), or add them to --idp-set{hint}")
    if len(set(given)) >= len(idps):
        raise InputError(f"--condition-on names every one of the model's {len(idps)} IDPs, so none is left "
                         f"to score conditionally; leave at least one out")


#: --model-options keys that the command line sets itself, and the option to use instead.
_SET_BY_FLAGS = {"backbone": "--backbone", "covariates": "--covariate (and --site-column)",
                 "covariate_kinds": "--covariate COLUMN:KIND", "site_covariate": "--site-column",
                 "seed": "--seed", "device": "--device"}
#: Plugins that run the nodes on this machine (so its devices are the ones the nodes get).
_LOCAL_PLUGINS = ("Linear", "MultiProc")


def check_model_options(options: dict, backbone: str) -> None:
    """Refuse ``--model-options`` that name no model option or config field, or hold invalid values."""
    import dataclasses

    from normdiff_bids.model.backbones import get_backbone
    from normdiff_bids.model.covariates import CovariateEncoderConfig
    from normdiff_bids.model.normative import NormativeDiffusion
    from normdiff_bids.model.schedule import DiffusionConfig

    valid = NormativeDiffusion._param_names()
    problems = ProblemCollector()
    for key in options:
        if key in _SET_BY_FLAGS:
            problems.add(f"{key!r} is set on the command line; use {_SET_BY_FLAGS[key]} instead")
        elif key not in valid:
            close = [v for v in valid if v not in _SET_BY_FLAGS]
            problems.add(f"{key!r} is not a model option; valid options: {', '.join(close)}")
    configs = {"backbone_config": (get_backbone(backbone)[1], f"the {backbone} backbone"),
               "diffusion_config": (DiffusionConfig, "the diffusion process"),
               "encoder_config": (CovariateEncoderConfig, "the covariate encoder")}
    for key, (config_cls, what) in configs.items():
        value = options.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.add(f"{key} must be a JSON object of fields, e.g. {{\"{key}\": {{...}}}}; got {value!r}")
            continue
        fields = [f.name for f in dataclasses.fields(config_cls)]
        for name in value:
            if name not in fields:
                problems.add(f"{key} has no field {name!r} for {what}; valid fields: {', '.join(fields)}")
    problems.raise_if_any(header="--model-options cannot be used")
    try:
        NormativeDiffusion(backbone=backbone, **{**options, "device": "cpu"})._check_params()
    except (TypeError, ValueError) as exc:
        raise InputError(f"--model-options cannot be used: {str(exc).split(': ', 1)[-1]}") from None


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine does not have (before any work is done)."""
    if device in ("auto", "cpu"):
        return
    if device == "mps":
        raise InputError("--device mps: normdiff-bids models run on cpu or cuda (cuda:N); use --device cpu "
                         "or auto")
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine (torch "
                         f"{torch.__version__} finds no GPU); use --device cpu or auto")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                         f"cuda:{count - 1}; choose one of them, or --device auto")


def _labels(values, entity, problems) -> list[str] | None:
    if not values:
        return None
    labels, bad = clean_labels(values, entity)
    for problem in bad:
        problems.add(f"--{'participant' if entity == 'sub' else 'session'}-label: {problem}")
    return sorted(labels)


def _collect(plan: Plan, idp_set):
    """Collect the IDP table of the selection (raises the input layer's errors, naming file and value)."""
    from normdiff_bids.data.idps import collect_idps

    table, report = collect_idps(plan.bids_dir, fs_dir=plan.fs_dir, participant_label=plan.participant_label,
                                 session_label=plan.session_label, idp_set=list(idp_set),
                                 longitudinal=plan.longitudinal, covariates=plan.covariates)
    plan.covariates = CovariateSpecs.from_list(report["covariates"])  # every kind now known
    plan.no_freesurfer = list(report["no_freesurfer"])
    if plan.no_freesurfer and not table.empty:
        say(f"normdiff-bids: warning: {len(plan.no_freesurfer)} participant/session row(s) of "
             f"{plan.bids_dir} have no FreeSurfer folder in {report['fs_dir']} and are left out: "
             f"{preview(plan.no_freesurfer)} (the run record lists them all)", always=True)
    if plan.participant_label:
        found = {str(p).removeprefix("sub-") for p in table["participant_id"]}
        unknown = [p for p in plan.participant_label if p not in found]
        if unknown:
            raise InputError(f"participant(s) {', '.join('sub-' + p for p in unknown)} not found in "
                             f"{plan.bids_dir} (or without FreeSurfer outputs); the dataset has "
                             f"{preview(sorted(found))}")
    if plan.session_label and "session_id" in table.columns:
        found = {str(s).removeprefix("ses-") for s in table["session_id"].dropna()}
        unknown = [s for s in plan.session_label if s not in found]
        if unknown:
            raise InputError(f"session(s) {', '.join('ses-' + s for s in unknown)} not found for the "
                             f"selected participants; sessions present: {preview(sorted(found))}")
    if table.empty:
        raise InputError(f"no participant with FreeSurfer outputs was found in {plan.bids_dir}")
    return table


def _check_group(opts, plan: Plan) -> None:
    from normdiff_bids.data.reference import MIN_REFERENCE_ROWS, reference_participants, select_reference
    from normdiff_bids.interfaces.model import split_reference
    from normdiff_bids.model.covariates import CovariateSchema
    from normdiff_bids.outputs.names import model_dir

    target = plan.output_dir / model_dir(opts.model_name)
    if target.exists() and not opts.overwrite_model:
        raise OutputError(
            f"a model named '{opts.model_name}' already exists in {target.parent}; pass "
            f"--model-name NEW to keep both, or --overwrite-model to replace it")
    if opts.from_model is not None:
        from normdiff_bids.model.normative import load_model

        plan.base_model = load_model(opts.from_model.expanduser().absolute(), device="cpu")
        plan.covariates = _model_covariates(plan, plan.base_model)
    table = _collect(plan, plan.base_model.idps_ if plan.base_model is not None else opts.idp_set)
    plan.table = table
    plan.reference_participants = reference_participants(plan.bids_dir, opts.reference_query, table)
    reference = select_reference(table, participants=plan.reference_participants,
                                 min_rows=2 if plan.base_model is not None else MIN_REFERENCE_ROWS)
    train, _ = split_reference(reference, opts.holdout_fraction, opts.seed,
                               strata=plan.covariates.names_of("site", "sex"),
                               min_train=2 if plan.base_model is not None else None)
    # Every row is scored by the group level: its covariates must be usable by a model trained on `train`
    # (or by the adapted model: the base model's levels plus the reference's new sites).
    if plan.base_model is None:
        schema = CovariateSchema.from_table(train, plan.covariates.names, kinds=plan.covariates.kinds)
    else:
        schema = _adapted_schema(plan.base_model, reference)
    _check_covariates(schema, table, opts.unknown_site, plan.covariates.name_of("site"))


def _adapted_schema(model, reference):
    """The covariate schema a model will have once adapted to the reference's sites it lacks."""
    from normdiff_bids.model.covariates import CovariateSchema

    schema = CovariateSchema.from_dict(model.covariate_schema_.to_dict())
    names = [c.name for c in schema.categorical]
    site = model.site_covariate
    if site in names and site in reference.columns:
        levels = schema.categorical[names.index(site)].levels
        levels.extend(sorted(set(reference[site].dropna().astype(str).str.strip()) - set(levels)))
    return schema


def _check_covariates(schema, table, unknown_site: str, site: str | None = "site") -> None:
    """Every row's covariates can be encoded by ``schema`` (e.g. no ``site`` the model never saw)."""
    try:
        schema.encode(table, unknown=unknown_site)
    except InputError as exc:
        header = "the participants' covariates do not fit the model"
        if site is not None and any(f"covariate '{site}' has levels" in problem for problem in exc.problems):
            header += (" (on the command line, rows from an unseen site can be scored against the model's "
                       "mixture over sites with --unknown-site marginal)")
        raise InputError(exc.problems, header=header) from None


def check_model(opts, plan: Plan, model_dir: Path):
    """Load the model and check the selection's covariates against it; return (model, table)."""
    from normdiff_bids.model.normative import load_model

    if not model_dir.exists():
        raise InputError(f"no model found at {model_dir}; run the group level first, or pass --model "
                         f"with a model folder written by it")
    model = load_model(model_dir, device="cpu")
    trained_on = model.training_data_.get("freesurfer_stream")
    reading = "longitudinal" if plan.longitudinal else "cross-sectional"
    if trained_on is not None and trained_on != reading:
        # the longitudinal stream's estimates differ systematically from the cross-sectional ones
        say(f"normdiff-bids: warning: the model {model_dir} was trained on IDPs of FreeSurfer's {trained_on} "
            f"stream and this run reads the {reading} one; its deviations mix the two streams' differences "
            f"with the participants' ({'add' if trained_on == 'longitudinal' else 'drop'} --longitudinal "
            f"to read the stream it was trained on)", always=True)
    plan.covariates = _model_covariates(plan, model)
    table = _collect(plan, model.idps_)
    _check_covariates(model.covariate_schema_, table, opts.unknown_site, plan.covariates.name_of("site"))
    plan.table, plan.model = table, model
    plan.rows = subject_rows(table, plan)
    return model, table


def subject_rows(table, plan: Plan) -> list[dict]:
    """One entry per row to write: ``participant_id``, ``session_id`` (None without sessions) and
    ``fs_subject_dir`` (the FreeSurfer folder the deviation maps are painted into, None if not found)."""
    import pandas as pd

    from normdiff_bids.data.bids import (
        find_freesurfer_dir,
        list_freesurfer_subjects,
        match_freesurfer_subject,
    )

    root = find_freesurfer_dir(plan.bids_dir, plan.fs_dir)
    folders = list_freesurfer_subjects(root) if root is not None else None
    sessions = table.groupby("participant_id").size().to_dict()
    rows = []
    for _, row in table.iterrows():
        participant = str(row["participant_id"])
        session = row.get("session_id") if "session_id" in table.columns else None
        session = None if session is None or pd.isna(session) else str(session)
        found = (match_freesurfer_subject(folders, participant, session, sessions.get(participant, 1),
                                          longitudinal=plan.longitudinal)
                 if folders is not None else None)
        rows.append({"participant_id": participant, "session_id": session,
                     "fs_subject_dir": str(found.path) if found is not None else None})
    return rows

