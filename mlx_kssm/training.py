"""Training (spec: "Training recipe"): the compiled step, the schedule, evaluation, checkpoints
and the loop behind ``kssm train``.

Exactness. Everything random is a function of the seed and a counter, never of hidden state:
the initial weights come from ``mx.random.seed(seed)``, the phase noise of micro-batch m at
step s from ``noise_key(seed, s, m)`` and the data order from ``(seed, epoch)``. A checkpoint
holds the weights, the optimizer state (with its own step count), the step and the data
position, so a resumed run computes exactly what an uninterrupted one would have.

The run folder
    train_config.json       the resolved TrainArgs + ModelArgs, data, lambda_reg
    metrics.jsonl           one JSON object per line: "train", "eval" and event rows
    checkpoints/step_*/     the last ``keep_last`` training checkpoints (see checkpoint.py)
    best/                   the weights with the lowest val CE so far (+ best.json)
    train.lock              present while a training writes the folder
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .checkpoint import (
    checkpoint_path,
    is_training_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    save_training_checkpoint,
)
from .config import ModelArgs, TrainArgs, model_args_for, train_args_for
from .data import DataError, DataOrder, TokenData, as_windows, eval_window_ids
from .io import (
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_folder,
    checkpoint_dirs,
    read_config,
    replace_folder,
    write_model_files,
)
from .jsonl import read_rows, strict_json
from .models import build_model
from .steps import HEAD_BACKENDS, global_norm, make_steps

METRICS_NAME = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
LOCK_NAME = "train.lock"
BEST_DIR = "best"
BEST_INFO = "best.json"
STATE_FORMAT = 1
SAMPLE_PROMPT_TOKENS = 8  # the eval sample continues the first tokens of a validation window
SAMPLE_TEMPERATURE = 0.8  # as the published sampler


class TrainingInputError(ValueError):
    """Bad input (arguments, paths, a held lock): one line, exit code 2, nothing written."""


class TrainingStopped(RuntimeError):
    """Training could not go on (non-finite steps): the last good checkpoint is kept."""


# --------------------------------------------------------------------------- the recipe


def learning_rate(
    step, lr: float, warmup: int, decay_steps: int, schedule: str = "cosine"
) -> mx.array:
    """The learning rate of the update made after ``step`` updates (torch LambdaLR semantics).

    Linear warmup ``lr * step / warmup`` for step < warmup, then either a cosine from lr down
    to 0 at ``decay_steps`` (and 0 after it) or, for "constant", lr. Works on Python numbers
    and on MLX arrays (the optimizer evaluates it at its own step count, inside mx.compile).
    """
    step = mx.array(step).astype(mx.float32)
    ramp = lr * step / max(warmup, 1)
    if schedule == "constant":
        after = mx.array(lr, dtype=mx.float32)
    else:
        progress = mx.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        after = lr * 0.5 * (1.0 + mx.cos(math.pi * progress))
    return mx.where(step < warmup, ramp, after)


def make_schedule(args: TrainArgs):
    """The schedule of ``args`` as the one-argument callable MLX optimizers take."""
    decay = args.decay_steps or args.steps
    return partial(
        learning_rate, lr=args.lr, warmup=args.warmup, decay_steps=decay, schedule=args.schedule
    )


def make_optimizer(args: TrainArgs) -> optim.AdamW:
    # bias_correction=True makes MLX AdamW compute what torch.optim.AdamW computes.
    return optim.AdamW(
        learning_rate=make_schedule(args),
        betas=[args.beta1, args.beta2],
        eps=args.adam_eps,
        weight_decay=args.weight_decay,
        bias_correction=True,
    )


def lambda_reg_for(train_args: TrainArgs, model_args: ModelArgs) -> float:
    """The regulariser's weight: as given, else 0.5 bistable and 0.0 monostable (spec)."""
    if train_args.lambda_reg is not None:
        return float(train_args.lambda_reg)
    return 0.5 if model_args.bistable else 0.0


def noise_key(seed: int, *counters: int) -> mx.array:
    """A PRNG key that depends only on (seed, counters): no state to save or restore."""
    words = np.random.SeedSequence([seed, *counters]).generate_state(1, dtype=np.uint64)
    return mx.random.key(int(words[0]))


