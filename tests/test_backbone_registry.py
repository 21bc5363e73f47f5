"""A new backbone is one module and one registry line: a toy MLP registered here fits, scores, saves and
loads through NormativeDiffusion, and the CLI and interface choices come from the same registry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from normdiff_bids import NormativeDiffusion, load_model
from normdiff_bids.model.backbones import (
    BackbonePreset,
    backbone_names,
    get_spec,
    register_backbone,
    unregister_backbone,
)
from normdiff_bids.model.config import ConfigDict


@dataclass
class ToyConfig(ConfigDict):
    hidden: int = 32


class ToyMLP(nn.Module):
    """``x [B, D], t [B], cond [B, C] -> [B, D]``: one hidden layer over the concatenated inputs."""

    def __init__(self, n_features: int, cond_dim: int, config: ToyConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features + cond_dim + 1, config.hidden), nn.SiLU(),
                                 nn.Linear(config.hidden, n_features))

    def forward(self, x, t, cond):
        return self.net(torch.cat([x, cond.to(x.dtype), t.to(x.dtype)[:, None]], dim=-1))


@pytest.fixture
def toy():
    register_backbone("toy-mlp", ToyMLP, ToyConfig)  # the one line a new backbone needs
    yield "toy-mlp"
    unregister_backbone("toy-mlp")


def test_a_registered_toy_backbone_fits_scores_and_reloads(toy, tmp_path):
    from normdiff_bids.data.synthetic import SyntheticCohort

    table = SyntheticCohort(n_idps=3, n_sites=2, seed=0).sample(120, seed=1)
    model = NormativeDiffusion(backbone=toy, epochs=3, n_samples=40, steps=4, seed=0, verbose=False)
    model.fit(table)
    assert isinstance(model.network_, ToyMLP) and model.backbone_config_ == ToyConfig()
    assert model.training_summary_["lr"] == 1e-3 and model.training_summary_["batch_size"] == 1024
    scores = model.score(table.iloc[:10])
    assert scores["centile"].between(0, 1, inclusive="neither").all()
    assert np.isfinite(scores["joint_stat"]).all()
    again = load_model(model.save(tmp_path / "toy"))
    assert np.array_equal(again.score(table.iloc[:10])["centile"], scores["centile"])


def test_registry_entries_carry_their_presets_and_reach_the_cli(toy):
    from normdiff_bids.cli.parser import build_parser

    assert backbone_names()[:2] == ["film-mlp", "saint"] and toy in backbone_names()
    assert set(get_spec(toy).presets) == {"default"}
    with pytest.raises(ValueError, match="unknown preset 'paper' for backbone 'toy-mlp'"):
        NormativeDiffusion(backbone=toy, preset="paper")._backbone_preset()
    opts = build_parser().parse_args(["bids", "out", "group", "--backbone", toy])
    assert opts.backbone == toy


def test_registration_checks_its_entry():
    with pytest.raises(TypeError, match="ConfigDict"):
        register_backbone("bad", ToyMLP, dict)
    with pytest.raises(ValueError, match="'default' preset"):
        register_backbone("bad", ToyMLP, ToyConfig,
                          presets={"paper": BackbonePreset(lambda n, d: ToyConfig())})
    with pytest.raises(ValueError, match="built in"):
        unregister_backbone("film-mlp")
