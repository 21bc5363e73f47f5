"""The normative model: :class:`NormativeDiffusion` fits a conditional diffusion model of IDPs given
covariates and scores people against it (per-IDP centiles and z-scores, a joint deviation score).

Scoring draws ``n_samples`` from the model at each person's covariates. Every draw comes from a random
stream derived from ``seed`` and the covariates it is drawn at, never from the batch, so a participant
scored alone gets exactly the scores it gets inside its cohort.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch
from torch import nn

from normdiff_bids._version import __version__
from normdiff_bids.errors import InputError, ProblemCollector
from normdiff_bids.model.bundle import BundleError, check_params, load_bundle, save_bundle
from normdiff_bids.model.covariates import CovariateEncoder, CovariateEncoderConfig, CovariateSchema
from normdiff_bids.model.preprocess import METHODS as PREPROCESSING_METHODS
from normdiff_bids.model.preprocess import IDPScaler
from normdiff_bids.progress import progress
from normdiff_bids.scoring.centiles import centiles_to_z, empirical_centiles, sample_quantiles
from normdiff_bids.scoring.joint import joint_reference, mahalanobis

__all__ = ["NormativeDiffusion", "load_model", "DEFAULTS", "PAPER"]

# ---------------------------------------------------------------------------------------------------
# Defaults: the one place to change them.
# ---------------------------------------------------------------------------------------------------

#: Diffusion process, sampler and steps used unless the caller or a preset says otherwise.
#: v-prediction on a cosine VP schedule with DPM-Solver++(2M) at 20 steps spaced evenly in log-SNR:
#: in calibration probes on synthetic cohorts it matched 1000-step ancestral sampling (centile error
#: within Monte Carlo noise), and with an exact denoiser its spread is within 2% of the data's
#: (docs/method.md), while eps-prediction needs an x0 clamp to stay stable with few-step samplers and
#: first-order samplers at 10-20 steps under-disperse. 20 network evaluations per draw is what makes
#: per-subject scoring affordable on a CPU.
DEFAULTS = {
    "diffusion": {"process": "vp", "schedule": "cosine", "timesteps": 1000, "prediction": "v",
                  "spacing": "logsnr"},
    "sampler": "dpmpp2m",
    "steps": 20,
    "backbone_preset": "default",
}
#: The reference setting of Whitbread, Palmer & Jenkinson (2026): T=100 linear betas 2e-6..0.6,
#: eps-prediction, 100-step ancestral sampling, the paper's networks and epochs, final checkpoint.
PAPER = {
    "diffusion": {"process": "vp", "schedule": "linear", "timesteps": 100, "beta_start": 2e-6,
                  "beta_end": 0.6, "prediction": "eps"},
    "sampler": "ddpm",
    "steps": 100,
    "backbone_preset": "paper",
    "epochs": {"film-mlp": 1500, "saint": 600},
    "lr": {"film-mlp": 1e-3, "saint": 3e-4},
}
#: AdamW learning rate per backbone when ``lr=None`` (the paper's values).
DEFAULT_LR = {"film-mlp": 1e-3, "saint": 3e-4}

#: Epoch budget when ``epochs=None`` (FiLM-MLP). Diffusion denoisers need many optimiser steps more
#: than many passes over the data, so the budget is set in steps: about 6,000 AdamW steps (the
#: calibration probes converged within 4,000 at D=10), at least 100 and at most 2,000 epochs, and at
#: most 8e6 training rows processed in all. The row cap is the time limit: a training row of the
#: default network (~0.9M parameters; FiLM parameters are per row in training) costs about 3x a
#: sampling evaluation plus the FiLM layer, ~70 us on 2 CPU cores, so 8e6 rows is about 9-10 minutes
#: with validation, and a 10,000 x 200 cohort (6,000 steps = 667 epochs = 6e6 rows) fits within the
#: 15-minute target. D does not enter: only the FiLM-MLP's first and last layers grow with D, so its
#: cost per row is nearly independent of D (SAINT, whose cost grows with D, sizes its own budget).
#: Early stopping on the validation loss usually ends the fit sooner.
BUDGET_STEPS = 6_000
BUDGET_EPOCHS = (100, 2_000)
BUDGET_ROWS = 8_000_000

#: Standard deviation of the input-noise augmentation applied on every other training batch (paper).
INPUT_NOISE_STD = 0.025
#: ReduceLROnPlateau factor (paper).
PLATEAU_FACTOR = 0.75
#: Training refuses to start with fewer complete rows than this.
MIN_TRAIN_ROWS = 20
#: Validation-loss evaluations per validation pass: the validation rows are repeated until about this
#: many (row, noise level) pairs are scored, with the same draws every epoch, so that successive
#: validation losses differ only because the model changed.
VALIDATION_DRAWS = 2048
#: Columns never taken as IDPs when ``idps=None``.
ID_COLUMNS = ("participant_id", "session_id", "row", "index", "subject", "subject_id", "run")
#: Target rows (samples) per network call when sampling, and the memory budget for its noise.
ROWS_PER_CALL = 4096
NOISE_BYTES_PER_CALL = 256 * 2**20
#: Elements of a [rows, S, D] float64 block when scoring rows (about 64 MB).
ROW_CHUNK_ELEMENTS = 8_000_000
#: Default covariate-grid step as a fraction of the continuous covariate's training SD (see
#: :class:`NormativeDiffusion`, ``covariate_grid``).
GRID_STEP_FRACTION = 1 / 30


class NormativeDiffusion:
    """Joint normative model of IDPs given covariates, learned by a conditional diffusion model.

    >>> m = NormativeDiffusion(covariates=("age", "sex", "site"), seed=0).fit(train)
    >>> scores = m.score(test)          # tidy: participant_id, idp, value, centile, z, ...
    >>> m.save("model"); m2 = load_model("model")

    Parameters (stored as given; ``fit`` learns)
    ----------
    backbone : "film-mlp" | "saint"
        Denoising network (``normdiff_bids.model.backbones.BACKBONES``).
    covariates : sequence of column names
        ``age`` (and any numeric column) is standardised; ``sex``, ``site`` and any non-numeric column
        are categorical with learned embeddings.
    seed : int
        Seeds weight initialisation, data order, training noise and every sampling stream. Same seed,
        same data, same device: bit-identical model and scores on CPU.
    device : "auto" | "cpu" | "cuda"
        ``"auto"`` picks CUDA when available.
    epochs : int or None
        Maximum training epochs. ``None``: a budget from N (see ``BUDGET_*``), with early stopping.
    batch_size : int or None
        Training batch. ``None``: 1024 (the paper's) for the FiLM-MLP and the paper preset, 256 for the
        budgeted SAINT, whose fit is limited by its number of optimiser steps (on the synthetic cohort
        at D=20, N=5000 and equal epochs: mean centile error 0.038 with 256 against 0.053 with 1024).
    lr : float or None
        AdamW learning rate; ``None``: 1e-3 for the FiLM-MLP, 3e-4 for SAINT (the paper's).
    n_samples : int
        Model draws per covariate point when scoring (>= 20; 1000 gives centiles with a Monte Carlo
        SD below 0.016).
    sampler, steps : str, int or None
        Sampler of :class:`~normdiff_bids.model.diffusion.GaussianDiffusion` and its network
        evaluations; ``None``: :data:`DEFAULTS` (or :data:`PAPER` with ``preset="paper"``).
    validation_fraction : float
        Share of the complete rows held out for early stopping and the best checkpoint (0 disables:
        the final weights are kept and the LR plateau follows the training loss).
    unknown_site : "error" | "marginal"
        What scoring does with a site never seen in training: refuse (default), or score under the
        model's marginal over sites (the unknown-site level trained by embedding dropout).
    preprocessing : "zscore" | "quantile-normal"
        Per-IDP transform before diffusion (:class:`~normdiff_bids.model.preprocess.IDPScaler`).
    backbone_config, diffusion_config, encoder_config : dict or None
        Overrides of the backbone preset, of :data:`DEFAULTS` ``["diffusion"]`` (fields of
        ``DiffusionConfig``) and of :class:`CovariateEncoderConfig`.
    preset : None | "paper"
        ``"paper"``: the reference setting (:data:`PAPER`): its diffusion, sampler, network, epochs;
        no early stopping, final checkpoint, LR plateau on the training loss.
    ema_decay : float or None
        Keep an exponential moving average of the weights (e.g. 0.999) and use it for validation,
        the best checkpoint and sampling.
    patience : int or None
        Early-stopping patience in epochs; ``None``: ``max(25, epochs // 8)``.
    covariate_grid : "auto" | "off"
        How scoring places its draws. ``"off"``: draws at every distinct covariate row (exact).
        ``"auto"``: when the model has exactly one continuous covariate (age), draws on a fixed grid
        of that covariate per level combination of the categorical ones, and each row's per-IDP
        quantile function is interpolated linearly between its two neighbouring grid points; the
        dependence between IDPs is that of the nearer point. The grid is fixed by the model (points
        at multiples of ``grid_step``), never by the cohort, so scores do not depend on who else is
        scored. Cost: at most two grid points per row, and a cohort shares them, so a 10,000-person
        cohort over 3 sites needs under 1,000 points instead of 10,000. Error: linear interpolation of a
        quantile function that is smooth in age, with a step of 1/30 of the age SD (about 0.7 years
        for a lifespan cohort), is far below the Monte Carlo error of 1000 draws (a centile SD of
        about 0.016); interpolating two independent sample sets also lowers that Monte Carlo error.
        Tested against exact scoring.
    grid_step : float or None
        Grid step in the continuous covariate's units; ``None``: its training SD / 30.
    verbose : bool
        Progress bars (also silenced by ``CI=true`` or ``NORMDIFF_QUIET=1``).
    """

    def __init__(self, backbone: str = "film-mlp", covariates: Sequence[str] = ("age", "sex", "site"),
                 seed: int = 0, device: str = "auto", epochs: int | None = None,
                 batch_size: int | None = None,
                 lr: float | None = None, n_samples: int = 1000, sampler: str | None = None,
                 steps: int | None = None, validation_fraction: float = 0.1, unknown_site: str = "error",
                 preprocessing: str = "zscore", backbone_config: dict | None = None,
                 diffusion_config: dict | None = None, encoder_config: dict | None = None,
                 preset: str | None = None, ema_decay: float | None = None, patience: int | None = None,
                 covariate_grid: str = "auto", grid_step: float | None = None, verbose: bool = True):
        self.backbone = backbone
        self.covariates = covariates
        self.seed = seed
        self.device = device
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.n_samples = n_samples
        self.sampler = sampler
        self.steps = steps
        self.validation_fraction = validation_fraction
        self.unknown_site = unknown_site
        self.preprocessing = preprocessing
        self.backbone_config = backbone_config
        self.diffusion_config = diffusion_config
        self.encoder_config = encoder_config
        self.preset = preset
        self.ema_decay = ema_decay
        self.patience = patience
        self.covariate_grid = covariate_grid
        self.grid_step = grid_step
        self.verbose = verbose

    # ------------------------------------------------------------------ sklearn conventions
    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> NormativeDiffusion:
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for NormativeDiffusion; valid: {valid}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if not _same(v, defaults.get(k))]
        return f"NormativeDiffusion({', '.join(changed)})"

    # ------------------------------------------------------------------ resolved settings
    def _preset(self) -> dict:
        if self.preset is None:
            return DEFAULTS
        if self.preset == "paper":
            return PAPER
        raise ValueError(f"preset must be None or 'paper', not {self.preset!r}")

    def _sampler(self) -> str:
        return self.sampler or self._preset()["sampler"]

    def _steps(self) -> int:
        return int(self.steps or self._preset()["steps"])

    def _torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu' "
                             "or 'auto'")
        return torch.device(self.device)

    def _check_params(self) -> None:
        from normdiff_bids.model.backbones import BACKBONES
        from normdiff_bids.model.diffusion import SAMPLERS

        problems = []
        if self.backbone not in BACKBONES:
            problems.append(f"backbone={self.backbone!r} (choose one of {sorted(BACKBONES)})")
        if isinstance(self.covariates, str) or not len(self.covariates):
            problems.append(f"covariates={self.covariates!r} (a list of column names, e.g. ['age', 'sex'])")
        if self.unknown_site not in ("error", "marginal"):
            problems.append(f"unknown_site={self.unknown_site!r} (choose 'error' or 'marginal')")
        if self.preprocessing not in PREPROCESSING_METHODS:
            problems.append(f"preprocessing={self.preprocessing!r} (choose one of {PREPROCESSING_METHODS})")
        if not 0 <= self.validation_fraction < 0.5:
            problems.append(f"validation_fraction={self.validation_fraction!r} (need 0 <= f < 0.5)")
        if self.epochs is not None and (int(self.epochs) != self.epochs or self.epochs < 1):
            problems.append(f"epochs={self.epochs!r} (a positive integer or None)")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 2):
            problems.append(f"batch_size={self.batch_size!r} (an integer >= 2)")
        if int(self.n_samples) != self.n_samples or self.n_samples < 20:
            problems.append(f"n_samples={self.n_samples!r} (an integer >= 20; 1000 recommended)")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} (choose one of {SAMPLERS})")
        if self.steps is not None and (int(self.steps) != self.steps or self.steps < 1):
            problems.append(f"steps={self.steps!r} (a positive integer or None)")
        if self.preset not in (None, "paper"):
            problems.append(f"preset={self.preset!r} (None or 'paper')")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay!r} (None or in (0, 1))")
        if self.covariate_grid not in ("auto", "off"):
            problems.append(f"covariate_grid={self.covariate_grid!r} (choose 'auto' or 'off')")
        if self.grid_step is not None and not self.grid_step > 0:
            problems.append(f"grid_step={self.grid_step!r} (None or a positive number)")
        if problems:
            raise ValueError("invalid NormativeDiffusion parameters: " + "; ".join(problems))
        self._torch_device()

    # ------------------------------------------------------------------ fitting
    def fit(self, table: pd.DataFrame, idps: Sequence[str] | None = None) -> NormativeDiffusion:
        """Learn the joint distribution of ``idps`` given the covariates from the rows of ``table``.

        ``idps=None`` takes every numeric column that is not a covariate or an id column. Rows with a
        missing or non-finite IDP or covariate are dropped (count in ``n_dropped_``, with a warning).
        Returns ``self``.
        """
        self._check_params()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"fit expects a pandas DataFrame, got {type(table).__name__}")
        start = time.perf_counter()
        self._weights_digest = None  # new weights: earlier draws are not theirs
        covariates = list(self.covariates)
        idps = self._select_idps(table, idps, covariates)
        values = _idp_matrix(table, idps, "training")
        complete = np.isfinite(values).all(axis=1)
        for name in covariates:
            complete &= _present(table[name]).to_numpy()
        n_dropped = int((~complete).sum())
        if complete.sum() < MIN_TRAIN_ROWS:
            raise InputError(f"only {int(complete.sum())} of {len(table)} rows have every IDP and "
                             f"covariate ({n_dropped} have missing or non-finite values); at least "
                             f"{MIN_TRAIN_ROWS} are needed to fit a model")
        if n_dropped:
            warnings.warn(f"{n_dropped} of {len(table)} training rows have missing or non-finite IDPs or "
                          f"covariates and were dropped", stacklevel=2)
        kept = table.loc[complete]
        values = values[complete]
        constant = [name for name, col in zip(idps, values.T) if np.ptp(col) == 0]
        if constant:
            raise InputError(f"IDP columns are constant in the training rows: {constant}; a normative model "
                             f"needs variation; drop them (pass idps=[...] without them)")
        schema = CovariateSchema.from_table(kept, covariates)
        cont, cat = schema.encode(kept)
        scaler = IDPScaler(self.preprocessing).fit(values)
        x = scaler.transform(values).astype(np.float32)

        self.idps_ = list(idps)
        self.n_features_in_ = len(idps)
        self.covariate_schema_ = schema
        self.scaler_ = scaler
        self.n_dropped_ = n_dropped
        device = self._torch_device()
        self._build(schema, n_rows=len(x), device=device)
        try:
            history, summary = self._train(x, cont, cat, device)
        except BaseException:
            # an interrupted or failed fit must not leave a model that looks fitted
            for name in ("encoder_", "network_"):
                self.__dict__.pop(name, None)
            raise
        self.history_ = history
        self.n_train_ = summary["n_train"]
        summary.update(n_rows=len(table), n_dropped=n_dropped, seconds=round(time.perf_counter() - start, 2))
        self.training_summary_ = summary
        return self

    def _select_idps(self, table, idps, covariates) -> list[str]:
        problems = ProblemCollector()
        missing_cov = [c for c in covariates if c not in table.columns]
        if missing_cov:
            problems.add(f"covariate columns missing from the table: {missing_cov}")
        if idps is None:
            idps = [c for c in table.columns
                    if c not in covariates and str(c) not in ID_COLUMNS
                    and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])]
            if not idps:
                problems.add(f"no numeric IDP columns besides the covariates {covariates}; the table has "
                             f"{list(table.columns)}")
        else:
            idps = [idps] if isinstance(idps, str) else list(idps)
            missing = [c for c in idps if c not in table.columns]
            if missing:
                problems.add(f"IDP columns missing from the table: {missing}")
            both = [c for c in idps if c in covariates]
            if both:
                problems.add(f"columns are both IDPs and covariates: {both}")
            if len(set(idps)) != len(idps):
                problems.add("IDP columns are listed more than once: "
                             f"{sorted({c for c in idps if idps.count(c) > 1})}")
            if not idps:
                problems.add("idps is empty; pass None to use every numeric column")
        problems.raise_if_any(header="the table cannot be used to fit a model")
        return idps

    def _build(self, schema: CovariateSchema, n_rows: int, device: torch.device) -> None:
        from normdiff_bids.model.backbones import get_backbone
        from normdiff_bids.model.diffusion import GaussianDiffusion
        from normdiff_bids.model.schedule import DiffusionConfig

        preset = self._preset()
        module_cls, config_cls = get_backbone(self.backbone)
        base = _backbone_preset(self.backbone, config_cls, preset["backbone_preset"], n_rows,
                                self.n_features_in_)
        self.backbone_config_ = dataclasses.replace(base, **dict(self.backbone_config or {}))
        self.diffusion_config_ = DiffusionConfig.from_dict({**preset["diffusion"],
                                                            **dict(self.diffusion_config or {})})
        self.encoder_config_ = CovariateEncoderConfig(**dict(self.encoder_config or {}))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(self.seed))
            encoder = CovariateEncoder(schema, self.encoder_config_)
            net = module_cls(self.n_features_in_, encoder.cond_dim, self.backbone_config_)
        self.encoder_ = encoder.to(device)
        self.network_ = net.to(device)
        self._diffusion = GaussianDiffusion(self.diffusion_config_)

    def _batch_size(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return 256 if self.backbone == "saint" and self.preset != "paper" else 1024

    def _epoch_budget(self, n_train: int) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        if self.preset == "paper":
            return PAPER["epochs"].get(self.backbone, 1500)
        config = self.backbone_config_
        if hasattr(config, "budgeted_epochs"):  # the backbone sizes its own budget (SAINT)
            return int(config.budgeted_epochs(n_train, self.n_features_in_, self.encoder_.cond_dim))
        per_epoch = math.ceil(n_train / self._batch_size())
        epochs = math.ceil(BUDGET_STEPS / per_epoch)
        epochs = min(epochs, BUDGET_ROWS // max(n_train, 1))
        return int(min(max(epochs, BUDGET_EPOCHS[0]), BUDGET_EPOCHS[1]))

    def _train(self, x, cont, cat, device):
        from normdiff_bids.model.diffusion import augment_inputs

        seed = int(self.seed)
        gen = torch.Generator().manual_seed(seed)
        n = len(x)
        n_val = int(round(self.validation_fraction * n)) if self.validation_fraction > 0 else 0
        if n_val and n - n_val < 2:
            n_val = 0
        perm = torch.randperm(n, generator=gen).numpy()
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        to = lambda a, idx: torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)  # noqa: E731
        x_tr, cont_tr, cat_tr = to(x, train_idx), to(cont, train_idx), to(cat, train_idx)
        x_va, cont_va, cat_va = to(x, val_idx), to(cont, val_idx), to(cat, val_idx)
        n_train = len(train_idx)

        paper = self.preset == "paper"
        epochs = self._epoch_budget(n_train)
        lr = self.lr
        if lr is None:
            recommended = getattr(self.backbone_config_, "recommended_lr", None)
            table = PAPER["lr"] if paper else DEFAULT_LR
            lr = recommended() if recommended else table.get(self.backbone, 1e-3)
        lr = float(lr)
        per_epoch = max(1, n_train // self._batch_size())
        # validate often enough to stop early, rarely enough not to dominate tiny epochs
        val_every = max(1, math.ceil(4 / per_epoch)) if n_val else 1
        patience = self.patience if self.patience is not None else max(25, epochs // 8)
        plateau = max(10, epochs // 20) if not paper else 75
        modules = nn.ModuleDict({"encoder": self.encoder_, "network": self.network_})
        optimizer = torch.optim.AdamW(modules.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=PLATEAU_FACTOR,
            patience=plateau if (paper or not n_val) else max(1, plateau // val_every))
        ema = _EMA(modules, self.ema_decay) if self.ema_decay else None
        early_stop = n_val > 0 and not paper

        records, best, best_state, best_epoch, since_best = [], math.inf, None, 0, 0
        batch_counter = 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + 1)  # dropout streams
            bar = progress(range(epochs), total=epochs, desc="training", verbose=self.verbose, unit="epoch")
            for epoch in bar:
                modules.train()
                order = torch.randperm(n_train, generator=gen)
                total = 0.0
                for idx in _batches(order, self._batch_size()):
                    idx = idx.to(device)
                    x0 = x_tr[idx]
                    if batch_counter % 2 == 1:
                        x0 = augment_inputs(x0, INPUT_NOISE_STD, generator=gen)
                    cond = self.encoder_(cont_tr[idx], cat_tr[idx], generator=gen)
                    loss = self._diffusion.training_loss(self.network_, x0, cond, generator=gen)
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
                    val_loss = self._validation_loss(modules, ema, x_va, cont_va, cat_va, seed)
                    if not paper:
                        scheduler.step(val_loss)
                if paper or not n_val:  # the reference schedules on the training loss
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
            "lr": lr, "batch_size": self._batch_size(), "ema_decay": self.ema_decay, "device": str(device),
            "n_parameters": int(sum(p.numel() for p in modules.parameters())),
        }
        return history, summary

    @torch.no_grad()
    def _validation_loss(self, modules, ema, x_va, cont_va, cat_va, seed) -> float:
        scored = ema.shadow if ema is not None else modules
        scored.eval()
        # a small validation set is repeated (each copy gets its own noise level and noise) and scored
        # in a few large calls rather than many tiny ones, which dominated the fit time of small cohorts
        repeats = max(1, math.ceil(VALIDATION_DRAWS / len(x_va)))
        x_rep, cont_rep, cat_rep = (a.repeat((repeats,) + (1,) * (a.dim() - 1))
                                    for a in (x_va, cont_va, cat_va))
        gen = torch.Generator().manual_seed(seed + 2)  # the same draws at every validation
        total, count = 0.0, 0
        for lo in range(0, len(x_rep), 8192):
            sl = slice(lo, lo + 8192)
            cond = scored["encoder"](cont_rep[sl], cat_rep[sl])
            loss = self._diffusion.training_loss(scored["network"], x_rep[sl], cond, generator=gen)
            total += float(loss) * len(x_rep[sl])
            count += len(x_rep[sl])
        modules.train()
        return total / count

    # ------------------------------------------------------------------ sampling machinery
    def _check_fitted(self) -> None:
        if not hasattr(self, "network_"):
            raise RuntimeError("this NormativeDiffusion is not fitted yet; call fit(table) or "
                               "load_model(path)")

    def _encode(self, table: pd.DataFrame):
        """Encoded covariates, rows that cannot be scored, rows outside the training range."""
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame of covariates, got {type(table).__name__}")
        schema = self.covariate_schema_
        cont, cat = schema.encode(table, unknown=self.unknown_site)
        missing = schema.missing_rows(cont, cat)
        extrapolated = schema.out_of_range(np.where(np.isfinite(cont), cont, 0)) & ~missing
        if missing.any():
            rows = list(table.index[missing][:5])
            warnings.warn(f"{int(missing.sum())} rows have a missing covariate and get no scores "
                          f"(NaN), e.g. rows {rows}", stacklevel=3)
        return cont, cat, missing, extrapolated

    def _use_grid(self) -> bool:
        return self.covariate_grid == "auto" and self.covariate_schema_.n_continuous == 1

    def _plan(self, cont, cat, rows, grid):
        """Covariate points to draw at, and each row's two points and interpolation weight.

        Returns ``(points_cont [P, n_cont], points_cat [P, n_cat], lo [r], hi [r], w_hi [r])`` for the
        rows ``rows``; points are sorted (categorical levels, then the continuous covariate), so a
        row's ``lo`` and ``hi`` are neighbours in that order.
        """
        cont, cat = cont[rows], cat[rows]
        if not grid:
            key = np.concatenate([cat.astype(np.float64), cont.astype(np.float64)], axis=1)
            uniq, inverse = np.unique(key, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            n_cat = cat.shape[1]
            return (uniq[:, n_cat:].astype(np.float32), uniq[:, :n_cat].astype(np.int64),
                    inverse, inverse, np.zeros(len(rows)))
        cov = self.covariate_schema_.continuous[0]
        step = self._grid_step()
        value = cov.mean + cont[:, 0].astype(np.float64) * cov.sd
        position = value / step
        # ages on a grid point (curve ages, or the same age decoded from float32) land on it exactly
        snapped = np.abs(position - np.round(position)) < 1e-4
        position = np.where(snapped, np.round(position), position)
        k = np.floor(position).astype(np.int64)
        w = position - k
        k_hi = np.where(w > 0, k + 1, k)
        keys = np.concatenate([np.column_stack([cat, k]), np.column_stack([cat, k_hi])])
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        lo, hi = inverse[: len(rows)], inverse[len(rows):]
        points_cont = ((uniq[:, -1] * step - cov.mean) / cov.sd).astype(np.float32)[:, None]
        return points_cont, uniq[:, :-1].astype(np.int64), lo, hi, w

    def _grid_step(self) -> float:
        if self.grid_step is not None:
            return float(self.grid_step)
        return float(self.covariate_schema_.continuous[0].sd * GRID_STEP_FRACTION)

    def _point_seed(self, cont_row: np.ndarray, cat_row: np.ndarray) -> int:
        """Random stream of one covariate point: a hash of the seed and the point's encoded covariates."""
        h = hashlib.blake2b(digest_size=8)
        h.update(np.int64(self.seed).tobytes())
        h.update(np.ascontiguousarray(cont_row, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(cat_row, dtype=np.int64).tobytes())
        return int.from_bytes(h.digest(), "little") & (2**63 - 1)

    def _draw(self, points_cont, points_cat, n_samples, desc) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first point, samples [p, S, D] float32 in model space)`` for consecutive points.

        Every network call has the same shape (a call is padded by repeating its final point), so a
        point's samples are bit-identical whichever points it is drawn with. That also makes them safe
        to reuse: points drawn before by this process with the same weights and sampling settings come
        from :data:`_POINT_CACHE` (a participant report's centile curves share their points with every
        other participant of the same sex and site).
        """
        device = next(self.network_.parameters()).device
        sampler, steps = self._sampler(), self._steps()
        n_draws = self._diffusion.noise_draws(sampler, steps)
        d = self.n_features_in_
        rows_per_call = min(ROWS_PER_CALL, NOISE_BYTES_PER_CALL // (4 * n_draws * d))
        per_call = max(1, rows_per_call // n_samples)
        n_points = len(points_cont)
        settings = (self._weights_token(), int(self.seed), n_samples, sampler, steps, str(device))
        keys = [settings + (np.ascontiguousarray(points_cont[i], dtype=np.float32).tobytes(),
                            np.ascontiguousarray(points_cat[i], dtype=np.int64).tobytes())
                for i in range(n_points)]
        self.encoder_.eval()
        self.network_.eval()
        bar = progress(total=n_points, desc=desc, verbose=self.verbose, unit="point")
        try:
            for first in range(0, n_points, per_call):
                idx = np.arange(first, min(first + per_call, n_points))
                out = np.empty((len(idx), n_samples, d), dtype=np.float32)
                todo = [j for j, i in enumerate(idx) if keys[i] not in _POINT_CACHE]
                for j, i in enumerate(idx):
                    if keys[i] in _POINT_CACHE:
                        out[j] = _POINT_CACHE[keys[i]]
                if todo:
                    fresh = idx[todo]
                    padded = np.concatenate([fresh, np.full(per_call - len(fresh), fresh[-1])])
                    noise = torch.stack([
                        torch.randn((n_draws, n_samples, d),
                                    generator=torch.Generator().manual_seed(
                                        self._point_seed(points_cont[i], points_cat[i])))
                        for i in padded], dim=1).to(device)
                    with torch.no_grad():
                        cond = self.encoder_(torch.from_numpy(points_cont[padded]).to(device),
                                             torch.from_numpy(points_cat[padded]).to(device))
                        x0 = self._diffusion.sample(self.network_, cond, noise, sampler=sampler,
                                                    steps=steps)
                    drawn = x0[: len(fresh)].float().cpu().numpy()
                    if not np.isfinite(drawn).all():
                        raise RuntimeError("the model produced non-finite samples; the fit diverged or the "
                                           "sampler is unstable for this diffusion setting")
                    for j, smp in zip(todo, drawn):
                        out[j] = smp
                        _POINT_CACHE.put(keys[idx[j]], smp)
                bar.update(len(idx))
                yield first, out
        finally:
            bar.close()

    def curve_ages(self, low: float, high: float, n_points: int = 15) -> np.ndarray:
        """About ``n_points`` ages from ``low`` to ``high`` for centile curves over age.

        On the scoring grid they are snapped onto grid points, so every curve at the same other
        covariates reuses the same draws (and each point costs one draw, not an interpolated two).
        """
        ages = np.linspace(float(low), float(high), int(n_points))
        if not self._use_grid():
            return ages
        step = self._grid_step()
        return np.unique(np.round(ages / step)) * step

    def _weights_token(self) -> str:
        """A digest of the fitted weights: the identity of the draws in :data:`_POINT_CACHE`."""
        token = getattr(self, "_weights_digest", None)
        if token is None:
            h = hashlib.blake2b(digest_size=16)
            for module in (self.encoder_, self.network_):
                for name, tensor in module.state_dict().items():
                    h.update(name.encode())
                    h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            token = self._weights_digest = h.hexdigest()
        return token

    def _scored_points(self, cont, cat, missing, with_joint: bool):
        """Iterate over the rows without missing covariates, in chunks that share covariate points.

        Yields ``(rows, q [r, S, D] per-IDP sorted samples in model space, joint references or None)``.
        A row's sorted samples are its own point's (exact) or the interpolation of its two grid points'
        quantile functions; its joint reference is that of the nearer point.
        """
        rows = np.flatnonzero(~missing)
        if not len(rows):
            return
        grid = self._use_grid()
        points_cont, points_cat, lo, hi, w = self._plan(cont, cat, rows, grid)
        last = np.maximum(lo, hi)
        order = np.argsort(last, kind="stable")
        cache: dict[int, tuple] = {}
        cursor = 0
        n_samples = int(self.n_samples)
        for first, samples in self._draw(points_cont, points_cat, n_samples, desc="sampling"):
            for j, smp in enumerate(samples):
                srt = np.sort(smp, axis=0).astype(np.float64)
                cache[first + j] = (srt, _point_joint_reference(smp)
                                    if with_joint else None)
            done = first + len(samples)
            end = cursor + np.searchsorted(last[order[cursor:]], done, side="left")
            take = order[cursor:end]
            cursor = end
            per_chunk = max(1, ROW_CHUNK_ELEMENTS // (n_samples * self.n_features_in_))
            for chunk in np.array_split(take, max(1, math.ceil(len(take) / per_chunk))):
                if not len(chunk):
                    continue
                q = np.stack([cache[i][0] for i in lo[chunk]])
                if grid:
                    w_hi = w[chunk][:, None, None]
                    q = (1 - w_hi) * q + w_hi * np.stack([cache[i][0] for i in hi[chunk]])
                nearer = np.where(w[chunk] > 0.5, hi[chunk], lo[chunk])
                ref = [cache[i][1] for i in nearer] if with_joint else None
                yield rows[chunk], q, ref
            keep = min(lo[order[cursor:]].min(), done) if cursor < len(order) else done
            for i in [i for i in cache if i < keep]:
                del cache[i]

    def _values(self, table) -> np.ndarray:
        missing = [c for c in self.idps_ if c not in table.columns]
        if missing:
            shown = missing if len(missing) <= 20 else missing[:20] + [f"... ({len(missing) - 20} more)"]
            raise InputError(f"the table lacks {len(missing)} of the model's {self.n_features_in_} IDP "
                             f"columns: {shown}; score a table with the IDPs the model was trained on")
        return _idp_matrix(table, self.idps_, "scoring")

    # ------------------------------------------------------------------ public prediction API
    def sample(self, covariates: pd.DataFrame, n_samples: int | None = None) -> np.ndarray:
        """Draws from the model at each row's exact covariates: ``[rows, n_samples, D]``, original units.

        Rows with identical covariates get identical draws (one stream per covariate point); rows with
        a missing covariate get NaN.
        """
        self._check_fitted()
        n_samples = int(n_samples or self.n_samples)
        cont, cat, missing, _ = self._encode(covariates)
        rows = np.flatnonzero(~missing)
        out = np.full((len(covariates), n_samples, self.n_features_in_), np.nan)
        if len(rows):
            points_cont, points_cat, lo, _, _ = self._plan(cont, cat, rows, grid=False)
            for first, samples in self._draw(points_cont, points_cat, n_samples, desc="sampling"):
                sel = (lo >= first) & (lo < first + len(samples))
                out[rows[sel]] = self.scaler_.inverse_transform(samples[lo[sel] - first].astype(np.float64))
        return out

    def predict_quantiles(self, covariates: pd.DataFrame, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
                          ) -> pd.DataFrame:
        """Model quantiles ``q`` of every IDP at each row's covariates, in original units.

        Columns: a ``MultiIndex`` (idp, q). The same draws (and grid) as scoring.
        """
        self._check_fitted()
        q = np.atleast_1d(np.asarray(q, dtype=np.float64))
        out = np.full((len(covariates), len(q), self.n_features_in_), np.nan)
        cont, cat, missing, _ = self._encode(covariates)
        with _small_blas():
            for rows, srt, _ in self._scored_points(cont, cat, missing, with_joint=False):
                out[rows] = self.scaler_.inverse_transform(sample_quantiles(srt, q))
        columns = pd.MultiIndex.from_product([self.idps_, q.tolist()], names=["idp", "q"])
        return pd.DataFrame(out.transpose(0, 2, 1).reshape(len(covariates), -1), index=covariates.index,
                            columns=columns)

    def _score_arrays(self, table: pd.DataFrame, with_joint: bool = True) -> dict:
        self._check_fitted()
        values = self._values(table)
        z_values = self.scaler_.transform(values)
        n, d = values.shape
        centiles = np.full((n, d), np.nan)
        tail = np.zeros((n, d), dtype=np.int8)
        joint = np.full((n, 2), np.nan)
        cont, cat, missing, extrapolated = self._encode(table)
        with _small_blas():
            for rows, srt, refs in self._scored_points(cont, cat, missing, with_joint):
                c, t = empirical_centiles(z_values[rows], srt)
                centiles[rows], tail[rows] = c, t
                if with_joint:
                    joint[rows] = _joint_scores(centiles_to_z(c), refs)
        return {"values": values, "centiles": centiles, "tail": tail, "joint_stat": joint[:, 0],
                "joint_centile": joint[:, 1], "extrapolated": extrapolated, "missing_covariates": missing}

    def predict_centiles(self, table: pd.DataFrame) -> pd.DataFrame:
        """Centile of each IDP value at the row's covariates: ``[rows, D]`` strictly inside (0, 1).

        NaN where the value or a covariate is missing.
        """
        arrays = self._score_arrays(table, with_joint=False)
        return pd.DataFrame(arrays["centiles"], index=table.index, columns=self.idps_)

    def predict_zscores(self, table: pd.DataFrame) -> pd.DataFrame:
        """``Phi^-1`` of :meth:`predict_centiles`."""
        centiles = self.predict_centiles(table)
        return pd.DataFrame(centiles_to_z(centiles.to_numpy()), index=table.index, columns=self.idps_)

    def score(self, table: pd.DataFrame) -> pd.DataFrame:
        """Tidy scores: one row per (subject[/session], IDP).

        Columns: ``participant_id`` (or ``row``, the table's index, when there is no id column),
        ``session_id`` (when present), ``idp``, ``value``, ``centile``, ``z``, ``tail`` (-1/0/+1: value
        beyond the sampled range, scored by the tail rule), ``extrapolated`` (covariates outside the
        training range), ``joint_stat``, ``joint_centile``, ``joint_z``. A missing value or covariate
        gives NaN centile and z.
        """
        a = self._score_arrays(table, with_joint=True)
        n, d = a["values"].shape
        columns = {}
        if "participant_id" in table.columns:
            columns["participant_id"] = np.repeat(table["participant_id"].to_numpy(dtype=object), d)
        else:
            columns["row"] = np.repeat(table.index.to_numpy(), d)
        if "session_id" in table.columns:
            columns["session_id"] = np.repeat(table["session_id"].to_numpy(dtype=object), d)
        columns.update({
            "idp": np.tile(np.asarray(self.idps_, dtype=object), n),
            "value": a["values"].reshape(-1),
            "centile": a["centiles"].reshape(-1),
            "z": centiles_to_z(a["centiles"]).reshape(-1),
            "tail": a["tail"].reshape(-1),
            "extrapolated": np.repeat(a["extrapolated"], d),
            "joint_stat": np.repeat(a["joint_stat"], d),
            "joint_centile": np.repeat(a["joint_centile"], d),
            "joint_z": np.repeat(centiles_to_z(a["joint_centile"]), d),
        })
        return pd.DataFrame(columns)

    # ------------------------------------------------------------------ description and persistence
    def model_card(self) -> dict:
        """A JSON-safe description of the fitted model (what the reports and the bundle show)."""
        self._check_fitted()
        schema = self.covariate_schema_
        return {
            "estimator": "NormativeDiffusion",
            "package_version": __version__,
            "created": getattr(self, "created_", None),
            "backbone": self.backbone,
            "backbone_config": dataclasses.asdict(self.backbone_config_),
            "diffusion_config": self.diffusion_config_.to_dict(),
            "sampler": self._sampler(), "steps": self._steps(), "n_samples": int(self.n_samples),
            "scoring_grid": ({"covariate": schema.continuous[0].name, "step": self._grid_step()}
                             if self._use_grid() else None),
            "preprocessing": self.preprocessing,
            "idps": list(self.idps_),
            "covariates": [
                *({"name": c.name, "kind": "continuous", "mean": c.mean, "sd": c.sd, "range": [c.min, c.max]}
                  for c in schema.continuous),
                *({"name": c.name, "kind": "categorical", "levels": list(c.levels),
                   "unknown_level_trained": c.marginal} for c in schema.categorical)],
            "unknown_site": self.unknown_site,
            "n_train": int(self.n_train_),
            "training_summary": _json_ready(self.training_summary_),
            "seed": int(self.seed),
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False):
        """Write the model as a bundle folder (``model.safetensors`` + ``model.json``); returns the path."""
        self._check_fitted()
        if not hasattr(self, "created_"):
            self.created_ = datetime.now(UTC).isoformat(timespec="seconds")
        tensors = {f"encoder.{k}": v for k, v in self.encoder_.state_dict().items()}
        tensors.update({f"network.{k}": v for k, v in self.network_.state_dict().items()})
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        meta = {
            "estimator": "NormativeDiffusion",
            "params": params,
            "idps": list(self.idps_),
            "covariate_schema": self.covariate_schema_.to_dict(),
            "preprocessing": self.scaler_.to_dict(),
            "backbone_config": dataclasses.asdict(self.backbone_config_),
            "diffusion_config": self.diffusion_config_.to_dict(),
            "encoder_config": dataclasses.asdict(self.encoder_config_),
            "training_summary": _json_ready(self.training_summary_),
            "n_dropped": int(self.n_dropped_),
            "history": {c: self.history_[c].tolist() for c in self.history_.columns},
            "created": self.created_,
            "model_card": self.model_card(),
        }
        return save_bundle(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormativeDiffusion:
        """Read a bundle written by :meth:`save` (see :func:`load_model`)."""
        return load_model(path)


def load_model(path: str | os.PathLike, device: str | None = None) -> NormativeDiffusion:
    """Load a model bundle; refuses tampered, foreign or truncated bundles with a :class:`BundleError`."""
    from normdiff_bids.model.backbones import get_backbone
    from normdiff_bids.model.diffusion import GaussianDiffusion
    from normdiff_bids.model.schedule import DiffusionConfig

    tensors, meta = load_bundle(path)
    fix = "re-create the model with this version of normdiff-bids"
    if meta.get("estimator") != "NormativeDiffusion":
        raise BundleError(f"{path}/model.json describes a {meta.get('estimator')!r}, not a "
                          f"NormativeDiffusion model; pass a folder written by NormativeDiffusion.save")
    try:
        params = dict(meta["params"])
        params["covariates"] = tuple(params["covariates"])
        if device is not None:
            params["device"] = device
        check_params(NormativeDiffusion, params, path)  # the estimator's own checks, on edited values too
        model = NormativeDiffusion(**params)
        model.idps_ = list(meta["idps"])
        model.n_features_in_ = len(model.idps_)
        model.covariate_schema_ = CovariateSchema.from_dict(meta["covariate_schema"])
        model.scaler_ = IDPScaler.from_dict(meta["preprocessing"])
        module_cls, config_cls = get_backbone(model.backbone)
        model.backbone_config_ = _config_from_dict(config_cls, meta["backbone_config"])
        model.diffusion_config_ = DiffusionConfig.from_dict(meta["diffusion_config"])
        model.encoder_config_ = CovariateEncoderConfig(**meta["encoder_config"])
        model.training_summary_ = dict(meta["training_summary"])
        model.n_train_ = int(model.training_summary_["n_train"])
        model.n_dropped_ = int(meta.get("n_dropped", 0))
        model.history_ = pd.DataFrame(meta["history"]).astype({"val_loss": float})
        model.created_ = meta.get("created")
        encoder = CovariateEncoder(model.covariate_schema_, model.encoder_config_)
        network = module_cls(model.n_features_in_, encoder.cond_dim, model.backbone_config_)
        encoder.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")})
        network.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("network.")})
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BundleError(f"{path}/model.json and model.safetensors do not describe a model this version "
                          f"can rebuild ({type(err).__name__}: {err}); {fix}") from None
    dev = model._torch_device()
    model.encoder_ = encoder.to(dev).eval()
    model.network_ = network.to(dev).eval()
    model._diffusion = GaussianDiffusion(model.diffusion_config_)
    return model


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _backbone_preset(name, config_cls, preset_name, n_rows, n_features):
    """The backbone's configuration for ``preset_name`` ("default" or "paper")."""
    if hasattr(config_cls, "from_preset"):  # backbones sized from the data (SAINT)
        return config_cls.from_preset("paper" if preset_name == "paper" else None, n_rows, n_features)
    from normdiff_bids.model.backbones import preset_config

    return preset_config(name, preset_name)


def _config_from_dict(config_cls, data):
    if hasattr(config_cls, "from_dict"):
        return config_cls.from_dict(data)
    return config_cls(**data)


def _idp_matrix(table: pd.DataFrame, idps: list[str], purpose: str) -> np.ndarray:
    """IDP columns as float64 [R, D]; non-numeric columns are an error naming them (NaN stays NaN)."""
    bad = []
    columns = []
    for name in idps:
        col = table[name]
        if pd.api.types.is_bool_dtype(col):
            bad.append(f"'{name}' (true/false values)")
            continue
        if pd.api.types.is_numeric_dtype(col):
            columns.append(col.to_numpy(dtype=np.float64, na_value=np.nan))
            continue
        conv = pd.to_numeric(col, errors="coerce")
        text = col.astype("string").str.strip().str.lower()
        wrong = conv.isna() & col.notna() & ~text.isin(["", "n/a", "na", "nan"])
        if wrong.any():
            first = wrong.to_numpy().nonzero()[0][0]
            bad.append(f"'{name}' (row {table.index[first]}: {col.iloc[first]!r})")
            continue
        columns.append(conv.to_numpy(dtype=np.float64, na_value=np.nan))
    if bad:
        raise InputError(f"IDP columns must be numeric for {purpose}: {', '.join(bad)}; fix or drop those "
                         f"columns (write 'n/a' for missing values)")
    return np.column_stack(columns) if columns else np.empty((len(table), 0))


def _present(column: pd.Series) -> pd.Series:
    """Whether each covariate value is present (not NaN/None/'n/a'/empty/inf)."""
    if pd.api.types.is_numeric_dtype(column):
        return pd.Series(np.isfinite(column.to_numpy(dtype=np.float64, na_value=np.nan)), index=column.index)
    text = column.astype("string").str.strip().str.lower()
    return column.notna() & ~text.isin(["", "n/a", "na", "nan", "none", "null"]).fillna(True)


def _batches(order: torch.Tensor, batch_size: int):
    """Split a permutation into batches; a last batch of one row joins the previous one (BatchNorm)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


class _EMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = copy.deepcopy(module)
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p.detach(), 1 - self.decay)
        for s, b in zip(self.shadow.buffers(), module.buffers()):
            s.copy_(b)


def _small_blas():
    """Run numpy/scipy BLAS single-threaded: scoring does many small (D x D) factorisations, for which
    BLAS threads only add synchronisation (on a busy 2-core machine a 200 x 200 Cholesky went from
    0.3 ms to over 100 ms with two threads). The network's own threads (torch) are not affected."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _point_joint_reference(samples: np.ndarray):
    """The joint-deviation reference of one covariate point ``[S, D]``, computed once, shared by its rows."""
    chol, ref = joint_reference(samples[None].astype(np.float64))
    return chol[0], ref[0]


def _joint_scores(z_values: np.ndarray, refs) -> np.ndarray:
    """``[r, 2]`` joint statistic and its centile among the reference of each row's nearer point."""
    out = np.full((len(z_values), 2), np.nan)
    for i, (z, (chol, ref)) in enumerate(zip(z_values, refs)):
        if not np.isfinite(z).all():
            continue
        stat = mahalanobis(z[None, None], chol[None])[0, 0]
        out[i, 0] = stat
        out[i, 1] = empirical_centiles(np.array([[stat]]), ref[None, :, None])[0][0, 0]
    return out


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) else False
    except (TypeError, ValueError):
        return False


def _json_ready(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class _DrawCache:
    """Draws of covariate points kept for reuse within one process, bounded in bytes (oldest dropped)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: dict[tuple, np.ndarray] = {}
        self._bytes = 0

    def __contains__(self, key) -> bool:
        return key in self._items

    def __getitem__(self, key) -> np.ndarray:
        return self._items[key]

    def put(self, key, samples: np.ndarray) -> None:
        if key in self._items or samples.nbytes > self.max_bytes:
            return
        self._items[key] = samples
        self._bytes += samples.nbytes
        while self._bytes > self.max_bytes:
            oldest = next(iter(self._items))
            self._bytes -= self._items.pop(oldest).nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


#: Process-wide reuse of drawn covariate points (see ``NormativeDiffusion._draw``); 256 MB at most.
_POINT_CACHE = _DrawCache(256 * 2**20)
