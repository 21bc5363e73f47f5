"""The input dataset is checked with the BIDS validator first: its errors stop the run in its own words
before anything is written, --skip-bids-validation lets the dataset through, and a run without the
validator goes on with a warning."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from product_helpers import TINY_ARGS, copy_bids, latest_run_record, refused, rewrite_participants

from normdiff_bids.cli.run import main, validate_dataset
from normdiff_bids.data.validation import (
    ValidatorUnavailable,
    find_validator,
    read_report,
    validate_bids,
)
from normdiff_bids.errors import InputError

#: TINY_ARGS with the validator (and its one-line summary) left in.
VALIDATED_ARGS = [a for a in TINY_ARGS if a not in ("--skip-bids-validation", "--quiet")]


@pytest.fixture(scope="module")
def validator():
    if find_validator() is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")


@pytest.fixture
def out(group_out, tmp_path):
    """A private copy of a finished group-level output folder."""
    dest = tmp_path / "derivatives" / "normdiff"
    shutil.copytree(group_out, dest)
    return dest


@pytest.fixture
def invalid_bids(tmp_path_factory, tmp_path):
    """The synthetic dataset with two validator errors: a T1w file name BIDS does not know (sub-003) and
    an age that is not a number in participants.tsv (sub-004's row, at ``invalid_bids.age_line``)."""
    damaged = copy_bids(tmp_path_factory, tmp_path / "bids")
    anat = damaged / "sub-003" / "anat"
    (anat / "sub-003_T1w.nii.gz").rename(anat / "sub-003_T1.nii.gz")
    line = {}

    def edit(table):
        table.loc[table["participant_id"] == "sub-004", "age"] = "forty"
        line["age"] = int((table["participant_id"] == "sub-004").to_numpy().argmax()) + 2  # 1 = header
        return table

    rewrite_participants(damaged, edit)
    return SimpleNamespace(path=damaged, age_line=line["age"])


def _record(out: Path) -> dict:
    return latest_run_record(out)


def test_validator_errors_stop_the_run_in_the_validators_words(validator, capsys, invalid_bids, tmp_path):
    out = tmp_path / "new" / "normdiff"
    message = refused(capsys, [str(invalid_bids.path), str(out), "group", *VALIDATED_ARGS], out)
    assert "bids-validator-deno" in message and "found 2 errors" in message
    assert "NOT_INCLUDED" in message and "/sub-003/anat/sub-003_T1.nii.gz" in message
    assert "TSV_VALUE_INCORRECT_TYPE (age)" in message
    assert f"/participants.tsv line {invalid_bids.age_line} ('forty')" in message
    assert "--skip-bids-validation" in message
    assert not (tmp_path / "new").exists()


def test_skip_bids_validation_lets_the_dataset_through(validator, capsys, invalid_bids, out):
    argv = [str(invalid_bids.path), str(out), "participant", "--participant-label", "003"]
    message = refused(capsys, [*argv, *VALIDATED_ARGS], out)  # its own file name counts against it
    assert "NOT_INCLUDED" in message and "sub-003_T1.nii.gz" in message
    assert "TSV_VALUE_INCORRECT_TYPE" not in message  # sub-004's row is not in the selection
    assert main([*argv, *TINY_ARGS]) == 0, capsys.readouterr().err
    assert (out / "sub-003" / "anat" / "sub-003_desc-deviations_scores.tsv").is_file()
    assert _record(out)["resolved"]["bids_validation"] == {"skipped": "--skip-bids-validation"}


def test_only_the_selected_participants_files_count(validator, capsys, invalid_bids, out):
    status = main([str(invalid_bids.path), str(out), "participant", "--participant-label", "001",
                   *VALIDATED_ARGS])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "bids-validator-deno" in err and "found no errors in" in err  # the one-line summary
    validation = _record(out)["resolved"]["bids_validation"]
    assert validation["errors"] == 0 and validation["ignored_outside_selection"] >= 2
    assert validation["seconds"] > 0


def test_the_synthetic_dataset_is_valid(validator, bids):
    report = validate_bids(bids)
    assert report.errors == [], report.errors[:5]
    assert report.summary().startswith("bids-validator-deno")


def test_without_the_validator_the_run_warns_and_goes_on(monkeypatch, capsys, bids, out):
    monkeypatch.setattr("normdiff_bids.data.validation.find_validator", lambda: None)
    args = [a for a in TINY_ARGS if a != "--skip-bids-validation"]
    # the run goes on to its next check, which refuses an unknown participant
    message = refused(capsys, [str(bids), str(out), "participant", "--participant-label", "999", *args], out)
    assert "warning: the input dataset was not checked with the BIDS validator" in message
    assert "bids-validator-deno is not installed" in message and "pip install bids-validator-deno" in message
    assert "sub-999" in message


@pytest.mark.parametrize("flag, reason", [("skip_bids_validation", "--skip-bids-validation"),
                                          ("reports_only", "--reports-only")])
def test_skip_and_reports_only_do_not_run_the_validator(monkeypatch, tmp_path, flag, reason):
    monkeypatch.setattr("normdiff_bids.data.validation.start_validator",
                        lambda *a, **k: pytest.fail("the validator ran"))
    opts = SimpleNamespace(skip_bids_validation=False, reports_only=False, work_dir=None, quiet=True)
    setattr(opts, flag, True)
    plan = SimpleNamespace(bids_dir=tmp_path, participant_label=None, output_dir=tmp_path / "o", fs_dir=None)
    assert validate_dataset(opts, plan) == {"skipped": reason}


def test_the_config_file_can_skip_validation(tmp_path):
    from normdiff_bids.cli.parser import parse_args

    config = tmp_path / "run.toml"
    config.write_text("skip-bids-validation = true\n")
    assert parse_args(["in", "out", "group", "--config-file", str(config)]).skip_bids_validation
    assert not parse_args(["in", "out", "group"]).skip_bids_validation


# -- the validator as a subprocess: offline, time-limited, its report read -------------------------

def _fake_validator(folder: Path, body: str) -> str:
    """An executable standing in for bids-validator-deno, running the Python ``body``."""
    path = folder / "fake-validator"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


EMPTY_REPORT = json.dumps({"issues": {"issues": [], "codeMessages": {}}, "summary": {}})

posix_only = pytest.mark.skipif(os.name != "posix", reason="the stand-in validator is a POSIX script")


@posix_only
def test_the_validator_runs_without_network(monkeypatch, tmp_path):
    seen = tmp_path / "seen.json"
    exe = _fake_validator(tmp_path, f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                                    f"open({str(seen)!r}, 'w'))\nprint({EMPTY_REPORT!r})")
    monkeypatch.setenv("BIDS_SCHEMA", "https://bids-specification.readthedocs.io/en/stable/schema.json")
    monkeypatch.setenv("NO_PROXY", "*")
    report = validate_bids(tmp_path, executable=exe)
    assert report.errors == [] and report.warnings == []
    called = json.loads(seen.read_text())
    assert called["argv"] == [str(tmp_path), "--format", "json"]  # no --schema: the bundled one
    env = called["env"]
    assert "BIDS_SCHEMA" not in env  # it would fetch a schema from the web
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        assert env[key] == "http://127.0.0.1:9"  # every request goes to a closed local port
    assert env["NO_PROXY"] == ""


@posix_only
def test_a_validator_that_hangs_is_stopped_at_the_time_limit(tmp_path):
    exe = _fake_validator(tmp_path, "time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(ValidatorUnavailable, match="did not finish within 1 s"):
        validate_bids(tmp_path, executable=exe, timeout=1)
    assert time.monotonic() - start < 20


@posix_only
def test_a_validator_without_a_report_is_named_with_its_last_words(tmp_path):
    exe = _fake_validator(tmp_path, "print('deno: cannot start'); sys.exit(3)")
    with pytest.raises(ValidatorUnavailable, match=r"failed \(exit status 3: deno: cannot start\)"):
        validate_bids(tmp_path, executable=exe)


def test_a_missing_validator_is_said_so(monkeypatch, tmp_path):
    monkeypatch.setattr("normdiff_bids.data.validation.find_validator", lambda: None)
    with pytest.raises(ValidatorUnavailable, match="not installed") as missing:
        validate_bids(tmp_path)
    assert missing.value.installed is False


def _issue(code, location=None, severity="error", **extra):
    return {"code": code, "severity": severity, **({"location": location} if location else {}), **extra}


def test_the_message_is_trimmed_to_a_readable_length(tmp_path):
    issues = [_issue("NOT_INCLUDED", f"/sub-{i:03d}/anat/sub-{i:03d}_T1.nii.gz") for i in range(1, 31)]
    issues += [_issue(f"CODE_{k:02d}", "/dataset_description.json") for k in range(12)]
    issues += [_issue("SIDECAR_KEY_RECOMMENDED", "/sub-001/anat/x.json", severity="warning")] * 7
    data = {"issues": {"issues": issues, "codeMessages": {"NOT_INCLUDED": "Files with such naming scheme "
                                                          "are not part of BIDS specification. " * 20}}}
    report = read_report(data, tmp_path)
    with pytest.raises(InputError) as refusal:
        report.raise_for_errors()
    message = str(refusal.value)
    assert "found 42 errors" in message
    assert "/sub-005/anat/sub-005_T1.nii.gz and 25 more" in message  # five files of each kind at most
    assert "/sub-006/" not in message
    assert "... and 3 more kinds of error" in message  # ten kinds at most
    assert len(message) < 3000 and max(len(line) for line in message.splitlines()) < 400
    assert "7 warnings: SIDECAR_KEY_RECOMMENDED x7" in report.summary()


def test_issues_outside_the_selection_and_the_runs_own_folders_do_not_count(tmp_path):
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-001\t30\nsub-002\tforty\n")
    issues = [
        _issue("NOT_INCLUDED", "/sub-002/anat/sub-002_T1.nii.gz"),      # another participant's file
        _issue("TSV_VALUE_INCORRECT_TYPE", "/participants.tsv", line=3, subCode="age"),  # sub-002's row
        _issue("NOT_INCLUDED", "/work/normdiff_group/x.pklz"),           # the run's own work folder
        _issue("TSV_INDEX_VALUE_NOT_UNIQUE", "/participants.tsv"),       # the whole table: counts
        _issue("NOT_INCLUDED", "/sub-001/anat/sub-001_T1.nii.gz"),       # the selected one's file: counts
        _issue("MISSING_DATASET_DESCRIPTION", affects=["/dataset_description.json"]),  # counts
    ]
    data = {"issues": {"issues": issues, "codeMessages": {}}}
    report = read_report(data, bids, participants=["001"], ignore=[bids / "work", tmp_path / "elsewhere"])
    assert [(i.code, i.location) for i in report.errors] == [
        ("TSV_INDEX_VALUE_NOT_UNIQUE", "/participants.tsv"),
        ("NOT_INCLUDED", "/sub-001/anat/sub-001_T1.nii.gz"),
        ("MISSING_DATASET_DESCRIPTION", "/dataset_description.json")]
    assert report.n_ignored == 3
    everyone = read_report(data, bids)
    assert len(everyone.errors) == len(issues) and everyone.n_ignored == 0
