"""The input dataset through the official BIDS validator (``bids-validator-deno``, an optional
dependency): run offline with a time limit, its JSON report read into errors and warnings.

The BIDS-App stops on the validator's errors and reports its warnings in one line; a validator that is
not installed, fails or runs out of time means the dataset was not validated (the caller decides what to
say). Issues in files the run does not use are not held against the dataset: other participants'
folders and ``participants.tsv`` rows when a selection is given, and folders named by the run itself
(its output, work and FreeSurfer folders) when they lie inside the dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normdiff_bids.conventions import preview
from normdiff_bids.errors import InputError

VALIDATOR = "bids-validator-deno"
#: Seconds the validator may run (about 1 s for the 300-participant demo dataset): a guard against a
#: validator that hangs (e.g. on an unresponsive network file system), not a budget.
TIMEOUT_S = 600.0
#: How to get the validator, for messages.
INSTALL_HINT = "pip install bids-validator-deno (or normdiff-bids[validate])"
#: Every web request of the validator goes to this closed local port (its runtime, Deno, honours the
#: proxy variables), so validation never reaches the network: a remote schema or a git-annex remote's
#: copy of a file that is not present locally fails at once instead.
_NO_NETWORK_PROXY = "http://127.0.0.1:9"
#: At most this many kinds of error (codes) are spelt out, each with at most this many files.
_MAX_CODES = 10
_MAX_FILES = 5


class ValidatorUnavailable(RuntimeError):
    """The validator gave no report: it is not installed (``installed`` False), failed to start or to
    finish, or its output was not the JSON report. The message says which."""

    def __init__(self, message: str, *, installed: bool = True):
        super().__init__(message)
        self.installed = installed


@dataclass(frozen=True)
class Issue:
    """One issue of the validator's report."""

    code: str
    severity: str
    location: str | None = None  # dataset path with a leading "/", e.g. "/sub-01/anat/sub-01_T1w.nii.gz"
    sub_code: str | None = None  # e.g. the column of a TSV issue
    message: str = ""            # the issue's own detail ("issueMessage"), often empty
    line: int | None = None      # TSV line (1 = the header)

    @classmethod
    def from_json(cls, item: dict) -> list[Issue]:
        """The issue(s) of one report entry: a dataset-level issue naming the files it ``affects`` is one
        issue per file."""
        locations = [item.get("location")] if item.get("location") else list(item.get("affects") or [None])
        line = item.get("line")
        return [cls(code=str(item.get("code", "UNKNOWN")), severity=str(item.get("severity", "error")),
                    location=str(loc) if loc else None, sub_code=item.get("subCode") or None,
                    message=str(item.get("issueMessage") or ""),
                    line=int(line) if isinstance(line, int | float) else None) for loc in locations]

    def where(self) -> str:
        """The file (and line, and the issue's own detail) for a message."""
        text = self.location or "the dataset"
        if self.line is not None:
            text += f" line {self.line}"
        detail = _shorten(self.message.strip().splitlines()[0] if self.message.strip() else "", 80)
        return f"{text} ({detail})" if detail else text


