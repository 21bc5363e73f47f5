"""The synthetic BIDS dataset: visits drawn from the generator, raw data, FreeSurfer folder, ground truth."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_directory
from normdiff_bids.data.synthetic.catalogue import real_idp_names
from normdiff_bids.data.synthetic.files import write_json, write_text, write_tsv
from normdiff_bids.data.synthetic.freesurfer_writer import write_freesurfer_subject
from normdiff_bids.data.synthetic.generator import SyntheticCohort
from normdiff_bids.data.synthetic.geometry import icosphere, write_t1w

#: Where the ground truth goes: ``sourcedata/`` is outside the validator's and pybids' view.
GROUND_TRUTH_DIR = Path("sourcedata") / "groundtruth"

#: Known deviation of patients, as a shift of the normal score (so the true centile is Phi(z + shift)):
#: medial-temporal atrophy and the matching ventricular enlargement.
PATIENT_SHIFTS: dict[str, float] = {
    "*-Hippocampus": -2.5,
    "*-Amygdala": -2.0,
    "*_entorhinal_thickness": -2.0,
    "*_entorhinal_volume": -2.0,
    "*_parahippocampal_thickness": -1.5,
    "*_parahippocampal_volume": -1.5,
    "*_middletemporal_thickness": -1.0,
    "*-Inf-Lat-Vent": 2.0,
    "*-Lateral-Ventricle": 1.5,
}

#: Within-subject correlation of normal scores across sessions (longitudinal data stay coherent).
_SESSION_CORRELATION = 0.85

#: BIDS version declared by the raw dataset and the FreeSurfer derivatives folder.
_BIDS_VERSION = "1.10.0"


def write_synthetic_dataset(out_dir: str | os.PathLike, n_subjects: int = 20, seed: int = 0, *,
                            n_idps: int | None = None, n_sites: int = 3, sessions: int = 1,
                            fs_version: str = "7", patients: float = 0.0,
                            overwrite: bool = False) -> Path:
    """Write a synthetic BIDS raw dataset with a FreeSurfer derivatives folder and its ground truth.

    - ``participants.tsv`` (+ ``.json``): ``participant_id, age, sex, site, diagnosis`` (``HC``/``patient``);
      with ``sessions > 1`` the age of each visit is in ``sub-<label>/sub-<label>_sessions.tsv`` and
      ``participants.tsv`` holds the age at the first visit.
    - one tiny T1w NIfTI per subject (and session);
    - ``derivatives/freesurfer/<sub-X or sub-X_ses-Y>/``: ``stats/aseg.stats``, ``stats/brainvol.stats``,
      ``stats/?h.aparc.stats`` in the real FreeSurfer formats (FreeSurfer 6 spellings with
      ``fs_version="6"``, a per-subject mix with ``"mixed"``), ``mri/aparc+aseg.mgz`` with the real label
      ids, ``surf/?h.white`` and ``label/?h.aparc.annot``;
    - ``sourcedata/groundtruth/``: ``centiles.tsv`` (the true centile of every written value of the
      generator's first ``n_idps`` IDPs, with diagnosis) and ``generator.json`` (how to rebuild the
      generator, the patient shifts).

    Every value in the stats files comes from ``SyntheticCohort(n_idps=len(real_idp_names()), n_sites,
    seed)``, whose first ``n_idps`` IDPs are exactly ``SyntheticCohort(n_idps, n_sites, seed)``.
    Patients (a ``patients`` fraction of subjects) have the normal scores of :data:`PATIENT_SHIFTS` moved.
    The whole folder is built aside and moved into place, so a failed run leaves nothing behind.
    """
    n_subjects, sessions, n_sites = int(n_subjects), int(sessions), int(n_sites)
    catalogue = real_idp_names()
    n_idps = len(catalogue) if n_idps is None else int(n_idps)
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}")
    if not 1 <= n_idps <= len(catalogue):
        raise ValueError(f"n_idps must be between 1 and {len(catalogue)} (the aseg and DK IDPs FreeSurfer "
                         f"files can hold), got {n_idps}")
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if str(fs_version) not in ("6", "7", "mixed"):
        raise ValueError(f"fs_version must be '7', '6' or 'mixed', got {fs_version!r}")
    if not 0.0 <= float(patients) <= 1.0:
        raise ValueError(f"patients must be a fraction between 0 and 1, got {patients}")

    gen = SyntheticCohort(n_idps=len(catalogue), n_sites=n_sites, seed=seed)
    subjects = gen.sample_covariates(n_subjects, seed)
    rng = np.random.default_rng([int(seed), 7])
    n_patients = int(round(float(patients) * n_subjects))
    diagnosis = np.full(n_subjects, "HC", dtype=object)
    diagnosis[rng.choice(n_subjects, size=n_patients, replace=False)] = "patient"
    subjects["diagnosis"] = diagnosis
    # "mixed": half FreeSurfer 6, half 7, in random order (both present from two participants on).
    versions = {"6": ["6"] * n_subjects, "7": ["7"] * n_subjects,
                "mixed": list(rng.permutation(np.resize(["6", "7"], n_subjects)))}[str(fs_version)]
    subjects["fs_version"] = versions

    # One row per visit; normal scores share a subject component across visits.
    visits = subjects.loc[subjects.index.repeat(sessions)].reset_index(drop=True)
    visit_number = np.tile(np.arange(sessions), n_subjects)
    intervals = rng.uniform(1.0, 3.0, size=(n_subjects, sessions))
    intervals[:, 0] = 0.0
    visits["age"] = np.round(visits["age"].to_numpy() + np.cumsum(intervals, axis=1).ravel(), 2)
    visits["session_id"] = [f"ses-{k + 1:02d}" for k in visit_number] if sessions > 1 else None
    chol = gen._chol
    z_subject = rng.standard_normal((n_subjects, len(catalogue))) @ chol.T
    z_visit = rng.standard_normal((len(visits), len(catalogue))) @ chol.T
    z = (np.sqrt(_SESSION_CORRELATION) * np.repeat(z_subject, sessions, axis=0)
         + np.sqrt(1.0 - _SESSION_CORRELATION) * z_visit)
    shift = _patient_shift(catalogue)
    z += np.where(visits["diagnosis"].to_numpy() == "patient", 1.0, 0.0)[:, None] * shift[None, :]
    values = pd.DataFrame(gen.idps_from_normal_scores(visits, z), columns=catalogue)
    values = _round_as_written(values)
    truth = gen.cdf(pd.concat([visits[["age", "sex", "site"]], values], axis=1))[catalogue[:n_idps]]

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite, durable=False) as tmp:
        _write_raw(tmp, subjects, visits, sessions, seed)
        fs_root = tmp / "derivatives" / "freesurfer"
        write_json(fs_root / "dataset_description.json", {
            "Name": "FreeSurfer outputs of the normdiff-bids synthetic cohort",
            "BIDSVersion": _BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "normdiff-synth", "Version": __version__,
                             "Description": "Synthetic stand-in for FreeSurfer recon-all outputs "
                                            "(stats files in the real formats, small images)"}],
        })
        surfaces = icosphere(3)
        for i, visit in visits.iterrows():
            fs_label = visit["participant_id"] + (f"_{visit['session_id']}" if sessions > 1 else "")
            sub_rng = np.random.default_rng([int(seed), 8, i])
            write_freesurfer_subject(fs_root / fs_label, fs_label, values.iloc[i], visit, sub_rng, surfaces)
        gt = tmp / GROUND_TRUTH_DIR
        ids = ["participant_id"] + (["session_id"] if sessions > 1 else [])
        table = pd.concat([visits[ids + ["age", "sex", "site", "diagnosis", "fs_version"]], truth], axis=1)
        write_tsv(gt / "centiles.tsv", table, float_format="%.12g")
        write_json(gt / "generator.json", {
            "generator": "normdiff_bids.data.synthetic.SyntheticCohort",
            "seed": int(seed), "n_sites": n_sites, "n_idps": n_idps,
            "n_idps_written": len(catalogue), "idps": catalogue[:n_idps],
            "families": gen.families[:n_idps], "sessions": sessions,
            "session_correlation": _SESSION_CORRELATION, "fs_version": str(fs_version),
            "patient_fraction": float(patients),
            "patient_shifts": {k: v for k, v in PATIENT_SHIFTS.items()},
            "centiles": "centiles.tsv holds, per visit, the true conditional centile F(value | age, sex, "
                        "site) of each written value under the healthy model; patients' values were "
                        "drawn with the normal scores of patient_shifts moved",
            "package_version": __version__,
        })
    return out_dir


def load_ground_truth(bids_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Read what :func:`write_synthetic_dataset` recorded: (true centiles table, generator description).

    ``SyntheticCohort(meta["n_idps"], meta["n_sites"], meta["seed"])`` rebuilds the true model.
    """
    gt = Path(bids_dir) / GROUND_TRUTH_DIR
    table = pd.read_csv(gt / "centiles.tsv", sep="\t", dtype={"participant_id": str})
    meta = json.loads((gt / "generator.json").read_text())
    return table, meta


