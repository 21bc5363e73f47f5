"""Diffusion process: configs, the reference setting, and every sampler against an exact denoiser."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from normdiff_bids.model.diffusion import SAMPLERS, GaussianDiffusion, augment_inputs
from normdiff_bids.model.schedule import DiffusionConfig, EDMSchedule

MU = torch.tensor([1.5, -0.5])
SD = torch.tensor([0.5, 2.0])


class ExactGaussianDenoiser(nn.Module):
    """The optimal network for data ``N(MU, SD^2)`` (independent per feature), in the process's own
    parameterisation, so a sampler's output distribution can be checked without any training.

    ``E[x0 | x_t] = MU + alpha SD^2 / (alpha^2 SD^2 + sigma^2) (x_t - alpha MU)``.
    """

    def __init__(self, diffusion: GaussianDiffusion, perturb: float = 0.0):
        super().__init__()
        self.diffusion, self.perturb = diffusion, perturb
        self.calls = 0

    def forward(self, x_in, t_in, cond):
        self.calls += 1
        cfg = self.diffusion.config
        t_in = t_in.double()
        x_in = x_in.double()
        if cfg.process == "edm":
            sigma = torch.exp(4 * t_in)[:, None]
            alpha = torch.ones_like(sigma)
            c_skip, c_out, c_in = self.diffusion.schedule.preconditioning(sigma)
            x = x_in / c_in
        else:
            t = torch.round(t_in * cfg.timesteps).long()
            alpha = torch.as_tensor(self.diffusion.schedule.alpha)[t][:, None]
            sigma = torch.as_tensor(self.diffusion.schedule.sigma)[t][:, None]
            x = x_in
        mu, var = MU.double(), SD.double() ** 2
        x0 = mu + alpha * var / (alpha ** 2 * var + sigma ** 2) * (x - alpha * mu)
        x0 = x0 + self.perturb  # a small, systematic denoising error
        if cfg.process == "edm":
            out = (x0 - c_skip * x) / c_out
        elif cfg.prediction == "eps":
            out = (x - alpha * x0) / sigma
        elif cfg.prediction == "v":
            out = (alpha * x - x0) / sigma
        else:
            out = x0
        return out.float()


def _draw(diff, net, sampler, steps, n=4000, seed=0, eta=None):
    g = torch.Generator().manual_seed(seed)
    k = diff.noise_draws(sampler, steps, eta=eta)
    noise = torch.randn(k, n, 2, generator=g)
    cond = torch.zeros(n, 3)
    return diff.sample(net, cond, noise, sampler=sampler, steps=steps, eta=eta)


def test_reference_setting_is_the_default():
    cfg = DiffusionConfig()
    assert (cfg.process, cfg.schedule, cfg.timesteps, cfg.prediction) == ("vp", "linear", 100, "eps")
    diff = GaussianDiffusion(cfg)
    betas = diff.schedule.betas
    assert betas[0] == pytest.approx(2e-6) and betas[-1] == pytest.approx(0.6) and len(betas) == 100
    assert diff.default_steps("ddpm") == 100
    assert diff.noise_draws("ddpm") == 100  # the start plus one per step but the last
    assert diff.noise_draws("ddim", 20) == 1 and diff.noise_draws("dpmpp2m", 10) == 1
    assert diff.noise_draws("dpmpp2m-sde", 20) == 20 and diff.noise_draws("ddim", 20, eta=0.5) == 20


def test_config_round_trip_and_validation():
    cfg = DiffusionConfig(schedule="cosine", prediction="v", x0_clip=10.0, spacing="logsnr")
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    assert GaussianDiffusion(cfg.to_dict()).config == cfg
    with pytest.raises(ValueError, match="prediction='noise'"):
        DiffusionConfig(prediction="noise")
    with pytest.raises(ValueError, match="unknown DiffusionConfig field"):
        DiffusionConfig.from_dict({"steps": 3})
    with pytest.raises(ValueError, match="unknown sampler"):
        GaussianDiffusion().noise_draws("euler", 10)


def _exact_ancestral_sd(diff, sd):
    """SD that ancestral sampling with the exact denoiser produces for N(mu, sd^2) data, by the
    linear-Gaussian recursion over the sampler's levels (independent of the sampler code)."""
    levels = diff.sampling_levels(diff.config.timesteps)
    var = 1.0
    for i in range(levels.n_evals):
        a_t, s_t = levels.alpha[i], levels.sigma[i]
        a_s, s_s = levels.alpha[i + 1], levels.sigma[i + 1]
        gain = a_t * sd ** 2 / (a_t ** 2 * sd ** 2 + s_t ** 2)  # d E[x0 | x_t] / d x_t
        if s_s == 0:
            return math.sqrt(gain ** 2 * var)
        s_ts2 = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
        c_x, c_0 = (a_t / a_s) * s_s ** 2 / s_t ** 2, a_s * s_ts2 / s_t ** 2
        step_var = s_ts2 * s_s ** 2 / s_t ** 2 if diff.config.ddpm_variance == "posterior" else s_ts2
        var = (c_x + c_0 * gain) ** 2 * var + step_var


