"""The synthetic raw dataset passes the official BIDS validator (bids-validator-deno) with no errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from normdiff_bids.data.synthetic import write_synthetic_dataset


def _validator() -> str:
    found = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    if not Path(found).exists():
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    return found


def _validate(root: Path) -> dict:
    result = subprocess.run([_validator(), str(root), "--format", "json"], capture_output=True, text=True,
                            timeout=180)
    assert result.stdout.strip(), f"validator printed nothing; stderr: {result.stderr[-2000:]}"
    return json.loads(result.stdout)


@pytest.mark.parametrize("options", [
    {"n_subjects": 3, "patients": 0.34},
    {"n_subjects": 2, "sessions": 2, "fs_version": "6"},
], ids=["cross-sectional", "sessions"])
def test_synthetic_dataset_has_no_validator_errors(tmp_path, options):
    root = write_synthetic_dataset(tmp_path / "bids", seed=5, **options)
    report = _validate(root)
    errors = [issue for issue in report["issues"]["issues"] if issue["severity"] == "error"]
    assert errors == [], json.dumps(errors, indent=1)[:3000]
    summary = report["summary"]
    assert sorted(summary["subjects"]) == [f"{i:03d}" for i in range(1, options["n_subjects"] + 1)]
    assert len(summary["sessions"]) == options.get("sessions", 0) or options.get("sessions", 1) == 1
    assert "MRI" in {m.upper() for m in summary["modalities"]}
