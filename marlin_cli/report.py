"""Output for people and for machines: markdown tables and JSON files (used by every command that reports)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render_table(headers: list[str], rows: list[list[Any]], digits: int = 2) -> str:
    """A markdown table (readable as plain text too); floats shown with ``digits`` decimals, ``None`` as ``—``."""

    def cell(value: Any) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(lines)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
