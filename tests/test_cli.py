"""The BIDS-App end to end: group then participant level on a small synthetic dataset with a tiny model,
the outputs it promises, and the habits BIDS-App users rely on (resuming, both levels in one call)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from product_helpers import IDPS, TINY_ARGS, snapshot

from normdiff_bids import __version__
from normdiff_bids.cli.parser import build_parser
from normdiff_bids.cli.run import main
from normdiff_bids.outputs.tables import read_scores_table


@pytest.fixture(scope="module")
def participant_out(bids, group_out, tmp_path_factory):
    """A copy of the group output after a participant-level run for two participants."""
    out = tmp_path_factory.mktemp("participant") / "normdiff"
    shutil.copytree(group_out, out)
    work = out.parent / "work"
    status = main([str(bids), str(out), "participant", "--participant-label", "001", "sub-002",
                   *TINY_ARGS, "--work-dir", str(work)])
    assert status == 0
    return out


def test_parser_takes_both_levels_and_bids_app_spellings():
    opts = build_parser().parse_args(["in", "out", "group", "participant", "--participant_label", "01", "02",
                                      "--nprocs", "2", "--backbone", "saint", "--device", "cuda:1"])
    assert opts.analysis_level == ["group", "participant"]
    assert opts.participant_label == ["01", "02"]
    assert (opts.nprocs, opts.backbone, opts.device, opts.seed, opts.model_name) == (2, "saint", "cuda:1", 0,
                                                                                      "default")
    for bad in (["in", "out", "everything"], ["in", "out", "group", "--device", "gpu"],
                ["in", "out", "group", "--epochs", "0"], ["in", "out", "group", "--model-name", "../m"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(bad)
        assert exit_info.value.code == 2


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.slow
def test_group_level_writes_tables_report_and_model(group_out, bids):
    participants = pd.read_csv(bids / "participants.tsv", sep="\t", dtype=str)
    table = read_scores_table(group_out / "phenotype" / "normdiff_deviations.tsv")
    assert sorted(table["participant_id"]) == sorted(participants["participant_id"])  # everyone is scored
    assert {f"{i}_z" for i in IDPS} <= set(table.columns)
    sidecar = json.loads((group_out / "phenotype" / "normdiff_deviations.json").read_text())
    assert set(table.columns) <= set(sidecar)
    # only controls form the reference; patients are scored out of sample
    split = read_scores_table(group_out / "phenotype" / "normdiff_reference.tsv").merge(participants)
    assert set(split.loc[split["diagnosis"] != "HC", "split"]) == {"none"}
    assert set(split.loc[split["diagnosis"] == "HC", "split"]) == {"train", "holdout"}
    # the model bundle, its card and the group report with the embedded calibration report
    bundle = {p.name for p in (group_out / "models" / "default").iterdir()}
    assert bundle == {"manifest.json", "model.json", "model.safetensors"}
    card = json.loads((group_out / "models" / "default_modelcard.json").read_text())
    assert card["idps"] == IDPS
    html = (group_out / "group.html").read_text()
    assert "calibration" in html.lower() and "<img" in html
    description = json.loads((group_out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "normdiff-bids"


@pytest.mark.slow
def test_participant_level_writes_tables_maps_and_reports(participant_out, group_out):
    for label in ("001", "002"):
        anat = participant_out / f"sub-{label}" / "anat"
        assert (participant_out / f"sub-{label}.html").is_file()
        table = read_scores_table(anat / f"sub-{label}_desc-deviations_scores.tsv")
        assert list(table["idp"]) == IDPS
        for measure in ("volume", "thickness", "area"):
            img = nib.load(anat / f"sub-{label}_desc-{measure}_zmap.nii.gz")
            assert np.isfinite(np.asarray(img.dataobj)).any()
        assert list(anat.glob("*_hemi-L_space-fsnative_desc-thickness_zmap.func.gii"))
        report = (participant_out / f"sub-{label}.html").read_text()
        assert 'aria-label="deviation map slices"' in report  # the map slices, over the subject's aparc+aseg
        assert f"sub-{label}_desc-volume_zmap.nii.gz" in report  # the files it wrote are listed
    assert not (participant_out / "sub-003").exists()  # only the chosen participants


@pytest.mark.slow
def test_a_participant_scored_alone_gets_its_group_scores(participant_out, group_out):
    group = read_scores_table(group_out / "phenotype" / "normdiff_deviations.tsv").set_index("participant_id")
    alone = read_scores_table(participant_out / "sub-001" / "anat" / "sub-001_desc-deviations_scores.tsv")
    for _, row in alone.iterrows():
        assert row["z"] == pytest.approx(group.loc["sub-001", f"{row['idp']}_z"], abs=1e-9)
        assert row["centile"] == pytest.approx(group.loc["sub-001", f"{row['idp']}_centile"], abs=1e-12)
    assert alone["joint_z"].iloc[0] == pytest.approx(group.loc["sub-001", "joint_z"], abs=1e-9)


def test_a_participant_scored_from_the_table_imports_no_torch(bids, group_out, participant_out, tmp_path):
    """The installed model scores from its draw table: the participant level never builds the network,
    so it starts without torch (about 1.4 s) and writes what a run with the network writes."""
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    at = TINY_ARGS.index("--model-options")  # group-level options, checked against the networks' configs
    argv = [str(bids), str(out), "participant", "--participant-label", "001", *TINY_ARGS[:at],
            *TINY_ARGS[at + 2:], "--work-dir", str(tmp_path / "work")]
    code = ("import sys\nfrom normdiff_bids.cli.run import main\n"
            f"status = main({argv!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CI": "true"})
    assert done.returncode == 0, done.stderr
    name = "sub-001/anat/sub-001_desc-deviations_scores.tsv"
    pd.testing.assert_frame_equal(read_scores_table(out / name), read_scores_table(participant_out / name))


@pytest.mark.slow
def test_participant_level_leaves_the_group_outputs_alone(participant_out, group_out):
    before = snapshot(group_out)
    after = snapshot(participant_out)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed <= {"dataset_description.json"}  # merged under the lock; everything else untouched


@pytest.mark.slow
def test_derivatives_pass_the_bids_validator(participant_out):
    exe = Path(sys.executable).with_name("bids-validator-deno")
    if not exe.exists():
        exe = shutil.which("bids-validator-deno")
        if exe is None:
            pytest.skip("bids-validator-deno is not installed")
    result = subprocess.run([str(exe), str(participant_out), "--json"], capture_output=True, text=True,
                            timeout=300)
    report = json.loads(result.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors


@pytest.mark.slow
def test_rerun_with_the_same_work_dir_resumes_from_the_cache(bids, group_out, tmp_path):
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    args = [str(bids), str(out), "participant", "--participant-label", "005", *TINY_ARGS,
            "--work-dir", str(tmp_path / "work")]
    assert main(args) == 0
    results = sorted((tmp_path / "work").glob("normdiff_participant_*/score/result_score.pklz"))
    assert len(results) == 1
    stamp = results[0].stat().st_mtime_ns
    report = out / "sub-005.html"
    report.unlink()  # a lost output is rewritten: the writing steps always run
    assert main(args) == 0
    assert results[0].stat().st_mtime_ns == stamp  # scoring was not redone
    assert report.is_file()


def test_quiet_is_passed_to_workers_through_the_environment_and_then_restored(tmp_path, monkeypatch):
    monkeypatch.delenv("NORMDIFF_QUIET", raising=False)
    seen = {}

    def fake_run(opts, argv=None):
        seen["quiet"] = os.environ.get("NORMDIFF_QUIET")
        seen["et"] = os.environ.get("NIPYPE_NO_ET")
        return 0

    monkeypatch.setattr("normdiff_bids.cli.run.run", fake_run)
    assert main([str(tmp_path), str(tmp_path / "out"), "group", "--quiet"]) == 0
    assert seen == {"quiet": "1", "et": "1"}
    assert "NORMDIFF_QUIET" not in os.environ


def test_condition_on_adds_conditional_columns_sidecars_and_a_report_section(bids, group_out, tmp_path):
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    given = IDPS[0]
    status = main([str(bids), str(out), "participant", "--participant-label", "001", *TINY_ARGS,
                   "--condition-on", given, "--work-dir", str(tmp_path / "work")])
    assert status == 0
    tsv = next((out / "sub-001" / "anat").glob("*_scores.tsv"))
    table = read_scores_table(tsv)
    assert table.loc[table["idp"] == given, "cond_centile"].isna().all()
    others = table.loc[table["idp"] != given, "cond_centile"]
    assert len(others) == len(IDPS) - 1 and others.between(0, 1, inclusive="neither").all()
    sidecar = json.loads(tsv.with_suffix(".json").read_text())
    assert f"(given: {given})" in sidecar["cond_centile"]["Description"]
    html = (out / "sub-001.html").read_text()
    assert f"Given {given}" in html and "given: centile" in html


@pytest.mark.slow
def test_further_covariates_reach_the_model_the_tables_and_the_reports(group_out, tmp_path_factory, tmp_path):
    from product_helpers import copy_bids, rewrite_participants

    bids = copy_bids(tmp_path_factory, tmp_path / "bids")
    rng = np.random.default_rng(5)

    def add(table):  # a scanner coded with numbers (categorical only when declared) and a head size
        table["scanner_field"] = rng.choice(["15", "30"], size=len(table))
        table["tiv"] = [f"{v:.1f}" for v in rng.normal(1500, 120, len(table))]
        return table

    rewrite_participants(bids, add)
    out = tmp_path / "normdiff"
    status = main([str(bids), str(out), "group", *TINY_ARGS, "--reference-query", "diagnosis == 'HC'",
                   "--covariate", "tiv", "scanner_field:categorical"])
    assert status == 0
    card = json.loads((out / "models" / "default_modelcard.json").read_text())
    kinds = {c["name"]: c["kind"] for c in card["covariates"]}
    assert kinds == {"age": "continuous", "tiv": "continuous", "sex": "categorical", "site": "categorical",
                     "scanner_field": "categorical"}
    assert next(c for c in card["covariates"] if c["name"] == "scanner_field")["levels"] == ["15", "30"]
    table = read_scores_table(out / "phenotype" / "normdiff_deviations.tsv")
    assert list(table.columns[:6]) == ["participant_id", "age", "sex", "site", "tiv", "scanner_field"]
    default = read_scores_table(group_out / "phenotype" / "normdiff_deviations.tsv")
    z = [f"{i}_z" for i in IDPS]
    assert not np.allclose(table[z].to_numpy(float), default[z].to_numpy(float))  # the model changed
    sidecar = json.loads((out / "phenotype" / "normdiff_deviations.json").read_text())
    assert set(sidecar["scanner_field"]["Levels"]) == {"15", "30"}
    assert "continuous" in sidecar["tiv"]["Description"]
    assert "<h3>scanner_field</h3>" in (out / "group.html").read_text()
    record = json.loads(next((out / "logs").glob("run-*.json")).read_text())
    assert [c["name"] for c in record["resolved"]["covariates"]] == ["age", "sex", "site", "tiv",
                                                                     "scanner_field"]
    # the participant level takes the covariates from the model, and scores a row as the group level did
    assert main([str(bids), str(out), "participant", "--participant-label", "001", *TINY_ARGS]) == 0
    alone = read_scores_table(out / "sub-001" / "anat" / "sub-001_desc-deviations_scores.tsv")
    row = table.set_index("participant_id").loc["sub-001"]
    assert alone["z"].to_numpy() == pytest.approx(row[z].to_numpy(float), abs=1e-9)
    assert 'aria-label="centile curves"' in (out / "sub-001.html").read_text()


def test_reports_only_rewrites_reports_and_nothing_else(bids, group_out, tmp_path):
    out = tmp_path / "normdiff"
    shutil.copytree(group_out, out)
    work = tmp_path / "work"
    assert main([str(bids), str(out), "participant", "--participant-label", "001", *TINY_ARGS,
                 "--work-dir", str(work)]) == 0
    report = out / "sub-001.html"
    tables = {p: p.read_bytes() for p in (out / "sub-001").rglob("*") if p.is_file()}
    report.unlink()
    assert main([str(bids), str(out), "participant", "--participant-label", "001", "--reports-only",
                 *TINY_ARGS, "--work-dir", str(work)]) == 0
    assert report.is_file() and "sub-001" in report.read_text()
    assert {p: p.read_bytes() for p in (out / "sub-001").rglob("*") if p.is_file()} == tables
    # and it is refused with the group level, or without the group tables
    assert main([str(bids), str(out), "group", "participant", "--reports-only", *TINY_ARGS]) == 2
    shutil.rmtree(out / "phenotype")
    assert main([str(bids), str(out), "participant", "--reports-only", *TINY_ARGS]) == 2


def test_slurm_plugin_gets_a_logname_where_the_environment_has_none(monkeypatch):
    """Nipype's SLURM plugin names jobs after $LOGNAME; batch jobs and containers often lack it."""
    from normdiff_bids.cli import execution

    monkeypatch.delenv("LOGNAME", raising=False)
    execution._default_logname()
    assert os.environ["LOGNAME"]
    monkeypatch.setenv("LOGNAME", "someone")
    execution._default_logname()
    assert os.environ["LOGNAME"] == "someone"
