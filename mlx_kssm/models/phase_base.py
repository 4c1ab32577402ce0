"""The base of a Phase-Mamba: an mlx-lm Mamba read from a local folder, its fingerprint, and
a random Mamba for tests (used by phase_mamba.py).

A base folder is what mlx-lm loads: ``config.json`` + ``model*.safetensors`` (e.g. written by
``mlx_lm.convert --hf-path state-spaces/mamba-2.8b-hf --mlx-path FOLDER``). It is read with
``mlx_lm.utils.load_model``, which needs no tokenizer files.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from .base import ConfigError

SUPPORTED_BASES = ("mamba", "falcon_mamba", "mamba2")

_CONFIG_LIMIT = 1 << 20
_HEADER_LIMIT = 1 << 27  # a safetensors header is a JSON index; never read more than this
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # fingerprint: 16 x 64 KiB of each weight file's data


def base_fingerprint(folder: str | Path) -> str:
    """sha256 over the base's config.json, and per weight file its name, size, safetensors
    header and 16 evenly spaced 64 KiB samples of its data: cheap for a 5 GB model, and a
    retrained base (same shapes, other values) changes it."""
    folder = Path(folder)
    digest = hashlib.sha256(_read_config_bytes(folder))
    try:
        for path in sorted(folder.glob("model*.safetensors")):
            _digest_weights(digest, path)
    except OSError as err:
        raise ConfigError(f"cannot read the base in {folder}: {err.strerror or err}") from None
    return "sha256:" + digest.hexdigest()


def _digest_weights(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        digest.update(f.read(min(header_len, _HEADER_LIMIT)))
        start = 8 + header_len
        span = max(size - start - _SAMPLE_BYTES, 0)
        for k in range(_SAMPLES):
            f.seek(min(start + span * k // (_SAMPLES - 1), size))
            digest.update(f.read(_SAMPLE_BYTES))


def _read_config_bytes(folder: Path) -> bytes:
    path = folder / "config.json"
    if not path.is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ConfigError(
            f"base_path {folder} {what}; give a folder mlx-lm can load (config.json + "
            "model.safetensors, e.g. written by mlx_lm.convert)"
        )
    try:
        if path.stat().st_size > _CONFIG_LIMIT:
            raise ConfigError(f"{path} is over {_CONFIG_LIMIT} bytes; not a model config")
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}") from None


def read_base_config(folder: str | Path) -> dict[str, Any]:
    """The base's config.json, checked to describe a Mamba mlx-lm can build."""
    folder = Path(folder)
    try:
        config = json.loads(_read_config_bytes(folder))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {folder / 'config.json'}: {err}") from None
    if not isinstance(config, dict) or config.get("model_type") not in SUPPORTED_BASES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ConfigError(
            f"the base in {folder} is a {found!r} model; phase_mamba hooks a Mamba "
            f"({', '.join(SUPPORTED_BASES)})"
        )
    if not list(folder.glob("model*.safetensors")):
        raise ConfigError(f"the base in {folder} has no model*.safetensors weights")
    return config


def load_base(folder: str | Path) -> nn.Module:
    """The mlx-lm model in ``folder`` (weights mapped lazily), frozen."""
    from mlx_lm.utils import load_model

    read_base_config(folder)
    try:
        base, _ = load_model(Path(folder), lazy=True)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as err:
        text = " ".join(str(err).split())[:200]
        raise ConfigError(f"mlx-lm cannot load the base in {folder}: {text}") from None
    return with_chunked_scan(base).freeze()


def with_chunked_scan(base: nn.Module) -> nn.Module:
    """Mamba-1 mixers compute with the chunked selective scan (mamba_lm.ScanMixer: the same
    parameters and recurrence, ~sqrt(L) sequential steps instead of mlx-lm's per-token loop;
    benchmarks/bench_phase_base.py times both). Mamba-2 bases keep mlx-lm's own."""
    from mlx_lm.models import mamba

    from .mamba_lm import ScanMixer

    for layer in getattr(base, "layers", []):
        if type(getattr(layer, "mixer", None)) is mamba.MambaBlock:
            layer.mixer.__class__ = ScanMixer
    return base


def random_base(vocab_size: int, hidden: int, layers: int, seed: int) -> nn.Module:
    """A random mlx-lm Mamba, the same for the same arguments. The global random stream is
    reseeded afterwards from a number drawn from it first, so it stays deterministic."""
    from mlx_lm.models import mamba

    args = mamba.ModelArgs(
        model_type="mamba",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        state_size=16,
        num_hidden_layers=layers,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=math.ceil(hidden / 16),
        tie_word_embeddings=True,
    )
    resume = int(mx.random.randint(0, 1 << 30, ()).item())
    mx.random.seed(seed)
    base = mamba.Model(args)
    mx.eval(base.parameters())
    mx.random.seed(resume)
    return with_chunked_scan(base).freeze()
