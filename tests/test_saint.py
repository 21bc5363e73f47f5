"""SAINT denoiser: shape contract, per-row evaluation, the training-only intersample path, presets, and the
backbone working through NormativeDiffusion (persistence and calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import centile_errors

from normdiff_bids.model.backbones import BACKBONES, FiLMMLP, FiLMMLPConfig, get_spec, preset_config
from normdiff_bids.model.saint import PAPER_EPOCHS, SAINT, SAINT_LR, SAINTConfig

#: A small network for fast tests (the architecture is the same at every size).
TINY = {"d_model": 16, "n_blocks": 2, "n_heads": 2, "time_embedding_dim": 16}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_net(n_features=5, cond_dim=3, seed=0, **overrides):
    torch.manual_seed(seed)
    return SAINT(n_features, cond_dim, SAINTConfig(**{**TINY, **overrides}))


def inputs(rows, n_features=5, cond_dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n_features, generator=g), torch.rand(rows, generator=g),
            torch.randn(rows, cond_dim, generator=g))


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("n_features", [1, 2, 7, 40])
def test_forward_maps_rows_to_one_output_per_idp(n_features):
    net = make_net(n_features).eval()
    x, t, cond = inputs(9, n_features)
    out = net(x, t, cond)
    assert out.shape == (9, n_features) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_grouped_samples_match_the_flattened_batch():
    """[R, S, D] with one (t, cond) per row gives what the flattened [R*S, D] batch gives."""
    net = make_net().eval()
    x, t, cond = inputs(4)
    xs = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(3))
    grouped = net(xs, t, cond)
    flat = net(xs.reshape(24, 5), t.repeat_interleave(6), cond.repeat_interleave(6, dim=0))
    assert grouped.shape == (4, 6, 5)
    torch.testing.assert_close(grouped.reshape(24, 5), flat, rtol=0, atol=1e-5)


def test_wrong_shapes_are_refused_with_the_expected_shape():
    net = make_net()
    x, t, cond = inputs(4)
    with pytest.raises(ValueError, match=r"x of shape \[B, 5\]"):
        net(x[:, :4], t, cond)
    with pytest.raises(ValueError, match=r"t of shape \[4\]"):
        net(x, t[:3], cond)
    with pytest.raises(ValueError, match=r"cond \[4, 3\]"):
        net(x, t, cond[:, :2])


def test_no_covariates_is_allowed():
    net = make_net(cond_dim=0).eval()
    x, t, _ = inputs(3)
    assert net(x, t, torch.empty(3, 0)).shape == (3, 5)


# ---------------------------------------------------------------------------------- per-row evaluation
@pytest.mark.parametrize("n_features", [2, 20])
def test_eval_output_of_a_row_is_identical_alone_and_inside_any_batch(n_features):
    """Scoring a participant alone gives bit-identical network outputs to scoring it in a cohort."""
    net = make_net(n_features, dropout=0.1).eval()
    x, t, cond = inputs(70, n_features)
    with torch.no_grad():
        full = net(x, t, cond)
        for i in (0, 13, 69):
            assert torch.equal(net(x[i:i + 1], t[i:i + 1], cond[i:i + 1]), full[i:i + 1])
        for lo, hi in ((0, 3), (10, 27), (5, 70)):
            assert torch.equal(net(x[lo:hi], t[lo:hi], cond[lo:hi]), full[lo:hi])
        perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
        assert torch.equal(net(x[perm], t[perm], cond[perm]), full[perm])


def test_eval_mode_never_uses_intersample_attention():
    net = make_net().eval()
    calls = []
    net.intersample_block.register_forward_hook(lambda *args: calls.append(1))
    x, t, cond = inputs(8)
    for _ in range(20):
        net(x, t, cond)
    assert not calls
    with pytest.raises(ValueError, match="training-time"):
        net(x, t, cond, intersample=True)


# ------------------------------------------------------------------------- training-only intersample
def test_intersample_attention_mixes_rows_in_training_and_is_trained():
    net = make_net(dropout=0.0).train()
    x, t, cond = inputs(8)
    on = net(x, t, cond, intersample=True)
    off = net(x, t, cond, intersample=False)
    assert not torch.allclose(on, off)

    # with the block on, a row's output depends on the other rows; with it off, it does not
    x2 = x.clone()
    x2[1:] += 1.0
    assert not torch.allclose(net(x2, t, cond, intersample=True)[0], on[0])
    torch.testing.assert_close(net(x2, t, cond, intersample=False)[0], off[0])

    on.pow(2).mean().backward()
    grads = [p.grad for p in net.intersample_block.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    net.zero_grad(set_to_none=True)
    net(x, t, cond, intersample=False).pow(2).mean().backward()
    assert all(p.grad is None for p in net.intersample_block.parameters())
    assert net.head.weight.grad is not None


def test_intersample_is_drawn_with_its_probability_in_training():
    net = make_net(intersample_p=0.5).train()
    calls = []
    net.intersample_block.register_forward_hook(lambda *args: calls.append(1))
    x, t, cond = inputs(4)
    torch.manual_seed(0)
    for _ in range(200):
        net(x, t, cond)
    # Binomial(200, 0.5): 100 +- 7 (SD); 60..140 is far outside any plausible draw of a correct coin
    assert 60 < len(calls) < 140


def test_intersample_can_be_left_out_entirely():
    net = make_net(intersample=False).train()
    assert net.intersample_block is None
    x, t, cond = inputs(4)
    assert net(x, t, cond).shape == (4, 5)
    with pytest.raises(ValueError, match="no intersample block"):
        net(x, t, cond, intersample=True)


# ------------------------------------------------------------------------------ configuration, presets
def test_config_round_trips_and_rejects_bad_values():
    config = SAINTConfig.budgeted(5000, 20)
    assert SAINTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown SAINT config keys"):
        SAINTConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        SAINTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="intersample_after"):
        SAINTConfig(n_blocks=2, intersample_after=5)


def test_paper_preset_is_the_published_network():
    paper = SAINTConfig.paper()
    shape = (paper.d_model, paper.n_blocks, paper.n_heads, paper.ffn_mult, paper.dropout)
    assert shape == (160, 5, 8, 4, 0.1)
    assert paper.intersample and paper.intersample_after == 4 and paper.intersample_p == 0.5
    assert paper.budgeted_epochs(5000, 20) == PAPER_EPOCHS == 600
    entry = get_spec("saint").preset("paper")
    assert entry.config(10, 10) == paper and preset_config("saint", "paper") == paper
    assert (entry.lr, entry.batch_size, entry.epochs(paper, 5000, 20, 8, 1024)) == (SAINT_LR, 1024, 600)
    assert SAINT_LR == 3e-4
    with pytest.raises(ValueError, match="unknown preset 'huge' for backbone 'saint'"):
        preset_config("saint", "huge")


def test_budgeted_preset_spends_a_fixed_compute_budget():
    small, large = SAINTConfig.budgeted(5000, 20), SAINTConfig.budgeted(5000, 200)
    # wider D -> narrower network, but every IDP keeps its token: cost per row stays within ~4x
    assert large.d_model < small.d_model
    assert large.forward_flops(200) < 4 * small.forward_flops(20)
    assert large.forward_flops(200) < SAINTConfig.paper().forward_flops(200) / 20
    # epochs shrink with N and with the cost of a row, and stay within [50, 600]
    assert small.budgeted_epochs(4500, 20) > small.budgeted_epochs(9000, 20) >= 50
    assert large.budgeted_epochs(5400, 200) < small.budgeted_epochs(5400, 20)
    assert small.budgeted_epochs(100, 20) == 600
    default = get_spec("saint").preset("default")
    assert default.config(5000, 20) == small and (default.lr, default.batch_size) == (SAINT_LR, 256)
    assert default.epochs(small, 4500, 20, 8, 256) == small.budgeted_epochs(4500, 20, 8)


def test_registry_resolves_saint_and_its_cost_is_measured_against_the_mlp():
    module_cls, config_cls = BACKBONES["saint"]
    assert module_cls is SAINT and config_cls is SAINTConfig
    # the FLOP model: the paper network at D=200 is hundreds of times the paper FiLM-MLP per row
    mlp = FiLMMLP(200, 8, FiLMMLPConfig())
    mlp_flops = 2 * sum(m.weight.numel() for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    assert SAINTConfig.paper().forward_flops(200) / mlp_flops > 100


# ---------------------------------------------------------------------------- through the estimator
def test_estimator_with_saint_saves_and_loads_to_identical_scores(cohort, tmp_path):
    from normdiff_bids import NormativeDiffusion, load_model

    train, test = cohort.sample(300, seed=1), cohort.sample(10, seed=2)
    model = NormativeDiffusion(backbone="saint", seed=0, epochs=3, n_samples=40, steps=6,
                               backbone_config=TINY, verbose=False).fit(train)
    assert model.backbone_config_.d_model == 16 and model.backbone_config_.preset == "budgeted"
    model.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.backbone_config_ == model.backbone_config_
    assert isinstance(loaded.network_, SAINT)
    np.testing.assert_array_equal(loaded.predict_centiles(test).to_numpy(),
                                  model.predict_centiles(test).to_numpy())
    # a participant scored alone gets exactly its scores inside the group
    np.testing.assert_array_equal(loaded.predict_centiles(test.iloc[[4]]).to_numpy(),
                                  model.predict_centiles(test).to_numpy()[[4]])


@pytest.mark.slow
def test_saint_centiles_are_calibrated_against_the_true_distribution(cohort):
    """Given a synthetic cohort with exact conditional CDFs, SAINT's centiles track the true ones."""
    from normdiff_bids import NormativeDiffusion

    train, test = cohort.sample(1500, seed=11), cohort.sample(100, seed=12)
    model = NormativeDiffusion(backbone="saint", seed=0, epochs=40, batch_size=128, n_samples=200, steps=10,
                               backbone_config={"d_model": 32, "n_blocks": 2, "n_heads": 4,
                                                "time_embedding_dim": 32},
                               verbose=False).fit(train)
    err, wrong = centile_errors(model, test, cohort.cdf(test).to_numpy())
    assert err < 0.08
    assert wrong > err + 0.04
