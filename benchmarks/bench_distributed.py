"""Two ranks on this machine against one process: a correctness check, not a speed figure.

Runs ``mlx.launch -n 2 --backend ring -- kssm train --preset P --steps N --out RUN2`` and
``kssm train --preset P --steps N --grad-accum 2 --out RUN1`` (the same windows, micro-batches
and noise keys in one process), then compares their final weights and reports the seconds per
step each logged. On one machine the two ranks share its cores and memory bandwidth, so their
speed says nothing about two machines; the weights say whether the sharding is right.

    python benchmarks/bench_distributed.py [--preset tiny] [--steps 20] [--data sotu-sample]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KSSM = [sys.executable, "-c", "from mlx_kssm.cli.app import main; main()", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def seconds_per_step(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    steps = sum(r["seconds_per_step"] * n for r, n in zip(train, _counts(train), strict=True))
    return steps / train[-1]["step"]


def _counts(train: list[dict]) -> list[int]:
    ends = [r["step"] for r in train]
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def worst_difference(a: Path, b: Path) -> float:
    import mlx.core as mx
    import numpy as np

    from mlx_kssm.io import checkpoint_dirs

    wa = mx.load(str(checkpoint_dirs(a)[-1] / "model.safetensors"))
    wb = mx.load(str(checkpoint_dirs(b)[-1] / "model.safetensors"))
    return max(float(np.max(np.abs(np.array(wa[k]) - np.array(wb[k])))) for k in wa)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None, help="default: the preset's")
    args = parser.parse_args()
    launch = shutil.which("mlx.launch")
    if launch is None:
        sys.exit("mlx.launch is not on PATH (it comes with the mlx package)")
    common = ["--preset", args.preset, "--steps", str(args.steps), "--log-every", "1"]
    common += ["--data", args.data] if args.data else []
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        wall_one = run([*KSSM, *common, "--grad-accum", "2", "--out", str(one)])
        ring = [launch, "-n", "2", "--backend", "ring", "-p", str(free_port()), "--"]
        wall_two = run([*ring, *KSSM, *common, "--out", str(two)])
        worst = worst_difference(one, two)
        per_step = seconds_per_step(one), seconds_per_step(two)
    import mlx.core as mx

    print(f"Machine: {platform.machine()} {platform.processor() or ''}, MLX {mx.__version__}")
    print(f"--preset {args.preset} --steps {args.steps}; two ranks on ONE machine (loopback)\n")
    print("| run | wall (s) | s/step (logged) |")
    print("|---|---|---|")
    print(f"| 1 process, --grad-accum 2 | {wall_one:.1f} | {per_step[0]:.2f} |")
    print(f"| 2 ranks (ring), --grad-accum 1 | {wall_two:.1f} | {per_step[1]:.2f} |")
    print(f"\nlargest weight difference after {args.steps} steps: {worst:.3g}")


if __name__ == "__main__":
    main()
