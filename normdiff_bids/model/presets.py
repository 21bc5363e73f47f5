"""Estimator presets: the diffusion, sampler and training settings of :data:`DEFAULTS` and :data:`PAPER`.

Backbone-specific settings (network, learning rate, batch size, epochs) live in each backbone's registry
entry (:mod:`normdiff_bids.model.backbones`) under the preset named by ``backbone_preset``.
"""

from __future__ import annotations

__all__ = ["DEFAULTS", "PAPER", "PRESETS"]

#: Diffusion process, sampler and steps used unless the caller or a preset says otherwise.
#: v-prediction on a cosine VP schedule with DPM-Solver++(2M) at 20 steps spaced evenly in log-SNR:
#: in calibration probes on synthetic cohorts it matched 1000-step ancestral sampling (centile error
#: within Monte Carlo noise), and with an exact denoiser its spread is within 2% of the data's
#: (docs/method.md), while eps-prediction needs an x0 clamp to stay stable with few-step samplers and
#: first-order samplers at 10-20 steps under-disperse. 20 network evaluations per draw is what makes
#: per-subject scoring affordable on a CPU.
#: Training: early stopping on the validation loss with the best checkpoint, and an LR plateau on the
#: validation loss with a patience of ``max(10, epochs // 20)`` epochs (``plateau_patience=None``).
DEFAULTS = {
    "diffusion": {"process": "vp", "schedule": "cosine", "timesteps": 1000, "prediction": "v",
                  "spacing": "logsnr"},
    "sampler": "dpmpp2m",
    "steps": 20,
    "backbone_preset": "default",
    "early_stopping": True,
    "plateau_on": "validation",
    "plateau_patience": None,
}
#: The reference setting of Whitbread, Palmer & Jenkinson (2026): T=100 linear betas 2e-6..0.6,
#: eps-prediction, 100-step ancestral sampling, the paper's networks and epochs (the backbones' "paper"
#: presets), final checkpoint, ReduceLROnPlateau(patience 75) on the training loss.
PAPER = {
    "diffusion": {"process": "vp", "schedule": "linear", "timesteps": 100, "beta_start": 2e-6,
                  "beta_end": 0.6, "prediction": "eps"},
    "sampler": "ddpm",
    "steps": 100,
    "backbone_preset": "paper",
    "early_stopping": False,
    "plateau_on": "train",
    "plateau_patience": 75,
}
#: ``NormativeDiffusion(preset=...)`` -> its settings.
PRESETS = {None: DEFAULTS, "paper": PAPER}
