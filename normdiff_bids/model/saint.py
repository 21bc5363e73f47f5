"""Former home of the SAINT backbone, kept so that old imports work.

See :mod:`normdiff_bids.model.backbones.saint`.
"""

from normdiff_bids.model.backbones.saint import *  # noqa: F403
from normdiff_bids.model.backbones.saint import __all__  # noqa: F401
