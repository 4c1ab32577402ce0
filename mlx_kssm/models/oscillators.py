"""The bistable Kuramoto oscillator bank, a part any architecture can hold
(spec: "Forward pass, per layer").

Glossary
    B  batch size              L  sequence length         d  hidden size
    N  oscillators per bank    H  harmonics of the readout
    u  the reduced variable of the algebraic bistability constraint (clamped when bistable)
    K  the coupling strength, 2 * sigmoid(u)
    R  the Kuramoto order parameter |mean_k exp(i theta_k)|, in [0, 1]

The numerics (Kuramoto step, noise, harmonic readout, forcing) are ops of :mod:`mlx_kssm.ops`,
where a GPU kernel may replace them; this module holds the parameters and the wiring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn

from .. import ops


@dataclass
class OscillatorArgs:
    """What one bank needs to know, independent of the model around it."""

    n_oscillators: int = 192  # N
    n_harmonics: int = 32  # H: the readout has 3H features
    bistable: bool = True  # clamp u to [u_min, u_max]; False = the monostable ablation
    u_min: float = 0.1
    u_max: float = 10.0
    train_noise: bool = True  # draw the phase noise in training mode (as PyTorch)
    eval_noise: bool = False  # also draw it in eval mode / generation (PyTorch always did)
    phase_drive: bool = False  # each oscillator's phase also driven by a learned w_k . h
    #                            (not in K-SSM v3, whose every oscillator gets the same shift)

    @property
    def n_features(self) -> int:
        """Width of the readout: Re Z_n, Im Z_n and |Z_n| for n = 1..H."""
        return 3 * self.n_harmonics

    @classmethod
    def of(cls, model_args) -> OscillatorArgs:
        """The bank's settings taken from a model's ModelArgs (the fields of the same names;
        those the model does not have keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(model_args, n) for n in names if hasattr(model_args, n)})


class BistableKuramotoBank(nn.Module):
    """One bank: hidden state -> (u, K) -> one Kuramoto step -> harmonic readout -> (B, L, d).

    Spec steps: p = to_params(h) (10 numbers); det = b g - c f; u = (d g - c h) / (a g - c e);
    u clamped when bistable; K = 2 sigmoid(u); theta = Kuramoto step from omega_0 + mean_d(h)
    (+ drive(h), one learned phase per oscillator, with ``phase_drive``; off in K-SSM v3);
    noise; features [Re Z_n, Im Z_n, |Z_n|]; out = readout(features).

    Parameter names follow the PyTorch state_dict (``omega_0``, ``delta_param``,
    ``to_params``, ``readout``) so that checkpoint conversion is a rename-free copy.
    """

    def __init__(self, hidden_dim: int, args: OscillatorArgs):
        super().__init__()
        self.args = args
        # The training script's initialisation (spec: "Initialisation used by the training script").
        self.omega_0 = mx.linspace(-math.pi, math.pi, args.n_oscillators)  # (N,)
        self.delta_param = mx.array([0.2])  # (1,) noise scale
        self.to_params = nn.Linear(hidden_dim, 10)
        self.to_params.weight = _orthogonal((10, hidden_dim))
        self.to_params.bias = mx.full((10,), 0.5)
        self.readout = nn.Linear(args.n_features, hidden_dim)
        if args.phase_drive:
            # N(0, 1) rad per oscillator at init for unit-variance inputs: R depends on h.
            self.drive = nn.Linear(hidden_dim, args.n_oscillators, bias=False)
            self.drive.weight = mx.random.normal(self.drive.weight.shape) / math.sqrt(hidden_dim)

    def reduced_variable(self, h: mx.array) -> tuple[mx.array, mx.array]:
        """Spec steps 1-3: the determinant and the (clamped) reduced variable u, each (B, L)."""
        p = self.to_params(h)  # (B, L, 10)
        a, b, c, d, e, f, g, h_ = (p[..., i] for i in range(8))  # i and j (8, 9) are unused
        det = b * g - c * f
        u = (d * g - c * h_) / (a * g - c * e + 1e-6)
        if self.args.bistable:
            u = mx.clip(u, self.args.u_min, self.args.u_max)  # the only bistable difference
        return det, u

    def draws_noise(self) -> bool:
        return self.args.train_noise if self.training else self.args.eval_noise

    def __call__(
        self, h: mx.array, key: mx.array | None = None, force_r: float | None = None
    ) -> tuple[mx.array, dict[str, Any]]:
        """h: normed hidden state (B, L, d). Returns the bank's output (B, L, d) and its stats.

        ``force_r`` moves the phases so that this bank's R equals it at every position before
        the readout sees them (the intervention acts on the computation, not on the report).
        """
        det, u = self.reduced_variable(h)
        shift = mx.mean(h, axis=-1, keepdims=True)  # (B, L, 1)
        if self.args.phase_drive:
            shift = shift + self.drive(h)  # (B, L, N)
        coupling = 2 * mx.sigmoid(u)[..., None]  # K, (B, L, 1)
        eps = None
        if self.draws_noise():
            shape = shift.shape[:-1] + self.omega_0.shape  # (B, L, N)
            dtype = mx.result_type(self.omega_0, shift)  # theta's dtype
            eps = mx.random.normal(shape, dtype=dtype, key=key)
        H = self.args.n_harmonics
        if force_r is None:
            features = ops.oscillator_features(
                shift, self.omega_0, coupling, self.delta_param, eps, H
            )
        else:
            theta = ops.kuramoto_step(shift, self.omega_0, coupling)  # (B, L, N)
            if eps is not None:
                theta = ops.add_phase_noise(theta, self.delta_param, eps)
            theta = ops.force_order_parameter(theta, force_r)
            features = ops.harmonic_features(theta, H)  # (B, L, 3H)
        stats = {
            "R": features[..., 2 * H],  # |Z_1|, (B, L)
            "u": u,  # (B, L)
            "det_mean": mx.mean(mx.abs(det)),  # scalar, monitored as delta_val
            "u_mean": mx.mean(u),  # scalar, monitored as u_val
            "features": features,  # the readout's input, (B, L, 3H)
        }
        return self.readout(features), stats


def regularisation(det_mean: mx.array, u_mean: mx.array) -> mx.array:
    """Spec "Regularisation loss", one bank: keep |det| away from 0 and u positive."""
    return 0.1 / (det_mean + 1e-5) + 0.5 * (-mx.log(mx.maximum(u_mean, 1e-5)))


def _orthogonal(shape: tuple[int, int]) -> mx.array:
    """An orthogonal matrix (gain 1) for ``to_params.weight``, like torch.nn.init.orthogonal_."""
    rows, cols = shape
    flat = mx.random.normal((max(rows, cols), min(rows, cols)))
    q, r = mx.linalg.qr(flat, stream=mx.cpu)
    q = q * mx.sign(mx.diagonal(r))  # make the decomposition unique, as torch does
    return q.T if rows < cols else q
