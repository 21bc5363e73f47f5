"""Workflow builders: the graphs the BIDS-App runs, built (not run) and inspected."""

from __future__ import annotations

import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, TraitedSpec

from normdiff_bids import interfaces
from normdiff_bids.pipeline import init_group_wf, init_participant_wf, selection_name, subject_batches

SUBJECTS = [
    {"participant_id": "sub-01", "session_id": None, "fs_subject_dir": None},
    {"participant_id": "sub-02", "session_id": "ses-1", "fs_subject_dir": None},
    {"participant_id": "sub-02", "session_id": "ses-2", "fs_subject_dir": None},
]


def _edges(wf):
    """(a, b) for every pair of nodes where b runs after a, and the nodes by full name."""
    import networkx as nx

    graph = wf._create_flat_graph()
    closure = nx.transitive_closure_dag(graph)
    return {(u.fullname, v.fullname) for u, v in closure.edges()}, {n.fullname: n for n in graph.nodes()}


def test_group_wf_trains_scores_writes_and_installs_the_model_last(tmp_path):
    wf = init_group_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", reference_participants=["sub-01"],
                       epochs=3, n_samples=100, model_name="m1", use_gpu=True,
                       subject_reports=["sub-01.html"])
    edges, nodes = _edges(wf)
    name = wf.name
    assert {f"{name}.{n}" for n in ("collect_idps", "train_model", "score_all", "ds_group_table",
                                    "group_report", "ds_model")} == set(nodes)
    assert (f"{name}.collect_idps", f"{name}.train_model") in edges
    assert (f"{name}.train_model", f"{name}.score_all") in edges
    # the model is published only after every other output is written
    assert (f"{name}.ds_group_table", f"{name}.ds_model") in edges
    assert (f"{name}.group_report", f"{name}.ds_model") in edges
    train = nodes[f"{name}.train_model"]
    assert train.inputs.epochs == 3 and train.inputs.reference_participants == ["sub-01"]
    assert train.is_gpu_node() and nodes[f"{name}.score_all"].is_gpu_node()
    assert nodes[f"{name}.ds_model"].inputs.model_name == "m1"
    assert nodes[f"{name}.group_report"].inputs.subject_reports == ["sub-01.html"]


def test_participant_wf_scores_once_and_writes_the_rows_in_batches(tmp_path):
    (tmp_path / "model").mkdir()
    wf = init_participant_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", model_dir=tmp_path / "model",
                             subjects=SUBJECTS, idps=["Left-Hippocampus"], n_samples=50, batches=2)
    edges, nodes = _edges(wf)
    scores = [n for n in nodes if n.endswith(".score")]
    assert len(scores) == 1
    assert not nodes[scores[0]].is_gpu_node()
    batches = sorted(n for n in nodes if ".subject_outputs_" in n)
    assert batches == [f"{wf.name}.subject_outputs_01", f"{wf.name}.subject_outputs_02_1_to_02_2"]
    written = [row for b in batches for row in nodes[b].inputs.subjects]
    assert [(r["participant_id"], r["session_id"]) for r in written] == \
        [(s["participant_id"], s["session_id"]) for s in SUBJECTS]  # every row once, in order
    for batch in batches:
        assert (scores[0], batch) in edges
    assert nodes[f"{wf.name}.collect_idps"].inputs.idp_set == ["Left-Hippocampus"]


def test_one_participant_is_one_batch_and_batches_cover_every_row(tmp_path):
    (tmp_path / "model").mkdir()
    wf = init_participant_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", model_dir=tmp_path / "model",
                             subjects=SUBJECTS[:1], idps=["Left-Hippocampus"], nprocs=4)
    _, nodes = _edges(wf)
    assert [n for n in nodes if ".subject_outputs_" in n] == [f"{wf.name}.subject_outputs_01"]
    rows = [{"participant_id": f"sub-{i:03d}"} for i in range(10)]
    for k in (1, 3, 4, 10, 25):
        parts = subject_batches(rows, k)
        assert [r for p in parts for r in p] == rows and all(parts)
        assert len(parts) == min(k, 10) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_jobs_with_different_selections_never_share_work_folders(tmp_path):
    one = selection_name(SUBJECTS[:1], tmp_path / "model")
    two = selection_name(SUBJECTS[1:], tmp_path / "model")
    assert one != two
    assert one == selection_name(list(SUBJECTS[:1]), tmp_path / "model")
    assert selection_name(SUBJECTS[:1], tmp_path / "other") != one


