"""The IDP table: collecting a synthetic BIDS dataset, IDP selection, and the bad-input catalogue."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from normdiff_bids.covariate_spec import CovariateSpecs
from normdiff_bids.data.atlases import DK_REGIONS
from normdiff_bids.data.idps import ASEG_ALWAYS_ZERO, IDP_SETS, collect_idps, select_idps
from normdiff_bids.data.synthetic import SyntheticCohort, load_ground_truth, write_synthetic_dataset
from normdiff_bids.errors import InputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idps") / "bids"
    write_synthetic_dataset(root, n_subjects=5, seed=11, n_idps=30, fs_version="mixed", patients=0.4)
    return root


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("idps_long") / "bids"
    write_synthetic_dataset(root, n_subjects=3, seed=12, sessions=2)
    return root


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    target = tmp_path / "bids"
    shutil.copytree(dataset, target)
    return target


def test_round_trip_generator_writer_reader(dataset):
    """Values read back equal the generator's draws to the written precision, so the truth holds."""
    truth, meta = load_ground_truth(dataset)
    gen = SyntheticCohort(n_idps=meta["n_idps"], n_sites=meta["n_sites"], seed=meta["seed"])
    table, report = collect_idps(dataset, idp_set=gen.idps)
    assert list(table.columns) == ["participant_id", "age", "sex", "site", *gen.idps]
    assert report["missing_idps"] == {} and report["no_freesurfer"] == []
    merged = truth[["participant_id"]].merge(table, on="participant_id")
    centiles = gen.cdf(merged)
    np.testing.assert_allclose(centiles.to_numpy(), truth[gen.idps].to_numpy(), atol=1e-9)
    # patients carry the known deviation: low hippocampal centiles
    patients = truth["diagnosis"] == "patient"
    assert patients.sum() == 2
    assert (truth.loc[patients, "Left-Hippocampus"] < truth.loc[~patients, "Left-Hippocampus"].min()).all()


def test_table_shape_names_and_report(dataset):
    table, report = collect_idps(dataset, idp_set="aseg,global", participant_label=["001", "sub-003"])
    assert list(table["participant_id"]) == ["sub-001", "sub-003"]
    aseg = [c for c in IDP_SETS["aseg"]]
    assert list(table.columns[4:4 + len(aseg)]) == aseg
    assert not set(ASEG_ALWAYS_ZERO) & set(table.columns)
    assert "EstimatedTotalIntraCranialVol" in table.columns and "lh_MeanThickness_thickness" in table.columns
    assert all(pd.api.types.is_float_dtype(table[c]) for c in table.columns[4:])
    assert table["sex"].isin(["F", "M"]).all()
    assert set(report["fs_versions"]) == {"sub-001", "sub-003"}
    assert report["idps"] == list(table.columns[4:])


def test_idp_selection_sets_globs_and_names():
    available = ([f"{h}_{r}_{m}" for h in ("lh", "rh") for r in DK_REGIONS for m in ("thickness", "area")]
                 + ["Left-Hippocampus", "Right-Hippocampus", "EstimatedTotalIntraCranialVol"])
    assert select_idps("aparc-thickness", available) == [f"{h}_{r}_thickness" for h in ("lh", "rh")
                                                         for r in DK_REGIONS]
    assert select_idps(["*-Hippocampus", "lh_insula_area"], available) == [
        "Left-Hippocampus", "Right-Hippocampus", "lh_insula_area"]
    assert select_idps("aseg, aseg", available) == ["Left-Hippocampus", "Right-Hippocampus"]
    with pytest.raises(InputError) as err:
        select_idps("Left-Hipocampus,a2009s-thickness,zz_*", available)
    assert len(err.value.problems) == 3
    assert "closest: ['Left-Hippocampus'" in err.value.problems[0]
    assert "a2009s-thickness" in err.value.problems[1] and "zz_*" in err.value.problems[2]


def test_sessions_give_one_row_per_visit_with_per_visit_age(longitudinal):
    table, _ = collect_idps(longitudinal, idp_set="Left-Hippocampus", session_label=["02"])
    assert list(table.columns[:2]) == ["participant_id", "session_id"]
    assert list(table["session_id"]) == ["ses-02"] * 3
    sessions = pd.read_csv(longitudinal / "sub-001" / "sub-001_sessions.tsv", sep="\t")
    assert table["age"].iloc[0] == sessions.loc[sessions["session_id"] == "ses-02", "age"].item()
    full, _ = collect_idps(longitudinal, idp_set="Left-Hippocampus")
    assert len(full) == 6


