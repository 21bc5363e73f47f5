"""The covariate specification: built from the command line, looked up by role, checked, and carried as
plain JSON."""

from __future__ import annotations

import json

import pytest

from normdiff_bids.covariate_spec import CovariateSpec, CovariateSpecs, parse_covariate_option
from normdiff_bids.errors import InputError

MODEL_KINDS = {"age": "continuous", "sex": "categorical", "site": "categorical", "tiv": "continuous"}


def test_the_default_is_age_sex_and_site_read_from_columns_of_those_names():
    spec = CovariateSpecs.default()
    assert spec.names == spec.columns == ("age", "sex", "site")
    assert spec.kinds == {"age": "continuous", "sex": "categorical", "site": "categorical"}
    assert [s.role for s in spec] == ["age", "sex", "site"]
    assert spec.extras == ()


def test_options_set_the_roles_columns_and_add_further_covariates():
    spec = CovariateSpecs.from_options(age_column="Age", sex_column="gender", site_column="none",
                                       covariates=["tiv", "field:categorical", "ses:continuous"])
    assert spec.names == ("age", "sex", "tiv", "field", "ses")
    assert spec.columns == ("Age", "gender", "tiv", "field", "ses")
    assert spec.role("age") == CovariateSpec("age", "Age", "continuous", "age")
    assert spec.name_of("site") is None and spec.role("site") is None
    assert spec.names_of("site", "sex") == ("sex",)
    assert spec["tiv"].kind is None  # inferred later, from the values
    assert spec.kinds == {"age": "continuous", "sex": "categorical", "field": "categorical",
                          "ses": "continuous"}
    assert spec.of_kind("categorical") == ("sex", "field")


def test_inferred_kinds_complete_the_specification_and_given_kinds_are_kept():
    spec = CovariateSpecs.from_options(covariates=["tiv", "field:categorical"])
    done = spec.resolved({"tiv": "continuous", "field": "continuous"})
    assert done.kinds["tiv"] == "continuous"
    assert done.kinds["field"] == "categorical"  # declared on the command line: not overridden


def test_the_specification_round_trips_through_plain_json():
    spec = CovariateSpecs.from_options(age_column="Age", covariates=["tiv", "field:categorical"])
    text = json.dumps(spec.to_list())
    assert CovariateSpecs.from_list(json.loads(text)) == spec
    assert CovariateSpecs.from_json(spec.to_json()) == spec
    assert CovariateSpecs.coerce(spec.to_list()) == spec
    assert CovariateSpecs.coerce(None) == CovariateSpecs.default()


@pytest.mark.parametrize("options, message", [
    ({"covariates": ["age"]}, "'age' is the name of the age covariate; choose its participants.tsv column "
                              "with --age-column"),
    ({"covariates": ["site"]}, "--site-column"),
    ({"covariates": ["participant_id"]}, "'participant_id' is an id column of the IDP table"),
    ({"covariates": ["session_id"]}, "'session_id' is an id column"),
    ({"covariates": ["tiv", "tiv:continuous"]}, "covariate 'tiv' (--covariate) is given more than once"),
    ({"site_column": "scanner", "covariates": ["scanner"]}, "column 'scanner' is read twice"),
])
def test_names_that_cannot_be_covariates_are_refused_with_the_fix(options, message):
    with pytest.raises(InputError) as err:
        CovariateSpecs.from_options(**options)
    assert message in str(err.value)


def test_a_kind_that_does_not_exist_is_refused_and_a_role_keeps_its_kind():
    assert parse_covariate_option("tiv") == CovariateSpec("tiv", "tiv")
    assert parse_covariate_option("a:b:categorical") == CovariateSpec("a:b", "a:b", "categorical")
    with pytest.raises(InputError, match="'numeric' is not a kind; write COLUMN, COLUMN:continuous or "
                                         "COLUMN:categorical"):
        parse_covariate_option("tiv:numeric")
    with pytest.raises(InputError, match="the sex covariate is categorical, not continuous"):
        CovariateSpec("sex", "sex", "continuous", "sex")
    with pytest.raises(InputError, match="named 'age' in the IDP table, not 'Age'"):
        CovariateSpec("Age", "Age", role="age")


def test_names_of_idps_or_score_columns_are_refused():
    spec = CovariateSpecs.from_options(covariates=["Left-Hippocampus"])
    spec.check_names(["Right-Hippocampus"], "an IDP")  # no clash
    with pytest.raises(InputError, match=r"'Left-Hippocampus' \(--covariate\) has the name of an IDP"):
        spec.check_names(["Left-Hippocampus"], "an IDP")


def test_for_a_model_the_covariates_are_the_models_with_the_command_lines_columns():
    spec = CovariateSpecs.from_options(age_column="Age")
    used = spec.for_model(["age", "sex", "site", "tiv"], MODEL_KINDS)
    assert used.names == ("age", "sex", "site", "tiv")
    assert used.columns == ("Age", "sex", "site", "tiv")
    assert used.kinds == MODEL_KINDS
    # a site this run reads but the model never used is not read
    assert spec.for_model(["age", "sex"], MODEL_KINDS).names == ("age", "sex")


@pytest.mark.parametrize("options, message", [
    ({"covariates": ["diagnosis"]}, "covariate 'diagnosis' (--covariate) is not one of the model's "
                                    "covariates (age, sex, site, tiv); leave out --covariate diagnosis"),
    ({"covariates": ["tiv:categorical"]}, "is categorical here but continuous in the model; write "
                                          "--covariate tiv:continuous"),
    ({"site_column": "none"}, "the model was trained with a site covariate, and this run reads none; give "
                              "its participants.tsv column with --site-column"),
])
def test_covariates_that_do_not_match_the_model_are_refused(options, message):
    with pytest.raises(InputError) as err:
        CovariateSpecs.from_options(**options).for_model(["age", "sex", "site", "tiv"], MODEL_KINDS)
    assert message in str(err.value)
