"""The training state on disk: everything ``kssm train --resume`` needs to continue exactly.

A checkpoint is a folder ``RUN/checkpoints/step_<8-digit step>/`` holding
    config.json, model.safetensors   the model (loadable by ``mlx_kssm.load``)
    optimizer.safetensors            ``tree_flatten(optimizer.state)`` of MLX AdamW
                                     (keys "step", "learning_rate", "<param>.m", "<param>.v")
    trainer_state.json               step, data position, seed, best val CE, history, config
It is written to a temporary folder and renamed, so a crash mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .io import CHECKPOINTS_DIR, atomic_folder, replace_folder, write_model_files

OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_training_checkpoint(
    target: str | Path,
    model,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Atomically write model + optimizer state + trainer state into the folder ``target``.

    ``optimizer_state`` is the (nested) ``optimizer.state`` or an already flat dict of arrays.
    """
    target = Path(target)
    tmp = atomic_folder(target)
    try:
        write_model_files(model, tmp)
        flat = (
            dict(tree_flatten(optimizer_state)) if _is_nested(optimizer_state) else optimizer_state
        )
        mx.save_safetensors(str(tmp / OPTIMIZER_NAME), flat)
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_optimizer_state(folder: str | Path) -> dict[str, Any]:
    """The nested optimizer state, ready for ``optimizer.state = ...``."""
    flat = mx.load(str(Path(folder) / OPTIMIZER_NAME))
    return tree_unflatten(list(flat.items()))


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())


def is_training_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / OPTIMIZER_NAME).is_file() and (folder / TRAINER_STATE_NAME).is_file()


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(step)


def _is_nested(tree: dict[str, Any]) -> bool:
    return any(isinstance(v, (dict, list)) for v in tree.values())
