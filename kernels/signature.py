"""The source MLX compiles for a ``mx.fast.metal_kernel`` call, written the way MLX 0.32 writes
it (``mlx/backend/metal/custom_kernel.cpp``: ``metal_kernel``, ``write_signature``,
``write_template``), and the emulator's C++ unit, which is the same text with checked buffer
types, rewritten threadgroup declarations and a launcher.

What MLX does and this module repeats:
  - a parameter per input (``const device T*``, or ``const constant T*`` for fewer than 8
    elements, or ``const constant T&`` for a 0-d array), followed by ``NAME_shape``,
    ``NAME_strides``, ``NAME_ndim`` when those strings occur anywhere in the source;
  - ``device T*`` per output (``device atomic<T>*`` with atomic outputs);
  - the Metal attributes whose names occur anywhere in the source (comments included), in MLX's
    order and with MLX's types;
  - the kernel name ``custom_kernel_<name>_<template hash>`` plus a suffix per input and output
    dtype, and an explicit instantiation line when there are template arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_CONSTANT_ARRAY_SIZE = 8

# (name, type) in the order MLX checks and writes them.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# Attributes the emulator can give a value: name -> C++ expression over `ids` (a ThreadIds*).
EMULATED_ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": "ids->simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "ids->simdgroups_per_threadgroup",
    "thread_execution_width": "ids->threads_per_simdgroup",
    "thread_index_in_simdgroup": "ids->thread_index_in_simdgroup",
    "thread_index_in_threadgroup": "ids->thread_index_in_threadgroup",
    "threads_per_simdgroup": "ids->threads_per_simdgroup",
    "grid_size": "ids->threads_per_grid",
}
for _name in (
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threadgroups_per_grid",
    "threads_per_grid",
    "threads_per_threadgroup",
):
    EMULATED_ATTRIBUTES[_name] = f"ids->{_name}"

_TYPE_NAMES = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float64": "double",
    "complex64": "complex64_t",
    "bool": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}


class NotModelled(ValueError):
    """A kernel feature the emulator does not model: it refuses rather than guess."""


@dataclass(frozen=True)
class ArrayMeta:
    type_name: str  # MLX's get_type_string of the dtype
    ndim: int
    size: int


def type_name(dtype) -> str:
    """MLX's get_type_string for an mx.Dtype or a numpy dtype."""
    key = str(dtype).replace("mlx.core.", "")
    if key == "bool_":
        key = "bool"
    if key not in _TYPE_NAMES:
        key = np.dtype(dtype).name
    return _TYPE_NAMES[key]


def meta(array) -> ArrayMeta:
    return ArrayMeta(type_name(array.dtype), len(array.shape), int(np.prod(array.shape)))


def attributes(source: str) -> list[tuple[str, str]]:
    return [(name, kind) for name, kind in METAL_ATTRIBUTES if name in source]