@pytest.mark.parametrize("variance", ["posterior", "forward"])
def test_reference_ddpm_matches_the_exact_gaussian_recursion(variance):
    # Given the exact denoiser for N(MU, SD^2), the 100-step ancestral sampler of the reference setting
    # returns the mean, and the SD that the exact recursion over its levels predicts (the reference
    # schedule's coarse levels make "posterior" under-disperse by ~10% and "forward" over-disperse by
    # ~3% at SD 0.5).
    diff = GaussianDiffusion(DiffusionConfig(ddpm_variance=variance))
    x = _draw(diff, ExactGaussianDenoiser(diff), "ddpm", 100, n=8000)
    n = x.shape[0]
    assert torch.all(torch.abs(x.mean(0) - MU) < 4 * SD / math.sqrt(n))
    expected = torch.tensor([_exact_ancestral_sd(diff, float(s)) for s in SD], dtype=torch.float32)
    # SD of a sample SD is about sd / sqrt(2n): 4 of those is 3.2% at n = 8000
    assert torch.allclose(x.std(0), expected, rtol=0.032), (x.std(0), expected)
    if variance == "posterior":
        assert expected[0] < 0.92 * SD[0]


SETTINGS = [
    (dict(ddpm_variance="forward"), "ddpm", 100, 0.05),
    (dict(schedule="cosine"), "ddpm", 100, 0.08),
    (dict(prediction="x0", schedule="cosine", ddpm_variance="forward"), "ddpm", 50, 0.08),
    (dict(x0_clip=10.0, spacing="logsnr"), "ddim", 50, 0.08),
    (dict(x0_clip=10.0, spacing="logsnr"), "dpmpp2m", 10, 0.08),
    (dict(prediction="v", schedule="cosine", spacing="logsnr"), "dpmpp2m", 10, 0.09),
    (dict(prediction="v", schedule="cosine", spacing="logsnr"), "dpmpp2m", 20, 0.06),
    (dict(prediction="v", schedule="cosine", spacing="logsnr"), "dpmpp2m-sde", 30, 0.06),
    (dict(schedule="cosine", spacing="logsnr"), "ddim", 100, 0.06),
    (dict(process="edm"), "ddpm", 100, 0.08),
    (dict(process="edm"), "ddim", 100, 0.05),
    (dict(process="edm"), "dpmpp2m", 30, 0.04),
    (dict(process="edm"), "dpmpp2m-sde", 40, 0.06),
]


@pytest.mark.parametrize(("overrides", "sampler", "steps", "sd_tol"), SETTINGS)
def test_every_sampler_reproduces_gaussian_data(overrides, sampler, steps, sd_tol):
    # Mean within 0.06 data-SDs and SD within sd_tol (relative): each sampler's discretisation error
    # with the exact denoiser, measured at n=20000 (docs/method.md), plus ~3.5% (3 standard errors at n=4000).
    diff = GaussianDiffusion(DiffusionConfig(**overrides))
    net = ExactGaussianDenoiser(diff)
    x = _draw(diff, net, sampler, steps)
    assert torch.all(torch.isfinite(x))
    assert net.calls == steps
    assert torch.all(torch.abs(x.mean(0) - MU) < 0.06 * SD), x.mean(0)
    assert torch.allclose(x.std(0), SD, rtol=sd_tol), x.std(0)


class OutputError(ExactGaussianDenoiser):
    """The exact denoiser plus a constant error of 0.01 on the network output (in its own parameterisation),
    the way a trained network is slightly off at every level."""

    def forward(self, x_in, t_in, cond):
        return super().forward(x_in, t_in, cond) + 0.01


def test_unclipped_eps_prediction_explodes_in_few_step_solvers_and_the_clip_bounds_it():
    # eps-prediction turns an eps error d into an x0 error d * sigma_t / alpha_t, about 3e6 d at the
    # first level of the reference schedule; a multistep solver carries it into later steps (here with
    # time-uniform steps, which start at t = T).
    diff = GaussianDiffusion(DiffusionConfig(spacing="time"))
    wild = _draw(diff, OutputError(diff), "dpmpp2m", 10, n=1000)
    assert wild.abs().max() > 30
    clipped = GaussianDiffusion(DiffusionConfig(x0_clip=10.0, spacing="time"))
    assert _draw(clipped, OutputError(clipped), "dpmpp2m", 10, n=1000).abs().max() <= 10.0
    # v-prediction maps the same error to an x0 error of at most 0.01 * sigma_t: no amplification
    v_diff = GaussianDiffusion(DiffusionConfig(prediction="v", spacing="time"))
    x = _draw(v_diff, OutputError(v_diff), "dpmpp2m", 10, n=1000)
    assert torch.all(torch.abs(x.mean(0) - MU) < 0.15 * SD)


