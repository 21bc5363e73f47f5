"""Denoising networks (backbones) and their registry: one entry per backbone, as timm's ``register_model``.

A backbone maps a noisy IDP vector, its noise-level input and the encoded covariates to a vector of the
same size: ``forward(x [B, D], t [B], cond [B, C]) -> [B, D]``; it is built as
``module(n_features, cond_dim, config)`` from a :class:`~normdiff_bids.model.config.ConfigDict` dataclass
that the model bundle stores. Each registry entry carries everything the estimator, the CLI, the Nipype
interfaces and the Boutiques descriptor need to know about it: its module and config classes and, per
preset (``"default"``, ``"paper"``), its configuration, learning rate, batch size and epoch budget.

A new backbone is one module that calls :func:`register_backbone` plus, for a built-in one, one line in
:data:`_BUILTIN`. Listing the names (:func:`backbone_names`) imports no torch: the built-in modules are
imported when an entry is first looked up.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, is_dataclass, replace

from normdiff_bids.model.config import ConfigDict

__all__ = ["BACKBONES", "BUDGET_EPOCHS", "BUDGET_ROWS", "BUDGET_STEPS", "BackbonePreset", "BackboneSpec",
           "FILM_MLP_PRESETS", "FiLMMLP", "FiLMMLPConfig", "backbone_names", "fixed_epochs", "get_backbone",
           "get_spec", "preset_config", "register_backbone", "sinusoidal_embedding", "step_budget_epochs",
           "unregister_backbone"]

#: Built-in backbones: name -> the module that registers it (imported on first look-up).
_BUILTIN = {
    "film-mlp": "normdiff_bids.model.backbones.film_mlp",
    "saint": "normdiff_bids.model.backbones.saint",
}

#: Epoch budget of :func:`step_budget_epochs` (the FiLM-MLP's rule, and the default of a new backbone).
#: Diffusion denoisers need many optimiser steps more than many passes over the data, so the budget is
#: set in steps: about 6,000 AdamW steps (the calibration probes converged within 4,000 at D=10), at
#: least 100 and at most 2,000 epochs, and at most 8e6 training rows processed in all. The row cap is the
#: time limit: a training row of the default FiLM-MLP (~0.6M parameters; FiLM parameters are per row in
#: training) costs about 3x a sampling evaluation plus the FiLM layer, ~70 us on 2 CPU cores, so 8e6 rows
#: is about 9-10 minutes with validation, and a 10,000 x 200 cohort (6,000 steps = 667 epochs = 6e6 rows)
#: fits within the 15-minute target. D does not enter: only the FiLM-MLP's first and last layers grow
#: with D, so its cost per row is nearly independent of D (SAINT, whose cost grows with D, sizes its own
#: budget). Early stopping on the validation loss usually ends the fit sooner.
BUDGET_STEPS = 6_000
BUDGET_EPOCHS = (100, 2_000)
BUDGET_ROWS = 8_000_000

#: ``epochs(config, n_train, n_features, cond_dim, batch_size) -> int``: maximum epochs when ``epochs=None``.
EpochRule = Callable[[object, int, int, int, int], int]


def step_budget_epochs(config, n_train: int, n_features: int, cond_dim: int, batch_size: int) -> int:
    """Epochs giving about :data:`BUDGET_STEPS` optimiser steps, within :data:`BUDGET_EPOCHS` and
    :data:`BUDGET_ROWS` (the budget does not depend on the network)."""
    per_epoch = math.ceil(n_train / batch_size)
    epochs = math.ceil(BUDGET_STEPS / per_epoch)
    epochs = min(epochs, BUDGET_ROWS // max(n_train, 1))
    return int(min(max(epochs, BUDGET_EPOCHS[0]), BUDGET_EPOCHS[1]))


def fixed_epochs(n: int) -> EpochRule:
    """An epoch rule that always trains ``n`` epochs (the paper's published lengths)."""
    def rule(config, n_train, n_features, cond_dim, batch_size) -> int:
        return int(n)
    return rule


@dataclass(frozen=True)
class BackbonePreset:
    """One named setting of a backbone.

    ``config(n_rows, n_features)`` builds its configuration (a backbone may size itself from the data);
    ``lr`` is the AdamW learning rate and ``batch_size`` the training batch when the estimator's are
    ``None``; ``epochs`` is the :data:`EpochRule` used when ``epochs=None``.
    """

    config: Callable[[int, int], ConfigDict]
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: EpochRule = step_budget_epochs


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: the network class, its config class and its presets."""

    name: str
    module: type
    config: type
    presets: Mapping[str, BackbonePreset] = field(default_factory=dict)

    def preset(self, name: str) -> BackbonePreset:
        if name not in self.presets:
            raise ValueError(f"unknown preset {name!r} for backbone {self.name!r}; choose one of "
                             f"{sorted(self.presets)}")
        return self.presets[name]


_SPECS: dict[str, BackboneSpec] = {}


def register_backbone(name: str, module: type, config: type,
                      presets: Mapping[str, BackbonePreset] | None = None) -> BackboneSpec:
    """Register ``module`` (an ``nn.Module`` built as ``module(n_features, cond_dim, config)``) under
    ``name``. ``presets`` default to one ``"default"`` preset: ``config()`` with lr 1e-3, batch 1024 and
    the step budget."""
    if not (isinstance(config, type) and is_dataclass(config) and issubclass(config, ConfigDict)):
        raise TypeError(f"backbone {name!r}: config must be a dataclass deriving from ConfigDict, "
                        f"got {config!r}")
    if presets is None:
        presets = {"default": BackbonePreset(config=lambda n_rows, n_features: config())}
    if "default" not in presets:
        raise ValueError(f"backbone {name!r} needs a 'default' preset; got {sorted(presets)}")
    spec = BackboneSpec(name, module, config, dict(presets))
    _SPECS[name] = spec
    return spec


def unregister_backbone(name: str) -> None:
    """Remove a backbone registered at run time (built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"backbone {name!r} is built in and cannot be unregistered")
    _SPECS.pop(name, None)


def backbone_names() -> list[str]:
    """Names of every backbone: the built-in ones first, then those registered at run time."""
    return list(_BUILTIN) + [name for name in _SPECS if name not in _BUILTIN]


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    if name not in _SPECS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(backbone_names())}")
    return _SPECS[name]


