"""BIDS tabular and JSON files written one way: TSV with ``n/a`` for missing values and ``true``/``false``
flags, JSON made of plain types (numpy scalars unwrapped, non-finite numbers as ``null``), atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from normdiff_bids.atomic import atomic_path, atomic_write_text

__all__ = ["json_ready", "write_json", "write_tsv"]


def json_ready(obj, strict: bool = False):
    """``obj`` as plain JSON data: dicts (string keys), lists, str, int, float, bool, None.

    numpy scalars and arrays become Python ones, tuples and sets lists, non-finite floats ``None``,
    paths ``str``. Unless ``strict``, DataFrames become lists of records, objects with ``to_dict`` their
    dict and anything else ``str``; ``strict`` (what a model bundle stores) refuses them with a
    ``TypeError`` instead of writing something that cannot be read back as it was.
    """
    if obj is None or isinstance(obj, bool | str | int) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, dict):
        return {str(k): json_ready(v, strict) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_ready(v, strict) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist(), strict)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    if strict:
        raise TypeError(f"cannot store a {type(obj).__name__} as JSON: {obj!r}")
    if hasattr(obj, "to_dict"):  # DataFrame (records) or a config/report object
        try:
            return json_ready(obj.to_dict(orient="records"))
        except TypeError:
            return json_ready(obj.to_dict())
    if hasattr(obj, "item"):
        return json_ready(obj.item())
    return str(obj)


def write_json(path: str | os.PathLike, data, indent: int = 2) -> Path:
    """Write ``json_ready(data)`` as JSON (strict: no NaN), atomically; return the path."""
    atomic_write_text(path, json.dumps(json_ready(data), indent=indent, allow_nan=False) + "\n")
    return Path(path)


def write_tsv(table, path: str | os.PathLike, float_format: str | None = "%.17g") -> Path:
    """Write a DataFrame tab-separated, ``n/a`` for missing, booleans as ``true``/``false``, atomically."""
    import pandas as pd

    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].map({True: "true", False: "false"}, na_action="ignore").astype("object")
    with atomic_path(path) as tmp:
        out.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n", float_format=float_format)
    return Path(path)
