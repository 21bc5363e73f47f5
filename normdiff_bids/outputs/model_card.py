"""Model cards written beside their bundle: ``models/<name>_modelcard.json`` and a readable ``.md``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from normdiff_bids.atomic import atomic_write_text
from normdiff_bids.bidsio import json_ready, write_json
from normdiff_bids.outputs import names


def write_model_card(output_dir: str | os.PathLike, card: Mapping, name: str = "default") -> list[Path]:
    """Write a model card beside its bundle: ``models/<name>_modelcard.json`` and a readable ``.md``.

    The card lives outside the bundle folder so that the bundle's own files stay exactly as saved.
    """
    output_dir = Path(output_dir)
    json_path = output_dir / names.model_card_path(name, ".json")
    md_path = output_dir / names.model_card_path(name, ".md")
    write_json(json_path, dict(card))
    lines = [f"# Model card: {name}", ""]
    lines += _markdown_rows(card)
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return [json_path, md_path]


def _markdown_rows(card: Mapping, prefix: str = "") -> list[str]:
    rows = []
    for key, value in card.items():
        if isinstance(value, Mapping) and value:
            rows.extend(_markdown_rows(value, prefix=f"{prefix}{key}."))
        elif isinstance(value, list) and len(value) > 12:
            rows.append(f"- **{prefix}{key}**: {len(value)} items: {', '.join(map(str, value[:8]))}, ...")
        else:
            text = json.dumps(json_ready(value)) if isinstance(value, Mapping | list) else str(value)
            rows.append(f"- **{prefix}{key}**: {text}")
    return rows
