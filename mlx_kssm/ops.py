"""Numerical building blocks shared by the models, with one place to dispatch to GPU kernels.

The pure-MLX functions here are the reference implementation: they run on every backend
(CPU included) and are what the custom kernels in ``kernels/`` are tested against.
"""

from __future__ import annotations

import mlx.core as mx


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
