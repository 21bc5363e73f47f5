"""BIDS tabular and JSON files written one way: TSV with ``n/a`` for missing values and ``true``/``false``
flags, JSON made of plain types (numpy scalars unwrapped, non-finite numbers as ``null``), atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from normdiff_bids.atomic import atomic_write_text

__all__ = ["json_ready", "json_text", "tsv_text", "write_json", "write_tsv"]


def json_ready(obj, strict: bool = False):
    """``obj`` as plain JSON data: dicts (string keys), lists, str, int, float, bool, None.

    numpy scalars and arrays become Python ones, tuples and sets lists, non-finite floats ``None``,
    paths ``str``. Unless ``strict``, DataFrames become lists of records, objects with ``to_dict`` their
    dict and anything else ``str``; ``strict`` (what a model bundle stores) refuses them with a
    ``TypeError`` instead of writing something that cannot be read back as it was.
    """
    import numpy as np  # here, not at the top: the output-folder checks import this module without numpy

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


def json_text(data, indent: int | None = 2, ensure_ascii: bool = True) -> str:
    """``json_ready(data)`` as JSON text (strict: no NaN), ending in a newline."""
    return json.dumps(json_ready(data), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, data, indent: int = 2, ensure_ascii: bool = True) -> Path:
    """Write :func:`json_text` of ``data`` atomically; return the path."""
    return atomic_write_text(path, json_text(data, indent=indent, ensure_ascii=ensure_ascii))


def tsv_text(table, float_format: str | None = "%.17g") -> str:
    """A DataFrame as BIDS TSV text: ``n/a`` for missing, booleans as ``true``/``false``, ``\\n`` lines."""
    import pandas as pd

    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].map({True: "true", False: "false"}, na_action="ignore").astype("object")
    return out.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n", float_format=float_format)


def write_tsv(table, path: str | os.PathLike, float_format: str | None = "%.17g") -> Path:
    """Write :func:`tsv_text` of ``table`` atomically; return the path."""
    return atomic_write_text(path, tsv_text(table, float_format))
