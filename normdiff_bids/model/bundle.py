"""The model bundle: a folder with ``model.safetensors`` (weights) and ``model.json`` (everything else).

No pickle anywhere: weights are safetensors, metadata is JSON. ``model.json`` records the format
version and the sha256 and size of the weights, so a tampered, truncated, foreign or incomplete bundle
is refused with a message that names the file and the fix. Bundles are written atomically and never
replace an existing one unless asked to (and then only once the new one is complete).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from normdiff_bids._version import __version__
from normdiff_bids.atomic import atomic_directory
from normdiff_bids.errors import NormdiffError

FORMAT_NAME = "normdiff-bids-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class BundleError(NormdiffError, ValueError):
    """A model bundle that cannot be trusted or read; the message names the file and the fix."""


def save_bundle(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict,
                overwrite: bool = False) -> Path:
    """Write ``tensors`` and ``meta`` as a bundle folder at ``path`` and return the path.

    An existing ``path`` raises :class:`FileExistsError` unless ``overwrite=True``; then the old bundle
    stays in place until the new one is complete.
    """
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # serialise first so that a metadata problem fails before anything is written
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "package_version": __version__}
    clash = sorted(set(header) & set(meta))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the bundle format")
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        data = (tmp / WEIGHTS_FILE).read_bytes()
        document = {**header,
                    "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest(),
                                "bytes": len(data)},
                    **meta}
        text = json.dumps(_json_safe(document), indent=2, allow_nan=False)
        (tmp / META_FILE).write_text(text + "\n", encoding="utf-8")
    return path


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a bundle written by :func:`save_bundle`; returns ``(tensors, meta)``.

    Raises :class:`BundleError` for a missing folder or file, a foreign or newer format, a truncated
    file or weights whose checksum does not match.
    """
    path = Path(path)
    refit = "re-create it with `NormativeDiffusion.fit(...).save(path)` or the `group` level"
    if not path.is_dir():
        what = "is a file, not a model folder" if path.exists() else "does not exist"
        raise BundleError(f"model bundle {path} {what}; pass the folder that holds {META_FILE} and "
                          f"{WEIGHTS_FILE}")
    meta_path, weights_path = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.is_file():
        raise BundleError(f"{meta_path} is missing, so {path} is not a normdiff-bids model (or was not "
                          f"copied completely); copy the whole folder or {refit}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{meta_path} is not valid JSON ({err}): the file is truncated or was "
                          f"edited; restore it from the original model folder or {refit}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BundleError(f"{meta_path} is not a normdiff-bids model file (no \"format\": "
                          f"\"{FORMAT_NAME}\"); pass a folder written by normdiff-bids")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{meta_path} has an invalid format_version {version!r}; {refit}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{meta_path} has format_version {version}, newer than this normdiff-bids "
                          f"{__version__} reads ({FORMAT_VERSION}); upgrade normdiff-bids "
                          f"(the model was written by {meta.get('package_version', 'a newer version')})")
    weights = meta.get("weights")
    if not isinstance(weights, dict) or not {"sha256", "bytes"} <= set(weights):
        raise BundleError(f"{meta_path} has no weights checksum; the file was edited; {refit}")
    if not weights_path.is_file():
        raise BundleError(f"{weights_path} is missing; copy the whole model folder or {refit}")
    data = weights_path.read_bytes()
    if len(data) != weights["bytes"]:
        raise BundleError(f"{weights_path} has {len(data)} bytes but the model was saved with "
                          f"{weights['bytes']}: the file is truncated or was replaced; copy the whole "
                          f"model folder again or {refit}")
    if hashlib.sha256(data).hexdigest() != weights["sha256"]:
        raise BundleError(f"{weights_path} does not match the sha256 recorded in {meta_path}: the weights "
                          f"were modified or corrupted; restore the original folder or {refit}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{weights_path} cannot be read as safetensors ({err}); {refit}") from None
    return tensors, meta


def _json_safe(obj):
    """Convert numpy scalars/arrays and tuples so that ``json.dumps`` writes plain JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
