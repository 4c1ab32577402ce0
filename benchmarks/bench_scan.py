"""Benchmark: the chunked selective scan against the sequential loop (and the quadratic form).

Times forward and forward+backward of ``mlx_kssm.ops.selective_scan`` (chunked),
``selective_scan_sequential`` (the plain loop) and, for the record, the textbook masked
segment-sum form within chunks (below; needs a (B, T, T, D, N) tensor per chunk because
Mamba-1's A differs per channel and state), eager and under mx.compile, with the peak memory
each call adds above its inputs. Ratios against the sequential loop come from the same run.

    python benchmarks/bench_scan.py [--batch 4] [--length 256] [--channels 128] [--state 16]
        [--chunk-sizes auto,8,32] [--variants sequential,chunked,quadratic]
        [--modes eager,compiled] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_kssm.bench import cpu_name
from mlx_kssm.ops import default_chunk_size, selective_scan, selective_scan_sequential


def quadratic_scan(x, delta, A, B_, C, D_skip, h0=None, chunk_size=16):
    """Within each chunk y_t = C_t . (exp(S_t) h_start + sum_{s<=t} exp(S_t - S_s) dBx_s),
    S the cumulative log-decay, entries s > t set to -inf before exp; h carried across chunks."""
    batch, length, channels = x.shape
    h = mx.zeros((batch, channels, A.shape[1])) if h0 is None else h0
    ys = []
    for lo in range(0, length, chunk_size):
        d, u = delta[:, lo : lo + chunk_size], (delta * x)[:, lo : lo + chunk_size]
        b, c = B_[:, lo : lo + chunk_size], C[:, lo : lo + chunk_size]
        steps = d.shape[1]
        cum = mx.cumsum(d, axis=1)  # (B, T, D)
        segment = (cum[:, :, None] - cum[:, None, :])[..., None] * A  # (B, T, T, D, N)
        causal = mx.tril(mx.ones((steps, steps), dtype=mx.bool_))[None, :, :, None, None]
        kernel = mx.exp(mx.where(causal, segment, -mx.inf))
        inside = mx.sum(kernel * b[:, None, :, None, :] * u[:, None, :, :, None], axis=2)
        decay = mx.exp(cum[..., None] * A)  # (B, T, D, N)
        ys.append(mx.sum((inside + decay * h[:, None]) * c[:, :, None, :], axis=-1))
        h = inside[:, -1] + decay[:, -1] * h
    return mx.concatenate(ys, axis=1) + D_skip * x, h


def make_inputs(batch, length, channels, state):
    keys = mx.random.split(mx.random.key(0), 6)
    x = mx.random.normal((batch, length, channels), key=keys[0])
    delta = nn.softplus(mx.random.normal((batch, length, channels), key=keys[1]) - 2.0)
    A = -mx.exp(mx.random.normal((channels, state), key=keys[2]))
    B_ = mx.random.normal((batch, length, state), key=keys[3])
    C = mx.random.normal((batch, length, state), key=keys[4])
    D_skip = mx.ones((channels,))
    y_weight = mx.random.normal((batch, length, channels), key=keys[5])
    inputs = (x, delta, A, B_, C, D_skip, y_weight)
    mx.eval(inputs)
    return inputs


def make_call(scan, inputs, backward, compiled):
    x, delta, A, B_, C, D_skip, y_weight = inputs
    if backward:

        def loss(x, delta, A, B_, C):
            y, h = scan(x, delta, A, B_, C, D_skip)
            return mx.sum(y * y_weight) + mx.sum(h)

        fn = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    else:

        def fn(x, delta, A, B_, C):
            return scan(x, delta, A, B_, C, D_skip)

    if compiled:
        fn = mx.compile(fn)
    return lambda: fn(x, delta, A, B_, C)


def measure(calls, repeats):
    """Best time and peak memory above the inputs for each call; calls interleaved per repeat."""
    best = {name: float("inf") for name in calls}
    extra = dict.fromkeys(calls, 0.0)
    for call in calls.values():
        mx.eval(call())  # warm-up, compiles
    for _ in range(repeats):
        for name, call in calls.items():
            mx.synchronize()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            start = time.perf_counter()
            mx.eval(call())
            best[name] = min(best[name], time.perf_counter() - start)
            extra[name] = max(extra[name], (mx.get_peak_memory() - base) / 2**20)
    return best, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--chunk-sizes", default="auto", help="comma list; 'auto' = the default")
    parser.add_argument("--variants", default="sequential,chunked,quadratic")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    auto = default_chunk_size(args.length)
    chunk_sizes = [auto if c == "auto" else int(c) for c in args.chunk_sizes.split(",")]
    variants = args.variants.split(",")

    scans = {}
    if "sequential" in variants:
        scans["sequential"] = selective_scan_sequential
    for chunk in chunk_sizes:
        if "chunked" in variants:
            scans[f"chunked T={chunk}"] = partial(selective_scan, chunk_size=chunk)
    if "quadratic" in variants:
        scans[f"quadratic T={chunk_sizes[0]}"] = partial(quadratic_scan, chunk_size=chunk_sizes[0])

    inputs = make_inputs(args.batch, args.length, args.channels, args.state)
    whole = args.batch * args.length * args.channels * args.state * 4 / 2**20
    reference = selective_scan_sequential(*inputs[:6])[0]
    print(
        f"machine: {platform.machine()}, {cpu_name()}, MLX {mx.__version__}, {mx.default_device()}"
    )
    print(
        f"B={args.batch} L={args.length} D={args.channels} N={args.state} (default T={auto}); "
        f"one (B, L, D, N) float32 tensor = {whole:.1f} MiB; best of {args.repeats}"
    )
    for name, scan in scans.items():
        err = float(mx.max(mx.abs(scan(*inputs[:6])[0] - reference)))
        print(f"max |y - y_sequential| for {name}: {err:.1e}")
    print(
        "| computation | mode | pass | time (ms) | peak above inputs (MiB) | time / seq | mem / seq |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for backward in (False, True):
            calls = {
                name: make_call(s, inputs, backward, mode == "compiled")
                for name, s in scans.items()
            }
            best, extra = measure(calls, args.repeats)
            seq = "sequential" if "sequential" in best else None
            for name in calls:
                ratios = (
                    f"{best[name] / best[seq]:.2f} | {extra[name] / max(extra[seq], 1e-9):.2f}"
                    if seq
                    else " | "
                )
                print(
                    f"| {name} | {mode} | {'fwd+bwd' if backward else 'fwd'} | "
                    f"{best[name] * 1e3:.1f} | {extra[name]:.1f} | {ratios} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
