"""Write files in torch's zip checkpoint layout with the standard library only (test helper).

``Tensor`` and ``Storage`` here are plain records; the pickler writes them the way torch.save
does (a ``torch._utils._rebuild_tensor_v2`` call over a persistent-id storage), so the tests
can build mps/cuda locations, float16/bfloat16, shared storages and strided views without
torch. When torch is installed, test_torch_reader checks that torch.load reads these files.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The spec's model_state order (= named_parameters() order, the optimizer's indices), written
# out here again rather than imported from v3_rules, so that a slip in the converter's order
# shows up as moments landing on the wrong parameter.
BLOCK_ORDER = [
    "oscillators.omega_0",
    "oscillators.delta_param",
    "oscillators.to_params.weight",
    "oscillators.to_params.bias",
    "oscillators.readout.weight",
    "oscillators.readout.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
    "ffn.0.weight",
    "ffn.0.bias",
    "ffn.2.weight",
    "ffn.2.bias",
]


def torch_order(n_layers: int) -> list[str]:
    blocks = [f"blocks.{i}.{s}" for i in range(n_layers) for s in BLOCK_ORDER]
    return ["pos_embed", "embed.weight", *blocks, "final_norm.weight", "final_norm.bias"]


STORAGE_CLASS = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
    "untyped": "UntypedStorage",  # bytes; the tensor names its dtype (_rebuild_tensor_v3)
}


@dataclass(eq=False)
class Storage:
    values: np.ndarray  # 1-d; for bfloat16, float32 values whose low 16 bits are dropped
    dtype: str = "float32"
    location: str = "cpu"

    def raw(self) -> np.ndarray:
        if self.dtype == "untyped":
            return self.values.astype(np.uint8)
        if self.dtype == "bfloat16":
            return (self.values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return self.values.astype(self.dtype)


@dataclass(eq=False)
class Tensor:
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    v3_dtype: str | None = None  # torch >= 2.1 writes uint16, float8, ... over untyped bytes

    def __reduce__(self):
        hooks = collections.OrderedDict()
        args = (self.storage, self.offset, self.shape, self.stride, False, hooks)
        if self.v3_dtype is not None:
            args += (Global("torch", self.v3_dtype),)
            return (Global("torch._utils", "_rebuild_tensor_v3"), args)
        return (Global("torch._utils", "_rebuild_tensor_v2"), args)


@dataclass(frozen=True)
class Global:
    """A name the pickle refers to, written as a GLOBAL opcode without importing it."""

    module: str
    name: str

    def __call__(self, *args):  # pickle insists that a reduce function is callable
        raise AssertionError("never called")


class Reduce:
    """An object whose unpickling calls ``func(*args)``: what a hostile file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def tensor(values, dtype: str = "float32", location: str = "cpu") -> Tensor:
    """A contiguous tensor over its own storage."""
    values = np.asarray(values)
    shape = values.shape
    stride = tuple(int(s) for s in np.cumprod((1,) + shape[:0:-1])[::-1]) if shape else ()
    return Tensor(Storage(values.reshape(-1), dtype, location), 0, shape, stride)


def v3_tensor(raw: np.ndarray, torch_dtype: str) -> Tensor:
    """A tensor of a dtype torch pickles with _rebuild_tensor_v3 (uint16, float8_e4m3fn, ...):
    ``raw`` holds its elements (little-endian), in a numpy type of the same width."""
    shape = raw.shape
    stride = tuple(int(s) for s in np.cumprod((1,) + shape[:0:-1])[::-1]) if shape else ()
    data = np.frombuffer(
        np.ascontiguousarray(raw).astype(raw.dtype.newbyteorder("<")).tobytes(), np.uint8
    )
    return Tensor(Storage(data, "untyped"), 0, shape, stride, torch_dtype)


def bf16_round_trip(values) -> np.ndarray:
    """What a bfloat16 storage written by Storage.raw reads back as (float32)."""
    raw = Storage(np.asarray(values, np.float32).reshape(-1), "bfloat16").raw()
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(np.shape(values))


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets save() be extended
    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: dict[int, tuple[str, Storage]] = {}

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(f"c{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key, _ = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))
        storage_type = Global("torch", STORAGE_CLASS[obj.dtype])
        return ("storage", storage_type, key, obj.location, obj.values.size)


def pickle_checkpoint(obj: Any) -> tuple[bytes, dict[str, Storage]]:
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), {key: storage for key, storage in pickler.storages.values()}


def write_checkpoint(
    path: Path,
    obj: Any,
    prefix: str = "archive",
    byteorder: str = "little",
    compress: bool = False,
) -> Path:
    """torch.save(obj, path), as far as the layout of the file goes (``byteorder="big"`` swaps
    typed storages only, not the untyped bytes of v3 tensors)."""
    data, storages = pickle_checkpoint(obj)
    members = {"data.pkl": data, "byteorder": byteorder.encode()}
    for key, storage in storages.items():
        raw = storage.raw()
        if byteorder == "big":
            raw = raw.astype(raw.dtype.newbyteorder(">"))
        members[f"data/{key}"] = raw.tobytes()
    members["version"] = b"3\n"
    return write_archive(path, members, prefix, compress)


def write_archive(
    path: Path, members: dict[str, bytes], prefix: str = "archive", compress: bool = False
) -> Path:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, payload in members.items():
            zf.writestr(f"{prefix}/{name}", payload)
    return path


