"""The causality experiment's report: markdown for papers, rich tables for the terminal.

Formats the JSON-ready result of run_intervention; nothing is computed twice. The effects table
is ranked by effect size relative to its stated minimum (verdict.py), the order the verdict uses.
"""

from __future__ import annotations

from .observables import GOLDILOCKS_R, GOLDILOCKS_U, REPETITION_WINDOW
from .report import fmt, fmt_ci, fmt_p, md_table, rich_table, samples_section, seed_range
from .stats import CI_LEVEL
from .verdict import GENERATION_METRICS, TEACHER_FORCED_METRICS, UNITS

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
TERMINAL_EFFECTS = 8  # rows of the ranked effects table in the terminal (all in the markdown)
SHORT_OUTCOMES = {"changed": "CHANGED", "below minimum": "< min", "not significant": "n.s."}


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


def _with_unit(value, metric: str, digits: int = 3) -> str:
    return fmt(value, digits) + UNITS.get(metric, "")


def effects_rows(result: dict, terminal: bool = False) -> tuple[list[str], list[list[str]]]:
    """Comparisons with the control, largest effect (relative to its minimum) first. For the
    terminal: the first TERMINAL_EFFECTS, two digits, no units or Cohen's d (80 columns)."""
    digits = 2 if terminal else 3
    headers = ([] if terminal else ["#"]) + ["metric", "condition", "effect", f"{CI_LEVEL:.0%} CI"]
    headers += [] if terminal else ["Cohen's d"]
    headers += ["min", "p Holm", "outcome"] if terminal else ["minimum", "p (Holm)", "outcome"]
    by_key = {(t["metric"], t["condition"]): t for t in result["tests"] if t["condition"]}
    order = result["verdict"]["ranking"][: TERMINAL_EFFECTS if terminal else None]
    rows = []
    for rank, key in enumerate(order, 1):
        t = by_key[(key["metric"], key["condition"])]
        metric = t["metric"] + (
            " (mean KL)" if t["test"] == "one_sample_t" and not terminal else ""
        )
        unit = "" if terminal else t["metric"]
        outcome = SHORT_OUTCOMES.get(t["outcome"], t["outcome"]) if terminal else t["outcome"]
        row = ([] if terminal else [str(rank)]) + [metric, t["condition"]]
        row += [_with_unit(t["effect"], unit, digits), fmt_ci(t, digits)]
        row += [] if terminal else [fmt(t["cohen_d"], 3)]
        row += [_with_unit(t["min_effect"], unit, digits), fmt_p(t["p_holm"]), outcome]
        rows.append(row)
    return headers, rows


