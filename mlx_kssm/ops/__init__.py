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
from . import scan as _scan
from .dispatch import implementation, kernels_enabled
from .oscillator import harmonic_features_direct
from .scan import default_chunk_size, selective_scan_sequential

__all__ = [
    "add_phase_noise",
    "causal_conv1d",
    "causal_conv1d_step",
    "default_chunk_size",
    "force_order_parameter",
    "harmonic_features",
    "harmonic_features_direct",
    "implementation",
    "kernels_enabled",
    "kuramoto_step",
    "order_parameter",
    "oscillator_features",
    "selective_scan",
    "selective_scan_sequential",
    "selective_scan_step",
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


def selective_scan(
    x: mx.array,
    delta: mx.array,
    A: mx.array,
    B_: mx.array,
    C: mx.array,
    D_skip: mx.array,
    h0: mx.array | None = None,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """Selective scan over a sequence, chunked (see .scan): -> y (B, L, D), final h (B, D, N)."""
    fn = implementation("selective_scan", _scan.selective_scan)
    return fn(x, delta, A, B_, C, D_skip, h0, chunk_size)


def selective_scan_step(
    x_t: mx.array,
    delta_t: mx.array,
    A: mx.array,
    B_t: mx.array,
    C_t: mx.array,
    D_skip: mx.array,
    h: mx.array | None,
) -> tuple[mx.array, mx.array]:
    """One token of the selective scan with a carried state: -> y_t (B, D), h (B, D, N)."""
    fn = implementation("selective_scan_step", _scan.selective_scan_step)
    return fn(x_t, delta_t, A, B_t, C_t, D_skip, h)


def causal_conv1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    conv_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Depthwise causal conv, weight (K, D): -> y (B, L, D), conv state (B, K-1, D)."""
    fn = implementation("causal_conv1d", _scan.causal_conv1d)
    return fn(x, weight, bias, conv_state)


def causal_conv1d_step(
    x_t: mx.array,
    conv_state: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """One token of the causal conv: -> y_t (B, D), conv state (B, K-1, D)."""
    fn = implementation("causal_conv1d_step", _scan.causal_conv1d_step)
    return fn(x_t, conv_state, weight, bias)
