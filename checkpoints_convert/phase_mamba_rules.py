"""The names and shapes of an original Phase-Mamba checkpoint, mapped onto ``phase_mamba``
(spec: docs/phase-mamba-spec.md, "Training").

The seed's ``step_{:06d}.pt`` is a dict: ``phase_core_state`` (the core's state dict),
``optimizer_state`` (torch AdamW over the core's parameters), ``step``, ``metrics`` and
``metrics_history``. The state dict holds the parameters ``omega`` (N,), ``to_phases.weight``
(N, d), ``to_phases.bias`` (N,), ``to_modulation.weight`` (d, N), ``to_modulation.bias`` (d,)
and the buffer ``phases`` (N,). The base model is not in the file: the converter is told which
one (``--base``), and its hidden size must be d.

Our model has one core per hooked layer, named ``cores.<bank>.<original name>``; the original
hooks one layer, so everything maps to bank 0. The optimizer indexes its state by position in
``named_parameters()`` order, which is ``PARAMETER_ORDER`` (the buffer has no optimizer state);
``optimizer_shapes`` gives that order under our names, the form
``convert.convert_training_state`` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..models.base import ConfigError
from ..models.phase_base import read_base_config
from ..models.phase_mamba import ModelArgs, args_for_base
from .torch_zip import CheckpointError, TensorRef

CORE_STATE = "phase_core_state"
PARAMETER_ORDER = (
    "omega",
    "to_phases.weight",
    "to_phases.bias",
    "to_modulation.weight",
    "to_modulation.bias",
)
BUFFERS = ("phases",)
# Top-level keys of the seed's Phase-Mamba checkpoints (anything else is reported, not used).
KNOWN_KEYS = {CORE_STATE, "optimizer_state", "step", "metrics", "metrics_history"}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}

Shapes = dict[str, tuple[int, ...]]


def is_phase_mamba_checkpoint(root: Any) -> bool:
    """True for the seed's Phase-Mamba layout (how the converter tells it from a K-SSM one)."""
    return isinstance(root, dict) and CORE_STATE in root


def our_name(name: str, bank: int = 0) -> str:
    return f"cores.{bank}.{name}"


def core_shapes(n_oscillators: int, hidden_size: int) -> Shapes:
    """The original state dict's names and shapes, parameters in named_parameters() order."""
    n, d = n_oscillators, hidden_size
    return {
        "omega": (n,),
        "to_phases.weight": (n, d),
        "to_phases.bias": (n,),
        "to_modulation.weight": (d, n),
        "to_modulation.bias": (d,),
        "phases": (n,),
    }


def infer_core_size(shapes: Shapes) -> tuple[int, int]:
    """(N, d) of a core state dict, after checking every name and shape against them."""
    expected = set(PARAMETER_ORDER) | set(BUFFERS)
    unknown = sorted(set(shapes) - expected)
    missing = sorted(expected - set(shapes))
    if unknown or missing:
        raise CheckpointError(
            f"{CORE_STATE} is not a Phase-Mamba core: unknown {unknown[:10]}, missing {missing}"
        )
    weight = shapes["to_phases.weight"]
    if len(weight) != 2 or 0 in weight:
        raise CheckpointError(f"to_phases.weight has shape {weight}, expected (N, d)")
    n, d = weight
    wrong = [
        f"{name} {shapes[name]} (expected {shape})"
        for name, shape in core_shapes(n, d).items()
        if shapes[name] != shape
    ]
    if wrong:
        raise CheckpointError(f"shape mismatch in {CORE_STATE}: {', '.join(wrong)}")
    return n, d


def core_state(root: Any, source: Path) -> dict[str, TensorRef]:
    """The checkpoint's core state dict (name -> tensor), checked to be floating point."""
    if not is_phase_mamba_checkpoint(root):
        raise CheckpointError(f"{source}: no {CORE_STATE}; not a Phase-Mamba checkpoint")
    state = root[CORE_STATE]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, TensorRef) for k, v in state.items()
    ):
        raise CheckpointError(f"{source}: {CORE_STATE} is not a dict of name -> tensor")
    not_float = [f"{k} ({v.dtype})" for k, v in state.items() if v.dtype not in FLOAT_DTYPES]
    if not_float:
        raise CheckpointError(f"{source}: core tensors that are not floating point: {not_float}")
    return state


def core_weights(root: Any, source: Path, bank: int = 0) -> tuple[dict[str, np.ndarray], int, int]:
    """Our names -> float32 arrays for the core in ``root``, with its (N, d)."""
    state = core_state(root, source)
    try:
        n, d = infer_core_size({k: v.shape for k, v in state.items()})
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    weights = {our_name(k, bank): v.numpy().astype(np.float32) for k, v in state.items()}
    return weights, n, d


def optimizer_shapes(n_oscillators: int, hidden_size: int, bank: int = 0) -> Shapes:
    """The optimizer's parameters in torch's index order, under our names."""
    shapes = core_shapes(n_oscillators, hidden_size)
    return {our_name(name, bank): shapes[name] for name in PARAMETER_ORDER}


def unknown_keys(root: dict[str, Any]) -> list[str]:
    """Top-level keys the conversion does not use (for a note, not an error)."""
    return sorted(str(k) for k in root if k not in KNOWN_KEYS)


def phase_mamba_args(
    n_oscillators: int, hidden_size: int, base_path: str | Path, **fields
) -> ModelArgs:
    """The config of the converted model: the original core (faithful coupling, per-call
    dynamics, the checkpoint's N) on the base in ``base_path``, hooked at its middle layer
    unless ``fields`` say otherwise (layer 32 of the 64 of Mamba-2.8B, as the original)."""
    try:
        args = args_for_base(base_path, n_oscillators=n_oscillators, **fields)
        config = read_base_config(base_path)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    base_hidden = config.get("hidden_size", config.get("d_model"))  # d_model: older configs
    if base_hidden != hidden_size:
        raise CheckpointError(
            f"the core was trained on a layer of width {hidden_size}, but the base in "
            f"{base_path} has hidden_size {base_hidden}; give the base it was trained on"
        )
    return args
