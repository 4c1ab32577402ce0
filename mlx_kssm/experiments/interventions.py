"""How each intervention mode of `kssm intervene` changes the model (intervene.py runs the
experiment around them).

    phases   the forward pass moves the forced banks' phases to the target R exactly
             (``force_r``; every architecture with oscillators)
    omega    K-SSM banks' natural frequencies pulled towards or pushed from their mean
    pattern  the original Phase-Mamba intervention (spec: "The experiments", Intervention):
             before every update the forced cores' phases are overwritten with a fixed pattern
             meant to give the target R, which the update then advances once before R is read.
             The pattern only approximates its target, and the update moves it further, so the
             measured R is what counts; the original ran this in eval mode, where its hook
             returned the layer's output unchanged (the faithful coupling still does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import mlx.core as mx

# The original's thresholds: at or above 0.99 all phases equal, at or below 0.01 evenly spread.
PATTERN_SYNCHRONISED, PATTERN_SPREAD = 0.99, 0.01
# What each mode acts on: K-SSM oscillator banks (model.blocks[i].oscillators), Phase-Mamba
# cores (model.cores).
MODE_NEEDS = {"omega": ("blocks", "K-SSM (kssm_v3, kssm_ssm)"), "pattern": ("cores", "phase_mamba")}


def check_mode(model, mode: str) -> None:
    """ValueError (one line) when ``mode`` cannot act on ``model``'s architecture."""
    attribute, models = MODE_NEEDS.get(mode, (None, ""))
    if attribute is not None and not hasattr(model, attribute):
        raise ValueError(
            f"--mode {mode} acts on {models} models, not {model.args.model_type}; use --mode phases"
        )


def original_pattern(target: float, n: int) -> mx.array:
    """The phases (n,) the original intervention wrote for a target R: all zeros at R >= 0.99,
    evenly spread around the circle at R <= 0.01, else ``linspace(-s/2, s/2, n)`` with
    ``s = 2 pi (1 - target)`` (whose R is not the target: only a monotone guess at it)."""
    if target >= PATTERN_SYNCHRONISED:
        return mx.zeros((n,))
    if target <= PATTERN_SPREAD:
        return mx.arange(n) * (2 * math.pi / n)
    spread = 2 * math.pi * (1 - target)
    return mx.linspace(-spread / 2, spread / 2, n)


@contextmanager
def pinned_phases(model, banks: Sequence[int], target: float) -> Iterator[None]:
    """The pattern for ``target`` pinned in the given cores (phase_core.PhaseCore.pin). On
    exit the pins are lifted and every core's ``phases`` buffer is what it was before."""
    cores = model.cores
    saved = [core.phases for core in cores]
    try:
        for bank in banks:
            core = cores[bank]
            core.pin(original_pattern(target, core.phases.shape[0]).astype(core.phases.dtype))
        yield
    finally:
        for core, phases in zip(cores, saved, strict=True):
            core.pin(None)
            core.phases = phases


def core_phases(model) -> list | None:
    """The ``phases`` buffer of every Phase-Mamba core (None for a model without cores). A
    per_call core advances it once per forward call, so an intervention that compares
    conditions starts each of them from the same saved phases (intervene.py)."""
    cores = getattr(model, "cores", None)
    return None if cores is None else [core.phases for core in cores]


def restore_phases(model, saved: list | None) -> None:
    """Put back what core_phases returned (nothing to do for None)."""
    if saved is None:
        return
    for core, phases in zip(model.cores, saved, strict=True):
        core.phases = phases


@contextmanager
def scaled_omega(model, layers: Sequence[int], scale: float) -> Iterator[None]:
    """omega_0' = mean + scale * (omega_0 - mean) in the given layers; restored on exit."""
    banks = [model.blocks[i].oscillators for i in layers]
    saved = [bank.omega_0 for bank in banks]
    try:
        for bank, omega in zip(banks, saved, strict=True):
            centre = mx.mean(omega)
            bank.omega_0 = centre + scale * (omega - centre)
        yield
    finally:
        for bank, omega in zip(banks, saved, strict=True):
            bank.omega_0 = omega


@contextmanager
def applied(model, cond, layers: Sequence[int]) -> Iterator[dict | None]:
    """Apply a condition (intervene.Condition); yields the ``force_r`` argument for the
    forward pass."""
    if cond.is_control:
        yield None
    elif cond.omega_scale is not None:
        with scaled_omega(model, layers, cond.omega_scale):
            yield None
    elif cond.pattern:
        with pinned_phases(model, layers, cond.target_r):
            yield None
    else:
        yield {i: cond.target_r for i in layers}
