"""The ``normdiff-bids`` BIDS-App: check every input first, then build and run the Nipype workflows.

Inputs are validated in this process before anything is written (a bad input stops the run with one
message naming the culprit and leaves the output folder untouched); a failure inside a Nipype node is
translated back into the message of the error that caused it. The jobs live beside this module:
``checks`` (inputs -> :class:`Plan`), ``workflows`` (building), ``execution`` (running), ``failures``
(crash files -> errors) and ``record`` (the run record's content).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime

from normdiff_bids.cli.checks import (
    check_device,
    check_inputs,
    check_model_options,
    covariate_spec,
    subject_rows,
)
from normdiff_bids.cli.execution import plugin_settings, run_workflow, work_folder
from normdiff_bids.cli.failures import NodeError, node_error
from normdiff_bids.cli.parser import parse_args
from normdiff_bids.cli.plan import Plan, say
from normdiff_bids.cli.record import close_record, run_description
from normdiff_bids.cli.validation import validate_dataset
from normdiff_bids.cli.workflows import group_scores, group_workflow, participant_workflow
from normdiff_bids.errors import NormdiffError

#: ``main`` and ``run`` are this module's own; the rest is re-exported for the callers of the old paths
#: (tests, ``workflows/nipype_slurm.py``).
__all__ = ["NodeError", "Plan", "check_device", "check_inputs", "check_model_options", "covariate_spec",
           "group_scores", "group_workflow", "main", "node_error", "participant_workflow", "plugin_settings",
           "run", "run_description", "run_workflow", "subject_rows", "validate_dataset"]


def main(argv=None) -> int:
    """Run the BIDS-App; return the exit status (0 success, 2 bad input, 3 unsafe output folder)."""
    try:
        opts = parse_args(argv)
    except NormdiffError as exc:
        say(f"normdiff-bids: error: {exc}", always=True)
        return exc.exit_code
    # Set before nipype is first imported: no network version check, and quiet worker processes.
    saved = {k: os.environ.get(k) for k in ("NIPYPE_NO_ET", "NORMDIFF_QUIET")}
    os.environ["NIPYPE_NO_ET"] = "1"
    if opts.quiet:
        os.environ["NORMDIFF_QUIET"] = "1"
    try:
        return run(opts, list(sys.argv[1:] if argv is None else argv))
    except NormdiffError as exc:
        say(f"normdiff-bids: error: {exc}", always=True)
        return exc.exit_code
    except KeyboardInterrupt:
        say("normdiff-bids: interrupted", always=True)
        return 130
    except Exception as exc:  # a failure nobody foresaw: one line, the traceback only when asked for
        if opts.verbose >= 2:
            raise
        say(f"normdiff-bids: unexpected error: {type(exc).__name__}: {exc} (rerun with -vv for the full "
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
        with work_folder(opts.work_dir) as work_dir:
            if "group" in levels:
                what = (f"adapting {opts.from_model} to the new sites of" if opts.from_model is not None
                        else f"fitting a {opts.backbone} model on")
                say(f"group level: {what} {len(plan.reference_participants)} reference participants",
                     quiet=opts.quiet)
                run_workflow(group_workflow(opts, plan, work_dir), opts, work_dir, crash_dir=record.crash_dir)
                plan.group_done = True
            if "participant" in levels:
                wf = participant_workflow(opts, plan, work_dir)
                say(f"participant level: scoring {len(plan.rows)} participant/session rows against "
                     f"{plan.model_dir}", quiet=opts.quiet)
                run_workflow(wf, opts, work_dir, crash_dir=record.crash_dir, serial=len(plan.rows) == 1)
    except BaseException as exc:
        close_record(record, opts, plan, time.monotonic() - start, exc)
        raise
    close_record(record, opts, plan, time.monotonic() - start, None)
    say(f"normdiff-bids finished in {time.monotonic() - start:.0f} s; outputs in {plan.output_dir} "
         f"(run record: {record.path.relative_to(plan.output_dir)})", quiet=opts.quiet)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
