"""One source of defaults: the training recipe (TrainArgs) and the named presets.

Each architecture's ``ModelArgs`` and model sizes live in its module (mlx_kssm/models/);
``ModelArgs`` here is K-SSM v3's, whose defaults are the published configuration
(46,246,722 parameters). The CLI, the converter and the tests read their defaults from here.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from .models import complete_config, get_classes, model_args_from_config, presets
from .models.kssm_v3 import PRESETS as MODEL_PRESETS
from .models.kssm_v3 import ModelArgs

__all__ = ["MODEL_PRESETS", "ModelArgs", "TrainArgs", "model_args_for", "train_args_for"]


def model_args_for(preset: str, model_type: str = "kssm_v3", **overrides: Any):
    """The ModelArgs of ``model_type`` at a named size, with overrides (validated). An override
    the architecture has no field for is an error, not silently dropped."""
    sizes = presets(model_type)
    if preset not in sizes:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(sizes)}")
    _, args_class = get_classes(model_type)
    fields = {f.name for f in dataclasses.fields(args_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        raise ValueError(f"{flag} ({unknown[0]}) does not apply to {model_type} models")
    config = complete_config({**sizes[preset], **overrides, "model_type": model_type})
    return model_args_from_config(config)


@dataclass
class TrainArgs:
    """The training recipe (spec: "Training recipe"); every field is also a `kssm train` flag."""

    preset: str = "published"  # model + schedule preset: published | small | tiny
    data: str = "wikitext-103-raw-v1"  # folder with train.txt/valid.txt, files, or a hub dataset
    out: str = "runs/kssm"  # run folder: checkpoints, best/, metrics.jsonl, train_config.json
    steps: int = 100_000  # optimizer updates in total (the cosine reaches 0 here)
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 2  # micro-batches per update
    seq_length: int = 512  # tokens per training window (windows are seq_length + 1 long)
    lr: float = 4e-4  # peak learning rate
    warmup: int = 1_000  # linear warmup steps
    schedule: str = "cosine"  # "cosine" (warmup then cosine to 0) or "constant" (after warmup)
    decay_steps: int | None = None  # where the cosine reaches 0; None = steps (train in legs
    #                                 with the full run's schedule: --steps k --decay-steps n)
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on every parameter
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip
    lambda_reg: float | None = None  # weight of the regulariser; None = 0.5 bistable, 0.0 mono
    eval_every: int = 500  # steps between evaluations
    eval_batches: int = 20  # fixed validation batches per evaluation
    save_every: int = 1_000  # steps between checkpoints
    keep_last: int = 3  # rolling checkpoints kept (best/ is kept apart)
    seed: int = 42  # model init, data order and phase noise all derive from it
    sample_tokens: int = 48  # length of the text sample printed at each evaluation
    log_every: int = 10  # steps between train rows in metrics.jsonl (averages over them)
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    head: str = "auto"  # where the tied head's CE runs: mlx | numpy (same numbers, much faster
    #                     on MLX's Linux CPU wheel) | auto = numpy there, mlx elsewhere

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> TrainArgs:
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Schedules and batch sizes that fit each model preset: a 300-step run must not spend its
# life in a 1,000-step warmup.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "small": dict(
        steps=5_000,
        batch_size=8,
        grad_accum=1,
        seq_length=256,
        lr=1e-3,
        warmup=200,
        eval_every=250,
        eval_batches=8,
        save_every=500,
    ),
    # Measured on wiki-leads, 300 steps, seed 42, 2-core Linux CPU with the numpy head: batch
    # 16 x 64 at lr 3e-2, beta2 0.99 reached val CE 6.62 in 6.4 min (unigram 7.48); batch 4
    # reached 7.13; at batch 16, lr 1e-2 gave 7.21, lr 5e-2 6.76, weight decay 0 6.62. The
    # published recipe scaled down (lr 3e-3 to 6e-3, beta2 0.999) stayed at 7.42-7.46.
    "tiny": dict(
        data="sotu-sample",  # shipped with the package: trains with no network
        steps=300,
        batch_size=16,
        grad_accum=1,
        seq_length=64,
        lr=3e-2,
        beta2=0.99,
        warmup=30,
        eval_every=50,
        eval_batches=8,
        save_every=100,
    ),
}


# Where a preset's recipe depends on the architecture. At the tiny preset's learning rate the
# bistable regulariser (0.1 / delta - 0.5 log u, weight 0.5) makes training chaotic: a one-ulp
# change moved a 300-step v3 result by 0.3 nats, while without it the same change moved it by
# less than 0.01 (benchmarks/RESULTS.md, benchmarks/preset_stability.py). So the K-SSM tiny
# runs train on the cross-entropy alone; the model is unchanged (u stays clamped to [0.1, 10])
# and `--lambda-reg 0.5` restores the published loss.
ARCH_TRAIN_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("tiny", "kssm_v3"): dict(lambda_reg=0.0),
    ("tiny", "kssm_ssm"): dict(lambda_reg=0.0),
}


def train_args_for(preset: str, model_type: str = "kssm_v3", **overrides: Any) -> TrainArgs:
    """The recipe of a preset for an architecture, with overrides."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    for_arch = ARCH_TRAIN_PRESETS.get((preset, model_type), {})
    return TrainArgs.from_dict({**TRAIN_PRESETS[preset], **for_arch, "preset": preset, **overrides})
