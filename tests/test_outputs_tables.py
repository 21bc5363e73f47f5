"""Score tables: tidy <-> wide round trip, sidecars that describe every column, and the files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from outputs_helpers import IDPS, tiny_scores

from normdiff_bids.outputs import names, tables
from normdiff_bids.outputs.score_files import (
    read_group_table,
    read_scores_table,
    write_group_table,
    write_subject_scores,
)
from normdiff_bids.outputs.score_tables import idps_of_wide, scores_to_long, scores_to_wide
from normdiff_bids.outputs.sidecars import column_descriptions


def _tidy_dtypes(tidy):
    return tidy.astype({"tail": "Int8", "extrapolated": "boolean", "idp": "str"})


def test_wide_has_one_row_per_subject_session_in_the_documented_column_order():
    tidy, cov = tiny_scores(sessions=("ses-1", "ses-2"))
    wide = scores_to_wide(tidy, cov)
    assert len(wide) == 6
    assert list(wide.columns[:9]) == ["participant_id", "session_id", "age", "sex", "site",
                                      "joint_stat", "joint_centile", "joint_z", "extrapolated"]
    assert list(wide.columns[9:13]) == [f"{IDPS[0]}_{f}" for f in ("value", "centile", "z", "tail")]
    assert idps_of_wide(wide) == IDPS
    row = tidy[(tidy.participant_id == "sub-02") & (tidy.session_id == "ses-2")
               & (tidy.idp == IDPS[4])].iloc[0]
    got = wide[(wide.participant_id == "sub-02") & (wide.session_id == "ses-2")].iloc[0]
    assert got[f"{IDPS[4]}_z"] == row["z"] and got[f"{IDPS[4]}_centile"] == row["centile"]
    assert got["age"] == 46.0


def test_wide_to_long_gives_back_the_tidy_table():
    tidy, cov = tiny_scores(sessions=("ses-1", "ses-2"))
    long = scores_to_long(scores_to_wide(tidy, cov))
    pd.testing.assert_frame_equal(long, _tidy_dtypes(tidy))


def test_round_trip_through_the_tsv_files(tmp_path):
    tidy, cov = tiny_scores()
    wide = scores_to_wide(tidy, cov)
    write_group_table(tmp_path, wide)
    back = read_group_table(tmp_path)
    pd.testing.assert_frame_equal(scores_to_long(back), _tidy_dtypes(tidy), check_exact=False, rtol=1e-9)


def test_tables_without_ids_use_row_numbers():
    tidy, _ = tiny_scores(participants=("sub-01", "sub-02"))
    tidy = tidy.drop(columns=["participant_id", "session_id"])
    tidy.insert(0, "row", np.repeat([0, 1], len(IDPS)))
    wide = scores_to_wide(tidy)
    assert list(wide["row"]) == [0, 1]
    assert scores_to_long(wide)["row"].tolist() == tidy["row"].tolist()


def test_repeated_rows_and_duplicated_covariates_are_refused():
    tidy, cov = tiny_scores()
    with pytest.raises(ValueError, match="repeated"):
        scores_to_wide(pd.concat([tidy, tidy.head(1)]))
    with pytest.raises(ValueError, match="repeated"):
        scores_to_wide(tidy, pd.concat([cov, cov.head(1)]))


def test_every_column_of_every_table_is_described(tmp_path):
    tidy, cov = tiny_scores(sessions=("ses-1", "ses-2"))
    wide = scores_to_wide(tidy, cov)
    written = write_subject_scores(tmp_path, tidy)
    assert len(written) == 2 * 6
    written_group = write_group_table(tmp_path, wide)
    assert [p.name for p in written_group] == [f"normdiff_deviations_ses-{s}.{e}" for s in (1, 2)
                                               for e in ("tsv", "json")]
    group_tsv, group_json = written_group[:2]
    for tsv in [*written[::2], group_tsv]:
        header = tsv.read_text().splitlines()[0].split("\t")
        sidecar = json.loads(tsv.with_suffix(".json").read_text())
        for column in header:
            entry = sidecar[column]
            assert entry["LongName"] and entry["Description"], column
            # ids are free text; a subject file's 'value' has per-row units, given in its 'units' column
            if column not in ("participant_id", "session_id", "value"):
                assert "Units" in entry or "Levels" in entry, column
    group = json.loads(group_json.read_text())
    assert group["MeasurementToolMetadata"]["Description"]
    assert group[f"{IDPS[0]}_value"]["Units"] == "mm^3"
    assert group["lh_insula_area_value"]["Units"] == "mm^2"
    assert group["sex"]["Levels"] == {"F": "female", "M": "male"}
    assert set(group[f"{IDPS[0]}_tail"]["Levels"]) == {"-1", "0", "1"}


def test_subject_file_holds_that_subjects_rows_with_measure_and_units(tmp_path):
    tidy, _ = tiny_scores()
    write_subject_scores(tmp_path, tidy)
    path = tmp_path / names.scores_table_path({"sub": "01", "ses": "1"})
    table = read_scores_table(path)
    assert table["participant_id"].unique().tolist() == ["sub-01"]
    assert table["idp"].tolist() == IDPS
    insula = table.set_index("idp").loc["lh_insula_thickness"]
    assert (insula["measure"], insula["units"]) == ("thickness", "mm")
    expected = tidy[tidy.participant_id == "sub-01"]["z"].to_numpy()
    np.testing.assert_allclose(table["z"].to_numpy(), expected, rtol=1e-9)
    assert table["tail"].dtype == "Int8" and table["extrapolated"].dtype == "boolean"


def test_group_table_keeps_other_subjects_and_replaces_updated_rows(tmp_path):
    tidy, cov = tiny_scores()
    wide = scores_to_wide(tidy, cov)
    write_group_table(tmp_path, wide.iloc[:2])
    updated = wide.iloc[[1, 2]].copy()
    updated["joint_z"] = [9.0, 8.0]
    tsv = write_group_table(tmp_path, updated)[0]
    back = read_scores_table(tsv)
    assert back["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert back["joint_z"].tolist()[1:] == [9.0, 8.0]
    assert back.columns[0] == "participant_id" and back.columns[1] == "session_id"


def test_labels_that_look_like_numbers_stay_text(tmp_path):
    tidy, cov = tiny_scores()
    cov["site"] = "01"
    write_group_table(tmp_path, scores_to_wide(tidy, cov))
    assert read_group_table(tmp_path)["site"].tolist() == ["01"] * 3


def test_sessions_get_one_phenotype_file_each_with_one_row_per_participant(tmp_path):
    tidy, cov = tiny_scores(sessions=("ses-1", "ses-2"))
    wide = scores_to_wide(tidy, cov)
    written = write_group_table(tmp_path, wide)
    for tsv in written[::2]:
        table = read_scores_table(tsv)
        assert table["participant_id"].is_unique and table["session_id"].nunique() == 1
    back = read_group_table(tmp_path)
    ids = sorted(zip(wide.participant_id, wide.session_id))
    assert sorted(zip(back.participant_id, back.session_id)) == ids
    cross_sectional = wide.drop(columns="session_id").iloc[::2]
    tsv = write_group_table(tmp_path, cross_sectional)[0]
    assert tsv.name == "normdiff_deviations.tsv"


def test_descriptions_cover_unknown_covariates():
    table = pd.DataFrame({"participant_id": ["sub-1"], "scanner": ["prisma"], "education": [12.0]})
    desc = column_descriptions(table, idps=[])
    assert desc["scanner"]["Levels"] == {"prisma": "prisma"}
    assert "education" in desc["education"]["Description"]


def test_descriptions_follow_the_covariate_specification(tmp_path):
    from normdiff_bids.covariate_spec import CovariateSpecs

    tidy, cov = tiny_scores()
    cov["field"] = [3, 3, 15]  # coded with numbers, declared categorical
    cov["tiv"] = [1400.0, 1500.0, 1600.0]
    spec = CovariateSpecs.from_options(sex_column="gender", covariates=["field:categorical", "tiv"])
    spec = spec.resolved({"tiv": "continuous"})
    wide = scores_to_wide(tidy, cov)
    path = write_group_table(tmp_path, wide, covariates=spec.to_list())[0]
    desc = json.loads(path.with_suffix(".json").read_text())
    assert desc["field"]["Levels"] == {"15": "field 15", "3": "field 3"}
    assert "categorical" in desc["field"]["Description"] and "'field'" in desc["field"]["Description"]
    assert "Levels" not in desc["tiv"] and "continuous" in desc["tiv"]["Description"]
    assert desc["sex"]["Description"] == "Sex as given in participants.tsv column 'gender' (model covariate)"
    # the default specification describes age, sex and site exactly as without one
    default = wide.drop(columns=["field", "tiv"])
    assert column_descriptions(default, covariates=CovariateSpecs.default()) == column_descriptions(default)


def test_the_old_import_path_gives_the_same_functions():
    from normdiff_bids.outputs import score_files, score_tables, sidecars

    old_names = ["ID_COLUMNS", "IDP_FIELDS", "SUBJECT_SCORE_COLUMNS", "TIDY_COLUMNS", "TEXT_COLUMNS",
                 "Z_UNITS", "REFERENCE_TABLE_NAME", "scores_to_wide", "scores_to_long", "idps_of_wide",
                 "given_idps", "covariate_columns", "subject_rows", "subject_table", "wide_row", "z_by_idp",
                 "column_descriptions", "write_tsv", "read_scores_table", "write_subject_scores",
                 "write_group_table", "write_reference_table", "read_group_table"]
    for name in old_names:
        assert any(getattr(home, name, None) is getattr(tables, name)
                   for home in (score_files, score_tables, sidecars)), name
