"""Convert a PyTorch K-SSM v3 checkpoint into this package's model folder (issue 3).

The output is ``config.json`` + ``model.safetensors`` (``mlx_kssm.load`` reads it) and, when
the source holds training state, ``optimizer.safetensors`` + ``trainer_state.json`` in the
project's training-checkpoint format (mlx_kssm/checkpoint.py), so that ``kssm train --resume``
continues the PyTorch run. Everything is read and checked before anything is written; the
folder is written under a temporary name and renamed at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import ModelArgs
from ..io import CONFIG_NAME, WEIGHTS_NAME, save
from ..models import build_model
from ..run_folder import OPTIMIZER_NAME, TRAINER_STATE_NAME, save_training_checkpoint
from .torch_zip import CheckpointError, TensorRef, read_checkpoint
from .v3_rules import OUTPUT_HEAD, Shapes, infer_config, parameter_shapes

SAVE_DTYPES = ("float16", "bfloat16")
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
# Top-level keys of the seed's files: checkpoint_<step>.pt, best_model.pt, final_model.pt.
KNOWN_KEYS = {
    "step",
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "history",
    "best_val_loss",
    "val_loss",
    "final_stats",
}
# What a conversion writes; --force only ever replaces a folder holding nothing else.
OUTPUT_FILES = {CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME}
_CHECKPOINT_FILE = re.compile(r"checkpoint_(\d+)\.pt")
_JSON_VALUES = 2_000_000  # a 100K-step history logged at every step is ~1M values
_JSON_DEPTH = 64


@dataclass
class ConvertReport:
    """What was converted, for the CLI to print and the tests to check."""

    source: Path  # the .pt file read (the newest checkpoint when given a run folder)
    out_dir: Path
    args: ModelArgs
    n_params: int  # without the duplicated tied head
    source_dtypes: list[str]
    locations: list[str]  # devices the storages were saved from
    saved_dtype: str
    step: int | None
    training_state: bool  # optimizer.safetensors + trainer_state.json written
    torch_lr_next: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _TrainingState:
    optimizer: dict[str, np.ndarray]  # the flat MLX AdamW state
    trainer: dict[str, Any]  # trainer_state.json
    notes: list[str]


def convert(
    src: str | Path,
    out_dir: str | Path,
    monostable: bool = False,
    dtype: str | None = None,
    force: bool = False,
) -> ConvertReport:
    """Convert ``src`` (a .pt file or a run folder) into the model folder ``out_dir``.

    Raises CheckpointError with a one-line message for any bad input; nothing is written then.
    """
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(SAVE_DTYPES)}, not {dtype!r}")
    source, notes = resolve_source(Path(src))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)

    root = read_checkpoint(source)
    model_state, layout_notes = split_layout(root, source)
    notes += layout_notes
    refs = model_weights(model_state, source)
    try:
        args = infer_config({k: v.shape for k, v in refs.items()}, bistable=not monostable)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    weights = {name: refs[name].numpy().astype(np.float32, copy=False) for name in refs}

    training = None
    if "optimizer_state" in root:
        if dtype is None:
            training = convert_training_state(root, parameter_shapes(args), source)
            notes += training.notes
        else:
            notes.append(
                f"weights saved as {dtype}: the training state is left out, because a run "
                "resumed from rounded weights would not continue the PyTorch run"
            )
    _write(out_dir, args, weights, training, dtype)

    lr_next = training.trainer["source"]["torch_lr_next"] if training else None
    step = root.get("step") if isinstance(root.get("step"), int) else None
    return ConvertReport(
        source=source,
        out_dir=out_dir,
        args=args,
        n_params=sum(w.size for w in weights.values()),
        source_dtypes=sorted({r.dtype for r in refs.values()}),
        locations=sorted({r.storage.location for r in refs.values()}),
        saved_dtype=dtype or "float32",
        step=training.trainer["step"] if training else step,
        training_state=training is not None,
        torch_lr_next=lr_next,
        notes=notes,
    )


# -- finding the input and checking the output ------------------------------------------------


def resolve_source(src: Path) -> tuple[Path, list[str]]:
    """A .pt file, or a run folder's newest ``checkpoint_<step>.pt`` (said in the notes).

    A run folder without numbered checkpoints falls back to final_model.pt, then best_model.pt.
    """
    if not src.is_dir():
        return src, []  # a missing or unreadable file is reported by the reader
    found = [p for folder in (src, src / "checkpoints") for p in _numbered_checkpoints(folder)]
    if found:
        _, newest = max(found)
        return newest, [f"{src} is a run folder: converting its newest checkpoint {newest.name}"]
    for name in ("final_model.pt", "best_model.pt"):
        if (src / name).is_file():
            return src / name, [f"{src} is a run folder without checkpoint_<step>.pt: using {name}"]
    raise CheckpointError(
        f"{src} is a folder without checkpoint_<step>.pt, final_model.pt or best_model.pt"
    )


def _numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    matches = ((_CHECKPOINT_FILE.fullmatch(p.name), p) for p in folder.iterdir())
    return [(int(m.group(1)), p) for m, p in matches if m and p.is_file()]


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR unless --force, and even then one holding unrelated files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise CheckpointError(f"{out_dir} is not empty; pass --force to replace it")
    strangers = [name for name in entries if name not in OUTPUT_FILES]
    if strangers:
        # --force deletes the old folder; only ever do that to a previous conversion.
        raise CheckpointError(
            f"{out_dir} holds files a conversion does not write ({', '.join(strangers[:5])}); "
            "refusing to replace it even with --force: choose another folder"
        )


# -- the model weights ------------------------------------------------------------------------


def split_layout(root: Any, source: Path) -> tuple[dict[str, Any], list[str]]:
    """The state dict inside any of the seed's layouts, and notes on keys that were not used.

    Layouts: checkpoint_<step>.pt and best_model.pt and final_model.pt (a dict with
    ``model_state``), or a bare state dict (name -> tensor).
    """
    if not isinstance(root, dict):
        raise CheckpointError(f"{source} holds a {type(root).__name__}, not a checkpoint dict")
    if "model_state" in root:
        model_state = root["model_state"]
        if not isinstance(model_state, dict):
            raise CheckpointError(f"{source}: model_state is not a dict")
        unknown = sorted(str(k) for k in root if k not in KNOWN_KEYS)
        notes = [f"ignored unknown top-level key(s): {', '.join(unknown)}"] if unknown else []
        return model_state, notes
    if root and all(isinstance(v, TensorRef) for v in root.values()):
        return root, []
    keys = ", ".join(str(k) for k in list(root)[:10])
    raise CheckpointError(
        f"{source}: neither a K-SSM checkpoint (no model_state) nor a state dict of tensors "
        f"(top-level keys: {keys or 'none'})"
    )


def model_weights(model_state: dict[str, Any], source: Path) -> dict[str, TensorRef]:
    """The state dict's tensors, without the tied output head (checked to be tied first)."""
    not_tensors = [
        str(k)
        for k, v in model_state.items()
        if not (isinstance(k, str) and isinstance(v, TensorRef))
    ]
    if not_tensors:
        raise CheckpointError(
            f"{source}: model_state entries that are not name -> tensor: {not_tensors[:10]}"
        )
    refs = {k: v for k, v in model_state.items() if k != OUTPUT_HEAD}
    not_float = [f"{k} ({v.dtype})" for k, v in refs.items() if v.dtype not in FLOAT_DTYPES]
    if not_float:
        raise CheckpointError(f"{source}: weights that are not floating point: {not_float[:10]}")
    head, embed = model_state.get(OUTPUT_HEAD), refs.get("embed.weight")
    if head is not None and embed is not None and not _tied(head, embed):
        raise CheckpointError(
            f"{source}: {OUTPUT_HEAD} differs from embed.weight; this model ties them, so "
            "the head cannot be dropped"
        )
    return refs


