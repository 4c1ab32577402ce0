"""Runs a kernel :class:`~.launch.Launch` on the CPU: its Metal body compiled as C++ with g++
against ``metal_shim.h`` and executed over the whole grid by ``emulate_runtime.cpp``.

Two builds of every body:
  - ``float32``: the types MLX would use, with warnings as errors, implicit float -> double
    promotion an error (a Metal GPU has no double), and no FMA contraction;
  - ``float64``: the same body with T = double and double buffers (an emulator-only build, which
    Metal cannot run), so that finite differences of the kernel's own forward are precise enough
    to check its backward.
Besides, the exact text MLX would hand the Metal compiler (:func:`.signature.mlx_source`) is
compiled with ``-fsyntax-only`` against the shim. Shared libraries are cached, keyed by a hash of
everything that goes into them, under ``$KSSM_CACHE/emulate`` (default ``~/.cache/mlx-kssm``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import signature
from .launch import Launch

HERE = Path(__file__).resolve().parent
SHIM_FILES = ("metal_shim.h", "emulate_abi.h", "emulate_runtime.cpp")
COMMON_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off"]
STRICT = ["-Wall", "-Wextra", "-Werror", "-Wno-attributes", "-Wno-unused-parameter"]
PRECISIONS = {
    "float32": STRICT + ["-Wdouble-promotion", "-Wfloat-conversion"],
    "float64": STRICT + ["-DKSSM_EMULATE_FP64"],
}
NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64}


class EmulationError(RuntimeError):
    """A kernel that failed to compile or broke a rule of the model while running."""


def cache_dir() -> Path:
    root = Path(os.environ.get("KSSM_CACHE", Path.home() / ".cache" / "mlx-kssm"))
    path = root / "emulate"
    path.mkdir(parents=True, exist_ok=True)
    return path


def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise EmulationError(f"no C++ compiler: {cxx} not found (install g++ or set CXX)")
    return cxx


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    for name in SHIM_FILES:
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:20]


def _compile(args: list[str], output: Path, what: str) -> None:
    """Runs the compiler into a temporary name and renames it (concurrent runs are safe)."""
    fd, tmp = tempfile.mkstemp(dir=output.parent, suffix=output.suffix)
    os.close(fd)
    try:
        done = subprocess.run([*args, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise EmulationError(f"{what} does not compile:\n{done.stderr.strip()[:4000]}")
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _runtime_object() -> Path:
    out = cache_dir() / f"runtime-{_digest('runtime', *COMMON_FLAGS)}.o"
    if not out.exists():
        args = [compiler(), *COMMON_FLAGS, "-Wall", "-Werror", "-c"]
        _compile([*args, str(HERE / "emulate_runtime.cpp")], out, "emulate_runtime.cpp")
    return out


def as_precision(launch: Launch, precision: str) -> Launch:
    """``launch`` with float inputs, outputs and template types in ``precision``."""
    dtype = NUMPY_DTYPES[precision]
    mx_dtype = mx.float32 if precision == "float32" else mx.float64

    def floaty(d) -> bool:
        return signature.type_name(d) in ("float", "double")

    inputs = [np.asarray(a) for a in launch.inputs]
    inputs = [a.astype(dtype) if floaty(a.dtype) else a for a in inputs]
    template = [
        (n, mx_dtype if isinstance(v, mx.Dtype) and floaty(v) else v) for n, v in launch.template
    ]
    dtypes = [mx_dtype if floaty(d) else d for d in launch.output_dtypes]
    return Launch(
        launch.spec, inputs, template, launch.grid, launch.threadgroup, launch.output_shapes, dtypes
    )


def _identity(launch: Launch) -> tuple:
    metas = [signature.meta(a) for a in launch.inputs]
    outputs = [signature.type_name(d) for d in launch.output_dtypes]
    return metas, outputs


def kernel_name(launch: Launch) -> str:
    metas, outputs = _identity(launch)
    return signature.kernel_name(launch.spec.name, launch.template, metas, outputs)


def _key(launch: Launch) -> str:
    """The kernel name plus its source: MLX too rebuilds a name whose source changed."""
    return kernel_name(launch) + "#" + hashlib.sha256(launch.spec.source.encode()).hexdigest()[:16]


class Emulator:
    """Builds (once) and runs kernel launches; ``precision`` is "float32" or "float64"."""

    def __init__(self, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}")
        self.precision = precision
        self._kernels: dict[str, ctypes._CFuncPtr] = {}
        self._libraries: list[ctypes.CDLL] = []

    # -- building -------------------------------------------------------------------------
    def prepare(self, launches: list[Launch]) -> None:
        """Compiles every kernel the launches need, one unit per body, in parallel."""
        groups: dict[str, dict[str, Launch]] = {}
        for launch in launches:
            launch = as_precision(launch, self.precision)
            key = _key(launch)
            if key not in self._kernels:
                groups.setdefault(launch.spec.source_file, {})[key] = launch
        if not groups:
            return
        runtime = _runtime_object()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            built = list(pool.map(lambda g: self._build(g, runtime), groups.values()))
        for path, keys in built:
            library = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
            self._libraries.append(library)
            for tag, key in enumerate(keys):
                fn = getattr(library, f"kssm_launch_k{tag}")
                fn.restype = ctypes.c_int
                self._kernels[key] = (library, fn)

    def _build(self, launches: dict[str, Launch], runtime: Path) -> tuple[Path, list[str]]:
        keys = sorted(launches)
        unit = '#include "metal_shim.h"\n'
        for tag, key in enumerate(keys):
            launch = launches[key]
            metas, outputs = _identity(launch)
            spec = launch.spec
            unit += signature.emulation_unit(
                spec, spec.source, metas, outputs, launch.template, f"k{tag}"
            )
        flags = [*COMMON_FLAGS, *PRECISIONS[self.precision], "-fno-threadsafe-statics"]
        out = cache_dir() / f"kernel-{_digest(unit, *flags)}.so"
        if not out.exists():
            source = out.with_suffix(".cpp")
            source.write_text(unit)
            args = [compiler(), *flags, "-I", str(HERE), "-shared", str(source), str(runtime)]
            _compile(args, out, f"{launches[keys[0]].spec.source_file} ({self.precision} build)")
        return out, keys

    # -- running --------------------------------------------------------------------------
    def run(self, launch: Launch) -> list[np.ndarray]:
        """Outputs of ``launch`` as numpy arrays; raises EmulationError on any broken rule."""
        launch = as_precision(launch, self.precision)
        name, key = kernel_name(launch), _key(launch)
        if key not in self._kernels:
            self.prepare([launch])
        library, fn = self._kernels[key]
        metas, output_types = _identity(launch)
        params = signature.parameters(launch.spec, launch.spec.source, metas, output_types)
        keep, data, sizes, writers, outputs = [], [], [], [], []
        inputs = iter(np.ascontiguousarray(a) for a in launch.inputs)
        shapes = iter(launch.output_shapes)
        current = None
        for kind, _, _, _ in params:
            writer = None
            if kind == "input":
                current = next(inputs)
                buffer = current
            elif kind == "shape":
                buffer = np.asarray(current.shape, dtype=np.int32)
            elif kind == "ndim":
                buffer = np.asarray([current.ndim], dtype=np.int32)
            else:
                dtype = NUMPY_DTYPES[self.precision]
                buffer = np.empty(next(shapes), dtype=dtype)
                writer = np.full(buffer.size, -1, dtype=np.int32)
                outputs.append((buffer, writer))
            keep.append(buffer)
            data.append(buffer.ctypes.data)
            sizes.append(buffer.size)
            writers.append(
                writer.ctypes.data_as(ctypes.POINTER(ctypes.c_int)) if writer is not None else None
            )
        grid = [int(g) for g in launch.grid]
        group = [min(int(t), g) for t, g in zip(launch.threadgroup, grid, strict=True)]  # as MLX
        errors = fn(
            (ctypes.c_void_p * len(data))(*data),
            (ctypes.c_long * len(sizes))(*sizes),
            (ctypes.POINTER(ctypes.c_int) * len(writers))(*writers),
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*group),
        )
        messages = []
        if errors:
            library.kssm_error_message.restype = ctypes.c_char_p
            messages = [library.kssm_error_message(i).decode() for i in range(min(errors, 20))]
        for out_name, (buffer, writer) in zip(launch.spec.output_names, outputs, strict=True):
            missing = int((writer == -1).sum())
            if missing and not errors:
                messages.append(f"{missing} of {buffer.size} elements of {out_name} never written")
        if errors or messages:
            count = max(errors, len(messages))
            raise EmulationError(f"{name}: {count} error(s); first: " + "; ".join(messages[:3]))
        del keep
        return [buffer for buffer, _ in outputs]


def check_mlx_text(launches: list[Launch]) -> int:
    """Compiles (syntax only) the exact sources MLX would generate for ``launches``; returns
    how many distinct kernels that was."""
    texts = {}
    for launch in launches:
        metas, outputs = _identity(launch)
        name = kernel_name(launch)
        texts[name] = signature.mlx_source(launch.spec, metas, outputs, launch.template)
    unit = '#define KSSM_SYNTAX_ONLY\n#include "metal_shim.h"\n' + "\n".join(
        texts[k] for k in sorted(texts)
    )
    flags = [*COMMON_FLAGS, *PRECISIONS["float32"]]
    stamp = cache_dir() / f"mlx-text-{_digest(unit, *flags)}.ok"
    if not stamp.exists():
        source = stamp.with_suffix(".cpp")
        source.write_text(unit)
        _compile(
            [compiler(), *flags, "-I", str(HERE), "-fsyntax-only", str(source)], stamp, "MLX's text"
        )
        stamp.write_text("ok\n")
    return len(texts)