def _patient_shift(names: list[str]) -> np.ndarray:
    shift = np.zeros(len(names))
    for j, name in enumerate(names):
        for pattern, dz in PATIENT_SHIFTS.items():
            if fnmatch.fnmatchcase(name, pattern):
                shift[j] = dz
    return shift


def _round_as_written(values: pd.DataFrame) -> pd.DataFrame:
    """Round each IDP as FreeSurfer writes it: aseg 0.1 mm^3, area and volume 1, thickness 0.001 mm."""
    out = values.copy()
    for col in out.columns:
        decimals = 3 if col.endswith("_thickness") else (0 if col.endswith(("_area", "_volume")) else 1)
        out[col] = np.round(out[col].to_numpy(), decimals)
    return out


def _write_raw(root: Path, subjects: pd.DataFrame, visits: pd.DataFrame, sessions: int, seed: int) -> None:
    write_json(root / "dataset_description.json", {
        "Name": "normdiff-bids synthetic cohort",
        "BIDSVersion": _BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["normdiff-bids developers"],
        "GeneratedBy": [{"Name": "normdiff-synth", "Version": __version__,
                         "Description": f"normdiff-synth --n-subjects {len(subjects)} --seed {seed}"}],
    })
    write_text(root / "README", (
        "Synthetic cohort written by normdiff-synth (normdiff-bids).\n\n"
        "Covariates (age, sex, site) and FreeSurfer IDPs are drawn from a known model, so normative models\n"
        "fitted to these data can be checked against the truth. FreeSurfer-style outputs are in\n"
        "derivatives/freesurfer; the true centiles and the generator description are in\n"
        f"{GROUND_TRUTH_DIR.as_posix()}. The T1w images are tiny placeholders, not brain images.\n"
    ))
    write_text(root / "CHANGES", "1.0.0 synthetic\n  - Written by normdiff-synth.\n")
    write_tsv(root / "participants.tsv", subjects[["participant_id", "age", "sex", "site", "diagnosis"]])
    write_json(root / "participants.json", {
        "age": {"Description": "age at the first visit" if sessions > 1 else "age at the scan",
                "Units": "year"},
        "sex": {"Description": "sex of the participant", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "acquisition site (scanner)"},
        "diagnosis": {"Description": "group", "Levels": {
            "HC": "healthy control", "patient": "synthetic patient with medial-temporal atrophy"}},
    })
    for _, visit in visits.iterrows():
        sub = visit["participant_id"]
        anat = root / sub
        stem = sub
        if sessions > 1:
            anat, stem = anat / visit["session_id"], f"{sub}_{visit['session_id']}"
        write_t1w(anat / "anat" / f"{stem}_T1w.nii.gz")
    if sessions > 1:
        for sub, rows in visits.groupby("participant_id", sort=False):
            write_tsv(root / sub / f"{sub}_sessions.tsv", rows[["session_id", "age"]])
        write_json(root / "sessions.json", {"age": {"Description": "age at the visit", "Units": "year"}})
