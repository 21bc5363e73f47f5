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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the module: tiny networks run fastest (and most predictably on a shared
    machine) that way."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cohort():
    """A small synthetic cohort with known centiles (3 IDPs, 2 sites); modules that need another size
    define their own ``cohort``."""
    from normdiff_bids.data.synthetic import SyntheticCohort

    return SyntheticCohort(n_idps=3, n_sites=2, seed=0)


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    """The shared synthetic BIDS dataset of the end-to-end tests (see ``product_helpers``)."""
    from product_helpers import synthetic_bids

    return synthetic_bids(tmp_path_factory)


@pytest.fixture(scope="module")
def group_out(tmp_path_factory):
    """The shared output folder after one tiny ``group`` run (read it, do not change it)."""
    from product_helpers import group_output

    return group_output(tmp_path_factory)