def test_longitudinal_folders_are_not_mixed_with_cross_sectional(longitudinal, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(longitudinal, root)
    fs = root / "derivatives" / "freesurfer"
    shutil.copytree(fs / "sub-001_ses-01", fs / "sub-001_ses-01.long.sub-001_base")
    table, report = collect_idps(root, idp_set="aseg")
    assert len(table) == 6 and report["ignored_folders"] == ["sub-001_ses-01.long.sub-001_base"]
    long_table, long_report = collect_idps(root, idp_set="aseg", longitudinal=True)
    assert list(long_table["participant_id"]) == ["sub-001"] and len(long_report["no_freesurfer"]) == 5


def test_missing_stats_file_is_reported_not_fatal(copy):
    (copy / "derivatives" / "freesurfer" / "sub-002" / "stats" / "lh.aparc.stats").unlink()
    shutil.rmtree(copy / "derivatives" / "freesurfer" / "sub-004")
    table, report = collect_idps(copy, idp_set="aseg,aparc-thickness")
    assert report["no_freesurfer"] == ["sub-004"]
    assert len(report["missing_idps"]["sub-002"]) == len(DK_REGIONS)
    assert table.loc[table["participant_id"] == "sub-002", "lh_insula_thickness"].isna().all()
    assert report["missing_idps_count"]["lh_insula_thickness"] == 1


def test_bad_inputs_of_a_cohort_are_reported_together(copy):
    fs = copy / "derivatives" / "freesurfer"
    aseg = fs / "sub-001" / "stats" / "aseg.stats"
    aseg.write_text(aseg.read_text()[:-300])
    (fs / "sub-002" / "stats" / "lh.aparc.stats").write_text("# nothing here\n")
    participants = copy / "participants.tsv"
    lines = participants.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split("\t")[1], "old")
    lines.append(lines[5])
    participants.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        collect_idps(copy, idp_set="aseg,aparc-area")
    text = str(err.value)
    assert "'sub-005' is listed more than once" in text
    assert "line 4, column 'age': 'old' is not a number" in text
    assert "sub-001:" in text and "aseg.stats" in text and "truncated" in text
    assert "sub-002:" in text and "lh.aparc.stats" in text
    assert len(err.value.problems) == 4


@pytest.mark.parametrize("change, expected", [
    (lambda root: (root / "participants.tsv").unlink(), "participants.tsv not found"),
    (lambda root: (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-001\t3\tF\n"),
     "no 'site' column"),
    (lambda root: shutil.move(root / "derivatives" / "freesurfer", root / "elsewhere"),
     "no FreeSurfer folder found"),
])
def test_missing_inputs(copy, change, expected):
    change(copy)
    with pytest.raises(InputError, match=expected):
        collect_idps(copy)


def test_freesurfer_folder_matching_no_bids_subject(copy, tmp_path):
    other = tmp_path / "subjects"
    (other / "sub-999").mkdir(parents=True)
    (other / "fsaverage").mkdir()
    with pytest.raises(InputError, match="has no subject matching the BIDS subjects"):
        collect_idps(copy, fs_dir=other)


def test_labels_are_checked(dataset):
    with pytest.raises(InputError) as err:
        collect_idps(dataset, participant_label=["../x", "sub-01/anat"])
    assert len(err.value.problems) == 2 and "not a valid BIDS label" in str(err.value)
    with pytest.raises(InputError, match="participant label '042': no sub-042") as err:
        collect_idps(dataset, participant_label=["042"])
    assert len(err.value.problems) == 1, "an unknown label is one problem, not a cascade"


def test_a_bad_row_of_another_participant_does_not_block_a_selection(copy):
    participants = copy / "participants.tsv"
    lines = participants.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split("\t")[1], "old")  # sub-003's age
    participants.write_text("\n".join(lines) + "\n")
    table, _ = collect_idps(copy, participant_label=["001"], idp_set="aseg")
    assert list(table["participant_id"]) == ["sub-001"] and table["age"].notna().all()
    with pytest.raises(InputError, match="line 4, column 'age': 'old' is not a number"):
        collect_idps(copy, participant_label=["003"], idp_set="aseg")


def test_custom_covariate_columns_and_no_site(copy):
    table = pd.read_csv(copy / "participants.tsv", sep="\t")
    table.rename(columns={"age": "Age", "sex": "gender"}).to_csv(copy / "participants.tsv", sep="\t",
                                                                 index=False)
    out, _ = collect_idps(copy, idp_set="Left-Hippocampus", age_column="Age", sex_column="gender",
                          site_column=None)
    assert list(out.columns) == ["participant_id", "age", "sex", "Left-Hippocampus"]
    np.testing.assert_allclose(out["age"], table["age"])


def test_further_covariates_join_the_table_under_their_names(copy):
    rows = pd.read_csv(copy / "participants.tsv", sep="\t", dtype=str)
    rows["tiv"] = [str(1400 + 10 * i) for i in range(len(rows))]
    rows["Left-Hippocampus"] = "1"
    rows.to_csv(copy / "participants.tsv", sep="\t", index=False)
    spec = CovariateSpecs.from_options(covariates=["tiv"])
    out, report = collect_idps(copy, idp_set="Left-Hippocampus", covariates=spec)
    assert list(out.columns) == ["participant_id", "age", "sex", "site", "tiv", "Left-Hippocampus"]
    assert out["tiv"].dtype == float and out["tiv"].iloc[0] == 1400
    assert CovariateSpecs.from_list(report["covariates"]).kinds["tiv"] == "continuous"
    with pytest.raises(InputError, match="covariate 'Left-Hippocampus' .* has the name of an IDP of the "
                                         "selection"):
        collect_idps(copy, idp_set="Left-Hippocampus",
                     covariates=CovariateSpecs.from_options(covariates=["Left-Hippocampus"]))
    with pytest.raises(InputError, match="either as age_column/sex_column/site_column .* or as covariates="):
        collect_idps(copy, idp_set="Left-Hippocampus", age_column="Age", covariates=spec)
