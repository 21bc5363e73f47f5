"""Smoke tests of the user recipes in workflows/: the embedding example runs, a SLURM array task runs
as SLURM would start it, and the Nipype SLURM plugin variant is built (not submitted)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from product_helpers import TINY_MODEL, snapshot

from normdiff_bids.outputs.tables import read_scores_table

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", WORKFLOWS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_embedding_example_runs_and_feeds_the_users_node(bids, tmp_path):
    recipe = _load("embed_in_nipype")
    wf = recipe.build_workflow(bids, reference_query="age > 0",
                               idp_set=["Left-Hippocampus", "Right-Hippocampus"], epochs=2, n_samples=50,
                               model_options=TINY_MODEL)
    wf.base_dir = str(tmp_path)
    wf.config["execution"]["poll_sleep_duration"] = 0.05
    wf.run(plugin="Linear")
    counts = pd.read_csv(tmp_path / wf.name / "count_extremes" / "extreme_counts.tsv", sep="\t")
    participants = pd.read_csv(bids / "participants.tsv", sep="\t")
    assert len(counts) == len(participants)
    assert counts["n_extreme"].between(0, 2).all()


@pytest.mark.slow
def test_slurm_array_task_scores_its_line_of_the_participant_list(bids, group_out, tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not available")
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    (tmp_path / "participants.txt").write_text("sub-009\nsub-010\n")
    before = snapshot(out)
    env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out), "SLURM_ARRAY_TASK_ID": "2",
           "PARTICIPANTS_FILE": str(tmp_path / "participants.txt"), "WORK_ROOT": str(tmp_path / "work"),
           "NORMDIFF_BIDS": str(Path(sys.executable).with_name("normdiff-bids")),
           "EXTRA_ARGS": "--n-samples 100"}
    result = subprocess.run([bash, str(WORKFLOWS / "slurm_array.sh")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "sub-010.html").is_file() and not (out / "sub-009").exists()
    table = read_scores_table(out / "sub-010" / "anat" / "sub-010_desc-deviations_scores.tsv")
    group = read_scores_table(out / "phenotype" / "normdiff_deviations.tsv").set_index("participant_id")
    assert table["z"].to_numpy() == pytest.approx(
        group.loc["sub-010", [f"{i}_z" for i in table["idp"]]].to_numpy(dtype=float), abs=1e-9)
    changed = {k for k, v in before.items() if snapshot(out).get(k) != v}
    assert changed <= {"dataset_description.json"}


def test_slurm_array_task_without_a_participant_line_fails_clearly(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not available")
    (tmp_path / "participants.txt").write_text("sub-01\n")
    env = {**os.environ, "BIDS_DIR": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "out"),
           "SLURM_ARRAY_TASK_ID": "5", "PARTICIPANTS_FILE": str(tmp_path / "participants.txt")}
    result = subprocess.run([bash, str(WORKFLOWS / "slurm_array.sh")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "line 5" in result.stderr


def test_nipype_slurm_recipe_builds_the_jobs_without_submitting(bids, group_out, tmp_path, capsys,
                                                                monkeypatch):
    recipe = _load("nipype_slurm")
    submitted = []
    monkeypatch.setattr("nipype.pipeline.engine.Workflow.run", lambda *a, **k: submitted.append(a))
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    argv = [str(bids), str(out), "--work-dir", str(tmp_path / "work"), "--participant-label", "011", "012",
            "--sbatch-args", "-p short --mem=2G", "--gpu-sbatch-args", "-p gpu --gres=gpu:1", "--dry-run"]
    wf, plugin_args, plan, dry_run = recipe.build(argv)
    assert dry_run and plugin_args["sbatch_args"] == "-p short --mem=2G"
    assert [r["participant_id"] for r in plan.rows] == ["sub-011", "sub-012"]
    score = wf.get_node("score")
    assert score.plugin_args["sbatch_args"].endswith("--gres=gpu:1") and score.inputs.use_gpu
    assert recipe.main(argv) == 0
    printed = capsys.readouterr().out
    assert "subject_outputs_011" in printed and "subject_outputs_012" in printed
    assert submitted == []  # built, never run
    assert not (out / "sub-011").exists()
