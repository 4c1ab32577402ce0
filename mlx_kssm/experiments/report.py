"""Reports of the experiments: markdown for papers, rich tables for the terminal, strict JSON.

Every function here takes the JSON-ready result of run_intervention / run_comparison /
compare_runs and only formats it; nothing is computed twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..jsonl import strict_json
from .intervene import GENERATION_METRICS
from .observables import GOLDILOCKS_R, GOLDILOCKS_U, REPETITION_WINDOW

# (metric key, column header) of the per-condition table.
CONDITION_COLUMNS = (
    ("R_forced", "R gen"),
    ("U", "U"),
    ("distinct_1", "dist-1"),
    ("distinct_2", "dist-2"),
    ("distinct_4", "dist-4"),
    ("repetition", f"rep/{REPETITION_WINDOW}"),
    ("length", "length"),
    ("identical_to_control", "same text"),
    ("goldilocks", "Goldilocks"),
    ("ce", "CE"),
    ("delta_ce", "ΔCE"),
    ("kl", "KL"),
)
TEST_NAMES = {
    "paired_t": "paired t",
    "welch_t": "Welch t",
    "one_sample_t": "one-sample t (KL > 0)",
    "anova": "one-way ANOVA",
    "pearson": "Pearson r",
}


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


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(headers), "|" + "---|" * len(headers)] + [line(row) for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
    return path


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


# ---------------------------------------------------------------------------- intervene


def condition_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["condition", "target R", "ω scale", "measured R", "max |R−target|"]
    headers += [h for _, h in CONDITION_COLUMNS]
    rows = []
    for c in result["conditions"]:
        m = c["metrics"]
        row = [
            c["name"],
            fmt(c["target_r"]),
            fmt(c["omega_scale"]),
            fmt(c["measured_r"]),
            fmt(c["r_max_abs_error"], 2),
        ]
        rows.append(row + [fmt(m[k]) for k, _ in CONDITION_COLUMNS])
    return headers, rows


def significance_matrix(result: dict) -> tuple[list[str], list[list[str]]]:
    """Metric x test: the Holm-corrected p of each test (Pearson with its r)."""
    forced = [c["name"] for c in result["conditions"] if c["target_r"] is not None]
    headers = ["metric", "ANOVA p", "Pearson r (p)"] + [f"{name} vs control p" for name in forced]
    rows = []
    for metric in (*GENERATION_METRICS, "ce", "kl"):
        tests = [t for t in result["tests"] if t["metric"] == metric]
        anova = next((t for t in tests if t["test"] == "anova"), None)
        r = next((t for t in tests if t["test"] == "pearson"), None)
        by_cond = {t["condition"]: t for t in tests if t["condition"]}
        row = [
            metric,
            fmt_p(anova["p_holm"]) if anova else "–",
            f"{fmt(r['effect'], 3)} ({fmt_p(r['p_holm'])})" if r else "–",
        ]
        row += [fmt_p(by_cond[n]["p_holm"]) if n in by_cond else "–" for n in forced]
        rows.append(row)
    return headers, rows


def all_tests_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["test", "metric", "condition", "statistic", "effect", "n", "p", "p (Holm)", "note"]
    rows = [
        [
            TEST_NAMES[t["test"]],
            t["metric"],
            t["condition"] or "–",
            fmt(t["statistic"]),
            fmt(t["effect"]),
            str(t["n"]),
            fmt_p(t["p"]),
            fmt_p(t["p_holm"]),
            t["note"],
        ]
        for t in result["tests"]
    ]
    return headers, rows


def _seed_range(s: dict) -> str:
    """Generation (prompt p, trial t) uses seed + p * trials + t."""
    return f"{s['seed']}..{s['seed'] + s['n_prompts'] * s['trials'] - 1}"


def _settings_lines(result: dict, model: str) -> list[str]:
    s = result["settings"]
    seeds = _seed_range(s)
    return [
        f"- model: `{model}`",
        f"- mode: `{s['mode']}`; forced layers: {', '.join(map(str, s['layers']))}; "
        f"target R: {', '.join(f'{r:g}' for r in s['targets'])}",
        f"- generations: {s['n_prompts']} prompts × {s['trials']} trials (seeds {seeds}, the "
        f"same in every condition), temperature {s['temp']}, top-k {s['top_k'] or 'off'}, "
        f"top-p {s['top_p'] if s['top_p'] < 1 else 'off'}, at most {s['max_tokens']} tokens",
        f"- teacher-forced: {s['n_windows']} windows of up to {s['window']} tokens"
        + (f" of {result['eval_source']}" if result.get("eval_source") else "")
        + f"; {s['n_segments']} segments of {s['segment']} positions are the tests' units",
        f"- significance: p < {s['alpha']}, Holm-corrected over all {len(result['tests'])} tests",
    ]


def intervene_markdown(result: dict, model: str = "") -> str:
    parts = ["# Forcing the Kuramoto order parameter R: does the output change?\n"]
    parts.append("\n".join(_settings_lines(result, model)) + "\n")
    parts.append(f"## Verdict\n\n**{result['verdict']['text']}**\n")
    parts.append("## Conditions\n\n" + md_table(*condition_rows(result)))
    parts.append("## Tests (Holm-corrected p)\n\n" + md_table(*significance_matrix(result)))
    parts.append(samples_section(result, result["conditions"], "name", "condition"))
    parts.append(INTERVENE_DEFINITIONS)
    parts.append("## All tests\n\n" + md_table(*all_tests_rows(result)))
    return "\n".join(parts)


INTERVENE_DEFINITIONS = f"""## Definitions