@pytest.mark.parametrize("name", interfaces.__all__)
def test_every_interface_trait_is_documented(name):
    interface = getattr(interfaces, name)
    base = set(BaseInterfaceInputSpec().trait_names()) | set(TraitedSpec().trait_names())
    for spec in (interface.input_spec(), interface.output_spec()):
        own = [t for t in spec.trait_names() if t not in base]
        assert own
        for trait in own:
            assert spec.trait(trait).desc, f"{name}.{trait} has no desc"


def test_participant_wf_can_take_rows_already_scored(tmp_path):
    (tmp_path / "model").mkdir()
    scores = tmp_path / "scores.tsv"
    scores.write_text("participant_id\n")
    wf = init_participant_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", model_dir=tmp_path / "model",
                             subjects=SUBJECTS[:1], idps=["Left-Hippocampus"], scores=scores)
    _, nodes = _edges(wf)
    assert not [n for n in nodes if n.endswith((".score", ".collect_idps"))]  # nothing is scored again
    assert nodes[f"{wf.name}.scored"].inputs.scores == str(scores)
    assert wf.name != selection_name(SUBJECTS[:1], tmp_path / "model")


def test_one_covariate_specification_reaches_every_node_that_reads_models_or_describes_covariates(tmp_path):
    from normdiff_bids.covariate_spec import CovariateSpecs

    spec = CovariateSpecs.from_options(age_column="Age", site_column="none",
                                       covariates=["tiv:continuous", "field:categorical"])
    wf = init_group_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", covariates=spec)
    _, nodes = _edges(wf)
    for node in ("collect_idps", "train_model", "ds_group_table", "group_report"):
        assert CovariateSpecs.from_list(nodes[f"{wf.name}.{node}"].inputs.covariates) == spec, node
    (tmp_path / "model").mkdir()
    wf = init_participant_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", model_dir=tmp_path / "model",
                             subjects=SUBJECTS, idps=["Left-Hippocampus"], covariates=spec.to_list())
    _, nodes = _edges(wf)
    writers = [n for n in nodes if ".subject_outputs_" in n]
    for node in [f"{wf.name}.collect_idps", *writers]:
        assert CovariateSpecs.from_list(nodes[node].inputs.covariates) == spec, node


def test_the_training_node_takes_names_or_a_specification():
    from normdiff_bids.covariate_spec import CovariateSpecs
    from normdiff_bids.interfaces.model import covariate_settings

    assert covariate_settings(["age", "sex"]) == (["age", "sex"], None)
    spec = CovariateSpecs.from_options(covariates=["tiv"])
    assert covariate_settings(spec.to_list()) == (["age", "sex", "site", "tiv"], spec)
    assert interfaces.TrainNormativeModel(covariates=["age", "sex"]).inputs.covariates == ["age", "sex"]
    assert interfaces.TrainNormativeModel(covariates=spec.to_list()).inputs.covariates == spec.to_list()


def test_the_group_report_embeds_the_calibration_fragment_not_a_page(tmp_path):
    wf = init_group_wf(bids_dir=tmp_path, output_dir=tmp_path / "out", reference_participants=["sub-01"])
    graph = wf._create_flat_graph()
    links = [(u.name, v.name, c) for u, v, data in graph.edges(data=True) for c in data["connect"]]
    assert ("train_model", "group_report", ("calibration_fragment", "calibration_report")) in links