def _tied(head: TensorRef, embed: TensorRef) -> bool:
    """The same storage (torch saves a tied weight once), or at least the same values."""
    if head.same_data(embed):
        return True
    return head.shape == embed.shape and np.array_equal(head.numpy(), embed.numpy())


# -- the training state -----------------------------------------------------------------------


def convert_training_state(root: dict[str, Any], shapes: Shapes, source: Path) -> _TrainingState:
    """torch AdamW + LambdaLR state -> MLX AdamW state and trainer_state.json.

    torch keys the moments by parameter index, in named_parameters() order (= ``shapes``'s
    order); MLX keys them by name. MLX AdamW with bias_correction=True then makes the update
    torch would have made (its step counter is the number of updates done, as torch's).
    """
    opt = root["optimizer_state"]
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{source}: optimizer_state is not a torch optimizer state_dict")
    hyper = _adamw_hyperparameters(opt["param_groups"], len(shapes), source)
    moments, step = _moments(opt.get("state"), shapes, source)
    optimizer = {
        "step": np.array(step, dtype=np.uint64),
        "learning_rate": np.array(hyper["lr"], dtype=np.float32),
        **moments,
    }
    scheduler = root.get("scheduler_state")
    base_lr = hyper["initial_lr"] if hyper["initial_lr"] is not None else hyper["lr"]
    notes = []
    ckpt_step = root.get("step")
    if isinstance(ckpt_step, int) and ckpt_step != step:
        notes.append(f"the checkpoint says step {ckpt_step}, the optimizer {step}; using {step}")
    history = root.get("history", [])
    if not isinstance(history, list):
        notes.append("history is not a list; left out")
        history = []
    trainer = {
        "step": step,
        # torch kept the best total loss (CE + reg), not the best CE: a fresh best/ is started.
        "best_val_ce": None,
        "history": _jsonable(history, "history"),
        "train_args": {
            "lr": base_lr,
            "beta1": hyper["betas"][0],
            "beta2": hyper["betas"][1],
            "adam_eps": hyper["eps"],
            "weight_decay": hyper["weight_decay"],
        },
        "source": {
            "converted_from": str(source.resolve()),
            "torch_lr_next": hyper["lr"],  # param_groups lr: what torch's next update uses
            "torch_scheduler": _jsonable(scheduler, "scheduler_state"),
            "best_val_loss": _jsonable(root.get("best_val_loss"), "best_val_loss"),
        },
    }
    return _TrainingState(optimizer, trainer, notes)


