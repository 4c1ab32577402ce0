"""K-SSM v3, ported exactly from the published PyTorch code (spec: "Block and model").

Glossary
    B  batch size     L  sequence length     d  hidden size (384)     V  vocabulary (100,277)
    N  oscillators per layer (192)           H  harmonics (32)        n_layers (6)

There is no sequence mixing: each position is computed from its own token and its own learned
position embedding only. This is the published model, kept as it is so that its checkpoints
load and its numbers reproduce; the K-SSM with an SSM scan is a separate architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx import nn

from ..config import ModelArgs
from .oscillators import BistableKuramotoBank, regularisation


@dataclass
class ForwardStats:
    """Everything the forward pass monitors, returned rather than stashed on modules."""

    R_all: mx.array  # (B, L, n_layers) order parameter per layer
    R_mean: mx.array  # (B, L) mean over layers
    u: mx.array  # (B, L, n_layers) reduced variable per position
    u_mean: mx.array  # (n_layers,) mean u per layer (u_val)
    det_mean: mx.array  # (n_layers,) mean |det| per layer (delta_val)
    reg_loss: mx.array  # scalar, mean over layers of the regulariser
    features: list[mx.array]  # per layer, the readout's input (B, L, 3H)


class Block(nn.Module):
    """Pre-norm block: h + bank(LN1(h)), then h + W2(GELU(W1(LN2(h))))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.hidden_dim
        self.oscillators = BistableKuramotoBank(args)
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

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.pos_embed = 0.02 * mx.random.normal((1, args.max_positions, args.hidden_dim))
        self.embed = nn.Embedding(args.vocab_size, args.hidden_dim)
        self.blocks = [Block(args) for _ in range(args.n_layers)]
        self.final_norm = nn.LayerNorm(args.hidden_dim, eps=args.layer_norm_eps)

    def forward(
        self,
        tokens: mx.array,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
        offset: int = 0,
    ) -> tuple[mx.array, ForwardStats]:
        """tokens (B, L) at positions offset..offset+L-1 -> logits (B, L, V) and stats.

        ``key`` seeds the phase noise (when it is drawn); ``force_r`` maps layer index -> the
        R that layer's phases are moved to. Because positions never mix, computing a slice of
        positions with ``offset`` gives exactly the same numbers as the full sequence.
        """
        h, stats = self.hidden(tokens, key=key, force_r=force_r, offset=offset)
        return self.embed.as_linear(h), stats  # tied head, no bias

    def hidden(
        self,
        tokens: mx.array,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
        offset: int = 0,
    ) -> tuple[mx.array, ForwardStats]:
        """Everything but the head: tokens (B, L) -> final-normed h (B, L, d) and stats.
        ``logits = h @ embed.weight.T``; training on a Linux CPU computes that part in numpy."""
        L = tokens.shape[1]
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
        h = self.final_norm(h)
        R_all = mx.stack([s["R"] for s in per_layer], axis=-1)
        u_mean = mx.stack([s["u_mean"] for s in per_layer])
        det_mean = mx.stack([s["det_mean"] for s in per_layer])
        stats = ForwardStats(
            R_all=R_all,
            R_mean=mx.mean(R_all, axis=-1),
            u=mx.stack([s["u"] for s in per_layer], axis=-1),
            u_mean=u_mean,
            det_mean=det_mean,
            reg_loss=mx.mean(regularisation(det_mean, u_mean)),
            features=[s["features"] for s in per_layer],
        )
        return h, stats

    def __call__(self, tokens: mx.array, return_R: bool = False, **kwargs):
        """PyTorch-compatible call: logits, or (logits, R_mean, R_all) with return_R."""
        logits, stats = self.forward(tokens, **kwargs)
        return (logits, stats.R_mean, stats.R_all) if return_R else logits

    @property
    def layers(self):
        return self.blocks

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a PyTorch K-SSM v3 state_dict onto this model; safe to run twice.

        The names already match; the tied output head is stored twice by PyTorch and dropped.
        """
        return {k: v for k, v in weights.items() if k != "output_head.weight"}
