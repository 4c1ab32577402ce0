"""What every architecture shares: the ``ModelArgs`` base and the position cache.

The model contract (every module in this package implements it; tests/test_contract.py checks it
for each registered architecture):

    model(tokens, cache=None) -> logits (B, L, V)       mlx-lm's calling convention, so that
    model.make_cache() -> list of cache objects          mlx_lm.generate.generate_step works
    model(tokens, return_R=True) -> (logits, R_mean (B, L), R (B, L, n_banks))   with oscillators
    model.forward(tokens, *, cache=None, key=None, force_r=None) -> (logits, stats)
        stats: a dict of named arrays, returned rather than stored on modules; "R" is
        (B, L, n_banks), the order parameter per oscillator bank and position.
    model.hidden(...) -> (h, stats)                      everything but the tied head
    model.aux_loss(stats) -> scalar                      the architecture's auxiliary loss
    model.default_aux_weight                             its weight when the user gives none
    model.metrics(stats) -> {name: () or (n_banks,)}     what training logs, batch-reduced
    model.sanitize(weights) -> weights                   safe to run twice
    model.TIED_EMBEDDING                                 parameter path of the tied head, or None
    model.mixes_sequence                                 False when a position sees only itself
    model.max_positions                                  the longest sequence, or None
    model.n_banks                                        oscillator banks that force_r can index
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any

import mlx.core as mx


class ConfigError(ValueError):
    """A config.json (or ModelArgs) that cannot describe a model; the message says which field."""


def bounded(default: Any, lo: float | None = None, hi: float | None = None, **kw) -> Any:
    """A dataclass field with inclusive bounds, checked by ``BaseModelArgs.validate``."""
    return dataclasses.field(default=default, metadata={"min": lo, "max": hi}, **kw)


@dataclasses.dataclass
class BaseModelArgs:
    """Fields every architecture has. Subclasses are dataclasses that add their own."""

    model_type: str
    vocab_size: int

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BaseModelArgs:
        """Build from a dict, ignoring keys this version does not know (e.g. n_params)."""
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    @classmethod
    def from_config(cls, params: Any) -> BaseModelArgs:
        """``from_dict`` for untrusted input (a config.json): types and bounds are checked
        first, so that no model is built from a config that could not describe one."""
        if not isinstance(params, dict):
            raise ConfigError(f"a model config must be a JSON object, not {type(params).__name__}")
        args = cls.from_dict(params)
        args.validate()
        return args

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ConfigError unless every field has its declared type and lies in its bounds."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise ConfigError(f"{f.name} is {_short(value)}; it must be in [{lo}, {hi}]")


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    )
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is bool and isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return
        if t is str and isinstance(value, str):
            return
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{name} must be {names}, not {_short(value)}")


_UnionType = type(int | None)


def _short(value: Any, limit: int = 40) -> str:
    """A config value as it may appear in a one-line message (never a whole file)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PositionCache:
    """The cache of a model without sequence mixing: only the next position's index.

    It follows mlx-lm's cache protocol as far as ``generate_step`` uses it (``state``,
    ``offset``), so mlx-lm can drive our models."""

    def __init__(self):
        self.offset = 0

    @property
    def state(self) -> list[mx.array]:
        return []

    @property
    def meta_state(self) -> str:
        return str(self.offset)


class RecurrentCache:
    """One layer's recurrent state for incremental decoding: a list of arrays (None until the
    first call), e.g. [conv window, SSM state]. ``state`` is what mlx-lm evaluates."""

    def __init__(self, size: int):
        self.arrays: list[mx.array | None] = [None] * size

    def __getitem__(self, i: int) -> mx.array | None:
        return self.arrays[i]

    def __setitem__(self, i: int, value: mx.array) -> None:
        self.arrays[i] = value

    @property
    def state(self) -> list[mx.array]:
        return [a for a in self.arrays if a is not None]
