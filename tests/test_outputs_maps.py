"""Deviation maps: each region's z at exactly its labels (volume) or vertices (surface), NaN elsewhere."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from outputs_helpers import AFFINE, C_RAS, IDPS, annot_labels, tiny_scores, write_tiny_freesurfer_subject

from normdiff_bids.data.atlases import ASEG_LABELS, DK_CTAB, dk_label_id
from normdiff_bids.errors import InputError
from normdiff_bids.outputs.maps import (
    write_deviation_map,
    write_deviation_maps,
    write_surface,
    write_surface_deviation_map,
)
from normdiff_bids.outputs.tables import scores_to_wide


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fs") / "sub-01_ses-1"
    paths = write_tiny_freesurfer_subject(folder)
    tidy, cov = tiny_scores()
    row = scores_to_wide(tidy, cov).iloc[0]
    z = {idp: float(row[f"{idp}_z"]) for idp in IDPS}
    labels = np.asarray(nib.load(paths["aparc_aseg"]).dataobj)
    return {"dir": folder, "paths": paths, "row": row, "z": z, "labels": labels}


@pytest.mark.parametrize("measure, regions", [
    ("volume", {"Left-Hippocampus": ASEG_LABELS["Left-Hippocampus"],
                "Right-Hippocampus": ASEG_LABELS["Right-Hippocampus"],
                "Left-Lateral-Ventricle": ASEG_LABELS["Left-Lateral-Ventricle"],
                "lh_superiorfrontal_volume": dk_label_id("lh", "superiorfrontal")}),
    ("thickness", {"lh_superiorfrontal_thickness": dk_label_id("lh", "superiorfrontal"),
                   "rh_superiorfrontal_thickness": dk_label_id("rh", "superiorfrontal"),
                   "lh_insula_thickness": dk_label_id("lh", "insula")}),
    ("area", {"lh_superiorfrontal_area": dk_label_id("lh", "superiorfrontal"),
              "lh_insula_area": dk_label_id("lh", "insula")}),
])
def test_each_region_holds_its_z_and_everything_else_is_nan(subject, tmp_path, measure, regions):
    aparc_aseg = subject["paths"]["aparc_aseg"]
    out = write_deviation_map(subject["row"], aparc_aseg, tmp_path / "map.nii.gz", measure)
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    labels = subject["labels"]
    assert data.dtype == np.float32 and data.shape == labels.shape
    np.testing.assert_allclose(img.affine, AFFINE)
    assert img.header.get_intent()[0] == "z score"
    painted = np.zeros(labels.shape, dtype=bool)
    for idp, label in regions.items():
        at = labels == label
        assert at.any()
        np.testing.assert_allclose(data[at], subject["z"][idp], rtol=1e-6)
        painted |= at
    assert np.all(np.isnan(data[~painted]))  # background, white matter, unscored structures
    sidecar = json.loads((tmp_path / "map.json").read_text())
    assert set(sidecar["Regions"]) == set(regions) and sidecar["RegionsNotInLabelVolume"] == []


def test_background_can_be_zero_instead_of_nan(subject, tmp_path):
    aparc_aseg = subject["paths"]["aparc_aseg"]
    out = write_deviation_map(subject["z"], aparc_aseg, tmp_path / "m.nii.gz", "thickness", background=0.0)
    data = np.asarray(nib.load(out).dataobj)
    assert not np.isnan(data).any() and np.count_nonzero(data[subject["labels"] == 0]) == 0


def test_a_region_missing_from_the_label_volume_is_reported(subject, tmp_path):
    z = {"lh_bankssts_thickness": 1.5, "lh_insula_thickness": -1.0}
    write_deviation_map(z, subject["paths"]["aparc_aseg"], tmp_path / "m.nii.gz", "thickness")
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["RegionsNotInLabelVolume"] == ["lh_bankssts_thickness"]


def test_bad_inputs_are_named(subject, tmp_path):
    with pytest.raises(ValueError, match="no thickness map"):
        write_deviation_map({"Left-Hippocampus": 1.0}, subject["paths"]["aparc_aseg"], tmp_path / "m.nii.gz",
                            "thickness")
    with pytest.raises(ValueError, match="has no deviation map"):
        write_deviation_map(subject["z"], subject["paths"]["aparc_aseg"], tmp_path / "m.nii.gz", "meancurv")
    with pytest.raises(InputError, match="aparc\\+aseg.mgz not found"):
        write_deviation_map(subject["z"], tmp_path / "nowhere" / "aparc+aseg.mgz", tmp_path / "m.nii.gz",
                            "volume")
    broken = tmp_path / "broken.mgz"
    broken.write_bytes(b"\x00" * 50)
    with pytest.raises(InputError, match="broken.mgz cannot be read"):
        write_deviation_map(subject["z"], broken, tmp_path / "m.nii.gz", "volume")
    assert not (tmp_path / "m.nii.gz").exists()


def test_vertices_get_the_z_of_their_dk_region(subject, tmp_path):
    out = write_surface_deviation_map(subject["row"], subject["paths"]["lh_annot"], tmp_path / "lh.func.gii",
                                      "thickness", "lh")
    gii = nib.load(out)
    values = gii.darrays[0].data
    labels = annot_labels(values.size)
    assert values.dtype == np.float32
    assert gii.darrays[0].intent == nib.nifti1.intent_codes["NIFTI_INTENT_ZSCORE"]

    np.testing.assert_allclose(values[labels == DK_CTAB.index("superiorfrontal")],
                               subject["z"]["lh_superiorfrontal_thickness"], rtol=1e-6)
    np.testing.assert_allclose(values[labels == DK_CTAB.index("insula")], subject["z"]["lh_insula_thickness"],
                               rtol=1e-6)
    assert np.isnan(values[labels == DK_CTAB.index("precuneus")]).all()  # not scored
    assert np.isnan(values[labels == -1]).all()                           # no region
    assert gii.meta["AnatomicalStructurePrimary"] == "CortexLeft"


def test_vertex_count_mismatch_is_refused(subject, tmp_path):
    with pytest.raises(InputError, match="do not belong to the same FreeSurfer subject"):
        write_surface_deviation_map(subject["z"], subject["paths"]["lh_annot"], tmp_path / "x.func.gii",
                                    "thickness", "lh", n_vertices=7)


def test_surfaces_are_shifted_to_scanner_coordinates(subject, tmp_path):
    coords, faces = nib.freesurfer.read_geometry(subject["paths"]["lh_white"])
    out = write_surface(subject["paths"]["lh_white"], tmp_path / "lh.surf.gii", "lh")
    gii = nib.load(out)
    np.testing.assert_allclose(gii.darrays[0].data, coords + C_RAS, atol=1e-5)
    np.testing.assert_array_equal(gii.darrays[1].data, faces)


def test_all_maps_of_a_subject_are_named_from_its_entities(subject, tmp_path):
    written = write_deviation_maps(tmp_path, subject["row"], subject["dir"])
    assert set(written) == {"volume", "thickness", "area", "surfaces"}
    anat = tmp_path / "sub-01" / "ses-1" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    assert names == sorted([
        "sub-01_ses-1_desc-area_zmap.json", "sub-01_ses-1_desc-area_zmap.nii.gz",
        "sub-01_ses-1_desc-thickness_zmap.json", "sub-01_ses-1_desc-thickness_zmap.nii.gz",
        "sub-01_ses-1_desc-volume_zmap.json", "sub-01_ses-1_desc-volume_zmap.nii.gz",
        "sub-01_ses-1_hemi-L_space-fsnative_desc-area_zmap.func.gii",
        "sub-01_ses-1_hemi-L_space-fsnative_desc-thickness_zmap.func.gii",
        "sub-01_ses-1_hemi-L_space-fsnative_desc-volume_zmap.func.gii",
        "sub-01_ses-1_hemi-R_space-fsnative_desc-thickness_zmap.func.gii",
        "sub-01_ses-1_hemi-L_white.surf.gii", "sub-01_ses-1_hemi-R_white.surf.gii",
    ])


def test_subjects_without_surfaces_get_volume_maps_only(tmp_path):
    fs = tmp_path / "fs" / "sub-02"
    write_tiny_freesurfer_subject(fs, with_surfaces=False)
    tidy, cov = tiny_scores()
    row = scores_to_wide(tidy, cov).iloc[1]
    written = write_deviation_maps(tmp_path / "out", row, fs, measures=("thickness",))
    assert [p.name for p in written["thickness"]] == ["sub-02_ses-1_desc-thickness_zmap.nii.gz",
                                                      "sub-02_ses-1_desc-thickness_zmap.json"]
    assert "surfaces" not in written


def test_a_map_names_the_label_volume_it_lies_on(tmp_path):
    from normdiff_bids.outputs.dataset import prepare_output_dir

    raw = tmp_path / "bids"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    fs = raw / "derivatives" / "freesurfer"
    write_tiny_freesurfer_subject(fs / "sub-01_ses-1", with_surfaces=False)
    tidy, cov = tiny_scores()
    row = scores_to_wide(tidy, cov).iloc[0]
    out = prepare_output_dir(raw / "derivatives" / "normdiff", raw, fs_dir=fs)
    written = write_deviation_maps(out, row, fs / "sub-01_ses-1", measures=("volume",))
    sidecar = json.loads(written["volume"][1].read_text())
    # the map is on the grid of that aparc+aseg (the subject's FreeSurfer space): a BIDS URI through the
    # dataset's link to the FreeSurfer folder
    assert sidecar["SpatialReference"] == "bids:freesurfer:sub-01_ses-1/mri/aparc+aseg.mgz"
    assert sidecar["Sources"] == [sidecar["SpatialReference"]]
    # outside a derivatives dataset that links the FreeSurfer folder: its file URI
    alone = write_deviation_map(row, fs / "sub-01_ses-1" / "mri" / "aparc+aseg.mgz", tmp_path / "m.nii.gz",
                                "volume")
    reference = json.loads(alone.with_name("m.json").read_text())["SpatialReference"]
    assert reference == (fs / "sub-01_ses-1" / "mri" / "aparc+aseg.mgz").resolve().as_uri()
