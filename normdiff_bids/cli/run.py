"""The ``normdiff-bids`` BIDS-App: check every input first, then build and run the Nipype workflows.

Inputs are validated in this process before anything is written (a bad input stops the run with one
message naming the culprit and leaves the output folder untouched); a failure inside a Nipype node is
translated back into the message of the error that caused it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from normdiff_bids.cli.parser import parse_args
from normdiff_bids.conventions import preview
from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.errors import InputError, NormdiffError, OutputError, ProblemCollector

#: Error classes whose message is written for the user; a node crash carrying one of them is shown as it.
_ERROR_PATTERN = re.compile(r"^([ \t]*)(?:normdiff_bids\.[\w.]+\.)?(\w*Error): ", re.MULTILINE)


@dataclass
class Plan:
    """Everything the run needs, resolved and checked."""

    bids_dir: Path
    output_dir: Path
    levels: list[str]
    participant_label: list[str] | None
    session_label: list[str] | None
    fs_dir: Path | None
    #: The covariates: from the command line, then with the kinds read from participants.tsv (group
    #: level) or as the model has them (participant level, --from-model).
    covariates: CovariateSpecs
    longitudinal: bool = False  # read FreeSurfer's <timepoint>.long.<template> folders, not sub-X[_ses-Y]
    reference_participants: list[str] | None = None
    model_dir: Path | None = None
    model_options: dict | None = None
    model: object = None  # the loaded model (participant level)
    base_model: object = None  # the model --from-model adapts (group level)
    rows: list[dict] = field(default_factory=list)  # rows the participant level writes files for
    table: object = None  # the IDP table collected while checking (pandas DataFrame)
    group_table: object = None  # the group level's score tables, read while checking (--reports-only)
    group_done: bool = False  # the group level of this run has finished (its model is installed)
    validation: dict | None = None  # what the BIDS validator said, for the run record
    no_freesurfer: list[str] = field(default_factory=list)  # rows left out: no FreeSurfer folder found


def main(argv=None) -> int:
    """Run the BIDS-App; return the exit status (0 success, 2 bad input, 3 unsafe output folder)."""
    try:
        opts = parse_args(argv)
    except NormdiffError as exc:
        _say(f"normdiff-bids: error: {exc}", always=True)
        return exc.exit_code
    # Set before nipype is first imported: no network version check, and quiet worker processes.
    saved = {k: os.environ.get(k) for k in ("NIPYPE_NO_ET", "NORMDIFF_QUIET")}
    os.environ["NIPYPE_NO_ET"] = "1"
    if opts.quiet:
        os.environ["NORMDIFF_QUIET"] = "1"
    try:
        return run(opts, list(sys.argv[1:] if argv is None else argv))
    except NormdiffError as exc:
        _say(f"normdiff-bids: error: {exc}", always=True)
        return exc.exit_code
    except KeyboardInterrupt:
        _say("normdiff-bids: interrupted", always=True)
        return 130
    except Exception as exc:  # a failure nobody foresaw: one line, the traceback only when asked for
        if opts.verbose >= 2:
            raise
        _say(f"normdiff-bids: unexpected error: {type(exc).__name__}: {exc} (rerun with -vv for the full "
             f"traceback, and please report it)", always=True)
        return 1
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(opts, argv: list[str] | None = None) -> int:
    """Check the inputs of ``opts`` (parsed from ``argv``, default ``sys.argv[1:]``), then run the
    requested levels in order.

    Once the inputs are checked, every run leaves its record in ``OUTPUT_DIR/logs/run-<UTC start>.json``
    (what was run and how it ended, crash reports of failed steps beside it) and the methods text of the
    model it used in ``logs/CITATION.md`` / ``.bib``.
    """
    start = time.monotonic()
    started = datetime.now(UTC)
    levels = [lv for lv in ("group", "participant") if lv in opts.analysis_level]
    plan = check_inputs(opts, levels)

    from normdiff_bids.data.bids import find_freesurfer_dir
    from normdiff_bids.outputs.dataset import prepare_output_dir
    from normdiff_bids.outputs.runlog import RunRecord

    # Only now, with every input checked, is the output folder touched. The FreeSurfer folder read
    # (given or found) is linked, so that the maps' sidecars can name their label volumes by BIDS URI.
    plan.output_dir = prepare_output_dir(plan.output_dir, plan.bids_dir,
                                         fs_dir=find_freesurfer_dir(plan.bids_dir, plan.fs_dir))
    record = RunRecord.start(plan.output_dir, run_description(opts, plan, argv), started)
    try:
        with _work_dir(opts.work_dir) as work_dir:
            if "group" in levels:
                what = (f"adapting {opts.from_model} to the new sites of" if opts.from_model is not None
                        else f"fitting a {opts.backbone} model on")
                _say(f"group level: {what} {len(plan.reference_participants)} reference participants",
                     quiet=opts.quiet)
                run_workflow(group_workflow(opts, plan, work_dir), opts, work_dir, crash_dir=record.crash_dir)
                plan.group_done = True
            if "participant" in levels:
                wf = participant_workflow(opts, plan, work_dir)
                _say(f"participant level: scoring {len(plan.rows)} participant/session rows against "
                     f"{plan.model_dir}", quiet=opts.quiet)
                run_workflow(wf, opts, work_dir, crash_dir=record.crash_dir, serial=len(plan.rows) == 1)
    except BaseException as exc:
        _close_record(record, opts, plan, time.monotonic() - start, exc)
        raise
    _close_record(record, opts, plan, time.monotonic() - start, None)
    _say(f"normdiff-bids finished in {time.monotonic() - start:.0f} s; outputs in {plan.output_dir} "
         f"(run record: {record.path.relative_to(plan.output_dir)})", quiet=opts.quiet)
    return 0


def run_description(opts, plan: Plan, argv: list[str] | None = None) -> dict:
    """What the run record says about a run before it starts: command line, options as given and as
    resolved, package versions and platform."""
    import platform
    import shlex

    from normdiff_bids.bidsio import json_ready
    from normdiff_bids.data.bids import find_freesurfer_dir
    from normdiff_bids.outputs.runlog import package_versions

    argv = list(sys.argv[1:] if argv is None else argv)
    plugin, plugin_args = plugin_settings(opts)
    fs_dir = find_freesurfer_dir(plan.bids_dir, plan.fs_dir)
    resolved = {
        "bids_dir": plan.bids_dir, "output_dir": plan.output_dir, "fs_dir": fs_dir,
        "longitudinal": plan.longitudinal, "analysis_levels": plan.levels,
        "participant_label": plan.participant_label, "session_label": plan.session_label,
        "model_dir": plan.model_dir, "model_options": plan.model_options,
        "covariates": plan.covariates.to_list(), "use_gpu": _uses_gpu(opts.device),
        "n_rows": int(len(plan.table)) if plan.table is not None else None,
        "n_reference_participants": (len(plan.reference_participants)
                                     if plan.reference_participants is not None else None),
        "plugin": plugin, "plugin_args": plugin_args, "nprocs": _nprocs(opts),
        "omp_nthreads": _node_threads(opts),
        "bids_validation": plan.validation,
        "no_freesurfer": plan.no_freesurfer,
        "work_dir": opts.work_dir.expanduser().absolute() if opts.work_dir is not None else "temporary",
    }
    return json_ready({
        "command_line": shlex.join(["normdiff-bids", *argv]),
        "arguments": argv,
        "options": vars(opts),
        "resolved": resolved,
        "versions": package_versions(),
        "platform": platform.platform(),
    })


def _close_record(record, opts, plan: Plan, seconds: float, exc: BaseException | None) -> None:
    """Complete the run record and write the methods text; a failure here is a warning, so that it never
    hides how the run itself ended."""
    from normdiff_bids.outputs.runlog import write_citation

    ended = datetime.now(UTC)
    if exc is None:
        status, code, error, failures = "success", 0, None, None
    elif isinstance(exc, KeyboardInterrupt):
        status, code, error, failures = "interrupted", 130, "interrupted", None
    else:
        code = exc.exit_code if isinstance(exc, NormdiffError) else 1
        error = str(exc) if isinstance(exc, NormdiffError) else f"{type(exc).__name__}: {exc}"
        status, failures = "failed", getattr(exc, "failures", None)
    try:
        record.finish(status, code, ended, seconds=seconds, error=error, failures=failures)
        write_citation(plan.output_dir, _used_model_card(opts, plan))
    except (OSError, NormdiffError) as problem:
        _say(f"normdiff-bids: warning: the run record {record.path} could not be written: {problem}",
             always=True)


def _used_model_card(opts, plan: Plan) -> dict | None:
    """The card of the model the run used: the participant level's, else the one the group level
    installed (None when the run ended before its model was known)."""
    if plan.model is not None:
        return plan.model.model_card()
    if plan.group_done:
        from normdiff_bids.outputs.names import model_card_path

        path = plan.output_dir / model_card_path(opts.model_name)
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _checked_table(plan: Plan, work_dir: Path | None, level: str) -> Path | None:
    """The IDP table collected while checking the inputs, written into ``work_dir`` for the workflow
    (``None`` without one): the workflow then does not read the dataset a second time."""
    if work_dir is None or plan.table is None:
        return None
    import hashlib

    import pandas as pd

    from normdiff_bids.interfaces.tables import write_table

    # named by content: jobs sharing a work folder (array jobs of other participants) never share it
    digest = hashlib.sha1(pd.util.hash_pandas_object(plan.table, index=False).to_numpy().tobytes())
    digest.update(",".join(map(str, plan.table.columns)).encode())
    name = f"checked_idps_{level}_{digest.hexdigest()[:12]}.tsv"
    return Path(write_table(plan.table, Path(work_dir) / name))


def group_workflow(opts, plan: Plan, work_dir: Path | None = None):
    """The group-level workflow for checked inputs (see :func:`normdiff_bids.pipeline.init_group_wf`)."""
    from normdiff_bids.outputs import names
    from normdiff_bids.pipeline import init_group_wf

    reports = []
    if "participant" in plan.levels:  # the participant level of this run writes them next
        reports = [names.subject_report_path(names.subject_entities(r["participant_id"], r["session_id"]))
                   .as_posix() for r in subject_rows(plan.table, plan)]
    return init_group_wf(
        bids_dir=plan.bids_dir, output_dir=plan.output_dir, fs_dir=plan.fs_dir,
        participant_label=plan.participant_label, session_label=plan.session_label,
        longitudinal=plan.longitudinal,
        idp_set=list(plan.base_model.idps_) if plan.base_model is not None else opts.idp_set,
        covariates=plan.covariates, reference_participants=plan.reference_participants,
        holdout_fraction=opts.holdout_fraction, backbone=opts.backbone, epochs=opts.epochs,
        n_samples=opts.n_samples, seed=opts.seed, device=opts.device,
        model_name=opts.model_name, overwrite_model=opts.overwrite_model,
        unknown_site=opts.unknown_site, use_gpu=_uses_gpu(opts.device), model_options=plan.model_options,
        subject_reports=reports, nprocs=_node_threads(opts), condition_on=opts.condition_on or (),
        idp_table=_checked_table(plan, work_dir, "group"),
        from_model=opts.from_model.expanduser().absolute() if opts.from_model is not None else None)


def participant_workflow(opts, plan: Plan, work_dir: Path | None = None):
    """The participant-level workflow for checked inputs; checks the model first if not yet done.

    When the group level of the same run has just scored every row with this very model, its tables are
    reused (gathered into one table in ``work_dir``) instead of scoring the rows again; without a
    ``work_dir`` the rows are scored again, which gives the same numbers.
    """
    from normdiff_bids.pipeline import init_participant_wf

    if plan.model is None:
        _check_model(opts, plan, plan.model_dir)
    scores = None
    reports_only = bool(getattr(opts, "reports_only", False))
    if (reports_only or ("group" in plan.levels and opts.model is None)) and work_dir is not None:
        scores = group_scores(plan.output_dir, Path(work_dir) / "group_scores.tsv", plan.group_table)
    return init_participant_wf(
        bids_dir=plan.bids_dir, output_dir=plan.output_dir, model_dir=plan.model_dir,
        subjects=plan.rows, fs_dir=plan.fs_dir, participant_label=plan.participant_label,
        session_label=plan.session_label, longitudinal=plan.longitudinal, idps=list(plan.model.idps_),
        covariates=plan.covariates, n_samples=opts.n_samples, unknown_site=opts.unknown_site,
        device=opts.device,
        use_gpu=_uses_gpu(opts.device), nprocs=_node_threads(opts), scores=scores,
        condition_on=opts.condition_on or (),
        idp_table=None if scores is not None else _checked_table(plan, work_dir, "participant"),
        reports_only=reports_only)


def group_scores(output_dir: Path, path: Path, table=None) -> Path:
    """Gather the group tables of ``output_dir`` (or ``table``, when they were read already) into one
    wide table at ``path`` and return it.

    The group level writes one phenotype table per session (BIDS phenotype files hold one row per
    participant), plus one for rows without a session; the participant level reads them as one table.
    """
    from normdiff_bids.interfaces.tables import write_table
    from normdiff_bids.outputs.tables import read_group_table

    return Path(write_table(read_group_table(output_dir) if table is None else table, path))


# -- checking the inputs --------------------------------------------------------------------------

def check_inputs(opts, levels) -> Plan:
    """Validate every input named on the command line; raise :class:`NormdiffError` naming the culprit."""
    if getattr(opts, "reports_only", False) and "group" in levels:
        raise InputError("--reports-only re-writes the participant level's reports; run it with "
                         "'participant' alone (the group level writes its report when it runs)")
    from normdiff_bids.outputs.dataset import check_output_dir
    from normdiff_bids.outputs.names import clean_label, model_dir

    bids_dir = opts.bids_dir.expanduser().absolute()
    if not bids_dir.is_dir():
        raise InputError(f"BIDS dataset folder not found: {bids_dir}; give the folder that holds "
                         f"dataset_description.json and participants.tsv")
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputError(f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json")
    output_dir = check_output_dir(opts.output_dir, bids_dir)

    problems = ProblemCollector()
    participant_label = _labels(opts.participant_label, "sub", clean_label, problems)
    session_label = _labels(opts.session_label, "ses", clean_label, problems)
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
        threads, nprocs = getattr(opts, "omp_nthreads", None), _nprocs(opts)
        if threads and threads > nprocs:
            _say(f"normdiff-bids: warning: --omp-nthreads {threads} is more than the {nprocs} CPU cores of "
                 f"--nprocs; training and scoring will compete for cores (lower --omp-nthreads or raise "
                 f"--nprocs)", always=True)

    plan.validation = validate_dataset(opts, plan)

    if "group" in levels:
        _check_group(opts, plan)
        idps = plan.base_model.idps_ if plan.base_model is not None else _idp_columns(plan.table, plan)
    elif "participant" in levels:
        _check_model(opts, plan, plan.model_dir)
        idps = plan.model.idps_
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


def validate_dataset(opts, plan: Plan) -> dict:
    """Run the BIDS validator on the input dataset (once per run, before any output is written).

    Its errors stop the run (an :class:`InputError` in the validator's words); its warnings are one line.
    Without the validator (not installed, failed, out of time) the run goes on with a warning. Only the
    selected participants' files count, and nothing inside the run's own output, work and FreeSurfer
    folders. Returns what the run record keeps.
    """
    from normdiff_bids.data.validation import (
        INSTALL_HINT,
        VALIDATOR,
        ValidatorUnavailable,
        validate_bids,
    )

    if getattr(opts, "skip_bids_validation", False):
        return {"skipped": "--skip-bids-validation"}
    if getattr(opts, "reports_only", False):
        return {"skipped": "--reports-only"}
    work_dir = opts.work_dir.expanduser().absolute() if opts.work_dir is not None else None
    try:
        report = validate_bids(plan.bids_dir, participants=plan.participant_label,
                               ignore=(plan.output_dir, work_dir, plan.fs_dir))
    except ValidatorUnavailable as exc:
        hint = (f"install it ({INSTALL_HINT})" if not exc.installed
                else f"run `{VALIDATOR} {plan.bids_dir}` to see why")
        _say(f"normdiff-bids: warning: the input dataset was not checked with the BIDS validator: {exc}; "
             f"{hint}, or pass --skip-bids-validation to leave it out", always=True)
        return {"skipped": str(exc)}
    report.raise_for_errors()
    _say(f"normdiff-bids: {report.summary()}", quiet=opts.quiet)
    return report.record()


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


def _labels(values, entity, clean_label, problems) -> list[str] | None:
    if not values:
        return None
    labels = []
    for value in values:
        try:
            labels.append(clean_label(value, entity))
        except InputError as exc:
            problems.add(f"--{'participant' if entity == 'sub' else 'session'}-label: {exc}")
    return sorted(set(labels))


def _collect(plan: Plan, idp_set):
    """Collect the IDP table of the selection (raises the input layer's errors, naming file and value)."""
    from normdiff_bids.data.idps import collect_idps

    table, report = collect_idps(plan.bids_dir, fs_dir=plan.fs_dir, participant_label=plan.participant_label,
                                 session_label=plan.session_label, idp_set=list(idp_set),
                                 longitudinal=plan.longitudinal, covariates=plan.covariates)
    plan.covariates = CovariateSpecs.from_list(report["covariates"])  # every kind now known
    plan.no_freesurfer = list(report["no_freesurfer"])
    if plan.no_freesurfer and not table.empty:
        _say(f"normdiff-bids: warning: {len(plan.no_freesurfer)} participant/session row(s) of "
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


def _check_model(opts, plan: Plan, model_dir: Path):
    """Load the model and check the selection's covariates against it; return (model, table)."""
    from normdiff_bids.model.normative import load_model

    if not model_dir.exists():
        raise InputError(f"no model found at {model_dir}; run the group level first, or pass --model "
                         f"with a model folder written by it")
    model = load_model(model_dir, device="cpu")
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


def _uses_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


# -- running the workflows ------------------------------------------------------------------------

@contextlib.contextmanager
def _work_dir(work_dir: Path | None):
    if work_dir is not None:
        path = work_dir.expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="normdiff-work-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _nprocs(opts) -> int:
    """``--nprocs``, else the CPUs this process may run on."""
    if opts.nprocs:
        return opts.nprocs
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _node_threads(opts) -> int:
    """Torch threads of a training or scoring node: ``--omp-nthreads``, else every core of ``--nprocs``."""
    return getattr(opts, "omp_nthreads", None) or _nprocs(opts)


def plugin_settings(opts, serial: bool = False) -> tuple[str, dict]:
    """Nipype plugin name and arguments from ``--plugin``, ``--plugin-args``, ``--nprocs`` and
    ``--mem-gb``; values in ``--plugin-args`` win over the flags. ``serial``: the workflow is one chain
    of steps (a single participant), so without ``--plugin`` it runs in this process (Linear): worker
    processes would only add their start-up (a fresh interpreter importing torch, about 2 s a step)."""
    nprocs = _nprocs(opts)
    plugin = opts.plugin or ("Linear" if nprocs == 1 or serial else "MultiProc")
    args: dict = {}
    if opts.plugin_args:
        try:
            args = json.loads(opts.plugin_args)
        except ValueError as exc:
            raise InputError(f"--plugin-args is not valid JSON ({exc}): {opts.plugin_args!r}") from None
        if not isinstance(args, dict):
            raise InputError(f"--plugin-args must be a JSON object, e.g. '{{\"n_procs\": 2}}'; "
                             f"got {opts.plugin_args!r}")
    if plugin == "MultiProc":
        args.setdefault("n_procs", nprocs)
        if getattr(opts, "mem_gb", None):
            args.setdefault("memory_gb", float(opts.mem_gb))
        # Workers start from a fresh interpreter: forking a process that already ran torch kernels can
        # deadlock OpenMP in the child.
        args.setdefault("mp_context", "forkserver")
        args.setdefault("raise_insufficient", False)
    return plugin, args


def run_workflow(wf, opts, work_dir: Path, crash_dir: Path | None = None, serial: bool = False) -> None:
    """Run ``wf`` in ``work_dir``; a node failure is raised as the user-facing error that caused it.

    Crash reports of failed steps go to ``crash_dir`` (default ``work_dir/crash/<time>``); ``serial``:
    see :func:`plugin_settings`.
    """
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    verbose = getattr(opts, "verbose", 0)
    level = "INFO" if verbose >= 2 else "WARNING" if verbose == 1 else "CRITICAL"
    # Nipype re-applies its logging config when a workflow runs, so the levels go through the config.
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)
    crash_dir = crash_dir if crash_dir is not None else work_dir / "crash" / time.strftime("%Y%m%d-%H%M%S")
    wf.base_dir = str(work_dir)
    # ... each node applies the workflow's own copy, and MultiProc workers (fresh interpreters) read it
    # from the configuration folder named in the environment they inherit.
    levels = {key: level for key in ("workflow_level", "interface_level", "utils_level")}
    wf.config.setdefault("logging", {}).update(levels)
    _worker_logging_config(levels)
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "poll_sleep_duration": 0.2,  # MultiProc's scheduler loop; shorter wastes a core on polling
        # Without it, steps that do not depend on a failed one (other participants) still run, and every
        # failure is reported at the end.
        "stop_on_first_crash": bool(getattr(opts, "stop_on_first_crash", False)),
        "remove_unnecessary_outputs": False,
    })
    nipype_config.set("execution", "check_version", "false")
    plugin, plugin_args = plugin_settings(opts, serial=serial)
    if plugin.upper().startswith("SLURM"):
        _default_logname()
    # MultiProc runs a full garbage collection on every scheduler pass; what this process holds by now
    # (the checked inputs, pybids' index, torch) is long-lived, so it is moved out of the collector's
    # sight: a participant-level run spent 3 of its 9 seconds in those collections.
    gc.collect()
    gc.freeze()
    try:
        wf.run(plugin=plugin, plugin_args=plugin_args)
    except Exception as exc:
        if verbose >= 2:
            raise
        raise node_error(exc, crash_dir) from None
    finally:
        gc.unfreeze()


