"""Intel MKL under MLX's CPU matmuls on Linux x86_64, without a hand-set ``LD_PRELOAD``.

MLX's Linux CPU wheel calls the BLAS routines of a slow bundled reference BLAS. A library named
in ``LD_PRELOAD`` is searched for symbols first, so preloading Intel MKL (``pip install -e
'.[mkl]'`` puts ``libmkl_rt.so.3`` in ``sys.prefix/lib``) makes MLX's matmuls MKL's. The dynamic
loader reads ``LD_PRELOAD`` only when a program starts, so ``kssm`` re-executes itself once,
same process id and arguments, with ``LD_PRELOAD`` set, before any command runs.

Nothing happens when MKL is not installed, off Linux x86_64, when ``KSSM_MKL=0``, when
``LD_PRELOAD`` already names a BLAS, or in the re-executed process itself (``KSSM_MKL_PRELOADED``
holds the library it was asked to load). A library that is not a readable x86_64 ELF file is
never preloaded, nor one that fails a 1x1 ``cblas_sgemm`` in a throw-away process first (MKL
exits the whole process when its other libraries are missing); one that the loader still cannot
load is skipped by the loader itself (it prints a line and the program runs on the bundled BLAS).
``kssm`` says in one line which happened.

Only this module's standard-library imports run before the decision: it must not import MLX.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

OPT_OUT = "KSSM_MKL"  # KSSM_MKL=0 (or off / false / no): never preload
MARKER = "KSSM_MKL_PRELOADED"  # set in the re-executed process: the library it asked for
_OFF = {"0", "off", "false", "no"}
_BLAS_NAMES = ("mkl", "blas", "blis")  # LD_PRELOAD naming one of these: the user chose a BLAS
_LIBRARY = re.compile(r"libmkl_rt\.so\.(\d+)$")
_ELF_X86_64 = 62  # e_machine of an x86_64 ELF file


def preload_env(system: str, machine: str, environ: dict, library: str | None) -> dict | None:
    """The environment to re-execute with so that ``library`` is preloaded, or None to run as is.

    Pure: ``system`` / ``machine`` as ``platform.system()`` / ``platform.machine()`` give them,
    ``environ`` the current environment, ``library`` what :func:`find_mkl` found (or None)."""
    if system != "Linux" or machine not in ("x86_64", "AMD64") or library is None:
        return None
    if environ.get(OPT_OUT, "").strip().lower() in _OFF or environ.get(MARKER):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(name in Path(entry).name.lower() for entry in _entries(preload) for name in _BLAS_NAMES):
        return None
    # The user's own preloads stay first: they asked for them, and they win symbol lookups.
    return {**environ, "LD_PRELOAD": ":".join([*_entries(preload), library]), MARKER: library}


def _entries(preload: str) -> list[str]:
    """LD_PRELOAD's entries: separated by colons or whitespace (ld.so(8))."""
    return [entry for entry in re.split(r"[:\s]+", preload) if entry]


def find_mkl(prefix: str | os.PathLike) -> str | None:
    """The newest ``libmkl_rt.so.N`` in ``prefix/lib`` that is a readable x86_64 ELF file."""
    found = []
    for path in Path(prefix, "lib").glob("libmkl_rt.so.*"):
        match = _LIBRARY.fullmatch(path.name)
        if match and is_x86_64_elf(path):
            found.append((int(match.group(1)), str(path)))
    return max(found)[1] if found else None