# --------------------------------------------------------------------------- arguments


def check_args(train_args: TrainArgs, model_args: ModelArgs) -> None:
    """Reject impossible settings before anything is written."""
    a = train_args
    positive = ["steps", "batch_size", "grad_accum", "seq_length", "eval_every", "eval_batches"]
    positive += ["save_every", "keep_last", "max_nonfinite", "log_every"]
    for name in positive:
        if getattr(a, name) < 1:
            raise TrainingInputError(f"--{name.replace('_', '-')} must be at least 1")
    if a.seq_length > model_args.max_positions:
        raise TrainingInputError(
            f"--seq-length {a.seq_length} is over the model's max_positions "
            f"{model_args.max_positions}; shorten it or raise --max-positions"
        )
    if a.schedule not in ("cosine", "constant"):
        raise TrainingInputError(f"--schedule must be cosine or constant, not {a.schedule!r}")
    if a.lr <= 0 or a.warmup < 0 or a.grad_clip <= 0 or a.weight_decay < 0:
        raise TrainingInputError("--lr and --grad-clip must be > 0, --warmup, --weight-decay >= 0")
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
    """The run folder, or the nearest folder that exists above it, must be writable."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise TrainingInputError(f"--out {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainingInputError(f"--out {out}: {probe} is not writable")


def find_checkpoint(resume: bool | str | os.PathLike, out: Path) -> Path:
    """The checkpoint folder to resume: ``True`` = the newest in ``out``; a path = that
    checkpoint, or the newest in that run folder. Raises TrainingInputError."""
    where = out if resume is True else Path(resume)
    if resume is not True and is_training_checkpoint(where):
        return where
    usable = [p for p in checkpoint_dirs(where) if is_training_checkpoint(p)]
    if not usable:
        raise TrainingInputError(
            f"nothing to resume: {where} holds no training checkpoint "
            f"({CHECKPOINTS_DIR}/step_*/ with optimizer and trainer state)"
        )
    return usable[-1]


def resolve_args(
    preset: str | None,
    train_overrides: dict[str, Any],
    model_overrides: dict[str, Any],
    resume: bool | str | None = None,
) -> tuple[TrainArgs, ModelArgs]:
    """The arguments of a run. Fresh: the preset + overrides. Resuming: what the checkpoint
    recorded (its config.json and train_args, possibly partial) + the overrides given now.
    Raises TrainingInputError (an unknown preset, an unreadable checkpoint)."""
    try:
        return _resolve_args(preset, train_overrides, model_overrides, resume)
    except TrainingInputError:
        raise
    except ValueError as err:  # unknown preset, unreadable config.json
        raise TrainingInputError(str(err)) from None


def _resolve_args(preset, train_overrides, model_overrides, resume):
    if not resume:
        preset = preset or "published"
        return train_args_for(preset, **train_overrides), model_args_for(preset, **model_overrides)
    out = Path(train_overrides.get("out") or TrainArgs.out)
    ckpt = find_checkpoint(True if resume is True else resume, out)
    recorded = _recorded_train_args(ckpt)
    preset = preset or recorded.pop("preset", None) or "published"
    recorded.pop("preset", None)
    if "out" not in train_overrides and ckpt.parent.name == CHECKPOINTS_DIR:
        train_overrides = {**train_overrides, "out": str(ckpt.parent.parent)}
    train = train_args_for(preset, **{**recorded, **train_overrides})
    return train, ModelArgs.from_dict({**read_config(ckpt).to_dict(), **model_overrides})


def _recorded_train_args(ckpt: Path) -> dict[str, Any]:
    try:
        return dict(load_trainer_state(ckpt).get("train_args") or {})
    except (OSError, json.JSONDecodeError) as err:
        raise TrainingInputError(f"cannot read the trainer state in {ckpt}: {err}") from None


# --------------------------------------------------------------------------- the lock


class RunLock:
    """``RUN/train.lock`` (pid, host, start time) so that two trainings never write one folder.
    A lock left by a dead process on this machine is taken over, with a message."""

    def __init__(self, run_dir: Path, console=None):
        self.path = Path(run_dir) / LOCK_NAME
        self.console = console
        self.held = False

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}, f)
            self.held = True
            return self
        raise TrainingInputError(f"cannot take the lock {self.path}")

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - _mtime(self.path) < 10:  # maybe being written right now
                raise TrainingInputError(f"{self.path.parent} is locked ({self.path})") from None
            owner, pid, host = {}, None, socket.gethostname()
        if host != socket.gethostname():
            raise TrainingInputError(
                f"{self.path.parent} is being trained on {host} (pid {pid}); if that run is "
                f"dead, delete {self.path}"
            )
        if pid is not None and _alive(pid):
            raise TrainingInputError(
                f"{self.path.parent} is being trained by pid {pid} since {owner.get('since')}; "
                "wait for it or choose another --out"
            )
        if self.console is not None:
            self.console.print(
                f"[yellow]taking over a stale lock left by pid {pid} ({self.path})[/]"
            )
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------- signals


class StopRequest:
    """The first Ctrl+C (or SIGTERM) asks the loop to save and stop after the current step;
    the handler then steps aside, so a second Ctrl+C ends the process at once."""

    def __init__(self, console=None):
        self.requested = False
        self.console = console
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)
        if self.console is not None:
            self.console.print(
                "[yellow]stopping: saving a checkpoint after this step "
                "(Ctrl+C again to quit at once)[/]"
            )


# --------------------------------------------------------------------------- state


@dataclass
class LoopState:
    """What the loop knows besides weights and optimizer state; saved in every checkpoint."""

    step: int = 0  # loop steps done (an update, or a skipped non-finite one)
    data_position: int = 0  # training windows consumed
    best_val_ce: float = math.inf
    best_step: int | None = None
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training wall time over all legs of the run
    history: list[dict] = field(default_factory=list)  # eval rows without samples


def trainer_state(state: LoopState, args: TrainArgs, data: TokenData) -> dict[str, Any]:
    """The JSON saved beside the weights and optimizer state."""
    return {
        "format": STATE_FORMAT,
        "step": state.step,
        "best_val_ce": _finite_or_none(state.best_val_ce),
        "best_step": state.best_step,
        "history": state.history,
        "train_args": args.to_dict(),
        "data_position": {
            "windows": state.data_position,
            "seq_length": args.seq_length,
            "seed": args.seed,
            "fingerprint": data.fingerprint,
        },
        # Nothing random is stateful: keys and data order are recomputed from these.
        "rng": {"seed": args.seed, "noise_key": "SeedSequence(seed, step, micro)"},
        "nonfinite_total": state.nonfinite_total,
        "nonfinite_in_row": state.nonfinite_in_row,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": state.elapsed_s,
        "mlx_version": mx.__version__,
    }


def restore_state(saved: dict[str, Any], args: TrainArgs, data: TokenData, say) -> LoopState:
    """A LoopState from a checkpoint's trainer state; the data order restarts (with a
    message) when the checkpoint has no position for this data, seed and window length."""
    best = saved.get("best_val_ce")
    state = LoopState(
        step=int(saved["step"]),
        best_val_ce=math.inf if best is None else float(best),
        best_step=saved.get("best_step"),
        nonfinite_total=int(saved.get("nonfinite_total", 0)),
        nonfinite_in_row=int(saved.get("nonfinite_in_row", 0)),
        tokens_seen=int(saved.get("tokens_seen", 0)),
        elapsed_s=float(saved.get("elapsed_s", 0.0)),
        history=list(saved.get("history") or []),
    )
    position = saved.get("data_position")
    expected = {"seq_length": args.seq_length, "seed": args.seed, "fingerprint": data.fingerprint}
    if position is None:
        say("the checkpoint records no data position: the data order starts afresh")
    elif any(position.get(k) != v for k, v in expected.items()):
        changed = ", ".join(k for k, v in expected.items() if position.get(k) != v)
        say(f"the {changed} changed since the checkpoint: the data order starts afresh")
    else:
        state.data_position = int(position["windows"])
    _note_schedule_change(saved.get("train_args") or {}, args, state.step, say)
    return state


def _note_schedule_change(recorded: dict[str, Any], args: TrainArgs, step: int, say) -> None:
    """Say so when the schedule a run continues with differs from the one it was on (e.g.
    --steps raised without --decay-steps): the learning rate then jumps at the resume."""
    keys = ("lr", "warmup", "schedule")
    if not recorded or any(k not in recorded for k in keys + ("steps",)):
        return  # a partial record (a converted checkpoint): nothing to compare with
    before = TrainArgs.from_dict({**args.to_dict(), **{k: recorded[k] for k in keys}})
    before.steps, before.decay_steps = recorded["steps"], recorded.get("decay_steps")
    lr_before = float(make_schedule(before)(step))
    lr_now = float(make_schedule(args)(step))
    if lr_before != lr_now:
        say(
            f"the schedule changed since the checkpoint: the learning rate at step {step} "
            f"is now {lr_now:.3g} (it was {lr_before:.3g}); to train in legs of one schedule, "
            "pass --decay-steps with the final step count from the first leg"
        )


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One run: model, optimizer, data and loop state, and the files of the run folder."""

    def __init__(
        self, args: TrainArgs, model_args: ModelArgs, data: TokenData, out: Path, say=print
    ):
        self.args, self.model_args, self.data, self.out = args, model_args, data, out
        self.say = say  # one-line messages for the user
        self.lambda_reg = lambda_reg_for(args, model_args)
        self.train_windows = as_windows(data.train, args.seq_length)  # (n, L+1)
        valid = as_windows(data.valid, args.seq_length)
        ids = eval_window_ids(len(valid), args.eval_batches * args.batch_size)
        self.eval_windows = np.asarray(valid[ids])  # (n_eval, L+1), fixed for the whole run
        self.order = DataOrder(len(self.train_windows), args.seed)
        mx.random.seed(args.seed)  # the initial weights
        self.model = build_model(model_args)
        self.optimizer = make_optimizer(args)
        self.state = LoopState()

    def restore(self, ckpt: Path) -> None:
        """Load weights, optimizer state and loop state from a training checkpoint."""
        weights = self.model.sanitize(mx.load(str(ckpt / WEIGHTS_NAME)))
        self.model.load_weights(list(weights.items()))
        self.optimizer.state = load_optimizer_state(ckpt)
        self.state = restore_state(load_trainer_state(ckpt), self.args, self.data, self.say)

    def build(self) -> None:
        """Initialise the optimizer state (kept where restored) and compile the step."""
        self.model.train()
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.fns = make_steps(
            self.model, self.optimizer, self.lambda_reg, self.args.grad_clip, self.args.head
        )
        if self.args.head == "auto" and self.fns.head == "numpy":
            self.say("output head in numpy (MLX's Linux CPU backend; same numbers, faster)")

    # ---- one step

    def next_batch(self) -> mx.array:
        ids = self.order.window_ids(self.state.data_position, self.args.batch_size)
        self.state.data_position += self.args.batch_size
        return mx.array(self.train_windows[ids])  # (B, L+1) int32

    def gradients(self) -> tuple[dict[str, Any], Any]:
        """Mean loss terms and gradients over ``grad_accum`` micro-batches of this step."""
        args, step = self.args, self.state.step
        total, grads = None, None
        for micro in range(args.grad_accum):
            loss, aux, g = self.fns.micro_step(self.next_batch(), noise_key(args.seed, step, micro))
            total = _add(total, (loss, *aux))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)  # one micro-batch's activations at a time
        if args.grad_accum > 1:
            scale = 1.0 / args.grad_accum
            total = tuple(t * scale for t in total)
            grads = tree_map(lambda g: g * scale, grads)
        loss, ce, reg, R, u_layers, det_layers = total
        metrics = {"loss": loss, "ce": ce, "reg": reg, "R": R, "u_layers": u_layers}
        metrics["det_layers"] = det_layers
        return metrics, grads

    def train_step(self) -> dict[str, Any]:
        """One update, skipped (and counted) when the loss or the gradients are not finite."""
        metrics, grads = self.gradients()
        metrics["grad_norm"] = global_norm(grads)
        mx.eval(metrics)
        metrics = {k: np.array(v).tolist() for k, v in metrics.items()}
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        if finite:
            self.fns.apply_update(grads)
            mx.eval(self.model.state, self.optimizer.state)
            self.state.nonfinite_in_row = 0
        else:
            self.state.nonfinite_in_row += 1
            self.state.nonfinite_total += 1
        metrics["skipped"] = not finite
        metrics["lr"] = float(self.optimizer.state["learning_rate"])
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        return metrics

    @property
    def tokens_per_step(self) -> int:
        return self.args.grad_accum * self.args.batch_size * self.args.seq_length

    # ---- evaluation

    def evaluate(self) -> dict[str, Any]:
        """Val CE (token mean), perplexity, the seed's total loss, R, u and |det| per layer,
        on the fixed validation windows, and a text sample."""
        self.model.eval()
        try:
            sums, n_tokens, n_batches = None, 0, 0
            for i, start in enumerate(range(0, len(self.eval_windows), self.args.batch_size)):
                batch = mx.array(self.eval_windows[start : start + self.args.batch_size])
                key = noise_key(self.args.seed, 1, i) if self.model_args.eval_noise else None
                ce_sum, reg, R, u, det = self.fns.eval_batch(batch, key)
                sums = _add(sums, (ce_sum, reg, R, u, det))
                mx.eval(sums)
                n_tokens += batch.shape[0] * (batch.shape[1] - 1)
                n_batches += 1
            sample = self.sample_text()
        finally:
            self.model.train()
        ce = float(sums[0]) / n_tokens
        reg = float(sums[1]) / n_batches
        R_layers, u_layers, det_layers = (np.array(s) / n_batches for s in sums[2:])
        return {
            "kind": "eval",
            "step": self.state.step,
            "val_ce": ce,
            "val_ppl": math.exp(min(ce, 20.0)),
            "val_loss": ce + self.lambda_reg * reg,
            "val_reg": reg,
            "val_R": float(R_layers.mean()),
            "val_R_layers": R_layers.tolist(),
            "val_u": float(u_layers.mean()),
            "val_u_layers": u_layers.tolist(),
            "val_det_layers": det_layers.tolist(),
            "val_tokens": n_tokens,
            "sample": sample,
        }

    def sample_text(self) -> str:
        """A continuation of the first validation window's opening tokens (same key each time,
        so that successive samples differ only because the model changed)."""
        from .generate import decode_tokens, generate, make_sampler

        if self.args.sample_tokens == 0:
            return ""
        prompt = self.eval_windows[0, :SAMPLE_PROMPT_TOKENS].tolist()
        sampler = make_sampler(temp=SAMPLE_TEMPERATURE)
        gen = generate(self.model, prompt, sampler, self.args.sample_tokens, seed=self.args.seed)
        tokens = gen[0].tokens
        if self.data.meta.get("tokenizer", {}).get("name") != "cl100k_base":
            return " ".join(map(str, prompt)) + " |" + " ".join(map(str, tokens))
        return decode_tokens(prompt) + "|" + decode_tokens(tokens)

    # ---- files

    def save_checkpoint(self) -> Path:
        """Write RUN/checkpoints/step_<step>/ (temp name, then rename), flush it to disk, and
        only then drop the checkpoints beyond ``keep_last``."""
        target = checkpoint_path(self.out, self.state.step)
        state = trainer_state(self.state, self.args, self.data)
        save_training_checkpoint(target, self.model, self.optimizer.state, state)
        _fsync_tree(target)
        for old in checkpoint_dirs(self.out)[: -self.args.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def save_best(self, row: dict[str, Any]) -> None:
        target = self.out / BEST_DIR
        tmp = atomic_folder(target)
        try:
            write_model_files(self.model, tmp)
            info = {k: row[k] for k in ("step", "val_ce", "val_ppl", "val_loss", "val_R")}
            (tmp / BEST_INFO).write_text(json.dumps(info, indent=2) + "\n")
            _fsync_tree(tmp)
            replace_folder(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _add(total: tuple | None, terms: tuple) -> tuple:
    """Element-wise running sum of tuples of arrays (the first call starts it)."""
    return terms if total is None else tuple(a + b for a, b in zip(total, terms, strict=True))


# --------------------------------------------------------------------------- the run


def run_training(
    train_args: TrainArgs,
    model_args: ModelArgs,
    resume: bool | str | os.PathLike | None = None,
    console=None,
) -> Path:
    """Train (or resume) a run; returns the run folder.

    ``resume``: None/False = a fresh run (refused if ``out`` already holds checkpoints);
    True = the newest checkpoint in ``out``; a path = that checkpoint folder, or the newest
    checkpoint of that run folder (e.g. a converted PyTorch checkpoint with a new ``out``).
    ``console``: a rich Console for the progress bar and evaluation lines; None is silent
    (metrics.jsonl is written either way). Raises TrainingInputError / DataError for bad
    input (nothing written), TrainingStopped when the loss stays non-finite.
    """
    from .data import prepare_tokens, resolve_source

    args = _absolute_paths(train_args)
    out = Path(args.out)
    check_args(args, model_args)
    check_writable(out)
    ckpt = find_checkpoint(resume, out) if resume else None
    if ckpt is None and checkpoint_dirs(out):
        raise TrainingInputError(
            f"{out} already holds a run (up to {checkpoint_dirs(out)[-1].name}); "
            "add --resume to continue it, or choose another --out"
        )
    if ckpt is not None:
        _check_same_model(ckpt, model_args, _sayer(console))
        here = ckpt.resolve().parent == (out / CHECKPOINTS_DIR).resolve()
        if not here and checkpoint_dirs(out):
            raise TrainingInputError(
                f"{out} already holds another run's checkpoints; choose an empty --out to "
                f"continue {ckpt} in"
            )
        newer = [p.name for p in checkpoint_dirs(out) if here and p.name > ckpt.name]
        if newer:  # continuing here would mix two futures of one run
            raise TrainingInputError(
                f"{out} has checkpoints after {ckpt.name} ({', '.join(newer)}); to branch "
                f"from {ckpt.name}, resume it into another --out"
            )
    data = prepare_tokens(resolve_source(args.data), console=console)
    _check_data(data, args, model_args)

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, console), StopRequest(console) as stop:
        trainer = Trainer(args, model_args, data, out, say=_sayer(console))
        if ckpt is not None:
            trainer.restore(ckpt)
        if trainer.state.step >= args.steps:
            trainer.say(f"nothing to do: {ckpt} is at step {trainer.state.step} of {args.steps}")
            return out
        _remove_leftovers(out)
        trainer.build()
        _write_json(out / CONFIG_FILE, _run_config(trainer, ckpt))
        log = MetricsLog(out / METRICS_NAME, keep_until=trainer.state.step if ckpt else -1)
        start = {"kind": "resume" if ckpt else "start", "step": trainer.state.step, "time": _now()}
        log.write({**start, "from": str(ckpt) if ckpt else None})
        _loop(trainer, log, stop, console)
    return out


def _loop(trainer: Trainer, log: MetricsLog, stop: StopRequest, console) -> None:
    args, state = trainer.args, trainer.state
    meter = Meter()
    last_saved = state.step
    with TrainProgress(console, state.step, args.steps) as bar:
        while state.step < args.steps and not stop.requested:
            started = time.perf_counter()
            metrics = trainer.train_step()
            seconds = time.perf_counter() - started
            state.elapsed_s += seconds
            meter.add(metrics, seconds, trainer.tokens_per_step)
            bar.update(state.step, metrics, meter.tokens_per_s())
            if state.nonfinite_in_row >= args.max_nonfinite:
                log.write({"kind": "stop", "step": state.step, "reason": "nonfinite"})
                raise TrainingStopped(_diverged_message(trainer, last_saved))
            if state.step % args.log_every == 0 or state.step == args.steps:
                row = meter.row(state)
                log.write(row)
                bar.print_train(row)
            if state.step % args.eval_every == 0 or state.step == args.steps:
                _evaluate(trainer, log, bar)
            if state.step % args.save_every == 0 or state.step == args.steps:
                trainer.save_checkpoint()
                last_saved = state.step
    if stop.requested and meter.rows:
        log.write(meter.row(state))  # the steps since the last train row
    if stop.requested and state.step > last_saved:
        trainer.save_checkpoint()
    if stop.requested:
        log.write({"kind": "stop", "step": state.step, "reason": "interrupted", "time": _now()})
        trainer.say(
            f"stopped at step {state.step}; checkpoint saved. Continue with: "
            f"kssm train --resume --out {trainer.out}"
        )
    else:
        best = f"best val CE {state.best_val_ce:.4f} at step {state.best_step}"
        trainer.say(f"done: step {state.step}, {best}; run folder {trainer.out}")


def _evaluate(trainer: Trainer, log: MetricsLog, bar: TrainProgress) -> None:
    row = trainer.evaluate()
    state = trainer.state
    row["best"] = row["val_ce"] < state.best_val_ce
    if row["best"]:
        state.best_val_ce, state.best_step = row["val_ce"], state.step
        trainer.save_best(row)
    state.history.append({k: v for k, v in row.items() if k != "sample"})
    log.write(row)
    bar.print_eval(row)


def _diverged_message(trainer: Trainer, last_saved: int) -> str:
    n = trainer.state.nonfinite_in_row
    where = (
        f"the last good checkpoint is {checkpoint_path(trainer.out, last_saved)}"
        if checkpoint_dirs(trainer.out)
        else "no checkpoint was written"
    )
    return (
        f"stopped at step {trainer.state.step}: the loss or the gradients were not finite for "
        f"{n} steps in a row; {where}. Try a lower --lr or a smaller --grad-clip"
    )


# ModelArgs fields that decide the weights' shapes: they cannot change when resuming.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_dim",
    "n_layers",
    "n_oscillators",
    "n_harmonics",
    "max_positions",
    "ffn_mult",
)