@dataclass
class ValidationReport:
    """The validator's verdict on one dataset, after the issues the run does not care about are dropped."""

    bids_dir: Path
    errors: list[Issue]
    warnings: list[Issue]
    code_messages: dict[str, str] = field(default_factory=dict)
    version: str | None = None
    seconds: float = 0.0
    n_ignored: int = 0  # errors and warnings dropped as outside the run's selection

    @property
    def validator(self) -> str:
        return f"{VALIDATOR} {self.version}" if self.version else VALIDATOR

    def raise_for_errors(self) -> None:
        """Raise :class:`InputError` with the validator's own words when it found errors."""
        if not self.errors:
            return
        groups: dict[tuple[str, str | None], list[Issue]] = {}
        for issue in self.errors:
            groups.setdefault((issue.code, issue.sub_code), []).append(issue)
        problems = []
        for (code, sub_code), issues in list(groups.items())[:_MAX_CODES]:
            name = f"{code} ({sub_code})" if sub_code else code
            text = _shorten(" ".join(self.code_messages.get(code, "").split()), 200)
            places = preview([i.where() for i in issues], _MAX_FILES)
            problems.append(f"{name}: {text} [{places}]" if text else f"{name}: {places}")
        if len(groups) > _MAX_CODES:
            problems.append(f"... and {len(groups) - _MAX_CODES} more kinds of error")
        n = len(self.errors)
        raise InputError(problems, header=(
            f"the BIDS validator ({self.validator}) found {n} error{'s' if n != 1 else ''} in "
            f"{self.bids_dir}; fix the dataset (`{VALIDATOR} {self.bids_dir}` prints the full report), or "
            f"pass --skip-bids-validation to run on it anyway"))

    def summary(self) -> str:
        """One line: the errors' count, how long it took, and the warnings by code."""
        n = len(self.errors)
        errors = f"{n} error{'s' if n != 1 else ''}" if n else "no errors"
        text = f"{self.validator} found {errors} in {self.bids_dir} ({self.seconds:.1f} s"
        if self.warnings:
            counts = Counter(w.code for w in self.warnings).most_common()
            shown = ", ".join(f"{code} x{k}" if k > 1 else code for code, k in counts[:3])
            more = f" and {len(counts) - 3} more codes" if len(counts) > 3 else ""
            n = len(self.warnings)
            text += f"; {n} warning{'s' if n != 1 else ''}: {shown}{more}"
        return text + ")"

    def record(self) -> dict:
        """What the run record keeps of the validation."""
        return {"validator": self.validator, "seconds": round(self.seconds, 2), "errors": len(self.errors),
                "warnings": len(self.warnings), "ignored_outside_selection": self.n_ignored}


def find_validator() -> str | None:
    """The validator executable: on ``PATH``, else beside this Python (a virtual environment that is not
    activated); ``None`` when it is not installed."""
    found = shutil.which(VALIDATOR)
    if found:
        return found
    folder = Path(sys.executable).parent
    for name in (VALIDATOR, f"{VALIDATOR}.exe"):
        if (folder / name).is_file():
            return str(folder / name)
    return None


def validate_bids(bids_dir: str | os.PathLike, *, participants: Sequence[str] | None = None,
                  ignore: Iterable[str | os.PathLike | None] = (), timeout: float = TIMEOUT_S,
                  executable: str | None = None) -> ValidationReport:
    """Validate ``bids_dir`` and return the report (raises :class:`ValidatorUnavailable` without one).

    ``participants`` (labels, with or without ``sub-``): only their folders and ``participants.tsv`` rows
    count; ``ignore``: folders whose issues do not count (ignored when outside the dataset).
    """
    return start_validator(bids_dir, timeout=timeout, executable=executable).report(
        participants=participants, ignore=ignore)


class RunningValidator:
    """The validator started on a dataset in the background (:func:`start_validator`), so that other
    checks can run meanwhile; :meth:`report` waits for it."""

    def __init__(self, bids_dir: Path, proc: subprocess.Popen, exe: str, timeout: float):
        self.bids_dir, self.proc, self.exe, self.timeout = bids_dir, proc, exe, timeout
        self.started = time.monotonic()

    def output(self) -> tuple[dict, float]:
        """The validator's JSON report and the seconds it took (raises :class:`ValidatorUnavailable`)."""
        left = max(self.timeout - (time.monotonic() - self.started), 0.1)
        try:
            stdout, stderr = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
            raise ValidatorUnavailable(f"{VALIDATOR} did not finish within {self.timeout:g} s") from None
        seconds = time.monotonic() - self.started
        try:
            data = json.loads(stdout)
            if not isinstance(data, dict) or not isinstance(data.get("issues"), dict):
                raise ValueError("no issues")
        except ValueError:
            tail = (stderr or stdout).decode(errors="replace").strip().splitlines()
            why = _shorten(tail[-1], 200) if tail else "no output"
            raise ValidatorUnavailable(f"{VALIDATOR} failed (exit status {self.proc.returncode}: {why})") \
                from None
        return data, seconds

    def report(self, *, participants: Sequence[str] | None = None,
               ignore: Iterable[str | os.PathLike | None] = ()) -> ValidationReport:
        data, seconds = self.output()
        report = read_report(data, self.bids_dir, participants=participants, ignore=ignore, seconds=seconds)
        report.version = _installed_version(self.exe)
        return report

    def stop(self) -> None:
        """End the validator early (its answer is no longer wanted)."""
        if self.proc.poll() is None:
            _kill(self.proc)