- **measured R**: mean R of the forced layers over every teacher-forced position;
  **max |R−target|** its largest deviation at any position. **R gen**: the same over generated steps.
- **U**: entropy of the next-token distribution / log V (temperature 1), mean over generated steps.
- **dist-n**: distinct n-grams / n-grams of one generation; **rep/{REPETITION_WINDOW}**: fraction of
  tokens already present among the previous {REPETITION_WINDOW}; **length**: tokens before
  end-of-text; **same text**: fraction of generations identical to the control's (same seed).
- **CE**: teacher-forced cross-entropy (nats/token); **ΔCE** = CE − CE(control);
  **KL**: KL(p_free ‖ p_forced) per position (nats); both averaged per segment of positions.
- Paired t-tests pair each generation (prompt × trial) or segment with the control's; the
  one-way ANOVA and Pearson r use the forced conditions only. Samples whose metric is undefined
  (a text too short for a 4-gram) are left out of that metric's tests.
- **Goldilocks**: fraction of generated steps in the zone of Phase-Mamba, R (mean over layers) in [{GOLDILOCKS_R[0]}, {GOLDILOCKS_R[1]}] and U in
  [{GOLDILOCKS_U[0]}, {GOLDILOCKS_U[1]}].

Published reference: the PyTorch K-SSM v3 gave identical text at R 0.24, 0.35 and 0.96; in
Phase-Mamba, ANOVA p = 0.44 across forced R 0.1–0.9.
"""


def transposed(headers: Sequence[str], rows: Sequence[Sequence[str]]):
    """Quantities as rows, conditions as columns: fits a terminal for a handful of conditions."""
    return [""] + [row[0] for row in rows], [
        [h] + [row[i] for row in rows] for i, h in enumerate(headers) if i
    ]


def significance_summary(result: dict) -> tuple[list[str], list[list[str]]]:
    """Per metric: ANOVA, Pearson, and the smallest paired p with its condition (terminal)."""
    headers = ["metric", "ANOVA p", "Pearson r", "Pearson p", "min paired p", "at"]
    rows = []
    for metric in (*GENERATION_METRICS, "ce", "kl"):
        tests = {
            t["test"]: t for t in result["tests"] if t["metric"] == metric and not t["condition"]
        }
        paired = [t for t in result["tests"] if t["metric"] == metric and t["condition"]]
        best = min(
            paired, key=lambda t: t["p_holm"] if t["p_holm"] == t["p_holm"] else 2.0, default=None
        )
        anova, r = tests.get("anova"), tests.get("pearson")
        rows.append(
            [
                metric,
                fmt_p(anova["p_holm"]) if anova else "–",
                fmt(r["effect"], 3) if r else "–",
                fmt_p(r["p_holm"]) if r else "–",
                fmt_p(best["p_holm"]) if best else "–",
                best["condition"] if best else "–",
            ]
        )
    return headers, rows


def print_intervene(result: dict, console) -> None:
    console.print(_rich_table("Conditions", *transposed(*condition_rows(result))))
    console.print(_rich_table("Tests (Holm-corrected p)", *significance_summary(result)))
    console.print(f"[bold]{result['verdict']['text']}[/]")


# ---------------------------------------------------------------------------- compare


def compare_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    (a, b) = result["models"]
    headers = ["metric", a["label"], b["label"], "difference", "t", "p", "p (Holm)"]
    rows = [
        [
            t["metric"],
            fmt(a["metrics"][t["metric"]]),
            fmt(b["metrics"][t["metric"]]),
            fmt(t["effect"]),
            fmt(t["statistic"]),
            fmt_p(t["p"]),
            fmt_p(t["p_holm"]),
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
        f"{_seed_range(s)}, the same on both), temperature {s['temp']}, at most "
        f"{s['max_tokens']} tokens; two-sample Welch t-tests, Holm-corrected.\n\n"
        f"**{result['verdict']['text']}**\n\n"
        + md_table(*compare_rows(result))
        + "\n"
        + samples_section(result, result["models"], "label", "model")
    )


def print_compare(result: dict, console) -> None:
    console.print(_rich_table("Model comparison", *compare_rows(result)))
    console.print(f"[bold]{result['verdict']['text']}[/]")


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
    console.print(_rich_table("Ablation (last evaluation)", *ablation_rows(result)))


# ---------------------------------------------------------------------------- terminal


def _rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]):
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
