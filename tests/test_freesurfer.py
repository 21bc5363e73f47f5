"""FreeSurfer stats reader: real FreeSurfer 6/7 files, the project's own synthetic files, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from normdiff_bids.data.atlases import ASEG_LABELS, DESTRIEUX_REGIONS, DK_REGIONS, DKT_REGIONS
from normdiff_bids.data.freesurfer import (
    FS6_TO_FS7,
    harmonise_name,
    read_stats,
    read_subject_idps,
    read_subject_stats,
)
from normdiff_bids.data.synthetic import write_synthetic_dataset
from normdiff_bids.errors import InputError


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fs") / "bids"
    write_synthetic_dataset(root, n_subjects=2, seed=3, fs_version="mixed")
    return root / "derivatives" / "freesurfer"


# -- real files ---------------------------------------------------------------------------------------------

@pytest.mark.reference
def test_bert_fs7_values_match_the_files(freesurfer_reference):
    idps = read_subject_idps(freesurfer_reference / "bert_fs7.2" / "stats")
    assert idps["Left-Hippocampus"] == 4422.1
    assert idps["lh_superiorfrontal_thickness"] == 2.985
    assert idps["EstimatedTotalIntraCranialVol"] == 1520021.264474
    assert idps["BrainSegVol"] == 1218061.0
    assert idps["lhCortexVol"] == 244352.047461
    assert idps["lh_MeanThickness_thickness"] == 2.60273
    assert idps["lh_WhiteSurfArea_area"] == 84499.5
    assert idps["lh_bankssts_area"] == 821 and idps["lh_bankssts_volume"] == 2293
    assert idps["lh_bankssts_thicknessstd"] == 0.451
    assert idps["wm-lh-bankssts"] == 2420.2
    assert idps["lh_a2009s_G_and_S_frontomargin_thickness"] > 0
    assert idps["lh_DKTatlas_insula_thickness"] > 0
    assert idps["lh_pial_PialSurfArea_area"] == 101011
    assert idps["lh_BA_exvivo_V1_exvivo_thickness"] == 1.546
    assert "BrainSegVolNotVentSurf" in idps  # from brainvol.stats
    assert all(f"{h}_{r}_thickness" in idps for h in ("lh", "rh") for r in DK_REGIONS)


@pytest.mark.reference
def test_bert_files_parse_into_tables_and_measures(freesurfer_reference):
    aseg = read_stats(freesurfer_reference / "bert_fs7.2" / "stats" / "aseg.stats")
    assert aseg.kind == "segstats" and aseg.version == "7.2.0-beta"
    assert list(aseg.table["StructName"]) == list(ASEG_LABELS)
    measure = aseg.measures["eTIV"]
    assert (measure.structure, measure.units, measure.value) == ("EstimatedTotalIntraCranialVol", "mm^3",
                                                                 1520021.264474)
    assert aseg.measures["BrainSegVol"].description == "Brain Segmentation Volume"
    brainvol = read_stats(freesurfer_reference / "bert_fs7.2" / "stats" / "brainvol.stats")
    assert brainvol.kind == "measures" and brainvol.table is None and len(brainvol.measures) == 16
    dkt = read_stats(freesurfer_reference / "bert_fs7.2" / "stats" / "lh.aparc.DKTatlas.stats")
    assert tuple(dkt.table["StructName"]) == DKT_REGIONS
    a2009s = read_stats(freesurfer_reference / "bert_fs7.2" / "stats" / "lh.aparc.a2009s.stats")
    assert tuple(a2009s.table["StructName"]) == DESTRIEUX_REGIONS


@pytest.mark.reference
def test_freesurfer6_destrieux_names_are_harmonised(freesurfer_reference):
    folder = freesurfer_reference / "freesurfer-stats_tests" / "fabian"
    raw = read_stats(folder / "lh.aparc.a2009s.stats")
    assert "G&S_frontomargin" in set(raw.table["StructName"])  # the reader keeps the file's spelling
    # FreeSurfer 6 drops a comma in this measure line; the reader recovers the fields.
    assert raw.measures["CortexVol"].description == "Total cortical gray matter volume"
    assert raw.measures["CortexVol"].value == 553998.311189
    idps = read_subject_idps(folder)
    regions = {k.split("_", 2)[2].rsplit("_", 1)[0] for k in idps if k.startswith("lh_a2009s_")}
    assert regions == set(DESTRIEUX_REGIONS)
    assert not any("&" in k for k in idps)


@pytest.mark.reference
def test_freesurfer7_0_subject(freesurfer_reference):
    stats = read_subject_stats(freesurfer_reference / "freesurfer-stats_tests" / "soichi")
    assert stats.version == "7.0.0"
    assert stats.idps["Left-Thalamus"] == 8178.8


# -- synthetic files written by the project -----------------------------------------------------------------

def test_synthetic_files_parse_with_fs7_names_whatever_the_version(synthetic):
    versions = {}
    for subject in ("sub-001", "sub-002"):
        stats = read_subject_stats(synthetic / subject / "stats")
        versions[subject] = stats.version
        assert "Left-Thalamus" in stats.idps and "Left-Thalamus-Proper" not in stats.idps
        assert stats.idps["lh_MeanThickness_thickness"] > 1.5
        assert stats.idps["EstimatedTotalIntraCranialVol"] > stats.idps["BrainSegVol"]
    raw6 = [s for s, v in versions.items() if v.startswith("$Id")]
    assert raw6, "the mixed-version dataset should hold a FreeSurfer 6 subject"
    aseg6 = read_stats(synthetic / raw6[0] / "stats" / "aseg.stats")
    assert "Left-Thalamus-Proper" in set(aseg6.table["StructName"])


def test_harmonisation_table_is_one_to_one_and_idempotent():
    assert FS6_TO_FS7["Left-Thalamus-Proper"] == "Left-Thalamus"
    assert FS6_TO_FS7["G&S_cingul-Mid-Ant"] == "G_and_S_cingul-Mid-Ant"
    assert len(set(FS6_TO_FS7.values())) == len(FS6_TO_FS7)
    assert all(harmonise_name(new) == new for new in FS6_TO_FS7.values())
    assert all(new in DESTRIEUX_REGIONS for old, new in FS6_TO_FS7.items() if "&" in old)


# -- bad files -------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, text: str | None = None) -> Path:
    dst.write_text(src.read_text() if text is None else text)
    return dst


def test_truncated_file_names_file_and_line(synthetic, tmp_path):
    text = (synthetic / "sub-001" / "stats" / "aseg.stats").read_text()
    cut = text[: len(text) - 200]
    path = _copy(synthetic, tmp_path / "aseg.stats", cut)
    with pytest.raises(InputError) as err:
        read_stats(path)
    message = str(err.value)
    assert len(err.value.problems) == 1
    assert str(path) in message and "truncated" in message and "in the middle of line" in message
    assert "NRows 45" in message  # the row count check catches a cut at a line boundary too


def test_truncated_aparc_at_a_line_boundary_is_caught_by_the_trailing_newline(synthetic, tmp_path):
    lines = (synthetic / "sub-001" / "stats" / "lh.aparc.stats").read_text().splitlines()
    path = _copy(synthetic, tmp_path / "lh.aparc.stats", "\n".join(lines[:-3]))
    with pytest.raises(InputError, match="truncated: it ends in the middle of line"):
        read_stats(path)


def test_garbled_rows_and_values_are_all_reported(synthetic, tmp_path):
    lines = (synthetic / "sub-001" / "stats" / "lh.aparc.stats").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines[start] = lines[start].replace(lines[start].split()[4], "2.9x", 1)
    lines[start + 2] = " ".join(lines[start + 2].split()[:5])
    path = _copy(synthetic, tmp_path / "lh.aparc.stats", "\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_stats(path)
    problems = err.value.problems
    assert len(problems) == 2
    assert f"line {start + 1}, column ThickAvg: '2.9x' is not a number" in problems[0]
    assert f"line {start + 3}: expected 10 columns" in problems[1]


def test_garbled_measure_line(synthetic, tmp_path):
    text = (synthetic / "sub-001" / "stats" / "brainvol.stats").read_text()
    text = text.replace("# Measure Mask, MaskVol, Mask Volume,", "# Measure Mask; MaskVol; Mask Volume,")
    path = _copy(synthetic, tmp_path / "brainvol.stats", text)
    with pytest.raises(InputError, match="garbled '# Measure' line"):
        read_stats(path)


@pytest.mark.parametrize("content, expected", [
    ("", "empty"),
    ("hello world\n", "table row before the '# ColHeaders' line"),
    ("# Title something\n# ColHeaders Name Value\nx 1\n", "unknown stats format"),
    ("# just a comment\n", "not a FreeSurfer stats file"),
])
def test_unknown_formats(tmp_path, content, expected):
    path = _copy(tmp_path, tmp_path / "aseg.stats", content)
    with pytest.raises(InputError, match=expected):
        read_stats(path)


def test_subject_folder_problems_are_collected_together(synthetic, tmp_path):
    stats = tmp_path / "stats"
    stats.mkdir()
    _copy(synthetic / "sub-001" / "stats" / "aseg.stats", stats / "aseg.stats", "garbage\n")
    _copy(synthetic / "sub-001" / "stats" / "lh.aparc.stats", stats / "lh.aparc.stats", "")
    _copy(synthetic / "sub-001" / "stats" / "brainvol.stats", stats / "rh.aparc.stats")  # misnamed
    with pytest.raises(InputError) as err:
        read_subject_idps(stats)
    assert len(err.value.problems) == 3
    assert "aseg.stats" in err.value.problems[0] and "lh.aparc.stats" in err.value.problems[1]
    assert "misnamed" in err.value.problems[2]
    with pytest.raises(InputError, match="stats folder not found"):
        read_subject_idps(tmp_path / "nope")
    with pytest.raises(InputError, match="none of the FreeSurfer stats files"):
        read_subject_idps(tmp_path)
