"""normdiff-bids: joint normative models of brain IDPs with conditional denoising diffusion.

Public API: :class:`NormativeDiffusion` and :func:`load_model`. Heavy modules (torch) are imported
lazily so that ``normdiff-synth`` and the input readers start quickly.
"""

from normdiff_bids._version import __version__

__all__ = ["NormativeDiffusion", "load_model", "__version__"]


def __getattr__(name):
    if name in ("NormativeDiffusion", "load_model"):
        from normdiff_bids.model import estimator as normative

        return getattr(normative, name)
    raise AttributeError(f"module 'normdiff_bids' has no attribute {name!r}")
