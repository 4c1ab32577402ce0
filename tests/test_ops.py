"""The op layer: one dispatch point, and the fused bank equal to its parts."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_kssm import ops
from mlx_kssm.ops import dispatch, oscillator


def test_references_run_here_and_kernels_need_metal_the_gpu_and_no_opt_out(monkeypatch):
    calls = []

    def fake_kernel(theta, n_harmonics):
        calls.append(n_harmonics)
        return oscillator.harmonic_features(theta, n_harmonics)

    monkeypatch.setitem(dispatch.KERNELS, "harmonic_features", "fake:kernel")
    monkeypatch.setattr(dispatch, "_load", lambda target: fake_kernel)
    theta = mx.random.normal((2, 3, 8))

    monkeypatch.setattr(dispatch.mx.metal, "is_available", lambda: False)
    ops.harmonic_features(theta, 4)
    assert calls == []  # no Metal: the reference

    monkeypatch.setattr(dispatch.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: False)
    ops.harmonic_features(theta, 4)
    assert calls == []  # Metal, but computed on the CPU: the reference

    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    ops.harmonic_features(theta, 4)
    assert calls == [4]  # Metal and the GPU: the kernel

    monkeypatch.setenv("KSSM_KERNELS", "0")
    ops.harmonic_features(theta, 4)
    assert calls == [4]  # the opt-out forces the reference


def test_an_op_without_a_kernel_always_gets_its_reference(monkeypatch):
    monkeypatch.setattr(dispatch.mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    assert dispatch.implementation("no_such_op", len) is len


@pytest.mark.parametrize("noise", [False, True])
def test_fused_bank_equals_step_noise_and_readout(noise):
    shift = mx.random.normal((2, 5, 1))
    omega = mx.linspace(-3.14, 3.14, 16)
    coupling = 2 * mx.sigmoid(mx.random.normal((2, 5, 1)))
    scale = mx.array([0.2])
    eps = mx.random.normal((2, 5, 16)) if noise else None
    fused = ops.oscillator_features(shift, omega, coupling, scale, eps, 6)
    theta = ops.kuramoto_step(shift, omega, coupling)
    if noise:
        theta = ops.add_phase_noise(theta, scale, eps)
    parts = ops.harmonic_features(theta, 6)
    np.testing.assert_array_equal(np.array(fused), np.array(parts))
    R = ops.order_parameter(theta)
    np.testing.assert_allclose(np.array(parts[..., 12]), np.array(R), atol=1e-6)


def test_kuramoto_step_is_the_mean_field_form():
    theta0 = mx.random.uniform(-3, 3, (4, 10))
    K = mx.array(0.7)
    theta = ops.kuramoto_step(mx.zeros((4, 1)), theta0, K)
    z = np.exp(1j * np.array(theta0)).mean(-1, keepdims=True)
    expected = np.array(theta0) + 0.7 * np.abs(z) * np.sin(np.angle(z) - np.array(theta0))
    np.testing.assert_allclose(np.array(theta), expected, atol=1e-5)
