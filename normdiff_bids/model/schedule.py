"""Noise processes for the diffusion model: the configuration and the (alpha_t, sigma_t) noise levels.

Every process is described by the forward marginal ``x_t = alpha_t * x0 + sigma_t * eps``; the samplers in
:mod:`normdiff_bids.model.diffusion` only see these two numbers and the network input ``t_in`` for each
level, so the discrete variance-preserving process (DDPM with linear or cosine betas) and the
variance-exploding EDM process (Karras et al., 2022) share one implementation of every sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from normdiff_bids.model.config import ConfigDict

if TYPE_CHECKING:  # torch is imported where training needs it: a loaded model scores without it
    import torch

__all__ = ["DiffusionConfig", "NoiseLevels", "VPSchedule", "EDMSchedule", "make_schedule"]

_PROCESSES = ("vp", "edm")
_SCHEDULES = ("linear", "cosine")
_PREDICTIONS = ("eps", "v", "x0")
_SPACINGS = ("time", "logsnr")
_VARIANCES = ("posterior", "forward")


@dataclass
class DiffusionConfig(ConfigDict):
    """Hyper-parameters of the diffusion process, saved in the model bundle.

    The defaults are the reference setting of Whitbread, Palmer & Jenkinson (2026): a discrete
    variance-preserving process with ``T=100`` linear betas from 2e-6 to 0.6, epsilon-prediction, plain
    MSE over uniformly drawn timesteps, and 100-step ancestral sampling.

    Attributes
    ----------
    process : "vp" | "edm"
        ``"vp"``: discrete variance-preserving DDPM; ``"edm"``: continuous variance-exploding process with
        the preconditioning of Karras et al. (2022) (``prediction`` is then unused: the preconditioning
        fixes the parameterisation).
    schedule : "linear" | "cosine"
        VP beta schedule. Cosine is Nichol & Dhariwal (2021) with offset ``cosine_s`` and betas capped at
        ``max_beta``.
    timesteps, beta_start, beta_end
        Discrete VP grid.
    prediction : "eps" | "v" | "x0"
        What the network predicts in the VP process. All samplers work on the implied x0-prediction.
    x0_clip : None | float
        Clamp the x0-prediction to ``[-x0_clip, x0_clip]`` (standardised units) inside the samplers.
        With eps-prediction, ``x0 = (x_t - sigma_t * eps) / alpha_t`` and ``alpha_T`` of the reference
        schedule is about 3e-9, so any error in the predicted noise is amplified by ~1e8 at the first
        sampling steps; samplers that jump straight from an x0-estimate (DDIM, DPM-Solver) then diverge.
        A generous clip (e.g. 10 standardised units, far beyond any real IDP) removes this without
        touching the data range. ``None`` applies no clamp.
    ddpm_variance : "posterior" | "forward"
        Variance of each ancestral (``"ddpm"``) step from level t to level s: the variance of the
        forward-process posterior q(x_s | x_t, x0) (Ho et al.'s lower bound, "fixed small") or that of
        the forward transition q(x_t | x_s) (the upper bound, "fixed large"). With a perfect denoiser
        and coarse levels the first under-disperses and the second slightly over-disperses: for
        Gaussian data of SD 0.5 (standardised units) the reference 100-step sampler gives 0.449 and
        0.515 respectively (docs/method.md).
    spacing : "time" | "logsnr"
        How a VP run with ``steps < timesteps`` picks its timesteps: evenly in t, or (default) evenly
        in log-SNR between ``logsnr_min`` (or the last timestep, if higher) and the first timestep.
        With an exact denoiser, "logsnr" keeps DPM-Solver++(2M) at 10-20 steps within 5% of the data
        SD where "time" is off by 10-120% (the reference linear schedule spends half its timesteps
        on pure noise); see docs/method.md. A run with ``steps >= timesteps`` visits every level.
    logsnr_min
        Lower end of the "logsnr" spacing. Below it the marginal is pure noise to within
        ``alpha = exp(logsnr_min)``, so sampler steps spent there are wasted.
    sigma_min, sigma_max, sigma_data, rho
        EDM noise range, data scale (1 for standardised IDPs) and the Karras step-density exponent.
    p_mean, p_std
        EDM training noise distribution: ``log(sigma) ~ N(p_mean, p_std^2)``.
    time_scale
        VP networks see ``t_in = t / timesteps``; EDM networks see ``c_noise = log(sigma) / 4``.
    """

    process: str = "vp"
    schedule: str = "linear"
    timesteps: int = 100
    beta_start: float = 2e-6
    beta_end: float = 0.6
    prediction: str = "eps"
    x0_clip: float | None = None
    ddpm_variance: str = "posterior"
    spacing: str = "logsnr"
    logsnr_min: float = -7.0
    cosine_s: float = 0.008
    max_beta: float = 0.999
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 1.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self):
        problems = []
        if self.process not in _PROCESSES:
            problems.append(f"process={self.process!r} (choose one of {_PROCESSES})")
        if self.schedule not in _SCHEDULES:
            problems.append(f"schedule={self.schedule!r} (choose one of {_SCHEDULES})")
        if self.prediction not in _PREDICTIONS:
            problems.append(f"prediction={self.prediction!r} (choose one of {_PREDICTIONS})")
        if self.ddpm_variance not in _VARIANCES:
            problems.append(f"ddpm_variance={self.ddpm_variance!r} (choose one of {_VARIANCES})")
        if self.spacing not in _SPACINGS:
            problems.append(f"spacing={self.spacing!r} (choose one of {_SPACINGS})")
        if int(self.timesteps) != self.timesteps or self.timesteps < 2:
            problems.append(f"timesteps={self.timesteps!r} (an integer >= 2)")
        if not 0 < self.beta_start < self.beta_end < 1:
            problems.append(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r} "
                            "(need 0 < beta_start < beta_end < 1)")
        if self.x0_clip is not None and not self.x0_clip > 0:
            problems.append(f"x0_clip={self.x0_clip!r} (None or a positive number of standardised units)")
        if not 0 < self.sigma_min < self.sigma_max:
            problems.append(f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r} "
                            "(need 0 < sigma_min < sigma_max)")
        if not self.sigma_data > 0 or not self.rho > 0 or not self.p_std > 0:
            problems.append("sigma_data, rho and p_std must be positive")
        if problems:
            raise ValueError("invalid DiffusionConfig: " + "; ".join(problems))
        self.timesteps = int(self.timesteps)



@dataclass(frozen=True)
class NoiseLevels:
    """A descending sequence of noise levels for one sampling run (float64 numpy, length ``n + 1``).

    Entries ``0..n-1`` are where the network is evaluated; entry ``n`` is the clean end
    (``alpha = 1, sigma = 0``). ``t_in`` holds the network's time input for the first ``n`` entries.
    """

    alpha: np.ndarray
    sigma: np.ndarray
    t_in: np.ndarray

    @property
    def n_evals(self) -> int:
        return len(self.t_in)

    @property
    def logsnr(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)


class VPSchedule:
    """Discrete variance-preserving process: ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        T = cfg.timesteps
        if cfg.schedule == "linear":
            betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
        else:
            steps = np.arange(T + 1, dtype=np.float64) / T
            f = np.cos((steps + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
            betas = np.clip(1 - f[1:] / f[:-1], 0, cfg.max_beta)
        self.betas = betas
        abar = np.cumprod(1 - betas)
        # index 0 is the clean data (t = 0); t = 1..T are the trained levels
        self.abar = np.concatenate([[1.0], abar])
        self.alpha = np.sqrt(self.abar)
        self.sigma = np.sqrt(1 - self.abar)

    def training_levels(self, n: int, generator: torch.Generator | None = None):
        """Uniform t in {1..T}: returns (alpha [n], sigma [n], t_in [n]) as float32 tensors."""
        import torch

        t = torch.randint(1, self.cfg.timesteps + 1, (n,), generator=generator,
                          device=_gen_device(generator))
        idx = t.cpu().numpy()
        return (torch.as_tensor(self.alpha[idx], dtype=torch.float32),
                torch.as_tensor(self.sigma[idx], dtype=torch.float32),
                t.float().cpu() / self.cfg.timesteps)

    def timesteps_for(self, steps: int) -> np.ndarray:
        """The descending integer timesteps a run with ``steps`` network evaluations visits."""
        T = self.cfg.timesteps
        if steps >= T:
            return np.arange(T, 0, -1)
        if self.cfg.spacing == "time":
            return np.round(np.linspace(T, 1, steps)).astype(int)
        lam = 0.5 * (np.log(self.abar[1:]) - np.log1p(-self.abar[1:]))  # lam[i] is t = i + 1
        lo = max(lam[-1], self.cfg.logsnr_min)
        targets = np.linspace(lo, lam[0], steps)
        # lam is decreasing in t: pick the nearest distinct timestep to each target, highest noise first
        chosen, used = [], set()
        for target in targets:
            order = np.argsort(np.abs(lam - target))
            t = next(int(i) + 1 for i in order if int(i) + 1 not in used)
            used.add(t)
            chosen.append(t)
        return np.array(sorted(chosen, reverse=True))

    def sampling_levels(self, steps: int) -> NoiseLevels:
        ts = self.timesteps_for(steps)
        idx = np.concatenate([ts, [0]])
        return NoiseLevels(alpha=self.alpha[idx], sigma=self.sigma[idx],
                           t_in=ts.astype(np.float64) / self.cfg.timesteps)


class EDMSchedule:
    """EDM process (alpha = 1, sigma from sigma_min to sigma_max) with Karras preconditioning."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def training_levels(self, n: int, generator: torch.Generator | None = None):
        import torch

        z = torch.randn(n, generator=generator, device=_gen_device(generator)).cpu().double()
        sigma = torch.exp(self.cfg.p_mean + self.cfg.p_std * z)
        return (torch.ones(n, dtype=torch.float32), sigma.float(), self.c_noise(sigma).float())

    @staticmethod
    def c_noise(sigma):
        if isinstance(sigma, (int, float, np.ndarray, np.floating)):
            return np.log(sigma) / 4
        return sigma.log() / 4  # a torch tensor (training)

    def preconditioning(self, sigma):
        """(c_skip, c_out, c_in) of Karras et al. (2022), Table 1."""
        sd2 = self.cfg.sigma_data ** 2
        denom = sigma ** 2 + sd2
        return sd2 / denom, sigma * self.cfg.sigma_data / denom ** 0.5, 1 / denom ** 0.5

    def sampling_levels(self, steps: int) -> NoiseLevels:
        c = self.cfg
        ramp = np.linspace(0, 1, steps)
        inv = 1 / c.rho
        sig = (c.sigma_max ** inv + ramp * (c.sigma_min ** inv - c.sigma_max ** inv)) ** c.rho
        return NoiseLevels(alpha=np.ones(steps + 1), sigma=np.concatenate([sig, [0.0]]),
                           t_in=self.c_noise(sig))


def make_schedule(cfg: DiffusionConfig) -> VPSchedule | EDMSchedule:
    return VPSchedule(cfg) if cfg.process == "vp" else EDMSchedule(cfg)


def _gen_device(generator):
    return generator.device if generator is not None else None
