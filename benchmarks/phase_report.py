"""The markdown table of benchmarks/phase_experiment.py, from what its runs wrote (the JSON of
`kssm compare` and `kssm intervene`, the run folders' metrics). Nothing here runs a model; the
statements under "What the figures say" are comparisons of the measured numbers only."""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = "ANOVA entropy F(4,95) = 0.945, p = 0.441; distinct-2 F = 0.616, p = 0.652"
ANOVA_METRICS = (("U", "U"), ("distinct_2", "distinct-2"), ("ce", "CE"))
COMPARE_METRICS = (("U", "U"), ("distinct_2", "distinct-2"), ("repetition", "repetition"))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def val(x) -> float:
    """A number from the JSON, where strict JSON wrote NaN as null."""
    return math.nan if x is None else float(x)


def num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def pval(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "<1e-16" if p < 1e-16 else f"{p:.2g}"


def with_ci(t: dict | None, sign: float = 1.0) -> str:
    if not t or t["effect"] is None:
        return "n/a"
    if t["ci_low"] is None:
        return num(sign * t["effect"])
    lo, hi = sorted((sign * t["ci_low"], sign * t["ci_high"]))
    return f"{num(sign * t['effect'])} [{num(lo)}, {num(hi)}]"


# ---------------------------------------------------------------------------- reading results


def tests_of(result: dict | None, test: str, metric: str) -> list[dict]:
    return [
        t for t in (result or {}).get("tests", []) if t["test"] == test and t["metric"] == metric
    ]


def largest(tests: list[dict]) -> dict | None:
    defined = [t for t in tests if t["effect"] is not None]
    return max(defined, key=lambda t: abs(t["effect"]), default=None)


def largest_kl(result) -> dict | None:
    return largest(tests_of(result, "one_sample_t", "kl"))


def largest_dce(result) -> dict | None:
    return largest(tests_of(result, "paired_t", "ce"))


def anova(result, metric: str) -> dict | None:
    found = tests_of(result, "anova", metric)
    return found[0] if found else None


def identical_fraction(result) -> float | None:
    forced = [c for c in (result or {}).get("conditions", []) if c["target_r"] is not None]
    if not forced:
        return None
    return sum(c["metrics"]["identical_to_control"] for c in forced) / len(forced)


def compare_test(result, metric: str) -> dict | None:
    found = [t for t in (result or {}).get("tests", []) if t["metric"] == metric]
    return found[0] if found else None


def r_at_inference(leg: dict) -> str:
    """R of the free model: mean over its generated tokens (compare) / teacher-forced text."""
    gen = (leg["compare"] or {}).get("models", [{}, {}])[1].get("metrics", {}).get("R")
    control = next(iter((leg["intervene"] or {}).get("conditions", [])), None)
    tf = control["measured_r"] if control else None
    return f"{num(gen)} / {num(tf)}"


def label(leg: dict) -> str:
    layers = leg["hook_layers"]
    at = ", ".join(str(i) for i in layers) if layers else "?"
    return f"{leg['name']} ({leg['coupling']} @ {at})"


# ---------------------------------------------------------------------------- sections


def summary_rows(legs: list[dict]) -> list[str]:
    lines = [
        "| leg (coupling @ layers) | val CE (nats) | R at inference (generation / teacher-forced) "
        "| largest mean KL [95% CI] (nats) | largest dCE [95% CI] (nats) | ANOVA p: U / "
        "distinct-2 / CE | forced text same as control | `kssm intervene` verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for leg in legs:
        iv = leg["intervene"]
        if leg["eval"] is None:
            lines.append(f"| {label(leg)} | not run yet | | | | | | |")
            continue
        ps = " / ".join(pval((anova(iv, m) or {}).get("p")) for m, _ in ANOVA_METRICS)
        same = identical_fraction(iv)
        verdict = "not run yet"
        if iv:
            verdict = "CHANGED" if iv["verdict"]["changed"] else "no meaningful effect"
        lines.append(
            f"| {label(leg)} | {leg['eval']['val_ce']:.4f} | {r_at_inference(leg)} | "
            f"{with_ci(largest_kl(iv))} | {with_ci(largest_dce(iv))} | {ps if iv else 'n/a'} | "
            f"{'n/a' if same is None else f'{same:.0%}'} | {verdict} |"
        )
    return lines


def compare_rows(legs: list[dict]) -> list[str]:
    heads = " | ".join(
        f"{name}: base / phase, diff [95% CI], p (p Holm)" for _, name in COMPARE_METRICS
    )
    lines = [f"| leg | {heads} | verdict |", "|---|---|---|---|---|"]
    for leg in legs:
        result = leg["compare"]
        if not result:
            continue
        base, phase = (m["metrics"] for m in result["models"])
        cells = []
        for metric, _ in COMPARE_METRICS:
            t = compare_test(result, metric)
            cells.append(
                f"{num(base[metric])} / {num(phase[metric])}, {with_ci(t, -1.0)}, "
                f"{pval(t['p'])} ({pval(t['p_holm'])})"
            )
        differ = ", ".join(result["verdict"]["differ"]) or "none differ"
        lines.append(f"| {label(leg)} | {' | '.join(cells)} | {differ} |")
    return lines


def intervene_rows(legs: list[dict]) -> list[str]:
    lines = [
        "| leg | condition | measured R | mean KL [95% CI] | p (Holm) | dCE [95% CI] | p (Holm) "
        "| U | distinct-2 | same text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for leg in legs:
        result = leg["intervene"]
        for cond in (result or {}).get("conditions", []):
            m = cond["metrics"]
            lead = f"| {leg['name']} | {cond['name']} | {num(cond['measured_r'])} |"
            tail = f" {num(m['U'])} | {num(m['distinct_2'])} |"
            if cond["target_r"] is None:
                lines.append(f"{lead} | | | |{tail} |")
                continue
            kl = next(
                t for t in tests_of(result, "one_sample_t", "kl") if t["condition"] == cond["name"]
            )
            ce = next(
                t for t in tests_of(result, "paired_t", "ce") if t["condition"] == cond["name"]
            )
            lines.append(
                f"{lead} {with_ci(kl)} | {pval(kl['p_holm'])} | {with_ci(ce)} | "
                f"{pval(ce['p_holm'])} |{tail} {m['identical_to_control']:.0%} |"
            )
    return lines


def anova_rows(legs: list[dict]) -> list[str]:
    lines = ["| leg | metric | F | p | eta squared | p (Holm) |", "|---|---|---|---|---|---|"]
    for leg in legs:
        for metric, name in ANOVA_METRICS:
            t = anova(leg["intervene"], metric)
            if t:
                lines.append(
                    f"| {leg['name']} | {name} | {num(t['statistic'])} | {pval(t['p'])} | "
                    f"{num(t['effect'])} | {pval(t['p_holm'])} |"
                )
    return lines


def size_rows(legs: list[dict]) -> list[str]:
    lines = [
        "| leg | hooked layer | rms of its output | coupling's change | change from forcing "
        "R = 0.1 to 0.9 | largest mean KL at the logits (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for leg in legs:
        kl = largest_kl(leg["intervene"])
        for core in (leg.get("size") or {}).get("cores", []):
            lines.append(
                f"| {leg['name']} | {core['layer']} | {num(core['rms_x'])} | "
                f"{core['coupling']:.2%} | {core['forcing']:.2%} | {num(kl and kl['effect'])} |"
            )
    return lines


def training_rows(legs: list[dict]) -> list[str]:
    lines = [
        "| leg | val CE (nats) | val R | val U | last logged step: R, U, tone | wall s: train / "
        "compare / intervene / size |",
        "|---|---|---|---|---|---|",
    ]
    for leg in legs:
        ev, last = leg["eval"], leg["last_train"] or {}
        if ev is None:
            continue
        s = leg["seconds"]
        lines.append(
            f"| {leg['name']} | {ev['val_ce']:.4f} | {num(ev.get('val_R'))} | "
            f"{num(ev.get('val_U'))} | {num(last.get('R'))}, {num(last.get('U'))}, "
            f"{last.get('tone', 'n/a')} | {s['train']:.0f} / {s['compare']:.0f} / "
            f"{s['intervene']:.0f} / {s.get('size', 0):.0f} |"
        )
    if any(leg["eval"] and "tone" not in (leg["last_train"] or {}) for leg in legs):
        lines += ["", "tone n/a: the code these legs trained with did not log it yet."]
    return lines


def budget(args: dict, base: dict) -> str:
    return (
        f"Budget per leg: the core trained {args['steps']} steps of {args['batch_size']} x "
        f"{args['seq_length']} tokens (AdamW lr {args['lr']:g}, warmup "
        f"{max(1, args['steps'] // 10)}, cosine to 0; seed {args['seed']}, the same data order "
        f"for every leg; U logged, not trained, as the original code), validation CE on "
        f"{args['eval_batches']} batches at the end; `kssm compare` and `kssm intervene` with "
        f"{args['n_prompts']} prompts x {args['trials']} trials x at most {args['max_tokens']} "
        f"tokens (temperature 0.8, the same seeds on every model and condition), teacher-forced "
        f"KL and CE on at most {args['eval_tokens']} tokens of {args['data']}/valid.txt in "
        f"segments of 32; targets R = {args['force_r']} forced exactly (`--mode phases`), "
        "every core. A change counts only where its effect reaches the stated minimum (KL, "
        "|dCE| 0.01 nats; text metrics 0.05) at p < 0.01, Holm-corrected."
    )


def base_lines(base: dict) -> list[str]:
    if not base.get("fingerprint"):
        return [f"Base: `{base.get('path')}` (not there yet)."]
    c = base["config"]
    how = "trained by this script" if base["self_trained"] else "given with --base"
    t = base.get("train") or {}
    schedule = f", {t['steps']} steps of {t['batch_size']} x {t['seq_length']}" if t else ""
    return [
        f"Base ({how}): `{base['path']}`, fingerprint `{base['fingerprint']}`; "
        f"mlx-lm `{c.get('model_type')}`, {c.get('num_hidden_layers')} layers, hidden "
        f"{c.get('hidden_size')}, vocabulary {c.get('vocab_size')} ({c.get('tokenizer', '?')})"
        f"{schedule}; validation CE {num(base.get('val_ce'), 4)} (step {base.get('step')})."
    ]


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [
        ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")
    ]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.uname().sysname} {os.uname().machine}, {names[0] if names else 'unknown CPU'}, "
        f"{os.cpu_count()} cores (shared; load average at writing {load}), "
        f"MLX {importlib.metadata.version('mlx')}, mlx-lm {importlib.metadata.version('mlx-lm')}"
    )


def commit() -> str:
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True).stdout
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def render(args: dict, base: dict, legs: list[dict], command: str, started: str) -> str:
    import phase_findings  # beside this module; it reads the results with the helpers above

    seconds = sum(sum(leg["seconds"].values()) for leg in legs)
    lines = [
        "# Issue 12: Phase-Mamba's null result, put to a fair test",
        "",
        "The published intervention forced R and found nothing (" + PUBLISHED + "). Was that "
        "an artifact of the eval-mode hook (the faithful coupling cannot act in eval), of the "
        "normalisation (a multiplicative modulation before a norm), or real?",
        "",
        "## What the figures say",
        "",
        *phase_findings.findings(legs),
        "",
        *base_lines(base),
        "",
        budget(args, base) + f" Wall time of every command run for these legs (reruns included): "
        f"{seconds / 60:.1f} min.",
        "",
        "## Summary",
        "",
        *summary_rows(legs),
        "",
        f"val CE: each leg's evaluation after its last step, on the same {args['eval_batches']} "
        f"fixed validation batches of {args['batch_size']} x {args['seq_length']}; the faithful "
        "leg's is the base's own CE on them, as its hook only observes in eval mode.",
        "",
        "## Forcing R (`kssm intervene`), per leg and target",
        "",
        "KL: mean over segments of KL(free || forced), one-sample t-test of KL > 0; dCE: forced "
        "minus free teacher-forced CE, paired t-test. Holm over every test of the leg.",
        "",
        *intervene_rows(legs),
        "",
        "## Where the cores act (`benchmarks/phase_coupling_size.py`)",
        "",
        "On the first 256 tokens of the validation text, free phases: the coupling's change "
        "of the hooked layer's output, rms(out - x) / rms(x), and the change forcing can make "
        "there, rms(out at R = 0.9 - out at R = 0.1) / rms(x), every pass from the same "
        "saved phases.",
        "",
        *size_rows(legs),
        "",
        "## Across targets: one-way ANOVA (the published test)",
        "",
        *anova_rows(legs),
        "",
        "## Baseline comparison (`kssm compare BASE LEG`)",
        "",
        "Differences are phase minus base; two-sample Welch t-tests, Holm over the metrics.",
        "",
        *compare_rows(legs),
        "",
        "## Training",
        "",
        *training_rows(legs),
        "",
        "## How this was made",
        "",
        "```",
        command,
        "```",
        "",
        f"- commit: {commit()} (table); the legs ran at "
        + (", ".join(sorted({c for leg in legs for c in leg.get("commits", [])})) or "none yet"),
        "- commands per leg, in order, with their commit: "
        + "; ".join(
            f"{leg['name']}: {', '.join(leg.get('runs', []))}" for leg in legs if leg.get("runs")
        ),
        f"- machine: {machine()}",
        f"- date: {started} (table written {now()})",
        f"- outputs: `{args['out']}` (per leg: run folder, compare and intervene JSON and "
        "markdown, log; rerun the command to resume)",
        "",
    ]
    return "\n".join(lines)