def shape_infos(input_names, source: str) -> list[tuple[bool, bool, bool]]:
    return [
        (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
        for n in input_names
    ]


def _template_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # a std::ostream without boolalpha
    if isinstance(value, int):
        return str(value)
    return type_name(value)


def template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


def write_template(template) -> str:
    return "<" + ", ".join(_template_value(v) for _, v in template) + ">"


def kernel_name(name: str, template, inputs: list[ArrayMeta], output_types: list[str]) -> str:
    result = "custom_kernel_" + name
    if template:
        template_hash = re.sub(r"<|>|(, )", "_", write_template(template))[:-1]
        result += "_" + template_hash
    for arr in inputs:
        result += "_" + arr.type_name
        if arr.ndim == 0:
            result += "s"
        elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
            result += "c"
    for output in output_types:
        result += "_" + output
    return result


def _mlx_types(kind: str, type_: str, arr: ArrayMeta | None) -> str:
    if kind == "input":
        location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        return f"const {location} {type_}{'&' if arr.ndim == 0 else '*'}"
    return {
        "shape": "const constant int*",
        "strides": "const constant int64_t*",
        "ndim": "const constant int&",
        "output": f"device {type_}*",
        "atomic_output": f"device atomic<{type_}>*",
    }[kind]


def _emulated_types(kind: str, type_: str, arr: ArrayMeta | None) -> str:
    if type_ not in ("float", "double", "int"):
        raise NotModelled(f"buffers of type {type_} are not modelled (float only)")
    if kind == "input":
        if arr.ndim == 0:
            raise NotModelled("0-d inputs (constant references) are not modelled")
        return f"::kssm_emu::in_ptr<{type_}>"
    if kind == "shape":
        return "::kssm_emu::in_ptr<int>"
    if kind == "ndim":
        return "const int"
    if kind == "output":
        return f"::kssm_emu::out_ptr<{type_}>"
    raise NotModelled(f"{kind} parameters are not modelled")


def parameters(spec, source, inputs, output_types, atomic_outputs=False):
    """[(kind, C type name, parameter name, ArrayMeta or None)] in MLX's buffer order."""
    params = []
    for name, arr, (shape, strides, ndim) in zip(
        spec.input_names, inputs, shape_infos(spec.input_names, source), strict=True
    ):
        params.append(("input", arr.type_name, name, arr))
        if arr.ndim > 0:
            for present, kind in ((shape, "shape"), (strides, "strides"), (ndim, "ndim")):
                if present:
                    params.append((kind, "int", f"{name}_{kind}", None))
    kind = "atomic_output" if atomic_outputs else "output"
    for name, type_ in zip(spec.output_names, output_types, strict=True):
        params.append((kind, type_, name, None))
    return params


def write_signature(spec, source, inputs, output_types, template, *, emulated=False) -> str:
    """The kernel's full text as MLX generates it (``emulated``: with the emulator's types)."""
    type_of = _emulated_types if emulated else _mlx_types
    name = kernel_name(spec.name, template, inputs, output_types)
    text = spec.header
    if template:
        text += "template <"
        text += ", ".join(f"{template_kind(v)} {n}" for n, v in template) + ">\n"
    text += f"[[kernel]] void {name}(\n"
    params = parameters(spec, source, inputs, output_types)
    attrs = attributes(source)
    n_outputs = len(spec.output_names)
    for index, (kind, type_, pname, arr) in enumerate(params):
        text += f"  {type_of(kind, type_, arr)} {pname} [[buffer({index})]]"
        if kind in ("output", "atomic_output"):
            # MLX's own test: the running buffer index against inputs + outputs - 1.
            last = not (index < len(inputs) + n_outputs - 1 or attrs)
            text += ") {\n" if last else ",\n"
        else:
            text += ",\n"
    text += ",\n".join(f"  {kind} {attr} [[{attr}]]" for attr, kind in attrs)
    if attrs:
        text += ") {\n"
    text += source + "\n}\n"
    if template:
        full = name + write_template(template)
        text += f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({full}) {full};\n'
    return text


_THREADGROUP_DECLARATION = re.compile(
    r"\bthreadgroup\s+([A-Za-z_]\w*)\s+([A-Za-z_]\w*)\s*\[([^\[\]]+)\]\s*;"
)


def rewrite_threadgroup_arrays(source: str) -> str:
    """``threadgroup T name[SIZE];`` -> the shim's shared, checked array. Any other use of
    ``threadgroup`` is left as is, and fails to compile (the shim does not define it)."""
    return _THREADGROUP_DECLARATION.sub(r"KSSM_TG_ARRAY(\1, \2, \3);", source)


def emulation_unit(spec, source, inputs, output_types, template, tag: str) -> str:
    """The C++ for one kernel instantiation plus ``extern "C" int kssm_launch_<tag>(...)``."""
    for attr, _ in attributes(source):
        if attr not in EMULATED_ATTRIBUTES:
            raise NotModelled(f"the attribute {attr} is not modelled")
    body = rewrite_threadgroup_arrays(source)
    text = write_signature(spec, body, inputs, output_types, template, emulated=True)
    name = kernel_name(spec.name, template, inputs, output_types)
    params = parameters(spec, source, inputs, output_types)
    args = []
    for index, (kind, type_, _, arr) in enumerate(params):
        cxx = _emulated_types(kind, type_, arr)
        if kind == "ndim":
            args.append(f"*static_cast<const int*>(data[{index}])")
        elif kind == "output":
            args.append(f"{cxx}(static_cast<{type_}*>(data[{index}]), &info[{index}])")
        else:
            elem = "int" if kind == "shape" else type_
            args.append(f"{cxx}(static_cast<const {elem}*>(data[{index}]), &info[{index}])")
    for attr, kind in attributes(source):
        value = EMULATED_ATTRIBUTES[attr]
        args.append(f"uint3{{{value}.x, {value}.y, {value}.z}}" if kind == "uint3" else value)
    names = ", ".join(f'"{p[2]}"' for p in params)
    call_args = ",\n      ".join(args)
    text += f"""
namespace {{
struct Launch_{tag} {{
  void* const* data;
  const ::kssm_emu::BufferInfo* info;
}};
void lane_{tag}(void* ctx, const ::kssm_emu::ThreadIds* ids) {{
  void* const* data = static_cast<Launch_{tag}*>(ctx)->data;
  const ::kssm_emu::BufferInfo* info = static_cast<Launch_{tag}*>(ctx)->info;
  {name}{write_template(template) if template else ""}(
      {call_args});
}}
}}  // namespace

extern "C" __attribute__((visibility("default"))) int kssm_launch_{tag}(
    void* const* data, const long* sizes, int* const* writers, const unsigned* grid,
    const unsigned* group) {{
  static const char* const names[] = {{{names}}};
  ::kssm_emu::BufferInfo info[{len(params)}];
  for (int i = 0; i < {len(params)}; i++) info[i] = {{names[i], sizes[i], writers[i]}};
  Launch_{tag} launch = {{data, info}};
  return ::kssm_emu::run_grid(grid, group, &lane_{tag}, &launch);
}}
"""
    return text


def mlx_source(spec, inputs, output_types, template) -> str:
    """Exactly the text MLX hands the Metal compiler for this call (after its utils header)."""
    return write_signature(spec, spec.source, inputs, output_types, template)
