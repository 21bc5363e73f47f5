"""BIDS side of the inputs: labels, covariates, sessions, FreeSurfer folder discovery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from normdiff_bids.conventions import clean_label
from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.data.bids import (
    CovariateColumns,
    bids_subjects_sessions,
    find_freesurfer_dir,
    list_freesurfer_subjects,
    match_freesurfer_subject,
    read_covariates,
)
from normdiff_bids.errors import InputError


def _dataset(root: Path, participants: str, subjects=("01", "02"), sessions=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    (root / "participants.tsv").write_text(participants)
    for sub in subjects:
        for ses in sessions or [None]:
            anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            (anat / f"{stem}_T1w.nii.gz").write_bytes(b"")
    return root


@pytest.mark.parametrize("value, expected", [("01", "01"), ("sub-01", "01"), (" sub-A2 ", "A2")])
def test_clean_label_accepts_labels_with_or_without_prefix(value, expected):
    assert clean_label(value) == expected


@pytest.mark.parametrize("value", ["../x", "sub-01/anat", "a b", "sub-", "01_ses-1", ""])
def test_clean_label_rejects_paths_and_punctuation(value):
    with pytest.raises(InputError, match="not a valid BIDS label"):
        clean_label(value)


def test_subjects_and_sessions_come_from_pybids(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tage\nsub-01\t30\n", sessions=("1", "2"))
    assert bids_subjects_sessions(root) == {"sub-01": ["ses-1", "ses-2"], "sub-02": ["ses-1", "ses-2"]}


def test_covariates_with_missing_values_and_sex_spellings(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tAge\tgender\tscanner\n"
                                     "sub-01\t31.5\tfemale\tA\n02\tn/a\tM\tn/a\n")
    cov = read_covariates(root, columns=CovariateColumns(age="Age", sex="gender", site="scanner"))
    table = cov.participants
    assert list(table.columns) == ["participant_id", "age", "sex", "site"]
    assert list(table["participant_id"]) == ["sub-01", "sub-02"]
    assert table["age"].iloc[0] == 31.5 and np.isnan(table["age"].iloc[1])
    assert list(table["sex"]) == ["F", "M"]
    assert table["site"].iloc[0] == "A" and table["site"].isna().iloc[1]


def test_age_per_session_from_sessions_tsv(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tsex\nsub-01\tF\nsub-02\tM\n", sessions=("1", "2"))
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-1\t20.5\nses-2\t22\n")
    cov = read_covariates(root, bids_subjects_sessions(root), CovariateColumns(site=None))
    assert cov.sessions.to_dict("records") == [
        {"participant_id": "sub-01", "session_id": "ses-1", "age": 20.5},
        {"participant_id": "sub-01", "session_id": "ses-2", "age": 22.0}]
    assert cov.participants["age"].isna().all()  # no age column in participants.tsv, and that is fine


def test_covariate_problems_are_reported_together(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tage\tsex\nsub-01\tforty\tF\nsub-02\t30\tM\n"
                                     "sub-01\t41\tF\n")
    with pytest.raises(InputError) as err:
        read_covariates(root)
    text = str(err.value)
    assert len(err.value.problems) == 3
    assert "'sub-01' is listed more than once (lines 2, 4)" in text
    assert "line 2, column 'age': 'forty' is not a number" in text
    assert "no 'site' column for site" in text and "--site-column" in text


def test_missing_participants_tsv(tmp_path):
    root = _dataset(tmp_path / "ds", "")
    (root / "participants.tsv").unlink()
    with pytest.raises(InputError, match="participants.tsv not found"):
        read_covariates(root)


def test_freesurfer_dir_discovery_order(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\n")
    assert find_freesurfer_dir(root) is None
    smriprep = root / "derivatives" / "smriprep" / "sourcedata" / "freesurfer"
    smriprep.mkdir(parents=True)
    assert find_freesurfer_dir(root) == smriprep
    fmriprep = root / "derivatives" / "fmriprep" / "sourcedata" / "freesurfer"
    fmriprep.mkdir(parents=True)
    assert find_freesurfer_dir(root) == fmriprep
    plain = root / "derivatives" / "freesurfer"
    plain.mkdir(parents=True)
    assert find_freesurfer_dir(root) == plain
    explicit = tmp_path / "subjects"
    explicit.mkdir()
    assert find_freesurfer_dir(root, explicit) == explicit
    with pytest.raises(InputError, match="not found"):
        find_freesurfer_dir(root, tmp_path / "missing")


def test_freesurfer_folders_keep_longitudinal_apart(tmp_path):
    for name in ("fsaverage", "fsaverage5", "sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-02",
                 "sub-02_ses-1.long.sub-02_base", "lh.EC_average", "sub-03_base"):
        (tmp_path / name).mkdir()
    (tmp_path / "sub-02" / "base-tps").write_text("sub-02_ses-1\nsub-02_ses-2\n")
    (tmp_path / "README").write_text("not a folder")
    folders = list_freesurfer_subjects(tmp_path)
    assert set(folders.cross) == {("sub-01", None), ("sub-02", "ses-1"), ("sub-02", "ses-2")}
    assert set(folders.longitudinal) == {("sub-02", "ses-1")}
    assert "lh.EC_average" in folders.skipped and "sub-03_base" in folders.skipped
    assert any(s.startswith("sub-02 ") and "template" in s for s in folders.skipped)
    assert match_freesurfer_subject(folders, "sub-01", "ses-1", n_sessions=1).path.name == "sub-01"
    assert match_freesurfer_subject(folders, "sub-02", "ses-2", n_sessions=2).path.name == "sub-02_ses-2"
    long = match_freesurfer_subject(folders, "sub-02", "ses-1", n_sessions=2, longitudinal=True)
    assert long.longitudinal and long.path.name == "sub-02_ses-1.long.sub-02_base"
    assert match_freesurfer_subject(folders, "sub-02", "ses-2", n_sessions=2, longitudinal=True) is None


def test_further_covariates_are_read_by_kind_given_or_inferred(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tage\tsex\tsite\ttiv\tfield\tgroup\n"
                                     "sub-01\t30\tF\tA\t1500.5\t3\tx\nsub-02\t40\tM\tB\tn/a\t1.5\ty\n")
    spec = CovariateSpecs.from_options(covariates=["tiv", "field:categorical", "group"])
    cov = read_covariates(root, columns=spec)
    table = cov.participants
    assert list(table.columns) == ["participant_id", "age", "sex", "site", "tiv", "field", "group"]
    assert table["tiv"].iloc[0] == 1500.5 and np.isnan(table["tiv"].iloc[1])
    assert list(table["field"]) == ["3", "1.5"]  # declared categorical: kept as written
    assert cov.spec.kinds == {"age": "continuous", "sex": "categorical", "site": "categorical",
                              "tiv": "continuous", "field": "categorical", "group": "categorical"}


def test_a_further_covariate_that_is_missing_or_not_numeric_is_named_with_the_fix(tmp_path):
    root = _dataset(tmp_path / "ds", "participant_id\tage\tsex\tsite\ttiv\nsub-01\t30\tF\tA\tbig\n"
                                     "sub-02\t40\tM\tB\t1400\n")
    spec = CovariateSpecs.from_options(covariates=["tiv:continuous", "handedness"])
    with pytest.raises(InputError) as err:
        read_covariates(root, columns=spec)
    text = str(err.value)
    assert ("line 2, column 'tiv': 'big' is not a number; the covariate 'tiv' is continuous: write numbers "
            "(or n/a when unknown), or declare it with --covariate tiv:categorical") in text
    assert ("no 'handedness' column for the covariate 'handedness'; columns are ['participant_id', 'age', "
            "'sex', 'site', 'tiv'] (add the column, or leave out --covariate handedness") in text
