"""`kssm plot RUN_DIR`: PNG figures of a training run, drawn from its metrics.jsonl.

loss.png      train CE and total loss, val CE and val loss (the published "val loss")
NAME.png      one per metric the model reports per layer (K-SSM v3: R.png, u.png, det.png):
              val per layer (train where no eval yet), the train mean over layers
summary.png   all of them side by side; for K-SSM v3 runs the published numbers are marked
              where the run reaches their step
The figures follow the names in metrics.jsonl, so any architecture's metrics are drawn.
"""

from __future__ import annotations

import io
import json
import os
from functools import partial
from pathlib import Path

from ..atomic import atomic_write_bytes
from ..jsonl import read_rows

METRICS_NAME = "metrics.jsonl"
FIGURES_DIR = "figures"
# Published PyTorch K-SSM v3 on WikiText-103 (spec: "Published results"): (step, value).
PUBLISHED = {
    "bistable": {
        "val_loss": [(15_000, 8.76), (43_500, 8.50)],
        "val_R": [(15_000, 0.4908), (100_000, 0.9928)],
        "val_u": [(15_000, 0.103)],
    },
    "monostable": {
        "val_loss": [(15_000, 10.93)],
        "val_R": [(15_000, 0.4043)],
        "val_u": [(15_000, -0.975)],
    },
}


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) by step; where a step was logged twice the last row wins."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_NAME
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a folder; pass a `kssm train` run folder")
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {METRICS_NAME}: is it a `kssm train` run folder?")
    rows: dict[tuple[str, int], dict] = {}
    for row in read_rows(path):
        if row.get("kind") in ("train", "eval"):
            rows[(row["kind"], int(row["step"]))] = row
    train = [rows[k] for k in sorted(rows) if k[0] == "train"]
    evals = [rows[k] for k in sorted(rows) if k[0] == "eval"]
    if not train and not evals:
        raise ValueError(f"{path} has no train or eval rows yet")
    return train, evals


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the run's figures (PNG) into ``out_dir`` (default RUN_DIR/figures)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    variant = _variant(run_dir)
    metrics = metric_names(train, evals)
    figures = [("loss", [_loss])] + [(m, [partial(_metric, m)]) for m in metrics]
    figures.append(("summary", [_loss] + [partial(_metric, m) for m in metrics]))
    written = []
    for name, panels in figures:
        ncols = 2 if len(panels) > 1 else 1
        nrows = (len(panels) + 1) // 2
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows), squeeze=False)
        for panel, ax in zip(panels, axes.flat, strict=False):
            panel(ax, train, evals, variant if name == "summary" else None)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.suptitle(f"{Path(run_dir).resolve().name}: {name}")
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))
        plt.close(fig)
    return written


# Row fields that are not a model's metrics (training.py and progress.py write them).
_NOT_METRICS = {"kind", "step", "loss", "ce", "lr", "tokens_per_s", "seconds_per_step"}
_NOT_METRICS |= {"skipped", "tokens", "elapsed_s", "grad_norm", "time", "reason", "from"}


def metric_names(train: list[dict], evals: list[dict]) -> list[str]:
    """The model's per-layer metrics in a run's rows (e.g. R, u, det for K-SSM v3): the names
    ``m`` for which a row holds ``m_layers`` (train) or ``val_m_layers`` (eval)."""
    names: list[str] = []
    for row in evals[:1] + train[:1]:
        for key in row:
            if key.endswith("_layers"):
                name = key.removeprefix("val_").removesuffix("_layers")
                if name not in names and name not in _NOT_METRICS:
                    names.append(name)
    return names


def _loss(ax, train, evals, variant) -> None:
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["ce"] for r in train], color="C0", lw=1, label="train CE")
        ax.plot(steps, [r["loss"] for r in train], color="C0", lw=0.8, ls=":", label="train loss")
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r["val_ce"] for r in evals], "o-", color="C1", ms=3, label="val CE")
        ax.plot(
            steps,
            [r["val_loss"] for r in evals],
            "s--",
            color="C3",
            ms=3,
            lw=1,
            label="val loss (CE + w·aux)",
        )
    _published(ax, variant, "val_loss", train, evals)
    ax.set(xlabel="step", ylabel="nats per token", title="loss")
    ax.legend(fontsize=8)


def _metric(name, ax, train, evals, variant) -> None:
    """One metric per layer: val where evaluated, else train; the train mean as a grey line."""
    if train and all(isinstance(r.get(name), (int, float)) for r in train):
        steps = [r["step"] for r in train]
        ax.plot(steps, [r[name] for r in train], color="0.6", lw=1, label=f"train {name} (mean)")
    rows, key, where = (
        (evals, f"val_{name}_layers", "val")
        if any(f"val_{name}_layers" in r for r in evals)
        else (train, f"{name}_layers", "train")
    )
    for layer, values in enumerate(_per_layer(rows, key)):
        ax.plot(
            [r["step"] for r in rows], values, "o-", ms=3, label=f"{where} {name}, layer {layer}"
        )
    _published(ax, variant, f"val_{name}", train, evals)
    if name == "R":
        ax.set(ylim=(0, 1.02))
    ax.set(xlabel="step", ylabel=name, title=f"{name} per layer")
    ax.legend(fontsize=8)


def _per_layer(rows: list[dict], key: str) -> list[list[float]]:
    """[[layer 0 values by row], [layer 1 ...], ...] from rows holding per-layer lists."""
    lists = [r[key] for r in rows if r.get(key)]
    if len(lists) != len(rows):
        return []
    return [list(values) for values in zip(*lists, strict=True)]


def _published(ax, variant, key, train, evals) -> None:
    """Mark the published numbers that fall within the run's steps (summary figure only)."""
    if variant is None:
        return
    last = max([r["step"] for r in train + evals], default=0)
    points = [(s, v) for s, v in PUBLISHED[variant].get(key, []) if s <= last]
    if points:
        ax.plot(*zip(*points, strict=True), "*", color="k", ms=10, label=f"published {variant}")


def _variant(run_dir) -> str | None:
    """The published K-SSM v3 run this one compares with (bistable or monostable), from the
    run's train_config.json; None for other architectures."""
    try:
        model = json.loads((Path(run_dir) / "train_config.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(model, dict) or model.get("model_type", "kssm_v3") != "kssm_v3":
        return None
    return "bistable" if model.get("bistable", True) else "monostable"


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return atomic_write_bytes(path, buffer.getvalue())
