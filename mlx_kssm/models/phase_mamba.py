"""Phase-Mamba: oscillator cores (phase_core.py) on the layers of a frozen mlx-lm Mamba
(spec: docs/phase-mamba-spec.md; the original hooks layer 32 of Mamba-2.8B).

The base. Any Mamba that mlx-lm loads (``mamba``, ``falcon_mamba``, ``mamba2``) from a local
folder (phase_base.py). Its config.json and the headers and samples of its weight files give a
fingerprint, recorded in our config when the model is first built (with the absolute path), so
that a different base behind the same path is refused. With ``base_path`` null the base is a
random Mamba drawn from ``random_base_*`` (tests, and the contract test's tiny config).

The base is frozen and kept out of this model's parameters (it sits under ``_base``, a name
``parameters()`` skips): ``trainable_parameters()``, the optimizer and the saved
``model.safetensors`` hold only the cores (``cores.<bank>.*``), and a model folder is the
config naming the base plus the cores' weights.

The hook. mlx.nn has no forward hooks, so each hooked entry of ``base.layers`` is replaced by a
``CoupledLayer`` that calls the original block and hands its output to the model's core for
that layer. The base's own forward (embedding, blocks, final norm, head) runs unchanged.
Per forward call the model sets a ``_Call`` (force_r, the cores' running phases, the R each
core reports) that the coupled layers read and fill; stats are returned, not stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from ..observables import GOLDILOCKS_R, GOLDILOCKS_U, normalized_entropy
from .base import BaseModelArgs, ConfigError, bounded
from .phase_base import base_fingerprint, load_base, random_base, read_base_config
from .phase_core import COUPLINGS, DYNAMICS, CoreArgs, PhaseCore
from .phase_tones import tone_of

CORE_NAMES = ("omega", "phases", "to_phases.weight", "to_phases.bias")
CORE_NAMES += ("to_modulation.weight", "to_modulation.bias")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "phase_mamba"
    vocab_size: int = bounded(0, 0, 1 << 21)  # 0: the base's (filled in when built)
    base_path: str | None = None  # mlx-lm Mamba folder; None: a random Mamba (random_base_*)
    base_fingerprint: str | None = None  # recorded when first built; a different base is refused
    hook_layers: list[int] | None = (
        None  # hooked base layers (negative: from the end); None: middle
    )
    coupling: str = "faithful"  # faithful | multiplicative | additive (phase_core.py)
    dynamics: str = "per_call"  # per_call (the original) | per_token
    n_oscillators: int = bounded(16, 1, 1 << 14)  # N per core
    coupling_strength: float = bounded(2.0, -1e3, 1e3)  # K
    dt: float = bounded(0.1, 0.0, 10.0)
    input_gain: float = bounded(0.1, 0.0, 100.0)  # phases += input_gain * pi * tanh(...)
    modulation_scale: float = bounded(0.1, 0.0, 100.0)  # s in x (1 + s tanh m) or x + s m
    u_target: float = bounded(0.5, 0.0, 1.0)  # the paper's loss term |U - u_target| ...
    lambda_u: float = bounded(0.0, 0.0, 1e3)  # ... and its weight (0: the code, U only logged)
    random_base_hidden: int = bounded(64, 1, 1 << 12)  # only when base_path is null
    random_base_layers: int = bounded(2, 1, 256)
    random_base_seed: int = bounded(0, 0, (1 << 31) - 1)

    def validate(self) -> None:
        layers = self.hook_layers
        if layers is not None and not (
            isinstance(layers, list) and layers and all(type(i) is int for i in layers)
        ):
            raise ConfigError(
                f"hook_layers must be a non-empty list of layer indices such as [32] or "
                f"[16, 32, 48], not {str(layers)[:40]}"
            )
        self.hook_layers = None  # BaseModelArgs checks scalar fields only
        try:
            super().validate()
        finally:
            self.hook_layers = layers
        if self.coupling not in COUPLINGS:
            raise ConfigError(
                f"coupling must be one of {', '.join(COUPLINGS)}, not {self.coupling!r}"
            )
        if self.dynamics not in DYNAMICS:
            raise ConfigError(
                f"dynamics must be one of {', '.join(DYNAMICS)}, not {self.dynamics!r}"
            )
        if self.coupling == "faithful" and self.dynamics != "per_call":
            raise ConfigError(
                "the faithful coupling is the original per-call computation; use "
                "multiplicative or additive with per_token dynamics"
            )
        if self.base_path == "":
            raise ConfigError("base_path is empty; give a folder, or null for a random base")

    def core_args(self, hidden_size: int) -> CoreArgs:
        return CoreArgs(
            hidden_size=hidden_size,
            n_oscillators=self.n_oscillators,
            coupling_strength=self.coupling_strength,
            dt=self.dt,
            input_gain=self.input_gain,
            modulation_scale=self.modulation_scale,
            coupling=self.coupling,
            dynamics=self.dynamics,
        )


# A phase_mamba's size is its base's; the presets (which also pick a training schedule) leave
# the core's settings at their defaults.
PRESETS: dict[str, dict[str, Any]] = {"published": {}, "small": {}, "tiny": {}}


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill what the base decides (vocabulary, fingerprint) when a base_path is given and the
    vocabulary is not, so that the data can be checked against it before a model is built."""
    if config.get("base_path") and not config.get("vocab_size"):
        fields = {k: v for k, v in config.items() if k not in ("model_type", "base_path")}
        fields.pop("vocab_size", None)
        return args_for_base(config["base_path"], **fields).to_dict()
    return config


