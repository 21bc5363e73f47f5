"""Nipype workflow builders of the BIDS-App: ``init_group_wf`` (train, evaluate, group outputs) and
``init_participant_wf`` (score participants against a trained model, write their files and reports).

Builders only assemble nodes; nothing runs until the workflow does, so tests can build and inspect them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from nipype.pipeline import engine as pe

from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.interfaces import (
    AdaptNormativeModel,
    CollectIDPs,
    GroupReport,
    InstallModel,
    ScoreDeviations,
    SubjectOutputs,
    TrainNormativeModel,
    WriteGroupTable,
)

#: Names of the default covariates (``CovariateSpecs.default()``).
DEFAULT_COVARIATES = CovariateSpecs.default().names


def _optional(node: pe.Node, **values) -> None:
    for key, value in values.items():
        if value is not None and value != [] and value != ():
            setattr(node.inputs, key, value)


def _workflow(name: str) -> pe.Workflow:
    wf = pe.Workflow(name=name)
    wf.config["execution"]["hash_method"] = "content"
    return wf


def _reserve(node: pe.Node, nprocs: int | None) -> None:
    """Let a torch node use ``nprocs`` cores, and tell MultiProc so it runs nothing beside it."""
    if nprocs:
        node.n_procs = int(nprocs)
        node.inputs.num_threads = int(nprocs)


def _collect_node(bids_dir, fs_dir, participant_label, session_label, idp_set, covariates: CovariateSpecs,
                  longitudinal=False, idp_table=None, name="collect_idps") -> pe.Node:
    """The node whose ``idp_table`` output is the selection's IDP table: it collects the dataset, or,
    with ``idp_table`` (the table the command line already collected while checking its inputs, written
    to a file), passes that file on, so that the dataset is not read twice."""
    if idp_table is not None:
        from nipype.interfaces.utility import IdentityInterface

        node = pe.Node(IdentityInterface(fields=["idp_table"]), name="collected_idps")
        node.inputs.idp_table = os.fspath(idp_table)
        return node
    # The dataset is re-read on every run (a dataset re-generated at the same path must not come from the
    # cache); the workflows hash files by content, so an unchanged table still lets later steps resume.
    node = pe.Node(CollectIDPs(bids_dir=os.fspath(bids_dir), idp_set=list(idp_set),
                               covariates=covariates.to_list(), longitudinal=bool(longitudinal), rescan=True),
                   name=name)
    _optional(node, fs_dir=os.fspath(fs_dir) if fs_dir else None,
              participant_label=list(participant_label or []), session_label=list(session_label or []))
    return node


def init_group_wf(*, bids_dir, output_dir, fs_dir=None, participant_label=None, session_label=None,
                  idp_set: Sequence[str] = ("aseg",),
                  covariates: CovariateSpecs | Sequence[Mapping] | None = None,
                  reference_participants=None, reference_query=None, holdout_fraction=0.2,
                  backbone="film-mlp", epochs=None,
                  n_samples=None, seed=0, device="auto", use_gpu=False, model_name="default",
                  overwrite_model=False, unknown_site="error", model_options: Mapping | None = None,
                  subject_reports: Sequence[str] = (), nprocs: int | None = None, from_model=None,
                  longitudinal=False, condition_on: Sequence[str] = (), idp_table=None,
                  name="normdiff_group_wf") -> pe.Workflow:
    """Group level: collect IDPs, fit on the reference (held-out evaluation), score everyone, write
    ``phenotype/`` tables, the group report, and finally install the model under ``models/<name>``.

    The model is installed last, so a run that fails earlier leaves no model behind and can simply be
    run again (with the same ``work_dir`` it resumes from the cached nodes). ``subject_reports``: report
    names the group report links (when the participant level follows in the same run). ``nprocs``: CPU
    cores training and scoring may use (the node reserves them from MultiProc and torch uses as many).
    ``from_model``: a trained bundle to adapt to this dataset's new sites instead of training from
    scratch (:class:`AdaptNormativeModel`); the rest of the workflow is the same. ``condition_on``:
    IDPs every other IDP is also scored conditionally on (``<idp>_cond_centile``, ``<idp>_cond_z``).
    ``idp_table``: the IDP table already collected (a TSV), used instead of reading the dataset again.
    ``longitudinal``: read FreeSurfer's ``<timepoint>.long.<template>`` folders instead of the
    cross-sectional ones. ``covariates``: the covariate specification
    (:class:`~normdiff_bids.covariate_spec.CovariateSpecs` or its list form; default age, sex and site),
    given to every node that reads, models or describes the covariates.
    """
    wf = _workflow(name)
    covariates = CovariateSpecs.coerce(covariates)
    collect = _collect_node(bids_dir, fs_dir, participant_label, session_label, idp_set, covariates,
                            longitudinal, idp_table)
    if from_model is None:
        train = pe.Node(TrainNormativeModel(covariates=covariates.to_list(),
                                            holdout_fraction=holdout_fraction, backbone=backbone,
                                            seed=seed, device=device, use_gpu=use_gpu,
                                            freesurfer_stream="longitudinal" if longitudinal
                                            else "cross-sectional"),
                        name="train_model")
        _optional(train, epochs=epochs, n_samples=n_samples,
                  model_options=dict(model_options) if model_options else None)
    else:
        train = pe.Node(AdaptNormativeModel(base_model_dir=os.fspath(from_model),
                                            holdout_fraction=holdout_fraction, seed=seed, device=device),
                        name="adapt_model")
    _reserve(train, nprocs)
    _optional(train, reference_participants=list(reference_participants or []),
              reference_query=reference_query)
    score = pe.Node(ScoreDeviations(unknown_site=unknown_site, device=device, use_gpu=use_gpu),
                    name="score_all")
    _reserve(score, nprocs)
    _optional(score, n_samples=n_samples, condition_on=list(condition_on))
    ds_table = pe.Node(WriteGroupTable(output_dir=os.fspath(output_dir), covariates=covariates.to_list()),
                       name="ds_group_table")
    report = pe.Node(GroupReport(output_dir=os.fspath(output_dir), model_name=model_name,
                                 covariates=covariates.to_list()), name="group_report")
    _optional(report, subject_reports=list(subject_reports))
    install = pe.Node(InstallModel(output_dir=os.fspath(output_dir), model_name=model_name,
                                   overwrite=overwrite_model), name="ds_model")
    wf.connect([
        (collect, train, [("idp_table", "idp_table")]),
        (collect, score, [("idp_table", "idp_table")]),
        (train, score, [("model_dir", "model_dir")]),
        (score, ds_table, [("scores", "scores")]),
        (train, ds_table, [("split", "split")]),
        (score, report, [("scores", "scores")]),
        (train, report, [("model_dir", "model_dir"), ("metrics", "metrics"),
                         ("calibration_fragment", "calibration_report")]),
        (train, install, [("model_dir", "model_dir")]),
        (ds_table, install, [("out_files", "after")]),
        (report, install, [("out_report", "after_report")]),
    ])
    return wf


def selection_name(subjects: Sequence[Mapping], model_dir, scores=None) -> str:
    """A workflow name unique to (selection, model): jobs sharing a work folder never share node folders."""
    key = json.dumps([sorted((s["participant_id"], s.get("session_id") or "") for s in subjects),
                      os.fspath(Path(model_dir).absolute()), os.fspath(scores) if scores else None])
    return f"normdiff_participant_{hashlib.sha1(key.encode()).hexdigest()[:10]}_wf"


def init_participant_wf(*, bids_dir, output_dir, model_dir, subjects: Sequence[Mapping], fs_dir=None,
                        participant_label=None, session_label=None, longitudinal=False, idps: Sequence[str],
                        covariates: CovariateSpecs | Sequence[Mapping] | None = None, n_samples=None,
                        unknown_site="error", device="auto", use_gpu=False, nprocs: int | None = None,
                        scores=None, batches: int | None = None, condition_on: Sequence[str] = (),
                        idp_table=None, reports_only: bool = False, name=None) -> pe.Workflow:
    """Participant level: score the selection against ``model_dir`` in one pass (a row's scores never
    depend on the other rows), then ``subject_outputs_*`` nodes, one per batch of rows, write each row's
    deviation table, deviation maps and report (:class:`SubjectOutputs`).

    ``subjects``: one mapping per row to write, with ``participant_id``, ``session_id`` (or None) and
    optionally ``fs_subject_dir`` (the FreeSurfer folder whose ``aparc+aseg.mgz`` the maps are painted into).
    ``nprocs``: CPU cores the scoring step may use; the batches run in parallel on one core each.
    ``batches``: how many batches (default: four per core, so that MultiProc keeps every core busy; a
    single row is one batch, the per-participant array job of HPC recipes). A row's files do not depend on
    its batch.
    ``scores``: a wide score table already computed with this model (the group level's table when both
    levels run at once): the rows are taken from it instead of being scored again, which gives the same
    numbers since a row's scores never depend on the other rows scored with it.
    ``condition_on``: IDPs the other IDPs are also scored conditionally on. ``idp_table``: the
    selection's IDP table already collected (a TSV), used instead of reading the dataset again.
    ``reports_only``: with ``scores``, only the reports are re-written (tables and maps stay).
    ``covariates``: the covariate specification, as the model needs it
    (:meth:`CovariateSpecs.for_model <normdiff_bids.covariate_spec.CovariateSpecs.for_model>`; default
    age, sex and site).
    """
    covariates = CovariateSpecs.coerce(covariates)
    wf = _workflow(name or selection_name(subjects, model_dir, scores))
    if scores is not None:
        from nipype.interfaces.utility import IdentityInterface

        score = pe.Node(IdentityInterface(fields=["scores"]), name="scored")
        score.inputs.scores = os.fspath(scores)
    else:
        collect = _collect_node(bids_dir, fs_dir, participant_label, session_label, idps, covariates,
                                longitudinal, idp_table)
        score = pe.Node(ScoreDeviations(model_dir=os.fspath(model_dir), unknown_site=unknown_site,
                                        device=device, use_gpu=use_gpu), name="score")
        _reserve(score, nprocs)
        _optional(score, n_samples=n_samples, condition_on=list(condition_on))
        wf.connect(collect, "idp_table", score, "idp_table")
    if batches is None:
        batches = 4 * (nprocs or os.cpu_count() or 1)
    for batch in subject_batches(subjects, batches):
        node = pe.Node(SubjectOutputs(output_dir=os.fspath(output_dir), model_dir=os.fspath(model_dir),
                                      subjects=[_plain(s) for s in batch], num_threads=1,
                                      reports_only=bool(reports_only), covariates=covariates.to_list()),
                       name=batch_name(batch))
        wf.connect(score, "scores", node, "scores")
    return wf


def subject_batches(subjects: Sequence[Mapping], n_batches: int) -> list[list[Mapping]]:
    """``subjects`` in at most ``n_batches`` consecutive batches of near-equal size (none empty)."""
    n = len(subjects)
    k = max(1, min(int(n_batches), n))
    bounds = [i * n // k for i in range(k + 1)]
    return [list(subjects[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _label(subject: Mapping) -> str:
    label = subject["participant_id"].removeprefix("sub-")
    session = subject.get("session_id")
    return label + (f"_{session.removeprefix('ses-')}" if session else "")


def batch_name(batch: Sequence[Mapping]) -> str:
    """``subject_outputs_<label>`` for one row, ``subject_outputs_<first>_to_<last>`` for a batch."""
    first, last = _label(batch[0]), _label(batch[-1])
    return f"subject_outputs_{first}" if len(batch) == 1 else f"subject_outputs_{first}_to_{last}"


def _plain(subject: Mapping) -> dict:
    return {"participant_id": subject["participant_id"], "session_id": subject.get("session_id") or None,
            "fs_subject_dir": os.fspath(subject["fs_subject_dir"]) if subject.get("fs_subject_dir") else None}
