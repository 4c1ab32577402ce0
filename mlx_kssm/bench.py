"""``kssm bench``: what this package costs on the machine it runs on, as one table to paste.

Measured, each in the same run:
  - the full train step (micro-step forward + backward as `kssm train` compiles it, its default
    head, then the AdamW update) for each --config: tokens/s, MLX's peak memory and the process'
    peak resident memory, every config in a fresh process so that peaks do not mix;
  - with PyTorch installed, an eager PyTorch K-SSM v3 (``bench_torch.py``) train step on the
    same config and shape, also in its own process: the reference ratio;
  - the forward pass (compiled, eval mode), tokens/s;
  - generation: cached incremental decoding (``generate.generate_steps``) against the published
    sampler, which re-ran the whole context for every new token, both after a prompt of
    --context tokens, tokens/s;
  - the oscillator bank and the selective scan alone, forward and forward + backward.
Where a kernel exists and can run (Metal, GPU, KSSM_KERNELS not 0), the train step, the bank and
the scan are measured twice, kernel path and reference path (KSSM_KERNELS=0). Elsewhere only the
reference path runs, and the table says so. Times are the median of the repeats after warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import date

import mlx.core as mx

MIB = 1 << 20


@dataclass
class BenchOptions:
    configs: tuple[str, ...] = ("published", "small")
    batch: int = 4
    seq: int = 256
    context: int = 512  # prompt length for generation
    new_tokens: int = 16
    quick: bool = False
    torch: bool = True  # the PyTorch reference, when torch is installed

    @property
    def warmup(self) -> int:
        return 1

    @property
    def repeats(self) -> int:
        return 2 if self.quick else 5


@dataclass
class Row:
    measurement: str
    config: str
    path: str  # "reference", "kernel", "cached", "recompute", "PyTorch eager"
    shape: str
    tokens_per_s: float | None = None
    ms: float | None = None
    peak_bytes: int | None = None  # MLX's peak memory (or the process' for PyTorch)
    rss_bytes: int | None = None  # the measuring process' peak resident memory
    ratio: str = ""
    note: str = ""


@dataclass
class Report:
    machine: dict
    options: dict
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict:
        first = next(
            (r for r in self.rows if r.measurement == "train step" and r.tokens_per_s), None
        )
        return {
            "train_tokens_per_s": first.tokens_per_s if first else None,
            "peak_memory_bytes": first.peak_bytes if first else None,
            "peak_rss_bytes": first.rss_bytes if first else None,
            "machine": self.machine,
            "options": self.options,
            "rows": [asdict(r) for r in self.rows],
        }


# -- the machine -----------------------------------------------------------------------------
def kernels_active() -> bool:
    from .ops import dispatch

    return dispatch.kernels_enabled() and dispatch.on_gpu()


def blas_in_use(maps: str = "/proc/self/maps") -> str:
    """The BLAS MLX's CPU matmuls use: Accelerate on macOS; on Linux the bundled reference BLAS
    unless one was preloaded and is mapped into this process (kssm preloads Intel MKL when the
    `mkl` extra is installed: blas_preload; or a hand-set LD_PRELOAD)."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    from .blas_preload import preloaded_blas

    return preloaded_blas(dict(os.environ), maps)


def cpu_name() -> str:
    if sys.platform == "darwin":
        done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True)
        return done.stdout.decode().strip() or platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    from importlib import metadata

    info = {
        "date": date.today().isoformat(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "device": mx.default_device().type.name,
        "metal": mx.metal.is_available(),
        "cuda": mx.cuda.is_available(),
        "mlx": metadata.version("mlx"),
        "blas": blas_in_use(),
        "kernels": "active (Metal)" if kernels_active() else _why_no_kernels(),
    }
    if mx.metal.is_available():
        info["gpu"] = mx.metal.device_info().get("device_name", "Metal GPU")
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        info["torch"] = "not installed"
    return info


def _why_no_kernels() -> str:
    if os.environ.get("KSSM_KERNELS", "1").strip() == "0":
        return "off (KSSM_KERNELS=0): reference path only"
    if not mx.metal.is_available():
        return "not available here (no Metal): reference path only"
    return "not used (default device is not the GPU): reference path only"


# -- timing -----------------------------------------------------------------------------------
def run_bench(options: BenchOptions, log=lambda message: None) -> Report:
    from .bench_measures import measure_forward, measure_generation, measure_ops, measure_train

    report = Report(machine=machine(), options=asdict(options))
    measure_train(options, report, log)
    measure_forward(options, report, log)
    measure_generation(options, report, log)
    measure_ops(options, report, log)
    return report


def markdown(report: Report, command: str = "kssm bench") -> str:
    m = report.machine
    lines = [
        f"Machine: {m['platform']}, {m['cpu']}, {m['cores']} cores"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; {m['date']}; `{command}`.",
        f"MLX {m['mlx']}, device {m['device']}, Metal {'yes' if m['metal'] else 'no'}, "
        f"CUDA {'yes' if m['cuda'] else 'no'}; BLAS: {m['blas']}; PyTorch: {m['torch']}.",
        f"Custom kernels: {m['kernels']}.",
        "",
        "| measurement | config | path | batch x seq | tokens/s | ms | MLX peak (MiB) "
        "| process peak RSS (MiB) | ratio | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        cells = [
            r.measurement,
            r.config,
            r.path,
            r.shape,
            _figure(r.tokens_per_s) if r.tokens_per_s else "failed",
            _figure(r.ms),
            _mib(r.peak_bytes),
            _mib(r.rss_bytes),
            r.ratio,
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(x: float | None) -> str:
    """Three significant digits at least: 0.0112 tokens/s must not print as 0.0."""
    if x is None:
        return ""
    return f"{x:,.1f}" if x >= 100 else f"{x:.3g}"


def _mib(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / MIB:,.0f}" if n >= 10 * MIB else f"{n / MIB:.1f}"


def _worker_main(argv: list[str]) -> None:
    from .bench_measures import WORKERS

    task = json.loads(argv[0])
    result = WORKERS[task.pop("task")](**task)
    print(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
