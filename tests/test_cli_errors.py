"""Bad inputs through the command line: a clear message naming the culprit, a non-zero exit status, no
traceback, and nothing lost (the output folder is byte-identical afterwards, no partial files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from product_helpers import (
    TINY_ARGS,
    copy_bids,
    group_output,
    make_read_only,
    rewrite_participants,
    snapshot,
    synthetic_bids,
)

from normdiff_bids.cli.run import NodeError, main, run_workflow
from normdiff_bids.errors import OutputError


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    return synthetic_bids(tmp_path_factory)


@pytest.fixture(scope="module")
def group_out(tmp_path_factory):
    return group_output(tmp_path_factory)


@pytest.fixture
def out(group_out, tmp_path):
    """A private copy of a finished group-level output folder."""
    dest = tmp_path / "derivatives" / "normdiff"
    shutil.copytree(group_out, dest)
    return dest


def refused(capsys, argv, output_dir: Path, status: int = 2) -> str:
    """Run the CLI, check it refused cleanly and changed nothing; return its message."""
    before = snapshot(output_dir)
    existed = output_dir.exists()
    assert main(argv) == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(output_dir) == before
    assert output_dir.exists() == existed
    return captured.err


def participant(bids, out, *extra, model=None):
    model = model or out / "models" / "default"
    return [str(bids), str(out), "participant", "--model", str(model), *TINY_ARGS, *extra]


def test_missing_bids_dir(capsys, tmp_path):
    out = tmp_path / "out"
    message = refused(capsys, [str(tmp_path / "no-such-dataset"), str(out), "group"], out)
    assert "no-such-dataset" in message and "not found" in message


def test_missing_bids_dir_from_a_shell_exits_non_zero_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("normdiff-bids")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "normdiff_bids.cli.run"]
    result = subprocess.run([*command, str(tmp_path / "absent"), str(tmp_path / "out"), "participant"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "absent" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", ["../x", "sub-01/../../etc", "01_02"])
def test_path_like_participant_label(capsys, bids, out, label):
    message = refused(capsys, participant(bids, out, "--participant-label", label), out)
    assert repr(label) in message and "letters and digits" in message


def test_unknown_participant_label(capsys, bids, out):
    message = refused(capsys, participant(bids, out, "--participant-label", "999"), out)
    assert "sub-999" in message


def test_model_that_is_not_a_bundle(capsys, bids, out, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    message = refused(capsys, participant(bids, out, model=not_a_model), out)
    assert "not-a-model" in message and "model.json" in message


def test_tampered_bundle(capsys, bids, out, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(out / "models" / "default", tampered)
    weights = tampered / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    message = refused(capsys, participant(bids, out, model=tampered), out)
    assert "model.safetensors" in message and "sha256" in message


def test_truncated_stats_file(capsys, bids, out, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    stats = damaged / "derivatives" / "freesurfer" / "sub-003" / "stats" / "aseg.stats"
    text = stats.read_text()
    stats.write_text(text[: len(text) // 2])
    message = refused(capsys, participant(damaged, out, "--participant-label", "003"), out)
    assert str(stats) in message or "sub-003/stats/aseg.stats" in message


def test_participants_tsv_without_age(capsys, bids, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    rewrite_participants(damaged, lambda t: t.drop(columns=["age"]))
    out = tmp_path / "out"
    message = refused(capsys, [str(damaged), str(out), "group", *TINY_ARGS], out)
    assert "participants.tsv" in message and "age" in message


def test_non_numeric_age(capsys, out, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")

    def forty(table):
        table.loc[table["participant_id"] == "sub-004", "age"] = "forty"
        return table

    rewrite_participants(damaged, forty)
    message = refused(capsys, participant(damaged, out, "--participant-label", "004"), out)
    assert "forty" in message and "participants.tsv" in message


def test_unseen_site(capsys, out, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")

    def move(table):
        table.loc[table["participant_id"] == "sub-006", "site"] = "siteX"
        return table

    rewrite_participants(damaged, move)
    message = refused(capsys, participant(damaged, out, "--participant-label", "006"), out)
    assert "siteX" in message and "marginal" in message


def test_read_only_output_folder(capsys, bids, out):
    with make_read_only(out):
        message = refused(capsys, participant(bids, out, "--participant-label", "001"), out, status=3)
    assert str(out) in message and "writable" in message


def test_output_folder_of_another_pipeline(capsys, bids, tmp_path):
    out = tmp_path / "fmriprep"
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep outputs", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.0"}]}))
    (out / "sub-001").mkdir()
    (out / "sub-001" / "notes.txt").write_text("theirs")
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS], out, status=3)
    assert "fMRIPrep" in message and "refusing" in message


def test_group_level_never_replaces_a_model_silently(capsys, bids, out):
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS], out, status=3)
    assert "--model-name" in message and "--overwrite-model" in message


def test_a_failing_node_is_reported_by_its_own_message(tmp_path):
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    def read_stats(path):
        from normdiff_bids.errors import InputError

        raise InputError([f"{path}, line 80: the file ends in the middle of the table",
                          "sub-07: stats/wmparc.stats is missing"],
                         header="FreeSurfer outputs could not be read")

    wf = pe.Workflow(name="failing_wf")
    node = pe.Node(Function(input_names=["path"], output_names=["out"], function=read_stats), name="read")
    node.inputs.path = "sub-03/stats/aseg.stats"
    wf.add_nodes([node])
    opts = type("Opts", (), {"verbose": 0, "nprocs": 1, "plugin": None, "plugin_args": None})()
    with pytest.raises(NodeError) as error:
        run_workflow(wf, opts, tmp_path)
    assert str(error.value) == (
        "FreeSurfer outputs could not be read:\n"
        "  - sub-03/stats/aseg.stats, line 80: the file ends in the middle of the table\n"
        "  - sub-07: stats/wmparc.stats is missing")
    assert error.value.exit_code == 2
    assert OutputError.exit_code == 3


@pytest.mark.slow
def test_two_participant_jobs_share_one_output_folder(bids, out):
    exe = Path(sys.executable).with_name("normdiff-bids")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "normdiff_bids.cli.run"]
    before = snapshot(out)
    work = out.parent / "work"  # one work folder for both: their node folders must not collide
    argvs = [participant(bids, out, "--participant-label", label, "--work-dir", str(work))
             for label in ("007", "008")]
    jobs = [subprocess.Popen([*command, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for argv in argvs]
    results = [(job.wait(timeout=600), job.stderr.read()) for job in jobs]
    for status, err in results:
        assert status == 0, err
    after = snapshot(out)
    lost = {k for k, v in before.items() if after.get(k) != v and k != "dataset_description.json"}
    assert lost == set()
    json.loads((out / "dataset_description.json").read_text())  # still one valid document
    for label in ("007", "008"):
        assert (out / f"sub-{label}.html").is_file()
        assert (out / f"sub-{label}" / "anat" / f"sub-{label}_desc-deviations_scores.tsv").is_file()
    assert not [p for p in out.rglob("*.tmp")]  # no partial files left


def test_an_unforeseen_failure_is_one_line_unless_asked(capsys, monkeypatch, tmp_path):
    def broken(opts, levels):
        raise KeyError("surprise")

    monkeypatch.setattr("normdiff_bids.cli.run.check_inputs", broken)
    argv = [str(tmp_path), str(tmp_path / "out"), "group"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "KeyError" in err and "-vv" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        main([*argv, "-vv"])