def args_for_base(base_path: str | Path, **fields) -> ModelArgs:
    """A validated config for a core on the base in ``base_path``: its vocabulary read from the
    base, its fingerprint recorded, ``fields`` (hook_layers, coupling, ...) as given."""
    config = read_base_config(base_path)
    args = ModelArgs(
        **{
            "vocab_size": int(config.get("vocab_size", 0)),
            "base_path": str(Path(base_path).expanduser().resolve()),
            "base_fingerprint": base_fingerprint(base_path),
            **fields,
        }
    )
    args.validate()
    return args


# ---------------------------------------------------------------------------- the hook


@dataclass
class _Call:
    """What one forward call tells the coupled layers, and what they report back."""

    force_r: dict[int, float]
    phases: Any  # per_token: an ArraysCache with each core's running phases (B, N), or None
    R: list = field(default_factory=list)  # per bank: (B, L)


class CoupledLayer(nn.Module):
    """A base layer whose output goes through core ``bank`` of the owning model."""

    def __init__(self, layer: nn.Module, bank: int, couple):
        super().__init__()
        self.layer = layer
        self.bank = bank
        self._couple = couple  # a bound method: kept out of the module tree (not an array)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        return self._couple(self.bank, self.layer(x, *args, **kwargs))


# ---------------------------------------------------------------------------- the model


