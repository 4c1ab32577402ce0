"""The training recipe's arithmetic (spec: "Training recipe"): the learning-rate schedule, the
optimizer, the auxiliary loss weight, and the counter-derived random keys.

Exactness. Everything random in training is a function of the seed and a counter, never of
hidden state: the phase noise of micro-batch m at step s comes from ``noise_key(seed, s, m)``,
so a resumed run draws exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from .config import TrainArgs


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


def aux_weight_for(train_args: TrainArgs, model) -> float:
    """The auxiliary loss's weight: ``--lambda-reg`` as given, else the model's default
    (K-SSM v3: 0.5 bistable, 0.0 monostable, as published)."""
    if train_args.lambda_reg is not None:
        return float(train_args.lambda_reg)
    return float(model.default_aux_weight)


def noise_key(seed: int, *counters: int) -> mx.array:
    """A PRNG key that depends only on (seed, counters): no state to save or restore."""
    words = np.random.SeedSequence([seed, *counters]).generate_state(1, dtype=np.uint64)
    return mx.random.key(int(words[0]))


def schedule_change(recorded: dict, args: TrainArgs, step: int) -> str | None:
    """A message when the schedule a run continues with differs from the one it was on (e.g.
    --steps raised without --decay-steps): the learning rate then jumps at the resume."""
    keys = ("lr", "warmup", "schedule")
    if not recorded or any(k not in recorded for k in keys + ("steps",)):
        return None  # a partial record (a converted checkpoint): nothing to compare with
    before = TrainArgs.from_dict({**args.to_dict(), **{k: recorded[k] for k in keys}})
    before.steps, before.decay_steps = recorded["steps"], recorded.get("decay_steps")
    lr_before = float(make_schedule(before)(step))
    lr_now = float(make_schedule(args)(step))
    if lr_before == lr_now:
        return None
    return (
        f"the schedule changed since the checkpoint: the learning rate at step {step} "
        f"is now {lr_now:.3g} (it was {lr_before:.3g}); to train in legs of one schedule, "
        "pass --decay-steps with the final step count from the first leg"
    )
