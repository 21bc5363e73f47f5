"""Covariate schema and encoder: standardisation, levels, unseen sites, extrapolation flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from normdiff_bids.errors import InputError
from normdiff_bids.model.covariates import (
    UNKNOWN_INDEX,
    CovariateEncoder,
    CovariateEncoderConfig,
    CovariateSchema,
)


@pytest.fixture
def train():
    return pd.DataFrame({
        "age": [20.0, 30.0, 40.0, 50.0, 60.0, 70.0],
        "sex": ["F", "M", "f", "M", "F", "male"],
        "site": ["b", "a", "a", "c", "b", "c"],
        "scanner_field": [1.5, 3.0, 3.0, 1.5, 3.0, 3.0],
    })


def test_schema_standardises_age_and_sorts_levels(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    assert [c.name for c in schema.continuous] == ["age"]
    assert [c.name for c in schema.categorical] == ["sex", "site"]
    assert schema.categorical[0].levels == ["F", "M"]  # "f" and "male" are spellings of F and M
    assert schema.categorical[1].levels == ["a", "b", "c"]
    cont, cat = schema.encode(train)
    assert cont.dtype == np.float32 and cat.dtype == np.int64
    assert cont.shape == (6, 1) and cat.shape == (6, 2)
    assert abs(cont.mean()) < 1e-6 and abs(cont.std() - 1) < 1e-5
    np.testing.assert_array_equal(cat[:, 1], [2, 1, 1, 3, 2, 3])  # level i -> index i + 1, 0 is unknown


def test_extra_numeric_and_categorical_covariates(train):
    table = train.assign(handedness=["L", "R", "R", "R", "L", "R"])
    schema = CovariateSchema.from_table(table, ["age", "sex", "site", "scanner_field", "handedness"])
    assert [c.name for c in schema.continuous] == ["age", "scanner_field"]
    assert [c.name for c in schema.categorical] == ["sex", "site", "handedness"]
    cont, cat = schema.encode(table)
    assert cont.shape == (6, 2) and cat.shape == (6, 3)


def test_sex_coded_zero_one_is_categorical():
    table = pd.DataFrame({"age": [1.0, 2.0, 3.0], "sex": [0, 1, 1]})
    schema = CovariateSchema.from_table(table, ["age", "sex"])
    assert schema.categorical[0].levels == ["0", "1"]


def test_unseen_site_is_an_error_naming_it_unless_marginal(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    new = pd.DataFrame({"age": [25.0], "sex": ["F"], "site": ["siteX"]})
    with pytest.raises(InputError, match=r"'site' has levels never seen in training: \['siteX'\].*"
                                         r"unknown_site='marginal'"):
        schema.encode(new)
    _, cat = schema.encode(new, unknown="marginal")
    assert cat[0, 1] == UNKNOWN_INDEX
    # sex has no trained unknown level: marginal scoring does not apply to it
    with pytest.raises(InputError, match="'sex' has levels never seen"):
        schema.encode(new.assign(sex="X"), unknown="marginal")


def test_missing_columns_and_non_numeric_values_are_named(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    with pytest.raises(InputError, match=r"missing from the table: \['site'\]"):
        schema.encode(train.drop(columns="site"))
    bad = train.assign(age=["20", "thirty", "40", "50", "60", "70"])
    with pytest.raises(InputError, match="'age' must be numeric; row 1: 'thirty'"):
        schema.encode(bad)
    with pytest.raises(InputError, match=r"missing from the table: \['diagnosis'\]"):
        CovariateSchema.from_table(train, ["age", "diagnosis"])
    with pytest.raises(InputError, match="'scanner_field' is constant"):
        CovariateSchema.from_table(train.assign(scanner_field=3.0), ["age", "scanner_field"])


def test_missing_values_and_out_of_range_ages_are_flagged(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    test = pd.DataFrame({"age": [20.0, 70.0, 85.0, np.nan, 19.0],
                         "sex": ["F", "M", "F", "F", "n/a"], "site": ["a"] * 5})
    cont, cat = schema.encode(test)
    np.testing.assert_array_equal(schema.missing_rows(cont, cat), [False, False, False, True, True])
    # the training range itself is not extrapolation; beyond it is
    np.testing.assert_array_equal(schema.out_of_range(cont)[:3], [False, False, True])
    np.testing.assert_allclose(schema.decode_continuous(cont)[:3, 0], [20.0, 70.0, 85.0], rtol=1e-6)


def test_schema_round_trips_through_a_dict(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    again = CovariateSchema.from_dict(schema.to_dict())
    assert again == schema
    for a, b in zip(schema.encode(train), again.encode(train)):
        np.testing.assert_array_equal(a, b)


def test_encoder_shapes_and_site_dropout(train):
    schema = CovariateSchema.from_table(train, ["age", "sex", "site"])
    torch.manual_seed(0)
    encoder = CovariateEncoder(schema, CovariateEncoderConfig(embedding_dim=4, unknown_dropout=0.5))
    assert encoder.cond_dim == 1 + 3 + 4  # age, sex (2 levels + unknown), site (width capped at 4)
    cont, cat = (torch.from_numpy(a) for a in schema.encode(train))
    encoder.eval()
    cond = encoder(cont, cat)
    assert cond.shape == (6, encoder.cond_dim)
    # one row alone gives the same conditioning as inside the batch
    torch.testing.assert_close(encoder(cont[2:3], cat[2:3]), cond[2:3], rtol=0, atol=0)
    # in training, about half the sites become the unknown level; sex is never dropped
    encoder.train()
    big_cont, big_cat = cont.repeat(500, 1), cat.repeat(500, 1)
    out = encoder(big_cont, big_cat, generator=torch.Generator().manual_seed(0))
    unknown_site = encoder.embeddings[1].weight[UNKNOWN_INDEX]
    frac = (out[:, -4:] == unknown_site).all(dim=1).float().mean().item()
    assert 0.45 < frac < 0.55
    torch.testing.assert_close(out[:, 1:4], cond[:, 1:4].repeat(500, 1))


def test_a_declared_kind_wins_over_the_columns_dtype(train):
    # scanner_field is coded with numbers (1.5, 3.0): inferred continuous, declared categorical
    schema = CovariateSchema.from_table(train, ["age", "sex", "scanner_field"],
                                        kinds={"scanner_field": "categorical"})
    assert [c.name for c in schema.categorical] == ["sex", "scanner_field"]
    assert schema.categorical[1].levels == ["1.5", "3"]
    _, cat = schema.encode(train)
    np.testing.assert_array_equal(cat[:, 1], [1, 2, 2, 1, 2, 2])
    with pytest.raises(InputError, match="covariate 'site' must be numeric"):
        CovariateSchema.from_table(train, ["age", "site"], kinds={"site": "continuous"})
    with pytest.raises(InputError, match=r"kinds are given for \['tiv'\], which are not covariates"):
        CovariateSchema.from_table(train, ["age"], kinds={"tiv": "continuous"})


def test_the_estimator_honours_declared_kinds_and_keeps_them_in_the_bundle(train, tmp_path):
    from normdiff_bids import NormativeDiffusion, load_model

    rng = np.random.default_rng(0)
    table = pd.concat([train] * 5, ignore_index=True)
    table["age"] += rng.normal(0, 1, len(table))
    table["idp"] = rng.normal(0, 1, len(table))
    model = NormativeDiffusion(covariates=("age", "sex", "scanner_field"), seed=0, device="cpu", epochs=1,
                               n_samples=20, validation_fraction=0.0, verbose=False, draw_table="off",
                               calibration="off", backbone_config={"hidden": 8, "n_blocks": 1},
                               covariate_kinds={"scanner_field": "categorical"}).fit(table)
    kinds = {c["name"]: c["kind"] for c in model.model_card()["covariates"]}
    assert kinds == {"age": "continuous", "sex": "categorical", "scanner_field": "categorical"}
    model.save(tmp_path / "m")
    assert load_model(tmp_path / "m").covariate_kinds == {"scanner_field": "categorical"}
    with pytest.raises(ValueError, match="covariate_kinds="):
        NormativeDiffusion(covariate_kinds=["scanner_field"]).fit(table)
