"""mlx-lm's own Mamba (``mlx_lm.models.mamba``) as a plain base architecture: no oscillators,
trainable here like any other model and saved as a folder mlx-lm loads (issue 12).

Why. A Phase-Mamba needs a pretrained Mamba to hook; this one can be trained here, offline,
on the shared corpora with cl100k_base, and then serves as its base (``--base RUN/best``).

How. ``Model`` is mlx-lm's ``mamba.Model`` itself (same parameter names, same sanitize, same
cache) with the rest of our contract (base.py) added: ``forward`` / ``hidden`` with stats
(``R`` of shape (B, L, 0): there are no banks), no auxiliary loss, no metrics, the tied head
named for the numpy head. ``ModelArgs`` has mlx-lm's fields under mlx-lm's names and
``model_type`` "mamba", so that the config.json we write is one mlx-lm reads (it ignores our
extra key ``tokenizer``), and an mlx-lm Mamba folder (e.g. ``mlx_lm.convert`` of
state-spaces/mamba-130m-hf) loads here too, for ``kssm sample`` and ``kssm compare``.

Tokenizer. ``tokenizer`` names the one the model was trained with: a fresh training run
records "cl100k_base" (``complete_config``); null means the folder's own tokenizer files
(mlx-lm conversions), see tokenizer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models import mamba
from mlx_lm.models.activations import swiglu

from .. import ops
from .base import BaseModelArgs, ConfigError, bounded

TOKENIZER = "cl100k_base"  # what a Mamba trained here is trained with


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "mamba"  # mlx-lm's name: its loader picks mlx_lm.models.mamba from it
    vocab_size: int = bounded(100_277, 1, 1 << 21)  # cl100k_base's n_vocab
    hidden_size: int = bounded(768, 1, 1 << 15)  # d (the published preset: mamba-130m's)
    intermediate_size: int = bounded(1536, 1, 1 << 16)  # the SSM's width, 2 d in Mamba
    state_size: int = bounded(16, 1, 1024)  # N of the selective scan
    num_hidden_layers: int = bounded(24, 1, 512)
    conv_kernel: int = bounded(4, 1, 64)
    use_bias: bool = False  # in_proj / out_proj biases
    use_conv_bias: bool = True
    time_step_rank: int = bounded(48, 1, 1 << 14)  # Delta's low rank, ceil(d / 16) in Mamba
    tie_word_embeddings: bool = True  # the head is the embedding
    use_bcdt_rms: bool = False  # falcon-mamba's extra norms (mlx-lm)
    mixer_rms_eps: float = bounded(1e-6, 0.0, 1.0)
    tokenizer: str | None = None  # "cl100k_base"; None: the folder's tokenizer files

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """As mlx-lm reads a config: ``time_step_rank`` may be "auto" (ceil(d / 16))."""
        params = dict(params)
        if params.get("time_step_rank") == "auto" and isinstance(params.get("hidden_size"), int):
            params["time_step_rank"] = math.ceil(params["hidden_size"] / 16)
        return super().from_dict(params)

    def validate(self) -> None:
        super().validate()
        if self.model_type != "mamba":
            raise ConfigError(f"model_type {self.model_type!r} is not mlx-lm's Mamba ('mamba')")
        d, e, n = self.hidden_size, self.intermediate_size, self.state_size
        per_layer = 3 * d * e + e * (self.conv_kernel + 2 * self.time_step_rank + 3 * n + 3)
        n_params = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        n_params += self.num_hidden_layers * per_layer
        if n_params > 1 << 34:  # 17 G parameters: refuse before allocating anything
            raise ConfigError(f"the config describes ~{n_params:.3g} parameters; too large")


def _sizes(d: int, layers: int) -> dict[str, int]:
    """Mamba's own proportions: intermediate 2 d, Delta rank ceil(d / 16)."""
    return dict(
        hidden_size=d,
        num_hidden_layers=layers,
        intermediate_size=2 * d,
        time_step_rank=math.ceil(d / 16),
    )


