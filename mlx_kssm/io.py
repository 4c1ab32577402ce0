"""Saving and loading models: a folder with ``config.json`` (sorted keys) + ``model.safetensors``.

``load`` also accepts a training run folder (``kssm train --out RUN``): it then loads the newest
checkpoint's weights, and ``RUN/best`` holds the best ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .atomic import discard, publish_folder, temporary_folder
from .models import ConfigError, build_model, model_args_from_config
from .models.base import BaseModelArgs
from .safetensors_check import check_safetensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"


class ModelFolderError(ValueError):
    """A path that does not hold a model; the message says what to do."""


def is_model_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first (names are step_<zero-padded step>)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and is_model_folder(p))


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A model folder, or a run folder's newest checkpoint. Raises ModelFolderError."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path} does not exist; pass a model folder or a run folder")
    if is_model_folder(path):
        return path
    ckpts = checkpoint_dirs(path)
    if ckpts:
        return ckpts[-1]
    if is_model_folder(path / "best"):
        return path / "best"
    raise ModelFolderError(
        f"{path} is not a model: expected {CONFIG_NAME} + {WEIGHTS_NAME}, or a run folder "
        f"with {CHECKPOINTS_DIR}/step_*/ (use `kssm convert` for PyTorch .pt files)"
    )


MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes; never read a huge one


def read_config(folder: Path) -> BaseModelArgs:
    """The folder's validated ModelArgs (its ``model_type`` picks the architecture)."""
    path = Path(folder) / CONFIG_NAME
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelFolderError(f"{path} is over {MAX_CONFIG_BYTES} bytes; not a model config")
        with open(path, encoding="utf-8") as f:
            config = json.loads(f.read(MAX_CONFIG_BYTES + 1))
        return model_args_from_config(config)
    except ConfigError as err:
        raise ModelFolderError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ModelFolderError(f"cannot read {path}: {_one_line(err)}") from None


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(path: str | os.PathLike, strict: bool = True):
    """Load a model (in eval mode) from a model folder or a run folder."""
    folder = resolve_model_folder(path)
    args = read_config(folder)
    try:
        model = build_model(args)
    except ConfigError as err:  # e.g. a Phase-Mamba whose base is missing or changed
        raise ModelFolderError(f"{folder}: {err}") from None
    try:  # the file's header, checked before a byte of tensor data is read
        stored = check_safetensors(folder / WEIGHTS_NAME)
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{folder / WEIGHTS_NAME} is damaged: {_one_line(err)}") from None
    _check_shapes(folder, model, stored, strict)
    try:
        weights = model.sanitize(mx.load(str(folder / WEIGHTS_NAME)))
        model.load_weights(list(weights.items()), strict=strict)
    except (ValueError, RuntimeError) as err:
        raise ModelFolderError(
            f"{folder}: weights do not fit the config: {_one_line(err)}"
        ) from None
    mx.eval(model.parameters())
    model.eval()
    return model


def _check_shapes(folder: Path, model, stored: dict, strict: bool) -> None:
    """The stored tensors' names and shapes against the model the config describes."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shapes = {k: tuple(shape) for k, (_, shape) in stored.items()}
    shapes = {k: shapes[k] for k in model.sanitize(dict.fromkeys(shapes)) if k in shapes}
    missing = sorted(set(expected) - set(shapes))
    if strict and missing:
        raise ModelFolderError(
            f"{folder}: {len(missing)} weights the config needs are missing (e.g. "
            f"{missing[0][:60]}); the config and the weights are from different models"
        )
    for name, shape in shapes.items():
        if name in expected and shape != expected[name]:
            raise ModelFolderError(
                f"{folder}: {name[:60]} is stored as {shape[:8]} but the config needs "
                f"{expected[name]}; the config and the weights are from different models"
            )


def write_model_files(model, folder: Path, dtype: mx.Dtype | None = None) -> None:
    """Write config.json + model.safetensors into an existing folder (no atomicity)."""
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    mx.save_safetensors(str(folder / WEIGHTS_NAME), weights, metadata={"format": "mlx"})
    config = model.args.to_dict()
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save(model, path: str | os.PathLike, dtype: mx.Dtype | None = None) -> Path:
    """Save ``model`` to the folder ``path`` (written to a temporary name, then renamed)."""
    tmp = temporary_folder(path)
    try:
        write_model_files(model, tmp, dtype)
        return publish_folder(tmp, path, replace=True)
    finally:
        discard(tmp)
