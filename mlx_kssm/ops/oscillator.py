"""Pure-MLX references of the oscillator bank's numerics (spec: "Forward pass, per layer").

Glossary
    B, L  batch and sequence     N  oscillators     H  harmonics of the readout
    shift     (B, L, 1)  the phase shift every oscillator receives: mean_d of the normed input
    omega_0   (N,)       natural phases
    coupling  (B, L, 1)  K = 2 sigmoid(u)
    theta     (B, L, N)  phases after one Kuramoto step
    Z_n       mean_k exp(i n theta_k), n = 1..H; R = |Z_1|

These functions are what the GPU kernels in ``kernels/`` are tested against; callers go
through :mod:`mlx_kssm.ops`, which picks a kernel or these per call.
"""

from __future__ import annotations

import mlx.core as mx


def kuramoto_step(shift: mx.array, omega_0: mx.array, coupling: mx.array) -> mx.array:
    """One explicit Kuramoto step from theta0 = omega_0 + shift, in mean-field form:

        theta = theta0 + K * (mean_k sin theta0_k * cos theta0 - mean_k cos theta0_k * sin theta0)

    (= theta0 + K * R * sin(psi - theta0)). Returns theta, (B, L, N)."""
    theta0 = omega_0 + shift  # (B, L, N)
    sin0, cos0 = mx.sin(theta0), mx.cos(theta0)
    ms = mx.mean(sin0, axis=-1, keepdims=True)  # (B, L, 1)
    mc = mx.mean(cos0, axis=-1, keepdims=True)
    return theta0 + coupling * (ms * cos0 - mc * sin0)


def add_phase_noise(theta: mx.array, noise_scale: mx.array, eps: mx.array) -> mx.array:
    """The training noise term: theta - (|delta| + 1e-5) * eps, eps ~ N(0, 1) of theta's shape."""
    return theta - (mx.abs(noise_scale) + 1e-5) * eps


def order_parameter(theta: mx.array) -> mx.array:
    """R = |mean_k exp(i theta_k)| with the spec's 1e-8 inside the root. (..., N) -> (...)."""
    re = mx.mean(mx.cos(theta), axis=-1)
    im = mx.mean(mx.sin(theta), axis=-1)
    return mx.sqrt(re * re + im * im + 1e-8)


def harmonic_features(theta: mx.array, n_harmonics: int) -> mx.array:
    """Multi-scale readout of phases: spec step 7.

    For n = 1..H, Z_n = mean_k exp(i n theta_k). Returns
    ``[Re Z_1..Re Z_H, Im Z_1..Im Z_H, sqrt(Re^2 + Im^2 + 1e-8)_1..H]`` with shape (..., 3H).

    The harmonics come from the recurrence exp(i n theta) = exp(i (n-1) theta) * exp(i theta),
    so only (..., N) arrays are ever live: the (..., N, H) tensor of angles n * theta is never
    built. Each step is a rotation of a unit complex number, so the float32 error grows only
    linearly in n (about n * 1e-7).
    """
    c1, s1 = mx.cos(theta), mx.sin(theta)  # (..., N)
    cn, sn = c1, s1
    re, im = [mx.mean(c1, axis=-1)], [mx.mean(s1, axis=-1)]
    for _ in range(1, n_harmonics):
        cn, sn = cn * c1 - sn * s1, sn * c1 + cn * s1
        re.append(mx.mean(cn, axis=-1))
        im.append(mx.mean(sn, axis=-1))
    re_z = mx.stack(re, axis=-1)  # (..., H)
    im_z = mx.stack(im, axis=-1)  # (..., H)
    mag = mx.sqrt(re_z * re_z + im_z * im_z + 1e-8)
    return mx.concatenate([re_z, im_z, mag], axis=-1)  # (..., 3H)


def harmonic_features_direct(theta: mx.array, n_harmonics: int) -> mx.array:
    """The same readout from cos/sin of the full (..., N, H) angle tensor (tests only)."""
    n = mx.arange(1, n_harmonics + 1, dtype=theta.dtype)
    angles = theta[..., :, None] * n  # (..., N, H)
    re_z = mx.mean(mx.cos(angles), axis=-2)
    im_z = mx.mean(mx.sin(angles), axis=-2)
    mag = mx.sqrt(re_z * re_z + im_z * im_z + 1e-8)
    return mx.concatenate([re_z, im_z, mag], axis=-1)


def oscillator_features(
    shift: mx.array,
    omega_0: mx.array,
    coupling: mx.array,
    noise_scale: mx.array,
    eps: mx.array | None,
    n_harmonics: int,
) -> mx.array:
    """The whole bank from its inputs to the readout's input, the unit a fused kernel replaces:
    Kuramoto step, noise (when ``eps`` is given), harmonic features. Returns (B, L, 3H)."""
    theta = kuramoto_step(shift, omega_0, coupling)
    if eps is not None:
        theta = add_phase_noise(theta, noise_scale, eps)
    return harmonic_features(theta, n_harmonics)
