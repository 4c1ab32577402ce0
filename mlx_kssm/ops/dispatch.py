"""The one place that decides, per call, whether a custom GPU kernel or the pure-MLX reference
computes an op.

A kernel runs only when all of these hold:
    - the op has an entry in ``KERNELS`` (op name -> "module:attribute" under mlx_kssm.kernels);
    - MLX's Metal backend is available (``mx.metal.is_available()``; a Linux CPU or CUDA build
      runs the references, which are the tested ground truth);
    - the computation runs on the GPU (the default device; MLX arrays live in unified memory, so
      "on the GPU" means "computed on a GPU stream");
    - the environment variable ``KSSM_KERNELS`` is not "0" (set it to force the references,
      e.g. to compare numbers or to rule a kernel out when debugging).
Anything else gets the reference, silently: the two compute the same numbers (tests and the
kernel emulator check it), so the choice is about speed only.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache

import mlx.core as mx

# op name -> "module:attribute" inside mlx_kssm.kernels (filled in by the kernel issue).
KERNELS: dict[str, str] = {
    "oscillator_features": "bank:oscillator_features",
    "selective_scan": "scan:selective_scan",
    "selective_scan_step": "scan:selective_scan_step",
}


def kernels_enabled() -> bool:
    """Kernels allowed at all here: not disabled by KSSM_KERNELS=0, and Metal available."""
    if os.environ.get("KSSM_KERNELS", "1").strip() == "0":
        return False
    return mx.metal.is_available()


def on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


@cache
def _load(target: str) -> Callable:
    module, attribute = target.split(":")
    return getattr(importlib.import_module(f"mlx_kssm.kernels.{module}"), attribute)


def implementation(name: str, reference: Callable) -> Callable:
    """The function that computes op ``name`` for this call: its kernel or ``reference``."""
    target = KERNELS.get(name)
    if target is None or not kernels_enabled() or not on_gpu():
        return reference
    return _load(target)