def _adamw_hyperparameters(groups: list[Any], n_params: int, source: Path) -> dict[str, Any]:
    """The one set of AdamW settings MLX can continue with; anything else is refused."""
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{source}: optimizer_state has no param_groups")
    indices = [i for g in groups for i in g.get("params") or []]
    if not all(isinstance(i, int) for i in indices) or sorted(indices) != list(range(n_params)):
        raise CheckpointError(
            f"{source}: the optimizer holds {len(indices)} parameters, the model {n_params}"
        )
    try:
        per_group = [_group_hyperparameters(g) for g in groups]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: optimizer hyperparameters are not numbers") from None
    for key, value in per_group[0].items():
        if any(h[key] != value for h in per_group):
            values = sorted({str(h[key]) for h in per_group})
            raise CheckpointError(
                f"{source}: optimizer param groups have {key} {', '.join(values)}; "
                "MLX AdamW takes one value for all parameters"
            )
    if any(g.get("amsgrad") or g.get("maximize") for g in groups):
        raise CheckpointError(f"{source}: AdamW with amsgrad or maximize has no MLX equivalent")
    hyper = per_group[0]
    if groups[0].get("decoupled_weight_decay") is False and hyper["weight_decay"]:
        raise CheckpointError(
            f"{source}: the optimizer is Adam with L2 weight decay, not AdamW; MLX AdamW "
            "would not continue it"
        )
    return hyper


def _group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    betas = tuple(_as_float(b) for b in group["betas"])
    if len(betas) != 2:
        raise ValueError("betas is not a pair")
    initial = group.get("initial_lr")  # set by torch's LR schedulers: the base (peak) lr
    return {
        "lr": _as_float(group["lr"]),
        "betas": betas,
        "eps": _as_float(group["eps"]),
        "weight_decay": _as_float(group["weight_decay"]),
        "initial_lr": None if initial is None else _as_float(initial),
    }


