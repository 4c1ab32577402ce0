"""K-SSM with sequence mixing: the model the papers draw, a selective state-space scan
(Mamba-1 family) beside the bistable Kuramoto bank in every layer, where R can matter.

    Token -> Embedding -> n_layers x [SSM block + BistableKuramotoBank] -> LayerNorm -> tied head

Glossary
    B  batch      L  sequence length     d  hidden size      V  vocabulary
    D  inner width of the SSM (expand * d)                   N  SSM state size (16)
    K  causal conv kernel (4)            r  rank of the step projection (ceil(d / 16))
    n_osc, H   oscillators and harmonics of the bank         R  order parameter, in [0, 1]
    Delta (B, L, D)  the input-dependent step; A (D, N) negative; B_t, C_t (B, L, N)

How the oscillators reach the sequence (the design choice; see README "K-SSM with an SSM").
The bank keeps K-SSM v3's mechanics (10-parameter bistability, u clamp, Kuramoto step, harmonic
readout) with one addition: each oscillator's phase is driven by the input, theta0_k = omega_k +
mean_d(x) + w_k . x (``phase_drive``). In v3 every oscillator receives the same shift mean_d(x),
which a LayerNorm makes ~0, and u sits at its clamp, so R barely moves from token to token; with
a drive per oscillator, how synchronised the bank is depends on what it reads. The bank reads
the same normed hidden state as the SSM and its harmonic readout (Re Z_n, Im Z_n, |Z_n|,
n = 1..H; |Z_1| is R) is projected onto the SSM's step before the softplus:

    Delta = softplus(dt_proj(dt_t + osc_to_dt(features_t)))      (dt_t: the step's rank-r input)

Delta sets both how fast the state forgets (exp(Delta A)) and how much of this token enters it
(Delta B x), so synchrony decides, per token and channel, how much context is kept. Nothing
normalises this path afterwards: the Phase-Mamba paper's lesson is that a multiplicative
modulation of hidden states followed by a normalisation is washed out, so the modulation acts
inside the recurrence instead. Because layer l's input already carries context from layer
l-1's scan, R varies from token to token and depends on the prefix. Forcing R (``force_r``) moves
the phases before the readout, so it changes Delta at every step of the recurrence, also during
cached generation. The bank's readout is also added to the residual stream, as in K-SSM v3.
``oscillators=False`` is the control without a bank (same SSM, within 2% of the parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn

from .. import ops
from .base import BaseModelArgs, ConfigError, RecurrentCache, bounded
from .oscillators import BistableKuramotoBank, OscillatorArgs, regularisation


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "kssm_ssm"
    vocab_size: int = bounded(100_277, 1, 1 << 21)  # V: tiktoken cl100k_base
    hidden_dim: int = bounded(384, 1, 1 << 14)  # d
    n_layers: int = bounded(6, 1, 256)
    expand: int = bounded(2, 1, 16)  # D = expand * d
    state_size: int = bounded(16, 1, 1024)  # N
    conv_kernel: int = bounded(4, 1, 64)  # K
    dt_rank: int = bounded(0, 0, 1 << 14)  # r; 0 = ceil(d / 16)
    chunk_size: int = bounded(0, 0, 4096)  # positions per chunk of the training scan; 0 = ~sqrt(L)
    oscillators: bool = True  # False: the control without oscillator banks
    n_oscillators: int = bounded(192, 1, 1 << 14)
    n_harmonics: int = bounded(32, 1, 1024)
    bistable: bool = True
    u_min: float = bounded(0.1, -1e6, 1e6)
    u_max: float = bounded(10.0, -1e6, 1e6)
    train_noise: bool = True
    eval_noise: bool = False
    phase_drive: bool = True  # each oscillator's phase driven by the input (see docstring)
    layer_norm_eps: float = bounded(1e-5, 0.0, 1.0)

    def validate(self) -> None:
        super().validate()
        if self.u_min >= self.u_max:
            raise ConfigError(f"u_min {self.u_min} must be below u_max {self.u_max}")
        d, D = self.hidden_dim, self.expand * self.hidden_dim
        per_layer = 3 * d * D + D * (self.rank + 2 * self.state_size) + D * self.state_size
        n_params = self.vocab_size * d + self.n_layers * per_layer
        if n_params > 1 << 34:
            raise ConfigError(f"the config describes ~{n_params:.3g} parameters; too large")

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.hidden_dim / 16)

    @property
    def oscillator_args(self) -> OscillatorArgs:
        return OscillatorArgs.of(self)


PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "small": dict(hidden_dim=256, n_layers=4, n_oscillators=96, n_harmonics=16),
    "tiny": dict(hidden_dim=64, n_layers=2, n_oscillators=32, n_harmonics=8),
}


class SelectiveSSM(nn.Module):
    """The Mamba-1 mixer: x -> in_proj -> (x_in, z); x_in -> causal depthwise conv -> SiLU ->
    (dt, B, C); y = scan(Delta, A, B, C, D) ; out = out_proj(y * SiLU(z)).

        h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t      y_t = C_t . h_t + D x_t
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, D, N, K = (
            args.hidden_dim,
            args.expand * args.hidden_dim,
            args.state_size,
            args.conv_kernel,
        )
        self.args = args
        self.in_proj = nn.Linear(d, 2 * D, bias=False)
        self.conv_weight = mx.random.uniform(-1, 1, (K, D)) / math.sqrt(K)  # depthwise, (K, D)
        self.conv_bias = mx.zeros((D,))
        self.x_proj = nn.Linear(D, args.rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(args.rank, D)
        # Steps start log-uniform in [1e-3, 1e-1] (Mamba's initialisation): bias = softplus^-1.
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (D,)))
        self.dt_proj.bias = dt + mx.log(-mx.expm1(-dt))
        self.A_log = mx.log(mx.broadcast_to(mx.arange(1, N + 1, dtype=mx.float32), (D, N)))
        self.D = mx.ones((D,))
        self.out_proj = nn.Linear(D, d, bias=False)

    def __call__(self, x, dt_shift=None, cache: RecurrentCache | None = None):
        """x (B, L, d) -> (B, L, d) and mean Delta per channel; ``dt_shift`` (B, L, r) is added
        to the step's low-rank input; ``cache`` holds [conv window, SSM state]."""
        args, N = self.args, self.args.state_size
        x_in, z = mx.split(self.in_proj(x), 2, axis=-1)  # (B, L, D) each
        window = None if cache is None else cache[0]  # the K-1 inputs before these (B, K-1, D)
        x_c, window = ops.causal_conv1d(x_in, self.conv_weight, self.conv_bias, window)
        x_c = nn.silu(x_c)
        if cache is not None:
            cache[0] = window
        dt, B_t, C_t = mx.split(self.x_proj(x_c), [args.rank, args.rank + N], axis=-1)
        if dt_shift is not None:
            dt = dt + dt_shift  # (B, L, r)
        delta = nn.softplus(self.dt_proj(dt))  # (B, L, D)
        A = -mx.exp(self.A_log)  # (D, N)
        h0 = None if cache is None else cache[1]
        if x_c.shape[1] == 1 and h0 is not None:  # one token: the O(1) recurrence
            y, h = ops.selective_scan_step(
                x_c[:, 0], delta[:, 0], A, B_t[:, 0], C_t[:, 0], self.D, h0
            )
            y = y[:, None]
        else:
            y, h = ops.selective_scan(x_c, delta, A, B_t, C_t, self.D, h0, args.chunk_size or None)
        if cache is not None:
            cache[1] = h
        return self.out_proj(y * nn.silu(z)), mx.mean(delta, axis=(0, 1))


