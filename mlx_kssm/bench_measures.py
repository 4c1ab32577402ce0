"""The measurements behind ``kssm bench`` (see :mod:`mlx_kssm.bench`): each appends its rows to
the report. The train steps run in fresh processes (``python -m mlx_kssm.bench TASK``) so that
every peak resident memory is that configuration's alone."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import mlx.core as mx

from .bench import BenchOptions, Report, Row, kernels_active


# -- timing ---------------------------------------------------------------------------------------
def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def train_step_worker(config: str, batch: int, seq: int, warmup: int, repeats: int) -> dict:
    """One full train step of K-SSM v3 at ``config``, as `kssm train` runs it (in a subprocess)."""
    import mlx.optimizers as optim

    from .config import model_args_for
    from .models import build_model
    from .steps import make_steps

    mx.random.seed(0)
    model = build_model(model_args_for(config))
    model.train()
    optimizer = optim.AdamW(learning_rate=4e-4, betas=[0.9, 0.999], weight_decay=0.1)
    optimizer.init(model.trainable_parameters())
    steps = make_steps(model, optimizer, aux_weight=0.5, grad_clip=1.0, head="auto")
    tokens = mx.random.randint(0, model.args.vocab_size, (batch, seq + 1))
    key = mx.random.key(1)

    def step():
        _, _, grads = steps.micro_step(tokens, key)
        steps.apply_update(grads)
        mx.eval(model.state, optimizer.state)

    for _ in range(warmup):
        step()
    mx.reset_peak_memory()
    times = timed(step, 0, repeats)
    return {
        "seconds": times,
        "mlx_peak_bytes": mx.get_peak_memory(),
        "rss_bytes": peak_rss_bytes(),
        "head": steps.head,
    }


def torch_step_worker(config: str, batch: int, seq: int, warmup: int, repeats: int) -> dict:
    from .bench_torch import measure_train_step
    from .config import model_args_for

    result = measure_train_step(model_args_for(config), batch, seq, warmup, repeats)
    return {**result, "rss_bytes": peak_rss_bytes()}


WORKERS = {"train": train_step_worker, "torch": torch_step_worker}


def in_subprocess(task: str, env: dict | None = None, **kwargs) -> dict:
    """Runs a worker in a fresh Python (its own peak memory); {"error": ...} if it failed."""
    command = [sys.executable, "-m", "mlx_kssm.bench", json.dumps({"task": task, **kwargs})]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def _tokens_per_s(tokens: int, seconds: list[float]) -> tuple[float, float]:
    median = statistics.median(seconds)
    return tokens / median, 1000 * median


# -- the measurements -------------------------------------------------------------------------
def measure_train(options: BenchOptions, report: Report, log) -> None:
    paths = [("kernel", "1"), ("reference", "0")] if kernels_active() else [("reference", None)]
    shape = f"{options.batch} x {options.seq}"
    tokens = options.batch * options.seq
    kwargs = dict(batch=options.batch, seq=options.seq, warmup=options.warmup)
    for config in options.configs:
        rows = []
        for path, flag in paths:
            log(f"train step, {config}, {path} path")
            env = {"KSSM_KERNELS": flag} if flag is not None else None
            result = in_subprocess("train", env, config=config, repeats=options.repeats, **kwargs)
            row = Row("train step", config, path, shape, note=result.get("error", ""))
            if "seconds" in result:
                row.tokens_per_s, row.ms = _tokens_per_s(tokens, result["seconds"])
                row.peak_bytes, row.rss_bytes = result["mlx_peak_bytes"], result["rss_bytes"]
                row.note = f"{result['head']} head"
            rows.append(row)
        if len(rows) == 2 and rows[0].ms and rows[1].ms:
            rows[0].ratio = f"{rows[1].ms / rows[0].ms:.2f}x the reference path"
        if options.torch and _torch_installed():
            log(f"train step, {config}, PyTorch eager")
            result = in_subprocess("torch", None, config=config, repeats=options.repeats, **kwargs)
            row = Row("train step", config, "PyTorch eager", shape, note=result.get("error", ""))
            if "seconds" in result:
                row.tokens_per_s, row.ms = _tokens_per_s(tokens, result["seconds"])
                row.rss_bytes = result["rss_bytes"]
                row.note = "reference ratio (bench_torch.py)"
                for mine in rows:
                    if mine.tokens_per_s:
                        mine.ratio = "; ".join(filter(None, [mine.ratio, _vs_torch(mine, row)]))
            rows.append(row)
        report.rows.extend(rows)


def _vs_torch(mine: Row, torch_row: Row) -> str:
    speed = mine.tokens_per_s / torch_row.tokens_per_s
    return f"{speed:.2f}x PyTorch's tokens/s, {mine.rss_bytes / torch_row.rss_bytes:.2f}x its RSS"


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _model(config: str):
    from .config import model_args_for
    from .models import build_model

    mx.random.seed(0)
    model = build_model(model_args_for(config))
    model.eval()
    mx.eval(model.parameters())
    return model


def measure_forward(options: BenchOptions, report: Report, log) -> None:
    for config in options.configs:
        log(f"forward, {config}")
        report.rows.append(_forward_row(config, options))


def _forward_row(config: str, options: BenchOptions) -> Row:
    model = _model(config)
    forward = mx.compile(lambda t: model(t))
    tokens = mx.random.randint(0, model.args.vocab_size, (options.batch, options.seq))
    mx.reset_peak_memory()
    times = timed(lambda: mx.eval(forward(tokens)), options.warmup, options.repeats)
    row = Row("forward", config, _default_path(), f"{options.batch} x {options.seq}")
    row.tokens_per_s, row.ms = _tokens_per_s(tokens.size, times)
    row.peak_bytes = mx.get_peak_memory()
    return row


def recompute_generate(model, prompt: list[int], n: int) -> None:
    """The published sampler: the whole context through the model for every new token."""
    context = list(prompt)
    for _ in range(n):
        token = mx.argmax(model(mx.array([context]))[:, -1], axis=-1)
        context.append(int(token.item()))


def measure_generation(options: BenchOptions, report: Report, log) -> None:
    from .generate import generate_steps, greedy

    config = options.configs[0]
    model = _model(config)
    room = (model.args.max_positions or options.context + options.new_tokens) - options.context
    n_cached = max(2, min(options.new_tokens, room))
    n_recompute = max(1, min(3 if options.quick else 8, room))
    prompt = [int(t) for t in mx.random.randint(0, model.args.vocab_size, (options.context,))]
    shape = f"1 x {options.context} prompt"
    log(f"generation, {config}, cached")
    steps = []
    for _ in range(options.warmup + 1):
        steps = []
        start = time.perf_counter()
        for _step in generate_steps(model, prompt, greedy, n_cached):
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
    cached = Row(
        "generation", config, "cached", shape, note=f"{n_cached - 1} tokens after the first"
    )
    cached.tokens_per_s = (len(steps) - 1) / sum(steps[1:])
    cached.ms = 1000 / cached.tokens_per_s
    log(f"generation, {config}, recompute ({n_recompute} tokens)")
    recompute_generate(model, prompt, 1)  # warm-up
    start = time.perf_counter()
    recompute_generate(model, prompt, n_recompute)
    seconds = time.perf_counter() - start
    slow = Row("generation", config, "recompute", shape, note=f"{n_recompute} tokens")
    slow.tokens_per_s, slow.ms = n_recompute / seconds, 1000 * seconds / n_recompute
    cached.ratio = f"{cached.tokens_per_s / slow.tokens_per_s:.1f}x the recompute sampler"
    report.rows.extend([cached, slow])


def _default_path() -> str:
    return "kernel" if kernels_active() else "reference"


def op_cases(config: str, batch: int, seq: int) -> dict:
    """name -> (reference fn, kernel fn or None, args, differentiable argnums)."""
    from .config import model_args_for
    from .ops import oscillator, scan

    args = model_args_for(config)
    n, h = args.n_oscillators, args.n_harmonics
    channels, state = 2 * args.hidden_dim, 16  # the SSM's inner width and state (kssm_ssm)
    mx.random.seed(1)
    bank_args = [
        mx.random.normal((batch, seq, 1)) * 0.1,
        mx.linspace(-3.14159, 3.14159, n),
        2 * mx.sigmoid(mx.random.normal((batch, seq, 1))),
        mx.array([0.2]),
        mx.random.normal((batch, seq, n)),
    ]
    scan_args = [
        mx.random.normal((batch, seq, channels)),
        mx.log1p(mx.exp(mx.random.normal((batch, seq, channels)) - 1)),
        -mx.exp(mx.random.normal((channels, state)) * 0.5),
        mx.random.normal((batch, seq, state)),
        mx.random.normal((batch, seq, state)),
        mx.ones((channels,)),
    ]
    kernel_bank = kernel_scan = None
    if kernels_active():
        from .kernels import bank as bank_kernel
        from .kernels import scan as scan_kernel

        kernel_bank, kernel_scan = bank_kernel.oscillator_features, scan_kernel.selective_scan
    return {
        f"bank N={n} H={h}": (oscillator.oscillator_features, kernel_bank, bank_args, h),
        f"scan D={channels} N={state}": (scan.selective_scan, kernel_scan, scan_args, None),
    }


def measure_ops(options: BenchOptions, report: Report, log) -> None:
    config = options.configs[0]
    shape = f"{options.batch} x {options.seq}"
    for name, (reference, kernel, args, h) in op_cases(config, options.batch, options.seq).items():
        for what in ("forward", "forward + backward"):
            rows = []
            for path, fn in (("kernel", kernel), ("reference", reference)):
                if fn is None:
                    continue
                log(f"{name}, {what}, {path}")
                call = _op_call(fn, h)
                if what != "forward":
                    call = mx.grad(lambda *a, c=call: _total(c(*a)), argnums=(0, 1, 2, 3))
                compiled = mx.compile(call)
                mx.reset_peak_memory()
                times = timed(
                    lambda c=compiled, a=args: mx.eval(c(*a)), options.warmup, options.repeats
                )
                row = Row(f"{name}, {what}", config, path, shape)
                row.tokens_per_s, row.ms = _tokens_per_s(options.batch * options.seq, times)
                row.peak_bytes = mx.get_peak_memory()
                rows.append(row)
            if len(rows) == 2:
                rows[0].ratio = f"{rows[1].ms / rows[0].ms:.2f}x the reference path"
            report.rows.extend(rows)


def _op_call(fn, n_harmonics):
    if n_harmonics is None:
        return lambda *a: fn(*a)[0]
    return lambda *a: fn(*a, n_harmonics)


def _total(out):
    return mx.sum(out * out)
