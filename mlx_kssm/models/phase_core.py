"""The Phase-Mamba oscillator core (spec: docs/phase-mamba-spec.md, "The Phase Core").

Glossary
    B, L  batch and sequence     d  width of the hooked layer's output     N  oscillators (16)
    phi   phases (..., N)        omega  natural frequencies (N,)            K  coupling (2.0)
    dt    the Kuramoto step (0.1)                 R  |mean_j exp(i phi_j)|, in [0, 1]

One update of the phases from an input vector v (d,) or (B, d):

    phi = stop_gradient(previous) + input_gain * pi * tanh(to_phases(v))
    phi_i += dt * (omega_i + (K / N) * sum_j sin(phi_j - phi_i)),  then wrapped to (-pi, pi]

and the layer's output x becomes, with m = to_modulation(sin phi) and s = modulation_scale:

    multiplicative (and faithful):  x * (1 + s * tanh(m))
    additive:                       x + s * m

Dynamics. ``per_call`` is the original: one update per forward call, from the mean of x over
batch and sequence; the phases live in the ``phases`` buffer (saved with the weights, never
trained) and the same factor scales every position. ``per_token``: one update per position,
from that position's x, starting from the ``phases`` buffer; the running phases are carried by
the caller (the model's cache), so R has a trajectory and incremental decoding equals the full
forward. As in the original, the carried phases are detached: gradients reach ``to_phases``
through the current input only.

Couplings. ``faithful`` modulates in training mode only and returns x unchanged in eval mode
(the original hook, whose phases still advance); ``multiplicative`` and ``additive`` modulate
in both modes.

Pinned phases (``pin``). The original intervention overwrote the phases with a fixed pattern
before every forward call, which then advanced them once. A pinned core does the same at every
update: its previous phases are always the pin (per_call: before the one update; per_token:
before each position's), so incremental decoding still equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from .. import ops

COUPLINGS = ("faithful", "multiplicative", "additive")
DYNAMICS = ("per_call", "per_token")


@dataclass
class CoreArgs:
    """What one core needs; the model's config holds the same fields."""

    hidden_size: int  # d, the hooked layer's width
    n_oscillators: int = 16  # N
    coupling_strength: float = 2.0  # K
    dt: float = 0.1
    input_gain: float = 0.1  # how far one input moves the phases (times pi)
    modulation_scale: float = 0.1  # s
    coupling: str = "faithful"
    dynamics: str = "per_call"


def kuramoto_update(phi: mx.array, omega: mx.array, K: float, dt: float) -> mx.array:
    """One explicit Kuramoto step of phases (..., N), wrapped with atan2(sin, cos).

    The pairwise sum is taken in mean-field form, (1/N) sum_j sin(phi_j - phi_i) =
    mean(sin phi) cos phi_i - mean(cos phi) sin phi_i: O(N) instead of O(N^2), same numbers
    to float32 rounding."""
    sin, cos = mx.sin(phi), mx.cos(phi)
    mean_sin = mx.mean(sin, axis=-1, keepdims=True)
    mean_cos = mx.mean(cos, axis=-1, keepdims=True)
    phi = phi + dt * (omega + K * (mean_sin * cos - mean_cos * sin))
    return mx.arctan2(mx.sin(phi), mx.cos(phi))


class PhaseCore(nn.Module):
    """One oscillator core. Parameter names follow the original's state dict (``omega``,
    ``to_phases``, ``to_modulation``, the buffer ``phases``), so conversion only prefixes them."""

    def __init__(self, args: CoreArgs):
        super().__init__()
        self.args = args
        n, d = args.n_oscillators, args.hidden_size
        self.omega = 0.01 * mx.random.normal((n,))
        self.to_phases = nn.Linear(d, n)
        self.to_modulation = nn.Linear(n, d)
        self.phases = mx.zeros((n,))  # per_call: the state; per_token: the starting phases
        self.freeze(keys=["phases"], recurse=False)  # a buffer: saved, never trained
        self._pinned = None  # (N,) phases every update starts from, or None (module docstring)

    def pin(self, phases: mx.array | None) -> None:
        """Start every update from ``phases`` (N,) from now on; None ends it."""
        if phases is not None and phases.shape != self.phases.shape:
            raise ValueError(f"pinned phases of shape {phases.shape}, need {self.phases.shape}")
        self._pinned = None if phases is None else mx.stop_gradient(phases)

    @property
    def modulates(self) -> bool:
        """False only for the faithful coupling in eval mode (the original hook observes)."""
        return self.training or self.args.coupling != "faithful"

    def advance(self, phases: mx.array, inputs: mx.array) -> mx.array:
        """One update: phases (..., N) and inputs (..., d) -> phases (..., N)."""
        a = self.args
        drive = mx.tanh(self.to_phases(inputs)) * math.pi
        phi = mx.stop_gradient(phases) + a.input_gain * drive
        return kuramoto_update(phi, self.omega, a.coupling_strength, a.dt)

    def modulate(self, x: mx.array, phi: mx.array) -> mx.array:
        """x (B, L, d) and phases broadcastable to (B, L, N) -> x coupled, in x's dtype."""
        m = self.to_modulation(mx.sin(phi))
        s = self.args.modulation_scale
        if self.args.coupling == "additive":
            out = x + s * m
        else:
            out = x * (1 + s * mx.tanh(m))
        return out.astype(x.dtype)

    def per_call(self, x: mx.array, force_r: float | None = None) -> tuple[mx.array, mx.array]:
        """The original computation: x (B, L, d) -> (output, R ()). The phases advance once,
        from the mean of x over batch and sequence, and are stored in ``phases``. ``force_r``
        moves the new phases to that R (ops.force_order_parameter) before anything reads them."""
        x_bar = mx.mean(x, axis=(0, 1)).astype(self.omega.dtype)  # (d,)
        previous = self.phases if self._pinned is None else self._pinned
        phi = self.advance(previous, x_bar)  # (N,)
        if force_r is not None:
            phi = ops.force_order_parameter(phi, force_r)
        self.phases = mx.stop_gradient(phi)
        out = self.modulate(x, phi) if self.modulates else x
        return out, ops.order_parameter(phi)

    def start(self, batch: int) -> mx.array:
        """The phases before the first token of a sequence, (B, N)."""
        return mx.broadcast_to(self.phases, (batch, self.phases.shape[0]))

    def per_token(
        self, x: mx.array, phases: mx.array, force_r: float | None = None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """x (B, L, d) and the phases before it (B, N) -> (output, R (B, L), phases after).
        ``force_r`` moves the phases to that R at every position, and the forced phases are
        the ones carried on."""
        inputs = x.astype(self.omega.dtype)
        if self._pinned is not None:  # every position starts from the pin: no recurrence
            B, L = x.shape[:2]
            phi = self.advance(mx.broadcast_to(self._pinned, (B, L, self._pinned.shape[0])), inputs)
            if force_r is not None:
                phi = ops.force_order_parameter(phi, force_r)
            phases = phi[:, -1]
        else:
            trajectory = []
            for t in range(x.shape[1]):  # the recurrence is sequential, like the Mamba scan
                phases = self.advance(phases, inputs[:, t])
                if force_r is not None:
                    phases = ops.force_order_parameter(phases, force_r)
                trajectory.append(phases)
            phi = mx.stack(trajectory, axis=1)  # (B, L, N)
        out = self.modulate(x, phi) if self.modulates else x
        return out, ops.order_parameter(phi), mx.stop_gradient(phases)
