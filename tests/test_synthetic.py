"""The ground-truth generator: exact marginals, quantiles and oracle draws agree with each other."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from normdiff_bids.cli.synth import main as synth_main
from normdiff_bids.data.atlases import ASEG_LABELS, DK_CTAB, DK_REGIONS, aparc_aseg_labels
from normdiff_bids.data.synthetic import (
    SyntheticCohort,
    load_ground_truth,
    real_idp_names,
    write_synthetic_dataset,
)


@pytest.fixture(scope="module")
def gen():
    return SyntheticCohort(n_idps=24, n_sites=3, seed=0)


@pytest.fixture(scope="module")
def cohort(gen):
    return gen.sample(4000, seed=1)


def test_sample_has_covariates_and_real_idp_names(gen, cohort):
    assert list(cohort.columns) == ["participant_id", "age", "sex", "site", *gen.idps]
    assert cohort["participant_id"].is_unique
    assert set(cohort["sex"]) == {"F", "M"}
    assert set(cohort["site"]) == set(gen.sites)
    assert cohort["age"].between(8, 85).all()
    dk = {f"{h}_{r}_{m}" for h in ("lh", "rh") for r in DK_REGIONS for m in ("thickness", "area", "volume")}
    assert all(name in ASEG_LABELS or name in dk for name in gen.idps)
    assert not cohort[gen.idps].isna().any().any()


def test_values_have_realistic_units(gen, cohort):
    medians = cohort[gen.idps].median()
    thickness = medians[[c for c in gen.idps if c.endswith("_thickness")]]
    area = medians[[c for c in gen.idps if c.endswith("_area")]]
    assert thickness.between(1.5, 4.0).all()
    assert area.between(150, 12000).all()
    assert 3000 < medians["Left-Hippocampus"] < 5500
    assert (cohort[gen.idps] > 0).all().all()


def test_cdf_of_oracle_draws_is_uniform_for_each_idp(gen, cohort):
    u = gen.cdf(cohort)
    assert u.shape == (len(cohort), gen.n_idps)
    # Bonferroni over IDPs: a correct CDF fails this with probability < 1e-3 overall.
    pvalues = [stats.kstest(u[c], "uniform").pvalue for c in gen.idps]
    assert min(pvalues) > 1e-3 / gen.n_idps


def test_oracle_draws_match_the_cdf_at_fixed_covariates(gen):
    covariates = pd.DataFrame({"age": [12.0, 70.0], "sex": ["F", "M"], "site": [gen.sites[0], gen.sites[2]]})
    draws = gen.sample_idps(covariates, 3000, seed=5)
    assert draws.shape == (2, 3000, gen.n_idps)
    for row in range(2):
        table = pd.DataFrame(draws[row], columns=gen.idps).assign(**covariates.iloc[row].to_dict())
        u = gen.cdf(table)
        pvalues = [stats.kstest(u[c], "uniform").pvalue for c in gen.idps]
        assert min(pvalues) > 1e-3 / gen.n_idps


def test_ppf_inverts_cdf(gen, cohort):
    q = np.array([1e-6, 0.02, 0.25, 0.5, 0.75, 0.98, 1 - 1e-6])
    rows = cohort.iloc[:40]
    quantiles = gen.ppf(rows, q)
    assert quantiles.shape == (40, len(q), gen.n_idps)
    assert np.all(np.diff(quantiles, axis=1) > 0)
    for k, qk in enumerate(q):
        table = rows.copy()
        table[gen.idps] = quantiles[:, k, :]
        np.testing.assert_allclose(gen.cdf(table).to_numpy(), qk, rtol=1e-8, atol=1e-12)


def test_cdf_then_ppf_returns_the_value(gen, cohort):
    rows = cohort.iloc[:30]
    u = gen.cdf(rows).to_numpy()
    back = np.stack([gen.ppf(rows.iloc[[i]], u[i])[0, np.arange(gen.n_idps), np.arange(gen.n_idps)]
                     for i in range(len(rows))])
    np.testing.assert_allclose(back, rows[gen.idps].to_numpy(), rtol=1e-9)


def test_every_family_is_present_and_some_are_bimodal(gen):
    assert {"normal", "shash", "lognormal", "mixture"} <= set(gen.families)
    j = gen.families.index("mixture")
    older = pd.DataFrame({"age": [80.0], "sex": ["F"], "site": [gen.sites[0]]})
    values = gen.sample_idps(older, 20000, seed=2)[0, :, j]
    density, _ = np.histogram(values, bins=60)
    smooth = np.convolve(density, np.ones(5) / 5, mode="same")
    peaks = [i for i in range(2, 58) if smooth[i] > smooth[i - 1] and smooth[i] >= smooth[i + 1]
             and smooth[i] > 0.1 * smooth.max()]
    assert len(peaks) >= 2


def test_age_sex_and_site_change_location_and_spread(gen):
    ages = np.array([10.0, 30.0, 50.0, 80.0])
    q = gen.mean_curve(ages)
    ventricle = q["Left-Lateral-Ventricle"].to_numpy()
    assert np.all(np.diff(ventricle[1:]) > 0)  # ventricles grow with age
    hippocampus = q["Left-Hippocampus"]
    assert hippocampus[80.0] < hippocampus[30.0]
    cov = pd.DataFrame({"age": [25.0, 80.0, 25.0, 25.0], "sex": ["F", "F", "M", "F"],
                        "site": [gen.sites[0], gen.sites[0], gen.sites[0], gen.sites[1]]})
    iqr = np.diff(gen.ppf(cov, [0.25, 0.75]), axis=1)[:, 0, :]
    median = gen.ppf(cov, [0.5])[:, 0, :]
    assert not np.allclose(iqr[0], iqr[1], rtol=0.02)  # heteroscedastic in age
    assert median[2, 0] > median[0, 0]  # males have larger hippocampi in absolute volume
    assert not np.allclose(median[0], median[3])  # site shifts location


def test_idps_are_correlated_through_a_well_conditioned_copula(gen, cohort):
    eig = np.linalg.eigvalsh(gen.correlation)
    assert eig.min() > 0.05 and eig.max() / eig.min() < 1e3
    z = gen.normal_scores(cohort)
    left, right = z["Left-Hippocampus"], z["Right-Hippocampus"]
    expected = gen.correlation[gen.idps.index("Left-Hippocampus"), gen.idps.index("Right-Hippocampus")]
    assert abs(np.corrcoef(left, right)[0, 1] - expected) < 0.05


def test_same_seed_same_draws_and_bad_covariates_are_named(gen):
    a = gen.sample(50, seed=3)
    b = SyntheticCohort(n_idps=24, n_sites=3, seed=0).sample(50, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(gen.sample(50, seed=4))
    bad = a.assign(site="siteX")
    with pytest.raises(ValueError, match="siteX"):
        gen.cdf(bad)
    with pytest.raises(ValueError, match="sex"):
        gen.cdf(a.assign(sex="female?"))


def test_many_idps_are_fast_and_named_uniquely():
    gen = SyntheticCohort(n_idps=220, n_sites=4, seed=1)
    assert len(set(gen.idps)) == 220
    cov = gen.sample_covariates(10000, seed=0)
    start = time.perf_counter()
    draws = gen.sample_idps(cov, 1, seed=0)
    elapsed = time.perf_counter() - start
    assert draws.shape == (10000, 1, 220) and np.isfinite(draws).all()
    assert elapsed < 5.0  # about 0.3 s on one core; generous for shared CI machines
    assert len(set(SyntheticCohort(n_idps=300).idps)) == 300


def test_a_small_cohort_is_the_exact_marginal_of_a_larger_one():
    small, large = SyntheticCohort(n_idps=10, seed=4), SyntheticCohort(n_idps=60, seed=4)
    assert large.idps[:10] == small.idps
    table = large.sample(200, seed=0)
    np.testing.assert_allclose(small.cdf(table).to_numpy(), large.cdf(table).to_numpy()[:, :10], rtol=1e-12)
    np.testing.assert_allclose(small.correlation, large.correlation[:10, :10])


# -- the dataset writer --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "bids"
    start = time.perf_counter()
    write_synthetic_dataset(root, n_subjects=5, seed=2, n_idps=12, patients=0.4)
    return root, time.perf_counter() - start


def test_writer_lays_out_bids_and_freesurfer_files(written):
    root, elapsed = written
    assert elapsed < 15.0  # about 0.5 s on one idle core
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "age", "sex", "site", "diagnosis"]
    assert set(participants["diagnosis"]) == {"HC", "patient"}
    description = json.loads((root / "derivatives" / "freesurfer" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    for sub in participants["participant_id"]:
        assert (root / sub / "anat" / f"{sub}_T1w.nii.gz").is_file()
        fs = root / "derivatives" / "freesurfer" / sub
        for rel in ("stats/aseg.stats", "stats/brainvol.stats", "stats/lh.aparc.stats",
                    "stats/rh.aparc.stats", "mri/aparc+aseg.mgz", "surf/lh.white", "surf/rh.white",
                    "label/lh.aparc.annot", "label/rh.aparc.annot"):
            assert (fs / rel).is_file(), rel
    truth, meta = load_ground_truth(root)
    assert meta["n_idps"] == 12 and list(truth.columns[-12:]) == meta["idps"]
    assert not list(root.parent.glob(".bids.*"))  # no temporary folder left behind


def test_aparc_aseg_holds_every_real_label_and_surfaces_are_closed(written):
    root, _ = written
    fs = root / "derivatives" / "freesurfer" / "sub-001"
    img = nib.load(fs / "mri" / "aparc+aseg.mgz")
    labels = set(np.unique(np.asarray(img.dataobj))) - {0}
    assert labels == set(aparc_aseg_labels().values())
    vertices, faces = nib.freesurfer.read_geometry(fs / "surf" / "lh.white")
    edges = {tuple(sorted(e)) for f in faces for e in ((f[0], f[1]), (f[1], f[2]), (f[2], f[0]))}
    assert len(vertices) - len(edges) + len(faces) == 2  # a closed sphere-like mesh
    annot, ctab, names = nib.freesurfer.read_annot(fs / "label" / "lh.aparc.annot")
    assert [n.decode() for n in names] == list(DK_CTAB)
    assert {names[i].decode() for i in np.unique(annot)} == set(DK_REGIONS)
    assert len(annot) == len(vertices)


def test_patients_carry_the_known_deviation(written):
    root, _ = written
    truth, _ = load_ground_truth(root)
    patients = truth["diagnosis"] == "patient"
    assert patients.sum() == 2
    hippocampus = truth.loc[patients, ["Left-Hippocampus", "Right-Hippocampus"]]
    assert (hippocampus < 0.2).all().all()


def test_freesurfer6_spelling_and_sessions(tmp_path):
    root = write_synthetic_dataset(tmp_path / "bids", n_subjects=2, seed=1, sessions=3, fs_version="6")
    fs = root / "derivatives" / "freesurfer"
    assert sorted(p.name for p in fs.iterdir() if p.is_dir()) == [
        f"sub-00{i}_ses-0{k}" for i in (1, 2) for k in (1, 2, 3)]
    aseg = (fs / "sub-001_ses-01" / "stats" / "aseg.stats").read_text()
    assert "Left-Thalamus-Proper" in aseg and "mri_segstats.c,v" in aseg
    aparc = (fs / "sub-001_ses-01" / "stats" / "lh.aparc.stats").read_text()
    assert "# Measure Cortex, CortexVol Total cortical gray matter volume," in aparc
    visits = pd.read_csv(root / "sub-001" / "sub-001_sessions.tsv", sep="\t")
    assert list(visits["session_id"]) == ["ses-01", "ses-02", "ses-03"]
    assert visits["age"].is_monotonic_increasing
    assert (root / "sub-002" / "ses-03" / "anat" / "sub-002_ses-03_T1w.nii.gz").is_file()


def test_writer_refuses_to_overwrite_unless_asked(tmp_path):
    root = write_synthetic_dataset(tmp_path / "bids", n_subjects=1, seed=0)
    (root / "marker").write_text("old")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(root, n_subjects=1, seed=0)
    assert (root / "marker").exists()
    write_synthetic_dataset(root, n_subjects=1, seed=0, overwrite=True)
    assert not (root / "marker").exists()
    with pytest.raises(ValueError, match=f"n_idps must be between 1 and {len(real_idp_names())}"):
        write_synthetic_dataset(tmp_path / "other", n_subjects=1, n_idps=300)


def test_cli_writes_and_reports_errors_without_traceback(tmp_path, capsys):
    out = tmp_path / "demo"
    assert synth_main([str(out), "--n-subjects", "2", "--seed", "4", "--fs-version", "mixed"]) == 0
    assert "wrote 2 participants" in capsys.readouterr().out
    assert synth_main([str(out), "--n-subjects", "2"]) == 3
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert synth_main([str(tmp_path / "x"), "--patients", "1.5"]) == 2
    assert "patients must be a fraction" in capsys.readouterr().err
