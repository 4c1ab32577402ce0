"""What a kernel call is, independent of who runs it: Metal through ``mx.fast.metal_kernel``, or
the CPU emulator (``emulate.py``). The op wrappers build a :class:`Launch` and hand it to a
runner, so the emulator executes exactly the inputs, template arguments, grid and threadgroup
that MLX is given on a Mac.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import mlx.core as mx

TemplateValue = Any  # an mx.Dtype, a bool or an int, as mx.fast.metal_kernel takes them


@dataclass(frozen=True)
class KernelSpec:
    """One Metal body (``<source>.metal`` in this folder) and the names MLX gives its buffers."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source_file: str
    header: str = ""
    text: str | None = None  # the body itself instead of the file's (tests of the emulator)

    @property
    def source(self) -> str:
        return self.text if self.text is not None else read_source(self.source_file)


@dataclass
class Launch:
    """One call of a kernel: everything ``mx.fast.metal_kernel(...)(...)`` receives.

    ``inputs`` are MLX arrays for Metal; the emulator also accepts numpy arrays (float64 in its
    float64 build). ``grid`` counts threads, as in MLX."""

    spec: KernelSpec
    inputs: list[Any]
    template: list[tuple[str, TemplateValue]]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype] = field(default_factory=list)

    def __post_init__(self):
        if not self.output_dtypes:
            self.output_dtypes = [mx.float32] * len(self.output_shapes)
        if len(self.inputs) != len(self.spec.input_names):
            raise ValueError(
                f"{self.spec.name}: {len(self.inputs)} inputs for {self.spec.input_names}"
            )
        if len(self.output_shapes) != len(self.spec.output_names):
            raise ValueError(f"{self.spec.name}: outputs do not match {self.spec.output_names}")


Runner = Callable[[Launch], Sequence[mx.array]]


@cache
def read_source(file_name: str) -> str:
    return resources.files(__package__).joinpath(file_name).read_text(encoding="utf-8")


@cache
def _metal_kernel(spec: KernelSpec):
    """Built once per body: MLX compiles and caches the Metal library on first call."""
    return mx.fast.metal_kernel(
        name=spec.name,
        input_names=list(spec.input_names),
        output_names=list(spec.output_names),
        source=spec.source,
        header=spec.header,
        ensure_row_contiguous=True,
    )


def run_metal(launch: Launch) -> list[mx.array]:
    """Runs ``launch`` on the GPU through MLX (raises on a build without Metal)."""
    return _metal_kernel(launch.spec)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
    )
