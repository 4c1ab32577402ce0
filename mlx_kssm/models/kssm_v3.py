"""K-SSM v3, ported exactly from the published PyTorch code (spec: "Block and model").

Glossary
    B  batch size     L  sequence length     d  hidden size (384)     V  vocabulary (100,277)
    N  oscillators per layer (192)           H  harmonics (32)        n_layers (6)

There is no sequence mixing: each position is computed from its own token and its own learned
position embedding only. This is the published model, kept as it is so that its checkpoints
load and its numbers reproduce; the K-SSM with an SSM scan is a separate architecture. Its
cache (for generation through the shared contract, see base.py) is therefore only a position
counter: each new token is one single-position forward at the next position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn

from .base import BaseModelArgs, ConfigError, PositionCache, bounded
from .oscillators import BistableKuramotoBank, OscillatorArgs, regularisation


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "kssm_v3"
    vocab_size: int = bounded(100_277, 1, 1 << 21)  # V: tiktoken cl100k_base n_vocab
    hidden_dim: int = bounded(384, 1, 1 << 14)  # d: width of the residual stream
    n_layers: int = bounded(6, 1, 256)  # number of (oscillator bank + FFN) blocks
    n_oscillators: int = bounded(192, 1, 1 << 14)  # N: Kuramoto oscillators per layer
    n_harmonics: int = bounded(32, 1, 1024)  # H: harmonics of the readout (features = 3H)
    max_positions: int = bounded(1024, 1, 1 << 20)  # learned position embeddings
    ffn_mult: int = bounded(4, 1, 64)  # FFN hidden width = ffn_mult * d
    bistable: bool = True  # clamp u to [u_min, u_max]; False = the monostable ablation
    u_min: float = bounded(0.1, -1e6, 1e6)  # lower clamp of the reduced variable u
    u_max: float = bounded(10.0, -1e6, 1e6)  # upper clamp of u (bistable only)
    train_noise: bool = True  # draw the phase noise eps in training mode (as PyTorch)
    eval_noise: bool = False  # also draw it in eval mode / generation (PyTorch always did)
    layer_norm_eps: float = bounded(1e-5, 0.0, 1.0)  # LayerNorm epsilon (PyTorch default)

    def validate(self) -> None:
        super().validate()
        if self.u_min >= self.u_max:
            raise ConfigError(f"u_min {self.u_min} must be below u_max {self.u_max}")
        d = self.hidden_dim
        per_layer = 2 * self.ffn_mult * d * d + 3 * self.n_harmonics * d + 10 * d
        n_params = (self.vocab_size + self.max_positions) * d + self.n_layers * per_layer
        if n_params > 1 << 34:  # 17 G parameters: refuse before allocating anything
            raise ConfigError(f"the config describes ~{n_params:.3g} parameters; too large")

    @property
    def n_features(self) -> int:
        """Width of the oscillator readout: Re Z_n, Im Z_n and |Z_n| for n = 1..H."""
        return 3 * self.n_harmonics

    @property
    def oscillator_args(self) -> OscillatorArgs:
        return OscillatorArgs.of(self)


# Model sizes by name. "published" is the paper's configuration; the others keep the
# architecture and the tokenizer but shrink the widths so that a laptop CPU can train them.
PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "small": dict(hidden_dim=256, n_layers=4, n_oscillators=96, n_harmonics=16),
    "tiny": dict(hidden_dim=64, n_layers=2, n_oscillators=32, n_harmonics=8, max_positions=256),
}


class Block(nn.Module):
    """Pre-norm block: h + bank(LN1(h)), then h + W2(GELU(W1(LN2(h))))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.hidden_dim
        self.oscillators = BistableKuramotoBank(d, args.oscillator_args)
        self.norm1 = nn.LayerNorm(d, eps=args.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=args.layer_norm_eps)
        # A plain list keeps the PyTorch names ffn.0 / ffn.2 (GELU holds no parameters).
        self.ffn = [nn.Linear(d, args.ffn_mult * d), nn.GELU(), nn.Linear(args.ffn_mult * d, d)]

    def __call__(self, h, key=None, force_r=None):
        out, stats = self.oscillators(self.norm1(h), key=key, force_r=force_r)
        h = h + out
        x = self.norm2(h)
        for layer in self.ffn:
            x = layer(x)
        return h + x, stats


