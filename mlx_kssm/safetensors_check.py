"""Check a ``.safetensors`` file before anything loads it (``mx.load`` trusts its header).

The format: 8 bytes, the little-endian length N of a JSON header; N bytes of header, a JSON
object mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus
an optional ``"__metadata__"`` of strings); then the data, offsets counted from its start.
The format requires the tensors to cover the data exactly, without gaps or overlaps.

``check_safetensors`` reads only the header (never more than ``max_header_bytes``) and returns
each tensor's dtype and shape, so a loader can compare them with its config before it builds
a model. Every problem is a ValueError with a one-line message.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

ITEMSIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_DIMS = 64
_MAX_INT = 2**63  # no size or offset of a real file reaches this
_WIDTH = 60  # how much of a file-supplied value an error message shows


def _short(value) -> str:
    text = json.dumps(value)[: _WIDTH * 2] if not isinstance(value, str) else repr(value)
    return text if len(text) <= _WIDTH else text[: _WIDTH - 3] + "..."


def _read_header(path: Path, max_header_bytes: int) -> tuple[bytes, int]:
    """The header bytes and the data section's length; the file is opened without blocking."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size < 8:
            raise ValueError(f"{path} is truncated ({info.st_size} bytes, no header)")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > max_header_bytes:
            raise ValueError(
                f"{path}: header length {length:,} exceeds the limit of {max_header_bytes:,} "
                "bytes (damaged file?)"
            )
        if 8 + length > info.st_size:
            raise ValueError(
                f"{path} is truncated: its header needs {length:,} bytes, the file has "
                f"{info.st_size - 8:,} after the length"
            )
        header = f.read(length)
        if len(header) != length:
            raise ValueError(f"{path} is truncated (the header ends early)")
    return header, info.st_size - 8 - length


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a name appears twice in the header")
    return dict(pairs)


def check_safetensors(
    path: str | os.PathLike, max_header_bytes: int = 100 << 20
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate ``path`` and return ``{name: (dtype, shape)}``; ValueError if it is damaged."""
    path = Path(path)
    header, data_length = _read_header(path, max_header_bytes)
    try:
        entries = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, RecursionError, ValueError) as err:
        reason = str(err).splitlines()[0][:_WIDTH] if str(err) else type(err).__name__
        raise ValueError(f"{path}: the header is not valid JSON ({reason})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    metadata = entries.pop("__metadata__", None)
    if metadata is None:  # MLX writes "__metadata__": null when there is none
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    tensors, spans = {}, []
    for name, entry in entries.items():
        dtype, shape, begin, end = _entry(path, name, entry, data_length)
        tensors[name] = (dtype, shape)
        spans.append((begin, end, name))
    _check_coverage(path, sorted(spans), data_length)
    return tensors


def _entry(path: Path, name: str, entry, data_length: int):
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{where} is not {{dtype, shape, data_offsets}}: {_short(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise ValueError(f"{where} has an unknown dtype {_short(dtype)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and 0 <= n < _MAX_INT for n in shape)
    ):
        raise ValueError(f"{where} has a bad shape {_short(shape)} (non-negative integers)")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int and 0 <= n < _MAX_INT for n in offsets)
    ):
        raise ValueError(f"{where} has bad data_offsets {_short(offsets)}")
    begin, end = offsets
    if begin > end or end > data_length:
        raise ValueError(
            f"{where}: data_offsets [{begin}, {end}] fall outside the data ({data_length:,} bytes)"
        )
    expected = math.prod(shape) * ITEMSIZES[dtype]
    if end - begin != expected:
        raise ValueError(
            f"{where}: {end - begin:,} bytes of data for shape {_short(shape)} x {dtype} "
            f"({_short(expected)} bytes expected)"
        )
    return dtype, tuple(shape), begin, end


def _check_coverage(path: Path, spans: list, data_length: int) -> None:
    """The tensors tile the data section: sorted by offset, each starts where the last ended."""
    position = 0
    for begin, end, name in spans:
        if begin < position:
            raise ValueError(f"{path}: tensor {_short(name)} overlaps the tensor before it")
        if begin > position:
            raise ValueError(f"{path}: {begin - position:,} bytes before {_short(name)} are unused")
        position = end
    if position != data_length:
        raise ValueError(f"{path}: {data_length - position:,} bytes after the last tensor unused")
