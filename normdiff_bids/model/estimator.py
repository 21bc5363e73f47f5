"""The normative model: :class:`NormativeDiffusion` fits a conditional diffusion model of IDPs given
covariates and scores people against it (per-IDP centiles and z-scores, a joint deviation score).

This module holds the estimator contract (parameters and their checks, ``fit``, the public prediction
API, the model card, save and load). The training loop is :mod:`~normdiff_bids.model.training`, the
calibration layer's fit :mod:`~normdiff_bids.model.calibration`, the columns and rows ``fit`` trains on
:mod:`~normdiff_bids.model.tables`, the sampling plan and draws :mod:`~normdiff_bids.model.sampling`,
the two-stage pieces :mod:`~normdiff_bids.model.location_scale` and
:mod:`~normdiff_bids.model.model_space`, new sites :mod:`~normdiff_bids.model.adaptation`, the presets
:mod:`~normdiff_bids.model.presets` and the networks :mod:`~normdiff_bids.model.backbones`. It is over
400 lines because the class docstring documents every parameter (the estimator's user documentation)
and ``load_model`` rebuilds every part of a bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import os
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import torch

from normdiff_bids._version import __version__
from normdiff_bids.bidsio import json_ready
from normdiff_bids.errors import InputError
from normdiff_bids.model import params as P
from normdiff_bids.model.backbones import backbone_names, get_spec
from normdiff_bids.model.bundle import BundleError, check_params, load_bundle, save_bundle
from normdiff_bids.model.calibration import fit_calibration
from normdiff_bids.model.covariates import CovariateEncoder, CovariateEncoderConfig, CovariateSchema
from normdiff_bids.model.draw_table import MAX_TABLE_BYTES, DrawTable, grid_points
from normdiff_bids.model.location_scale import LocationScaleStage
from normdiff_bids.model.model_space import ModelSpace
from normdiff_bids.model.preprocess import METHODS as PREPROCESSING_METHODS
from normdiff_bids.model.preprocess import IDPScaler
from normdiff_bids.model.presets import PRESETS
from normdiff_bids.model.sampling import (
    GRID_STEP_FRACTION,
    Drawer,
    Grid,
    plan_points,
    scored_points,
    small_blas,
)
from normdiff_bids.model.tables import idp_matrix, select_idps, training_rows
from normdiff_bids.model.training import MIN_TRAIN_ROWS, TrainingSettings, train_denoiser
from normdiff_bids.scoring.centiles import centiles_to_z, empirical_centiles, sample_quantiles
from normdiff_bids.scoring.conditional import MIN_SPARE_DRAWS, conditional_centiles, joint_subset_scores
from normdiff_bids.scoring.conformal import CentileCalibration
from normdiff_bids.scoring.joint import joint_scores

__all__ = ["NormativeDiffusion", "load_model"]


def _sampler_names():
    from normdiff_bids.model.diffusion import SAMPLERS

    return SAMPLERS


#: What each hyper-parameter may be (checked at ``fit``); a failing one is reported as ``name=value (hint)``.
PARAMETER_CONSTRAINTS = {
    "backbone": P.one_of(backbone_names, lambda: f"choose one of {sorted(backbone_names())}"),
    "covariates": P.non_empty_names("a list of column names, e.g. ['age', 'sex']"),
    "unknown_site": P.one_of(("error", "marginal"), "choose 'error' or 'marginal'"),
    "preprocessing": P.one_of(PREPROCESSING_METHODS, f"choose one of {PREPROCESSING_METHODS}"),
    "validation_fraction": P.interval(0, 0.5, "need 0 <= f < 0.5", closed="left"),
    "epochs": P.whole_number(1, "a positive integer or None", none_ok=True),
    "batch_size": P.whole_number(2, "an integer >= 2", none_ok=True),
    "n_samples": P.whole_number(20, "an integer >= 20; 1000 recommended"),
    "sampler": P.Constraint(lambda v: v is None or v in _sampler_names(),
                            lambda: f"choose one of {_sampler_names()}"),
    "steps": P.whole_number(1, "a positive integer or None", none_ok=True),
    "preset": P.one_of(tuple(PRESETS), "None or 'paper'"),
    "ema_decay": P.interval(0, 1, "None or in (0, 1)", none_ok=True),
    "covariate_grid": P.one_of(("auto", "off"), "choose 'auto' or 'off'"),
    "grid_step": P.interval(0, None, "None or a positive number", none_ok=True),
    "location_scale": P.one_of(("pooled", "off"), "choose 'pooled' or 'off'"),
    "calibration": P.one_of(("conformal", "off"), "choose 'conformal' or 'off'"),
    "site_covariate": P.Constraint(lambda v: v is None or isinstance(v, str), "a covariate name or None"),
    "draw_table": P.one_of(("auto", "off"), "choose 'auto' or 'off'"),
    "missing_idps": P.one_of(("use", "drop"), "choose 'use' or 'drop'"),
}


class NormativeDiffusion:
    """Joint normative model of IDPs given covariates, learned by a conditional diffusion model.

    >>> m = NormativeDiffusion(covariates=("age", "sex", "site"), seed=0).fit(train)
    >>> scores = m.score(test)          # tidy: participant_id, idp, value, centile, z, ...
    >>> m.save("model"); m2 = load_model("model")

    Parameters (stored as given; ``fit`` learns)
    ----------
    backbone : "film-mlp" | "saint" | any registered name
        Denoising network (:func:`normdiff_bids.model.backbones.backbone_names`).
    covariates : sequence of column names
        ``age`` (and any numeric column) is standardised; ``sex``, ``site`` and any non-numeric column
        are categorical with learned embeddings.
    seed : int
        Seeds weight initialisation, data order, training noise and every sampling stream. Same seed,
        same data, same device: bit-identical model and scores on CPU.
    device : "auto" | "cpu" | "cuda"
        ``"auto"`` picks CUDA when available.
    epochs : int or None
        Maximum training epochs. ``None``: the backbone preset's budget from N (the FiLM-MLP's is
        ``backbones.BUDGET_*``), with early stopping.
    batch_size : int or None
        Training batch. ``None``: the backbone preset's: 1024 (the paper's) for the FiLM-MLP and the
        paper preset, 256 for the budgeted SAINT (see its registry entry).
    lr : float or None
        AdamW learning rate; ``None``: the backbone preset's, 1e-3 for the FiLM-MLP, 3e-4 for SAINT
        (the paper's).
    n_samples : int
        Model draws per covariate point when scoring (>= 20; 1000 gives centiles with a Monte Carlo
        SD below 0.016).
    sampler, steps : str, int or None
        Sampler of :class:`~normdiff_bids.model.diffusion.GaussianDiffusion` and its network
        evaluations; ``None``: ``presets.DEFAULTS`` (or ``presets.PAPER`` with ``preset="paper"``).
    validation_fraction : float
        Share of the complete rows held out for early stopping and the best checkpoint (0 disables:
        the final weights are kept and the LR plateau follows the training loss).
    unknown_site : "error" | "marginal"
        What scoring does with a site never seen in training: refuse (default), or score under the
        model's marginal over sites (the unknown-site level trained by embedding dropout).
    preprocessing : "zscore" | "quantile-normal"
        Per-IDP transform before diffusion (:class:`~normdiff_bids.model.preprocess.IDPScaler`).
    backbone_config, diffusion_config, encoder_config : dict or None
        Overrides of the backbone preset, of ``DEFAULTS["diffusion"]`` (fields of
        ``DiffusionConfig``) and of :class:`CovariateEncoderConfig`.
    preset : None | "paper"
        ``"paper"``: the reference setting (``presets.PAPER``): its diffusion, sampler, network, epochs;
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
        quantile function that is smooth in age, with a step of 1/10 of the age SD (about 2 years
        for a lifespan cohort), is far below the Monte Carlo error of 1000 draws (a centile SD of
        about 0.016); interpolating two independent sample sets also lowers that Monte Carlo error.
        With the two-stage model the grid carries only the shape and dependence of the standardised
        draws (location and spread are the stage's at the row's exact age): synthetic D=20, N=2000,
        mean |centile - truth| was 0.0246 at 1/30, 0.0245 at 1/10, 0.0246 at 1/6, so 1/10 draws a
        third of the points. Tested against exact scoring.
    grid_step : float or None
        Grid step in the continuous covariate's units; ``None``: its training SD / 10.
    location_scale : "pooled" | "off"
        ``"pooled"`` (two-stage): a per-IDP location and spread on the covariates with partially pooled
        site effects (:mod:`~normdiff_bids.model.location_scale`), then the diffusion model on the
        standardised residuals given the covariates other than the site. ``"off"``: the diffusion model
        on the IDPs, with the site as a covariate of the network.
    calibration : "conformal" | "off"
        Apply the calibration layer learnt at ``fit`` from the reference controls (two-stage models;
        :mod:`~normdiff_bids.scoring.conformal`); ``"off"`` scores with the raw model. Can be changed
        after fitting.
    site_covariate : str or None
        The categorical covariate whose levels are partially pooled and that :meth:`adapt` learns.
    draw_table : "auto" | "off"
        ``"auto"``: on the scoring grid, ``fit`` draws every grid point of the training range once and
        keeps the draws (in the bundle too), so later scoring, quantiles and centile curves evaluate no
        network and give the same numbers on every machine (:mod:`~normdiff_bids.model.draw_table`;
        skipped when it would exceed ``MAX_TABLE_BYTES``). ``"off"``: draw when scoring. Can be changed
        after fitting (``"off"`` then draws afresh).
    missing_idps : "use" | "drop"
        Training rows that miss some IDPs (NaN or inf): ``"use"`` trains on the IDPs they have (the
        location-scale stage gives a missing entry no weight, the network's loss leaves it out and its
        input gets a stand-in drawn from the standardised marginal); ``"drop"`` drops those rows.
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
                 covariate_grid: str = "auto", grid_step: float | None = None,
                 location_scale: str = "pooled", calibration: str = "conformal",
                 site_covariate: str | None = "site", draw_table: str = "auto", missing_idps: str = "use",
                 verbose: bool = True):
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
        self.location_scale = location_scale
        self.calibration = calibration
        self.site_covariate = site_covariate
        self.draw_table = draw_table
        self.missing_idps = missing_idps
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
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be None or 'paper', not {self.preset!r}")
        return PRESETS[self.preset]

    def _backbone_preset(self):
        return get_spec(self.backbone).preset(self._preset()["backbone_preset"])

    def _sampler(self) -> str:
        return self.sampler or self._preset()["sampler"]

    def _steps(self) -> int:
        return int(self.steps or self._preset()["steps"])

    def _batch_size(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return int(self._backbone_preset().batch_size)

    def _epoch_budget(self, n_train: int) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        rule = self._backbone_preset().epochs
        return int(rule(self.backbone_config_, n_train, self.n_features_in_, self.encoder_.cond_dim,
                        self._batch_size()))

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
        P.check_parameters(self, PARAMETER_CONSTRAINTS, "NormativeDiffusion")
        self._torch_device()

    # ------------------------------------------------------------------ fitting
    def fit(self, table: pd.DataFrame, idps: Sequence[str] | None = None) -> NormativeDiffusion:
        """Learn the joint distribution of ``idps`` given the covariates from the rows of ``table``.

        ``idps=None`` takes every numeric column that is not a covariate or an id column. Rows with a
        missing covariate (or no IDP) are dropped (count in ``n_dropped_``, with a warning); rows missing
        some IDPs train on those they have (``missing_idps="use"``, count in ``n_partial_``) or are
        dropped too (``"drop"``).
        Returns ``self``.
        """
        self._check_params()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"fit expects a pandas DataFrame, got {type(table).__name__}")
        start = time.perf_counter()
        self._weights_digest = None  # new weights: earlier draws are not theirs
        covariates = list(self.covariates)
        idps = select_idps(table, idps, covariates)
        kept, values, n_dropped, n_partial = training_rows(table, idps, covariates, self.missing_idps,
                                                           MIN_TRAIN_ROWS)
        schema = CovariateSchema.from_table(kept, covariates)
        cont, cat = schema.encode(kept)
        scaler = IDPScaler(self.preprocessing).fit(values)
        x = scaler.transform(values)
        pooled = self.location_scale == "pooled"
        space = ModelSpace(schema, scaler, None, self.site_covariate if pooled else None)
        x_model = x
        if pooled:
            inputs = space.stage_inputs(cont, cat)
            n_sites = len(schema.categorical[space.site_index].levels) if space.site_index is not None else 0
            space.stage = LocationScaleStage().fit(*inputs, x, n_sites=n_sites)
            x_model = space.stage.standardise(*inputs, x)
        stage = space.stage

        self.idps_ = list(idps)
        self.n_features_in_ = len(idps)
        self.covariate_schema_ = schema
        self.scaler_ = scaler
        self.stage_ = stage
        self.calibration_ = None
        self.adaptations_ = []
        self.n_dropped_ = n_dropped
        self.n_partial_ = n_partial
        device = self._torch_device()
        self._build(space.network_schema(), n_rows=len(x), device=device)
        try:
            history, summary = train_denoiser(self.encoder_, self.network_, self._diffusion,
                                              x_model.astype(np.float32), cont, space.network_cat(cat),
                                              device, self._training_settings())
        except BaseException:
            # an interrupted or failed fit must not leave a model that looks fitted
            for name in ("encoder_", "network_"):
                self.__dict__.pop(name, None)
            raise
        self.history_ = history
        self.n_train_ = summary["n_train"]
        self.draw_table_ = None
        if self.draw_table == "auto":  # first, so that the calibration below already scores from it
            self.draw_table_ = self._build_draw_table()
        if stage is not None and self.calibration == "conformal":
            self.calibration_ = fit_calibration(self, space, x, cont, cat)
        summary.update(n_rows=len(table), n_dropped=n_dropped, seconds=round(time.perf_counter() - start, 2))
        self.training_summary_ = summary
        return self

    def adapt(self, table: pd.DataFrame, refine: bool = False) -> NormativeDiffusion:
        """A copy of the model that also knows the sites of ``table`` it has not seen, learnt from them.

        ``table`` holds the new sites' reference controls (covariates and the model's IDPs). Only the
        location-scale stage's effects of those sites are estimated, by the same empirical Bayes that
        pooled the training sites, so a site with 5 controls is shrunk toward the population and one
        with 50 gets close to its own mean and spread. The network, the known sites' effects and the
        calibration layer are unchanged: every known site scores bit-identically. A site the model
        knows is an error, unless ``refine=True`` re-estimates it from these rows alone.
        """
        from normdiff_bids.model.adaptation import adapt_to_new_sites

        return adapt_to_new_sites(self, table, refine=refine)

    def _model_space(self) -> ModelSpace:
        return ModelSpace(self.covariate_schema_, self.scaler_, self.stage_,
                          self.site_covariate if self.stage_ is not None else None)

    def _build(self, schema: CovariateSchema, n_rows: int, device: torch.device) -> None:
        from normdiff_bids.model.diffusion import GaussianDiffusion
        from normdiff_bids.model.schedule import DiffusionConfig

        spec = get_spec(self.backbone)
        base = self._backbone_preset().config(n_rows, self.n_features_in_)
        self.backbone_config_ = dataclasses.replace(base, **dict(self.backbone_config or {}))
        self.diffusion_config_ = DiffusionConfig.from_dict({**self._preset()["diffusion"],
                                                            **dict(self.diffusion_config or {})})
        self.encoder_config_ = CovariateEncoderConfig(**dict(self.encoder_config or {}))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(self.seed))
            encoder = CovariateEncoder(schema, self.encoder_config_)
            net = spec.module(self.n_features_in_, encoder.cond_dim, self.backbone_config_)
        self.encoder_ = encoder.to(device)
        self.network_ = net.to(device)
        self._diffusion = GaussianDiffusion(self.diffusion_config_)

    def _training_settings(self) -> TrainingSettings:
        preset = self._preset()
        lr = self.lr if self.lr is not None else self._backbone_preset().lr
        return TrainingSettings(
            seed=int(self.seed), validation_fraction=self.validation_fraction,
            epoch_budget=self._epoch_budget,
            lr=float(lr), batch_size=self._batch_size(), patience=self.patience, ema_decay=self.ema_decay,
            early_stopping=preset["early_stopping"], plateau_on=preset["plateau_on"],
            plateau_patience=preset["plateau_patience"], verbose=self.verbose)

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
        finite = np.where(np.isfinite(cont), cont, 0)
        extrapolated = (schema.out_of_range(finite) | schema.out_of_level_range(finite, cat)) & ~missing
        if missing.any():
            rows = list(table.index[missing][:5])
            warnings.warn(f"{int(missing.sum())} rows have a missing covariate and get no scores "
                          f"(NaN), e.g. rows {rows}", stacklevel=3)
        return cont, cat, missing, extrapolated

    def _use_grid(self) -> bool:
        return self.covariate_grid == "auto" and self.covariate_schema_.n_continuous == 1

    def _grid_step(self) -> float:
        if self.grid_step is not None:
            return float(self.grid_step)
        return float(self.covariate_schema_.continuous[0].sd * GRID_STEP_FRACTION)

    def _grid(self) -> Grid | None:
        """The scoring grid (``covariate_grid="auto"`` with one continuous covariate), else ``None``."""
        if not self._use_grid():
            return None
        cov = self.covariate_schema_.continuous[0]
        return Grid(mean=cov.mean, sd=cov.sd, step=self._grid_step())

    def _drawer(self, use_table: bool = True) -> Drawer:
        table = getattr(self, "draw_table_", None) if use_table and self.draw_table == "auto" else None
        return Drawer(self.encoder_, self.network_, self._diffusion, seed=int(self.seed),
                      sampler=self._sampler(), steps=self._steps(), n_features=self.n_features_in_,
                      weights_token=self._weights_token(), verbose=self.verbose,
                      standardise=self.stage_ is not None, table=table)

    def _build_draw_table(self) -> DrawTable | None:
        """The draws of every scoring-grid point of the training range (``None`` off the grid or when
        they would exceed ``MAX_TABLE_BYTES``)."""
        grid = self._grid()
        if grid is None:
            return None
        age = self.covariate_schema_.continuous[0]
        levels = [list(range(0 if c.marginal else 1, len(c.levels) + 1))
                  for c in self._model_space().network_schema().categorical]
        cont, cat = grid_points(grid, age.min, age.max, levels)
        if len(cont) * int(self.n_samples) * self.n_features_in_ * 4 > MAX_TABLE_BYTES:
            return None
        return DrawTable.build(self._drawer(use_table=False), cont, cat, int(self.n_samples))

    def _scored_points(self, cont, cat, missing, with_joint: bool):
        """As :func:`~normdiff_bids.model.sampling.scored_points`, on the covariates the network sees."""
        return scored_points(self._drawer(), self._grid(), cont, self._model_space().network_cat(cat),
                             missing, int(self.n_samples), with_joint)

    def _calibrated(self) -> CentileCalibration | None:
        return self.calibration_ if self.calibration == "conformal" else None

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
        """A digest of the fitted weights: the identity of the draws in the process-wide draw cache."""
        token = getattr(self, "_weights_digest", None)
        if token is None:
            h = hashlib.blake2b(digest_size=16)
            for module in (self.encoder_, self.network_):
                for name, tensor in module.state_dict().items():
                    h.update(name.encode())
                    h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            token = self._weights_digest = h.hexdigest()
        return token

    def _values(self, table) -> np.ndarray:
        missing = [c for c in self.idps_ if c not in table.columns]
        if missing:
            shown = missing if len(missing) <= 20 else missing[:20] + [f"... ({len(missing) - 20} more)"]
            raise InputError(f"the table lacks {len(missing)} of the model's {self.n_features_in_} IDP "
                             f"columns: {shown}; score a table with the IDPs the model was trained on")
        return idp_matrix(table, self.idps_, "scoring")

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
            space = self._model_space()
            # the network's covariates only: rows of different sites share the draws of their point
            points_cont, points_cat, lo, _, _ = plan_points(cont, space.network_cat(cat), rows, grid=None)
            for first, samples in self._drawer().draw(points_cont, points_cat, n_samples, desc="sampling"):
                sel = (lo >= first) & (lo < first + len(samples))
                target = rows[sel]
                out[target] = space.from_model(samples[lo[sel] - first], cont[target], cat[target])
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
        space, layer = self._model_space(), self._calibrated()
        sites = space.site_codes(cat)
        with small_blas():
            for rows, srt, _ in self._scored_points(cont, cat, missing, with_joint=False):
                for code in np.unique(sites[rows]):
                    sub = sites[rows] == code
                    q_model = q if layer is None else layer.inverse(q[None, :], np.array([code]))[0]
                    target = rows[sub]
                    model_q = sample_quantiles(srt[sub], q_model)          # [r, Q, D]
                    out[target] = space.from_model(model_q, cont[target], cat[target])
        columns = pd.MultiIndex.from_product([self.idps_, q.tolist()], names=["idp", "q"])
        return pd.DataFrame(out.transpose(0, 2, 1).reshape(len(covariates), -1), index=covariates.index,
                            columns=columns)

    def _score_arrays(self, table: pd.DataFrame, with_joint: bool = True, given=None) -> dict:
        self._check_fitted()
        given_idx = self._given_indices(given)
        values = self._values(table)
        cont, cat, missing, extrapolated = self._encode(table)
        space = self._model_space()
        z_values = space.to_model(values, cont, cat)
        layer = self._calibrated()
        sites = space.site_codes(cat)
        conditional = None
        if given_idx is not None:
            targets = tuple(j for j in range(self.n_features_in_) if j not in given_idx)

            def calibrate(centiles, rows):
                return centiles if layer is None else layer.transform(centiles, sites[rows])

            conditional = (given_idx, targets, calibrate)
        out = self._score_model_space(z_values, cont, cat, missing, with_joint, conditional)
        if layer is not None:
            out["centiles"] = layer.transform(out["centiles"], sites)
            # the joint map was learnt over every IDP: rows scored on a subset keep their raw centile
            complete = out["joint_n_idps"] == self.n_features_in_
            out["joint_centile"] = np.where(complete, layer.transform_joint(out["joint_centile"]),
                                            out["joint_centile"])
        if given_idx is not None:
            lacking = ~np.isfinite(values[:, list(given_idx)]).all(axis=1) & ~missing
            if lacking.any():
                rows = list(table.index[lacking][:5])
                warnings.warn(f"{int(lacking.sum())} rows lack a value of a given IDP and get no "
                              f"conditional scores (cond_given_missing), e.g. rows {rows}", stacklevel=3)
            out.update(given=given_idx, targets=conditional[1], cond_given_missing=lacking)
        out.update(values=values, extrapolated=extrapolated, missing_covariates=missing,
                   unknown_site=self.covariate_schema_.marginal_rows(cat) & ~missing)
        return out

    def _given_indices(self, given) -> tuple[int, ...] | None:
        """The model's indices of the ``given`` IDPs (``None``: no conditioning), checked."""
        if given is None:
            return None
        names = [given] if isinstance(given, str) else list(given)
        if not names:
            return None
        unknown = [g for g in names if g not in self.idps_]
        if unknown:
            raise InputError(f"given IDPs {unknown} are not IDPs of this model; condition on some of its "
                             f"{self.n_features_in_} IDPs, e.g. {self.idps_[:3]}")
        idx = tuple(sorted({self.idps_.index(g) for g in names}))
        if len(idx) == self.n_features_in_:
            raise InputError(f"every one of the model's {self.n_features_in_} IDPs is given, so none is "
                             f"left to score conditionally; leave at least one IDP out of given")
        if len(idx) + 1 + MIN_SPARE_DRAWS > int(self.n_samples):
            need = len(idx) + 1 + MIN_SPARE_DRAWS
            raise InputError(f"conditioning on {len(idx)} IDPs needs more than {need} draws per point, the "
                             f"model has n_samples={self.n_samples}; raise n_samples or give fewer IDPs")
        return idx

    def _score_model_space(self, z_values, cont, cat, missing, with_joint: bool, conditional=None) -> dict:
        """Uncalibrated centiles, tail flags and joint scores of model-space values ``[R, D]``.

        A row with missing IDPs gets its joint deviation over the IDPs it has (``joint_n_idps``).
        ``conditional=(given, targets, calibrate)``: also the conditional centiles ``[R, T]`` of the
        target IDPs given the given ones, from the rows' calibrated normal scores
        (``calibrate(raw centiles, rows)``); see :mod:`~normdiff_bids.scoring.conditional`.
        """
        n, d = z_values.shape
        centiles = np.full((n, d), np.nan)
        tail = np.zeros((n, d), dtype=np.int8)
        joint = np.full((n, 3), np.nan)
        cond = None if conditional is None else np.full((n, len(conditional[1])), np.nan)
        with small_blas():
            for rows, srt, draws in self._scored_points(cont, cat, missing, with_joint or cond is not None):
                c, t = empirical_centiles(z_values[rows], srt)
                centiles[rows], tail[rows] = c, t
                if with_joint:
                    for row, z_row, point in zip(rows, centiles_to_z(c), draws):
                        if np.isfinite(z_row).all():
                            chol, ref = point.joint()
                            stat, centile = joint_scores(z_row[None], chol[None], ref[None])
                            joint[row] = stat[0], centile[0], d
                        else:
                            joint[row] = joint_subset_scores(z_row, point)
                if cond is not None:
                    given, targets, calibrate = conditional
                    u = centiles_to_z(calibrate(c, rows))
                    owner = np.array([id(p) for p in draws])
                    for key in np.unique(owner):
                        sel = owner == key
                        point = draws[int(np.flatnonzero(sel)[0])]
                        cond[rows[sel]] = conditional_centiles(u[sel], point, given, targets)
        return {"centiles": centiles, "tail": tail, "joint_stat": joint[:, 0], "joint_centile": joint[:, 1],
                "joint_n_idps": joint[:, 2], "cond_centiles": cond}

    def predict_centiles(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """Centile of each IDP value at the row's covariates: ``[rows, D]`` strictly inside (0, 1).

        NaN where the value or a covariate is missing (a missing IDP leaves the others unchanged).
        ``given``: IDP names; then the centile of every other IDP conditional on the row's own values of
        the given ones (and the covariates), one column per IDP not given: "is this hippocampus small
        for this head size?" (:mod:`~normdiff_bids.scoring.conditional`). Rows lacking a given value
        get NaN.
        """
        arrays = self._score_arrays(table, with_joint=False, given=given)
        if arrays.get("given") is None:
            return pd.DataFrame(arrays["centiles"], index=table.index, columns=self.idps_)
        return pd.DataFrame(arrays["cond_centiles"], index=table.index,
                            columns=[self.idps_[j] for j in arrays["targets"]])

    def predict_zscores(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """``Phi^-1`` of :meth:`predict_centiles` (conditional on ``given`` when it is given)."""
        centiles = self.predict_centiles(table, given=given)
        return pd.DataFrame(centiles_to_z(centiles.to_numpy()), index=table.index, columns=centiles.columns)

    def score(self, table: pd.DataFrame, given: Sequence[str] | None = None) -> pd.DataFrame:
        """Tidy scores: one row per (subject[/session], IDP).

        Columns: ``participant_id`` (or ``row``, the table's index, when there is no id column),
        ``session_id`` (when present), ``idp``, ``value``, ``centile``, ``z``, ``tail`` (-1/0/+1: value
        beyond the sampled range, scored by the tail rule), ``extrapolated`` (covariates outside the
        training range, overall or of the row's own site), ``unknown_site`` (scored under the model's
        marginal over sites: a site it never saw, or none, with ``unknown_site="marginal"``),
        ``joint_stat``, ``joint_centile``, ``joint_z`` and ``joint_n_idps`` (how many IDPs the joint
        deviation used: fewer than the model's when some are missing; it is then computed
        over those present, against the model's draws of the same IDPs). A missing value or covariate
        gives NaN centile and z. With ``given``: also ``cond_centile`` and ``cond_z`` (NaN on the given
        IDPs' rows) and ``cond_given_missing`` (the row lacks a given value, so it has no conditional
        scores).
        """
        a = self._score_arrays(table, with_joint=True, given=given)
        n, d = a["values"].shape
        columns = {}
        if "participant_id" in table.columns:
            columns["participant_id"] = np.repeat(table["participant_id"].to_numpy(dtype=object), d)
        else:
            columns["row"] = np.repeat(table.index.to_numpy(), d)
        if "session_id" in table.columns:
            columns["session_id"] = np.repeat(table["session_id"].to_numpy(dtype=object), d)
        n_idps = a["joint_n_idps"]
        columns.update({
            "idp": np.tile(np.asarray(self.idps_, dtype=object), n),
            "value": a["values"].reshape(-1),
            "centile": a["centiles"].reshape(-1),
            "z": centiles_to_z(a["centiles"]).reshape(-1),
            "tail": a["tail"].reshape(-1),
            "extrapolated": np.repeat(a["extrapolated"], d),
            "unknown_site": np.repeat(a["unknown_site"], d),
            "joint_stat": np.repeat(a["joint_stat"], d),
            "joint_centile": np.repeat(a["joint_centile"], d),
            "joint_z": np.repeat(centiles_to_z(a["joint_centile"]), d),
            "joint_n_idps": pd.array(np.repeat(np.where(np.isfinite(n_idps), n_idps, -1), d),
                                     dtype="Int16"),
        })
        columns["joint_n_idps"][columns["joint_n_idps"] < 0] = pd.NA
        if a.get("given") is not None:
            cond = np.full((n, d), np.nan)
            cond[:, list(a["targets"])] = a["cond_centiles"]
            columns.update(cond_centile=cond.reshape(-1), cond_z=centiles_to_z(cond).reshape(-1),
                           cond_given_missing=np.repeat(a["cond_given_missing"], d))
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
            "location_scale": (None if self.stage_ is None else {
                "site_covariate": self.site_covariate if self._model_space().site_index is not None else None,
                "site_effects": "partially pooled (empirical-Bayes random effects in location and spread)",
                "network_covariates": self._model_space().network_schema().names}),
            "calibration": (None if self.calibration_ is None else {
                "method": "split-conformal maps from cross-fitted reference controls",
                "applied": self.calibration == "conformal", **self.calibration_.summary()}),
            "adaptations": list(self.adaptations_),
            "draw_table": self._draw_table_card(),
            "n_train": int(self.n_train_),
            "training_summary": json_ready(self.training_summary_),
            "seed": int(self.seed),
        }

    def _draw_table_card(self) -> dict | None:
        table = getattr(self, "draw_table_", None)
        if table is None:
            return None
        return {"points": len(table), "draws_per_point": int(table.samples.shape[1]),
                "megabytes": round(table.nbytes / 2**20, 1), "used": self.draw_table == "auto"}

    def save(self, path: str | os.PathLike, overwrite: bool = False):
        """Write the model as a bundle folder (``model.safetensors`` + ``model.json``); returns the path."""
        self._check_fitted()
        if not hasattr(self, "created_"):
            self.created_ = datetime.now(UTC).isoformat(timespec="seconds")
        tensors = {f"encoder.{k}": v for k, v in self.encoder_.state_dict().items()}
        tensors.update({f"network.{k}": v for k, v in self.network_.state_dict().items()})
        table = getattr(self, "draw_table_", None)
        if table is not None:
            tensors.update(table.to_tensors())
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
            "training_summary": json_ready(self.training_summary_),
            "n_dropped": int(self.n_dropped_),
            "history": {c: self.history_[c].tolist() for c in self.history_.columns},
            "created": self.created_,
            "location_scale": None if self.stage_ is None else self.stage_.to_dict(),
            "calibration": None if self.calibration_ is None else self.calibration_.to_dict(),
            "adaptations": list(self.adaptations_),
            "draw_table": None if table is None else table.settings,
            "model_card": self.model_card(),
        }
        return save_bundle(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormativeDiffusion:
        """Read a bundle written by :meth:`save` (see :func:`load_model`)."""
        return load_model(path)


def load_model(path: str | os.PathLike, device: str | None = None) -> NormativeDiffusion:
    """Load a model bundle; refuses tampered, foreign or truncated bundles with a :class:`BundleError`."""
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
        spec = get_spec(model.backbone)
        model.backbone_config_ = spec.config.from_dict(meta["backbone_config"])
        model.diffusion_config_ = DiffusionConfig.from_dict(meta["diffusion_config"])
        model.encoder_config_ = CovariateEncoderConfig(**meta["encoder_config"])
        model.training_summary_ = dict(meta["training_summary"])
        model.n_train_ = int(model.training_summary_["n_train"])
        model.n_dropped_ = int(meta.get("n_dropped", 0))
        model.history_ = pd.DataFrame(meta["history"]).astype({"val_loss": float})
        model.created_ = meta.get("created")
        stage, layer = meta.get("location_scale"), meta.get("calibration")
        model.stage_ = None if stage is None else LocationScaleStage.from_dict(stage)
        model.calibration_ = None if layer is None else CentileCalibration.from_dict(layer)
        model.adaptations_ = list(meta.get("adaptations", []))
        encoder = CovariateEncoder(model._model_space().network_schema(), model.encoder_config_)
        network = spec.module(model.n_features_in_, encoder.cond_dim, model.backbone_config_)
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
    model.draw_table_ = None
    if meta.get("draw_table") is not None:
        try:
            model.draw_table_ = DrawTable.from_tensors(meta["draw_table"], tensors)
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{path}/model.safetensors does not hold the draw table model.json describes "
                              f"({type(err).__name__}: {err}); {fix}") from None
        if not model.draw_table_.serves(model._drawer(use_table=False).table_settings(model.n_samples)):
            # drawn with other weights or settings than the bundle's: never score from it
            raise BundleError(f"{path}: the draw table was not made with this model's weights and "
                              f"sampling settings; {fix}")
    return model


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) else False
    except (TypeError, ValueError):
        return False

