"""A torch training state (AdamW + LambdaLR) -> MLX AdamW state and trainer_state.json.

Two kinds of failure are told apart:
- NotContinuable: a well-formed state that MLX AdamW cannot continue (SGD or another
  optimizer, AdamW with amsgrad, Adam with L2 decay, hyperparameters that differ between
  parameter groups). The weights are still good: the converter writes them and says why the
  training state was left out.
- CheckpointError: an AdamW state that contradicts itself or the model (moments of the wrong
  shape, parameters missing, step counts that differ, hyperparameters that are not numbers):
  the file is damaged or not what it claims, and it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError
from .pickle_guard import clip, describe
from .torch_zip import TensorRef
from .v3_rules import Shapes

_JSON_VALUES = 2_000_000  # a 100K-step history logged at every step is ~1M values
_JSON_DEPTH = 64
# param_groups keys that name the optimizer torch saved (AdamW's groups have "betas").
_OPTIMIZER_SIGNS = [
    ({"momentum", "dampening"}, "SGD"),
    ({"alpha", "centered"}, "RMSprop"),
    ({"lr_decay"}, "Adagrad"),
    ({"rho"}, "Adadelta"),
    ({"etas", "step_sizes"}, "Rprop"),
    ({"lambd", "t0"}, "ASGD"),
]


class NotContinuable(Exception):
    """A training state MLX AdamW cannot continue; the message says why (no path, one line)."""


@dataclass
class TrainingState:
    optimizer: dict[str, np.ndarray]  # the flat MLX AdamW state
    trainer: dict[str, Any]  # trainer_state.json
    notes: list[str]


def convert_training_state(root: dict[str, Any], shapes: Shapes, source: Path) -> TrainingState:
    """torch AdamW + LambdaLR state -> MLX AdamW state and trainer_state.json.

    torch keys the moments by parameter index, in named_parameters() order (= ``shapes``'s
    order); MLX keys them by name. MLX AdamW with bias_correction=True then makes the update
    torch would have made (its step counter is the number of updates done, as torch's).
    """
    opt = root["optimizer_state"]
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise NotContinuable("optimizer_state is not a torch optimizer state_dict")
    groups = opt["param_groups"]
    if not groups or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{source}: optimizer_state has no param_groups")
    _check_is_adamw(groups)
    hyper = _adamw_hyperparameters(groups, len(shapes), source)
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
        shown = describe(ckpt_step, 30)
        notes.append(f"the checkpoint says step {shown}, the optimizer {step}; using {step}")
    history = root.get("history", [])
    if not isinstance(history, list):
        notes.append("history is not a list; left out")
        history = []
    trainer = {
        "step": step,
        # torch kept the best total loss (CE + reg), not the best CE: a fresh best/ is started.
        "best_val_ce": None,
        "history": jsonable(history, "history"),
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
            "torch_scheduler": jsonable(scheduler, "scheduler_state"),
            "best_val_loss": jsonable(root.get("best_val_loss"), "best_val_loss"),
        },
    }
    return TrainingState(optimizer, trainer, notes)


def _check_is_adamw(groups: list[dict]) -> None:
    """NotContinuable unless the groups are those of torch's Adam family (they have betas)."""
    if all("betas" in g for g in groups):
        return
    keys = set().union(*(g.keys() for g in groups))
    name = next((name for signs, name in _OPTIMIZER_SIGNS if signs <= keys), None)
    what = f"{name}, not AdamW" if name else "not AdamW (its param_groups have no betas)"
    raise NotContinuable(f"the optimizer is {what}, so MLX AdamW cannot continue it")


def _adamw_hyperparameters(groups: list[dict], n_params: int, source: Path) -> dict[str, Any]:
    """The one set of AdamW settings MLX can continue with."""
    lists = [g.get("params") or [] for g in groups]
    held = sum(len(p) if isinstance(p, list) else 0 for p in lists)
    if held != n_params or not all(isinstance(p, list) for p in lists):
        # checked before the lists are joined: a small file can repeat one long list
        raise CheckpointError(
            f"{source}: the optimizer holds {held} parameters, the model {n_params}"
        )
    indices = [i for params in lists for i in params]
    if not all(type(i) is int for i in indices) or sorted(indices) != list(range(n_params)):
        raise CheckpointError(
            f"{source}: the optimizer's parameter indices are not 0..{n_params - 1}, once each"
        )
    try:
        per_group = [_group_hyperparameters(g) for g in groups]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: optimizer hyperparameters are not numbers") from None
    for key, value in per_group[0].items():
        if any(h[key] != value for h in per_group):
            values = ", ".join(sorted({clip(str(h[key]), 30) for h in per_group})[:5])
            raise NotContinuable(
                f"the optimizer's param groups have {key} {values}; MLX AdamW takes one value "
                "for all parameters"
            )
    if any(g.get("amsgrad") or g.get("maximize") for g in groups):
        raise NotContinuable("AdamW with amsgrad or maximize has no MLX equivalent")
    hyper = per_group[0]
    if groups[0].get("decoupled_weight_decay") is False and hyper["weight_decay"]:
        raise NotContinuable(
            "the optimizer is Adam with L2 weight decay, not AdamW; MLX AdamW would not continue it"
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
        raise TypeError("not a number")
    return float(value)


def _moments(state: Any, shapes: Shapes, source: Path) -> tuple[dict[str, np.ndarray], int]:
    """exp_avg / exp_avg_sq by index -> "<name>.m" / "<name>.v", and the one step count."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: optimizer_state has no state dict")
    names = list(shapes)
    if not state:  # an optimizer that never stepped: MLX starts from zero moments too
        zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
        return {f"{n}.{k}": z for n, z in zeros.items() for k in ("m", "v")}, 0
    stray = [describe(k, 20) for k in state if not (type(k) is int and 0 <= k < len(names))]
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
                got = clip(str(ref.shape), 40) if isinstance(ref, TensorRef) else type(ref).__name__
                raise CheckpointError(
                    f"{source}: optimizer {label} of {name} (index {index}) is {got}, "
                    f"expected {shapes[name]}"
                )
        moments[f"{name}.m"] = m.numpy().astype(np.float32, copy=False)
        moments[f"{name}.v"] = v.numpy().astype(np.float32, copy=False)
        steps.add(_step_count(entry.get("step"), name, source))
    if len(steps) != 1:
        shown = ", ".join(str(s) for s in sorted(steps)[:5])
        raise CheckpointError(
            f"{source}: parameters have different AdamW step counts ({shown}); MLX AdamW keeps one"
        )
    return moments, steps.pop()


def _step_count(value: Any, name: str, source: Path) -> int:
    """torch stores the step as a float32 0-d tensor (older versions: a plain number)."""
    try:
        value = _as_float(value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{source}: optimizer state of {name} has no step count") from None
    if value < 0 or not math.isfinite(value) or value != int(value) or value >= 2**63:
        raise CheckpointError(
            f"{source}: optimizer step of {name} is {describe(value)}, not a count"
        )
    return int(value)


def jsonable(value: Any, what: str) -> Any:
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
            return {k if isinstance(k, str) else describe(k, 200): walk(x, depth + 1)
                    for k, x in v.items()}  # fmt: skip
        if isinstance(v, (list, tuple)):
            return [walk(x, depth + 1) for x in v]
        if isinstance(v, TensorRef):
            return v.numpy().tolist() if v.size <= 1024 else f"<tensor {v.shape}>"
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        return describe(v)

    return walk(value, 0)
