"""Reports of the experiments: markdown for papers, rich tables for the terminal, strict JSON.

Every function here takes the JSON-ready result of run_comparison / compare_runs and only
formats it; nothing is computed twice. The intervention's report is in report_intervene.py.
Files are written to a temporary name and renamed, so a report is never half-written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..atomic import atomic_write_text
from ..jsonl import strict_json
from .stats import CI_LEVEL

# ---------------------------------------------------------------------------- formatting


def fmt(x, digits: int = 4) -> str:
    """Numbers for tables: NaN/None as a dash, floats with ``digits`` significant digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def fmt_p(p) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "<1e-16" if p < 1e-16 else f"{p:.3g}"


def fmt_ci(t: dict, digits: int = 3) -> str:
    """A test's confidence interval, 'low .. high' (a dash where there is none)."""
    low = t.get("ci_low")
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "–"
    return f"{fmt(low, digits)}..{fmt(t['ci_high'], digits)}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(headers), "|" + "---|" * len(headers)] + [line(row) for row in rows]
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path``."""
    return atomic_write_text(path, text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, result: dict) -> Path:
    text = json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def attach_text(result: dict, decode: Callable[[list[int]], str], prompts: Sequence[str]) -> None:
    """Add the prompts and the decoded text of every generation to a result, in place."""
    result["prompts"] = list(prompts)
    groups = result.get("conditions") or result.get("models") or []
    for group in groups:
        for sample in group["samples"]:
            sample["text"] = decode(sample["tokens"])


def samples_section(result: dict, groups: Sequence[dict], key: str, header: str) -> str:
    """The first prompt's trial-0 text in every condition or model (after attach_text)."""
    if not result.get("prompts"):
        return ""
    rows = [[g[key], repr(g["samples"][0].get("text", ""))] for g in groups]
    heading = f"## Sample generations (prompt {result['prompts'][0]!r}, trial 0)\n\n"
    return heading + md_table([header, "text"], rows)


def seed_range(s: dict) -> str:
    """Generation (prompt p, trial t) uses seed + p * trials + t."""
    return f"{s['seed']}..{s['seed'] + s['n_prompts'] * s['trials'] - 1}"


# ---------------------------------------------------------------------------- compare


def compare_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """One row per metric, the largest difference (relative to its minimum) first."""
    (a, b) = result["models"]
    headers = ["metric", a["label"], b["label"], "difference", f"{CI_LEVEL:.0%} CI"]
    headers += ["Cohen's d", "minimum", "p (Holm)", "outcome"]
    rows = [
        [
            t["metric"],
            fmt(a["metrics"][t["metric"]]),
            fmt(b["metrics"][t["metric"]]),
            fmt(t["effect"]),
            fmt_ci(t),
            fmt(t["cohen_d"], 3),
            fmt(t["min_effect"], 3),
            fmt_p(t["p_holm"]),
            t["outcome"],
        ]
        for t in result["tests"]
    ]
    return headers, rows


def compare_markdown(result: dict) -> str:
    s = result["settings"]
    models = "\n".join(f"- {m['label']}: `{m.get('path', '')}`" for m in result["models"])
    return (
        "# Model comparison (Phase-Mamba baseline protocol)\n\n"
        f"{models}\n- {s['n_prompts']} prompts × {s['trials']} trials on each model (seeds "
        f"{seed_range(s)}, the same on both), temperature {s['temp']}, at most "
        f"{s['max_tokens']} tokens; two-sample Welch t-tests, Holm-corrected; a metric differs "
        f"where the difference reaches its minimum (`--min-text-effect` {s['min_text_effect']:g}; "
        f"length: that fraction of the token budget) and p (Holm) < {s['alpha']}.\n\n"
        f"**{result['verdict']['text']}**\n\n"
        + md_table(*compare_rows(result))
        + "\n"
        + samples_section(result, result["models"], "label", "model")
    )


def print_compare(result: dict, console) -> None:
    console.print(rich_table("Model comparison", *compare_rows(result)))
    console.print(result["verdict"]["text"], style="bold", markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------- ablate


def ablation_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    runs = result["runs"]
    headers = (
        ["metric"] + [_run_header(r) for r in runs] + ["published bistable", "published monostable"]
    )
    rows = [
        [
            row["label"],
            *(fmt(v) for v in row["values"]),
            fmt(row["published"]["bistable"]),
            fmt(row["published"]["monostable"]),
        ]
        for row in result["table"]
    ]
    return headers, rows


def _run_header(run: dict) -> str:
    return (
        run["label"]
        if run["variant"] in (None, run["label"])
        else f"{run['label']} ({run['variant']})"
    )


def ablation_markdown(result: dict) -> str:
    runs = "\n".join(
        f"- {_run_header(r)}: `{r['path']}`, {len(r['evals'])} evaluations" for r in result["runs"]
    )
    files = result["files"]
    return (
        "# Ablation: bistable (u clamped to [0.1, 10]) vs monostable (no clamp)\n\n"
        f"{runs}\n\nValues at each run's last evaluation. The published numbers are the "
        "PyTorch K-SSM v3 on WikiText-103 at 15K steps; runs with another corpus or budget are "
        "comparable in direction, not in absolute value.\n\n"
        + md_table(*ablation_rows(result))
        + f"\nPer-evaluation trajectories: `{files['csv']}`; figure: `{files['figure']}`.\n\n"
        f"![ablation]({Path(files['figure']).name})\n"
    )


def print_ablation(result: dict, console) -> None:
    console.print(rich_table("Ablation (last evaluation)", *ablation_rows(result)))


# ---------------------------------------------------------------------------- terminal


def rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]):
    from rich import box
    from rich.table import Table

    # Light borders: the tables must fit an 80-column terminal.
    table = Table(title=title, show_lines=False, box=box.SIMPLE_HEAD, pad_edge=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table