def _check_same_model(ckpt: Path, model_args: ModelArgs, say) -> None:
    """Refuse another model shape; report other changed settings (e.g. --monostable)."""
    recorded = read_config(ckpt).to_dict()
    changed = {k: (recorded.get(k), v) for k, v in model_args.to_dict().items()}
    changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
    shapes = [f"{k} {a} -> {b}" for k, (a, b) in changed.items() if k in SHAPE_FIELDS]
    if shapes:
        raise TrainingInputError(
            f"the model's shape differs from the checkpoint's ({ckpt / CONFIG_NAME}): "
            + ", ".join(shapes)
        )
    for k, (a, b) in changed.items():
        say(f"model setting {k} changed since the checkpoint: {a} -> {b}")


def _check_data(data: TokenData, args: TrainArgs, model_args: ModelArgs) -> None:
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
    top = max(int(data.train.max()), int(data.valid.max()))
    if top >= model_args.vocab_size:
        raise DataError(
            f"the data has token id {top} but the model's vocabulary has {model_args.vocab_size}"
        )


def _absolute_paths(args: TrainArgs) -> TrainArgs:
    """Record local paths absolutely, so that a resume from elsewhere finds them."""
    data = Path(args.data).expanduser()
    changes = {"out": str(Path(args.out).expanduser().absolute())}
    if data.exists():
        changes["data"] = str(data.resolve())
    return TrainArgs.from_dict({**args.to_dict(), **changes})


