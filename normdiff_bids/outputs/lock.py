"""The output lock: one exclusive lock per output folder, shared by every job writing into it (threads,
Nipype MultiProc workers, SLURM array tasks on one file system)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from normdiff_bids.errors import OutputError

if TYPE_CHECKING:
    from filelock import FileLock

#: Lock file shared by jobs writing into one output folder (a dot-file: the BIDS validator skips it).
LOCK_NAME = ".normdiff.lock"
#: Seconds a job waits for the output lock. Jobs hold it only to merge a shared file (well under a
#: second) or to install a model, so a lock held this long belongs to a job that hangs.
LOCK_TIMEOUT_S = 600.0

_locks: dict[Path, FileLock] = {}
_locks_guard = threading.Lock()


def _file_lock(path: Path) -> FileLock:
    """The one lock object of ``path`` in this process: re-entrant within a thread, exclusive between
    threads (each thread holds its own descriptor) and between processes."""
    from filelock import FileLock  # here: checking an output folder needs only the standard library

    with _locks_guard:
        lock = _locks.get(path)
        if lock is None:
            lock = _locks[path] = FileLock(path, thread_local=True)
        return lock


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir``: wait for other jobs (at most ``timeout`` seconds).

    A :class:`filelock.FileLock` on ``<output_dir>/.normdiff.lock`` (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows) serialises processes (Nipype MultiProc workers, SLURM array tasks
    sharing a file system) and threads; a thread that holds it may take it again. On POSIX the lock file
    is left in place, so that every waiting job locks the same file. Raises :class:`OutputError` naming
    the lock file when it cannot be created or is still held after ``timeout`` seconds.
    """
    from filelock import Timeout

    path = (Path(output_dir) / LOCK_NAME).absolute()
    lock = _file_lock(path)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise OutputError(
            f"the output folder {path.parent} is locked by another normdiff-bids run writing into it: its "
            f"lock file {path} was still held after {timeout:g} s; wait for that run to finish and rerun, "
            f"or, if no other run uses this folder (one was killed on a file system without working "
            f"locks), remove the stale lock file {path}") from None
    except OSError as err:
        raise OutputError(f"cannot create the lock file {path}: {err.strerror or err}; "
                          "check that the output folder is writable") from err
    try:
        yield
    finally:
        lock.release()
