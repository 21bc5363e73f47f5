"""Longitudinal data end to end: ``group participant`` on a two-session dataset whose FreeSurfer folder holds
both the cross-sectional runs and the longitudinal stream (``<timepoint>.long.<template>``), read with
``--longitudinal``; one phenotype table per session, every visit's files, and a valid derivatives dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from product_helpers import IDPS, TINY_MODEL

from normdiff_bids.cli.parser import build_parser
from normdiff_bids.cli.run import check_inputs, group_workflow, main, subject_rows
from normdiff_bids.data.idps import collect_idps
from normdiff_bids.errors import InputError
from normdiff_bids.outputs.tables import read_group_table, read_scores_table

N_SUBJECTS = 14  # 28 visits: enough training rows once a fifth of the participants is held out
SESSIONS = ("ses-01", "ses-02")
ARGS = ["--idp-set", *IDPS, "--epochs", "3", "--n-samples", "50", "--model-options", json.dumps(TINY_MODEL),
        "--nprocs", "1", "--quiet"]


def _add_longitudinal_stream(bids: Path, other: Path) -> None:
    """Put ``other``'s FreeSurfer runs into ``bids``'s FreeSurfer folder as the longitudinal stream
    (``sub-X_ses-Y.long.sub-X``, with a ``sub-X`` template): same people and visits, other values."""
    fs = bids / "derivatives" / "freesurfer"
    for run in sorted((other / "derivatives" / "freesurfer").glob("sub-*_ses-*")):
        participant = run.name.split("_")[0]
        shutil.copytree(run, fs / f"{run.name}.long.{participant}")
        (fs / participant).mkdir(exist_ok=True)
        (fs / participant / "base-tps").write_text("\n".join(s for s in SESSIONS) + "\n")


@pytest.fixture(scope="module")
def long_bids(tmp_path_factory) -> Path:
    from normdiff_bids.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("longitudinal")
    bids = write_synthetic_dataset(root / "bids", n_subjects=N_SUBJECTS, seed=1, sessions=2)
    other = write_synthetic_dataset(root / "other", n_subjects=N_SUBJECTS, seed=2, sessions=2)
    _add_longitudinal_stream(bids, other)
    return bids


@pytest.fixture(scope="module")
def long_out(long_bids) -> Path:
    out = long_bids / "derivatives" / "normdiff"
    status = main([str(long_bids), str(out), "group", "participant", "--longitudinal", *ARGS,
                   "--work-dir", str(long_bids.parent / "work")])
    assert status == 0
    return out


def _visits(bids: Path) -> list[tuple[str, str]]:
    participants = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)["participant_id"]
    return [(p, s) for p in sorted(participants) for s in SESSIONS]


@pytest.mark.slow
def test_group_tables_are_one_phenotype_file_per_session(long_out, long_bids):
    phenotype = long_out / "phenotype"
    assert not (phenotype / "normdiff_deviations.tsv").exists()
    for session in SESSIONS:
        for name in ("normdiff_deviations", "normdiff_reference"):
            table = read_scores_table(phenotype / f"{name}_{session}.tsv")
            assert (phenotype / f"{name}_{session}.json").is_file()
            assert list(table.columns[:2]) == ["participant_id", "session_id"]
            assert set(table["session_id"]) == {session}
            assert table["participant_id"].is_unique and len(table) == N_SUBJECTS
    reference = pd.concat([read_scores_table(phenotype / f"normdiff_reference_{s}.tsv") for s in SESSIONS])
    # all visits of a participant are on one side of the split
    assert (reference.groupby("participant_id")["split"].nunique() == 1).all()
    assert set(reference["split"]) == {"train", "holdout"}


@pytest.mark.slow
def test_every_visit_gets_its_files_and_its_group_scores(long_out, long_bids):
    group = read_group_table(long_out).set_index(["participant_id", "session_id"])
    for participant, session in _visits(long_bids):
        stem = f"{participant}_{session}"
        anat = long_out / participant / session / "anat"
        assert (long_out / f"{stem}.html").is_file()
        assert (anat / f"{stem}_desc-volume_zmap.nii.gz").is_file()
        table = read_scores_table(anat / f"{stem}_desc-deviations_scores.tsv")
        assert list(table["idp"]) == IDPS
        for _, row in table.iterrows():
            assert row["z"] == pytest.approx(group.loc[(participant, session), f"{row['idp']}_z"], abs=1e-9)


@pytest.mark.slow
def test_longitudinal_runs_are_read_and_painted_into(long_out, long_bids):
    group = read_group_table(long_out).set_index(["participant_id", "session_id"]).sort_index()
    long_idps = collect_idps(long_bids, idp_set=IDPS, longitudinal=True)[0]
    cross_idps = collect_idps(long_bids, idp_set=IDPS)[0]
    for source, same in ((long_idps, True), (cross_idps, False)):
        values = source.set_index(["participant_id", "session_id"]).sort_index()["Left-Hippocampus"]
        assert (group["Left-Hippocampus_value"] == values).all() == same
    sidecar = json.loads((long_out / "sub-001" / "ses-02" / "anat" /
                          "sub-001_ses-02_desc-volume_zmap.json").read_text())
    assert sidecar["SpatialReference"] == "bids:freesurfer:sub-001_ses-02.long.sub-001/mri/aparc+aseg.mgz"
    links = json.loads((long_out / "dataset_description.json").read_text())["DatasetLinks"]
    assert links == {"raw": "../..", "freesurfer": "../freesurfer"}  # the output lies inside the dataset


@pytest.mark.slow
def test_longitudinal_derivatives_pass_the_bids_validator(long_out):
    exe = Path(sys.executable).with_name("bids-validator-deno")
    found = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    if found is None:
        pytest.skip("bids-validator-deno is not installed")
    result = subprocess.run([found, str(long_out), "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    errors = [(i["code"], i.get("location")) for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == []


@pytest.mark.parametrize("longitudinal", [False, True])
def test_the_flag_chooses_the_folders_read_and_painted_into(long_bids, tmp_path, longitudinal):
    argv = [str(long_bids), str(tmp_path / "out"), "group", *(["--longitudinal"] if longitudinal else [])]
    opts = build_parser().parse_args(argv)
    plan = check_inputs(opts, ["group"])
    assert plan.longitudinal == longitudinal
    expected = collect_idps(long_bids, idp_set=["aseg"], longitudinal=longitudinal)[0]
    pd.testing.assert_series_equal(plan.table["Left-Hippocampus"], expected["Left-Hippocampus"])
    folders = {Path(r["fs_subject_dir"]).name for r in subject_rows(plan.table, plan)}
    suffix = ".long.sub-001" if longitudinal else ""
    assert f"sub-001_ses-02{suffix}" in folders and len(folders) == 2 * N_SUBJECTS
    collect = group_workflow(opts, plan).get_node("collect_idps")
    assert collect.inputs.longitudinal == longitudinal
    assert not (tmp_path / "out").exists()  # checking writes nothing


def test_a_folder_of_longitudinal_runs_only_says_to_pass_the_flag(long_bids, tmp_path):
    fs = tmp_path / "freesurfer"
    fs.mkdir()
    for run in sorted((long_bids / "derivatives" / "freesurfer").glob("*.long.*"))[:4]:
        (fs / run.name).symlink_to(run, target_is_directory=True)
    with pytest.raises(InputError) as error:
        collect_idps(long_bids, fs_dir=fs, idp_set=IDPS)
    assert "holds no sub-<label>[_ses-<label>] subject folders" in str(error.value)
    assert "pass --longitudinal" in str(error.value) and "sub-001_ses-01.long.sub-001" in str(error.value)
    table = collect_idps(long_bids, fs_dir=fs, idp_set=IDPS, longitudinal=True)[0]
    assert list(zip(table["participant_id"], table["session_id"])) == [
        ("sub-001", "ses-01"), ("sub-001", "ses-02"), ("sub-002", "ses-01"), ("sub-002", "ses-02")]


def test_the_model_card_names_the_stream_and_the_participant_level_notices_the_other(long_out, long_bids,
                                                                                     capsys):
    card = json.loads((long_out / "models" / "default_modelcard.json").read_text())
    assert card["training_data"] == {"freesurfer_stream": "longitudinal"}
    capsys.readouterr()
    plan = check_inputs(build_parser().parse_args([str(long_bids), str(long_out), "participant",
                                                   "--participant-label", "001"]), ["participant"])
    said = capsys.readouterr().err
    assert "trained on IDPs of FreeSurfer's longitudinal stream" in said and "add --longitudinal" in said
    assert plan.model is not None
    check_inputs(build_parser().parse_args([str(long_bids), str(long_out), "participant", "--longitudinal",
                                            "--participant-label", "001"]), ["participant"])
    assert "stream" not in capsys.readouterr().err
