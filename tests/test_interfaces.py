"""The Nipype interfaces inside a workflow written by a user (their own nodes around ours), under the
Linear and MultiProc plugins, on a small synthetic dataset with a tiny model."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe
from product_helpers import IDPS, TINY_MODEL

from normdiff_bids.errors import InputError
from normdiff_bids.interfaces import (
    CollectIDPs,
    DeviationMaps,
    NormDiffReport,
    ScoreDeviations,
    TrainNormativeModel,
)
from normdiff_bids.interfaces.model import select_reference, split_reference
from normdiff_bids.interfaces.tables import read_table


def keep_controls(idp_table, participants_tsv):
    """A user's own step: keep the healthy controls listed in participants.tsv."""
    import os

    import pandas as pd

    table = pd.read_csv(idp_table, sep="\t", dtype={"participant_id": str, "site": str, "sex": str})
    participants = pd.read_csv(participants_tsv, sep="\t", dtype=str)
    controls = set(participants.loc[participants["diagnosis"] == "HC", "participant_id"])
    out = os.path.abspath("controls.tsv")
    table[table["participant_id"].isin(controls)].to_csv(out, sep="\t", index=False, na_rep="n/a")
    return out


def count_flags(scores):
    """A user's own step after ours: how many IDPs each participant has beyond |z| > 1.96."""
    import pandas as pd

    table = pd.read_csv(scores, sep="\t", dtype={"participant_id": str})
    z = table[[c for c in table.columns if c.endswith("_z") and c != "joint_z"]]
    return dict(zip(table["participant_id"], (z.abs() > 1.96).sum(axis=1).astype(int).tolist(), strict=True))


def _user_workflow(bids, base_dir, name):
    wf = pe.Workflow(name=name, base_dir=str(base_dir))
    collect = pe.Node(CollectIDPs(bids_dir=str(bids), idp_set=IDPS), name="collect")
    controls = pe.Node(Function(input_names=["idp_table", "participants_tsv"], output_names=["table"],
                                function=keep_controls), name="keep_controls")
    controls.inputs.participants_tsv = str(bids / "participants.tsv")
    train = pe.Node(TrainNormativeModel(epochs=3, n_samples=100, seed=1, device="cpu", evaluate=False,
                                        holdout_fraction=0.1, model_options=TINY_MODEL), name="train")
    score = pe.Node(ScoreDeviations(n_samples=100, device="cpu"), name="score")
    flags = pe.Node(Function(input_names=["scores"], output_names=["counts"], function=count_flags),
                    name="count_flags")
    wf.connect([
        (collect, controls, [("idp_table", "idp_table")]),
        (controls, train, [("table", "idp_table")]),
        (collect, score, [("idp_table", "idp_table")]),
        (train, score, [("model_dir", "model_dir")]),
        (score, flags, [("scores", "scores")]),
    ])
    return wf


def _run(wf, plugin):
    args = {"n_procs": 2, "mp_context": "forkserver"} if plugin == "MultiProc" else {}
    wf.config["execution"].update({"poll_sleep_duration": 0.05, "remove_unnecessary_outputs": False})
    graph = wf.run(plugin=plugin, plugin_args=args)
    return {node.name: node.result.outputs for node in graph.nodes()}


@pytest.fixture(scope="module")
def linear_run(bids, tmp_path_factory):
    return _run(_user_workflow(bids, tmp_path_factory.mktemp("linear"), "user_wf"), "Linear")


@pytest.mark.slow
def test_user_workflow_runs_our_nodes_under_linear(linear_run, bids):
    scores = read_table(linear_run["score"].scores)
    participants = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    # everyone is scored (patients too), one row each, the columns of the contract in order
    assert sorted(scores["participant_id"]) == sorted(participants["participant_id"])
    head = ["participant_id", "age", "sex", "site", "joint_stat", "joint_centile", "joint_z", "extrapolated",
            "unknown_site", "joint_n_idps"]
    assert list(scores.columns[: len(head)]) == head
    fields = ("value", "centile", "z", "tail")
    assert list(scores.columns[len(head):]) == [f"{i}_{f}" for i in IDPS for f in fields]
    centiles = scores[[f"{i}_centile" for i in IDPS]].to_numpy()
    assert np.all((centiles > 0) & (centiles < 1))
    assert np.isfinite(scores["joint_z"]).all()
    # the user's node downstream of ours saw the same table
    counts = linear_run["count_flags"].counts
    z = scores[[f"{i}_z" for i in IDPS]].abs().to_numpy()
    assert counts == dict(zip(scores["participant_id"], (z > 1.96).sum(axis=1).tolist(), strict=True))
    # only controls trained the model: the training split lists none of the patients
    split = read_table(linear_run["train"].split)
    patients = set(participants.loc[participants["diagnosis"] != "HC", "participant_id"])
    assert patients and not patients & set(split["participant_id"])


