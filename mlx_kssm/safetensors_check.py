"""Placeholder header check for .safetensors files (replaced by the hardened version)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def check_safetensors(path: str | Path, max_header_bytes: int = 100 << 20) -> dict:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name} is truncated")
        (n,) = struct.unpack("<Q", head)
        if n > min(max_header_bytes, size - 8):
            raise ValueError(f"{path.name} has a header length beyond the file")
        header = json.loads(f.read(n))
    data = size - 8 - n
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][1] > data:
            raise ValueError(f"{path.name}: tensor {name[:60]} reaches past the end of the file")
    return {k: v for k, v in header.items() if k != "__metadata__"}
