"""The fused oscillator bank as a Metal kernel pair (``bank_forward.metal``,
``bank_backward.metal``), wrapped in ``mx.custom_function`` with a VJP so that it trains under
``nn.value_and_grad`` and ``mx.compile``.

Same call and numbers as :func:`mlx_kssm.ops.oscillator.oscillator_features` (the reference):
``shift`` (..., 1) (K-SSM v3) or (..., N) (with ``phase_drive``), ``omega_0`` (N,), ``coupling``
(..., 1), ``noise_scale`` (1,), ``eps`` (..., N) or None, -> features (..., 3H). Anything outside
what the kernels handle (another dtype than float32, other shapes, H > 64, no positions) runs the
reference instead, so the op is total. ``eps`` gets its true gradient, -(|noise_scale| + 1e-5) dL/dtheta.

The dispatch (``mlx_kssm.ops.dispatch``) calls :func:`oscillator_features` only with Metal
available and on the GPU; :func:`build` makes the same op around any runner (the CPU emulator
in tests).
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx

from ..ops import oscillator as reference
from .launch import KernelSpec, Launch, Runner, run_metal

FORWARD = KernelSpec(
    name="kssm_bank_forward",
    input_names=("shift", "omega", "coupling", "noise_scale", "eps"),
    output_names=("features",),
    source_file="bank_forward.metal",
)
BACKWARD = KernelSpec(
    name="kssm_bank_backward",
    input_names=("shift", "omega", "coupling", "noise_scale", "eps", "features", "cotangent"),
    output_names=("d_shift", "d_coupling", "d_eps", "d_omega_parts", "d_noise_parts"),
    source_file="bank_backward.metal",
)
POSITIONS_PER_GROUP = 8  # backward: positions per threadgroup (one omega partial per group)
MAX_HARMONICS = 64  # per-thread registers: 2H accumulators


def threads_per_group(n_oscillators: int) -> int:
    """64 threads (two SIMD groups) for banks above 32 oscillators: 192 oscillators = 3 each."""
    return 64 if n_oscillators > 32 else 32


def supported(shift, omega_0, coupling, noise_scale, eps, n_harmonics) -> bool:
    if omega_0.ndim != 1 or shift.ndim < 1 or not 1 <= n_harmonics <= MAX_HARMONICS:
        return False
    n = omega_0.shape[0]
    lead = tuple(shift.shape[:-1])
    arrays = [shift, omega_0, coupling, noise_scale] + ([eps] if eps is not None else [])
    return (
        all(a.dtype == mx.float32 for a in arrays)
        and n >= 1
        and math.prod(lead) >= 1
        and shift.shape[-1] in (1, n)
        and tuple(coupling.shape) == lead + (1,)
        and noise_scale.size == 1
        and (eps is None or tuple(eps.shape) == lead + (n,))
    )


def _template(n, n_harmonics, per_osc, noise):
    return [
        ("T", mx.float32),
        ("N", n),
        ("H", n_harmonics),
        ("TG", threads_per_group(n)),
        ("NOISE", noise),
        ("PER_OSC", per_osc),
    ]


def forward_launch(shift, omega_0, coupling, noise_scale, eps, n_harmonics) -> Launch:
    """The forward kernel's call for these inputs (any array type with .shape and .reshape)."""
    n = omega_0.shape[0]
    positions = math.prod(shift.shape[:-1])
    per_osc = shift.shape[-1] != 1
    threads = threads_per_group(n)
    return Launch(
        spec=FORWARD,
        inputs=[
            shift.reshape(positions, shift.shape[-1]),
            omega_0,
            coupling.reshape(positions),
            noise_scale.reshape(1),
            eps.reshape(positions, n) if eps is not None else _placeholder(shift),
        ],
        template=_template(n, n_harmonics, per_osc, eps is not None),
        grid=(threads, positions, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(positions, 3 * n_harmonics)],
    )


def backward_launch(shift, omega_0, coupling, noise_scale, eps, features, cotangent) -> Launch:
    n = omega_0.shape[0]
    n_harmonics = features.shape[-1] // 3
    positions = math.prod(shift.shape[:-1])
    groups = -(-positions // POSITIONS_PER_GROUP)
    threads = threads_per_group(n)
    forward = forward_launch(shift, omega_0, coupling, noise_scale, eps, n_harmonics)
    return Launch(
        spec=BACKWARD,
        inputs=forward.inputs + [features.reshape(positions, -1), cotangent.reshape(positions, -1)],
        template=forward.template + [("POS", POSITIONS_PER_GROUP)],
        grid=(threads, groups, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[
            (positions, shift.shape[-1]),
            (positions,),
            (positions, n) if eps is not None else (1,),
            (groups, n),
            (groups,),
        ],
    )


def finish_backward(xp, outputs, shift, omega_0, coupling, noise_scale, eps) -> list:
    """The cotangents of the primals from the backward kernel's outputs (``xp``: mx or numpy):
    per-threadgroup partials summed, and d|x|/dx = sign(x) for the noise scale."""
    d_shift, d_coupling, d_eps, d_omega_parts, d_noise_parts = outputs
    grads = [
        d_shift.reshape(shift.shape),
        d_omega_parts.sum(axis=0).reshape(omega_0.shape),
        d_coupling.reshape(coupling.shape),
        (xp.sign(noise_scale) * d_noise_parts.sum()).reshape(noise_scale.shape),
    ]
    if eps is not None:
        grads.append(d_eps.reshape(eps.shape))
    return grads


def _placeholder(like):
    """The one-element stand-in for an absent optional input (MLX needs a buffer)."""
    return mx.zeros((1,), dtype=mx.float32) if isinstance(like, mx.array) else like.ravel()[:1] * 0


def _single(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def build(run: Runner):
    """The op around ``run`` (a Launch -> outputs function): Metal, or the emulator in tests."""

    @cache
    def op_for(n_harmonics: int, noise: bool):
        def forward(shift, omega_0, coupling, noise_scale, eps=None):
            launch = forward_launch(shift, omega_0, coupling, noise_scale, eps, n_harmonics)
            return run(launch)[0].reshape(*shift.shape[:-1], 3 * n_harmonics)

        def backward(primals, cotangent, output):
            shift, omega_0, coupling, noise_scale = primals[:4]
            eps = primals[4] if noise else None
            launch = backward_launch(
                shift, omega_0, coupling, noise_scale, eps, _single(output), _single(cotangent)
            )
            outputs = run(launch)
            return tuple(finish_backward(mx, outputs, shift, omega_0, coupling, noise_scale, eps))

        if noise:

            @mx.custom_function
            def fused(shift, omega_0, coupling, noise_scale, eps):
                return forward(shift, omega_0, coupling, noise_scale, eps)

        else:

            @mx.custom_function
            def fused(shift, omega_0, coupling, noise_scale):
                return forward(shift, omega_0, coupling, noise_scale)

        fused.vjp(backward)
        return fused

    def oscillator_features(shift, omega_0, coupling, noise_scale, eps, n_harmonics):
        if not supported(shift, omega_0, coupling, noise_scale, eps, n_harmonics):
            return reference.oscillator_features(
                shift, omega_0, coupling, noise_scale, eps, n_harmonics
            )
        fused = op_for(int(n_harmonics), eps is not None)
        args = (shift, omega_0, coupling, noise_scale) + ((eps,) if eps is not None else ())
        return fused(*args)

    return oscillator_features


oscillator_features = build(run_metal)
