"""A failed Nipype workflow turned back into the user-facing error that caused it, read from the
exception or the nodes' crash files (message, exit code and one entry per failed node)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from normdiff_bids.errors import NormdiffError, OutputError

#: Error classes whose message is written for the user; a node crash carrying one of them is shown as it.
_ERROR_PATTERN = re.compile(r"^([ \t]*)(?:normdiff_bids\.[\w.]+\.)?(\w*Error): ", re.MULTILINE)


class NodeError(NormdiffError):
    """A workflow node failed; carries the message (and exit code) of the error that caused it.

    ``failures``: one ``{"node", "message", "crash_file"}`` entry per failed node (either of the node and
    its crash file may be None when Nipype left no crash file).
    """

    def __init__(self, message: str, failures: list[dict] | None = None):
        super().__init__(message)
        self.failures = list(failures or [])


def node_error(exc: BaseException, crash_dir: Path) -> NormdiffError:
    """The user-facing error behind a failed workflow, recovered from the exception or the crash files.

    One failed node gives the message of the error that caused it (as if it had been raised here);
    several (a run that went on after the first failure) give one line per failed node.
    """
    crash_files = sorted(crash_dir.glob("crash-*")) if crash_dir.is_dir() else []
    failures = [_failure(path) for path in crash_files]
    if len(failures) > 1:
        return _several_failures(failures, crash_dir)
    texts = []
    seen = exc
    while seen is not None:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    texts.extend(p.read_text(errors="replace") for p in crash_files)
    failure = {"node": failures[0]["node"] if failures else None,
               "crash_file": os.fspath(crash_files[0]) if crash_files else None}
    for text in texts:
        found = _user_message(text)
        if found is not None:
            name, message = found
            # the node's own message, as if it had been raised here
            error = NodeError(message, [{**failure, "message": message}])
            error.exit_code = _exit_code(name)
            return error
    where = f"; crash report: {crash_files[0]}" if crash_files else ""
    last = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
    error = NodeError(f"a processing step failed: {last}{where}; rerun with -vv for the full log",
                      [{**failure, "message": last}])
    error.exit_code = 1
    return error


def _exit_code(error_name: str | None) -> int:
    """Exit status of a failure: 3 for an unsafe output folder, 2 for other user errors, 1 otherwise."""
    if error_name is None:
        return 1
    return OutputError.exit_code if error_name == "OutputError" else NormdiffError.exit_code


def _failure(crash_file: Path) -> dict:
    """What one Nipype crash file says: the node (without the top workflow's name), its error and message."""
    text = crash_file.read_text(errors="replace")
    first = text.split("\n", 1)[0]
    node = first.removeprefix("Node: ").strip() if first.startswith("Node: ") else crash_file.name
    node = node.split(".", 1)[1] if "." in node else node
    found = _user_message(text)
    if found is not None:
        error_name, message = found
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        error_name, message = None, lines[-1] if lines else "no error message"
    return {"node": node, "error": error_name, "message": message, "crash_file": os.fspath(crash_file)}


def _several_failures(failures: list[dict], crash_dir: Path) -> NodeError:
    lines = [f"{len(failures)} processing steps failed (the steps that did not depend on them ran):"]
    for failure in failures:
        message = failure["message"].replace("\n", "\n      ")
        lines.append(f"  - {failure['node']}: {message}")
    lines.append(f"crash reports: {crash_dir}; rerun with -vv for the full log, or with "
                 f"--stop-on-first-crash to stop at the first failure")
    error = NodeError("\n".join(lines), [{k: f[k] for k in ("node", "message", "crash_file")}
                                         for f in failures])
    codes = {_exit_code(f["error"]) for f in failures}
    error.exit_code = 1 if 1 in codes else max(codes)
    return error


def _user_message(text: str) -> tuple[str, str] | None:
    """The last user-facing error (class name, message) in a traceback text, if there is one.

    Nipype indents the traceback it stores; the message is the error line and the lines below it with
    the same indentation, up to Nipype's own text or the end.
    """
    from normdiff_bids import errors
    from normdiff_bids.model.bundle import BundleError

    user_classes = {name for name, obj in vars(errors).items()
                    if isinstance(obj, type) and issubclass(obj, NormdiffError)} | {BundleError.__name__}
    matches = [m for m in _ERROR_PATTERN.finditer(text) if m.group(2) in user_classes]
    if not matches:
        return None
    last = matches[-1]
    indent = last.group(1)
    first, *rest = text[last.end():].split("\n")
    lines = [first.rstrip()]
    for line in rest:
        if not line.startswith(indent) or not line[len(indent):].strip():
            break
        body = line[len(indent):]
        if body.startswith(("Traceback", "During handling", "The above exception", "RuntimeError")):
            break
        lines.append(body.rstrip())
    message = "\n".join(lines).strip()
    return (last.group(2), message) if message else None
