"""The whole derivatives dataset, written by the package's own writers, passes the official BIDS validator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from outputs_helpers import FakeModel, tiny_scores, write_tiny_freesurfer_subject

from normdiff_bids.outputs import names
from normdiff_bids.outputs.dataset import prepare_output_dir, write_model_card
from normdiff_bids.outputs.maps import write_deviation_maps
from normdiff_bids.outputs.reports import write_group_report, write_subject_report
from normdiff_bids.outputs.tables import scores_to_wide, write_group_table, write_subject_scores


def _validator() -> str:
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(exe).is_file():
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    return exe


def _build_derivatives(root: Path) -> Path:
    raw = root / "bids"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    tidy, cov = tiny_scores(participants=("sub-01", "sub-02"), sessions=("ses-1", "ses-2"))
    wide = scores_to_wide(tidy, cov)
    out = prepare_output_dir(raw / "derivatives" / "normdiff", raw, fs_dir=raw / "derivatives" / "freesurfer")
    model = FakeModel()
    write_subject_scores(out, tidy)
    for i, row in wide.iterrows():
        fs = raw / "derivatives" / "freesurfer" / f"{row['participant_id']}_{row['session_id']}"
        write_tiny_freesurfer_subject(fs, with_surfaces=i % 2 == 0)
        maps = write_deviation_maps(out, row, fs)
        volumes = {m: paths[0] for m, paths in maps.items() if m != "surfaces"}
        write_subject_report(out, row, model=model, maps=volumes, label_volume=fs / "mri" / "aparc+aseg.mgz",
                             n_curves=2)
    write_group_table(out, wide)
    bundle = out / names.model_dir("default")
    bundle.mkdir(parents=True)
    (bundle / "model.json").write_text(json.dumps({"format": "normdiff-bundle"}))
    (bundle / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    write_model_card(out, model.model_card())
    write_group_report(out, wide, model_card=model.model_card())
    return out


@pytest.mark.slow
def test_derivatives_pass_the_bids_validator_without_errors(tmp_path):
    exe = _validator()
    out = _build_derivatives(tmp_path)
    done = subprocess.run([exe, str(out), "--format", "json", "--datasetTypes", "derivative"],
                          capture_output=True, text=True, timeout=120)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stdout + done.stderr)[-800:]
        pytest.fail(f"no JSON from the validator (exit {done.returncode}): {tail}")
    issues = report["issues"]["issues"]
    errors = [(i["code"], i.get("location"), i.get("issueMessage", "")[:120]) for i in issues
              if i["severity"] == "error"]
    assert errors == []
    # Phenotype tables are real BIDS: only files BIDS has no name for are ignored.
    assert "phenotype" in report["summary"]["dataTypes"]
    warnings = {i["code"] for i in issues if i["severity"] == "warning"}
    assert "SIDECAR_KEY_RECOMMENDED" not in warnings and "TSV_ADDITIONAL_COLUMNS_UNDEFINED" not in warnings
