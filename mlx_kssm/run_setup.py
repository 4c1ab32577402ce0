"""A run's arguments and inputs, checked before anything is written: the resolved TrainArgs and
ModelArgs (fresh, or recorded by the checkpoint being resumed), the run folder, the data.

Every refusal is a TrainingInputError (or data.DataError) whose message is one line that says
what to do; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import TrainArgs, model_args_for, train_args_for
from .data import DataError, TokenData, check_token_range
from .io import CONFIG_NAME, read_config
from .models import ConfigError, build_model, model_args_from_config
from .models.base import BaseModelArgs
from .run_folder import (
    CHECKPOINTS_DIR,
    checkpoint_problem,
    is_training_checkpoint,
    load_trainer_state,
    training_checkpoints,
)
from .steps import HEAD_BACKENDS


class TrainingInputError(ValueError):
    """Bad input (arguments, paths, a held lock): one line, exit code 2, nothing written."""


def check_args(train_args: TrainArgs, model_args: BaseModelArgs) -> None:
    """Reject impossible settings before anything is written."""
    a = train_args
    positive = ["steps", "batch_size", "grad_accum", "seq_length", "eval_every", "eval_batches"]
    positive += ["save_every", "keep_last", "max_nonfinite", "log_every"]
    for name in positive:
        if getattr(a, name) < 1:
            raise TrainingInputError(f"--{name.replace('_', '-')} must be at least 1")
    limit = getattr(model_args, "max_positions", None)
    if limit is not None and a.seq_length > limit:
        raise TrainingInputError(
            f"--seq-length {a.seq_length} is over the model's max_positions "
            f"{limit}; shorten it or raise --max-positions"
        )
    if a.schedule not in ("cosine", "constant"):
        raise TrainingInputError(f"--schedule must be cosine or constant, not {a.schedule!r}")
    if a.lr <= 0 or a.warmup < 0 or a.grad_clip <= 0 or a.weight_decay < 0:
        raise TrainingInputError("--lr and --grad-clip must be > 0, --warmup, --weight-decay >= 0")
    if not (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1) or a.adam_eps <= 0:
        raise TrainingInputError("--beta1 and --beta2 must be in [0, 1), --adam-eps > 0")
    if a.lambda_reg is not None and a.lambda_reg < 0:
        raise TrainingInputError("--lambda-reg must be >= 0")
    if a.decay_steps is not None and a.decay_steps < 1:
        raise TrainingInputError("--decay-steps must be at least 1")
    if a.sample_tokens < 0:
        raise TrainingInputError("--sample-tokens must be >= 0")
    if a.head not in HEAD_BACKENDS:
        raise TrainingInputError(
            f"--head must be one of {', '.join(HEAD_BACKENDS)}, not {a.head!r}"
        )


def check_writable(out: Path) -> None:
    """The run folder, or the nearest folder that exists above it, must be writable; a
    dangling symlink is refused rather than followed."""
    if out.is_symlink() and not out.exists():
        raise TrainingInputError(
            f"--out {out} is a symlink to nothing; remove it or choose another"
        )
    probe = out
    while not probe.exists():
        if probe.is_symlink():
            raise TrainingInputError(f"--out {out}: {probe} is a dangling symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingInputError(f"--out {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingInputError(f"--out {out}: {probe} is not writable")


def find_checkpoint(resume: bool | str | os.PathLike, out: Path, say=None) -> Path:
    """The checkpoint folder to resume: ``True`` = the newest intact one in ``out``; a path =
    that checkpoint, or the newest intact one in that run folder. A damaged newest checkpoint
    (a crash or a full disk while it was copied in) is reported and the one before it used.
    Raises TrainingInputError."""
    where = out if resume is True else Path(resume)
    if resume is not True and is_training_checkpoint(where):
        problem = checkpoint_problem(where)
        if problem:
            raise TrainingInputError(f"cannot resume {where}: {problem}")
        return where
    usable = training_checkpoints(where)
    if not usable:
        raise TrainingInputError(
            f"nothing to resume: {where} holds no training checkpoint "
            f"({CHECKPOINTS_DIR}/step_*/ with optimizer and trainer state)"
        )
    for ckpt in reversed(usable):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if say is not None:
            say(f"[yellow]skipping the damaged checkpoint {ckpt.name}: {problem}[/]")
    raise TrainingInputError(f"every checkpoint in {where} is damaged; start a new run")


def resolve_args(
    preset: str | None,
    train_overrides: dict[str, Any],
    model_overrides: dict[str, Any],
    resume: bool | str | None = None,
    model_type: str | None = None,
) -> tuple[TrainArgs, BaseModelArgs]:
    """The arguments of a run. Fresh: the preset + overrides. Resuming: what the checkpoint
    recorded (its config.json and train_args, possibly partial) + the overrides given now.
    Raises TrainingInputError (an unknown preset, a bad value, an unreadable checkpoint)."""
    try:
        return _resolve_args(preset, train_overrides, model_overrides, resume, model_type)
    except TrainingInputError:
        raise
    except (ValueError, TypeError) as err:  # unknown preset, bad config value, unreadable file
        raise TrainingInputError(str(err)) from None


def _resolve_args(preset, train_overrides, model_overrides, resume, model_type):
    if not resume:
        preset = preset or "published"
        model = model_args_for(preset, model_type or "kssm_v3", **model_overrides)
        return train_args_for(preset, model.model_type, **train_overrides), model
    out = Path(train_overrides.get("out") or TrainArgs.out)
    ckpt = find_checkpoint(True if resume is True else resume, out)
    recorded = _recorded_train_args(ckpt)
    preset = preset or recorded.pop("preset", None) or "published"
    recorded.pop("preset", None)
    if "out" not in train_overrides and ckpt.parent.name == CHECKPOINTS_DIR:
        train_overrides = {**train_overrides, "out": str(ckpt.parent.parent)}
    saved = read_config(ckpt)
    train = train_args_for(preset, saved.model_type, **{**recorded, **train_overrides})
    if model_type is not None and model_type != saved.model_type:
        raise TrainingInputError(
            f"{ckpt} holds a {saved.model_type} model, not {model_type}; drop --arch to resume it"
        )
    return train, model_args_from_config({**saved.to_dict(), **model_overrides})


def _recorded_train_args(ckpt: Path) -> dict[str, Any]:
    try:
        return dict(load_trainer_state(ckpt).get("train_args") or {})
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise TrainingInputError(f"cannot read the trainer state in {ckpt}: {err}") from None


def check_same_model(ckpt: Path, model_args: BaseModelArgs, say) -> None:
    """Refuse a model whose parameters differ in shape from the checkpoint's; report other
    changed settings (e.g. --monostable). Models are built lazily (nothing is evaluated)."""
    from mlx.utils import tree_flatten

    recorded = read_config(ckpt)
    before, now = recorded.to_dict(), model_args.to_dict()
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    if recorded.model_type != model_args.model_type:
        raise TrainingInputError(
            f"the checkpoint holds a {recorded.model_type} model, not {model_args.model_type}"
        )

    def shapes(args):
        return {k: v.shape for k, v in tree_flatten(build_model(args).parameters())}

    if changed and shapes(recorded) != shapes(model_args):
        raise TrainingInputError(
            f"the model's shape differs from the checkpoint's ({ckpt / CONFIG_NAME}): "
            + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        )
    for k, (a, b) in changed.items():
        say(f"model setting {k} changed since the checkpoint: {a} -> {b}")


def check_data(data: TokenData, args: TrainArgs, model_args: BaseModelArgs) -> None:
    """Enough windows for a batch and an evaluation, and every token id in the vocabulary."""
    window = args.seq_length + 1
    n_train, n_valid = data.train.size // window, data.valid.size // window
    if n_train < args.batch_size:
        raise DataError(
            f"too little training data: {data.train.size} tokens make {n_train} windows of "
            f"{window}, one batch needs {args.batch_size}; use more data or smaller "
            "--batch-size / --seq-length"
        )
    if n_valid < 1:
        raise DataError(
            f"too little validation data: {data.valid.size} tokens, one window needs {window}"
        )
    check_token_range(data.train, model_args.vocab_size, "the training data")
    check_token_range(data.valid, model_args.vocab_size, "the validation data")


def absolute_paths(args: TrainArgs) -> TrainArgs:
    """Record local paths absolutely, so that a resume from elsewhere finds them."""
    data = Path(args.data).expanduser()
    changes = {"out": str(Path(args.out).expanduser().absolute())}
    if data.exists():
        changes["data"] = str(data.resolve())
    return TrainArgs.from_dict({**args.to_dict(), **changes})


__all__ = ["ConfigError", "TrainingInputError"]
