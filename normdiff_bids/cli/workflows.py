"""The group- and participant-level Nipype workflows of a checked :class:`~normdiff_bids.cli.plan.Plan`."""

from __future__ import annotations

from pathlib import Path

from normdiff_bids.cli.checks import check_model, subject_rows
from normdiff_bids.cli.execution import node_threads, uses_gpu
from normdiff_bids.cli.plan import Plan


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
        unknown_site=opts.unknown_site, use_gpu=uses_gpu(opts.device), model_options=plan.model_options,
        subject_reports=reports, nprocs=node_threads(opts), condition_on=opts.condition_on or (),
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
        check_model(opts, plan, plan.model_dir)
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
        use_gpu=uses_gpu(opts.device), nprocs=node_threads(opts), scores=scores,
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
