"""Centiles, z-scores and joint deviation scores from model samples."""

from normdiff_bids.scoring.centiles import (
    CENTILE_FLOOR,
    centiles_to_z,
    empirical_centiles,
    interpolate_quantile_functions,
    sample_quantiles,
)
from normdiff_bids.scoring.joint import joint_deviation

__all__ = ["CENTILE_FLOOR", "centiles_to_z", "empirical_centiles", "interpolate_quantile_functions",
           "joint_deviation", "sample_quantiles"]
