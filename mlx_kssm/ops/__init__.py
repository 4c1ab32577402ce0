"""The op layer: every numerical piece a custom kernel may replace, behind one dispatch point.

Each public function here calls :func:`mlx_kssm.ops.dispatch.implementation`, which returns
the kernel (Metal, when available and allowed) or the pure-MLX reference in
:mod:`.oscillator` / :mod:`.forcing`. Models call these, never the references or kernels
directly, so a kernel is added by a file in ``kernels/`` and one line in ``dispatch.KERNELS``.
"""

from __future__ import annotations

import mlx.core as mx

from . import forcing as _forcing
from . import oscillator as _oscillator
from .dispatch import implementation, kernels_enabled
from .oscillator import harmonic_features_direct

__all__ = [
    "add_phase_noise",
    "force_order_parameter",
    "harmonic_features",
    "harmonic_features_direct",
    "implementation",
    "kernels_enabled",
    "kuramoto_step",
    "order_parameter",
    "oscillator_features",
]


def kuramoto_step(shift: mx.array, omega_0: mx.array, coupling: mx.array) -> mx.array:
    """theta (B, L, N) after one Kuramoto step from omega_0 + shift (see .oscillator)."""
    return implementation("kuramoto_step", _oscillator.kuramoto_step)(shift, omega_0, coupling)


def add_phase_noise(theta: mx.array, noise_scale: mx.array, eps: mx.array) -> mx.array:
    """theta - (|delta| + 1e-5) * eps."""
    return implementation("add_phase_noise", _oscillator.add_phase_noise)(theta, noise_scale, eps)


def order_parameter(theta: mx.array) -> mx.array:
    """R = |mean_k exp(i theta_k)|, (..., N) -> (...)."""
    return implementation("order_parameter", _oscillator.order_parameter)(theta)


def harmonic_features(theta: mx.array, n_harmonics: int) -> mx.array:
    """Re Z_n, Im Z_n, |Z_n| for n = 1..H: (..., N) -> (..., 3H)."""
    return implementation("harmonic_features", _oscillator.harmonic_features)(theta, n_harmonics)


def oscillator_features(
    shift: mx.array,
    omega_0: mx.array,
    coupling: mx.array,
    noise_scale: mx.array,
    eps: mx.array | None,
    n_harmonics: int,
) -> mx.array:
    """The fused bank: Kuramoto step, optional noise, harmonic readout -> (B, L, 3H)."""
    fn = implementation("oscillator_features", _oscillator.oscillator_features)
    return fn(shift, omega_0, coupling, noise_scale, eps, n_harmonics)


def force_order_parameter(theta: mx.array, target: float | mx.array) -> mx.array:
    """Move phases (..., N) along a continuous path until their R equals ``target``."""
    return implementation("force_order_parameter", _forcing.force_order_parameter)(theta, target)
