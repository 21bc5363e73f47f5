"""Reads the synthetic writer's tables (``tables/*.tsv``, ``tables/*.json``) from the package data, once."""

from __future__ import annotations

import csv
import io
import json
from functools import cache
from importlib.resources import files


def _text(name: str) -> str:
    return files(__package__).joinpath("tables", name).read_text(encoding="utf-8")


@cache
def table_rows(name: str) -> tuple[dict[str, str], ...]:
    """The rows of ``tables/<name>`` (a TSV with a header line) as dicts of strings, in file order."""
    rows = tuple(csv.DictReader(io.StringIO(_text(name)), delimiter="\t", quoting=csv.QUOTE_NONE))
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise ValueError(f"tables/{name} line {line}: the number of tab-separated fields differs "
                             "from the header's")
    return rows


@cache
def table_json(name: str) -> dict:
    """The content of ``tables/<name>`` (JSON)."""
    return json.loads(_text(name))
