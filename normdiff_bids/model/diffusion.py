"""Gaussian diffusion over IDP vectors: the training loss and the samplers (DDPM, DDIM, DPM-Solver++).

Every sampler is written in terms of the network's implied x0-prediction and the (alpha_t, sigma_t) of the
forward marginal ``x_t = alpha_t x0 + sigma_t eps`` (see :mod:`normdiff_bids.model.schedule`), so each one
runs unchanged on the discrete VP process and on EDM. All sampling randomness comes in through ``noise``,
which lets a caller give every row its own random stream: a row's samples then never depend on which
other rows share the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from normdiff_bids.model.schedule import DiffusionConfig, EDMSchedule, NoiseLevels, make_schedule

__all__ = ["SAMPLERS", "GaussianDiffusion", "augment_inputs"]

#: Sampler names accepted by :meth:`GaussianDiffusion.sample`.
SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde")

NoiseSource = torch.Tensor | Callable[[int], torch.Tensor]


class GaussianDiffusion:
    """The diffusion process of a :class:`DiffusionConfig`: loss for training, samplers for inference.

    ``net(x, t_in, cond)`` is a backbone: ``x [B, D]``, ``t_in [B]`` float (``t / T`` for VP,
    ``c_noise = log(sigma) / 4`` for EDM), ``cond [B, C]``, output ``[B, D]`` interpreted according to
    ``config.prediction`` (VP) or the Karras preconditioning (EDM).
    """

    def __init__(self, config: DiffusionConfig | dict | None = None):
        if config is None:
            config = DiffusionConfig()
        elif isinstance(config, dict):
            config = DiffusionConfig.from_dict(config)
        self.config = config
        self.schedule = make_schedule(config)

    # ------------------------------------------------------------------ network parameterisation
    def _net_input(self, x, sigma):
        if isinstance(self.schedule, EDMSchedule):
            return x * self.schedule.preconditioning(sigma)[2]
        return x

    def predict_x0(self, net: nn.Module, x: torch.Tensor, alpha, sigma, t_in: torch.Tensor,
                   cond: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """The x0 implied by the network output at noise level (alpha, sigma).

        ``alpha``/``sigma`` are floats or tensors broadcastable to ``x``. ``clip`` applies
        ``config.x0_clip`` (the sampler safeguard); the training loss never clips.
        """
        out = _call_net(net, self._net_input(x, sigma), t_in, cond)
        if isinstance(self.schedule, EDMSchedule):
            c_skip, c_out, _ = self.schedule.preconditioning(sigma)
            x0 = c_skip * x + c_out * out
        elif self.config.prediction == "eps":
            x0 = (x - sigma * out) / alpha
        elif self.config.prediction == "v":
            # v = alpha eps - sigma x0 and alpha^2 + sigma^2 = 1  =>  x0 = alpha x_t - sigma v
            x0 = alpha * x - sigma * out
        else:
            x0 = out
        if clip and self.config.x0_clip is not None:
            x0 = x0.clamp(-self.config.x0_clip, self.config.x0_clip)
        return x0

    # ------------------------------------------------------------------ training
    def training_loss(self, net: nn.Module, x0: torch.Tensor, cond: torch.Tensor,
                      generator: torch.Generator | None = None,
                      observed: torch.Tensor | None = None) -> torch.Tensor:
        """Denoising loss on a batch ``x0 [B, D]`` with ``cond [B, C]``: a scalar tensor.

        VP: uniform t in {1..T}, MSE between the network output and its target (eps, v or x0), which for
        ``prediction="eps"`` is the reference objective. EDM: log-normal sigma and the preconditioned
        target ``(x0 - c_skip x) / c_out``, i.e. the EDM-weighted denoising loss. The noise level and
        the noise are drawn from ``generator`` (in that order) for reproducible training.
        ``observed`` (boolean ``[B, D]``): the loss is averaged over those entries only (rows with
        missing IDPs, whose missing entries the caller filled with stand-in values).
        """
        if x0.dim() != 2:
            raise ValueError(f"x0 must be [batch, features], got shape {tuple(x0.shape)}")
        n = x0.shape[0]
        alpha, sigma, t_in = self.schedule.training_levels(n, generator)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else None)
        alpha, sigma, t_in = (v.to(x0.device, x0.dtype) for v in (alpha, sigma, t_in))
        eps = eps.to(x0.device, x0.dtype)
        a, s = alpha[:, None], sigma[:, None]
        x_t = a * x0 + s * eps
        out = _call_net(net, self._net_input(x_t, s), t_in, cond)
        if isinstance(self.schedule, EDMSchedule):
            c_skip, c_out, _ = self.schedule.preconditioning(s)
            target = (x0 - c_skip * x_t) / c_out
        elif self.config.prediction == "eps":
            target = eps
        elif self.config.prediction == "v":
            target = a * eps - s * x0
        else:
            target = x0
        if observed is None:
            return torch.mean((out - target) ** 2)
        weight = observed.to(out.dtype)
        return torch.sum((out - target) ** 2 * weight) / weight.sum().clamp(min=1.0)

    # ------------------------------------------------------------------ sampling
    def default_steps(self, sampler: str) -> int:
        """Ancestral DDPM defaults to every trained level (the reference); the others to 20 steps."""
        _check_sampler(sampler)
        if sampler == "ddpm" and self.config.process == "vp":
            return self.config.timesteps
        return 100 if sampler == "ddpm" else 20

    def sampling_levels(self, steps: int) -> NoiseLevels:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return self.schedule.sampling_levels(steps)

    def noise_draws(self, sampler: str, steps: int | None = None, eta: float | None = None) -> int:
        """How many noise tensors ``[B, D]`` a run of ``sampler`` with ``steps`` consumes.

        One for the starting point, plus one per intermediate step for stochastic samplers (the last
        step lands on the clean level and adds none).
        """
        _check_sampler(sampler)
        steps = self.default_steps(sampler) if steps is None else steps
        n_evals = self.sampling_levels(steps).n_evals
        return 1 + (n_evals - 1 if _eta(sampler, eta) > 0 else 0)

    @torch.no_grad()
    def sample(self, net: nn.Module, cond: torch.Tensor, noise: NoiseSource, sampler: str = "ddpm",
               steps: int | None = None, eta: float | None = None) -> torch.Tensor:
        """Draw x0 for each row of ``cond [B, C]``.

        Parameters
        ----------
        noise
            Either a tensor ``[n_draws, B, D]`` (or ``[n_draws, B, S, D]`` for ``S`` samples per row
            of ``cond``) with ``n_draws = noise_draws(sampler, steps, eta)``, or a callable
            ``k -> [B, D]`` (or ``[B, S, D]``) returning draw ``k``, for callers that generate noise
            lazily. Entries must be standard normal.
        sampler
            ``"ddpm"``: ancestral sampling with ``config.ddpm_variance`` (with ``steps == T`` the
            reference sampler; fewer steps is respaced DDPM). ``"ddim"``: DDIM with ``eta`` (default 0,
            the deterministic ODE; ``eta=1`` is ancestral sampling with the posterior variance).
            ``"dpmpp2m"``: DPM-Solver++(2M), the second-order multistep ODE solver in data prediction.
            ``"dpmpp2m-sde"``: its SDE variant (midpoint form, ``eta`` default 1).
        steps
            Network evaluations; default :meth:`default_steps`. A VP process has ``timesteps`` levels:
            more steps than that visit each level once.
        eta
            Stochasticity for ``"ddim"`` and ``"dpmpp2m-sde"`` (ignored by the others); ``None`` takes
            the sampler's default.

        Returns ``x0`` with the shape of one noise draw. The network is run in eval mode (its mode is
        restored afterwards) and without gradients.
        """
        _check_sampler(sampler)
        steps = self.default_steps(sampler) if steps is None else steps
        eta = _eta(sampler, eta)
        levels = self.sampling_levels(steps)
        n_draws = 1 + (levels.n_evals - 1 if eta > 0 else 0)
        draw = _noise_reader(noise, n_draws)
        x = draw(0)
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"noise has {x.shape[0]} rows but cond has {cond.shape[0]}")
        sd = self.config.sigma_data
        x = x * math.sqrt(levels.alpha[0] ** 2 * sd ** 2 + levels.sigma[0] ** 2)
        was_training = net.training
        net.eval()
        try:
            if sampler in ("ddpm", "ddim"):
                return self._sample_ddim(net, cond, x, levels, eta, draw, ancestral=sampler == "ddpm")
            return self._sample_dpmpp2m(net, cond, x, levels, eta, draw)
        finally:
            net.train(was_training)

    def _x0(self, net, x, cond, levels, i):
        t_in = torch.full((x.shape[0],), float(levels.t_in[i]), device=x.device, dtype=x.dtype)
        return self.predict_x0(net, x, float(levels.alpha[i]), float(levels.sigma[i]), t_in, cond)

    def _sample_ddim(self, net, cond, x, levels, eta, draw, ancestral):
        k = 1
        for i in range(levels.n_evals):
            a_t, s_t = float(levels.alpha[i]), float(levels.sigma[i])
            a_s, s_s = float(levels.alpha[i + 1]), float(levels.sigma[i + 1])
            x0 = self._x0(net, x, cond, levels, i)
            if s_s == 0:
                return x0
            eps = (x - a_t * x0) / s_t
            # q(x_t | x_s) has variance s_ts2 and the posterior q(x_s | x_t, x0) has tau2; the posterior
            # mean is a_s x0 + sqrt(s_s^2 - tau2) eps, and DDIM(eta) keeps the marginal variance s_s^2
            s_ts2 = max(s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2, 0.0)
            tau2 = s_ts2 * s_s ** 2 / s_t ** 2
            if ancestral:
                x = a_s * x0 + math.sqrt(max(s_s ** 2 - tau2, 0.0)) * eps
                var = tau2 if self.config.ddpm_variance == "posterior" else s_ts2
            else:
                var = eta ** 2 * tau2
                x = a_s * x0 + math.sqrt(max(s_s ** 2 - var, 0.0)) * eps
            if var > 0:
                x = x + math.sqrt(var) * draw(k)
                k += 1
        return x

    def _sample_dpmpp2m(self, net, cond, x, levels, eta, draw):
        lam = levels.logsnr
        x0_prev, h_prev, k = None, None, 1
        for i in range(levels.n_evals):
            x0 = self._x0(net, x, cond, levels, i)
            s_t = float(levels.sigma[i])
            a_s, s_s = float(levels.alpha[i + 1]), float(levels.sigma[i + 1])
            if s_s == 0:
                return x0
            h = float(lam[i + 1] - lam[i])
            if eta == 0:
                d = x0
                if x0_prev is not None:
                    r = h_prev / h
                    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
                x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            else:
                eta_h = eta * h
                x = (s_s / s_t) * math.exp(-eta_h) * x - a_s * math.expm1(-h - eta_h) * x0
                if x0_prev is not None:
                    r = h_prev / h
                    x = x - a_s * 0.5 * math.expm1(-h - eta_h) * (1 / r) * (x0 - x0_prev)
                x = x + s_s * math.sqrt(-math.expm1(-2 * eta_h)) * draw(k)
                k += 1
            x0_prev, h_prev = x0, h
        return x


def augment_inputs(x0: torch.Tensor, std: float = 0.025, generator: torch.Generator | None = None):
    """``x0 + N(0, std^2)``: the input-noise augmentation of the reference training loop.

    The reference applies it on every other batch; that choice belongs to the training loop.
    """
    noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator else None)
    return x0 + std * noise.to(x0.device, x0.dtype)


def _check_sampler(sampler):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def _eta(sampler, eta):
    if sampler == "ddpm":
        return 1.0
    if sampler == "dpmpp2m":
        return 0.0
    default = 0.0 if sampler == "ddim" else 1.0
    eta = default if eta is None else float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return eta


def _noise_reader(noise, n_draws):
    if callable(noise) and not torch.is_tensor(noise):
        return noise
    if noise.shape[0] != n_draws:
        raise ValueError(f"noise has {noise.shape[0]} draws along dim 0 but this sampler/steps setting "
                         f"uses {n_draws}; size it with GaussianDiffusion.noise_draws(...)")
    return lambda k: noise[k]


def _call_net(net, x, t_in, cond):
    """Run ``net`` on ``x [B, D]`` or grouped ``x [B, S, D]`` (S samples per row of ``cond``).

    Backbones that set ``supports_grouped_samples = True`` get the grouped tensor and compute their
    (t, cond)-dependent parts once per row; the others get a flattened batch.
    """
    if x.dim() == 2 or getattr(net, "supports_grouped_samples", False):
        return net(x, t_in, cond)
    b, s, d = x.shape
    out = net(x.reshape(b * s, d), t_in.repeat_interleave(s), cond.repeat_interleave(s, dim=0))
    return out.reshape(b, s, d)
