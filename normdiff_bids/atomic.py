"""Atomic writes: a reader sees the old file or the complete new one, never a half-written one.

Every file the package writes goes through here: write to a temporary sibling, flush, then
``os.replace`` (atomic on POSIX within one file system). Folders (model bundles) are built in a
temporary sibling folder and renamed into place; an existing folder is only replaced once the new one
is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from normdiff_bids.errors import OutputError


def _tmp_sibling(path: Path, *, directory: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to ``path``, on error it is removed.

    Use it for writers that want a file name (``nibabel.save``, ``DataFrame.to_csv``)::

        with atomic_path(out) as tmp:
            nib.save(img, tmp)
    """
    path = Path(path)
    tmp = _tmp_sibling(path, directory=False)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise disk_full(path, exc) from None
        raise


#: Errors of a full disk or an exhausted quota.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def disk_full(path: Path, exc: OSError) -> OutputError:
    """The user-facing error for a write that found the disk (or the quota) full."""
    return OutputError(f"{path}: {exc.strerror} while writing it; nothing was half-written (the files "
                       f"already there are intact): free space in {path.parent} or choose another output "
                       f"folder, then rerun (with the same --work-dir, finished steps are reused)")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False,
                     durable: bool = True) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``, on error it is removed.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError`` before anything is written.
    With ``overwrite=True`` the old folder stays in place until the new one is complete, then is swapped
    out (rename old aside, rename new in, remove old), so a crash never leaves neither.
    ``durable=False`` skips the per-file fsync: right for bulk data that can be regenerated (a synthetic
    dataset of thousands of files), where the rename alone gives the all-or-nothing guarantee.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
    tmp = _tmp_sibling(path, directory=True)
    try:
        yield tmp
        if durable:
            for child in tmp.rglob("*"):
                if child.is_file():
                    _fsync_file(child)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = _tmp_sibling(path, directory=True)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise disk_full(path, exc) from None
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
