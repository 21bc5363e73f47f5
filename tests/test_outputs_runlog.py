"""The run record (``logs/run-<UTC start>.json``) and the methods text (``logs/CITATION.md`` / ``.bib``):
their names, their content, and what the BIDS-App leaves there after a run that succeeded or failed."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from product_helpers import TINY_ARGS, latest_run_record

from normdiff_bids.cli.run import main
from normdiff_bids.outputs import names
from normdiff_bids.outputs.runlog import (
    RECORDED_PACKAGES,
    REFERENCES,
    RunRecord,
    citation_bibtex,
    methods_text,
    package_versions,
    write_citation,
)

STARTED = datetime(2026, 1, 2, 13, 4, 5, tzinfo=UTC)
VERSIONS = {"normdiff-bids": "9.9.9", "torch": "2.13.0", "numpy": "2.4.0", "nipype": "1.11.0",
            "pandas": "3.1.1", "python": "3.11.7"}
CARD = {"backbone": "saint", "idps": ["Left-Hippocampus", "Right-Hippocampus", "lh_insula_thickness"],
        "covariates": [{"name": "age"}, {"name": "sex"}, {"name": "site"}], "n_train": 412,
        "sampler": "dpmpp2m", "steps": 20, "n_samples": 1000,
        "location_scale": {"site_covariate": "site", "network_covariates": ["age", "sex"],
                           "site_effects": "partially pooled (empirical-Bayes random effects)"},
        "calibration": {"applied": True, "method": "split-conformal maps", "n_controls": 380},
        "adaptations": []}


def test_runs_started_in_the_same_second_get_their_own_records(tmp_path):
    first = RunRecord.start(tmp_path, {"command_line": "normdiff-bids a"}, STARTED)
    second = RunRecord.start(tmp_path, {"command_line": "normdiff-bids b"}, STARTED)
    assert first.path == tmp_path / "logs" / "run-20260102T130405Z.json"
    assert second.path == tmp_path / "logs" / "run-20260102T130405Z-2.json"
    assert second.crash_dir == tmp_path / names.run_crash_dir("20260102T130405Z-2")
    running = json.loads(first.path.read_text())
    assert running["status"] == "running" and running["start"] == "2026-01-02T13:04:05+00:00"
    first.finish("failed", 2, STARTED.replace(second=50), seconds=45.04, error="sub-01: bad",
                 failures=[{"node": "read", "message": "sub-01: bad", "crash_file": None}])
    done = json.loads(first.path.read_text())
    assert (done["status"], done["exit_code"], done["seconds"], done["end"]) == (
        "failed", 2, 45.0, "2026-01-02T13:04:50+00:00")
    assert done["failures"][0]["node"] == "read" and done["command_line"] == "normdiff-bids a"
    with pytest.raises(ValueError, match="not a UTC time stamp"):
        names.run_record_path("../x")


def test_versions_are_read_without_importing_the_packages():
    versions = package_versions()
    assert set(versions) == {*RECORDED_PACKAGES, "python"}
    assert all(isinstance(v, str) for v in versions.values())  # all of them are installed here


def test_the_methods_text_describes_the_model_and_cites_what_it_used():
    text = methods_text(CARD, VERSIONS)
    for expected in ("normdiff-bids 9.9.9", "Nipype 1.11.0 [@nipype]", "PyTorch 2.13.0 [@pytorch]",
                     "[@whitbread2026]", "[@freesurfer]", "412 reference observations",
                     "describes 3 FreeSurfer",
                     "conditional on age, sex and site", "SAINT", "given age and sex", "380 controls",
                     "1000 samples", "DPM-Solver++(2M) sampler, 20 steps", "arXiv:2602.04886",
                     "NeuroImage 62(2):774-781", "Frontiers in Neuroinformatics 5:13"):
        assert expected in text, expected
    cited = set(re.findall(r"\[@([A-Za-z0-9_]+)\]", text))
    bib = citation_bibtex("9.9.9")
    defined = set(re.findall(r"^@\w+\{([A-Za-z0-9_]+),", bib, flags=re.MULTILINE))
    assert cited == defined == {"normdiff_bids", *REFERENCES}
    assert bib.count("{") == bib.count("}")
    assert "version = {9.9.9}" in bib and "eprint = {2602.04886}" in bib
    assert "networks were trained" not in text
    pooled = methods_text({**CARD, "n_networks": 3}, VERSIONS)
    assert "3 such networks were trained with different random seeds" in pooled
    assert "joint deviation's centile was recalibrated" not in text
    layer = CARD["calibration"]
    shift = {**layer, "joint_correction": {"shift_z": 0.0312}}
    shifted = methods_text({**CARD, "calibration": shift}, VERSIONS)
    assert "in-sample bias of the dependence the network learnt from those controls (0.031 " in shifted
    checked = {**layer, "joint_correction": {"n_unseen": 75, "applied": True}}
    assert "checked on 75 controls that no part" in methods_text({**CARD, "calibration": checked}, VERSIONS)
    folded = {**layer, "joint_correction": {"method": "fold models that never saw the control", "n_folds": 5,
                                            "n_controls": 193}}
    assert "each computed under a model fitted with the same settings without that control (5-fold " in (
        methods_text({**CARD, "calibration": folded}, VERSIONS))
    unchecked = {**layer, "joint_correction": {"n_unseen": 20, "applied": False}}
    assert "joint deviation's centile" not in methods_text({**CARD, "calibration": unchecked}, VERSIONS)


def test_without_a_model_an_earlier_methods_text_is_kept(tmp_path):
    md, bib = write_citation(tmp_path, None, VERSIONS)  # nothing yet: the general text
    assert "modelled jointly" in md.read_text() and bib.is_file()
    write_citation(tmp_path, CARD, VERSIONS)
    assert write_citation(tmp_path, None, VERSIONS) == []
    assert "412 reference observations" in md.read_text()


@pytest.mark.slow
def test_a_group_run_leaves_its_record_and_methods_text(group_out):
    records = sorted((group_out / "logs").glob("run-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["status"] == "success" and record["exit_code"] == 0
    assert record["command_line"].startswith("normdiff-bids ") and " group " in record["command_line"]
    assert record["options"]["epochs"] == 3 and record["resolved"]["plugin"] == "Linear"
    assert record["resolved"]["output_dir"] == str(group_out)
    assert set(record["versions"]) >= set(RECORDED_PACKAGES)
    assert 0 < record["seconds"] < 600 and record["start"] <= record["end"]
    card = json.loads((group_out / "models" / "default_modelcard.json").read_text())
    text = (group_out / "logs" / "CITATION.md").read_text()
    assert f"describes {len(card['idps'])} FreeSurfer" in text
    assert (group_out / "logs" / "CITATION.bib").is_file()


@pytest.mark.slow
def test_a_failed_step_is_on_record_with_its_crash_report(bids, group_out, tmp_path):
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    # a FreeSurfer folder like the dataset's, with sub-003's segmentation damaged
    fs = tmp_path / "freesurfer"
    fs.mkdir()
    for subject in (bids / "derivatives" / "freesurfer").iterdir():
        if subject.name == "sub-003":
            shutil.copytree(subject, fs / subject.name)
        else:
            (fs / subject.name).symlink_to(subject, target_is_directory=subject.is_dir())
    (fs / "sub-003" / "mri" / "aparc+aseg.mgz").write_bytes(b"not an image")
    status = main([str(bids), str(out), "participant", "--participant-label", "003", "004",
                   "--fs-dir", str(fs), *TINY_ARGS])
    assert status == 2
    record = latest_run_record(out)
    assert record["status"] == "failed" and record["exit_code"] == 2
    assert "aparc+aseg.mgz cannot be read" in record["error"]
    [failure] = record["failures"]
    assert failure["node"] == "subject_outputs_003"
    crash = Path(failure["crash_file"])
    assert crash.is_file() and crash.parent == out / names.run_crash_dir(record["run_id"])
    assert (out / "sub-004.html").is_file()  # the other participant was finished
    assert not (out / "sub-003.html").exists()
