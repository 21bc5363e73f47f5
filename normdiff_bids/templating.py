"""The one jinja2 environment every HTML report renders with: the templates in ``outputs/templates/``,
autoescaping on, undefined names an error, block tags trimmed, and the ``fmt``/``pct`` filters."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

TEMPLATES = Path(__file__).parent / "outputs" / "templates"


@functools.cache
def template_environment() -> jinja2.Environment:
    """The shared environment (built once; jinja2 environments are safe to share once configured)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = format_value
    env.filters["pct"] = format_percent
    return env


def render(template: str, **context) -> str:
    """Render ``outputs/templates/<template>`` with ``context``."""
    return template_environment().get_template(template).render(**context)


def format_value(value, digits: int = 2) -> str:
    """A value as report text: ``n/a`` for missing or non-finite, yes/no for flags, thousands separated."""
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return "n/a"
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if value is pd.NA:
        return "n/a"
    return str(value)


def format_percent(value) -> str:
    """A share as a percentage with one decimal (``n/a`` for missing or non-finite)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"
