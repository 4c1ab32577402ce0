"""The bistable Kuramoto oscillator bank of K-SSM v3 (spec: "Forward pass, per layer").

Glossary
    B  batch size              L  sequence length         d  hidden size
    N  oscillators per layer   H  harmonics of the readout
    u  the reduced variable of the algebraic bistability constraint (clamped when bistable)
    K  the coupling strength, 2 * sigmoid(u)
    R  the Kuramoto order parameter |mean_k exp(i theta_k)|, in [0, 1]
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
from mlx import nn

from ..config import ModelArgs
from ..ops import force_order_parameter, harmonic_features


class BistableKuramotoBank(nn.Module):
    """One layer's oscillator bank: hidden state -> (u, K) -> one Kuramoto step -> readout.

    Parameter names follow the PyTorch state_dict (``omega_0``, ``delta_param``,
    ``to_params``, ``readout``) so that checkpoint conversion is a rename-free copy.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.bistable = args.bistable
        self.u_min, self.u_max = args.u_min, args.u_max
        self.n_harmonics = args.n_harmonics
        self.train_noise, self.eval_noise = args.train_noise, args.eval_noise
        # The training script's initialisation (spec: "Initialisation used by the training script").
        self.omega_0 = mx.linspace(-math.pi, math.pi, args.n_oscillators)  # (N,)
        self.delta_param = mx.array([0.2])  # (1,) noise scale
        self.to_params = nn.Linear(args.hidden_dim, 10)
        self.to_params.weight = _orthogonal((10, args.hidden_dim))
        self.to_params.bias = mx.full((10,), 0.5)
        self.readout = nn.Linear(args.n_features, args.hidden_dim)

    def reduced_variable(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Spec steps 1-3: the determinant and the (clamped) reduced variable u, each (B, L)."""
        p = self.to_params(h)  # (B, L, 10)
        a, b, c, d, e, f, g, h_ = (p[..., i] for i in range(8))  # i and j (8, 9) are unused
        det = b * g - c * f
        u = (d * g - c * h_) / (a * g - c * e + 1e-6)
        if self.bistable:
            u = mx.clip(u, self.u_min, self.u_max)  # the only bistable/monostable difference
        return det, u

    def phases(self, h: mx.array, u: mx.array, key: mx.array | None) -> mx.array:
        """Spec steps 4-6: initial phases and one Kuramoto step. Returns theta, (B, L, N)."""
        coupling = 2 * mx.sigmoid(u)[..., None]  # K, (B, L, 1)
        theta0 = self.omega_0 + mx.mean(h, axis=-1, keepdims=True)  # (B, L, N)
        sin0, cos0 = mx.sin(theta0), mx.cos(theta0)
        ms = mx.mean(sin0, axis=-1, keepdims=True)
        mc = mx.mean(cos0, axis=-1, keepdims=True)
        theta = theta0 + coupling * (ms * cos0 - mc * sin0)
        if self.train_noise if self.training else self.eval_noise:
            eps = mx.random.normal(theta.shape, dtype=theta.dtype, key=key)
            theta = theta - (mx.abs(self.delta_param) + 1e-5) * eps
        return theta

    def __call__(
        self, h: mx.array, key: mx.array | None = None, force_r: float | None = None
    ) -> tuple[mx.array, dict[str, Any]]:
        """h: normed hidden state (B, L, d). Returns the bank's output (B, L, d) and its stats.

        ``force_r`` moves the phases so that this layer's R equals it at every position before
        the readout sees them (the intervention acts on the computation, not on the report).
        """
        det, u = self.reduced_variable(h)
        theta = self.phases(h, u, key)  # (B, L, N)
        if force_r is not None:
            theta = force_order_parameter(theta, force_r)
        features = harmonic_features(theta, self.n_harmonics)  # (B, L, 3H)
        stats = {
            "R": features[..., 2 * self.n_harmonics],  # |Z_1|, (B, L)
            "u": u,  # (B, L)
            "det_mean": mx.mean(mx.abs(det)),  # scalar, monitored as delta_val
            "u_mean": mx.mean(u),  # scalar, monitored as u_val
            "features": features,  # the readout's input, (B, L, 3H)
        }
        return self.readout(features), stats


def regularisation(det_mean: mx.array, u_mean: mx.array) -> mx.array:
    """Spec "Regularisation loss", one layer: keep |det| away from 0 and u positive."""
    return 0.1 / (det_mean + 1e-5) + 0.5 * (-mx.log(mx.maximum(u_mean, 1e-5)))


def _orthogonal(shape: tuple[int, int]) -> mx.array:
    """An orthogonal matrix (gain 1) for ``to_params.weight``, like torch.nn.init.orthogonal_."""
    rows, cols = shape
    flat = mx.random.normal((max(rows, cols), min(rows, cols)))
    q, r = mx.linalg.qr(flat, stream=mx.cpu)
    q = q * mx.sign(mx.diagonal(r))  # make the decomposition unique, as torch does
    return q.T if rows < cols else q
