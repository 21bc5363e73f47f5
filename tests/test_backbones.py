"""Backbones: the FiLM-MLP's shape contract, batch independence, grouped sampling and the registry."""

from __future__ import annotations

import pytest
import torch

from normdiff_bids.model.backbones import (
    BACKBONES,
    FILM_MLP_PRESETS,
    FiLMMLP,
    FiLMMLPConfig,
    get_backbone,
    preset_config,
)
from normdiff_bids.model.backbones.film_mlp import SMALL_COHORT_ROWS, default_config

SMALL = FiLMMLPConfig(hidden=32, n_blocks=3, time_embed_dim=16)


def _trained_like(net):
    """Give the FiLM layer and BatchNorm statistics non-trivial values, as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def _inputs(rows, d=5, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g), torch.rand(rows, generator=g), torch.randn(rows, c, generator=g)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("residual", [False, True])
def test_shapes_and_row_independence_in_eval(norm, residual):
    net = _trained_like(FiLMMLP(5, 4, FiLMMLPConfig(hidden=32, n_blocks=3, time_embed_dim=16, norm=norm,
                                                     residual=residual)))
    x, t, cond = _inputs(7)
    out = net(x, t, cond)
    assert out.shape == (7, 5) and out.dtype == torch.float32
    # one row alone gives the same output as inside the batch, and another batch does not change it
    assert torch.allclose(net(x[3:4], t[3:4], cond[3:4]), out[3:4], atol=1e-5)
    x2, t2, cond2 = _inputs(7, seed=9)
    mixed = net(torch.cat([x[3:4], x2]), torch.cat([t[3:4], t2]), torch.cat([cond[3:4], cond2]))
    assert torch.allclose(mixed[:1], out[3:4], atol=1e-5)


def test_grouped_forward_equals_flat_forward():
    net = _trained_like(FiLMMLP(5, 4, SMALL))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 5, generator=g)
    t, cond = torch.rand(3, generator=g), torch.randn(3, 4, generator=g)
    grouped = net(x, t, cond)
    flat = net(x.reshape(18, 5), t.repeat_interleave(6), cond.repeat_interleave(6, 0))
    assert grouped.shape == (3, 6, 5)
    assert torch.allclose(grouped.reshape(18, 5), flat, atol=1e-5)


def test_film_starts_as_identity_and_depends_on_time_and_covariates_after_training():
    net = FiLMMLP(5, 4, SMALL)
    x, t, cond = _inputs(4)
    assert torch.count_nonzero(net.film_parameters(t, cond)) == 0
    net = _trained_like(net)
    assert not torch.allclose(net(x, t, cond), net(x, t + 0.3, cond))
    assert not torch.allclose(net(x, t, cond), net(x, t, cond + 1))


def test_gradients_reach_the_covariates():
    net = FiLMMLP(5, 4, SMALL).train()
    _trained_like(net).train()
    x, t, cond = _inputs(16)
    cond.requires_grad_(True)
    net(x, t, cond).pow(2).mean().backward()
    assert cond.grad is not None and torch.count_nonzero(cond.grad) > 0


def test_bad_shapes_are_named():
    net = FiLMMLP(5, 4, SMALL)
    x, t, cond = _inputs(3)
    with pytest.raises(ValueError, match=r"x must be \[B, 5\]"):
        net(x[:, :4], t, cond)
    with pytest.raises(ValueError, match=r"cond \[3, 4\]"):
        net(x, t, cond[:, :2])


def test_config_round_trip_and_presets():
    cfg = FiLMMLPConfig(hidden=64, residual=True, norm="layer")
    assert FiLMMLPConfig.from_dict(cfg.to_dict()) == cfg
    assert FiLMMLP(3, 2, cfg.to_dict()).config == cfg
    paper = preset_config("film-mlp", "paper")
    assert (paper.hidden, paper.n_blocks, paper.dropout, paper.norm, paper.residual) == (384, 8, 0.1, "batch",
                                                                                           False)
    assert preset_config("film-mlp", "default", hidden=128).hidden == 128
    # the default preset sizes the network by the cohort: half the width below SMALL_COHORT_ROWS rows
    assert default_config(SMALL_COHORT_ROWS, 20) == FILM_MLP_PRESETS["default"]
    assert default_config(SMALL_COHORT_ROWS - 1, 20).hidden == FILM_MLP_PRESETS["default"].hidden // 2
    assert default_config(300, 20).n_blocks == FILM_MLP_PRESETS["default"].n_blocks
    assert set(FILM_MLP_PRESETS) >= {"paper", "default"}
    with pytest.raises(ValueError, match="unknown FiLMMLPConfig field"):
        FiLMMLPConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="norm='group'"):
        FiLMMLPConfig(norm="group")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("film-mlp", "huge")


def test_registry_resolves_names_and_rejects_unknown_ones():
    assert get_backbone("film-mlp") == (FiLMMLP, FiLMMLPConfig)
    assert set(BACKBONES) == {"film-mlp", "saint"}
    with pytest.raises(ValueError, match="unknown backbone 'resnet'.*film-mlp"):
        get_backbone("resnet")


def test_saint_resolves_lazily_to_its_module():
    pytest.importorskip("normdiff_bids.model.saint")
    cls, config_cls = get_backbone("saint")
    assert (cls.__name__, config_cls.__name__) == ("SAINT", "SAINTConfig")