class Model(nn.Module):
    """Phase-Mamba. ``model(tokens)`` -> logits (B, L, V); see the module docstring."""

    TIED_EMBEDDING = None  # the head belongs to the frozen base, not to our parameters
    mixes_sequence = True
    max_positions = None
    AUX_NAME = "u_loss"

    def __init__(self, args: ModelArgs):
        super().__init__()
        base = self._build_base(args)  # resolves vocab_size, base_path, base_fingerprint
        n_layers = len(base.layers)
        layers = [n_layers // 2] if args.hook_layers is None else args.hook_layers
        bad = [i for i in layers if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError(f"hook_layers {bad} are outside the base's {n_layers} layers")
        resolved = sorted({i % n_layers for i in layers})
        if len(resolved) != len(layers):
            raise ConfigError(f"hook_layers {layers} name a layer twice")
        args.hook_layers = resolved  # the config records the layers actually hooked
        self.args = args
        self._base = base  # "_": not a parameter of this model (module docstring)
        self._call: _Call | None = None
        hidden = base.args.hidden_size
        self.cores = [PhaseCore(args.core_args(hidden)) for _ in resolved]
        for bank, i in enumerate(resolved):
            base.layers[i] = CoupledLayer(base.layers[i], bank, self._couple)
        self._n_base_caches = len(base.make_cache())

    @staticmethod
    def _build_base(args: ModelArgs) -> nn.Module:
        if args.base_path is None:
            if args.vocab_size < 1:
                raise ConfigError("a random base (base_path null) needs vocab_size >= 1")
            return random_base(
                args.vocab_size, args.random_base_hidden, args.random_base_layers,
                args.random_base_seed,
            )  # fmt: skip
        folder = Path(args.base_path).expanduser().resolve()
        found = base_fingerprint(folder) if folder.is_dir() else None
        if args.base_fingerprint and found and found != args.base_fingerprint:
            raise ConfigError(
                f"the base in {folder} is not the one this core was built on (fingerprint "
                f"{found[7:19]}..., recorded {args.base_fingerprint[7:19]}...); point "
                "base_path at the original base"
            )
        base = load_base(folder)
        vocab = base.args.vocab_size
        if args.vocab_size not in (0, vocab):
            raise ConfigError(f"vocab_size {args.vocab_size} differs from the base's {vocab}")
        args.vocab_size, args.base_path, args.base_fingerprint = vocab, str(folder), found
        return base

    # ---- the contract (base.py)

    @property
    def base(self) -> nn.Module:
        """The frozen mlx-lm model, with the coupled layers in place."""
        return self._base

    @property
    def n_banks(self) -> int:
        return len(self.cores)

    @property
    def layers(self):
        return self._base.layers

    @property
    def default_aux_weight(self) -> float:
        """lambda_U: 0 by default, as the original code (its U term was logged, not trained)."""
        return self.args.lambda_u

    def make_cache(self) -> list:
        """The base's caches, then (per_token) one ArraysCache of the cores' running phases."""
        from mlx_lm.models.cache import ArraysCache

        cache = self._base.make_cache()
        if self.args.dynamics == "per_token":
            cache.append(ArraysCache(size=self.n_banks))
        return cache

    def set_dtype(self, dtype: mx.Dtype, predicate=lambda t: mx.issubdtype(t, mx.floating)):
        """The cores and the base (which ``parameters()`` does not reach) both."""
        super().set_dtype(dtype, predicate)
        self._base.set_dtype(dtype, predicate)

    def forward(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """tokens (B, L) -> logits (B, L, V) and stats: "R" (B, L, n_banks) and "U" (B,), the
        normalised entropy of the last position's next-token distribution (as the original's
        U), and its batch mean "U_mean". ``force_r`` maps bank -> target R: that core's phases are moved to it before the
        modulation reads them. ``key`` is unused (nothing here draws noise)."""
        h, R = self._body(tokens, cache, force_r)
        logits = self._head(h)
        return logits, self._stats(R, logits[:, -1])

    def hidden(
        self,
        tokens: mx.array,
        *,
        cache: list | None = None,
        key: mx.array | None = None,
        force_r: dict[int, float] | None = None,
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """Everything but the head: the base's final-normed hidden states, and the stats of
        forward. U needs only the last position's logits, so a step whose head runs outside MLX
        (steps.py, numpy) still gets U, R·U and the U term from here."""
        h, R = self._body(tokens, cache, force_r)
        return h, self._stats(R, self._head(h[:, -1]))

    def _body(self, tokens: mx.array, cache: list | None, force_r) -> tuple[mx.array, mx.array]:
        """tokens (B, L) -> the base's final-normed hidden states (B, L, d) and R (B, L, n_banks)."""
        force_r = self._checked_force(force_r)
        base_cache, phases = None, None
        if cache is not None:
            base_cache = cache[: self._n_base_caches]
            if self.args.dynamics == "per_token":
                phases = cache[self._n_base_caches]
        call = _Call(force_r, phases, [None] * self.n_banks)
        self._call = call
        try:
            h = self._base.backbone(tokens, base_cache)
        finally:
            self._call = None
        return h, mx.stack(call.R, axis=-1)

    @staticmethod
    def _stats(R: mx.array, last_logits: mx.array) -> dict[str, mx.array]:
        U = normalized_entropy(last_logits)  # (B,)
        # One node for the batch mean that aux_loss and metrics both return: two identical
        # mx.mean nodes among the outputs of a compiled value_and_grad make MLX 0.32's
        # compile fail ("_Map_base::at").
        return {"R": R, "U": U, "U_mean": mx.mean(U)}

    def __call__(self, tokens: mx.array, cache: list | None = None, return_R: bool = False, **kw):
        """logits (mlx-lm's convention), or (logits, R_mean, R) with return_R."""
        logits, stats = self.forward(tokens, cache=cache, **kw)
        if return_R:
            return logits, mx.mean(stats["R"], axis=-1), stats["R"]
        return logits

    def aux_loss(self, stats: dict[str, mx.array]) -> mx.array:
        """The paper's U term |mean U - u_target| (differentiable here; weight lambda_u)."""
        return mx.abs(stats["U_mean"] - self.args.u_target)

    def metrics(self, stats: dict[str, mx.array]) -> dict[str, mx.array]:
        """R per bank (mean over batch and positions); at the last position, U, R·U and the
        fraction of sequences in the Goldilocks zone (R 0.40-0.55 and U 0.40-0.60)."""
        R_last = mx.mean(stats["R"][:, -1], axis=-1)  # (B,)
        U = stats["U"]
        inside = (R_last >= GOLDILOCKS_R[0]) & (R_last <= GOLDILOCKS_R[1])
        inside = inside & (U >= GOLDILOCKS_U[0]) & (U <= GOLDILOCKS_U[1])
        return {
            "R": mx.mean(stats["R"], axis=(0, 1)),
            "U": stats["U_mean"],
            "RU": mx.mean(R_last * U),
            "goldilocks": mx.mean(inside.astype(mx.float32)),
        }

    @staticmethod
    def labels(row: dict) -> dict[str, str]:
        """The paper's tone (phase_tones.py) of a logged row's R (its mean over the cores),
        logged beside it per train row and evaluation, as the original logged it per step."""
        R = row.get("R")
        return {"tone": tone_of(R)} if isinstance(R, float) and R == R else {}

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The original core's bare names (omega, phases, ...) become core 0's; safe twice."""
        return {(f"cores.0.{k}" if k in CORE_NAMES else k): v for k, v in weights.items()}

    # ---- the coupling

    def _head(self, h: mx.array) -> mx.array:
        base = self._base
        if getattr(base.args, "tie_word_embeddings", True):
            return base.backbone.embeddings.as_linear(h)
        return base.lm_head(h)

    def frozen_head_weight(self) -> mx.array | None:
        """The base's output matrix (V, d), so a training step can run the head outside MLX
        (steps.py); None when the head is not a plain dense matrix (quantized, or a bias)."""
        base = self._base
        if getattr(base.args, "tie_word_embeddings", True):
            head = base.backbone.embeddings
            return head.weight if type(head) is nn.Embedding else None
        head = base.lm_head
        return head.weight if type(head) is nn.Linear and "bias" not in head else None

    def _checked_force(self, force_r: dict[int, float] | None) -> dict[int, float]:
        for bank, target in (force_r or {}).items():
            if not (isinstance(bank, int) and 0 <= bank < self.n_banks):
                raise ValueError(f"force_r names bank {bank!r}; this model has {self.n_banks}")
            if not 0.0 <= float(target) <= 1.0:
                raise ValueError(f"force_r target {target} for bank {bank} is not in [0, 1]")
        return dict(force_r or {})

    def _couple(self, bank: int, x: mx.array) -> mx.array:
        """Called by CoupledLayer with the hooked layer's output x (B, L, d)."""
        call = self._call or _Call({}, None, [None] * self.n_banks)  # the base called directly
        core, target = self.cores[bank], call.force_r.get(bank)
        B, L = x.shape[:2]
        if self.args.dynamics == "per_call":
            out, R = core.per_call(x, target)
            R = mx.broadcast_to(R, (B, L))
        else:
            start = None if call.phases is None else call.phases[bank]
            start = core.start(B) if start is None else start
            out, R, end = core.per_token(x, start, target)
            if call.phases is not None:
                call.phases[bank] = end
        call.R[bank] = R
        return out