class Model(nn.Module):
    """The K-SSM v3 language model. ``model(tokens)`` -> logits (B, L, V)."""

    TIED_EMBEDDING = "embed.weight"  # the output head is the embedding (no bias)
    mixes_sequence = False  # a position sees only its own token

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.pos_embed = 0.02 * mx.random.normal((1, args.max_positions, args.hidden_dim))
        self.embed = nn.Embedding(args.vocab_size, args.hidden_dim)
        self.blocks = [Block(args) for _ in range(args.n_layers)]
        self.final_norm = nn.LayerNorm(args.hidden_dim, eps=args.layer_norm_eps)

    # ---- the contract (base.py)

    @property
    def max_positions(self) -> int:
        return self.args.max_positions

    @property
    def n_banks(self) -> int:
        return self.args.n_layers

    @property
    def layers(self):
        return self.blocks

    @property
    def default_aux_weight(self) -> float:
        """lambda of the published loss CE + lambda * reg: 0.5 bistable, 0.0 monostable."""
        return 0.5 if self.args.bistable else 0.0

    def make_cache(self) -> list[PositionCache]:
        return [PositionCache()]

    def forward(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """tokens (B, L) -> logits (B, L, V) and stats.

        ``cache`` (from make_cache) places the tokens after the ones it has seen and advances;
        ``key`` seeds the phase noise (when it is drawn); ``force_r`` maps layer index -> the
        R that layer's phases are moved to. Because positions never mix, a slice of positions
        computed through the cache gives exactly the numbers of the full sequence.
        """
        h, stats = self.hidden(tokens, cache=cache, key=key, force_r=force_r)
        return self.embed.as_linear(h), stats  # tied head, no bias

    def hidden(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """Everything but the head: tokens (B, L) -> final-normed h (B, L, d) and stats.
        ``logits = h @ embed.weight.T``; training on a Linux CPU computes that part in numpy."""
        L = tokens.shape[1]
        offset = cache[0].offset if cache is not None else 0
        if offset + L > self.args.max_positions:
            raise ValueError(
                f"positions {offset}..{offset + L - 1} exceed max_positions "
                f"{self.args.max_positions}; use shorter sequences"
            )
        keys = mx.random.split(key, len(self.blocks)) if key is not None else None
        h = self.embed(tokens) + self.pos_embed[:, offset : offset + L]  # (B, L, d)
        per_layer = []
        for i, block in enumerate(self.blocks):
            target = None if force_r is None else force_r.get(i)
            h, stats = block(h, key=None if keys is None else keys[i], force_r=target)
            per_layer.append(stats)
        if cache is not None:
            cache[0].offset += L
        u_mean = mx.stack([s["u_mean"] for s in per_layer])  # (n_layers,)
        det_mean = mx.stack([s["det_mean"] for s in per_layer])  # (n_layers,)
        stats = {
            "R": mx.stack([s["R"] for s in per_layer], axis=-1),  # (B, L, n_layers)
            "u": mx.stack([s["u"] for s in per_layer], axis=-1),  # (B, L, n_layers)
            "u_mean": u_mean,
            "det_mean": det_mean,
            "reg": mx.mean(regularisation(det_mean, u_mean)),  # scalar
            "features": mx.stack([s["features"] for s in per_layer], axis=2),  # (B, L, n, 3H)
        }
        return self.final_norm(h), stats

    def __call__(self, tokens: mx.array, cache: list | None = None, return_R: bool = False, **kw):
        """logits (mlx-lm's convention), or (logits, R_mean, R) with return_R (PyTorch's)."""
        logits, stats = self.forward(tokens, cache=cache, **kw)
        if return_R:
            return logits, mx.mean(stats["R"], axis=-1), stats["R"]
        return logits

    def aux_loss(self, stats: dict[str, mx.array]) -> mx.array:
        """The published regulariser, mean over layers (spec: "Regularisation loss")."""
        return stats["reg"]

    AUX_NAME = "reg"  # how metrics.jsonl and the progress line name aux_loss

    def metrics(self, stats: dict[str, mx.array]) -> dict[str, mx.array]:
        """Per layer, reduced over batch and positions: R, u and |det| (u_val, delta_val)."""
        return {
            "R": mx.mean(stats["R"], axis=(0, 1)),
            "u": stats["u_mean"],
            "det": stats["det_mean"],
        }

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a PyTorch K-SSM v3 state_dict onto this model; safe to run twice.

        The names already match; the tied output head is stored twice by PyTorch and dropped.
        """
        return {k: v for k, v in weights.items() if k != "output_head.weight"}