@pytest.mark.slow
def test_user_workflow_gives_the_same_scores_under_multiproc(linear_run, bids, tmp_path):
    outputs = _run(_user_workflow(bids, tmp_path, "user_wf"), "MultiProc")
    a = read_table(linear_run["score"].scores)
    b = read_table(outputs["score"].scores)
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_maps_and_report_nodes_write_into_their_own_folders(linear_run, bids, tmp_path):
    scores = read_table(linear_run["score"].scores)
    row = scores.iloc[0]
    participant = row["participant_id"]
    fs_subject = bids / "derivatives" / "freesurfer" / participant
    wf = pe.Workflow(name="maps_wf", base_dir=str(tmp_path))
    maps = pe.Node(DeviationMaps(scores=linear_run["score"].scores, participant_id=participant,
                                 fs_subject_dir=str(fs_subject)), name="maps")
    report = pe.Node(NormDiffReport(scores=linear_run["score"].scores, participant_id=participant,
                                    model_dir=linear_run["train"].model_dir, fs_subject_dir=str(fs_subject)),
                     name="report")
    wf.connect(maps, "volume_maps", report, "volume_maps")
    outputs = _run(wf, "Linear")

    volume = next(p for p in outputs["maps"].volume_maps if "desc-volume" in p)
    assert os.path.commonpath([volume, str(tmp_path)]) == str(tmp_path)  # nothing outside the node folder
    labels = np.asarray(nib.load(fs_subject / "mri" / "aparc+aseg.mgz").dataobj)
    painted = np.asarray(nib.load(volume).dataobj)
    assert painted.shape == labels.shape
    hippocampus = labels == 17  # FreeSurfer's label of Left-Hippocampus
    np.testing.assert_allclose(painted[hippocampus], row["Left-Hippocampus_z"], rtol=1e-6)
    assert np.isnan(painted[labels == 0]).all()
    assert any(p.endswith(".func.gii") for p in outputs["maps"].surface_maps)
    html = open(outputs["report"].out_report, encoding="utf-8").read()
    assert participant in html and '<svg class="figure"' in html


def test_reference_split_is_by_participant_stratified_and_reproducible():
    rng = np.random.default_rng(0)
    rows = [{"participant_id": f"sub-{i:03d}", "session_id": f"ses-{s}", "site": f"s{i % 3}",
             "sex": "F" if i % 2 else "M", "age": float(rng.uniform(20, 80))}
            for i in range(60) for s in (1, 2)]
    table = pd.DataFrame(rows)
    train, holdout = split_reference(table, 0.2, seed=4)
    again_train, again_holdout = split_reference(table, 0.2, seed=4)
    pd.testing.assert_frame_equal(holdout, again_holdout)
    assert not set(train["participant_id"]) & set(holdout["participant_id"])  # both sessions on one side
    assert holdout["participant_id"].nunique() == 12  # 20% of 60, 2 per (site, sex) stratum
    assert holdout.groupby(["site", "sex"])["participant_id"].nunique().tolist() == [2] * 6
    _, other = split_reference(table, 0.2, seed=5)
    assert set(other["participant_id"]) != set(holdout["participant_id"])


def test_reference_selection_names_the_problem():
    table = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(30)], "age": range(30)})
    assert len(select_reference(table, participants=["1", "sub-2", *[str(i) for i in range(3, 13)]])) == 12
    with pytest.raises(InputError, match="at least 10"):
        select_reference(table, participants=["1", "2"])
    with pytest.raises(InputError, match="diagnosis"):
        select_reference(table, query="diagnosis == 'HC'")
    with pytest.raises(InputError, match="remain to train"):
        split_reference(table, 0.5, seed=0)


def test_collect_node_reports_an_unknown_participant(bids, tmp_path):
    node = pe.Node(CollectIDPs(bids_dir=str(bids), participant_label=["999"], idp_set=IDPS), name="collect",
                   base_dir=str(tmp_path))
    with pytest.raises(Exception, match="sub-999"):
        node.run()