class Block(nn.Module):
    """h + SSM(LN(h), Delta shifted by the bank's readout) + bank(LN(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.LayerNorm(args.hidden_dim, eps=args.layer_norm_eps)
        self.ssm = SelectiveSSM(args)
        if args.oscillators:
            self.oscillators = BistableKuramotoBank(args.hidden_dim, args.oscillator_args)
            self.osc_to_dt = nn.Linear(args.oscillator_args.n_features, args.rank, bias=False)
            self.osc_to_dt.weight = mx.zeros_like(self.osc_to_dt.weight)  # starts as a plain SSM

    def __call__(self, h, cache=None, key=None, force_r=None):
        x = self.norm(h)
        stats, dt_shift, bank_out = {}, None, 0.0
        if "oscillators" in self:
            bank_out, stats = self.oscillators(x, key=key, force_r=force_r)
            dt_shift = self.osc_to_dt(stats["features"])  # (B, L, r)
        mixed, mean_delta = self.ssm(x, dt_shift, cache)
        stats["delta"] = mx.mean(mean_delta)
        return h + mixed + bank_out, stats


class Model(nn.Module):
    """The K-SSM with an SSM scan. ``model(tokens, cache)`` -> logits (B, L, V)."""

    TIED_EMBEDDING = "embed.weight"
    AUX_NAME = "reg"
    mixes_sequence = True
    max_positions = None  # recurrent: no position table, no length limit

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_dim)
        self.blocks = [Block(args) for _ in range(args.n_layers)]
        self.final_norm = nn.LayerNorm(args.hidden_dim, eps=args.layer_norm_eps)

    @property
    def n_banks(self) -> int:
        return self.args.n_layers if self.args.oscillators else 0

    @property
    def layers(self):
        return self.blocks

    @property
    def default_aux_weight(self) -> float:
        return 0.5 if self.args.oscillators and self.args.bistable else 0.0

    def make_cache(self) -> list[RecurrentCache]:
        return [RecurrentCache(2) for _ in self.blocks]

    def forward(self, tokens, *, cache=None, key=None, force_r=None):
        h, stats = self.hidden(tokens, cache=cache, key=key, force_r=force_r)
        return self.embed.as_linear(h), stats

    def hidden(self, tokens, *, cache=None, key=None, force_r=None):
        """tokens (B, L) -> final-normed h (B, L, d) and stats."""
        keys = mx.random.split(key, len(self.blocks)) if key is not None else None
        h = self.embed(tokens)  # (B, L, d)
        per_layer = []
        for i, block in enumerate(self.blocks):
            target = None if force_r is None else force_r.get(i)
            layer_key = None if keys is None else keys[i]
            layer_cache = None if cache is None else cache[i]
            h, stats = block(h, cache=layer_cache, key=layer_key, force_r=target)
            per_layer.append(stats)
        stats = {"delta_mean": mx.stack([s["delta"] for s in per_layer])}  # (n_layers,)
        if self.args.oscillators:
            u_mean = mx.stack([s["u_mean"] for s in per_layer])
            det_mean = mx.stack([s["det_mean"] for s in per_layer])
            stats |= {
                "R": mx.stack([s["R"] for s in per_layer], axis=-1),  # (B, L, n_layers)
                "u": mx.stack([s["u"] for s in per_layer], axis=-1),
                "u_mean": u_mean,
                "det_mean": det_mean,
                "reg": mx.mean(regularisation(det_mean, u_mean)),
                "features": mx.stack([s["features"] for s in per_layer], axis=2),
            }
        return self.final_norm(h), stats

    def __call__(self, tokens, cache=None, return_R: bool = False, **kw):
        logits, stats = self.forward(tokens, cache=cache, **kw)
        if return_R:
            if "R" not in stats:
                raise ValueError("this model has no oscillator banks (oscillators: false)")
            return logits, mx.mean(stats["R"], axis=-1), stats["R"]
        return logits

    def aux_loss(self, stats):
        return stats["reg"] if "reg" in stats else mx.array(0.0)

    def metrics(self, stats):
        """Per layer: mean Delta (how much context the scan keeps) and, with banks, R, u, |det|."""
        out = {"delta": stats["delta_mean"]}
        if "R" in stats:
            out |= {"R": mx.mean(stats["R"], axis=(0, 1)), "u": stats["u_mean"]}
            out["det"] = stats["det_mean"]
        return out

    @staticmethod
    def sanitize(weights):
        return dict(weights)