def is_x86_64_elf(path: str | os.PathLike) -> bool:
    """The file starts like a 64-bit little-endian x86_64 ELF object (a truncated download, a
    text stub or another architecture's library is not preloaded)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
    except OSError:
        return False
    return (
        len(header) == 20
        and header[:4] == b"\x7fELF"
        and header[4] == 2  # 64-bit
        and header[5] == 1  # little-endian
        and int.from_bytes(header[18:20], "little") == _ELF_X86_64
    )


def mapped_files(maps: str | os.PathLike = "/proc/self/maps") -> set[str]:
    """The files mapped into this process (empty where there is no /proc, e.g. macOS)."""
    try:
        with open(maps) as f:
            rows = [line.split(maxsplit=5) for line in f]
    except OSError:
        return set()
    return {row[5].strip() for row in rows if len(row) == 6 and row[5].startswith("/")}


def loaded_mkl(maps: str | os.PathLike = "/proc/self/maps") -> str | None:
    """The path of the libmkl_rt mapped into this process, or None."""
    return next((p for p in sorted(mapped_files(maps)) if _LIBRARY.search(p)), None)


def preloaded_blas(environ: dict, maps: str | os.PathLike = "/proc/self/maps") -> str:
    """Which BLAS ``LD_PRELOAD`` put in this process, checked against what is really mapped."""
    mapped = mapped_files(maps)
    for entry in _entries(environ.get("LD_PRELOAD", "")):
        for marker, name in (("mkl", "Intel MKL"), ("openblas", "OpenBLAS"), ("blis", "BLIS")):
            if marker in Path(entry).name.lower():
                if os.path.realpath(entry) in mapped or entry in mapped:
                    return f"{name}, preloaded ({entry})"
                return f"MLX's bundled reference BLAS ({name} in LD_PRELOAD, not loaded: {entry})"
    return "MLX's bundled reference BLAS (no BLAS preloaded)"


# 2 x 3 through the library's cblas_sgemm, in a fresh interpreter without site-packages.
_PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
a, b, c = ((ctypes.c_float * 1)(x) for x in (2.0, 3.0, 0.0))
one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
lib.cblas_sgemm(101, 111, 111, 1, 1, 1, one, a, 1, b, 1, zero, c, 1)
sys.exit(0 if c[0] == 6.0 else 3)
"""
_RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # mlx.launch, MPI
_refused: str | None = None  # why an installed MKL was not preloaded, for start_up_notice


def probe_failure(library: str, timeout: float = 60.0) -> str | None:
    """None if ``library`` computes a 1x1 sgemm in a separate process, else what went wrong."""
    command = [sys.executable, "-I", "-S", "-c", _PROBE, library]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        return f"its check could not run ({type(err).__name__})"
    if done.returncode == 0:
        return None
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()  # MKL writes to stdout
    last = said[-1] if said else "no message"
    return f"its check failed with exit {done.returncode}: {last[:160]}"


def reexec_with_mkl() -> None:
    """Replace this process by the same command with MKL preloaded, when :func:`preload_env`
    says so and MKL passes :func:`probe_failure`; returns (and the command runs as is)
    otherwise, or if the exec itself fails."""
    global _refused
    env = preload_env(platform.system(), platform.machine(), dict(os.environ), find_mkl(sys.prefix))
    if env is None:
        return
    library = env[MARKER]
    _refused = probe_failure(library)
    if _refused is not None:
        _refused = f"kssm: Intel MKL ({library}) not used, {_refused}; MLX's bundled BLAS runs"
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as err:
        _refused = (
            f"kssm: could not restart with Intel MKL ({err.strerror}); MLX's bundled BLAS runs"
        )


def start_up_notice(environ=os.environ) -> str | None:
    """One line for stderr: whether the re-executed process loaded MKL, or why an installed MKL
    was not used; None when there was nothing to do, and on every rank but 0 of a distributed
    run (rank 0 alone speaks there; README, "Training on several Macs")."""
    if any(environ.get(name, "0").strip() not in ("", "0") for name in _RANK_VARIABLES):
        return None
    asked = environ.get(MARKER)
    if not asked:
        return _refused
    loaded = loaded_mkl()
    if loaded:
        return (
            f"kssm: Intel MKL preloaded for MLX's CPU matmuls ({loaded}); {OPT_OUT}=0 turns it off"
        )
    return f"kssm: Intel MKL ({asked}) could not be loaded; running on MLX's bundled BLAS"
