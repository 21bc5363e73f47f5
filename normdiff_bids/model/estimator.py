"""The normative model: :class:`NormativeDiffusion` fits a conditional diffusion model of IDPs given
covariates and scores people against it (per-IDP centiles and z-scores, a joint deviation score).

This module holds the estimator contract: parameters and their checks, the settings they resolve to,
and ``fit``. The prediction API is :mod:`~normdiff_bids.model.prediction`, the model card, save and
:func:`load_model` :mod:`~normdiff_bids.model.persistence` (both mixed into the class), the training
loop :mod:`~normdiff_bids.model.training`, the calibration layer's fit
:mod:`~normdiff_bids.model.calibration`, the sampling plan and draws :mod:`~normdiff_bids.model.sampling`,
the two-stage pieces :mod:`~normdiff_bids.model.location_scale` and
:mod:`~normdiff_bids.model.model_space`, new sites :mod:`~normdiff_bids.model.adaptation`, the presets
:mod:`~normdiff_bids.model.presets` and the networks :mod:`~normdiff_bids.model.backbones`. It is a little
over 400 lines because the class docstring documents every parameter (the estimator's user
documentation).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from normdiff_bids.model import params as P
from normdiff_bids.model.backbones import backbone_names, get_spec
from normdiff_bids.model.calibration import fit_calibration
from normdiff_bids.model.covariates import CovariateEncoderConfig, CovariateSchema
from normdiff_bids.model.draw_table import MAX_TABLE_BYTES, DrawTable, grid_points
from normdiff_bids.model.ensemble import member_seed, members, module_list
from normdiff_bids.model.location_scale import LocationScaleStage
from normdiff_bids.model.model_space import ModelSpace
from normdiff_bids.model.persistence import _PersistenceMixin, load_model
from normdiff_bids.model.prediction import _PredictionMixin
from normdiff_bids.model.preprocess import METHODS as PREPROCESSING_METHODS
from normdiff_bids.model.preprocess import IDPScaler
from normdiff_bids.model.presets import PRESETS
from normdiff_bids.model.tables import MIN_TRAIN_ROWS, select_idps, training_rows
from normdiff_bids.scoring.joint import model_shrinkage

if TYPE_CHECKING:  # torch loads when a network is built: a saved model with a draw table scores without it
    import torch

    from normdiff_bids.model.training import TrainingSettings

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
    "covariate_kinds": P.Constraint(lambda v: v is None or isinstance(v, Mapping),
                                    "None or a mapping {covariate: 'continuous' | 'categorical'}"),
    "n_networks": P.whole_number(1, "a positive integer (1, or e.g. 3 to pool the draws of three networks)"),
    "joint_shrinkage": P.Constraint(
        lambda v: v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1),
        "'auto' or a number from 0 to 1"),
    "joint_folds": P.Constraint(
        lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and (v == 0 or v >= 2)),
        "'auto', 0 (off) or a number of folds from 2, e.g. 5"),
}


class NormativeDiffusion(_PredictionMixin, _PersistenceMixin):
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
        are categorical with learned embeddings (``covariate_kinds`` overrides this per covariate).
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
    preprocessing : "log" | "zscore" | "quantile-normal"
        Per-IDP transform before diffusion (:class:`~normdiff_bids.model.preprocess.IDPScaler`).
        ``"log"`` (default): the z-scored log of every IDP whose training values are all positive (the
        others z-scored as they are), so spread grows with size and centile bands of volumes stay
        positive; on the cohorts measured it was as well calibrated as ``"zscore"`` or better
        (docs/method.md).
    backbone_config, diffusion_config, encoder_config : dict or None
        Overrides of the backbone preset, of ``DEFAULTS["diffusion"]`` (fields of
        ``DiffusionConfig``) and of :class:`CovariateEncoderConfig`.
    preset : None | "paper"
        ``"paper"``: the reference setting (``presets.PAPER``): its diffusion, sampler, network, epochs;
        no early stopping, final checkpoint, LR plateau on the training loss.
    ema_decay : float or None
        Keep an exponential moving average of the weights (e.g. 0.999) and use it for validation,
        the best checkpoint and sampling. Its decay warms up as ``min(decay, (1 + t) / (10 + t))``
        over the first updates, so short fits do not keep their initial weights.
    patience : int or None
        Early-stopping patience in epochs; ``None``: ``max(25, epochs // 16)``.
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
        ``"auto"``: on the scoring grid, the bundle holds the draws of every grid point of the training
        range, so scoring, quantiles and centile curves from a saved model evaluate no network and give
        the same numbers on every machine (:mod:`~normdiff_bids.model.draw_table`; skipped when it would
        exceed ``MAX_TABLE_BYTES``). The table is filled as the fitted model scores (each point drawn
        once) and completed by :meth:`save`, so ``fit`` then ``score`` draws only the points the rows
        need, with the numbers the saved model gives. ``"off"``: draw when scoring, and save no table.
        Can be changed after fitting (``"off"`` then draws afresh).
    missing_idps : "use" | "drop"
        Training rows that miss some IDPs (NaN or inf): ``"use"`` trains on the IDPs they have (the
        location-scale stage gives a missing entry no weight, the network's loss leaves it out and its
        input gets a stand-in drawn from the standardised marginal); ``"drop"`` drops those rows.
    verbose : bool
        Progress bars (also silenced by ``CI=true`` or ``NORMDIFF_QUIET=1``).
    covariate_kinds : mapping or None
        ``{covariate: "continuous" | "categorical"}`` for covariates whose kind is declared instead of
        inferred from the column, e.g. ``{"scanner": "categorical"}`` for a scanner coded 1, 2, 3 (a
        covariate declared continuous must hold numbers). ``None``: every kind inferred as above.
    joint_shrinkage : "auto" or float
        Least shrinkage towards the identity of the covariance under which the joint deviation measures a
        subject's distance (:mod:`~normdiff_bids.scoring.joint`): the dependence between IDPs that the
        model learnt from few people per IDP is rough, and a distance under a rough covariance makes new
        people look atypical. ``"auto"``: ``min(0.9, D / N)`` for D IDPs learnt from N training rows
        (:func:`~normdiff_bids.scoring.joint.model_shrinkage`); 0: the model's own dependence, with
        Ledoit-Wolf's shrinkage only. Set at ``fit`` (``joint_shrinkage_``; the calibration layer's
        joint map is learnt with it).
    n_networks : int
        Denoising networks trained on the same rows (seeds ``seed``, ``seed + 100``, ...; the same
        validation rows), whose draws are pooled: each point's ``n_samples`` draws are split between
        them. One network's errors in the dependence between IDPs are its own, and they decide the joint
        deviation's calibration where no joint map corrects its draws (the calibration layer off, or too
        few reference controls for one); pooling several averages them out, at ``n_networks`` times the
        training time. With the calibration layer's joint map the pool measured level with one network
        (``docs/method.md``, "Several networks"). 1 (the default): one network, as earlier versions.
    joint_folds : "auto" or int
        How the calibration layer's joint map learns what new people's joint deviations look like. With
        ``k`` folds, ``k`` more models (location-scale stage and networks) are each fitted without one
        fold of the reference controls (every site and level keeps training rows in every fold) and score
        that fold, so the map is learnt from every control's joint centile under a model that never saw
        it (:func:`~normdiff_bids.model.calibration.crossfit_joint_centiles`), at about ``k + 1`` times
        the training time. 0: the controls are scored by the network that trained on them, and the map is
        corrected for that as :func:`~normdiff_bids.model.calibration.fit_calibration` says: below 0.12
        IDPs per training row by the closed-form bias of the dependence learnt from them, at or above it
        by the network's validation rows, which need 40 to check it.
        ``"auto"``: 5 folds where those validation rows would check the map (0.12 IDPs per training row
        or more) and are fewer than 40 (under about 400 controls at ``validation_fraction=0.1``), 0
        elsewhere (measured in ``docs/method.md``, "Cross-fitted networks").
    """

    def __init__(self, backbone: str = "film-mlp", covariates: Sequence[str] = ("age", "sex", "site"),
                 seed: int = 0, device: str = "auto", epochs: int | None = None,
                 batch_size: int | None = None,
                 lr: float | None = None, n_samples: int = 1000, sampler: str | None = None,
                 steps: int | None = None, validation_fraction: float = 0.1, unknown_site: str = "error",
                 preprocessing: str = "log", backbone_config: dict | None = None,
                 diffusion_config: dict | None = None, encoder_config: dict | None = None,
                 preset: str | None = None, ema_decay: float | None = None, patience: int | None = None,
                 covariate_grid: str = "auto", grid_step: float | None = None,
                 location_scale: str = "pooled", calibration: str = "conformal",
                 site_covariate: str | None = "site", draw_table: str = "auto", missing_idps: str = "use",
                 verbose: bool = True, covariate_kinds: Mapping[str, str] | None = None,
                 joint_shrinkage: float | str = "auto", n_networks: int = 1, joint_folds: int | str = "auto"):
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
        self.covariate_kinds = covariate_kinds
        self.joint_shrinkage = joint_shrinkage
        self.n_networks = n_networks
        self.joint_folds = joint_folds

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
        return int(rule(self.backbone_config_, n_train, self.n_features_in_, self._members()[0][0].cond_dim,
                        self._batch_size()))

    def _check_device(self) -> None:
        """The device setting is one this machine has (imports torch only to ask about CUDA)."""
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if str(self.device).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device='cuda' was asked for but CUDA is not available; use "
                                 "device='cpu' or 'auto'")

    def _torch_device(self) -> torch.device:
        import torch

        self._check_device()
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def _check_params(self) -> None:
        P.check_parameters(self, PARAMETER_CONSTRAINTS, "NormativeDiffusion")
        self._check_device()

    # ------------------------------------------------------------------ fitting
    def fit(self, table: pd.DataFrame, idps: Sequence[str] | None = None) -> NormativeDiffusion:
        """Learn the joint distribution of ``idps`` given the covariates from the rows of ``table``.

        ``idps=None`` takes every numeric column that is not a covariate or an id column. Rows with a
        missing covariate (or no IDP) are dropped (count in ``n_dropped_``, with a warning); rows missing
        some IDPs train on those they have (``missing_idps="use"``, count in ``n_partial_``) or are
        dropped too (``"drop"``).
        Returns ``self``.
        """
        from normdiff_bids.model.training import train_denoiser

        self._check_params()
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"fit expects a pandas DataFrame, got {type(table).__name__}")
        start = time.perf_counter()
        self._weights_digest = None  # new weights: earlier draws are not theirs
        self.__dict__.pop("_unbuilt", None)  # a loaded model's weights, not built yet: replaced
        covariates = list(self.covariates)
        idps = select_idps(table, idps, covariates)
        kept, values, n_dropped, n_partial = training_rows(table, idps, covariates, self.missing_idps,
                                                           MIN_TRAIN_ROWS)
        kinds = dict(self.covariate_kinds) if self.covariate_kinds is not None else None
        schema = CovariateSchema.from_table(kept, covariates, kinds=kinds)
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
        self.training_data_ = {}  # where the table came from, when a workflow says (model card)
        self.n_dropped_ = n_dropped
        self.n_partial_ = n_partial
        device = self._torch_device()
        self._build(space.network_schema(), n_rows=len(x), device=device)
        x_network, cat_network = x_model.astype(np.float32), space.network_cat(cat)
        try:
            fitted = [train_denoiser(encoder, network, self._diffusion, x_network, cont, cat_network, device,
                                     self._training_settings(member))
                      for member, (encoder, network) in enumerate(self._members())]
        except BaseException:
            # an interrupted or failed fit must not leave a model that looks fitted
            for name in ("encoder_", "network_"):
                self.__dict__.pop(name, None)
            raise
        history, summary = fitted[0]
        if len(fitted) > 1:  # the first network's history and summary, and each network's own
            summary = {**summary, "networks": [each for _, each in fitted]}
        self.history_ = history
        self.n_train_ = summary["n_train"]
        self.joint_shrinkage_ = (model_shrinkage(self.n_features_in_, self.n_train_)
                                 if self.joint_shrinkage == "auto" else float(self.joint_shrinkage))
        # planned, not drawn: scoring keeps the points it draws in it (the calibration's first), saving
        # draws the rest
        self.draw_table_ = self._plan_draw_table() if self.draw_table == "auto" else None
        if stage is not None and self.calibration == "conformal":
            self.calibration_ = fit_calibration(self, space, x, cont, cat, kept)
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
        import torch

        from normdiff_bids.model.diffusion import GaussianDiffusion
        from normdiff_bids.model.encoder import CovariateEncoder
        from normdiff_bids.model.schedule import DiffusionConfig

        spec = get_spec(self.backbone)
        base = self._backbone_preset().config(n_rows, self.n_features_in_)
        self.backbone_config_ = dataclasses.replace(base, **dict(self.backbone_config or {}))
        self.diffusion_config_ = DiffusionConfig.from_dict({**self._preset()["diffusion"],
                                                            **dict(self.diffusion_config or {})})
        self.encoder_config_ = CovariateEncoderConfig(**dict(self.encoder_config or {}))
        encoders, networks = [], []
        for member in range(int(self.n_networks)):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(member_seed(int(self.seed), member))
                encoder = CovariateEncoder(schema, self.encoder_config_)
                encoders.append(encoder)
                networks.append(spec.module(self.n_features_in_, encoder.cond_dim, self.backbone_config_))
        self.encoder_, self.network_ = (module_list(modules).to(device) for modules in (encoders, networks))
        self._diffusion = GaussianDiffusion(self.diffusion_config_)

    def _members(self) -> list[tuple]:
        """``[(encoder, network), ...]``: one pair per network of the model."""
        return members(self.encoder_, self.network_)

    def _training_settings(self, member: int = 0) -> TrainingSettings:
        from normdiff_bids.model.training import TrainingSettings

        preset = self._preset()
        lr = self.lr if self.lr is not None else self._backbone_preset().lr
        return TrainingSettings(
            seed=member_seed(int(self.seed), member), split_seed=int(self.seed),
            validation_fraction=self.validation_fraction,
            epoch_budget=self._epoch_budget,
            lr=float(lr), batch_size=self._batch_size(), patience=self.patience, ema_decay=self.ema_decay,
            early_stopping=preset["early_stopping"], plateau_on=preset["plateau_on"],
            plateau_patience=preset["plateau_patience"], verbose=self.verbose,
            label=f"training network {member + 1}/{self.n_networks}" if self.n_networks > 1 else "training")

    # ------------------------------------------------------------------ fitted state and the draw table
    def _check_fitted(self) -> None:
        if "network_" not in self.__dict__ and "_unbuilt" not in self.__dict__:
            raise RuntimeError("this NormativeDiffusion is not fitted yet; call fit(table) or "
                               "load_model(path)")

    def _plan_draw_table(self) -> DrawTable | None:
        """A draw table of every scoring-grid point of the training range with none drawn yet (``None``
        off the grid or when it would exceed ``MAX_TABLE_BYTES``)."""
        grid = self._grid()
        if grid is None:
            return None
        age = self.covariate_schema_.continuous[0]
        levels = [list(range(0 if c.marginal else 1, len(c.levels) + 1))
                  for c in self._model_space().network_schema().categorical]
        cont, cat = grid_points(grid, age.min, age.max, levels)
        if len(cont) * int(self.n_samples) * self.n_features_in_ * 4 > MAX_TABLE_BYTES:
            return None
        settings = self._drawer(use_table=False).table_settings(int(self.n_samples))
        return DrawTable.planned(settings, cont, cat, self.n_features_in_)

    def _bundle_draw_table(self) -> DrawTable | None:
        """The draw table a bundle of the model holds, possibly not all drawn yet: with
        ``draw_table="auto"`` the model's (planned anew when the sampling settings changed since it was
        made), with ``"off"`` a complete one it already has (loaded from a bundle); a table made with
        other sampling settings is never kept."""
        table = getattr(self, "draw_table_", None)
        if table is not None and not table.serves(self._drawer(use_table=False).table_settings(
                int(self.n_samples))):
            table = None
        if self.draw_table != "auto":
            return table if table is not None and table.is_complete else None
        return table if table is not None else self._plan_draw_table()


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, np.ndarray) else False
    except (TypeError, ValueError):
        return False

