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
    latest_run_record,
    make_read_only,
    refused,
    rewrite_participants,
    snapshot,
)

from normdiff_bids.cli.run import NodeError, main, run_workflow
from normdiff_bids.errors import OutputError


@pytest.fixture
def out(group_out, tmp_path):
    """A private copy of a finished group-level output folder."""
    dest = tmp_path / "derivatives" / "normdiff"
    shutil.copytree(group_out, dest)
    return dest


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


@pytest.mark.parametrize("column, value, expected", [
    ("age", "forty", ["forty", "participants.tsv"]),      # a non-numeric age
    ("sex", "X", ["'X'", "sex"]),                          # a sex outside the model's levels
])
def test_bad_covariate_value_of_one_participant(capsys, out, tmp_path_factory, tmp_path, column, value,
                                                expected):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")

    def edit(table):
        table.loc[table["participant_id"] == "sub-004", column] = value
        return table

    rewrite_participants(damaged, edit)
    message = refused(capsys, participant(damaged, out, "--participant-label", "004"), out)
    assert all(text in message for text in expected)


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


# -- the bad-input catalogue (docs/usage.md, "When something is wrong") ------------------------------

def _rehash(bundle: Path, name: str) -> None:
    """Bring a bundle's manifest up to date with an edited file (as a careful forger would)."""
    import hashlib

    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_unsafe_reference_query_is_refused_and_runs_nothing(capsys, bids, tmp_path):
    marker = tmp_path / "FILE"
    out = tmp_path / "out"
    query = f"@pd.io.common.os.system('touch {marker}') == 0"
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS, "--reference-query", query], out)
    assert not marker.exists()
    assert "--reference-query" in message and "participants.tsv" in message and "'@'" in message
    assert "    ^" in message  # the caret under the culprit


def test_reference_query_naming_an_unknown_column(capsys, bids, tmp_path):
    out = tmp_path / "out"
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS, "--reference-query",
                               "diagnosys == 'HC'"], out)
    assert "'diagnosys'" in message and "did you mean 'diagnosis'" in message
    assert "available columns" in message


