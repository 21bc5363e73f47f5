"""Declarative parameter checks for the estimator (as scikit-learn's ``_parameter_constraints``).

A constraint is a test and a hint; :func:`check_parameters` reports every failing parameter at once as
``name=value (hint)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Constraint", "check_parameters", "interval", "non_empty_names", "one_of", "whole_number"]


@dataclass(frozen=True)
class Constraint:
    """``test(value) -> bool``; ``hint`` (or a callable giving it) says what a valid value is."""

    test: Callable[[Any], bool]
    hint: str | Callable[[], str]

    def message(self, name: str, value) -> str | None:
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        if ok:
            return None
        hint = self.hint() if callable(self.hint) else self.hint
        return f"{name}={value!r} ({hint})"


def one_of(choices: Collection | Callable[[], Collection], hint: str | Callable[[], str]) -> Constraint:
    """The value is one of ``choices`` (or of what a callable returns, for registries)."""
    return Constraint(lambda v: v in (choices() if callable(choices) else choices), hint)


def whole_number(minimum: int, hint: str, none_ok: bool = False) -> Constraint:
    """An integral value >= ``minimum`` (``None`` allowed when ``none_ok``)."""
    return Constraint(lambda v: (none_ok and v is None) or (int(v) == v and v >= minimum), hint)


def interval(low: float | None, high: float | None, hint: str, closed: str = "neither",
             none_ok: bool = False) -> Constraint:
    """A number in the interval; ``closed`` is "left", "right", "both" or "neither"."""
    def test(v) -> bool:
        if v is None:
            return none_ok
        above = low is None or (v >= low if closed in ("left", "both") else v > low)
        below = high is None or (v <= high if closed in ("right", "both") else v < high)
        return bool(above and below)
    return Constraint(test, hint)


def non_empty_names(hint: str) -> Constraint:
    """A non-empty sequence of names (a single string is refused)."""
    return Constraint(lambda v: not isinstance(v, str) and len(v) > 0, hint)


def check_parameters(owner, constraints: Mapping[str, Constraint], what: str) -> None:
    """Raise one ``ValueError`` listing every parameter of ``owner`` that breaks its constraint."""
    problems = [m for name, c in constraints.items() if (m := c.message(name, getattr(owner, name)))]
    if problems:
        raise ValueError(f"invalid {what} parameters: " + "; ".join(problems))