def get_backbone(name: str):
    """``(module class, config class)`` of the backbone called ``name``."""
    spec = get_spec(name)
    return spec.module, spec.config


#: Rows and IDPs a data-sized preset is built for when no cohort is given (:func:`preset_config`).
_REFERENCE_SIZE = (5000, 20)


def preset_config(backbone: str, name: str = "default", **overrides):
    """The configuration of ``backbone``'s preset ``name`` (for a cohort of 5000 rows and 20 IDPs, where
    the preset depends on the data) with ``overrides``."""
    return replace(get_spec(backbone).preset(name).config(*_REFERENCE_SIZE), **overrides)


class _Registry(Mapping):
    """Read-only view ``name -> (module class, config class)`` over the registry."""

    def __getitem__(self, name):
        if name not in backbone_names():
            raise KeyError(name)
        return get_backbone(name)

    def __iter__(self) -> Iterator[str]:
        return iter(backbone_names())

    def __len__(self) -> int:
        return len(backbone_names())


#: ``BACKBONES[name] -> (module class, config class)``; iterating lists the names without importing torch.
BACKBONES: Mapping = _Registry()

_FILM_MLP_NAMES = ("FILM_MLP_PRESETS", "FiLMMLP", "FiLMMLPConfig", "sinusoidal_embedding")


def __getattr__(name):
    if name in _FILM_MLP_NAMES:  # the FiLM-MLP (and torch) load on first use
        from normdiff_bids.model.backbones import film_mlp

        return getattr(film_mlp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
