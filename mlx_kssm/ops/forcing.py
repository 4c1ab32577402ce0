"""Forcing the Kuramoto order parameter R inside the forward pass (the causality experiment).

Given the phases of one layer at every position and a target R*, the phases are moved along a
continuous path whose R runs from 1 down to ~0, passing through the current state:

    t in [0, 1]:  theta' = psi + t * delta                 R(0) = 1, R(1) = R_now
    t in [1, 2]:  theta' = psi + (2 - t) * delta + (t - 1) * sigma   R(2) = ~1e-4

where psi is the mean phase, delta the wrapped deviations from it and sigma the evenly spread
("splay") deviations assigned in the same rank order as delta (their Z_1 is exactly 0). By the
intermediate value theorem some t hits R*, and bisection on t finds it per position.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .oscillator import order_parameter

_BISECTION_STEPS = 40


def force_order_parameter(theta: mx.array, target: float | mx.array) -> mx.array:
    """Move phases (..., N) so that their order parameter equals ``target`` at every position."""
    theta = mx.stop_gradient(theta)
    n = theta.shape[-1]
    psi = mx.arctan2(mx.mean(mx.sin(theta), -1), mx.mean(mx.cos(theta), -1))[..., None]
    rel = theta - psi
    delta = mx.arctan2(mx.sin(rel), mx.cos(rel))  # (..., N) in (-pi, pi]
    rank = mx.argsort(mx.argsort(delta, axis=-1), axis=-1).astype(theta.dtype)
    sigma = -math.pi + 2 * math.pi * (rank + 0.5) / n  # splay deviations, same order as delta

    def phases_at(t: mx.array) -> mx.array:  # t: (..., 1)
        contract = psi + mx.minimum(t, 1.0) * delta
        spread = psi + (2.0 - t) * delta + (t - 1.0) * sigma
        return mx.where(t <= 1.0, contract, spread)

    target = mx.clip(mx.array(target, dtype=theta.dtype), 1e-4, 1.0)
    lo = mx.zeros(theta.shape[:-1] + (1,), dtype=theta.dtype)  # R(lo) >= target
    hi = mx.full(lo.shape, 2.0, dtype=theta.dtype)  # R(hi) <= target
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = (order_parameter(phases_at(mid)) >= target)[..., None]
        lo = mx.where(above, mid, lo)
        hi = mx.where(above, hi, mid)
    return phases_at(0.5 * (lo + hi))
