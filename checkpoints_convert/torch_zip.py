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

LEGACY_HINT = "re-save it with torch >= 1.6: torch.save(torch.load(old), new)"

# torch's legacy (pre-1.6) format begins with a pickled magic number, protocol 2 long.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
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

# Storage class name in the pickle -> numpy dtype of its elements. bfloat16 has no numpy type:
# its raw 16-bit words are read as uint16 and widened to float32 (exactly) on ``.numpy()``.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class CheckpointError(ValueError):
    """A file that cannot be read or converted; the message is one line, meant for the user."""


class ForbiddenGlobalError(CheckpointError):
    """The pickle names a global outside the allow-list; nothing was called."""


class _Sealed:
    """Refuses pickle's BUILD opcode, which could otherwise rewrite a bounds-checked view.

    (A frozen dataclass with slots=True gets a __setstate__ that sets any field: no slots.)
    """

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"the pickle tries to rewrite a {type(self).__name__}")


@dataclass(frozen=True)
class StorageType(_Sealed):
    """Stand-in for ``torch.FloatStorage`` and friends: only a dtype name."""

    dtype: str


@dataclass(frozen=True)
class Storage(_Sealed):
    """One ``data/<key>`` member of the archive: ``numel`` elements of ``dtype``."""

    key: str
    dtype: str
    location: str  # the device it was saved from ("cpu", "cuda:0", "mps"); bytes are the same
    numel: int

    @property
    def itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TensorRef(_Sealed):
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

    def numpy(self) -> np.ndarray:
        """The values as a numpy array (bfloat16 widened to float32).

        A contiguous little-endian tensor of a stored member comes back as a read-only view of
        the memory-mapped file: no copy is made until the caller makes one.
        """
        base = self.archive.storage_array(self.storage)
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
        return f"TensorRef({self.dtype}, shape={self.shape}, storage={self.storage.key!r})"


def read_checkpoint(path: str | Path) -> Any:
    """Unpickle the checkpoint at ``path``; its tensors are TensorRef objects.

    Raises CheckpointError (ForbiddenGlobalError for a refused global) with a one-line message.
    The returned tensors keep the archive open until they are garbage-collected.
    """
    path = Path(path)
    archive = _Archive(path)
    return archive.load()