def _run_config(trainer: Trainer, ckpt: Path | None) -> dict[str, Any]:
    n_params = sum(v.size for _, v in tree_flatten(trainer.model.parameters()))
    meta = trainer.data.meta
    return {
        "train": trainer.args.to_dict(),
        "model": trainer.model_args.to_dict(),
        "lambda_reg": trainer.lambda_reg,
        "n_params": n_params,
        "tokens_per_step": trainer.tokens_per_step,
        "data": {
            "source": meta.get("source"),
            "token_folder": str(trainer.data.folder),
            "fingerprint": trainer.data.fingerprint,
            "tokenizer": meta.get("tokenizer"),
            "n_tokens": meta.get("n_tokens"),
            "train_windows": len(trainer.train_windows),
            "eval_windows": len(trainer.eval_windows),
        },
        "resumed_from": str(ckpt) if ckpt else None,
        "head": trainer.fns.head,  # where the output head ran ("auto" resolved)
        "device": str(mx.default_device()),
        "mlx_version": mx.__version__,
        "written": _now(),
    }


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of writes cut short (a crash, kill -9); safe under the lock."""
    for parent in (out, out / CHECKPOINTS_DIR):
        if parent.is_dir():
            for p in parent.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself, so a power cut cannot leave a renamed
    but empty checkpoint behind while the older ones are already deleted."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in (folder, folder.parent):
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a directory
            pass
        finally:
            os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _sayer(console):
    return (lambda message: console.print(message)) if console is not None else (lambda m: None)


# --------------------------------------------------------------------------- logging


class MetricsLog:
    """``metrics.jsonl``, appended one row at a time. On resume, rows after the checkpoint's
    step (written before a crash, and about to be recomputed) are dropped first."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = [row for row in read_rows(path) if row.get("step", 0) <= keep_until]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(row), allow_nan=False) + "\n")