def _as_float(value: Any) -> float:
    """A number, or a one-element tensor (torch accepts a tensor lr)."""
    if isinstance(value, TensorRef) and value.size == 1:
        value = value.numpy().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _moments(state: Any, shapes: Shapes, source: Path) -> tuple[dict[str, np.ndarray], int]:
    """exp_avg / exp_avg_sq by index -> "<name>.m" / "<name>.v", and the one step count."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: optimizer_state has no state dict")
    names = list(shapes)
    if not state:  # an optimizer that never stepped: MLX starts from zero moments too
        zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        return {f"{n}.{k}": z for n, z in zeros.items() for k in ("m", "v")}, 0
    stray = [k for k in state if not (isinstance(k, int) and 0 <= k < len(names))]
    missing = [names[i] for i in range(len(names)) if i not in state]
    if stray or missing:
        raise CheckpointError(
            f"{source}: optimizer state does not cover the parameters one to one "
            f"(missing: {missing[:5]}, unexpected indices: {stray[:5]}); their step counts "
            "would differ and MLX keeps one"
        )
    moments, steps = {}, set()
    for index, name in enumerate(names):
        entry = state[index]
        m, v = (
            entry.get(k) if isinstance(entry, dict) else None for k in ("exp_avg", "exp_avg_sq")
        )
        for ref, label in ((m, "exp_avg"), (v, "exp_avg_sq")):
            if not isinstance(ref, TensorRef) or ref.shape != shapes[name]:
                got = ref.shape if isinstance(ref, TensorRef) else type(ref).__name__
                raise CheckpointError(
                    f"{source}: optimizer {label} of {name} (index {index}) is {got}, "
                    f"expected {shapes[name]}"
                )
        moments[f"{name}.m"] = m.numpy().astype(np.float32, copy=False)
        moments[f"{name}.v"] = v.numpy().astype(np.float32, copy=False)
        steps.add(_step_count(entry.get("step"), name, source))
    if len(steps) != 1:
        raise CheckpointError(
            f"{source}: parameters have different AdamW step counts {sorted(steps)}; "
            "MLX AdamW keeps one"
        )
    return moments, steps.pop()


def _step_count(value: Any, name: str, source: Path) -> int:
    """torch stores the step as a float32 0-d tensor (older versions: a plain number)."""
    try:
        value = _as_float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: optimizer state of {name} has no step count") from None
    if value < 0 or not math.isfinite(value) or value != int(value):
        raise CheckpointError(f"{source}: optimizer step of {name} is {value}, not a count")
    return int(value)


def _jsonable(value: Any, what: str) -> Any:
    """History and scheduler values as JSON: small tensors become numbers or lists.

    Bounded: pickle can share one list many times over, so a small hostile file could
    otherwise expand into an enormous (or too deeply nested) tree here.
    """
    count = 0

    def walk(v: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > _JSON_VALUES or depth > _JSON_DEPTH:
            raise CheckpointError(f"{what} is too large or too deeply nested to convert")
        if isinstance(v, dict):
            return {str(k): walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if isinstance(v, TensorRef):
            return v.numpy().tolist() if v.size <= 1024 else f"<tensor {v.shape}>"
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return repr(v)

    return walk(value, 0)


# -- writing ----------------------------------------------------------------------------------


def _write(
    out_dir: Path,
    args: ModelArgs,
    weights: dict[str, np.ndarray],
    training: _TrainingState | None,
    dtype: str | None,
) -> None:
    """Build the MLX model from the weights and write it (atomically) with the training state."""
    model = build_model(args)
    # Each array is copied into MLX once; the numpy side is mostly a view of the mapped file.
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.eval()
    try:
        if training is None:
            save(model, out_dir, dtype=getattr(mx, dtype) if dtype else None)
        else:
            optimizer = {k: mx.array(v) for k, v in training.optimizer.items()}
            save_training_checkpoint(out_dir, model, optimizer, training.trainer)
    except (OSError, RuntimeError) as err:  # MLX reports a failed write (disk full) as a
        # RuntimeError; either way the helpers have removed their temporary folder by now.
        reason = getattr(err, "strerror", None) or err
        raise CheckpointError(f"cannot write {out_dir}: {reason}") from None
