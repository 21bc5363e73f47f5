"""The BIDS validator's run for the CLI: started before the other input checks, finished after them."""

from __future__ import annotations

from normdiff_bids.cli.plan import Plan, say

__all__ = ["finish_validation", "start_validation", "stop_validation", "validate_dataset"]


def validate_dataset(opts, plan: Plan) -> dict:
    """Run the BIDS validator on the input dataset (once per run, before any output is written).

    Its errors stop the run (an :class:`InputError` in the validator's words); its warnings are one line.
    Without the validator (not installed, failed, out of time) the run goes on with a warning. Only the
    selected participants' files count, and nothing inside the run's own output, work and FreeSurfer
    folders. Returns what the run record keeps.
    """
    return finish_validation(opts, plan, start_validation(opts, plan))


def start_validation(opts, plan: Plan):
    """The validator started in the background (the other input checks run meanwhile), or why not: a
    ``dict`` for the run record when it is skipped, a :class:`ValidatorUnavailable` when it cannot run."""
    from normdiff_bids.data.validation import ValidatorUnavailable, start_validator

    if getattr(opts, "skip_bids_validation", False):
        return {"skipped": "--skip-bids-validation"}
    if getattr(opts, "reports_only", False):
        return {"skipped": "--reports-only"}
    try:
        return start_validator(plan.bids_dir)
    except ValidatorUnavailable as exc:
        return exc


def finish_validation(opts, plan: Plan, started) -> dict:
    """Wait for the validator :func:`start_validation` started; raise its errors, say its warnings."""
    from normdiff_bids.data.validation import INSTALL_HINT, VALIDATOR, ValidatorUnavailable

    if isinstance(started, dict):
        return started
    work_dir = opts.work_dir.expanduser().absolute() if opts.work_dir is not None else None
    try:
        if isinstance(started, ValidatorUnavailable):
            raise started
        report = started.report(participants=plan.participant_label,
                                ignore=(plan.output_dir, work_dir, plan.fs_dir))
    except ValidatorUnavailable as exc:
        hint = (f"install it ({INSTALL_HINT})" if not exc.installed
                else f"run `{VALIDATOR} {plan.bids_dir}` to see why")
        say(f"normdiff-bids: warning: the input dataset was not checked with the BIDS validator: {exc}; "
             f"{hint}, or pass --skip-bids-validation to leave it out", always=True)
        return {"skipped": str(exc)}
    report.raise_for_errors()
    say(f"normdiff-bids: {report.summary()}", quiet=opts.quiet)
    return report.record()


def stop_validation(started) -> None:
    """End a validator :func:`start_validation` started whose answer is no longer wanted."""
    from normdiff_bids.data.validation import RunningValidator

    if isinstance(started, RunningValidator):
        started.stop()
