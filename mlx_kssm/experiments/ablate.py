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

from .plots import METRICS_NAME, read_metrics
from .plots import PUBLISHED as PUBLISHED_BY_STEP

VARIANTS = ("bistable", "monostable")
# The published table is at 15K steps (spec: "Published results"); plots.py holds them by step.
PUBLISHED_STEP = 15_000
PUBLISHED = {
    variant: {key: v for key, points in series.items() for s, v in points if s == PUBLISHED_STEP}
    for variant, series in PUBLISHED_BY_STEP.items()
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


class AblationInterrupted(RuntimeError):
    """A training run of the ablation stopped before its step budget."""


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
    """Train (or resume) both variants with identical settings; returns variant -> run folder.

    Raises AblationInterrupted when a run stops early (Ctrl+C): the next variant is not
    started, and running the same call again resumes where it stopped.
    """
    from ..config import model_args_for, train_args_for
    from ..io import checkpoint_dirs
    from ..training import run_training

    runs = {}
    for variant in VARIANTS:
        run_dir = Path(out) / variant
        # The published loss for each variant (0.5 bistable, 0 monostable) unless the user set
        # one: a preset's own weight (the tiny preset trains on CE alone) would blur the contrast.
        chosen = {"lambda_reg": None, **overrides}
        train_args = train_args_for(preset, data=str(data), steps=steps, out=str(run_dir), **chosen)
        model_args = model_args_for(preset, bistable=variant == "bistable")
        resume = run_dir if checkpoint_dirs(run_dir) else None
        if console is not None:
            console.print(
                f"[bold]ablation: {variant}[/] -> {run_dir}" + (" (resuming)" if resume else "")
            )
        runs[variant] = Path(run_training(train_args, model_args, resume=resume, console=console))
        reached = _last_eval_step(run_dir)
        if reached < steps:
            raise AblationInterrupted(
                f"the {variant} run stopped before step {steps} (last evaluation at step "
                f"{reached}); run the same command again to resume it"
            )
    return runs


def _last_eval_step(run_dir: Path) -> int:
    """A finished run evaluates at its last step, so this tells whether it got there."""
    try:
        return int(read_evals(run_dir)[-1]["step"])
    except ValueError:  # stopped before its first evaluation
        return 0


# ---------------------------------------------------------------------------- reading runs


def read_evals(run_dir: str | Path) -> list[dict]:
    """The run's evaluation rows by step (of a step logged twice, by a resume, the last)."""
    _, evals = read_metrics(run_dir)
    if not evals:
        raise ValueError(f"{Path(run_dir) / METRICS_NAME} has no evaluations yet")
    for row in evals:  # older logs carry u per layer only
        if "val_u" not in row:
            row["val_u"] = (
                float(np.mean(row["val_u_layers"])) if row.get("val_u_layers") else math.nan
            )
    return evals


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
