"""The fitted :class:`~normdiff_bids.model.estimator.NormativeDiffusion` as a description and as a
bundle: ``model_card``, ``save`` and :func:`load_model`, which rebuilds every part of a bundle (the
bundle format itself is :mod:`~normdiff_bids.model.bundle`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from normdiff_bids._version import __version__
from normdiff_bids.bidsio import json_ready
from normdiff_bids.model.backbones import get_spec
from normdiff_bids.model.bundle import BundleError, check_params, load_bundle, save_bundle
from normdiff_bids.model.covariates import CovariateEncoderConfig, CovariateSchema
from normdiff_bids.model.draw_table import DrawTable
from normdiff_bids.model.ensemble import module_list
from normdiff_bids.model.location_scale import PENALTIES, LocationScaleStage
from normdiff_bids.model.preprocess import IDPScaler
from normdiff_bids.model.schedule import DiffusionConfig
from normdiff_bids.scoring.conformal import CentileCalibration

if TYPE_CHECKING:
    from normdiff_bids.model.estimator import NormativeDiffusion

__all__ = ["load_model"]

#: What a loaded model builds on first use (:meth:`_PersistenceMixin.__getattr__`).
_BUILT_ON_USE = ("encoder_", "network_", "_diffusion", "backbone_config_")
_FIX = "re-create the model with this version of normdiff-bids"
#: Prefix of the location-scale stage's posterior covariances among the bundle's tensors.
STAGE_PREFIX = "location_scale."


@dataclass
class _Unbuilt:
    """A loaded model's network, not built yet: its bundle, weights (numpy, under their bundle names, in
    the modules' order) and backbone configuration as stored (the device is the model's ``device``)."""

    path: str
    weights: dict
    backbone_config: dict


class _PersistenceMixin:
    """The model card and ``save``/``load`` of :class:`~normdiff_bids.model.estimator.NormativeDiffusion`.

    A model loaded from a bundle with a draw table builds its network (and imports torch) only when it
    needs it: to draw a point the table lacks, to save or to train; scoring from the table needs neither.
    """

    def __getattr__(self, name):
        # called only for attributes that are not set: a loaded model's network is built on first use
        if name in _BUILT_ON_USE and "_unbuilt" in self.__dict__:
            _build_network(self)
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _backbone_config_dict(self) -> dict:
        unbuilt = self.__dict__.get("_unbuilt")
        if unbuilt is not None:
            return dict(unbuilt.backbone_config)
        return dataclasses.asdict(self.backbone_config_)

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
            "backbone_config": self._backbone_config_dict(),
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
                "scale": ("posterior predictive (the fit's uncertainty in location and spread included)"
                          if self.stage_.has_parameter_variance else "plug-in"),
                "curve_penalty": PENALTIES[self.stage_.config.penalty],
                "network_covariates": self._model_space().network_schema().names}),
            "calibration": (None if self.calibration_ is None else {
                "method": "split-conformal maps from cross-fitted reference controls (pooled over IDPs, "
                          "then each IDP's own correction shrunk by empirical Bayes)",
                "applied": self.calibration == "conformal", **self.calibration_.summary(self.idps_)}),
            "adaptations": list(self.adaptations_),
            "training_data": dict(getattr(self, "training_data_", {})),
            "joint_deviation": {"statistic": "Mahalanobis length of the normal scores, centile among the "
                                             "model's draws",
                                "covariance_shrinkage_floor": float(getattr(self, "joint_shrinkage_", 0.0))},
            "draw_table": self._draw_table_card(),
            "n_networks": int(self.n_networks),
            "n_train": int(self.n_train_),
            "training_summary": json_ready(self.training_summary_),
            "seed": int(self.seed),
        }

    def _draw_table_card(self) -> dict | None:
        table = self._bundle_draw_table()  # the complete table a bundle holds (even if not all drawn yet)
        if table is None:
            return None
        return {"points": len(table), "draws_per_point": int(table.samples.shape[1]),
                "megabytes": round(table.nbytes / 2**20, 1), "used": self.draw_table == "auto"}

    def save(self, path: str | os.PathLike, overwrite: bool = False):
        """Write the model as a bundle folder (``model.safetensors`` + ``model.json``); returns the path."""
        self._check_fitted()
        if not hasattr(self, "created_"):
            self.created_ = datetime.now(UTC).isoformat(timespec="seconds")
        tensors = self._weight_arrays()
        order = list(tensors)  # the modules' order, which the weights token follows
        if self.stage_ is not None:
            tensors.update({f"{STAGE_PREFIX}{k}": v for k, v in self.stage_.posterior_arrays().items()})
        table = self._bundle_draw_table()
        if table is not None:
            # draws the points the model has not scored yet (scoring kept the others in the table)
            self.draw_table_ = table.complete(self._drawer(use_table=False))
            tensors.update(table.to_tensors())
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        meta = {
            "estimator": "NormativeDiffusion",
            "params": params,
            "idps": list(self.idps_),
            "covariate_schema": self.covariate_schema_.to_dict(),
            "preprocessing": self.scaler_.to_dict(),
            "backbone_config": self._backbone_config_dict(),
            "diffusion_config": self.diffusion_config_.to_dict(),
            "encoder_config": dataclasses.asdict(self.encoder_config_),
            "training_summary": json_ready(self.training_summary_),
            "n_dropped": int(self.n_dropped_),
            "history": {c: self.history_[c].tolist() for c in self.history_.columns},
            "created": self.created_,
            "location_scale": None if self.stage_ is None else self.stage_.to_dict(),
            "calibration": None if self.calibration_ is None else self.calibration_.to_dict(),
            "joint_shrinkage": float(getattr(self, "joint_shrinkage_", 0.0)),
            "training_data": dict(getattr(self, "training_data_", {})),
            "adaptations": list(self.adaptations_),
            "draw_table": None if table is None else table.settings,
            "weights_order": order,
            "model_card": self.model_card(),
        }
        return save_bundle(path, tensors, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormativeDiffusion:
        """Read a bundle written by :meth:`save` (see :func:`load_model`)."""
        return load_model(path)


def read_model_card(path: str | os.PathLike) -> dict:
    """The model card a bundle was saved with (``model.json``, verified), without rebuilding the model."""
    _, meta = load_bundle(path)
    card = meta.get("model_card")
    if not isinstance(card, dict):
        raise BundleError(f"{path}/model.json holds no model card; re-create the model with this version "
                          f"of normdiff-bids")
    return card


def load_model(path: str | os.PathLike, device: str | None = None) -> NormativeDiffusion:
    """Load a model bundle; refuses tampered, foreign or truncated bundles with a :class:`BundleError`.

    A bundle with a draw table loads without building the network (no torch import: a participant
    scored from the table starts about 1.4 s sooner); it is built on first use.
    """
    from normdiff_bids.model.estimator import NormativeDiffusion

    tensors, meta = load_bundle(path)
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
        model.diffusion_config_ = DiffusionConfig.from_dict(meta["diffusion_config"])
        model.encoder_config_ = CovariateEncoderConfig(**meta["encoder_config"])
        model.training_summary_ = dict(meta["training_summary"])
        model.n_train_ = int(model.training_summary_["n_train"])
        model.n_dropped_ = int(meta.get("n_dropped", 0))
        model.history_ = pd.DataFrame(meta["history"]).astype({"val_loss": float})
        model.created_ = meta.get("created")
        stage, layer = meta.get("location_scale"), meta.get("calibration")
        arrays = {k[len(STAGE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STAGE_PREFIX)}
        model.stage_ = None if stage is None else LocationScaleStage.from_dict(stage, arrays)
        model.calibration_ = None if layer is None else CentileCalibration.from_dict(layer)
        model.adaptations_ = list(meta.get("adaptations", []))
        # bundles from before the floor scored (and calibrated) their joint deviation without one
        model.joint_shrinkage_ = float(meta.get("joint_shrinkage", 0.0))
        model.training_data_ = dict(meta.get("training_data") or {})
        backbone_config = meta["backbone_config"]
        if not isinstance(backbone_config, dict):
            raise TypeError(f"backbone_config is a {type(backbone_config).__name__}, not a mapping")
    except BundleError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _cannot_rebuild(path, err) from None
    weights = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "network."))}
    order = meta.get("weights_order")
    if isinstance(order, list) and sorted(order) == sorted(weights):
        weights = {name: weights[name] for name in order}  # the order the weights token follows
    model._unbuilt = _Unbuilt(str(path), weights, dict(backbone_config))
    model.draw_table_ = None
    if meta.get("draw_table") is None or list(weights) != order:
        # it scores by sampling, or it is a bundle from before the weights' order was kept (which the
        # weights token needs): build (and check) the network now
        _build_network(model)
        if meta.get("draw_table") is None:
            return model
    try:
        model.draw_table_ = DrawTable.from_tensors(meta["draw_table"], tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{path}/model.safetensors does not hold the draw table model.json describes "
                          f"({type(err).__name__}: {err}); {_FIX}") from None
    if not model.draw_table_.serves(model._drawer(use_table=False).table_settings(model.n_samples)):
        # drawn with other weights or settings than the bundle's: never score from it
        raise BundleError(f"{path}: the draw table was not made with this model's weights and "
                          f"sampling settings; {_FIX}")
    return model


def _build_network(model) -> None:
    """Build a loaded model's encoder, network and diffusion from its bundle's weights (imports torch)."""
    import torch

    from normdiff_bids.model.diffusion import GaussianDiffusion
    from normdiff_bids.model.encoder import CovariateEncoder

    unbuilt = model.__dict__["_unbuilt"]
    try:
        spec = get_spec(model.backbone)
        config = spec.config.from_dict(unbuilt.backbone_config)
        encoders = [CovariateEncoder(model._model_space().network_schema(), model.encoder_config_)
                    for _ in range(int(model.n_networks))]
        encoder = module_list(encoders)
        network = module_list([spec.module(model.n_features_in_, e.cond_dim, config) for e in encoders])
        weights = {k: torch.from_numpy(np.array(v)) for k, v in unbuilt.weights.items()}
        encoder.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("encoder.")})
        network.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("network.")})
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _cannot_rebuild(unbuilt.path, err) from None
    dev = model._torch_device()
    model.backbone_config_ = config
    model.encoder_ = encoder.to(dev).eval()
    model.network_ = network.to(dev).eval()
    model._diffusion = GaussianDiffusion(model.diffusion_config_)
    del model.__dict__["_unbuilt"]


def _cannot_rebuild(path, err: Exception) -> BundleError:
    return BundleError(f"{path}/model.json and model.safetensors do not describe a model this version can "
                       f"rebuild ({type(err).__name__}: {err}); {_FIX}")
