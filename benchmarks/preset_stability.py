"""How far a training outcome moves when the arithmetic moves by one ulp.

Runs `kssm train`'s library entry point in this process, either as is or with one
rounding-level perturbation, and prints the final validation cross-entropy, so that two runs
that differ only by float rounding can be compared:

- ``none``: the run as `kssm train` would do it.
- ``chunk256`` (or ``chunk128``): the numpy head sums the embedding's gradient over chunks of
  256 (128) tokens instead of 512 (same math, another summation order: changes in the last bits
  of dE each step).
- ``init-ulp``: every initial weight moved one ulp towards +inf before the first step.

A training recipe is reproducible across commits and machines only if ``none`` and the
perturbed runs end close together (and different seeds end close together too).

    python benchmarks/preset_stability.py --data ../shared/corpora/wiki-leads --seed 1 \
        --perturb chunk256 [--lr 1e-2 --warmup 60 ...]

One run per process (the perturbations patch the library). Each run appends one JSON line to ``--log`` (default benchmarks/preset_stability.jsonl).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

import mlx_kssm.numpy_head as numpy_head
import mlx_kssm.trainer as trainer
import mlx_kssm.training as training
from mlx_kssm.config import model_args_for, train_args_for

PERTURBATIONS = ("none", "chunk256", "chunk128", "init-ulp")
OVERRIDABLE = {  # flag -> type, for the recipe knobs explored here
    "lr": float,
    "warmup": int,
    "beta1": float,
    "beta2": float,
    "grad_clip": float,
    "weight_decay": float,
    "batch_size": int,
    "steps": int,
    "lambda_reg": float,
}


def nudge_one_ulp(model) -> None:
    """Move every parameter one ulp towards +inf (float32 nextafter)."""
    moved = [
        (name, mx.array(np.nextafter(np.array(w), np.float32(np.inf)).astype(np.float32)))
        for name, w in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(moved))


def apply_perturbation(name: str) -> None:
    if name.startswith("chunk"):
        numpy_head.NumpyHead.__init__.__defaults__ = (None, int(name.removeprefix("chunk")))
    elif name == "init-ulp":
        build = trainer.build_model  # the Trainer builds the model

        def build_nudged(model_args):
            model = build(model_args)
            nudge_one_ulp(model)
            return model

        trainer.build_model = build_nudged


STEP_GRAD_NORMS: list[float] = []  # every step's global gradient norm (before clipping)


def record_grad_norms() -> None:
    train_step = training.Trainer.train_step

    def recorded(self, *args, **kwargs):
        metrics = train_step(self, *args, **kwargs)
        if metrics is not None:  # None: stopped between micro-batches
            STEP_GRAD_NORMS.append(metrics["grad_norm"])
        return metrics

    training.Trainer.train_step = recorded


def metrics_rows(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def run_once(data: str, seed: int, perturb: str, overrides: dict, model_overrides: dict) -> dict:
    apply_perturbation(perturb)
    record_grad_norms()
    with tempfile.TemporaryDirectory(prefix="kssm-stability-") as tmp:
        args = train_args_for(
            "tiny", data=data, seed=seed, out=str(Path(tmp) / "run"), sample_tokens=0, **overrides
        )
        started = time.perf_counter()
        run = training.run_training(args, model_args_for("tiny", **model_overrides))
        seconds = time.perf_counter() - started
        evals, trains = metrics_rows(run, "eval"), metrics_rows(run, "train")
    return {
        "data": Path(data).name,
        "seed": seed,
        "perturb": perturb,
        "overrides": overrides,
        "model_overrides": model_overrides,
        "steps": args.steps,
        "val_ce": evals[-1]["val_ce"],
        "val_ce_by_step": {r["step"]: round(r["val_ce"], 4) for r in evals},
        "train_ce_by_step": {r["step"]: round(r["ce"], 4) for r in trains},
        "val_R_by_step": {r["step"]: [round(x, 3) for x in r["val_R_layers"]] for r in evals},
        "val_u_by_step": {r["step"]: [round(x, 3) for x in r["val_u_layers"]] for r in evals},
        "grad_norm_by_step": {r["step"]: round(r["grad_norm"], 3) for r in trains},
        "grad_norm_max": round(max(STEP_GRAD_NORMS), 3),
        "steps_clipped": sum(n > args.grad_clip for n in STEP_GRAD_NORMS),
        "seconds": round(seconds, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="corpus folder, or sotu-sample")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--perturb", choices=PERTURBATIONS, default="none")
    parser.add_argument("--log", default=str(Path(__file__).with_name("preset_stability.jsonl")))
    for flag, kind in OVERRIDABLE.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None)
    parser.add_argument("--monostable", action="store_true", help="the model without u's clamp")
    opts = parser.parse_args()
    overrides = {k: getattr(opts, k) for k in OVERRIDABLE if getattr(opts, k) is not None}
    model_overrides = {"bistable": False} if opts.monostable else {}
    row = run_once(opts.data, opts.seed, opts.perturb, overrides, model_overrides)
    print(json.dumps(row))
    with open(opts.log, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
