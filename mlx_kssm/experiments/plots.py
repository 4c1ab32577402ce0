"""`kssm plot RUN_DIR`: PNG figures of a training run, drawn from its metrics.jsonl.

loss.png      train CE and total loss, val CE and val loss (the published "val loss")
R.png         the order parameter R: val R per layer, train R (mean over layers)
u.png         the reduced variable u and |det| per layer (val; train where no eval yet)
summary.png   the four trajectories the paper followed (loss, R, u, |det|) side by side,
              with the published K-SSM v3 numbers marked where the run reaches their step
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    written = []
    for name, panels in (
        ("loss", [_loss]),
        ("R", [_order_parameter]),
        ("u", [_reduced_variable, _determinant]),
        ("summary", [_loss, _order_parameter, _reduced_variable, _determinant]),
    ):
        ncols = 2 if len(panels) > 1 else 1
        nrows = (len(panels) + 1) // 2
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.2 * nrows), squeeze=False)
        for panel, ax in zip(panels, axes.flat, strict=False):
            panel(ax, train, evals, variant if name == "summary" else None)
        fig.suptitle(f"{Path(run_dir).resolve().name}: {name}")
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))
        plt.close(fig)
    return written


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
            label="val loss (CE + λ·reg)",
        )
    _published(ax, variant, "val_loss", train, evals)
    ax.set(xlabel="step", ylabel="nats per token", title="loss")
    ax.legend(fontsize=8)


def _order_parameter(ax, train, evals, variant) -> None:
    if train:
        ax.plot(
            [r["step"] for r in train],
            [r["R"] for r in train],
            color="0.6",
            lw=1,
            label="train R (mean)",
        )
    for layer, values in enumerate(_per_layer(evals, "val_R_layers")):
        ax.plot([r["step"] for r in evals], values, "o-", ms=3, label=f"val R, layer {layer}")
    _published(ax, variant, "val_R", train, evals)
    ax.set(xlabel="step", ylabel="R", title="order parameter R", ylim=(0, 1.02))
    ax.legend(fontsize=8)


def _reduced_variable(ax, train, evals, variant) -> None:
    rows, key, where = (evals, "val_u_layers", "val") if evals else (train, "u_layers", "train")
    for layer, values in enumerate(_per_layer(rows, key)):
        ax.plot([r["step"] for r in rows], values, "o-", ms=3, label=f"{where} u, layer {layer}")
    _published(ax, variant, "val_u", train, evals)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set(xlabel="step", ylabel="u", title="reduced variable u (mean)")
    ax.legend(fontsize=8)


def _determinant(ax, train, evals, variant) -> None:
    rows, key, where = (evals, "val_det_layers", "val") if evals else (train, "det_layers", "train")
    for layer, values in enumerate(_per_layer(rows, key)):
        ax.plot(
            [r["step"] for r in rows], values, "o-", ms=3, label=f"{where} |det|, layer {layer}"
        )
    ax.set(xlabel="step", ylabel="|det|", title="|det| (mean)")
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


def _variant(run_dir) -> str:
    """bistable or monostable, from the run's train_config.json (bistable if unknown)."""
    try:
        config = json.loads((Path(run_dir) / "train_config.json").read_text())
        return "bistable" if config["model"].get("bistable", True) else "monostable"
    except (OSError, ValueError, KeyError, TypeError):
        return "bistable"


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
