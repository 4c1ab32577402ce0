"""One training run's state and what it does per step (spec: "Training recipe"), for any
architecture: the Trainer (a step, an evaluation, a checkpoint) and its LoopState.

A step: ``grad_accum`` micro-batches through the compiled step functions (steps.py), gradients
averaged, one clipped AdamW update. The trainer knows the model only through its contract
(models/base.py): the loss is ``CE + w * model.aux_loss``, the metrics are ``model.metrics``.

Exactness. Everything random is a function of the seed and a counter, never of hidden state:
the initial weights come from ``mx.random.seed(seed)``, the phase noise of micro-batch m at
step s from ``noise_key(seed, s, m)`` and the data order from ``(seed, epoch)``. A checkpoint
holds the weights, the optimizer state (with its own step count), the step and the data
position, so a resumed run computes exactly what an uninterrupted one would have.

The rest lives beside it: training.py (the loop), run_setup.py (arguments and inputs),
run_folder.py (the files), progress.py (what is shown and logged), schedule.py (learning rate,
optimizer, keys).
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from .config import TrainArgs
from .data import DataOrder, TokenData, as_windows, eval_window_ids
from .models import build_model
from .models.base import BaseModelArgs
from .progress import flatten_metrics
from .run_folder import (
    WEIGHTS_NAME,
    checkpoint_dirs,
    checkpoint_path,
    drop_old_checkpoints,
    finite_or_none,
    load_optimizer_state,
    load_trainer_state,
    save_best,
    save_training_checkpoint,
)
from .schedule import aux_weight_for, make_optimizer, noise_key, schedule_change
from .steps import global_norm, make_steps

STATE_FORMAT = 1
SAMPLE_PROMPT_TOKENS = 8  # the eval sample continues the first tokens of a validation window
SAMPLE_TEMPERATURE = 0.8  # as the published sampler


class TrainingStopped(RuntimeError):
    """Training could not go on (non-finite steps, a failed write): one line says why."""


class StopRequest:
    """The first Ctrl+C (or SIGTERM) asks the loop to stop at the next micro-batch boundary and
    save the last completed update; the handler then steps aside, so a second Ctrl+C ends the
    process at once."""

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
                "[yellow]stopping: saving the last completed update "
                "(Ctrl+C again to quit at once)[/]"
            )


@dataclass
class LoopState:
    """What the loop knows besides weights and optimizer state; saved in every checkpoint."""

    step: int = 0  # loop steps done (an update, or a skipped non-finite one)
    data_position: int = 0  # training windows consumed
    best_val_ce: float = math.inf
    best_step: int | None = None
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0  # not carried over a resume: a new leg starts a new count
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training wall time over all legs of the run
    history: list[dict] = field(default_factory=list)  # eval rows without samples

    def to_json(self, args: TrainArgs, data: TokenData) -> dict[str, Any]:
        """The trainer_state.json saved beside the weights and optimizer state."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "best_val_ce": finite_or_none(self.best_val_ce),
            "best_step": self.best_step,
            "history": self.history,
            "train_args": args.to_dict(),
            "data_position": {
                "windows": self.data_position,
                "seq_length": args.seq_length,
                "seed": args.seed,
                "fingerprint": data.fingerprint,
            },
            # Nothing random is stateful: keys and data order are recomputed from these.
            "rng": {"seed": args.seed, "noise_key": "SeedSequence(seed, step, micro)"},
            "nonfinite_total": self.nonfinite_total,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "mlx_version": mx.__version__,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any], args: TrainArgs, data: TokenData, say):
        """The loop state of a checkpoint; the data order restarts (with a message) when the
        checkpoint has no position for this data, seed and window length."""
        best = saved.get("best_val_ce")
        state = cls(
            step=int(saved["step"]),
            best_val_ce=math.inf if best is None else float(best),
            best_step=saved.get("best_step"),
            nonfinite_total=int(saved.get("nonfinite_total", 0)),
            tokens_seen=int(saved.get("tokens_seen", 0)),
            elapsed_s=float(saved.get("elapsed_s", 0.0)),
            history=list(saved.get("history") or []),
        )
        position = saved.get("data_position")
        expected = {"seq_length": args.seq_length, "seed": args.seed}
        expected["fingerprint"] = data.fingerprint
        if position is None:
            say("the checkpoint records no data position: the data order starts afresh")
        elif any(position.get(k) != v for k, v in expected.items()):
            changed = ", ".join(k for k, v in expected.items() if position.get(k) != v)
            say(f"the {changed} changed since the checkpoint: the data order starts afresh")
        else:
            state.data_position = int(position["windows"])
        message = schedule_change(saved.get("train_args") or {}, args, state.step)
        if message:
            say(message)
        return state


