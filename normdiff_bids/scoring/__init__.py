"""Centiles, z-scores and joint deviation scores from model samples."""
