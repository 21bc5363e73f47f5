"""Shared inputs of the product tests (interfaces, CLI, recipes): one small synthetic BIDS dataset and one
tiny trained group-level output folder per test session, cached under pytest's base temporary folder so
that every test module reuses them instead of re-creating them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

N_SUBJECTS = 40
SEED = 0
#: A few IDPs of each mapped measure keep the model tiny and still exercise every kind of map.
IDPS = ["Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle",
        "lh_superiorfrontal_thickness", "rh_superiorfrontal_thickness", "lh_insula_area"]
#: A model that trains in seconds: tiny network, few epochs, few samples per subject.
TINY_MODEL = {"backbone_config": {"hidden": 32, "n_blocks": 2}, "validation_fraction": 0.0}
#: The BIDS validator is left out (tests/test_cli_validation.py runs it): it answers first for the damaged
#: inputs whose own messages the other tests check, and costs about a second a run.
TINY_ARGS = ["--idp-set", *IDPS, "--epochs", "3", "--n-samples", "100",
             "--model-options", json.dumps(TINY_MODEL), "--nprocs", "1", "--quiet", "--skip-bids-validation"]


@contextlib.contextmanager
def _locked(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        yield


def synthetic_bids(tmp_path_factory) -> Path:
    """A synthetic BIDS dataset (40 participants, 3 sites, 20% patients) with FreeSurfer derivatives."""
    from normdiff_bids.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.getbasetemp() / "product_bids"
    with _locked(root):
        if not (root / "dataset_description.json").exists():
            write_synthetic_dataset(root, n_subjects=N_SUBJECTS, seed=SEED, patients=0.2)
    return root


def group_output(tmp_path_factory) -> Path:
    """An output folder after one tiny ``group`` run on :func:`synthetic_bids` (read it, do not change it)."""
    from normdiff_bids.cli.run import main

    bids = synthetic_bids(tmp_path_factory)
    out = tmp_path_factory.getbasetemp() / "product_group" / "normdiff"
    with _locked(out.parent):
        if not (out / "models" / "default" / "model.json").exists():
            shutil.rmtree(out.parent / "normdiff", ignore_errors=True)
            status = main([str(bids), str(out), "group", *TINY_ARGS, "--reference-query", "diagnosis == 'HC'",
                           "--work-dir", str(out.parent / "work")])
            assert status == 0, "the shared group-level run failed"
    return out


def copy_bids(tmp_path_factory, dest: Path) -> Path:
    """A private copy of the synthetic dataset to damage."""
    shutil.copytree(synthetic_bids(tmp_path_factory), dest, symlinks=True)
    return dest


def refused(capsys, argv, output_dir: Path, status: int = 2) -> str:
    """Run the CLI, check it refused cleanly and changed nothing; return its message."""
    from normdiff_bids.cli.run import main

    before = snapshot(output_dir)
    existed = output_dir.exists()
    assert main(argv) == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(output_dir) == before
    assert output_dir.exists() == existed
    return captured.err


def snapshot(folder: Path) -> dict[str, str]:
    """Each entry under ``folder`` -> kind, mode and content hash: equal snapshots mean nothing changed."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            out[rel] = f"dir {oct(info.st_mode)}"
        else:
            out[rel] = f"file {oct(info.st_mode)} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return out


def rewrite_participants(bids: Path, edit) -> None:
    """Apply ``edit(DataFrame) -> DataFrame`` to participants.tsv (values kept as written)."""
    import pandas as pd

    path = bids / "participants.tsv"
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    edit(table).to_csv(path, sep="\t", index=False)


def make_read_only(folder: Path):
    """A context manager making ``folder`` read-only, even for root (who ignores permission bits: then the
    immutable attribute is used); skips the test when neither works."""
    import subprocess

    import pytest

    @contextlib.contextmanager
    def _manager():
        mode = folder.stat().st_mode
        if os.geteuid() != 0:
            os.chmod(folder, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            try:
                yield folder
            finally:
                os.chmod(folder, mode)
            return
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
        try:
            yield folder
        finally:
            subprocess.run([chattr, "-i", str(folder)], check=True)

    return _manager()


def latest_run_record(output_dir: Path) -> dict:
    """The run record of the latest run in ``output_dir/logs``: by start, then by the ``-2``, ``-3`` ...
    suffix runs that started in the same second get (which sorts before the bare name as text)."""
    records = [json.loads(p.read_text()) for p in (Path(output_dir) / "logs").glob("run-*.json")]

    def order(record):
        stamp, _, n = record["run_id"].partition("-")
        return stamp, int(n or 1)

    return max(records, key=order)
