"""The HPC recipes on a real scheduler: three participants scored through ``workflows/slurm_array.sh``
(``sbatch --array``) and through ``workflows/nipype_slurm.py`` (Nipype's SLURM plugin) get score tables
byte-identical to a local run. Skips unless a SLURM controller answers (``.ci/slurm.sh start`` runs a
one-node SLURM on this machine; ``.ci/run`` does so before the tests)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normdiff_bids.cli.run import main

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
LABELS = ["003", "017", "031"]
#: The tiny model of the shared group output scores fast; the same options for every run.
SCORE_ARGS = ["--n-samples", "100", "--quiet"]
#: Small requests fit the test node (2 CPUs, 1000 MB), and one CPU a job lets two run at once.
SBATCH_ARGS = ["--mem=400M", "--cpus-per-task=1", "--time=00:05:00"]
#: The jobs run this interpreter: the recipes' command, and Nipype's batch scripts (sys.executable).
NORMDIFF_BIDS = f"{sys.executable} -m normdiff_bids.cli.run"
JOB_TIMEOUT = 240

pytestmark = pytest.mark.slow


def _controller_answers() -> str | None:
    """None when ``scontrol ping`` reaches a controller, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "the SLURM client commands (sbatch, scontrol) are not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if ping.returncode or "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        return f"scontrol ping: {said[-1] if said else f'exit {ping.returncode}'}"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _controller_answers()
    if reason:
        pytest.skip(f"no SLURM controller answers ({reason}; SLURM_CONF={os.environ.get('SLURM_CONF')}); "
                    f"start one with `.ci/slurm.sh start` and source the env file it names")


def _scores(out: Path) -> dict[str, bytes]:
    """Each participant's score table under ``out`` -> its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("sub-*/**/*_scores.tsv"))}


@pytest.fixture(scope="module")
def local_scores(slurm, bids, group_out, tmp_path_factory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("slurm_local")
    out = shutil.copytree(group_out, base / "normdiff")
    status = main([str(bids), str(out), "participant", "--participant-label", *LABELS,
                   "--work-dir", str(base / "work"), "--nprocs", "1", *SCORE_ARGS])
    assert status == 0, "the local participant-level run failed"
    scores = _scores(out)
    assert len(scores) == len(LABELS)
    return scores


def _run_job(args: list[str], env: dict, log_dir: Path) -> None:
    """Submit ``sbatch args``, wait until the job (every task of an array) has left the queue, and fail
    with the task logs unless every task completed; a job still queued after JOB_TIMEOUT is cancelled.
    ``squeue`` is polled each second: ``sbatch --wait`` backs off to half a minute between its checks."""
    submit = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=log_dir, capture_output=True,
                            text=True, timeout=30)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT
    while subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True,
                         timeout=30).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], check=False)
            pytest.fail(f"SLURM job {job} did not finish within {JOB_TIMEOUT} s")
        time.sleep(1)
    tasks = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                           timeout=30).stdout.splitlines()
    states = [(re.search(r"\bJobState=(\S+)", t).group(1), re.search(r"\bExitCode=(\S+)", t).group(1))
              for t in tasks]
    if not states or any(s != ("COMPLETED", "0:0") for s in states):
        logs = "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(log_dir.glob("*.log")))
        pytest.fail(f"SLURM job {job}: tasks ended {states}\n{logs}")


def _cancel_jobs_under(folder: Path) -> None:
    """Cancel the queued jobs whose batch script lies under ``folder`` (Nipype's, which it names itself)."""
    queue = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True, timeout=30)
    jobs = [job for job, _, script in (line.partition("|") for line in queue.stdout.splitlines())
            if script.startswith(f"{folder}{os.sep}")]
    if jobs:
        subprocess.run(["scancel", *jobs], check=False)


def test_array_recipe_scores_like_a_local_run(slurm, bids, group_out, local_scores, tmp_path):
    out = shutil.copytree(group_out, tmp_path / "normdiff")
    (tmp_path / "participants.txt").write_text("".join(f"sub-{label}\n" for label in LABELS))
    env = {**os.environ, "BIDS_DIR": str(bids), "OUTPUT_DIR": str(out),
           "PARTICIPANTS_FILE": str(tmp_path / "participants.txt"), "WORK_ROOT": str(tmp_path / "work"),
           "NORMDIFF_BIDS": NORMDIFF_BIDS, "EXTRA_ARGS": " ".join(SCORE_ARGS)}
    _run_job([f"--array=1-{len(LABELS)}", *SBATCH_ARGS, "--output", str(tmp_path / "task-%a.log"),
              str(WORKFLOWS / "slurm_array.sh")], env, tmp_path)
    assert _scores(out) == local_scores


def test_nipype_plugin_recipe_scores_like_a_local_run(slurm, bids, group_out, local_scores, tmp_path):
    out = shutil.copytree(group_out, tmp_path / "normdiff")
    work = tmp_path / "work"
    try:
        result = subprocess.run(
            [sys.executable, str(WORKFLOWS / "nipype_slurm.py"), str(bids), str(out), "--work-dir", str(work),
             "--participant-label", *LABELS, "--sbatch-args", " ".join(SBATCH_ARGS), *SCORE_ARGS],
            capture_output=True, text=True, timeout=JOB_TIMEOUT, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        _cancel_jobs_under(work)
        pytest.fail(f"the Nipype SLURM run did not finish within {JOB_TIMEOUT} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _scores(out) == local_scores


@pytest.mark.parametrize(("extra", "threads"), [
    ([], 3),
    (["--gpu-sbatch-args", "--gres=gpu:1 --cpus-per-task=8"], 8),  # the scoring job's own request
    (["--omp-nthreads", "2"], 2),  # the user's choice wins
], ids=["sbatch-args", "gpu-sbatch-args", "omp-nthreads"])
def test_nipype_plugin_jobs_use_the_cpus_they_ask_for(bids, group_out, tmp_path, extra, threads):
    """Torch in the scoring job gets the job's ``--cpus-per-task``, not the cores of the host that submits
    (no scheduler needed: the workflow is only built)."""
    spec = importlib.util.spec_from_file_location("recipe_nipype_slurm", WORKFLOWS / "nipype_slurm.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    wf = recipe.build([str(bids), str(group_out), "--work-dir", str(tmp_path / "work"),
                       "--participant-label", "003", "--sbatch-args", "--mem=1G -c 3", *extra])[0]
    score = wf.get_node("score")
    assert (score.inputs.num_threads, score.n_procs) == (threads, threads)