def dose_response_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Across the forced conditions: ANOVA (eta squared) and Pearson r(target R, metric)."""
    headers = ["metric", "ANOVA η²", "ANOVA p (Holm)", "Pearson r", f"r {CI_LEVEL:.0%} CI"]
    headers += ["Pearson p (Holm)"]
    rows = []
    for metric in (*GENERATION_METRICS, *TEACHER_FORCED_METRICS):
        tests = {t["test"]: t for t in result["tests"] if t["metric"] == metric}
        anova, r = tests.get("anova"), tests.get("pearson")
        if anova is None and r is None:
            continue
        rows.append(
            [
                metric,
                fmt(anova["effect"], 3) if anova else "–",
                fmt_p(anova["p_holm"]) if anova else "–",
                fmt(r["effect"], 3) if r else "–",
                fmt_ci(r) if r else "–",
                fmt_p(r["p_holm"]) if r else "–",
            ]
        )
    return headers, rows


def all_tests_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    headers = ["test", "metric", "condition", "statistic", "effect", f"{CI_LEVEL:.0%} CI"]
    headers += ["n", "p", "p (Holm)", "outcome", "note"]
    names = {"paired_t": "paired t", "one_sample_t": "one-sample t (KL > 0)"}
    names.update(anova="one-way ANOVA", pearson="Pearson r")
    rows = [
        [
            names[t["test"]],
            t["metric"],
            t["condition"] or "–",
            fmt(t["statistic"]),
            fmt(t["effect"]),
            fmt_ci(t),
            str(t["n"]),
            fmt_p(t["p"]),
            fmt_p(t["p_holm"]),
            t["outcome"],
            t["note"],
        ]
        for t in result["tests"]
    ]
    return headers, rows


def _settings_lines(result: dict, model: str) -> list[str]:
    s, v = result["settings"], result["verdict"]
    minimums = v["minimum_effects"]
    return [
        f"- model: `{model}`",
        f"- mode: `{s['mode']}`; forced layers: {', '.join(map(str, s['layers']))}; "
        f"target R: {', '.join(f'{r:g}' for r in s['targets'])}",
        f"- generations: {s['n_prompts']} prompts × {s['trials']} trials (seeds "
        f"{seed_range(s)}, the same in every condition), temperature {s['temp']}, top-k "
        f"{s['top_k'] or 'off'}, top-p {s['top_p'] if s['top_p'] < 1 else 'off'}, at most "
        f"{s['max_tokens']} tokens",
        f"- teacher-forced: {s['n_windows']} windows of up to {s['window']} tokens"
        + (f" of {result['eval_source']}" if result.get("eval_source") else "")
        + f"; {s['n_segments']} segments of {s['segment']} positions are the tests' units",
        f"- a change is declared where an effect against the control reaches its minimum "
        f"(KL and |ΔCE|: {minimums['kl']:g} nats, `--min-effect`; U, distinct-n, rep/"
        f"{REPETITION_WINDOW}: {s['min_text_effect']:g}, `--min-text-effect`; length: "
        f"{minimums['length']:g} tokens, that fraction of the token budget) **and** its test "
        f"passes at p < {s['alpha']}, Holm-corrected over all {len(result['tests'])} tests",
    ]


def intervene_markdown(result: dict, model: str = "") -> str:
    parts = ["# Forcing the Kuramoto order parameter R: does the output change?\n"]
    parts.append("\n".join(_settings_lines(result, model)) + "\n")
    parts.append(f"## Verdict\n\n**{result['verdict']['text']}**\n")
    parts.append("## Conditions\n\n" + md_table(*condition_rows(result)))
    parts.append(
        "## Effects against the control, largest first (relative to the minimum)\n\n"
        + md_table(*effects_rows(result))
    )
    headers, rows = dose_response_rows(result)
    if rows:
        parts.append("## Across the forced conditions\n\n" + md_table(headers, rows))
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
- **effect**: the mean difference to the control over paired observations (each generation,
  prompt × trial, or each segment), or the mean KL; **{CI_LEVEL:.0%} CI**: its t-based confidence
  interval; **Cohen's d**: effect / standard deviation of the differences (∞ when every
  difference is the same). **outcome**: *changed* = effect ≥ minimum and p (Holm) < alpha;
  *below minimum* = detectable but smaller than the minimum; *not significant*.
- The verdict rests on the comparisons with the control. ANOVA (η² = share of the variance
  between conditions) and Pearson r use the forced conditions only. Samples whose metric is
  undefined (a text too short for a 4-gram) are left out of that metric's tests.
- **Goldilocks**: fraction of generated steps in the zone of Phase-Mamba, R (mean over layers)
  in [{GOLDILOCKS_R[0]}, {GOLDILOCKS_R[1]}] and U in [{GOLDILOCKS_U[0]}, {GOLDILOCKS_U[1]}].

Published reference: the PyTorch K-SSM v3 gave identical text at R 0.24, 0.35 and 0.96; in
Phase-Mamba, ANOVA p = 0.44 across forced R 0.1–0.9.
"""


def transposed(headers, rows):
    """Quantities as rows, conditions as columns: fits a terminal for a handful of conditions."""
    return [""] + [row[0] for row in rows], [
        [h] + [row[i] for row in rows] for i, h in enumerate(headers) if i
    ]


def print_intervene(result: dict, console) -> None:
    console.print(rich_table("Conditions", *transposed(*condition_rows(result))))
    n = len(result["verdict"]["ranking"])
    shown = f" ({TERMINAL_EFFECTS} of {n})" if n > TERMINAL_EFFECTS else ""
    title = f"Effects vs control, largest first{shown}; n.s. = not significant"
    console.print(rich_table(title, *effects_rows(result, terminal=True)))
    console.print(result["verdict"]["text"], style="bold", markup=False, soft_wrap=True)