def test_hand_edited_model_json(capsys, bids, out, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(out / "models" / "default", edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["params"]["n_samples"] = 5
    (edited / "model.json").write_text(json.dumps(meta, indent=2))
    message = refused(capsys, participant(bids, out, "--participant-label", "001", model=edited), out)
    assert "model.json" in message and "edited by hand" in message
    _rehash(edited, "model.json")  # even with the checksum brought up to date, the value is checked
    message = refused(capsys, participant(bids, out, "--participant-label", "001", model=edited), out)
    assert "model.json" in message and "n_samples=5" in message


def test_bundle_of_another_format_version(capsys, bids, out, tmp_path):
    other = tmp_path / "future"
    shutil.copytree(out / "models" / "default", other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    message = refused(capsys, participant(bids, out, "--participant-label", "001", model=other), out)
    assert "manifest.json" in message and "format_version 99" in message and "upgrade" in message


def test_model_options_that_are_not_json(capsys, bids, tmp_path):
    out = tmp_path / "out"
    argv = [str(bids), str(out), "group", *TINY_ARGS, "--model-options", "{hidden: 3"]
    message = refused(capsys, argv, out)
    assert "--model-options is not valid JSON" in message


def test_model_options_naming_no_field_fail_before_any_work(capsys, monkeypatch, bids, tmp_path):
    def no_work(*args, **kwargs):
        raise AssertionError("the inputs were read although the options are invalid")

    monkeypatch.setattr("normdiff_bids.cli.checks._collect", no_work)
    out = tmp_path / "out"
    argv = [str(bids), str(out), "group", *TINY_ARGS,
            "--model-options", '{"backbone_config": {"width": 128}}']
    message = refused(capsys, argv, out)
    assert "backbone_config has no field 'width'" in message and "valid fields: hidden, n_blocks" in message
    message = refused(capsys, [*argv[:-1], '{"learning_rate": 0.1}'], out)
    assert "'learning_rate' is not a model option" in message and "lr" in message


@pytest.mark.parametrize("device", ["mps", "cuda:7"])
def test_device_this_machine_lacks_fails_up_front(capsys, monkeypatch, bids, tmp_path, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.setattr("normdiff_bids.cli.checks._collect", lambda *a, **k: pytest.fail("inputs were read"))
    out = tmp_path / "out"
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS, "--device", device], out)
    assert f"--device {device}" in message and ("--device cpu" in message or "--device auto" in message)


def test_duplicate_participants(capsys, out, tmp_path_factory, tmp_path):
    import pandas as pd

    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    rewrite_participants(damaged, lambda t: pd.concat([t, t[t["participant_id"] == "sub-002"]]))
    message = refused(capsys, participant(damaged, out, "--participant-label", "002"), out)
    assert "participants.tsv" in message and "'sub-002' is listed more than once" in message


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_value_in_a_stats_file(capsys, out, tmp_path_factory, tmp_path, bad):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    stats = damaged / "derivatives" / "freesurfer" / "sub-003" / "stats" / "aseg.stats"
    lines = stats.read_text().splitlines(keepends=True)
    row = next(i for i, line in enumerate(lines) if not line.startswith("#") and "Left-Hippocampus" in line)
    fields = lines[row].split()
    fields[3] = bad  # Volume_mm3
    lines[row] = " ".join(fields) + "\n"
    stats.write_text("".join(lines))
    message = refused(capsys, participant(damaged, out, "--participant-label", "003"), out)
    assert "sub-003/stats/aseg.stats" in message and f"line {row + 1}" in message
    assert f"'{bad}' is not a finite number" in message and "rerun" in message


def test_empty_freesurfer_subject_folder(capsys, out, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    subject = damaged / "derivatives" / "freesurfer" / "sub-005"
    shutil.rmtree(subject)
    subject.mkdir()
    message = refused(capsys, participant(damaged, out, "--participant-label", "005"), out)
    assert "sub-005" in message and "stats" in message


def test_a_participant_without_freesurfer_folder_is_named_not_dropped_silently(capsys, out, tmp_path_factory,
                                                                                tmp_path):

    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    for folder in [*damaged.glob("sub-*"), *(damaged / "derivatives" / "freesurfer").glob("sub-*")]:
        if folder.name not in ("sub-001", "sub-002", "sub-005") or folder.parent.name == "freesurfer" \
                and folder.name == "sub-005":
            shutil.rmtree(folder)  # a small dataset: 001 and 002 complete, 005 without FreeSurfer
    assert main(participant(damaged, out, "--participant-label", "001", "005")) == 2  # asked for by name
    capsys.readouterr()
    assert main(participant(damaged, out, "--participant-label", "001", "002")) == 0
    err = capsys.readouterr().err
    assert "no FreeSurfer folder" not in err  # the rows asked for all have FreeSurfer folders
    assert main(participant(damaged, out)) == 0
    err = capsys.readouterr().err
    assert "no FreeSurfer folder" in err and "sub-005" in err
    assert latest_run_record(out)["resolved"]["no_freesurfer"] == ["sub-005"]


def test_participants_tsv_with_byte_order_mark_and_crlf_is_read(capsys, out, tmp_path_factory, tmp_path):
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    path = damaged / "participants.tsv"
    text = path.read_text(encoding="utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert main(participant(damaged, out, "--participant-label", "001")) == 0, capsys.readouterr().err
    scores = out / "sub-001" / "anat" / "sub-001_desc-deviations_scores.tsv"
    assert scores.is_file() and "\r" not in scores.read_text()
    import pandas as pd

    table = pd.read_csv(scores, sep="\t")
    assert table["centile"].between(0, 1).all()


def test_condition_on_an_idp_the_model_lacks(capsys, bids, out):
    message = refused(capsys, participant(bids, out, "--condition-on", "EstimatedTotalIntraCranialVol"), out)
    assert "--condition-on names ['EstimatedTotalIntraCranialVol']" in message
    assert "--idp-set global" in message


def test_condition_on_every_idp(capsys, bids, out):
    from normdiff_bids.model.normative import load_model

    idps = load_model(out / "models" / "default").idps_
    message = refused(capsys, participant(bids, out, "--condition-on", *idps), out)
    assert "names every one of the model's" in message


@pytest.mark.parametrize("option, edit, expected", [
    ("tiv", None, "no 'tiv' column for the covariate 'tiv'; columns are"),
    ("diagnosis:continuous", None, "'HC' is not a number; the covariate 'diagnosis' is continuous"),
    ("participant_id", None, "'participant_id' is an id column of the IDP table, not a covariate"),
    ("joint_z", "joint_z", "covariate 'joint_z' (--covariate) has the name of a column of the score tables"),
    ("Left-Hippocampus", "Left-Hippocampus", "has the name of an IDP of the selection"),
    ("sex", None, "'sex' is the name of the sex covariate; choose its participants.tsv column with "
                  "--sex-column"),
])
def test_a_further_covariate_that_cannot_be_used_is_refused_naming_it(capsys, tmp_path_factory, tmp_path,
                                                                      option, edit, expected):
    bids = copy_bids(tmp_path_factory, tmp_path / "bids")
    if edit:
        rewrite_participants(bids, lambda t: t.assign(**{edit: "1"}))
    out = tmp_path / "out"
    message = refused(capsys, [str(bids), str(out), "group", *TINY_ARGS, "--covariate", option], out)
    assert expected in message


def test_a_covariate_kind_that_does_not_exist_is_a_usage_error(capsys, bids, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main([str(bids), str(tmp_path / "out"), "group", *TINY_ARGS, "--covariate", "tiv:numeric"])
    assert exit_.value.code == 2
    assert "'numeric' is not a kind; write COLUMN, COLUMN:continuous or COLUMN:categorical" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_further_covariate_the_model_lacks_is_refused_at_the_participant_level(capsys, bids, out):
    message = refused(capsys, participant(bids, out, "--participant-label", "001", "--covariate",
                                          "diagnosis"), out)
    assert ("covariate 'diagnosis' (--covariate) is not one of the model's covariates (age, sex, site); "
            "leave out --covariate diagnosis") in message


def test_a_disk_that_fills_up_mid_write_loses_nothing(capsys, monkeypatch, bids, out):
    """ENOSPC while a participant's files are written: a clear message and non-zero exit, every earlier
    output byte-identical, no partial or temporary file left."""
    import errno

    from normdiff_bids import atomic

    assert main(participant(bids, out, "--participant-label", "004")) == 0
    capsys.readouterr()
    before = snapshot(out)
    real_fsync = atomic._fsync_file

    def full_disk(path):
        if "sub-005" in Path(path).name or "sub-005" in str(Path(path).parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_fsync(path)

    monkeypatch.setattr(atomic, "_fsync_file", full_disk)
    status = main(participant(bids, out, "--participant-label", "005"))
    err = capsys.readouterr().err
    assert status == 3 and "Traceback" not in err
    assert "No space left on device while writing it" in err and "free space" in err, err
    assert "sub-005_desc-deviations_scores.tsv:" in err and ".tmp" not in err, err
    after = snapshot(out)
    changed = {k for k, v in before.items() if after.get(k) != v}
    assert changed <= {"dataset_description.json"} or all(k.startswith("logs/") for k in changed), changed
    assert not [p for p in out.rglob("*.tmp")]
    assert not [p for p in out.rglob("*sub-005*") if p.is_file() and p.stat().st_size == 0]
