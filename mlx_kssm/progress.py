"""What a training run shows and logs per step: the averaged train rows and the terminal view.

The metrics are whatever the model reports (``model.metrics``: scalars, or one value per
oscillator bank), so nothing here knows an architecture's names. A per-bank metric ``m`` is
logged as ``m`` (mean over banks) and ``m_layers`` (the list).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{name: scalar or per-bank list} -> row fields: name (the mean) and name_layers."""
    row: dict[str, Any] = {}
    for name, value in metrics.items():
        value = np.asarray(value, dtype=np.float64)
        if value.ndim == 0:
            row[prefix + name] = float(value)
        else:
            row[prefix + name] = float(value.mean()) if value.size else math.nan
            row[prefix + name + "_layers"] = value.tolist()
    return row


def model_labels(model, row: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The words a model gives to a logged row's numbers (``model.labels``, optional; a
    phase_mamba names the paper's tone of R), under the row's prefix ("val_" for evals)."""
    labels = getattr(model, "labels", None)
    if labels is None:
        return {}
    values = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}
    return {prefix + name: text for name, text in labels(values).items()}


class Meter:
    """Averages of the train metrics since the last train row, and throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict] = []
        self.seconds = 0.0
        self.tokens = 0

    def add(self, metrics: dict[str, Any], seconds: float, tokens: int) -> None:
        self.rows.append(metrics)
        self.seconds += seconds
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def row(self, step: int, tokens_seen: int, elapsed_s: float) -> dict[str, Any]:
        good = [r for r in self.rows if not r["skipped"]] or self.rows
        keys = [k for k in good[0] if k not in ("skipped", "lr")]
        row: dict[str, Any] = {"kind": "train", "step": step}
        for key in keys:
            row[key] = np.mean([r[key] for r in good], axis=0).tolist()
        row["lr"] = self.rows[-1]["lr"]
        row["tokens_per_s"] = self.tokens_per_s()
        row["seconds_per_step"] = self.seconds / len(self.rows)
        row["skipped"] = sum(r["skipped"] for r in self.rows)
        row["tokens"] = tokens_seen
        row["elapsed_s"] = elapsed_s
        self.reset()
        return row


def _scalars(row: dict[str, Any], names: list[str], prefix: str = "") -> str:
    parts = []
    for name in names:
        value = row.get(prefix + name)
        if isinstance(value, (int, float)):
            parts.append(f"{name} {value:.3f}")
        elif isinstance(value, str):  # a model's label (model_labels)
            parts.append(f"{name} {value}")
    return "  ".join(parts)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    days, rest = divmod(int(seconds), 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


class TrainProgress:
    """The terminal view: a rich progress bar (step, s/step, tokens/s, loss, the model's
    metrics, ETA) and one line per evaluation. Without a console it does nothing."""

    def __init__(self, console, start: int, total: int, aux_name: str):
        self.console, self.start, self.total = console, start, total
        self.aux_name = aux_name
        self.metric_names: list[str] = []  # the model's, learnt from the first step's row
        self._bar = None
        self._started = time.perf_counter()

    def __enter__(self) -> TrainProgress:
        if self.console is None:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress

        self._bar = Progress(
            "step",
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            "{task.fields[info]}",
            console=self.console,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc) -> bool:
        if self._bar is not None:
            self._bar.stop()
        return False

    def eta_seconds(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return math.nan
        return (time.perf_counter() - self._started) / done * (self.total - step)

    def update(self, step: int, metrics: dict[str, Any], tokens_per_s: float, sps: float):
        if not self.metric_names:
            fixed = {"loss", "ce", "grad_norm", "skipped", "lr", self.aux_name}
            self.metric_names = [k for k in metrics if k not in fixed and not k.endswith("_layers")]
        if self._bar is None:
            return
        info = (
            f"{sps:.2f} s/step  {tokens_per_s:,.0f} tok/s  loss {metrics['loss']:.3f}  "
            f"ce {metrics['ce']:.3f}  {_scalars(metrics, self.metric_names)}  "
            f"ETA {format_eta(self.eta_seconds(step))}"
            + ("  [red]skipped[/]" if metrics["skipped"] else "")
        )
        self._bar.update(self._task, completed=step, info=info)

    def print_train(self, row: dict[str, Any]) -> None:
        """A line per train row where no live bar can be drawn (output to a file, nohup)."""
        if self.console is None or self.console.is_terminal:
            return
        self.console.print(
            f"step {row['step']}/{self.total}: loss {row['loss']:.4f}  ce {row['ce']:.4f}  "
            f"{_scalars(row, self.metric_names)}  lr {row['lr']:.2e}  "
            f"{row['seconds_per_step']:.2f} s/step  {row['tokens_per_s']:,.0f} tok/s  "
            f"ETA {format_eta(self.eta_seconds(row['step']))}",
            soft_wrap=True,
        )

    def print_eval(self, row: dict[str, Any]) -> None:
        if self.console is None:
            return
        parts = []
        for name in self.metric_names:
            layers = row.get(f"val_{name}_layers")
            shown = _scalars(row, [name], "val_")
            if layers is not None:
                shown += " [" + " ".join(f"{v:.3f}" for v in layers) + "]"
            parts.append(shown)
        mark = " [green]best[/]" if row["best"] else ""
        self.console.print(
            f"[bold]eval {row['step']}[/]: val CE {row['val_ce']:.4f} "
            f"(ppl {row['val_ppl']:.1f})  val loss {row['val_loss']:.4f}  "
            + "  ".join(p for p in parts if p)
            + mark,
            soft_wrap=True,
        )
        if row.get("sample"):
            from rich.markup import escape

            sample = escape(repr(row["sample"]))  # model text may hold [brackets]
            self.console.print(f"  [dim]sample:[/] {sample}", soft_wrap=True)


def sayer(console):
    """A one-line message callback over a rich console (silent without one)."""
    return (lambda message: console.print(message)) if console is not None else (lambda m: None)
