"""Read ``torch.save`` checkpoints (the zip format of torch >= 1.6) without importing torch.

A torch checkpoint is a zip archive whose members all sit under one top folder:
    <top>/data.pkl       the pickled object (dicts, lists, numbers, tensors)
    <top>/data/<key>     the raw bytes of one storage, referenced from the pickle
    <top>/byteorder      "little" or "big" (absent before torch 1.10: little)
In the pickle a tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
and a storage is a persistent id ``("storage", torch.FloatStorage, key, location, numel)``.

Pickle runs whatever callable the file names, so the unpickler here resolves names through an
allow-list of stand-ins defined in this module: the real torch or numpy functions are never
looked up. Anything else is refused before it can be called (ForbiddenGlobalError).
Tensors come back as lazy ``TensorRef`` objects; their bytes are read only on ``.numpy()``,
straight from a memory map of the archive (or streamed for compressed members), so a large
checkpoint is never held in memory twice.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, ForbiddenGlobalError
from .pickle_guard import PickleLimitError, check_structure, clip, describe, scan_pickle
from .torch_types import TORCH_DTYPES, RestrictedUnpickler, Sealed, StorageType, TorchDtype
from .zip_guard import (
    check_directory_size,
    check_is_zip,
    check_members,
    common_folder,
    open_regular,
    read_small_member,
)

__all__ = ["CheckpointError", "ForbiddenGlobalError", "TensorRef", "read_checkpoint"]

MAX_PICKLE_BYTES = 64 << 20  # data.pkl holds no tensor data: a long history is a few MB
MAX_DIMS = 64  # torch's own limit on a tensor's number of dimensions
_MAX_INDEX = 1 << 62  # sizes, offsets and strides beyond this are not a real tensor

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_CRC_CHUNK = 1 << 24
# What zipfile raises on a damaged archive (a bad header, a bad CRC, a method it lacks, ...).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    struct.error,
    zlib.error,
)


@dataclass(frozen=True)
class Storage(Sealed):
    """One ``data/<key>`` member of the archive: ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    location: str  # the device it was saved from ("cpu", "cuda:0", "mps"); bytes are the same
    numel: int

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.dtype][0]


@dataclass(frozen=True)
class TensorRef(Sealed):
    """A tensor of the checkpoint, not yet read: a strided view into one storage."""

    archive: _Archive
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def same_data(self, other: TensorRef) -> bool:
        """True when both name the same elements of the same storage (a tied weight)."""
        return (self.storage.key, self.offset, self.shape, self.stride) == (
            other.storage.key,
            other.offset,
            other.shape,
            other.stride,
        )

    def numpy(self, byteorder: str | None = None) -> np.ndarray:
        """The values as a numpy array (bfloat16 widened to float32).

        A contiguous little-endian tensor of a stored member comes back as a read-only view of
        the memory-mapped file: no copy is made until the caller makes one. ``byteorder``
        overrides the archive's record (to see what the bytes would mean the other way).
        """
        if TORCH_DTYPES[self.dtype][1] is None:
            raise CheckpointError(
                f"{self.archive.path}: a {self.dtype} tensor cannot be read without torch "
                f"(numpy has no {self.dtype} type)"
            )
        base = self.archive.storage_array(self.storage, byteorder or self.archive.byteorder)
        if _last_element(self.offset, self.shape, self.stride) >= base.size:
            # as_strided does not check bounds; checked when built, checked again before use.
            raise CheckpointError(f"{self.archive.path}: a tensor outside its storage")
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        if not view.flags.c_contiguous:
            view = view.copy()  # (np.ascontiguousarray would turn a 0-d tensor into 1-d)
        if self.dtype == "bfloat16":
            # bfloat16 is the top half of a float32: shifting the bits up is exact.
            return (view.astype(np.uint32) << 16).view(np.float32)
        if not view.dtype.isnative:
            return view.astype(view.dtype.newbyteorder("="))
        return view

    def __repr__(self) -> str:
        key = clip(self.storage.key, 40)
        return f"TensorRef({self.dtype}, shape={self.shape}, storage={key})"


def read_checkpoint(path: str | Path) -> Any:
    """Unpickle the checkpoint at ``path``; its tensors are TensorRef objects.

    Raises CheckpointError (ForbiddenGlobalError for a refused global) with a one-line message.
    The returned tensors keep the archive open until they are garbage-collected.
    """
    archive = _Archive(Path(path))
    try:
        return archive.load()
    except BaseException:
        archive.file.close()  # (on success the tensors keep it open)
        raise


