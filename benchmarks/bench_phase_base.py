"""Benchmark: a Phase-Mamba base with mlx-lm's own Mamba-1 mixer against the same base with
our chunked-scan mixer (mamba_lm.ScanMixer, what `load_base` now gives it).

One random mlx-lm `mamba` model (by default the shape of the experiment's tiny base: hidden 64,
4 layers, cl100k's 100,277 tokens) is timed twice in the same run, once per mixer: its body
(embedding, layers, final norm: the hidden states, forward) and the gradient through every layer
(forward + backward, of a mean square of the hidden states), on a batch of 16 x 64 tokens. The
tied head is left out: it is the same matmul for both mixers and at this size it is the step
(with it, both variants took ~15 s forward and ~44-45 s forward + backward here, under load).
Both variants hold the same weights; their hidden states are compared too.

With --core-step it also times what a Phase-Mamba core's training pays per micro-step on that
base (a multiplicative core at the middle layer, chunked mixer): the all-MLX step against the
numpy-head step (steps.py; the frozen head's logits and dh in numpy), in the same run.

    python benchmarks/bench_phase_base.py [--batch 16] [--length 64] [--hidden 64]
        [--layers 4] [--vocab 100277] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_kssm.bench import cpu_name
from mlx_kssm.models.mamba_lm import ScanMixer
from mlx_kssm.models.phase_base import random_base


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() (its result evaluated), after one warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 16), ("length", 64), ("hidden", 64), ("layers", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--vocab", type=int, default=100_277)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--core-step", action="store_true", help="also time a core's training step")
    a = p.parse_args(argv)
    if min(a.batch, a.length, a.hidden, a.layers, a.vocab, a.repeats) < 1:
        raise SystemExit("error: every size and --repeats must be at least 1")

    from mlx_lm.models import mamba

    model = random_base(a.vocab, a.hidden, a.layers, seed=0).unfreeze()
    tokens = mx.random.randint(0, a.vocab, (a.batch, a.length + 1), key=mx.random.key(1))
    inputs = tokens[:, :-1]

    def loss_fn(m):
        return mx.mean(mx.square(m.backbone(inputs, None)))

    grad = nn.value_and_grad(model, loss_fn)
    results, logits = {}, {}
    for name, mixer in (
        ("mlx-lm MambaBlock (per-token loop)", mamba.MambaBlock),
        ("chunked", ScanMixer),
    ):
        for layer in model.layers:
            layer.mixer.__class__ = mixer
        logits[name] = model.backbone(inputs, None)
        mx.eval(logits[name])
        results[name] = (
            timed(lambda: model.backbone(inputs, None), a.repeats),
            timed(lambda: grad(model), a.repeats),
        )
    (ref, ref_t), (ours, ours_t) = results.items()
    diff = mx.max(mx.abs(logits[ref] - logits[ours])).item()
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"machine: {cpu_name()}, {platform.machine()}, MLX {mx.__version__}")
    print(
        f"base: mlx-lm mamba, hidden {a.hidden}, {a.layers} layers, vocabulary {a.vocab}, "
        f"{n_params:,} parameters; batch {a.batch} x {a.length} tokens; median of {a.repeats}"
    )
    print(f"max |hidden-state difference| between the two mixers: {diff:.2e}")
    print("| mixer | body forward (s) | body forward + backward (s) |")
    print("|---|---|---|")
    for name, (fwd, both) in results.items():
        print(f"| {name} | {fwd:.3f} | {both:.3f} |")
    print(
        f"| ratio ({ref.split()[0]} / chunked) | {ref_t[0] / ours_t[0]:.2f}x | "
        f"{ref_t[1] / ours_t[1]:.2f}x |"
    )
    if a.core_step:
        core_step(a)


def core_step(a) -> None:
    """Median seconds of one core micro-step, all-MLX vs numpy head, on a random base."""
    import mlx.optimizers as optim

    import mlx_kssm
    from mlx_kssm.models.phase_mamba import ModelArgs
    from mlx_kssm.steps import MLXSteps, NumpyHeadSteps

    args = ModelArgs(
        vocab_size=a.vocab, coupling="multiplicative", random_base_hidden=a.hidden,
        random_base_layers=a.layers,
    )  # fmt: skip
    model = mlx_kssm.build_model(args)
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    tokens = mx.random.randint(0, a.vocab, (a.batch, a.length + 1), key=mx.random.key(2))
    print("| core micro-step | seconds | speed vs all-MLX |")
    print("|---|---|---|")
    reference = None
    for name, flavour in (("all-MLX", MLXSteps), ("numpy head", NumpyHeadSteps)):
        steps = flavour(model, optimizer, 0.0, 1.0)
        seconds = timed(lambda steps=steps: steps.micro_step(tokens, None)[2], a.repeats)
        reference = reference or seconds
        print(f"| {name} | {seconds:.3f} | {reference / seconds:.2f}x |")


if __name__ == "__main__":
    main()
