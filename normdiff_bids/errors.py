"""User-facing errors: what is wrong, where (file, line, column, value), and the fix.

The command-line tools catch :class:`NormdiffError` and print its message without a traceback, exiting
with :attr:`NormdiffError.exit_code`. Library callers can catch the standard base classes
(``ValueError``, ``FileNotFoundError``) as usual.
"""

from __future__ import annotations

from collections.abc import Iterable


class NormdiffError(Exception):
    """Base class of every error whose message is written for the person running the tool."""

    exit_code = 2


class InputError(NormdiffError, ValueError):
    """Bad input data. Holds every problem found, so a cohort's errors are reported together.

    >>> raise InputError(["participants.tsv, row 3: age 'forty' is not a number; write years as a number"])
    """

    def __init__(self, problems: str | Iterable[str], *, header: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("InputError needs at least one problem")
        self.header = header
        super().__init__(self._format())

    def _format(self) -> str:
        if len(self.problems) == 1 and self.header is None:
            return self.problems[0]
        head = self.header or f"{len(self.problems)} problems found in the input"
        return head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)


class OutputError(NormdiffError, OSError):
    """The output folder cannot be written safely (read-only, owned by another pipeline, locked)."""

    exit_code = 3


class ProblemCollector:
    """Gather problems across a cohort and raise them together at the end.

    >>> problems = ProblemCollector()
    >>> problems.add("sub-01: stats/aseg.stats is truncated at line 80")
    >>> problems.raise_if_any(header="FreeSurfer outputs could not be read")
    """

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def extend(self, problems: Iterable[str]) -> None:
        self.problems.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def __len__(self) -> int:
        return len(self.problems)

    def raise_if_any(self, header: str | None = None) -> None:
        if self.problems:
            raise InputError(self.problems, header=header)