def write_pickle_archive(path: Path, pickle_bytes: bytes) -> Path:
    """A torch-shaped archive whose data.pkl is exactly ``pickle_bytes`` (hostile tests)."""
    return write_archive(path, {"data.pkl": pickle_bytes, "byteorder": b"little"})


# -- hostile pickles, written opcode by opcode (for the bounds tests) --------------------------

PROTO2 = b"\x80\x02"


def _binput(index: int) -> bytes:
    return b"q" + bytes([index]) if index < 256 else b"r" + index.to_bytes(4, "little")


def _binget(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + index.to_bytes(4, "little")


def deep_tuple_key(depth: int) -> bytes:
    """{((((),),),...): 1}: hashing the key recursed ``depth`` deep in C (a crash at 200,000)."""
    return PROTO2 + b"}" + b")" + b"\x85" * depth + b"K\x01s."


def deep_dict(depth: int) -> bytes:
    """{"a": {"a": ...}} the way pickle writes one-item dicts (SETITEM, no marks)."""
    return PROTO2 + b"}X\x01\x00\x00\x00a" * depth + b"}" + b"s" * depth + b"."


def deep_marked_lists(depth: int) -> bytes:
    """[[[...]]] built with MARK ... LIST: the marks nest ``depth`` deep."""
    return PROTO2 + b"(" * depth + b"]" + b"l" * depth + b"."


def memo_far_ahead(index: int = 2**27, text: bool = False) -> bytes:
    """A memo entry stored at ``index`` first: the C unpickler sized its memo array by it."""
    put = f"p{index}\n".encode() if text else b"r" + index.to_bytes(4, "little")
    return PROTO2 + b"]" + put + b"."


def doubling_tuples(levels: int = 40) -> bytes:
    """t = (t, t), ``levels`` times, as a dict key: 2**levels values to hash from ~100 bytes."""
    return PROTO2 + b"})" + b"2\x86" * levels + b"K\x01s."


def late_doubling_lists(levels: int = 40) -> bytes:
    """Lists L0..Ln made empty first, then L_i.append(L_i+1) twice: the same 2**levels blow-up,
    but each list is filled after it was placed in another (what a scan of the opcodes misses)."""
    out = [PROTO2]
    for i in range(levels + 1):
        out.append(b"]" + _binput(i) + b"0")
    for i in range(levels):
        out.append(_binget(i) + _binget(i + 1) + b"a" + _binget(i + 1) + b"a0")
    out.append(_binget(0) + b".")
    return b"".join(out)


def late_deep_chain(depth: int = 300) -> bytes:
    """[[[...]]] ``depth`` deep, each list filled after it was nested (no marks, no scan depth)."""
    out = [PROTO2]
    for i in range(depth + 1):
        out.append(b"]" + _binput(i) + b"0")
    for i in range(depth):
        out.append(_binget(i) + _binget(i + 1) + b"a0")
    out.append(_binget(0) + b".")
    return b"".join(out)


def self_containing_list() -> bytes:
    """L = []; L.append(L)."""
    return PROTO2 + b"]q\x00h\x00a."


def many_operations(n: int) -> bytes:
    """``n`` pairs of NONE, POP: a small file of many operations."""
    return PROTO2 + b"N0" * n + b"N."


def huge_integer(n_bytes: int) -> bytes:
    return PROTO2 + b"\x8b" + n_bytes.to_bytes(4, "little") + b"\x01" * n_bytes + b"."


# -- zip surgery ------------------------------------------------------------------------------


def patch_central_entry(data: bytes, name: str, **fields: int) -> bytes:
    """Rewrite fields of ``name``'s central directory entry: flags, method, offset, size."""
    offsets = {"flags": (8, "<H"), "method": (10, "<H"), "size": (24, "<I"), "offset": (42, "<I")}
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len = int.from_bytes(out[at + 28 : at + 30], "little")
        if out[at + 46 : at + 46 + name_len] == name.encode():
            for field_name, value in fields.items():
                pos, fmt = offsets[field_name]
                struct.pack_into(fmt, out, at + pos, value)
            return bytes(out)
        at = out.find(b"PK\x01\x02", at + 46)
    raise KeyError(name)


def local_header_offset(data: bytes, name: str) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.getinfo(name).header_offset


def zeros_deflated(megabytes: int) -> tuple[bytes, int]:
    """``megabytes`` MB of zeros as a raw deflate stream (about 1 KB per MB) and their CRC-32.

    After a full flush a deflate block does not refer back, so one compressed megabyte can be
    repeated: building a 600 MB bomb takes milliseconds instead of compressing 600 MB.
    """
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    return block * megabytes + deflate.flush(), crc


def write_raw_zip(path: Path, members: dict[str, bytes | tuple[bytes, int, int]]) -> Path:
    """A zip written field by field: a value is stored bytes, or (deflate stream, CRC-32,
    uncompressed size) for a member whose compressed form is already made."""
    local, central = bytearray(), bytearray()
    for name, value in members.items():
        if isinstance(value, tuple):
            payload, crc, size, method = *value, zipfile.ZIP_DEFLATED
        else:
            payload, crc, size, method = value, zlib.crc32(value), len(value), zipfile.ZIP_STORED
        raw_name, offset = name.encode(), len(local)
        common = (20, 0, method, 0, 33, crc, len(payload), size, len(raw_name))
        local += struct.pack("<4s5H3I2H", b"PK\x03\x04", *common, 0) + raw_name + payload
        central += struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, *common, 0, 0, 0, 0, 0, offset)
        central += raw_name
    n = len(members)
    end = struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, n, n, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path
