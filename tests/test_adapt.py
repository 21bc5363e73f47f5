"""Adapting a trained model to new sites from a few controls (no refit of the network)."""

import warnings

import numpy as np
import pytest

from normdiff_bids import NormativeDiffusion, load_model
from normdiff_bids.data.synthetic import SyntheticCohort
from normdiff_bids.errors import InputError


@pytest.fixture(scope="module")
def setting():
    gen = SyntheticCohort(n_idps=4, n_sites=4, seed=3, site_effect=1.0)
    table = gen.sample(1400, seed=1)
    # the last site gets a large, known shift: +1.2 SD in every IDP, which no other site has
    new_site = gen.sites[-1]
    rows = table["site"] == new_site
    z = gen.normal_scores(table.loc[rows]).to_numpy()
    table.loc[rows, gen.idps] = gen.idps_from_normal_scores(table.loc[rows], z + 1.2)
    train = table.loc[~rows].reset_index(drop=True)
    adapt_rows, test_rows = table.loc[rows].iloc[:40], table.loc[rows].iloc[40:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = NormativeDiffusion(seed=0, epochs=40, n_samples=300, verbose=False,
                                   unknown_site="marginal").fit(train, idps=gen.idps)
    # true centiles of the new site's test people (the generator's, shifted by the planted +1.2)
    truth = gen.cdf(test_rows).to_numpy()
    truth = np.clip(__import__("scipy").stats.norm.cdf(__import__("scipy").stats.norm.ppf(truth) - 1.2),
                    1e-9, 1 - 1e-9)
    return gen, model, train, adapt_rows, test_rows, truth


def _centiles(model, table, idps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.predict_centiles(table)[idps].to_numpy()


def test_known_sites_are_bit_identical_and_the_new_site_is_learnt(setting, tmp_path):
    gen, model, train, adapt_rows, test_rows, truth = setting
    known = train.iloc[:60]
    before_known = _centiles(model, known, gen.idps)
    before_new = _centiles(model, test_rows, gen.idps)         # scored under the marginal
    adapted = model.adapt(adapt_rows)
    np.testing.assert_array_equal(_centiles(adapted, known, gen.idps), before_known)
    after_new = _centiles(adapted, test_rows, gen.idps)
    err_before = np.abs(before_new - truth).mean()
    err_after = np.abs(after_new - truth).mean()
    assert err_before > 0.15                  # the shift is invisible to the marginal
    assert err_after < 0.08 and err_after < 0.5 * err_before
    # the original model is untouched, and the adaptation is recorded and survives a round trip
    assert model.adaptations_ == []
    assert adapted.adaptations_[-1]["sites"] == {gen.sites[-1]: 40}
    adapted.save(tmp_path / "adapted")
    again = load_model(tmp_path / "adapted")
    np.testing.assert_array_equal(_centiles(again, test_rows, gen.idps), after_new)
    assert again.model_card()["adaptations"][-1]["sites"] == {gen.sites[-1]: 40}


def test_a_handful_of_controls_is_shrunk_not_trusted(setting):
    gen, model, _, adapt_rows, test_rows, truth = setting
    few = model.adapt(adapt_rows.iloc[:5])
    before = np.abs(_centiles(model, test_rows, gen.idps) - truth).mean()
    assert np.abs(_centiles(few, test_rows, gen.idps) - truth).mean() < before


def test_bad_adaptation_tables_are_named(setting):
    gen, model, train, adapt_rows, _, _ = setting
    with pytest.raises(InputError, match="already knows site"):
        model.adapt(train.iloc[:10])
    assert model.adapt(train.iloc[:30], refine=True).adaptations_[-1]["refined"]
    with pytest.raises(InputError, match="at least 2 controls"):
        model.adapt(adapt_rows.iloc[:1])
    with pytest.raises(InputError, match="IDP columns missing"):
        model.adapt(adapt_rows.drop(columns=[gen.idps[0]]))
    with pytest.raises(InputError, match="covariate columns missing"):
        model.adapt(adapt_rows.drop(columns=["sex"]))
