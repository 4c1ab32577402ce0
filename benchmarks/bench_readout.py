"""Benchmark: the oscillator readout by harmonic recurrence vs the direct cos/sin of all angles.

Times forward+backward of the readout at the published sizes (N=192, H=32) and records peak
memory, as a ratio against the direct formula measured in the same run on the same machine.

    python benchmarks/bench_readout.py [--batch 4] [--length 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time

import mlx.core as mx

from mlx_kssm.ops import harmonic_features, harmonic_features_direct


def measure(fn, theta, repeats):
    loss_and_grad = mx.value_and_grad(lambda t: mx.sum(fn(t, 32) ** 2))
    mx.eval(loss_and_grad(theta))  # warm-up
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(loss_and_grad(theta))
        times.append(time.perf_counter() - start)
    return min(times), mx.get_peak_memory() / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    theta = mx.random.normal((args.batch, args.length, 192))
    direct_t, direct_mb = measure(harmonic_features_direct, theta, args.repeats)
    rec_t, rec_mb = measure(harmonic_features, theta, args.repeats)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} device={mx.default_device()}"
    )
    print(
        f"shape B={args.batch} L={args.length} N=192 H=32, forward+backward, best of {args.repeats}"
    )
    print("| readout | time (ms) | peak memory (MiB) |")
    print("|---|---|---|")
    print(f"| direct cos/sin of (B,L,N,H) | {direct_t * 1e3:.1f} | {direct_mb:.0f} |")
    print(f"| recurrence | {rec_t * 1e3:.1f} | {rec_mb:.0f} |")
    print(f"| ratio recurrence/direct | {rec_t / direct_t:.2f} | {rec_mb / direct_mb:.2f} |")


if __name__ == "__main__":
    main()