class _Archive:
    """An opened torch zip checkpoint: its members, a memory map, and the storages it holds."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open_regular(path)
        try:
            self._open(path)
        except BaseException:
            self.file.close()
            raise
        self._map: np.memmap | None = None
        self._storages: dict[str, Storage] = {}
        self._verified: set[str] = set()

    def __del__(self):
        file = getattr(self, "file", None)
        if file is not None:
            file.close()  # (a memory map keeps its own handle)

    def _open(self, path: Path) -> None:
        self.file_size = os.fstat(self.file.fileno()).st_size
        check_is_zip(self.file, path)
        check_directory_size(self.file, self.file_size, path)
        try:
            self.zip = zipfile.ZipFile(self.file)
            infos = self.zip.infolist()
        except _ZIP_ERRORS as err:
            reason = clip(str(err))
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({reason})") from None
        self.members = check_members(infos, path, self.file_size)
        self.prefix = self._find_prefix()
        self.byteorder = self._read_byteorder()

    def _find_prefix(self) -> str:
        pickles = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) == 1 and any(n.startswith(pickles[0][:-8] + "code/") for n in self.members):
            raise CheckpointError(
                f"{self.path}: this is a TorchScript archive (torch.jit.save), not a checkpoint"
            )
        if len(pickles) != 1:
            raise CheckpointError(
                f"{self.path}: a zip archive but not a torch checkpoint (expected one "
                f"<name>/data.pkl, found {len(pickles)})"
            )
        prefix = common_folder(self.members, self.path)
        if pickles[0] != prefix + "data.pkl":
            raise CheckpointError(f"{self.path}: a zip archive but not a torch checkpoint")
        return prefix

    def _read_byteorder(self) -> str:
        info = self.members.get(self.prefix + "byteorder")
        if info is None:
            return "little"  # written only since torch 1.10, always little before
        raw = read_small_member(self.zip, info, 16, self.path)
        order = raw.decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: unknown byteorder {clip(order)}")
        return order

    def load(self) -> Any:
        info = self.members[self.prefix + "data.pkl"]
        data = read_small_member(self.zip, info, MAX_PICKLE_BYTES, self.path)
        try:
            scan_pickle(data)  # the limits, checked before the unpickler allocates anything
            root = RestrictedUnpickler(io.BytesIO(data), self).load()
            check_structure(root)  # exact depth and size of what was built
            return root
        except CheckpointError:
            raise
        except PickleLimitError as err:
            raise CheckpointError(f"{self.path}: refused: {err}") from None
        except Exception as err:  # noqa: BLE001 - any failure on untrusted bytes means "corrupt"
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{self.path}: corrupt data.pkl ({clip(detail)})") from None

    # -- storages -----------------------------------------------------------------------------

    def storage(self, key: Any, storage_type: Any, location: Any, numel: Any) -> Storage:
        """The storage a persistent id names, checked against the archive's member."""
        if not isinstance(storage_type, StorageType):
            raise CheckpointError(f"{self.path}: storage {describe(key)} has no storage type")
        if not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointError(f"{self.path}: malformed storage reference {describe(key)}")
        if not _is_index(numel):
            raise CheckpointError(f"{self.path}: storage {clip(key)} has a bad size")
        storage = Storage(key, storage_type.dtype, clip(location, 40), numel)
        known = self._storages.setdefault(key, storage)
        if (known.dtype, known.numel) != (storage.dtype, storage.numel):
            raise CheckpointError(
                f"{self.path}: storage {clip(key)} is described twice, differently"
            )
        info = self.members.get(self.prefix + "data/" + key)
        if info is None:
            raise CheckpointError(
                f"{self.path}: storage data/{clip(key)} is missing from the archive"
            )
        if info.file_size != numel * storage.itemsize:
            raise CheckpointError(
                f"{self.path}: storage data/{clip(key)} holds {info.file_size} bytes, the "
                f"pickle says {numel} x {storage.dtype} ({numel * storage.itemsize} bytes)"
            )
        return known

    def storage_array(self, storage: Storage, byteorder: str) -> np.ndarray:
        """All elements of a storage as a 1-d numpy array (bfloat16 as raw uint16)."""
        info = self.members[self.prefix + "data/" + storage.key]
        raw_dtype = np.dtype(TORCH_DTYPES[storage.dtype][1])
        if byteorder == "big":
            raw_dtype = raw_dtype.newbyteorder(">")
        if info.compress_type == zipfile.ZIP_STORED:
            raw = self._mapped_member(info)
        else:
            raw = self._streamed_member(info)
        return raw.view(raw_dtype)

    def _mapped_member(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A stored member's bytes as a view of the memory-mapped archive (no copy)."""
        if self._map is None:
            self._map = np.memmap(self.file, dtype=np.uint8, mode="r")
        start = self._data_offset(info)
        raw = self._map[start : start + info.file_size]
        if info.filename not in self._verified:
            # Reading through the map bypasses zipfile's CRC check, so check it here: a flipped
            # byte must be an error, not a silently different weight.
            crc = 0
            for chunk in range(0, info.file_size, _CRC_CHUNK):
                crc = zlib.crc32(raw[chunk : chunk + _CRC_CHUNK], crc)
            if crc != info.CRC:
                name = clip(info.filename)
                raise CheckpointError(f"{self.path}: {name} is corrupt (bad CRC-32)")
            self._verified.add(info.filename)
        return raw

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        header = bytes(self._map[info.header_offset : info.header_offset + _LOCAL_HEADER.size])
        name = clip(info.filename)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip header for {name}")
        fields = _LOCAL_HEADER.unpack(header)
        name_len, extra_len = fields[-2], fields[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise CheckpointError(f"{self.path}: {name} runs past the end of the file")
        return start

    def _streamed_member(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A compressed member decompressed into one preallocated buffer (size capped when the
        archive was opened: see zip_guard.MAX_INFLATED_BYTES)."""
        out = np.empty(info.file_size, dtype=np.uint8)
        try:
            with self.zip.open(info) as stream:
                filled = 0
                view = memoryview(out)
                while filled < info.file_size:
                    n = stream.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
                stream.read(1)  # reaching the end makes zipfile check the CRC
        except _ZIP_ERRORS as err:
            name, reason = clip(info.filename), clip(str(err))
            raise CheckpointError(f"{self.path}: corrupt member {name} ({reason})") from None
        if filled != info.file_size:
            raise CheckpointError(f"{self.path}: {clip(info.filename)} is truncated")
        return out

    # -- tensors ------------------------------------------------------------------------------

    def rebuild_tensor(
        self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
    ) -> TensorRef:
        """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view, bounds-checked."""
        if not isinstance(storage, Storage):
            raise CheckpointError(f"{self.path}: a tensor without a storage")
        shape, strides = _index_tuple(size), _index_tuple(stride)
        if shape is None or strides is None or len(shape) != len(strides) or not _is_index(offset):
            raise CheckpointError(
                f"{self.path}: malformed tensor in storage {clip(storage.key)} (sizes, "
                f"strides and offset must be up to {MAX_DIMS} non-negative integers)"
            )
        key = clip(storage.key, 40)
        elements = 1
        for n in shape:
            elements *= n
        if elements > storage.numel:
            # Only a zero stride makes a view bigger than its data; a state dict never holds
            # one, and reading it would allocate without bound.
            raise CheckpointError(
                f"{self.path}: a broadcast tensor {shape} larger than its storage {key}"
            )
        last = _last_element(offset, shape, strides)
        if last >= storage.numel:
            raise CheckpointError(
                f"{self.path}: a tensor {shape} at offset {offset} reaches element {last} "
                f"of storage {key}, which has {storage.numel}"
            )
        return TensorRef(self, storage, offset, shape, strides)

    def rebuild_tensor_v3(
        self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None
    ) -> TensorRef:
        """Stand-in for ``torch._utils._rebuild_tensor_v3`` (torch >= 2.1, for dtypes such as
        uint16 and float8): an untyped (byte) storage, typed by the tensor's ``dtype``."""
        if not isinstance(storage, Storage) or storage.dtype != "uint8":
            raise CheckpointError(f"{self.path}: a tensor without an untyped storage")
        if not isinstance(dtype, TorchDtype):
            raise CheckpointError(f"{self.path}: a tensor without a dtype")
        itemsize = TORCH_DTYPES[dtype.name][0]
        if storage.numel % itemsize:
            raise CheckpointError(
                f"{self.path}: storage {clip(storage.key)} is not a whole number of "
                f"{dtype.name} elements"
            )
        typed = Storage(storage.key, dtype.name, storage.location, storage.numel // itemsize)
        return self.rebuild_tensor(typed, offset, size, stride)

    def rebuild_parameter(self, data, requires_grad=False, hooks=None) -> TensorRef:
        """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its tensor."""
        if not isinstance(data, TensorRef):
            raise CheckpointError(f"{self.path}: a parameter without a tensor")
        return data


def _last_element(offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """The highest storage index a view touches (-1 for an empty tensor, which touches none)."""
    if not all(shape):
        return -1
    return offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


def _is_index(value: Any) -> bool:
    return type(value) is int and 0 <= value < _MAX_INDEX


def _index_tuple(value: Any) -> tuple[int, ...] | None:
    """A tuple of sizes or strides; None unless all are non-negative integers of sane size."""
    if not isinstance(value, tuple) or len(value) > MAX_DIMS or not all(map(_is_index, value)):
        return None
    return value
