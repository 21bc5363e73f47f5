"""Atomic writes: a full disk is one user-facing error naming the target, and leaves nothing behind."""

from __future__ import annotations

import errno

import pytest

from normdiff_bids.atomic import atomic_directory, atomic_path
from normdiff_bids.errors import OutputError


def _full_disk(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_full_disk_names_the_target_and_leaves_the_old_one(tmp_path, kind):
    target = tmp_path / ("table.tsv" if kind == "file" else "model")
    if kind == "file":
        target.write_text("old")
        writer = atomic_path(target)
    else:
        target.mkdir()
        (target / "model.json").write_text("old")
        writer = atomic_directory(target, overwrite=True)
    with pytest.raises(OutputError, match=rf"{target.name}: No space left on device while writing it"):
        with writer as tmp:
            _full_disk(tmp)
    old = target if kind == "file" else target / "model.json"
    assert old.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary sibling left
