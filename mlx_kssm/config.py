"""One source of defaults: the model description (ModelArgs) and the named presets.

The defaults of ModelArgs are the published K-SSM v3 configuration (46,246,722 parameters).
The CLI, the converter and the tests all read their defaults from here.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelArgs:
    model_type: str = "kssm_v3"  # architecture name; "kssm_v3" = the faithful PyTorch port
    vocab_size: int = 100_277  # V: tiktoken cl100k_base n_vocab
    hidden_dim: int = 384  # d: width of the residual stream
    n_layers: int = 6  # number of (oscillator bank + FFN) blocks
    n_oscillators: int = 192  # N: Kuramoto oscillators per layer
    n_harmonics: int = 32  # H: harmonics of the readout (features = 3H)
    max_positions: int = 1024  # learned position embeddings; sequences are at most this long
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * d
    bistable: bool = True  # clamp u to [u_min, u_max]; False = the monostable ablation
    u_min: float = 0.1  # lower clamp of the reduced variable u (bistable only)
    u_max: float = 10.0  # upper clamp of u (bistable only)
    train_noise: bool = True  # draw the phase noise eps in training mode (as PyTorch)
    eval_noise: bool = False  # also draw it in eval mode / generation (PyTorch always did)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (PyTorch default)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        """Build from a dict, ignoring keys this version does not know (e.g. n_params)."""
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def n_features(self) -> int:
        """Width of the oscillator readout: Re Z_n, Im Z_n and |Z_n| for n = 1..H."""
        return 3 * self.n_harmonics


# Model sizes by name. "published" is the paper's configuration; the others keep the
# architecture and the tokenizer but shrink the widths so that a laptop CPU can train them.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "small": dict(hidden_dim=256, n_layers=4, n_oscillators=96, n_harmonics=16),
    "tiny": dict(hidden_dim=64, n_layers=2, n_oscillators=32, n_harmonics=8, max_positions=256),
}


def model_args_for(preset: str, **overrides: Any) -> ModelArgs:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return ModelArgs.from_dict({**MODEL_PRESETS[preset], **overrides})