def test_samples_of_a_row_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    diff = GaussianDiffusion(DiffusionConfig(prediction="v"))

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2 + 1 + 3, 2)

        def forward(self, x, t, cond):
            return self.lin(torch.cat([x, t[:, None], cond], dim=1))

    net = TinyNet()
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(6, 3, generator=g)
    for sampler in SAMPLERS:
        noise = torch.randn(diff.noise_draws(sampler, 8), 6, 2, generator=g)
        full = diff.sample(net, cond, noise, sampler=sampler, steps=8)
        alone = diff.sample(net, cond[2:3], noise[:, 2:3], sampler=sampler, steps=8)
        assert torch.allclose(full[2:3], alone, atol=1e-6)


def test_grouped_noise_and_callable_noise_match_flat_noise():
    diff = GaussianDiffusion(DiffusionConfig(prediction="v"))
    net = ExactGaussianDenoiser(diff)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(diff.noise_draws("dpmpp2m-sde", 6), 3, 5, 2, generator=g)  # 3 rows x 5 samples
    cond = torch.zeros(3, 4)
    grouped = diff.sample(net, cond, noise, sampler="dpmpp2m-sde", steps=6)
    flat = diff.sample(net, cond.repeat_interleave(5, 0), noise.reshape(noise.shape[0], 15, 2),
                       sampler="dpmpp2m-sde", steps=6)
    lazy = diff.sample(net, cond, lambda k: noise[k], sampler="dpmpp2m-sde", steps=6)
    assert grouped.shape == (3, 5, 2)
    assert torch.allclose(grouped.reshape(15, 2), flat, atol=1e-6)
    assert torch.equal(grouped, lazy)
    with pytest.raises(ValueError, match="noise_draws"):
        diff.sample(net, cond, noise[:2], sampler="dpmpp2m-sde", steps=6)


@pytest.mark.parametrize("overrides", [dict(), dict(prediction="v"), dict(process="edm")])
def test_training_loss_is_reproducible_and_minimised_by_the_exact_denoiser(overrides):
    diff = GaussianDiffusion(DiffusionConfig(**overrides))
    x0 = MU + SD * torch.randn(2048, 2, generator=torch.Generator().manual_seed(3))
    cond = torch.zeros(2048, 4)
    exact = ExactGaussianDenoiser(diff)
    loss = diff.training_loss(exact, x0, cond, generator=torch.Generator().manual_seed(4))
    again = diff.training_loss(exact, x0, cond, generator=torch.Generator().manual_seed(4))
    assert loss.dim() == 0 and torch.equal(loss, again)
    worse = diff.training_loss(ExactGaussianDenoiser(diff, perturb=0.3), x0, cond,
                               generator=torch.Generator().manual_seed(4))
    assert worse > loss


@pytest.mark.slow
def test_short_training_run_learns_a_gaussian(one_thread):
    # A tiny conditional network trained for a few hundred steps on N(MU, SD^2) samples its mean and
    # spread roughly (loose tolerances: this checks that loss and sampler fit together, not quality).
    torch.manual_seed(0)
    diff = GaussianDiffusion(DiffusionConfig(prediction="v", spacing="logsnr"))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(2 + 16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                                      nn.Linear(64, 2))

        def forward(self, x, t, cond):
            freqs = torch.arange(1, 9, dtype=torch.float32) * math.pi
            emb = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
            return self.body(torch.cat([x, emb], dim=1))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(300):
        x0 = MU + SD * torch.randn(128, 2, generator=g)
        loss = diff.training_loss(net, augment_inputs(x0, generator=g), torch.zeros(128, 0), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _draw(diff, net, "dpmpp2m", 15, n=3000)
    assert torch.all(torch.abs(x.mean(0) - MU) < 0.25 * SD)
    assert torch.allclose(x.std(0), SD, rtol=0.25)


def test_edm_preconditioning_matches_karras_table():
    sched = EDMSchedule(DiffusionConfig(process="edm", sigma_data=0.5))
    c_skip, c_out, c_in = sched.preconditioning(np.float64(2.0))
    assert c_skip == pytest.approx(0.25 / 4.25)
    assert c_out == pytest.approx(2.0 * 0.5 / math.sqrt(4.25))
    assert c_in == pytest.approx(1 / math.sqrt(4.25))
    levels = sched.sampling_levels(10)
    assert levels.sigma[0] == pytest.approx(80.0) and levels.sigma[-2] == pytest.approx(0.002)
    assert levels.sigma[-1] == 0 and np.all(np.diff(levels.sigma) < 0)


def test_logsnr_spacing_skips_the_pure_noise_steps():
    diff = GaussianDiffusion(DiffusionConfig(spacing="logsnr", logsnr_min=-7.0))
    ts = diff.schedule.timesteps_for(10)
    assert len(set(ts)) == 10 and ts[-1] == 1 and np.all(np.diff(ts) < 0)
    lam = diff.sampling_levels(10).logsnr[:-1]
    assert lam[0] >= -7.5 and ts[0] < 100
