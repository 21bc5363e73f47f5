"""Synthetic data with a known answer: a ground-truth IDP generator and a BIDS + FreeSurfer dataset writer.

:class:`SyntheticCohort` draws FreeSurfer-like IDPs (aseg volumes, DK thickness/area/volume) conditional
on age, sex and site, and exposes the exact conditional CDF and quantiles, so calibration can be checked
against the truth. :func:`write_synthetic_dataset` writes a cohort as a valid BIDS raw dataset with a
FreeSurfer derivatives folder in the real file formats.

One module per job: ``generator`` (the ground truth; ``catalogue``, ``mixture``), ``bids_writer`` (the
dataset and its ground truth), ``freesurfer_writer`` (stats files), ``geometry`` (images and surfaces);
their fixed tables are package data under ``tables/``.
"""

from normdiff_bids.data.synthetic.bids_writer import (
    GROUND_TRUTH_DIR,
    PATIENT_SHIFTS,
    load_ground_truth,
    write_synthetic_dataset,
)
from normdiff_bids.data.synthetic.catalogue import real_idp_names
from normdiff_bids.data.synthetic.generator import SITE_SIZES, SyntheticCohort

__all__ = [
    "GROUND_TRUTH_DIR",
    "PATIENT_SHIFTS",
    "SITE_SIZES",
    "SyntheticCohort",
    "load_ground_truth",
    "real_idp_names",
    "write_synthetic_dataset",
]
