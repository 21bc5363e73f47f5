"""Shared fixtures: paths to the optional real reference data, and quiet, deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Test models are tiny: a second intra-op thread only adds contention, and one thread keeps runs
# bit-reproducible across machines with different core counts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

#: Real FreeSurfer/cohort files kept beside the project (never shipped); tests using them skip when absent.
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def freesurfer_reference(reference_dir) -> Path:
    path = reference_dir / "freesurfer"
    if not path.is_dir():
        pytest.skip(f"FreeSurfer reference stats not found at {path}")
    return path