def start_validator(bids_dir: str | os.PathLike, *, timeout: float = TIMEOUT_S,
                    executable: str | None = None) -> RunningValidator:
    """Start the validator on ``bids_dir`` offline, in the background."""
    bids_dir = Path(bids_dir).absolute()
    exe = executable or find_validator()
    if exe is None:
        raise ValidatorUnavailable(f"{VALIDATOR} is not installed", installed=False)
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("BIDS_SCHEMA", "NO_PROXY")}  # BIDS_SCHEMA: a schema from the web
    env.update({"HTTP_PROXY": _NO_NETWORK_PROXY, "HTTPS_PROXY": _NO_NETWORK_PROXY,
                "ALL_PROXY": _NO_NETWORK_PROXY, "NO_PROXY": "", "NO_COLOR": "1",
                "DENO_NO_UPDATE_CHECK": "1", "DENO_NO_PROMPT": "1"})
    command = [exe, str(bids_dir), "--format", "json"]
    try:
        # its own session: on a timeout the whole process group goes (the runtime and any git it ran)
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=os.name == "posix")
    except OSError as exc:
        raise ValidatorUnavailable(f"{exe} could not be started ({exc.strerror or exc})") from None
    return RunningValidator(bids_dir, proc, exe, timeout)


def read_report(data: dict, bids_dir: Path, *, participants: Sequence[str] | None = None,
                ignore: Iterable[str | os.PathLike | None] = (), seconds: float = 0.0) -> ValidationReport:
    """The :class:`ValidationReport` of the validator's JSON report ``data`` on ``bids_dir``."""
    issues = [issue for item in data["issues"].get("issues", []) if isinstance(item, dict)
              for issue in Issue.from_json(item)]
    outside = _outside_selection(bids_dir, participants, ignore)
    kept = [i for i in issues if not outside(i)]
    messages = data["issues"].get("codeMessages") or {}
    return ValidationReport(
        bids_dir=bids_dir, errors=[i for i in kept if i.severity == "error"],
        warnings=[i for i in kept if i.severity == "warning"],
        code_messages={str(k): str(v) for k, v in messages.items()} if isinstance(messages, dict) else {},
        seconds=seconds, n_ignored=len(issues) - len(kept))


def _outside_selection(bids_dir: Path, participants, ignore):
    """A predicate: does an issue lie outside what this run reads?"""
    prefixes = []
    for folder in ignore:
        if folder is None:
            continue
        path = Path(folder).absolute()
        if path != bids_dir and path.is_relative_to(bids_dir):
            prefixes.append("/" + path.relative_to(bids_dir).as_posix() + "/")
    selected = None if not participants else {"sub-" + str(p).removeprefix("sub-") for p in participants}
    rows = _participant_rows(bids_dir / "participants.tsv") if selected else {}

    def outside(issue: Issue) -> bool:
        location = issue.location or ""
        if any(location.startswith(prefix) for prefix in prefixes):
            return True
        if selected is None:
            return False
        first = location.split("/")[1] if location.count("/") >= 2 else ""
        if first.startswith("sub-"):
            return first not in selected
        if location == "/participants.tsv" and issue.line is not None and issue.line in rows:
            return rows[issue.line] not in selected
        return False

    return outside


def _participant_rows(path: Path) -> dict[int, str]:
    """``participants.tsv`` line number (1 = the header) -> the participant_id on that line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    header = lines[0].split("\t") if lines else []
    if "participant_id" not in header:
        return {}
    column = header.index("participant_id")
    return {n: fields[column].strip() for n, line in enumerate(lines[1:], start=2)
            if len(fields := line.split("\t")) > column}


def _installed_version(exe: str | None) -> str | None:
    """The validator's package version, when ``exe`` is the one installed with this Python (its own
    ``--version`` prints the commit of the git repository it runs in, not its release)."""
    from importlib.metadata import PackageNotFoundError, version

    if exe is None or Path(exe).absolute().parent != Path(sys.executable).absolute().parent:
        return None
    try:
        return version(VALIDATOR)
    except PackageNotFoundError:
        return None


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:
        pass
    proc.communicate()


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:.") + " ..."