class Trainer:
    """One run: model, optimizer, data and loop state, and the files of the run folder."""

    def __init__(
        self,
        args: TrainArgs,
        model_args: BaseModelArgs,
        data: TokenData,
        out: Path,
        say=print,
        dist=None,
    ):
        from .distributed import Ranks  # (distributed.py imports this module)

        self.args, self.model_args, self.data, self.out = args, model_args, data, out
        self.dist = dist or Ranks()  # [dist] this process's ranks; alone by default
        self.say = say  # one-line messages for the user
        self.train_windows = as_windows(data.train, args.seq_length)  # (n, L+1)
        valid = as_windows(data.valid, args.seq_length)
        ids = eval_window_ids(len(valid), args.eval_batches * args.batch_size)
        self.eval_windows = np.asarray(valid[ids])  # (n_eval, L+1), fixed for the whole run
        self.order = DataOrder(len(self.train_windows), args.seed)
        mx.random.seed(args.seed)  # the initial weights
        self.model = build_model(model_args)
        self.aux_weight = aux_weight_for(args, self.model)
        self.optimizer = make_optimizer(args)
        self.state = LoopState()

    def restore(self, ckpt: Path) -> None:
        """Load weights, optimizer state and loop state from a training checkpoint."""
        weights = self.model.sanitize(mx.load(str(ckpt / WEIGHTS_NAME)))
        self.model.load_weights(list(weights.items()))
        self.optimizer.state = load_optimizer_state(ckpt)
        saved = load_trainer_state(ckpt)
        self.state = LoopState.from_json(saved, self.args, self.data, self.say)
        message = self.dist.batch_change(saved, self.args)  # [dist] another world size?
        if message:
            self.say(message)

    def build(self) -> None:
        """Initialise the optimizer state (kept where restored) and compile the step."""
        self.model.train()
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.fns = make_steps(
            self.model, self.optimizer, self.aux_weight, self.args.grad_clip, self.args.head
        )
        if self.args.head == "auto" and self.fns.head == "numpy":
            self.say("output head in numpy (MLX's Linux CPU backend; same numbers, faster)")

    # ---- one step

    def next_batch(self, micro: int) -> mx.array:
        block = self.dist.micro_index(micro, self.args.grad_accum)  # [dist] this rank's share
        start = self.state.data_position + block * self.args.batch_size
        ids = self.order.window_ids(start, self.args.batch_size)
        return mx.array(self.train_windows[ids])  # (B, L+1) int32

    def gradients(self, stop=None) -> tuple[dict[str, Any], Any] | None:
        """Mean loss terms and gradients over ``grad_accum`` micro-batches of this step, or
        None when ``stop()`` asks for a stop between two micro-batches (nothing is applied)."""
        args, step = self.args, self.state.step
        total, grads = None, None
        for micro in range(args.grad_accum):
            if micro > 0 and stop is not None and stop():
                return None
            key = noise_key(args.seed, step, self.dist.micro_index(micro, args.grad_accum))
            loss, (ce, aux, metrics), g = self.fns.micro_step(self.next_batch(micro), key)
            terms = {"loss": loss, "ce": ce, "aux": aux, "metrics": metrics}
            total = terms if total is None else tree_map(mx.add, total, terms)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(total, grads)  # one micro-batch's activations at a time
        if args.grad_accum > 1:
            total = tree_map(lambda t: t / args.grad_accum, total)
            grads = tree_map(lambda g: g / args.grad_accum, grads)
        # [dist] the mean over the ranks (the numpy head's dE is in grads): same on every rank
        total, grads = self.dist.mean((total, grads), f"the gradient all-reduce of step {step + 1}")
        return total, grads

    def train_step(self, stop=None) -> dict[str, Any] | None:
        """One update, skipped (and counted) when the loss or the gradients are not finite;
        None when stopped between micro-batches."""
        result = self.gradients(stop)
        if result is None:
            return None
        total, grads = result
        norm = global_norm(grads)
        mx.eval(norm)
        metrics = {"loss": float(total["loss"]), "ce": float(total["ce"])}
        metrics[self.aux_name] = float(total["aux"])
        metrics.update(flatten_metrics({k: np.array(v) for k, v in total["metrics"].items()}))
        metrics["grad_norm"] = float(norm)
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
        self.state.data_position += self.dist.windows_per_step(self.args)  # [dist] all ranks'
        self.state.tokens_seen += self.tokens_per_step
        return metrics

    @property
    def aux_name(self) -> str:
        return getattr(self.model, "AUX_NAME", "aux")

    @property
    def tokens_per_step(self) -> int:
        return self.dist.windows_per_step(self.args) * self.args.seq_length  # [dist] all ranks'

    # ---- evaluation

    def evaluate(self) -> dict[str, Any]:
        """Val CE (token mean), perplexity, the total loss CE + w * aux, the model's metrics,
        on the fixed validation windows, and a text sample."""
        self.model.eval()
        try:
            sums, n_tokens, n_batches = None, 0, 0
            for i, start in enumerate(range(0, len(self.eval_windows), self.args.batch_size)):
                if not self.dist.owns(i):  # [dist] each rank its share of the batches
                    continue
                batch = mx.array(self.eval_windows[start : start + self.args.batch_size])
                key = noise_key(self.args.seed, 1, i)
                ce_sum, aux, metrics = self.fns.eval_batch(batch, key)
                terms = {"ce": ce_sum, "aux": aux, "metrics": metrics}
                sums = terms if sums is None else tree_map(mx.add, sums, terms)
                mx.eval(sums)
                n_tokens += batch.shape[0] * (batch.shape[1] - 1)
                n_batches += 1
            if self.dist.size > 1:  # [dist] the sums over all ranks' batches
                sums, n_tokens, n_batches = self._sum_over_ranks(sums, n_tokens, n_batches)
            sample = self.sample_text() if self.dist.main else ""  # [dist] rank 0 logs it
        finally:
            self.model.train()
        ce = float(sums["ce"]) / n_tokens
        aux = float(sums["aux"]) / n_batches
        means = {k: np.array(v) / n_batches for k, v in sums["metrics"].items()}
        return {
            "kind": "eval",
            "step": self.state.step,
            "val_ce": ce,
            "val_ppl": math.exp(min(ce, 20.0)),
            "val_loss": ce + self.aux_weight * aux,
            f"val_{self.aux_name}": aux,
            **flatten_metrics(means, prefix="val_"),
            "val_tokens": n_tokens,
            "sample": sample,
        }

    def _sum_over_ranks(self, sums, n_tokens: int, n_batches: int):
        """[dist] A rank with no batch of its own (fewer batches than ranks) adds zeros."""
        if sums is None:
            batch = mx.array(self.eval_windows[: self.args.batch_size])
            ce, aux, metrics = self.fns.eval_batch(batch, None)
            sums = tree_map(mx.zeros_like, {"ce": ce, "aux": aux, "metrics": metrics})
        counts = mx.array([n_tokens, n_batches])
        sums, counts = self.dist.sum((sums, counts), f"the evaluation of step {self.state.step}")
        return sums, int(counts[0].item()), int(counts[1].item())

    def sample_text(self) -> str:
        """A continuation of the first validation window's opening tokens (same key each time,
        so that successive samples differ only because the model changed)."""
        from .generate import generate, make_sampler
        from .tokenizer import TokenizerUnavailable, tokenizer_for

        if self.args.sample_tokens == 0:
            return ""
        prompt = self.eval_windows[0, :SAMPLE_PROMPT_TOKENS].tolist()
        sampler = make_sampler(temp=SAMPLE_TEMPERATURE)
        gen = generate(self.model, prompt, sampler, self.args.sample_tokens, seed=self.args.seed)
        tokens = gen[0].tokens
        try:  # text only when the data was made by the model's tokenizer; ids otherwise
            tokenizer = tokenizer_for(self.model_args)
            known = tokenizer.identity() == self.data.meta.get("tokenizer")
        except TokenizerUnavailable:
            known = False
        if not known:
            return " ".join(map(str, prompt)) + " |" + " ".join(map(str, tokens))
        return tokenizer.decode(prompt) + "|" + tokenizer.decode(tokens)

    # ---- files

    def save_checkpoint(self) -> Path:
        """RUN/checkpoints/step_<step>/, then the ones beyond ``keep_last`` are dropped. A
        failed write (disk full) leaves the previous checkpoints as they were."""
        target = checkpoint_path(self.out, self.state.step)
        if not self.dist.main:  # [dist] rank 0 alone writes the run folder
            return target
        try:
            state = self.state.to_json(self.args, self.data)
            state["world"] = self.dist.world_record(self.args)  # [dist] for a resume's message
            save_training_checkpoint(target, self.model, self.optimizer.state, state)
        except OSError as err:
            kept = checkpoint_dirs(self.out)
            where = f"the newest intact one is {kept[-1]}" if kept else "no checkpoint exists"
            raise TrainingStopped(
                f"cannot write the checkpoint of step {self.state.step} ({err.strerror or err});"
                f" {where}. Free space, then: kssm train --resume --out {self.out}"
            ) from None
        drop_old_checkpoints(self.out, self.args.keep_last)
        return target

    def save_best(self, row: dict[str, Any]) -> None:
        if not self.dist.main:  # [dist] rank 0 alone writes the run folder
            return
        info = {k: v for k, v in row.items() if k.startswith("val_") and isinstance(v, float)}
        save_best(self.out, self.model, {"step": row["step"], **info})
