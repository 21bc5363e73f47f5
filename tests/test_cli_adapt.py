"""The BIDS-App adapts a pretrained model to a dataset's new site (group --from-model), then scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from product_helpers import TINY_ARGS, snapshot, synthetic_bids

from normdiff_bids.cli.run import main
from normdiff_bids.model.bundle import load_bundle
from normdiff_bids.outputs.tables import read_scores_table


@pytest.mark.slow
def test_pretrained_bundle_adapt_and_participant_scores(tmp_path_factory, capsys):
    bids = synthetic_bids(tmp_path_factory)
    base = tmp_path_factory.mktemp("pretrained") / "normdiff"
    # a reference model that never saw site3 (its rows are scored under the marginal over sites)
    assert main([str(bids), str(base), "group", *TINY_ARGS, "--unknown-site", "marginal",
                 "--reference-query", "site != 'site3'"]) == 0
    model = base / "models" / "default"
    card = json.loads((model / "model.json").read_text())["model_card"]
    assert "site3" not in card["covariates"][-1]["levels"]

    before = snapshot(base)
    out = tmp_path_factory.mktemp("adapted") / "normdiff"
    status = main([str(bids), str(out), "group", *TINY_ARGS, "--from-model", str(model),
                   "--reference-query", "site == 'site3'", "--model-name", "adapted"])
    assert status == 0
    assert main([str(bids), str(out), "participant", *TINY_ARGS, "--participant-label", "001",
                 "--model", str(out / "models" / "adapted")]) == 0
    meta = json.loads((out / "models" / "adapted" / "model.json").read_text())
    adaptation = meta["model_card"]["adaptations"][-1]
    assert list(adaptation["sites"]) == ["site3"] and adaptation["sites"]["site3"] >= 2
    # the network and its draws are the pretrained ones, bit for bit (the stage learnt the new site)
    pretrained, _ = load_bundle(model)
    adapted, _ = load_bundle(out / "models" / "adapted")
    kept = [k for k in pretrained if not k.startswith("location_scale.")]
    assert kept and set(kept) == {k for k in adapted if not k.startswith("location_scale.")}
    for key in kept:
        np.testing.assert_array_equal(adapted[key], pretrained[key])
    assert adapted["location_scale.v_var"].shape[0] == pretrained["location_scale.v_var"].shape[0] + 1
    # the adaptation controls are marked in-sample; everyone is scored, site3 as a known site now
    split = read_scores_table(out / "phenotype" / "normdiff_reference.tsv")
    assert "train" in set(split["split"])
    table = read_scores_table(out / "phenotype" / "normdiff_deviations.tsv")
    assert table.filter(like="_centile").notna().all().all()
    assert list((out / "sub-001").rglob("*_desc-deviations_scores.tsv"))
    # the pretrained output folder is untouched by the adaptation
    assert snapshot(base) == before


def test_from_model_needs_the_group_level(tmp_path_factory, capsys):
    bids = synthetic_bids(tmp_path_factory)
    out = tmp_path_factory.mktemp("adapt_bad") / "normdiff"
    status = main([str(bids), str(out), "participant", "--from-model", str(out / "nothing"), "--quiet"])
    assert status != 0
    err = capsys.readouterr().err
    assert "--from-model" in err and "Traceback" not in err
