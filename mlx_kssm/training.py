"""``kssm train``: the loop of a run, for any registered architecture.

``run_training`` checks everything first (run_setup.py: arguments, run folder, data, the
checkpoint to resume), takes the run folder's lock, then loops: a step (trainer.py), a train
row every ``log_every`` steps, an evaluation every ``eval_every``, a checkpoint every
``save_every`` (run_folder.py). Ctrl+C stops at the next micro-batch boundary and saves the last
completed update; a non-finite streak of ``max_nonfinite`` steps stops the run, and no
checkpoint is written during a streak, so the last checkpoint holds finite weights.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import TrainArgs
from .distributed import PeerLost, current_ranks
from .distributed_setup import NullLog, check_same_data, follower_errors, sync_from_main, together
from .models.base import BaseModelArgs
from .progress import Meter, TrainProgress, format_eta, model_labels, sayer
from .run_folder import (
    CONFIG_FILE,
    METRICS_NAME,
    MetricsLog,
    checkpoint_dirs,
    checkpoint_path,
    load_trainer_state,
    remove_leftovers,
    write_json,
)
from .run_lock import RunLock, RunLocked
from .run_setup import (  # noqa: F401  (resolve_args is part of this module's interface)
    TrainingInputError,
    absolute_paths,
    check_args,
    check_data,
    check_same_model,
    check_writable,
    find_checkpoint,
    resolve_args,
)
from .schedule import learning_rate, make_schedule  # noqa: F401  (re-exported)
from .trainer import StopRequest, Trainer, TrainingStopped

WEEK_S = 7 * 86_400

__all__ = [
    "StopRequest",
    "Trainer",
    "TrainingInputError",
    "TrainingStopped",
    "learning_rate",
    "make_schedule",
    "resolve_args",
    "run_training",
]


def run_training(
    train_args: TrainArgs,
    model_args: BaseModelArgs,
    resume: bool | str | os.PathLike | None = None,
    console=None,
) -> Path:
    """Train (or resume) a run; returns the run folder.

    ``resume``: None/False = a fresh run (refused if ``out`` already holds checkpoints);
    True = the newest checkpoint in ``out``; a path = that checkpoint folder, or the newest
    checkpoint of that run folder (e.g. a converted PyTorch checkpoint with a new ``out``).
    ``console``: a rich Console for the progress bar and evaluation lines; None is silent
    (metrics.jsonl is written either way). Raises TrainingInputError / DataError for bad
    input (nothing written), TrainingStopped when the run cannot go on.
    """
    dist = current_ranks()  # [dist] alone unless a launcher started this process as a rank
    with follower_errors(dist):
        return _run_training(train_args, model_args, resume, console if dist.main else None, dist)


def _run_training(train_args, model_args, resume, console, dist) -> Path:
    from .data import prepare_tokens, resolve_source

    say = sayer(console)
    args = absolute_paths(train_args)
    out = Path(args.out)
    check_args(args, model_args)

    def prepare():
        from .tokenizer import tokenizer_for

        tokenizer = lambda: tokenizer_for(model_args)  # noqa: E731  (looked for only if needed)
        data = prepare_tokens(resolve_source(args.data), console=console, tokenizer=tokenizer)
        check_data(data, args, model_args)
        return data

    # [dist] Rank 0 alone reads the run folder, and fills a token cache ranks may share
    # before the others read it; a refusal anywhere stops every rank (alone: plain calls).
    folder_check = lambda: _check_run_folder(args, model_args, resume, say)  # noqa: E731
    ckpt = together(dist, "checking the run folder", folder_check, main_only=True)
    data = together(dist, "preparing the data", prepare, main_only=True)
    data = together(dist, "preparing the data", lambda: data if dist.main else prepare())
    check_same_data(dist, data)  # [dist]

    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as held:  # [dist] (a with-statement, but rank 0 alone locks)
            lock = lambda: held.enter_context(RunLock(out, console))  # noqa: E731
            together(dist, "taking the lock", lock, main_only=True)
            stop = held.enter_context(StopRequest(console))
            trainer = Trainer(args, model_args, data, out, say=say, dist=dist)
            restore = lambda: ckpt and trainer.restore(ckpt)  # noqa: E731
            together(dist, "restoring the checkpoint", restore, main_only=True)
            sync_from_main(trainer)  # [dist] rank 0's weights, optimizer and loop state
            if trainer.state.step >= args.steps:
                say(f"nothing to do: {ckpt} is at step {trainer.state.step} of {args.steps}")
                return out
            if dist.main:
                remove_leftovers(out)
            trainer.build()
            log = NullLog()
            if dist.main:
                write_json(out / CONFIG_FILE, _run_config(trainer, ckpt))
                log = MetricsLog(out / METRICS_NAME, keep_until=trainer.state.step if ckpt else -1)
            start = {"kind": "resume" if ckpt else "start", "step": trainer.state.step}
            log.write({**start, "time": _now(), "from": str(ckpt) if ckpt else None})
            try:
                _loop(trainer, log, stop, console)
            except PeerLost as err:  # [dist] another rank is gone
                raise _after_lost_rank(trainer, log, err) from None
    except RunLocked as err:
        raise TrainingInputError(str(err)) from None
    return out


def _check_run_folder(args: TrainArgs, model_args: BaseModelArgs, resume, say) -> Path | None:
    """The checkpoint to resume (None for a fresh run), once the run folder is fit for it."""
    out = Path(args.out)
    check_writable(out)
    ckpt = find_checkpoint(resume, out, say) if resume else None
    if ckpt is None and checkpoint_dirs(out):
        raise TrainingInputError(
            f"{out} already holds a run (up to {checkpoint_dirs(out)[-1].name}); "
            "add --resume to continue it, or choose another --out"
        )
    if ckpt is not None:
        check_same_model(ckpt, model_args, say)
        here = ckpt.resolve().parent == (out / "checkpoints").resolve()
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
    return ckpt


def _loop(trainer: Trainer, log: MetricsLog, stop: StopRequest, console) -> None:
    args, state = trainer.args, trainer.state
    meter = Meter()
    last_saved, first_step = state.step, state.step

    def stopping() -> bool:  # [dist] asked by every rank at the same points: any one stops all
        stop.requested = trainer.dist.any(stop.requested, f"the stop vote of step {state.step + 1}")
        return stop.requested

    with TrainProgress(console, state.step, args.steps, trainer.aux_name) as bar:
        while state.step < args.steps and not stopping():
            started = time.perf_counter()
            metrics = trainer.train_step(stop=stopping)
            if metrics is None:  # Ctrl+C between micro-batches: the step is dropped
                break
            seconds = time.perf_counter() - started
            state.elapsed_s += seconds
            meter.add(metrics, seconds, trainer.tokens_per_step)
            shown = {**metrics, **model_labels(trainer.model, metrics)}
            bar.update(state.step, shown, meter.tokens_per_s(), seconds)
            if state.step == first_step + 1:
                _warn_if_long(trainer, seconds)
            if state.nonfinite_in_row >= args.max_nonfinite:
                log.write({"kind": "stop", "step": state.step, "reason": "nonfinite"})
                raise TrainingStopped(_diverged_message(trainer, last_saved))
            if state.step % args.log_every == 0 or state.step == args.steps:
                row = meter.row(state.step, state.tokens_seen, state.elapsed_s)
                row.update(model_labels(trainer.model, row))
                log.write(row)
                bar.print_train(row)
            if state.step % args.eval_every == 0 or state.step == args.steps:
                _evaluate(trainer, log, bar)
            due = state.step % args.save_every == 0 or state.step == args.steps
            if due and state.nonfinite_in_row == 0:  # never save during a non-finite streak
                trainer.save_checkpoint()
                last_saved = state.step
    if stop.requested and meter.rows:
        log.write(meter.row(state.step, state.tokens_seen, state.elapsed_s))
    if stop.requested and state.step > last_saved and state.nonfinite_in_row == 0:
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


def _after_lost_rank(trainer: Trainer, log: MetricsLog, lost: PeerLost) -> PeerLost:
    """[dist] Every rank's weights are those of the last completed update (a step is applied
    only after all its collectives succeeded): rank 0 saves them, unless in a non-finite
    streak, and says how to go on."""
    state, out = trainer.state, trainer.out
    if not trainer.dist.main:
        return lost
    kept = checkpoint_dirs(out)
    last_saved = load_trainer_state(kept[-1]).get("step", -1) if kept else -1
    if state.step > last_saved and state.nonfinite_in_row == 0:
        trainer.save_checkpoint()
        kept, last_saved = checkpoint_dirs(out), state.step
    log.write({"kind": "stop", "step": state.step, "reason": "lost a rank", "time": _now()})
    where = f"the newest checkpoint is {kept[-1]}" if kept else "no checkpoint was written"
    return PeerLost(f"{lost}; {where}. Continue with: kssm train --resume --out {out}")


def _warn_if_long(trainer: Trainer, seconds: float) -> None:
    remaining = trainer.args.steps - trainer.state.step
    total = seconds * remaining
    message = f"first step took {seconds:.1f} s; at this pace the run ends in {format_eta(total)}"
    if total > WEEK_S:
        message += (
            " -- over a week on this machine; a smaller preset (--preset small or tiny) or "
            "fewer --steps would finish sooner"
        )
    trainer.say(message)


def _evaluate(trainer: Trainer, log: MetricsLog, bar: TrainProgress) -> None:
    row = trainer.evaluate()
    row.update(model_labels(trainer.model, row, "val_"))
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


def _run_config(trainer: Trainer, ckpt: Path | None) -> dict[str, Any]:
    n_params = sum(v.size for _, v in tree_flatten(trainer.model.parameters()))
    meta = trainer.data.meta
    return {
        "train": trainer.args.to_dict(),
        "model": trainer.model_args.to_dict(),
        "aux_loss": {"name": trainer.aux_name, "weight": trainer.aux_weight},
        "n_params": n_params,
        "tokens_per_step": trainer.tokens_per_step,  # over all ranks
        "ranks": trainer.dist.size,  # [dist] data-parallel processes (mlx.launch)
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