def _default_logname() -> None:
    """Nipype's SLURM plugins name each job after ``$LOGNAME``, which batch jobs, containers and cron
    often lack (a ``KeyError`` deep in the plugin otherwise)."""
    if os.environ.get("LOGNAME"):
        return
    try:
        import getpass
        os.environ["LOGNAME"] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (containers run with -u)
        os.environ["LOGNAME"] = "normdiff"


def _worker_logging_config(levels: dict) -> None:
    """Write Nipype's logging levels where worker processes of this process will read them."""
    import atexit

    folder = Path(tempfile.gettempdir()) / f"normdiff-nipype-config-{os.getpid()}"
    if os.environ.get("NIPYPE_CONFIG_DIR") != str(folder):
        folder.mkdir(exist_ok=True)
        atexit.register(shutil.rmtree, folder, True)
        os.environ["NIPYPE_CONFIG_DIR"] = str(folder)
    text = "[logging]\n" + "".join(f"{key} = {value}\n" for key, value in levels.items())
    (folder / "nipype.cfg").write_text(text)


class NodeError(NormdiffError):
    """A workflow node failed; carries the message (and exit code) of the error that caused it.

    ``failures``: one ``{"node", "message", "crash_file"}`` entry per failed node (either of the node and
    its crash file may be None when Nipype left no crash file).
    """

    def __init__(self, message: str, failures: list[dict] | None = None):
        super().__init__(message)
        self.failures = list(failures or [])


