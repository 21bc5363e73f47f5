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

from normdiff_bids.interfaces import (
    AdaptNormativeModel,
    CollectIDPs,
    DeviationMaps,
    GroupReport,
    InstallModel,
    NormDiffReport,
    ScoreDeviations,
    TrainNormativeModel,
    WriteGroupTable,
    WriteSubjectScores,
)

DEFAULT_COVARIATES = ("age", "sex", "site")


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


def _collect_node(bids_dir, fs_dir, participant_label, session_label, idp_set, age_column, sex_column,
                  site_column, longitudinal=False, name="collect_idps") -> pe.Node:
    # The dataset is re-read on every run (a dataset re-generated at the same path must not come from the
    # cache); the workflows hash files by content, so an unchanged table still lets later steps resume.
    node = pe.Node(CollectIDPs(bids_dir=os.fspath(bids_dir), idp_set=list(idp_set), age_column=age_column,
                               sex_column=sex_column, site_column=site_column,
                               longitudinal=bool(longitudinal), rescan=True), name=name)
    _optional(node, fs_dir=os.fspath(fs_dir) if fs_dir else None,
              participant_label=list(participant_label or []), session_label=list(session_label or []))
    return node


def init_group_wf(*, bids_dir, output_dir, fs_dir=None, participant_label=None, session_label=None,
                  idp_set: Sequence[str] = ("aseg",), covariates: Sequence[str] = DEFAULT_COVARIATES,
                  age_column="age", sex_column="sex", site_column="site", reference_participants=None,
                  reference_query=None, holdout_fraction=0.2, backbone="film-mlp", epochs=None,
                  n_samples=None, seed=0, device="auto", use_gpu=False, model_name="default",
                  overwrite_model=False, unknown_site="error", model_options: Mapping | None = None,
                  subject_reports: Sequence[str] = (), nprocs: int | None = None, from_model=None,
                  longitudinal=False, name="normdiff_group_wf") -> pe.Workflow:
    """Group level: collect IDPs, fit on the reference (held-out evaluation), score everyone, write
    ``phenotype/`` tables, the group report, and finally install the model under ``models/<name>``.

    The model is installed last, so a run that fails earlier leaves no model behind and can simply be
    run again (with the same ``work_dir`` it resumes from the cached nodes). ``subject_reports``: report
    names the group report links (when the participant level follows in the same run). ``nprocs``: CPU
    cores training and scoring may use (the node reserves them from MultiProc and torch uses as many).
    ``from_model``: a trained bundle to adapt to this dataset's new sites instead of training from
    scratch (:class:`AdaptNormativeModel`); the rest of the workflow is the same. ``longitudinal``: read
    FreeSurfer's ``<timepoint>.long.<template>`` folders instead of the cross-sectional ones.
    """
    wf = _workflow(name)
    collect = _collect_node(bids_dir, fs_dir, participant_label, session_label, idp_set,
                            age_column, sex_column, site_column, longitudinal)
    if from_model is None:
        train = pe.Node(TrainNormativeModel(covariates=list(covariates), holdout_fraction=holdout_fraction,
                                            backbone=backbone, seed=seed, device=device, use_gpu=use_gpu),
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
    _optional(score, n_samples=n_samples)
    ds_table = pe.Node(WriteGroupTable(output_dir=os.fspath(output_dir)), name="ds_group_table")
    report = pe.Node(GroupReport(output_dir=os.fspath(output_dir), model_name=model_name),
                     name="group_report")
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
                         ("calibration_report", "calibration_report")]),
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
                        age_column="age", sex_column="sex", site_column="site", n_samples=None,
                        unknown_site="error", device="auto", use_gpu=False, nprocs: int | None = None,
                        scores=None, name=None) -> pe.Workflow:
    """Participant level: score the selection against ``model_dir`` in one pass (a row's scores never
    depend on the other rows), then one ``single_subject_<label>[_ses-<label>]_wf`` per row writes its
    deviation table, deviation maps and report.

    ``subjects``: one mapping per row to write, with ``participant_id``, ``session_id`` (or None) and
    optionally ``fs_subject_dir`` (the FreeSurfer folder whose ``aparc+aseg.mgz`` the maps are painted into).
    ``nprocs``: CPU cores the scoring step may use; the per-subject steps run in parallel on one core each.
    ``scores``: a wide score table already computed with this model (the group level's table when both
    levels run at once): the rows are taken from it instead of being scored again, which gives the same
    numbers since a row's scores never depend on the other rows scored with it.
    """
    wf = _workflow(name or selection_name(subjects, model_dir, scores))
    if scores is not None:
        from nipype.interfaces.utility import IdentityInterface

        score = pe.Node(IdentityInterface(fields=["scores"]), name="scored")
        score.inputs.scores = os.fspath(scores)
    else:
        collect = _collect_node(bids_dir, fs_dir, participant_label, session_label, idps,
                                age_column, sex_column, site_column, longitudinal)
        score = pe.Node(ScoreDeviations(model_dir=os.fspath(model_dir), unknown_site=unknown_site,
                                        device=device, use_gpu=use_gpu), name="score")
        _reserve(score, nprocs)
        _optional(score, n_samples=n_samples)
        wf.connect(collect, "idp_table", score, "idp_table")
    for subject in subjects:
        sub_wf = init_single_subject_wf(output_dir=output_dir, model_dir=model_dir, **subject)
        wf.connect(score, "scores", sub_wf, "inputnode.scores")
    return wf


def init_single_subject_wf(*, output_dir, model_dir, participant_id: str, session_id: str | None = None,
                           fs_subject_dir=None, name=None) -> pe.Workflow:
    """One subject (and session): deviation table, deviation maps and report, from the scored table.

    Input ``inputnode.scores``: a wide score table holding (at least) this subject's row.
    """
    from nipype.interfaces.utility import IdentityInterface, Merge

    label = participant_id.removeprefix("sub-")
    if name is None:
        session = f"_{session_id.removeprefix('ses-')}" if session_id else ""
        name = f"single_subject_{label}{session}_wf"
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["scores"]), name="inputnode")
    ids = {"participant_id": participant_id}
    if session_id:
        ids["session_id"] = session_id
    ds_scores = pe.Node(WriteSubjectScores(output_dir=os.fspath(output_dir), **ids), name="ds_scores")
    maps = pe.Node(DeviationMaps(output_dir=os.fspath(output_dir), **ids), name="deviation_maps")
    report = pe.Node(NormDiffReport(output_dir=os.fspath(output_dir), model_dir=os.fspath(model_dir),
                                    num_threads=1, **ids), name="report")
    if fs_subject_dir:
        # the maps paint into this folder's aparc+aseg; the report shows its slices under them
        maps.inputs.fs_subject_dir = os.fspath(fs_subject_dir)
        report.inputs.fs_subject_dir = os.fspath(fs_subject_dir)
    written = pe.Node(Merge(2), name="written_files")
    wf.connect([
        (inputnode, ds_scores, [("scores", "scores")]),
        (inputnode, maps, [("scores", "scores")]),
        (inputnode, report, [("scores", "scores")]),
        (maps, report, [("volume_maps", "volume_maps")]),
        (ds_scores, written, [("out_files", "in1")]),
        (maps, written, [("out_files", "in2")]),
        (written, report, [("out", "files")]),
    ])
    return wf
