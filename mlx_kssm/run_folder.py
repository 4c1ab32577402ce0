"""The run folder of ``kssm train --out RUN``: its whole layout, and the files' safe writing.

    RUN/train_config.json          the resolved TrainArgs + ModelArgs, data, aux weight
    RUN/metrics.jsonl              one JSON object per line: "train", "eval" and event rows
    RUN/checkpoints/step_XXXXXXXX/ the last ``keep_last`` training checkpoints:
        config.json, model.safetensors   the model (loadable by ``mlx_kssm.load``)
        optimizer.safetensors            ``tree_flatten(optimizer.state)`` of MLX AdamW
        trainer_state.json               step, data position, seed, best val CE, history, args
    RUN/best/                      the weights with the lowest val CE so far (+ best.json)
    RUN/train.lock                 held while a training writes the folder

Every folder and file is written under a temporary name, flushed to disk and renamed into place
(mlx_kssm/atomic.py, the package's one write-then-rename helper), so a crash mid-write leaves
the previous one intact; temporaries of a killed run are removed by the next one.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .atomic import atomic_write_text, discard, publish_folder, temporary_folder
from .io import CHECKPOINTS_DIR, WEIGHTS_NAME, checkpoint_dirs, write_model_files
from .jsonl import read_rows, strict_json

METRICS_NAME = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
LOCK_NAME = "train.lock"
BEST_DIR = "best"
BEST_INFO = "best.json"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"

__all__ = ["CHECKPOINTS_DIR", "WEIGHTS_NAME", "checkpoint_dirs"]  # re-exported layout names


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(step)


def is_training_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / OPTIMIZER_NAME).is_file() and (folder / TRAINER_STATE_NAME).is_file()


def training_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's resumable checkpoints, oldest first."""
    return [p for p in checkpoint_dirs(run_dir) if is_training_checkpoint(p)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why a training checkpoint cannot be resumed (one line), or None when it looks intact:
    its config validates, its trainer state parses and its tensor files have sound headers."""
    from .io import ModelFolderError, read_config
    from .safetensors_check import check_safetensors

    try:
        read_config(folder)
        state = load_trainer_state(folder)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{TRAINER_STATE_NAME} has no step"
        for name in (WEIGHTS_NAME, OPTIMIZER_NAME):
            check_safetensors(folder / name)
    except ModelFolderError as err:
        return str(err)
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        return " ".join(str(err).split())[:200]
    return None


def save_training_checkpoint(
    target: str | Path,
    model,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Atomically write model + optimizer state + trainer state into the folder ``target``.

    ``optimizer_state`` is the (nested) ``optimizer.state`` or an already flat dict of arrays.
    """
    tmp = temporary_folder(target)
    try:
        write_model_files(model, tmp)
        flat = (
            dict(tree_flatten(optimizer_state)) if _is_nested(optimizer_state) else optimizer_state
        )
        mx.save_safetensors(str(tmp / OPTIMIZER_NAME), flat)
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
        return publish_folder(tmp, target, replace=True)  # flushed to disk, then renamed
    finally:
        discard(tmp)


def load_optimizer_state(folder: str | Path) -> dict[str, Any]:
    """The nested optimizer state, ready for ``optimizer.state = ...``."""
    flat = mx.load(str(Path(folder) / OPTIMIZER_NAME))
    return tree_unflatten(list(flat.items()))


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())


def drop_old_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_best(run_dir: Path, model, info: dict[str, Any]) -> Path:
    """RUN/best/: the model and ``info`` (step, val CE, ...) as best.json."""
    target = Path(run_dir) / BEST_DIR
    tmp = temporary_folder(target)
    try:
        write_model_files(model, tmp)
        (tmp / BEST_INFO).write_text(json.dumps(strict_json(info), indent=2) + "\n")
        return publish_folder(tmp, target, replace=True)
    finally:
        discard(tmp)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary folders of writes cut short (a crash, kill -9); call only under the lock."""
    for parent in (run_dir, run_dir / CHECKPOINTS_DIR):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)


def _is_nested(tree: dict[str, Any]) -> bool:
    return any(isinstance(v, (dict, list)) for v in tree.values())


# --------------------------------------------------------------------------- JSON files


def write_json(path: Path, obj: Any) -> None:
    """Write a JSON file under a temporary name, then rename it into place."""
    atomic_write_text(path, json.dumps(strict_json(obj), indent=2) + "\n")


class MetricsLog:
    """``metrics.jsonl``, appended one row at a time. On resume, rows after the checkpoint's
    step (written before a crash, and about to be recomputed) are dropped first."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = [row for row in read_rows(path) if row.get("step", 0) <= keep_until]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