def node_error(exc: BaseException, crash_dir: Path) -> NormdiffError:
    """The user-facing error behind a failed workflow, recovered from the exception or the crash files.

    One failed node gives the message of the error that caused it (as if it had been raised here);
    several (a run that went on after the first failure) give one line per failed node.
    """
    crash_files = sorted(crash_dir.glob("crash-*")) if crash_dir.is_dir() else []
    failures = [_failure(path) for path in crash_files]
    if len(failures) > 1:
        return _several_failures(failures, crash_dir)
    texts = []
    seen = exc
    while seen is not None:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    texts.extend(p.read_text(errors="replace") for p in crash_files)
    failure = {"node": failures[0]["node"] if failures else None,
               "crash_file": os.fspath(crash_files[0]) if crash_files else None}
    for text in texts:
        found = _user_message(text)
        if found is not None:
            name, message = found
            # the node's own message, as if it had been raised here
            error = NodeError(message, [{**failure, "message": message}])
            error.exit_code = _exit_code(name)
            return error
    where = f"; crash report: {crash_files[0]}" if crash_files else ""
    last = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
    error = NodeError(f"a processing step failed: {last}{where}; rerun with -vv for the full log",
                      [{**failure, "message": last}])
    error.exit_code = 1
    return error


def _exit_code(error_name: str | None) -> int:
    """Exit status of a failure: 3 for an unsafe output folder, 2 for other user errors, 1 otherwise."""
    if error_name is None:
        return 1
    return OutputError.exit_code if error_name == "OutputError" else NormdiffError.exit_code


