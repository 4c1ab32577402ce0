"""Benchmark: one training micro-step (forward + backward) with the head in MLX vs in numpy.

Both flavours compute the same loss and gradients (tests/test_numpy_head.py); this measures
their time on the current machine at the tiny preset (or --preset), as a ratio in the same run.
Peak resident memory is taken per flavour in a fresh subprocess, so the two do not share a peak.

    python benchmarks/bench_train_step.py [--preset tiny] [--tokens 256 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def measure(preset: str, head: str, batch: int, length: int, repeats: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlx_kssm.config import model_args_for
    from mlx_kssm.models import build_model
    from mlx_kssm.steps import make_steps

    mx.random.seed(0)
    args = model_args_for(preset)
    model = build_model(args)
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    steps = make_steps(model, optimizer, lambda_reg=0.5, grad_clip=1.0, head=head)
    tokens = mx.random.randint(0, args.vocab_size, (batch, length + 1))
    key = mx.random.key(1)
    mx.eval(steps.micro_step(tokens, key))  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(steps.micro_step(tokens, key))
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": min(times), "peak_rss_mib": peak_mib}


def in_subprocess(*args) -> dict:
    code = "import json,sys; from bench_train_step import measure; "
    code += f"print(json.dumps(measure(*{list(args)!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=sys.path[0]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import mlx.core as mx

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} device={mx.default_device()}"
    )
    print(f"preset {args.preset}, micro-step forward+backward, best of {args.repeats}")
    print("| tokens (B x L) | head | time (ms) | tokens/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for n in args.tokens:
        batch = max(1, n // args.length)
        res = {
            h: in_subprocess(args.preset, h, batch, args.length, args.repeats)
            for h in ("mlx", "numpy")
        }
        for head, r in res.items():
            tps = batch * args.length / r["seconds"]
            print(
                f"| {batch} x {args.length} | {head} | {r['seconds'] * 1e3:.0f} | {tps:.0f} "
                f"| {r['peak_rss_mib']:.0f} |"
            )
        ratio = res["numpy"]["seconds"] / res["mlx"]["seconds"]
        print(f"| {batch} x {args.length} | ratio numpy/mlx | {ratio:.3f} | | |")


if __name__ == "__main__":
    main()
