"""The model bundle: a folder with ``model.safetensors`` (weights), ``model.json`` (everything else) and
``manifest.json`` (the format version and the sha256 and size of every other file).

No pickle anywhere: weights are safetensors, metadata is JSON. Each file is read once, checked against
the manifest and parsed from those same bytes, so what is verified is what is loaded; a tampered,
truncated, foreign, older- or newer-format bundle is refused with a message that names the file and the
fix. The checksums detect corruption and edits, not a forger who also rewrites the manifest: share
models through a channel you trust. Bundles are written atomically and never replace an existing one
unless asked to (and then only once the new one is complete).

A process keeps the last bundles it verified (:data:`CACHE_SIZE`), keyed by the folder, the manifest's
content and each file's size, modification time and inode: a run that loads one model in several steps
reads and checks it once, and any change to a file makes the next load read and check it again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_directory
from normdiff_bids.bidsio import json_ready
from normdiff_bids.errors import NormdiffError

FORMAT_NAME = "normdiff-bids-model"
#: 2: every file is listed with its sha256 in manifest.json (1: only the weights, checked in model.json).
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MANIFEST_FILE = "manifest.json"
#: The files a bundle consists of (besides the manifest), in the order they are checked.
BUNDLE_FILES = (META_FILE, WEIGHTS_FILE)
_RESERVED = ("format", "format_version", "package_version")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REFIT = "re-create it with `NormativeDiffusion.fit(...).save(path)` or the `group` level"
#: Verified bundles a process keeps (a model and the base model it was adapted from).
CACHE_SIZE = 2
_verified: dict[tuple, tuple[dict, dict]] = {}


class BundleError(NormdiffError, ValueError):
    """A model bundle that cannot be trusted or read; the message names the file and the fix."""


def save_bundle(path: str | os.PathLike, tensors: dict, meta: dict, overwrite: bool = False) -> Path:
    """Write ``tensors`` (numpy arrays or torch tensors) and ``meta`` as a bundle folder at ``path`` and
    return the path.

    An existing ``path`` raises :class:`FileExistsError` unless ``overwrite=True``; then the old bundle
    stays in place until the new one is complete.
    """
    path = Path(path)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "package_version": __version__}
    clash = sorted(set(_RESERVED) & set(meta))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the bundle format")
    # serialise first so that a metadata problem fails before anything is written; the checksums are
    # taken of exactly the bytes that are written
    tensors = {k: _as_array(v) for k, v in tensors.items()}
    meta_text = json.dumps(json_ready({**header, **meta}, strict=True), indent=2, allow_nan=False) + "\n"
    contents = {
        META_FILE: meta_text.encode(),
        WEIGHTS_FILE: save_safetensors(tensors),
    }
    manifest = {**header, "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                                    for name, data in contents.items()}}
    contents[MANIFEST_FILE] = (json.dumps(manifest, indent=2) + "\n").encode()
    with atomic_directory(path, overwrite=overwrite) as tmp:
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
    return path


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a bundle written by :func:`save_bundle`; returns ``(tensors, meta)``, the tensors as numpy
    arrays (reading a bundle imports no torch: a model that scores from its draw table never needs it).

    Raises :class:`BundleError` for a missing folder or file, a foreign, older or newer format, a
    truncated file or one whose checksum does not match the manifest.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise BundleError(f"model bundle {path} {what}; pass the folder that holds {MANIFEST_FILE}, "
                          f"{META_FILE} and {WEIGHTS_FILE}")
    manifest = _read_manifest(path)
    key = _cache_key(path, manifest)
    if key is not None and key in _verified:
        tensors, meta = _verified[key]
        return dict(tensors), copy.deepcopy(meta)
    data = {name: _verified_bytes(path, name, manifest["files"][name]) for name in BUNDLE_FILES}
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    try:
        meta = json.loads(data[META_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{meta_path} is not valid JSON ({err}) although its checksum matches: the "
                          f"bundle was not written by normdiff-bids; {_REFIT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME \
            or meta.get("format_version") != manifest["format_version"]:
        raise BundleError(f"{meta_path} does not carry the format of {path / MANIFEST_FILE} "
                          f"({FORMAT_NAME} {manifest['format_version']}); the folder mixes files of "
                          f"different models; copy the whole original folder or {_REFIT}")
    try:
        tensors = load_safetensors(data[WEIGHTS_FILE])
    except (SafetensorError, ValueError) as err:
        raise BundleError(f"{weights_path} cannot be read as safetensors ({err}); {_REFIT}") from None
    if key is not None:
        while len(_verified) >= CACHE_SIZE:
            _verified.pop(next(iter(_verified)))
        _verified[key] = (tensors, copy.deepcopy(meta))
    return dict(tensors), meta


def _cache_key(path: Path, manifest: dict) -> tuple | None:
    """What identifies a bundle's verified content in this process (None when a file cannot be stat-ed)."""
    try:
        stats = tuple((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
                      for st in ((path / name).stat() for name in BUNDLE_FILES))
    except OSError:
        return None
    return str(path.resolve()), json.dumps(manifest, sort_keys=True), stats


def weights_digest(path: str | os.PathLike) -> str | None:
    """The sha256 of a bundle's weights as its manifest records it (None when there is none to read)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_bytes())
        return str(manifest["files"][WEIGHTS_FILE]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_params(estimator_cls, params: dict, path: str | os.PathLike) -> None:
    """Run ``estimator_cls``'s own parameter checks on the ``params`` a bundle's model.json holds.

    The device is not checked here: it is the loading machine's choice, not the bundle's.
    """
    meta_path = Path(path) / META_FILE
    fix = (f"the file was edited or written by another version; restore the original model folder "
           f"or {_REFIT}")
    try:
        estimator_cls(**{**params, "device": "cpu"})._check_params()
    except TypeError as err:
        raise BundleError(f"{meta_path}: \"params\" do not fit {estimator_cls.__name__} ({err}); "
                          f"{fix}") from None
    except ValueError as err:
        raise BundleError(f"{meta_path} holds invalid parameters: {str(err).split(': ', 1)[-1]}; "
                          f"{fix}") from None


def _as_array(tensor) -> np.ndarray:
    """A tensor as a C-contiguous numpy array on the CPU (torch tensors are converted)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(tensor)


def _read_manifest(path: Path) -> dict:
    manifest_path, meta_path = path / MANIFEST_FILE, path / META_FILE
    if not manifest_path.is_file():
        old = _old_format_version(meta_path)
        if old is not None:
            raise BundleError(f"{path} is a model bundle of format version {old}, written by an older "
                              f"normdiff-bids; this version ({__version__}) reads format {FORMAT_VERSION} "
                              f"(every file checksummed in {MANIFEST_FILE}); {_REFIT}")
        if meta_path.is_file() or (path / WEIGHTS_FILE).is_file():
            raise BundleError(f"{manifest_path} is missing, so the files of {path} cannot be checked (the "
                              f"folder was not copied completely); copy the whole folder or {_REFIT}")
        raise BundleError(f"{manifest_path} and {META_FILE} are missing, so {path} is not a normdiff-bids "
                          f"model; pass a folder written by normdiff-bids or {_REFIT}")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err}): the file is truncated or was "
                          f"edited; restore it from the original model folder or {_REFIT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{manifest_path} is not a normdiff-bids model manifest (no \"format\": "
                          f"\"{FORMAT_NAME}\"); pass a folder written by normdiff-bids")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{manifest_path} has an invalid format_version {version!r}; {_REFIT}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{manifest_path} has format_version {version}, newer than this normdiff-bids "
                          f"{__version__} reads ({FORMAT_VERSION}); upgrade normdiff-bids "
                          f"(the model was written by {manifest.get('package_version', 'a newer version')})")
    if version < FORMAT_VERSION:
        raise BundleError(f"{manifest_path} has format_version {version}, older than this normdiff-bids "
                          f"{__version__} reads ({FORMAT_VERSION}); {_REFIT}")
    files = manifest.get("files")
    entries_ok = isinstance(files, dict) and all(
        isinstance(files.get(name), dict) and isinstance(files[name].get("sha256"), str)
        and _SHA256.match(files[name]["sha256"]) and isinstance(files[name].get("bytes"), int)
        for name in BUNDLE_FILES)
    if not entries_ok:
        raise BundleError(f"{manifest_path} does not list the sha256 and size of {', '.join(BUNDLE_FILES)}; "
                          f"the file was edited; restore it from the original model folder or {_REFIT}")
    return manifest


def _old_format_version(meta_path: Path) -> int | None:
    """The format version of a model.json written before manifests existed (None if it is not one)."""
    try:
        meta = json.loads(meta_path.read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME and \
            isinstance(meta.get("format_version"), int) and meta["format_version"] < FORMAT_VERSION:
        return meta["format_version"]
    return None


def _verified_bytes(path: Path, name: str, entry: dict) -> bytes:
    """The bytes of ``path/name``, read once and checked against its manifest ``entry``."""
    file = path / name
    if not file.is_file():
        raise BundleError(f"{file} is missing; copy the whole model folder or {_REFIT}")
    data = file.read_bytes()
    if len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]:
        return data
    size = (f"it has {len(data)} bytes, not the {entry['bytes']} it was saved with"
            if len(data) != entry["bytes"] else "same size, different content")
    what = ("its settings were edited by hand, or it is truncated or corrupted (scoring settings such "
            "as --n-samples and --unknown-site are options of the participant level, not edits of the "
            "bundle)" if name == META_FILE else "the weights are truncated, modified or corrupted")
    raise BundleError(f"{file} does not match the sha256 recorded in {path / MANIFEST_FILE} ({size}): "
                      f"{what}; restore the original model folder or {_REFIT}")