def _failure(crash_file: Path) -> dict:
    """What one Nipype crash file says: the node (without the top workflow's name), its error and message."""
    text = crash_file.read_text(errors="replace")
    first = text.split("\n", 1)[0]
    node = first.removeprefix("Node: ").strip() if first.startswith("Node: ") else crash_file.name
    node = node.split(".", 1)[1] if "." in node else node
    found = _user_message(text)
    if found is not None:
        error_name, message = found
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        error_name, message = None, lines[-1] if lines else "no error message"
    return {"node": node, "error": error_name, "message": message, "crash_file": os.fspath(crash_file)}


def _several_failures(failures: list[dict], crash_dir: Path) -> NodeError:
    lines = [f"{len(failures)} processing steps failed (the steps that did not depend on them ran):"]
    for failure in failures:
        message = failure["message"].replace("\n", "\n      ")
        lines.append(f"  - {failure['node']}: {message}")
    lines.append(f"crash reports: {crash_dir}; rerun with -vv for the full log, or with "
                 f"--stop-on-first-crash to stop at the first failure")
    error = NodeError("\n".join(lines), [{k: f[k] for k in ("node", "message", "crash_file")}
                                         for f in failures])
    codes = {_exit_code(f["error"]) for f in failures}
    error.exit_code = 1 if 1 in codes else max(codes)
    return error


def _user_message(text: str) -> tuple[str, str] | None:
    """The last user-facing error (class name, message) in a traceback text, if there is one.

    Nipype indents the traceback it stores; the message is the error line and the lines below it with
    the same indentation, up to Nipype's own text or the end.
    """
    from normdiff_bids import errors
    from normdiff_bids.model.bundle import BundleError

    user_classes = {name for name, obj in vars(errors).items()
                    if isinstance(obj, type) and issubclass(obj, NormdiffError)} | {BundleError.__name__}
    matches = [m for m in _ERROR_PATTERN.finditer(text) if m.group(2) in user_classes]
    if not matches:
        return None
    last = matches[-1]
    indent = last.group(1)
    first, *rest = text[last.end():].split("\n")
    lines = [first.rstrip()]
    for line in rest:
        if not line.startswith(indent) or not line[len(indent):].strip():
            break
        body = line[len(indent):]
        if body.startswith(("Traceback", "During handling", "The above exception", "RuntimeError")):
            break
        lines.append(body.rstrip())
    message = "\n".join(lines).strip()
    return (last.group(2), message) if message else None


def _say(message: str, *, quiet: bool = False, always: bool = False) -> None:
    if always or not quiet:
        print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
