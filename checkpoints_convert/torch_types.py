"""The names a torch checkpoint's pickle may use, and the harmless stand-ins they resolve to.

Nothing here imports torch or numpy's unpickling helpers: every allowed name maps to an object
of this module that checks its arguments and builds a plain value. Stand-ins are sealed
(pickle's BUILD opcode cannot rewrite them) and are instances, never classes, so a pickle
cannot set attributes on a class shared by later conversions.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CheckpointError, ForbiddenGlobalError
from .pickle_guard import clip, describe

# torch dtype name -> (bytes per element, numpy dtype name; None where numpy has no such type).
# bfloat16 is read as raw 16-bit words and widened to float32 exactly on ``.numpy()``.
TORCH_DTYPES: dict[str, tuple[int, str | None]] = {
    "float64": (8, "float64"),
    "float32": (4, "float32"),
    "float16": (2, "float16"),
    "bfloat16": (2, "uint16"),
    "int64": (8, "int64"),
    "int32": (4, "int32"),
    "int16": (2, "int16"),
    "int8": (1, "int8"),
    "uint8": (1, "uint8"),
    "bool": (1, "bool"),
    "uint16": (2, "uint16"),
    "uint32": (4, "uint32"),
    "uint64": (8, "uint64"),
    "complex64": (8, "complex64"),
    "complex128": (16, "complex128"),
    "complex32": (4, None),
    "float8_e4m3fn": (1, None),
    "float8_e5m2": (1, None),
    "float8_e4m3fnuz": (1, None),
    "float8_e5m2fnuz": (1, None),
    "float8_e8m0fnu": (1, None),
    "float4_e2m1fn_x2": (1, None),
    "bits8": (1, None),
    "bits16": (2, None),
    "bits1x8": (1, None),
    "bits2x4": (1, None),
    "bits4x2": (1, None),
}

# Storage class named in a (torch._utils._rebuild_tensor_v2) pickle -> torch dtype name.
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
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",  # torch >= 2.1 for newer dtypes: bytes, typed by the tensor
}

# Names torch.load accepts but this reader does not rebuild: refused, with what they are.
UNSUPPORTED_TORCH = {
    ("torch._utils", "_rebuild_qtensor"): "a quantized tensor",
    ("torch._utils", "_rebuild_sparse_tensor"): "a sparse tensor",
    ("torch._utils", "_rebuild_nested_tensor"): "a nested tensor",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "a meta tensor (no data)",
    ("torch._utils", "_rebuild_wrapper_subclass"): "a tensor subclass",
    ("torch._utils", "_rebuild_parameter_with_state"): "a parameter with extra state",
    ("torch._tensor", "_rebuild_from_type_v2"): "a tensor subclass",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "a device tensor",
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): "a device tensor",
}


class Sealed:
    """Refuses pickle's BUILD opcode, which could otherwise rewrite a bounds-checked value.

    (A frozen dataclass with slots=True gets a __setstate__ that sets any field: no slots.)
    """

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"the pickle tries to rewrite a {type(self).__name__}")


@dataclass(frozen=True)
class StorageType(Sealed):
    """Stand-in for ``torch.FloatStorage`` and friends: only a dtype name."""

    dtype: str


@dataclass(frozen=True)
class TorchDtype(Sealed):
    """Stand-in for ``torch.uint16`` and friends, which _rebuild_tensor_v3 receives."""

    name: str


# -- numpy scalars (a history logged with np.float64 values) ----------------------------------

_NUMPY_SCALARS = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


class NumpyDtype:
    """What ``numpy.dtype(name, align, copy)`` builds, for plain numbers only.

    numpy then applies a BUILD with its state ``(version, byteorder, ...)``: accepted once,
    and only the byte order is kept.
    """

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if not isinstance(name, str) or name not in _NUMPY_SCALARS:
            raise pickle.UnpicklingError(
                "the pickle holds a numpy value of a type this reader does not rebuild "
                "(only numbers are)"
            )
        self.name, self.byteorder, self._built = name, "=", False

    def __setstate__(self, state: Any) -> None:
        if self._built or not isinstance(state, tuple) or not 8 <= len(state) <= 9:
            raise pickle.UnpicklingError("the pickle holds a malformed numpy dtype")
        if state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError("the pickle holds a numpy dtype of unknown byte order")
        self.byteorder, self._built = state[1], True

    def numpy(self) -> np.dtype:
        return np.dtype(self.name).newbyteorder("=" if self.byteorder == "|" else self.byteorder)


class _Factory(Sealed):
    """A sealed callable: what find_class hands to the unpickler instead of a class."""

    def __init__(self, build):
        self._build = build

    def __call__(self, *args):
        return self._build(*args)


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """``numpy.core.multiarray.scalar(dtype, bytes)`` as a plain Python number."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("the pickle holds a malformed numpy scalar")
    np_dtype = dtype.numpy()
    if len(data) != np_dtype.itemsize:
        raise pickle.UnpicklingError("the pickle holds a numpy scalar of the wrong size")
    return np.frombuffer(data, np_dtype)[0].item()


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    """``_codecs.encode(text, 'latin1')``: how pickle protocol 2 writes a bytes object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("the pickle calls _codecs.encode with other than latin1 text")
    return text.encode("latin-1")


NUMPY_GLOBALS = {
    ("numpy", "dtype"): _Factory(NumpyDtype),
    ("numpy.core.multiarray", "scalar"): _Factory(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _Factory(_numpy_scalar),
    ("_codecs", "encode"): _Factory(_latin1_bytes),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only build containers, numbers, strings and the archive's
    TensorRefs: every global resolves through ``allowed``; storages through ``archive``."""

    def __init__(self, file, archive):
        super().__init__(file)
        self.archive = archive
        self.allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): archive.rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v3"): archive.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): archive.rebuild_parameter,
            **NUMPY_GLOBALS,
        }
        for name, dtype in STORAGE_DTYPES.items():
            self.allowed[("torch", name)] = StorageType(dtype)
        self.allowed[("torch.storage", "UntypedStorage")] = StorageType("uint8")
        for name in TORCH_DTYPES:
            self.allowed[("torch", name)] = TorchDtype(name)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            pass
        what = UNSUPPORTED_TORCH.get((module, name))
        if what is None and module.startswith("numpy"):
            what = "a numpy array or object"
        shown = clip(f"{module}.{name}", 100)
        if what is not None:  # a legitimate torch file, just one this reader cannot convert
            raise ForbiddenGlobalError(
                f"{self.archive.path}: the checkpoint holds {what} ({shown}), which this "
                "converter does not read; nothing was executed"
            )
        raise ForbiddenGlobalError(
            f"{self.archive.path}: refused: the pickle asks for {shown}, which a "
            "checkpoint never needs (allowed: tensors, storages, OrderedDict, numbers); "
            "nothing was executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.archive.path}: unknown persistent id {describe(pid)}")
        _, storage_type, key, location, numel = pid
        return self.archive.storage(key, storage_type, location, numel)
