"""The flags every report shares: the |z| thresholds, their colours, the order of the measures, short
IDP names. Kept apart from the figure modules so that a subject report needs no plotting library."""

from __future__ import annotations

__all__ = ["AMBER", "BLUE", "GREY", "MEASURE_ORDER", "RED", "Z_FLAG", "Z_STRONG", "flag_colour", "short_name"]

#: |z| thresholds of the flags: outside the central 95% and 99% of the normative distribution.
Z_FLAG, Z_STRONG = 1.959963984540054, 2.5758293035489004
GREY, AMBER, RED, BLUE = "#8c8c8c", "#e08a00", "#c0392b", "#1f5fa8"
#: Order of the measure panels in the reports (others follow, sorted).
MEASURE_ORDER = ("volume", "thickness", "area")


def flag_colour(z: float) -> str:
    """Red beyond |z| = 2.58, amber beyond 1.96, grey inside."""
    a = abs(z)
    return RED if a > Z_STRONG else AMBER if a > Z_FLAG else GREY


def short_name(idp: str, width: int = 28) -> str:
    """``idp`` cut to ``width`` characters with an ellipsis."""
    return idp if len(idp) <= width else idp[: width - 1] + "\u2026"
