"""Former home of the estimator, kept so that old imports work. The estimator is
:mod:`normdiff_bids.model.estimator`; training, sampling and presets have their own modules."""

from normdiff_bids.model.estimator import NormativeDiffusion, load_model
from normdiff_bids.model.presets import DEFAULTS, PAPER
from normdiff_bids.model.sampling import _POINT_CACHE
from normdiff_bids.model.tables import MIN_TRAIN_ROWS

__all__ = ["NormativeDiffusion", "load_model", "DEFAULTS", "PAPER", "MIN_TRAIN_ROWS", "_POINT_CACHE"]

