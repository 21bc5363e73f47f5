"""Text, JSON and TSV writers for files inside the dataset's temporary folder (moved into place whole)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from normdiff_bids.bidsio import json_text, tsv_text


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json_text(obj))


def write_tsv(path: Path, table: pd.DataFrame, float_format: str | None = None) -> None:
    write_text(path, tsv_text(table, float_format))
