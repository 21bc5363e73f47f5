"""Progress bars for long work (training epochs, sampling batches), silent in CI and when asked.

Bars are off when ``verbose`` is False, when ``CI`` is set to a true value, or when
``NORMDIFF_QUIET`` is set (the command line's ``--quiet`` sets it, so Nipype worker processes see it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

_TRUE = {"1", "true", "yes", "on"}


def progress_enabled(verbose: bool | None = None) -> bool:
    """Whether progress should be shown: ``verbose`` wins when given, else the environment decides."""
    if verbose is False:
        return False
    if os.environ.get("CI", "").strip().lower() in _TRUE:
        return False
    if os.environ.get("NORMDIFF_QUIET", "").strip().lower() in _TRUE:
        return False
    return True


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             verbose: bool | None = None, unit: str = "it", leave: bool = False):
    """A tqdm bar on stderr, disabled by :func:`progress_enabled`."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                disable=not progress_enabled(verbose), dynamic_ncols=True)
