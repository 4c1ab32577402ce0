"""The published ablation: bistable (u clamped to [0.1, 10]) against monostable (no clamp).

Both variants are trained by the training loop of `kssm train` with the same seed, data and
step budget, each in its own run folder (OUT/bistable, OUT/monostable). A run folder that
already holds checkpoints is resumed, so an interrupted ablation continues where it stopped.

The comparison reads the evaluations each run logged in RUN/metrics.jsonl (rows with
"kind": "eval") and reports the last one, as the published table did at 15K steps: val R, val
loss (CE + lambda_reg * reg, the published quantity), val CE and u (the mean over layers of the
reduced variable), beside the published numbers.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VARIANTS = ("bistable", "monostable")
METRICS_NAME = "metrics.jsonl"
# Published PyTorch K-SSM v3, WikiText-103, 15K steps (spec: "Published results").
PUBLISHED = {
    "bistable": {"val_R": 0.4908, "val_loss": 8.76, "val_u": 0.103},
    "monostable": {"val_R": 0.4043, "val_loss": 10.93, "val_u": -0.975},
}
# (key, label) of the comparison table, in the published order, then what was not published.
TABLE_ROWS = (
    ("val_R", "val R"),
    ("val_loss", "val loss (CE + λ·reg)"),
    ("val_u", "u (mean over layers)"),
    ("val_ce", "val CE"),
    ("val_ppl", "val perplexity"),
    ("best_val_loss", "best val loss"),
    ("step", "step of last eval"),
)
TRAJECTORY_COLUMNS = ("step", "val_ce", "val_ppl", "val_loss", "val_R", "val_u")


@dataclass
class RunSummary:
    label: str
    path: str
    variant: str | None  # "bistable" | "monostable" | None when the run has no model config
    evals: list[dict]  # eval rows, by step, each with a derived "val_u"

    @property
    def final(self) -> dict:
        return self.evals[-1]

    def value(self, key: str) -> float:
        if key == "best_val_loss":
            return min(row["val_loss"] for row in self.evals)
        return float(self.final.get(key, math.nan))


# ---------------------------------------------------------------------------- training


def train_variants(
    data: str, steps: int, out: str | Path, preset: str = "tiny", console=None, **overrides
) -> dict[str, Path]:
    """Train (or resume) both variants with identical settings; returns variant -> run folder."""
    from ..config import model_args_for, train_args_for
    from ..io import checkpoint_dirs
    from ..training import run_training

    runs = {}
    for variant in VARIANTS:
        run_dir = Path(out) / variant
        train_args = train_args_for(
            preset, data=str(data), steps=steps, out=str(run_dir), **overrides
        )
        model_args = model_args_for(preset, bistable=variant == "bistable")
        resume = run_dir if checkpoint_dirs(run_dir) else None
        if console is not None:
            console.print(
                f"[bold]ablation: {variant}[/] -> {run_dir}" + (" (resuming)" if resume else "")
            )
        runs[variant] = Path(run_training(train_args, model_args, resume=resume, console=console))
    return runs


# ---------------------------------------------------------------------------- reading runs


def read_evals(run_dir: str | Path) -> list[dict]:
    """The run's evaluation rows, by step (a resumed run may log a step twice: the last wins)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {METRICS_NAME}: is it a `kssm train` run folder?")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("kind") == "eval":
                by_step[int(row["step"])] = row
    if not by_step:
        raise ValueError(f'{path} has no evaluations yet (rows with "kind": "eval")')
    rows = [by_step[s] for s in sorted(by_step)]
    for row in rows:
        if "val_u" not in row:
            row["val_u"] = (
                float(np.mean(row["val_u_layers"])) if row.get("val_u_layers") else math.nan
            )
    return rows


def run_variant(run_dir: str | Path) -> str | None:
    """Which variant a run trained, from its newest model config."""
    from ..io import ModelFolderError, read_config, resolve_model_folder

    try:
        bistable = read_config(resolve_model_folder(run_dir)).bistable
    except ModelFolderError:
        return None
    return "bistable" if bistable else "monostable"


def summarize_run(run_dir: str | Path, label: str | None = None) -> RunSummary:
    run_dir = Path(run_dir)
    return RunSummary(
        label or run_dir.name, str(run_dir), run_variant(run_dir), read_evals(run_dir)
    )


# ---------------------------------------------------------------------------- outputs


def ablation_table(runs: Sequence[RunSummary]) -> list[dict]:
    """Rows: metric, label, one value per run, and the published bistable/monostable values."""
    return [
        {
            "metric": key,
            "label": label,
            "values": [run.value(key) for run in runs],
            "published": {v: PUBLISHED[v].get(key) for v in VARIANTS},
        }
        for key, label in TABLE_ROWS
    ]


def write_trajectories_csv(path: str | Path, runs: Sequence[RunSummary]) -> Path:
    """One row per run and evaluation: the scalar metrics, then R and u per layer."""
    n_layers = max(len(row.get("val_R_layers", [])) for run in runs for row in run.evals)
    layer_cols = [f"val_R_L{i}" for i in range(n_layers)] + [f"val_u_L{i}" for i in range(n_layers)]
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "variant", *TRAJECTORY_COLUMNS, *layer_cols])
        for run in runs:
            for row in run.evals:
                per_layer = _padded(row.get("val_R_layers"), n_layers) + _padded(
                    row.get("val_u_layers"), n_layers
                )
                writer.writerow(
                    [
                        run.label,
                        run.variant or "",
                        *(row.get(c, "") for c in TRAJECTORY_COLUMNS),
                        *per_layer,
                    ]
                )
    return path


def _padded(values, n: int) -> list:
    values = list(values or [])
    return values + [""] * (n - len(values))


def plot_trajectories(path: str | Path, runs: Sequence[RunSummary]) -> Path:
    """Val loss, val CE, val R and u against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = [
        ("val_loss", "val loss (CE + λ·reg)"),
        ("val_ce", "val CE (nats)"),
        ("val_R", "val R"),
        ("val_u", "u (mean over layers)"),
    ]
    for ax, (key, title) in zip(axes.flat, panels, strict=True):
        for run in runs:
            steps = [row["step"] for row in run.evals]
            ax.plot(
                steps,
                [row.get(key, math.nan) for row in run.evals],
                marker="o",
                ms=3,
                label=_legend(run),
            )
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend()
    fig.suptitle("K-SSM ablation: bistable (u clamped) vs monostable")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _legend(run: RunSummary) -> str:
    return run.label if run.variant in (None, run.label) else f"{run.label} ({run.variant})"


def compare_runs(
    run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None
) -> dict:
    """Summarise runs and write ablation.csv, ablation.png, ablation.json and ablation.md."""
    from .report import ablation_markdown

    labels = labels or [None] * len(run_dirs)
    runs = [summarize_run(d, label) for d, label in zip(run_dirs, labels, strict=True)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "experiment": "ablate",
        "runs": [
            {"label": r.label, "path": r.path, "variant": r.variant, "evals": r.evals} for r in runs
        ],
        "table": ablation_table(runs),
        "files": {
            "csv": str(write_trajectories_csv(out / "ablation.csv", runs)),
            "figure": str(plot_trajectories(out / "ablation.png", runs)),
            "json": str(out / "ablation.json"),
            "report": str(out / "ablation.md"),
        },
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    (out / "ablation.md").write_text(ablation_markdown(result))
    return result
