"""Strict JSON for reports and logs, and reading a JSON-lines file that a crash may have cut."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict_json(obj: Any) -> Any:
    """The same structure with NaN and infinities as null: valid JSON for any reader."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a missing file has none, and a line cut short is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return rows
