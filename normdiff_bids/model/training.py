"""The training loop of :class:`~normdiff_bids.model.estimator.NormativeDiffusion`: validation split,
batching, AdamW with an LR plateau, input-noise augmentation, EMA of the weights, early stopping."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from normdiff_bids.model.tables import MIN_TRAIN_ROWS
from normdiff_bids.progress import progress

__all__ = ["INPUT_NOISE_STD", "MIN_TRAIN_ROWS", "PLATEAU_FACTOR", "VALIDATION_DRAWS", "TrainingSettings",
           "train_denoiser"]

#: Standard deviation of the input-noise augmentation applied on every other training batch (paper).
INPUT_NOISE_STD = 0.025
#: ReduceLROnPlateau factor (paper).
PLATEAU_FACTOR = 0.75
#: Validation-loss evaluations per validation pass: the validation rows are repeated until about this
#: many (row, noise level) pairs are scored, with the same draws every epoch, so that successive
#: validation losses differ only because the model changed.
VALIDATION_DRAWS = 2048


@dataclass(frozen=True)
class TrainingSettings:
    """How to train, resolved by the estimator from its parameters, its preset and the backbone's entry.

    ``epoch_budget(n_train)`` gives the maximum epochs once the validation split is known;
    ``patience=None`` is ``max(25, epochs // 16)``; ``plateau_on`` is ``"validation"`` (when there is a
    validation split) or ``"train"``; ``plateau_patience=None`` is ``max(10, epochs // 20)`` epochs.
    """

    seed: int
    validation_fraction: float
    epoch_budget: Callable[[int], int]
    lr: float
    batch_size: int
    patience: int | None
    ema_decay: float | None
    early_stopping: bool
    plateau_on: str
    plateau_patience: int | None
    verbose: bool
    #: The seed of the validation split when it is not ``seed`` (the members of an ensemble share the
    #: first member's split, so that the calibration layer's unseen rows are unseen by every network).
    split_seed: int | None = None
    #: The progress bar's label.
    label: str = "training"


def validation_split(n: int, fraction: float, seed: int, generator: torch.Generator | None = None):
    """``(validation rows, training rows)`` of ``n`` rows, sorted: the rows the network never trains on.

    ``generator`` (seeded with ``seed``) is advanced as the training loop's own, which goes on using it.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    n_val = int(round(fraction * n)) if fraction > 0 else 0
    if n_val and n - n_val < 2:
        n_val = 0
    perm = torch.randperm(n, generator=gen).numpy()
    return np.sort(perm[:n_val]), np.sort(perm[n_val:])


def train_denoiser(encoder: nn.Module, network: nn.Module, diffusion, x: np.ndarray, cont: np.ndarray,
                   cat: np.ndarray, device: torch.device, settings: TrainingSettings):
    """Train ``encoder`` and ``network`` in place on ``x [N, D]`` (model space) given covariates
    ``cont [N, n_cont]``, ``cat [N, n_cat]``; leaves them in eval mode with the kept checkpoint.

    Returns ``(history, summary)``: one row per epoch (epoch, train_loss, val_loss, lr) and a dict.
    """
    from normdiff_bids.model.diffusion import augment_inputs

    seed = int(settings.seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    if settings.split_seed is None or int(settings.split_seed) == seed:
        val_idx, train_idx = validation_split(n, settings.validation_fraction, seed, generator=gen)
    else:
        val_idx, train_idx = validation_split(n, settings.validation_fraction, int(settings.split_seed))
    n_val = len(val_idx)
    to = lambda a, idx: torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)  # noqa: E731
    x_tr, cont_tr, cat_tr = to(x, train_idx), to(cont, train_idx), to(cat, train_idx)
    x_va, cont_va, cat_va = to(x, val_idx), to(cont, val_idx), to(cat, val_idx)
    n_train = len(train_idx)
    has_missing = bool(np.isnan(x).any())  # rows with missing IDPs: masked loss (complete data: unchanged)

    epochs = settings.epoch_budget(n_train)
    lr = float(settings.lr)
    batch_size = int(settings.batch_size)
    per_epoch = max(1, n_train // batch_size)
    # validate often enough to stop early, rarely enough not to dominate tiny epochs
    val_every = max(1, math.ceil(4 / per_epoch)) if n_val else 1
    patience = settings.patience if settings.patience is not None else max(25, epochs // 16)
    plateau = settings.plateau_patience if settings.plateau_patience is not None else max(10, epochs // 20)
    on_validation = settings.plateau_on == "validation" and n_val > 0
    modules = nn.ModuleDict({"encoder": encoder, "network": network})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=PLATEAU_FACTOR, patience=max(1, plateau // val_every) if on_validation else plateau)
    ema = _EMA(modules, settings.ema_decay) if settings.ema_decay else None
    early_stop = n_val > 0 and settings.early_stopping

    records, best, best_state, best_epoch, since_best = [], math.inf, None, 0, 0
    batch_counter = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1)  # dropout streams
        bar = progress(range(epochs), total=epochs, desc=settings.label, verbose=settings.verbose,
                       unit="epoch")
        for epoch in bar:
            modules.train()
            order = torch.randperm(n_train, generator=gen)
            total = 0.0
            for idx in _batches(order, batch_size):
                idx = idx.to(device)
                x0, observed = fill_missing(x_tr[idx], gen) if has_missing else (x_tr[idx], None)
                if batch_counter % 2 == 1:
                    x0 = augment_inputs(x0, INPUT_NOISE_STD, generator=gen)
                cond = encoder(cont_tr[idx], cat_tr[idx], generator=gen)
                loss = diffusion.training_loss(network, x0, cond, generator=gen, observed=observed)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update(modules)
                total += float(loss.detach()) * len(idx)
                batch_counter += 1
            train_loss = total / n_train
            val_loss = math.nan
            if n_val and (epoch % val_every == 0 or epoch == epochs - 1):
                val_loss = _validation_loss(diffusion, modules, ema, x_va, cont_va, cat_va, seed)
                if on_validation:
                    scheduler.step(val_loss)
            if not on_validation:
                scheduler.step(train_loss)
            records.append((epoch + 1, train_loss, val_loss, optimizer.param_groups[0]["lr"]))
            if not math.isfinite(train_loss):
                raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {train_loss}); lower "
                                   f"lr (now {lr}) or use the default diffusion settings")
            if early_stop and math.isfinite(val_loss):
                if val_loss < best:
                    best, best_epoch, since_best = val_loss, epoch + 1, 0
                    best_state = copy.deepcopy((ema.shadow if ema else modules).state_dict())
                else:
                    since_best += val_every
                    if since_best >= patience:
                        break
            if hasattr(bar, "set_postfix") and math.isfinite(val_loss):
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", refresh=False)
    final = (ema.shadow if ema else modules).state_dict()
    modules.load_state_dict(best_state if best_state is not None else final)
    modules.eval()
    history = pd.DataFrame(records, columns=["epoch", "train_loss", "val_loss", "lr"])
    summary = {
        "n_train": n_train, "n_validation": n_val, "epochs_max": epochs, "epochs_run": len(records),
        "stopped_early": len(records) < epochs, "best_epoch": best_epoch if best_state is not None
        else len(records), "best_val_loss": best if best_state is not None else None,
        "final_train_loss": records[-1][1], "checkpoint": "best" if best_state is not None else "final",
        "lr": lr, "batch_size": batch_size, "ema_decay": settings.ema_decay, "device": str(device),
        "n_parameters": int(sum(p.numel() for p in modules.parameters())),
    }
    return history, summary


@torch.no_grad()
def _validation_loss(diffusion, modules, ema, x_va, cont_va, cat_va, seed) -> float:
    scored = ema.shadow if ema is not None else modules
    scored.eval()
    # a small validation set is repeated (each copy gets its own noise level and noise) and scored
    # in a few large calls rather than many tiny ones, which dominated the fit time of small cohorts
    repeats = max(1, math.ceil(VALIDATION_DRAWS / len(x_va)))
    x_rep, cont_rep, cat_rep = (a.repeat((repeats,) + (1,) * (a.dim() - 1))
                                for a in (x_va, cont_va, cat_va))
    gen = torch.Generator().manual_seed(seed + 2)  # the same draws at every validation
    total, count = 0.0, 0
    missing = bool(torch.isnan(x_rep).any())
    for lo in range(0, len(x_rep), 8192):
        sl = slice(lo, lo + 8192)
        cond = scored["encoder"](cont_rep[sl], cat_rep[sl])
        x0, observed = fill_missing(x_rep[sl], gen) if missing else (x_rep[sl], None)
        loss = diffusion.training_loss(scored["network"], x0, cond, generator=gen, observed=observed)
        total += float(loss) * len(x_rep[sl])
        count += len(x_rep[sl])
    modules.train()
    return total / count


def fill_missing(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0 with its missing (NaN) entries replaced by N(0, 1) draws, the observed mask)``: model space
    is standardised per IDP, so a stand-in drawn from the marginal keeps the network's inputs in range;
    the loss ignores those entries."""
    observed = ~torch.isnan(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return torch.where(observed, x0, noise), observed


def _batches(order: torch.Tensor, batch_size: int):
    """Split a permutation into batches; a last batch of one row joins the previous one (BatchNorm)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


class _EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    The decay warms up as ``min(decay, (1 + t) / (10 + t))`` at update ``t``, so the average forgets the
    random initial weights within the first steps instead of after ``1 / (1 - decay)`` of them: a cohort of
    a few hundred people trains one optimiser step per epoch and stops after a few hundred, where a fixed
    0.999 kept 0.999^300 = 74% of the initial weights in the sampled network.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = copy.deepcopy(module)
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - decay)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)