# Model sizes by name: "published" is mamba-130m's shape (with cl100k_base's vocabulary); the
# others fit a CPU. tiny keeps 4 layers, so that a Phase-Mamba on it can hook a middle layer
# (2), a late one (3) or several. Measured on a loaded 2-core Xeon (MLX CPU, numpy head), one
# step of 16 x 64 tokens took ~2.5 s of CPU at d 64 with 2 layers and ~6.5 s at d 128 with 4.
PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "small": _sizes(256, 8),
    "tiny": _sizes(64, 4),
}


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """A fresh model is trained with cl100k_base (the data pipeline's default): record it."""
    return {**config, "tokenizer": config.get("tokenizer") or TOKENIZER}


class ScanMixer(mamba.MambaBlock):
    """mlx-lm's Mamba mixer with its per-token loop over the sequence replaced by the chunked
    selective scan (ops.selective_scan): the same recurrence and numbers (tests compare the
    logits with mlx-lm's), ~sqrt(L) sequential steps instead of L, which is what makes
    training on a CPU bearable. Parameters, cache and everything else are mlx-lm's."""

    def _process_sequence(self, x, conv_cache, state_cache):
        xz = self.in_proj(x)
        x, z = xz.split(indices_or_sections=2, axis=-1)
        K = self.conv_kernel_size
        if conv_cache is not None:
            x_full = mx.concatenate([conv_cache, x], axis=1)
        else:
            x_full = mx.pad(x, [(0, 0), (K - 1, 0), (0, 0)])
        x = nn.silu(self.conv1d(x_full))
        delta, B, C = mx.split(
            self.x_proj(x),
            [self.time_step_rank, self.time_step_rank + self.ssm_state_size],
            axis=-1,
        )
        if self.use_bcdt_rms:
            eps = self.args.mixer_rms_eps
            delta, B, C = (mx.fast.rms_norm(a, weight=None, eps=eps) for a in (delta, B, C))
        delta = nn.softplus(self.dt_proj(delta))
        A = -mx.exp(self.A_log)
        y, state = ops.selective_scan(x, delta, A, B, C, self.D, h0=state_cache)
        return self.out_proj(swiglu(z, y)), (x_full[:, -(K - 1) :, :], state)


class Model(mamba.Model):
    """mlx-lm's Mamba language model with our contract. ``model(tokens)`` -> logits."""

    mixes_sequence = True
    max_positions = None
    n_banks = 0  # no oscillators: force_r has nothing to index
    default_aux_weight = 0.0

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for layer in self.backbone.layers:
            # The same module and parameters, computed with the chunked scan (ScanMixer adds
            # no state, so switching the class of mlx-lm's mixer is all it takes).
            layer.mixer.__class__ = ScanMixer

    @property
    def TIED_EMBEDDING(self) -> str | None:  # noqa: N802  (the contract's name)
        return "backbone.embeddings.weight" if self.args.tie_word_embeddings else None

    def forward(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """tokens (B, L) -> logits (B, L, V) and stats {"R": (B, L, 0)}; ``key`` is unused."""
        h, stats = self.hidden(tokens, cache=cache, key=key, force_r=force_r)
        return self._head(h), stats

    def hidden(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """The final-normed hidden states (B, L, d), before the head."""
        if force_r:
            raise ValueError("force_r: this Mamba has no oscillators to force")
        return self.backbone(tokens, cache), {"R": mx.zeros((*tokens.shape, 0))}

    def _head(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.backbone.embeddings.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """mlx-lm's rule (a PyTorch-layout conv1d weight (e, 1, K) becomes MLX's (e, K, 1)),
        safe twice; names without arrays (the loader's shape check) pass unchanged."""

        def fix(name: str, value):
            if "conv1d.weight" in name and value is not None and value.shape[-1] != 1:
                return value.moveaxis(2, 1)
            return value

        return {name: fix(name, value) for name, value in weights.items()}

    def aux_loss(self, stats: dict[str, mx.array]) -> mx.array:
        return mx.array(0.0)

    def metrics(self, stats: dict[str, mx.array]) -> dict[str, mx.array]:
        return {}