class Meter:
    """Averages of the train metrics since the last train row, and throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []
        self.seconds = 0.0
        self.tokens = 0

    def add(self, metrics: dict[str, Any], seconds: float, tokens: int) -> None:
        self.rows.append(metrics)
        self.seconds += seconds
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def row(self, state: LoopState) -> dict[str, Any]:
        good = [r for r in self.rows if not r["skipped"]] or self.rows

        def mean(key):
            return np.mean([r[key] for r in good], axis=0).tolist()

        row = {"kind": "train", "step": state.step}
        for key in ("loss", "ce", "reg", "R", "grad_norm", "u_layers", "det_layers"):
            row[key] = mean(key)
        row["u"] = float(np.mean(row["u_layers"]))
        row["lr"] = self.rows[-1]["lr"]
        row["tokens_per_s"] = self.tokens_per_s()
        row["skipped"] = sum(r["skipped"] for r in self.rows)
        row["tokens"] = state.tokens_seen
        row["elapsed_s"] = state.elapsed_s
        self.reset()
        return row


class TrainProgress:
    """The terminal view: a rich progress bar (step, tokens/s, loss, R, u, ETA) and one line
    per evaluation. Without a console it does nothing."""

    def __init__(self, console, start: int, total: int):
        self.console, self.start, self.total = console, start, total
        self._bar = None

    def __enter__(self) -> TrainProgress:
        if self.console is None:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._bar = Progress(
            "step",
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            "{task.fields[info]}",
            TimeRemainingColumn(),
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc) -> bool:
        if self._bar is not None:
            self._bar.stop()
        return False

    def update(self, step: int, metrics: dict[str, Any], tokens_per_s: float) -> None:
        if self._bar is None:
            return
        u = float(np.mean(metrics["u_layers"]))
        info = (
            f"{tokens_per_s:,.0f} tok/s  loss {metrics['loss']:.3f}  ce {metrics['ce']:.3f}  "
            f"R {metrics['R']:.3f}  u {u:+.3f}"
            + ("  [red]skipped[/]" if metrics["skipped"] else "")
        )
        self._bar.update(self._task, completed=step, info=info)

    def print_train(self, row: dict[str, Any]) -> None:
        """A line per train row where no live bar can be drawn (output to a file, nohup)."""
        if self.console is None or self.console.is_terminal:
            return
        self.console.print(
            f"step {row['step']}/{self.total}: loss {row['loss']:.4f}  ce {row['ce']:.4f}  "
            f"R {row['R']:.3f}  u {row['u']:+.3f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:,.0f} tok/s",
            soft_wrap=True,
        )

    def print_eval(self, row: dict[str, Any]) -> None:
        if self.console is None:
            return
        layers = " ".join(f"{r:.3f}" for r in row["val_R_layers"])
        us = " ".join(f"{u:+.3f}" for u in row["val_u_layers"])
        mark = " [green]best[/]" if row["best"] else ""
        self.console.print(
            f"[bold]eval {row['step']}[/]: val CE {row['val_ce']:.4f} "
            f"(ppl {row['val_ppl']:.1f})  val loss {row['val_loss']:.4f}  "
            f"R {row['val_R']:.3f} [{layers}]  u [{us}]{mark}",
            soft_wrap=True,
        )
        if row["sample"]:
            from rich.markup import escape

            sample = escape(repr(row["sample"]))  # model text may hold [brackets]
            self.console.print(f"  [dim]sample:[/] {sample}", soft_wrap=True)
