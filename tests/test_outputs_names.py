"""Derivative file names: entities in BIDS order, labels that cannot escape the output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from normdiff_bids.errors import InputError
from normdiff_bids.outputs import names


def test_entities_follow_bids_order_whatever_the_dict_order():
    entities = {"desc": "thickness", "space": "fsnative", "hemi": "L", "ses": "1", "sub": "01"}
    path = names.derivative_path(entities, "zmap", ".func.gii")
    assert path == Path("sub-01/ses-1/anat/sub-01_ses-1_hemi-L_space-fsnative_desc-thickness_zmap.func.gii")


def test_prefixed_and_long_entity_names_give_the_same_file():
    short = names.derivative_path({"sub": "01", "ses": "pre", "desc": "deviations"}, "scores", ".tsv")
    long = names.derivative_path({"subject": "sub-01", "session": "ses-pre", "description": "deviations"},
                                 "scores", ".tsv")
    assert short == long == Path("sub-01/ses-pre/anat/sub-01_ses-pre_desc-deviations_scores.tsv")


def test_no_session_means_no_session_folder():
    assert names.scores_table_path({"sub": "A1"}) == Path("sub-A1/anat/sub-A1_desc-deviations_scores.tsv")
    assert names.subject_entities("sub-A1", float("nan")) == {"sub": "A1"}
    assert names.subject_entities("sub-A1", "n/a") == {"sub": "A1"}


def test_report_and_group_names_sit_at_the_top_level():
    assert names.subject_report_path({"sub": "01", "ses": "2"}) == Path("sub-01_ses-2.html")
    assert names.subject_report_path({"sub": "01"}) == Path("sub-01.html")
    assert names.phenotype_path() == Path("phenotype/normdiff_deviations.tsv")
    assert names.model_dir("default") == Path("models/default")
    assert names.model_card_path("default") == Path("models/default_modelcard.json")


@pytest.mark.parametrize("label", ["../x", "01/../../etc", "a_b", "a-b", "", " ", "01.5", "sub-", "é1"])
def test_path_like_or_non_alphanumeric_labels_are_rejected(label):
    with pytest.raises(InputError, match="not a valid BIDS label"):
        names.derivative_path({"sub": label}, "scores", ".tsv")


def test_bad_session_label_is_rejected_too():
    with pytest.raises(InputError, match="ses label"):
        names.subject_entities("sub-01", "ses-../../x")


def test_unknown_entity_extension_or_hemisphere_is_refused():
    with pytest.raises(ValueError, match="entity 'run'"):
        names.derivative_path({"sub": "01", "run": "1"}, "scores", ".tsv")
    with pytest.raises(ValueError, match="extension"):
        names.derivative_path({"sub": "01"}, "scores", ".csv")
    with pytest.raises(ValueError, match="hemi"):
        names.surface_map_path({"sub": "01"}, "thickness", "left")
    with pytest.raises(ValueError, match="needs a 'sub'"):
        names.derivative_path({"ses": "1"}, "scores", ".tsv")
    with pytest.raises(InputError):
        names.model_dir("../elsewhere")


def test_entity_order_agrees_with_the_bids_schema():
    schema_mod = pytest.importorskip("bidsschematools.schema")
    schema = schema_mod.load_schema()
    order = [schema["objects"]["entities"][e]["name"] for e in schema["rules"]["entities"]]
    positions = [order.index(e) for e in names.ENTITY_ORDER]
    assert positions == sorted(positions)