class _Archive:
    """An opened torch zip checkpoint: its members, a memory map, and the storages it holds."""

    def __init__(self, path: Path):
        self.path = path
        _check_is_zip(path)
        try:
            self.zip = zipfile.ZipFile(path)
            self.members = {info.filename: info for info in self.zip.infolist()}
            self.file_size = path.stat().st_size
        except _ZIP_ERRORS as err:
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({err})") from None
        self.prefix = self._find_prefix()
        self.byteorder = self._read_byteorder()
        self._map: np.memmap | None = None
        self._storages: dict[str, Storage] = {}
        self._verified: set[str] = set()

    def _find_prefix(self) -> str:
        if any("/code/" in name for name in self.members):
            raise CheckpointError(
                f"{self.path}: this is a TorchScript archive (torch.jit.save), not a checkpoint"
            )
        pickles = [n for n in self.members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{self.path}: a zip archive but not a torch checkpoint (expected one "
                f"<name>/data.pkl, found {len(pickles)})"
            )
        return pickles[0][: -len("data.pkl")]

    def _read_byteorder(self) -> str:
        name = self.prefix + "byteorder"
        if name not in self.members:
            return "little"  # written only since torch 1.10, always little before
        order = self._read_member(name).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: unknown byteorder {order!r}")
        return order

    def _read_member(self, name: str) -> bytes:
        try:
            return self.zip.read(name)  # zipfile checks the CRC of what it reads
        except _ZIP_ERRORS as err:
            raise CheckpointError(f"{self.path}: corrupt member {name} ({err})") from None

    def load(self) -> Any:
        data = self._read_member(self.prefix + "data.pkl")
        unpickler = _RestrictedUnpickler(io.BytesIO(data), self)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure on untrusted bytes means "corrupt"
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{self.path}: corrupt data.pkl ({detail})") from None

    # -- storages -----------------------------------------------------------------------------

    def storage(self, key: Any, storage_type: Any, location: Any, numel: Any) -> Storage:
        """The storage a persistent id names, checked against the archive's member."""
        if not isinstance(storage_type, StorageType):
            raise CheckpointError(f"{self.path}: storage {key!r} has no storage type")
        if not isinstance(key, str) or not isinstance(location, str):
            raise CheckpointError(f"{self.path}: malformed storage reference {key!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"{self.path}: storage {key} has a bad size {numel!r}")
        storage = Storage(key, storage_type.dtype, location, numel)
        known = self._storages.setdefault(key, storage)
        if (known.dtype, known.numel) != (storage.dtype, storage.numel):
            raise CheckpointError(f"{self.path}: storage {key} is described twice, differently")
        info = self.members.get(self.prefix + "data/" + key)
        if info is None:
            raise CheckpointError(f"{self.path}: storage data/{key} is missing from the archive")
        if info.file_size != numel * storage.itemsize:
            raise CheckpointError(
                f"{self.path}: storage data/{key} holds {info.file_size} bytes, the pickle "
                f"says {numel} x {storage.dtype} ({numel * storage.itemsize} bytes)"
            )
        return known

    def storage_array(self, storage: Storage) -> np.ndarray:
        """All elements of a storage as a 1-d numpy array (bfloat16 as raw uint16)."""
        info = self.members[self.prefix + "data/" + storage.key]
        raw_dtype = np.dtype("uint16" if storage.dtype == "bfloat16" else storage.dtype)
        if self.byteorder == "big":
            raw_dtype = raw_dtype.newbyteorder(">")
        if info.compress_type == zipfile.ZIP_STORED:
            raw = self._mapped_member(info)
        else:
            raw = self._streamed_member(info)
        return raw.view(raw_dtype)

    def _mapped_member(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A stored member's bytes as a view of the memory-mapped archive (no copy)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_offset(info)
        raw = self._map[start : start + info.file_size]
        if info.filename not in self._verified:
            # Reading through the map bypasses zipfile's CRC check, so check it here: a flipped
            # byte must be an error, not a silently different weight.
            crc = 0
            for chunk in range(0, info.file_size, _CRC_CHUNK):
                crc = zlib.crc32(raw[chunk : chunk + _CRC_CHUNK], crc)
            if crc != info.CRC:
                raise CheckpointError(f"{self.path}: {info.filename} is corrupt (bad CRC-32)")
            self._verified.add(info.filename)
        return raw

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        header = bytes(self._map[info.header_offset : info.header_offset + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: corrupt zip header for {info.filename}")
        fields = _LOCAL_HEADER.unpack(header)
        name_len, extra_len = fields[-2], fields[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.file_size:
            raise CheckpointError(f"{self.path}: {info.filename} runs past the end of the file")
        return start

    def _streamed_member(self, info: zipfile.ZipInfo) -> np.ndarray:
        """A compressed member decompressed into one preallocated buffer."""
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
            raise CheckpointError(f"{self.path}: corrupt member {info.filename} ({err})") from None
        if filled != info.file_size:
            raise CheckpointError(f"{self.path}: {info.filename} is truncated")
        return out

    # -- tensors ------------------------------------------------------------------------------

    def rebuild_tensor(
        self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None
    ) -> TensorRef:
        """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view, bounds-checked."""
        if not isinstance(storage, Storage):
            raise CheckpointError(f"{self.path}: a tensor without a storage")
        shape, strides = _int_tuple(size), _int_tuple(stride)
        if (
            shape is None
            or strides is None
            or len(shape) != len(strides)
            or not isinstance(offset, int)
        ):
            raise CheckpointError(f"{self.path}: malformed tensor in storage {storage.key}")
        if offset < 0 or any(n < 0 for n in shape) or any(s < 0 for s in strides):
            raise CheckpointError(f"{self.path}: negative size or stride in storage {storage.key}")
        size = 1
        for n in shape:
            size *= n
        if size > storage.numel:
            # Only a zero stride makes a view bigger than its data; a state dict never holds
            # one, and reading it would allocate without bound.
            raise CheckpointError(
                f"{self.path}: a broadcast tensor {shape} larger than its storage {storage.key}"
            )
        last = _last_element(offset, shape, strides)
        if last >= storage.numel:
            raise CheckpointError(
                f"{self.path}: a tensor {shape} at offset {offset} reaches element {last} "
                f"of storage {storage.key}, which has {storage.numel}"
            )
        return TensorRef(self, storage, offset, shape, strides)

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


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return None
    return value


def _check_is_zip(path: Path) -> None:
    """Tell a missing file, the legacy format and plain garbage apart, before zipfile does."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}") from None
    if not head:
        raise CheckpointError(f"{path} is empty")
    if head.startswith(_LEGACY_MAGIC):
        raise CheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch format is not supported; {LEGACY_HINT}"
        )
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{path}: not a torch checkpoint (not a zip archive)")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build containers, numbers, strings and TensorRefs."""

    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self.archive = archive
        self.allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): archive.rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): archive.rebuild_parameter,
        }
        for name, dtype in STORAGE_DTYPES.items():
            self.allowed[("torch", name)] = StorageType(dtype)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"{self.archive.path}: refused: the pickle asks for {module}.{name}, which a "
                "checkpoint never needs (allowed: tensors, storages, OrderedDict); "
                "nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.archive.path}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        return self.archive.storage(key, storage_type, location, numel)
