"""The content of the run record (``logs/run-<UTC start>.json``): what a run was asked and resolved to do,
how it ended, and the model card its methods text cites."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from normdiff_bids.cli.execution import n_cores, node_threads, plugin_settings, uses_gpu
from normdiff_bids.cli.plan import Plan, say
from normdiff_bids.errors import NormdiffError


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
        "covariates": plan.covariates.to_list(), "use_gpu": uses_gpu(opts.device),
        "n_rows": int(len(plan.table)) if plan.table is not None else None,
        "n_reference_participants": (len(plan.reference_participants)
                                     if plan.reference_participants is not None else None),
        "plugin": plugin, "plugin_args": plugin_args, "nprocs": n_cores(opts),
        "omp_nthreads": node_threads(opts),
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


def close_record(record, opts, plan: Plan, seconds: float, exc: BaseException | None) -> None:
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
        say(f"normdiff-bids: warning: the run record {record.path} could not be written: {problem}",
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
