"""The statistics of the causality experiment and its verdict, said plainly.

A p-value says whether a difference is detectable, not whether it matters: the teacher-forced
KL divergence is positive whenever forcing R moves the logits at all, by 1e-5 nats as by 1 nat,
and a test of KL > 0 over many segments is then always "significant". So a comparison with the
control counts as a change only when both hold:
    its effect (mean difference to the control, or the mean KL) is at least a stated minimum,
    and its test passes at p < alpha (Holm-corrected over every test of the experiment).
Minimums (the defaults are InterveneSettings'): KL and |delta CE| in nats (min_effect); for the
generated-text metrics, which are fractions in [0, 1] (U, distinct-n, rep/16), min_text_effect
as an absolute fraction, and for length the same fraction of the token budget (max_tokens).
Effects are ranked by their size relative to their minimum, never by p-value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .stats import (
    CI_LEVEL,
    TestResult,
    holm_adjust,
    nanmean,
    one_sample_t,
    one_way_anova,
    paired_t,
    pearson,
)

GENERATION_METRICS = ("U", "distinct_1", "distinct_2", "distinct_4", "repetition", "length")
TEACHER_FORCED_METRICS = ("ce", "kl")
UNITS = {"ce": " nats", "kl": " nats", "length": " tokens"}


def minimum_effects(min_effect: float, min_text_effect: float, max_tokens: int) -> dict:
    """The smallest |effect| that counts as a change, per metric."""
    minimums = {m: min_text_effect for m in GENERATION_METRICS}
    minimums["length"] = min_text_effect * max_tokens
    minimums.update(ce=min_effect, kl=min_effect)
    return minimums


def build_tests(conditions: Sequence) -> list[TestResult]:
    """Every test of the experiment, Holm-adjusted as one family.

    Against the control, per forced condition: a paired t-test per metric (effect = mean
    difference) and a one-sample t-test of KL > 0 (effect = mean KL). With two or more targets,
    across the forced conditions: one-way ANOVA (effect = eta squared) and Pearson r between
    target R and each metric.
    """
    control, forced = conditions[0], [c for c in conditions if not c.is_control]
    tests: list[TestResult] = []
    for cond in forced:
        for m in (*GENERATION_METRICS, "ce"):
            tests.append(paired_t(cond.metric(m), control.metric(m), m, cond.name))
        tests.append(one_sample_t(cond.kl, 0.0, "greater", "kl", cond.name))
    if len({c.target_r for c in forced}) >= 2:
        for m in (*GENERATION_METRICS, "ce"):
            tests.append(one_way_anova([c.metric(m) for c in forced], m))
        for m in (*GENERATION_METRICS, *TEACHER_FORCED_METRICS):
            x = [c.target_r for c in forced for _ in c.metric(m)]
            y = [v for c in forced for v in c.metric(m)]
            tests.append(pearson(x, y, m))
    holm_adjust(tests)
    return tests


def judge(tests: Sequence[TestResult], minimums: dict, alpha: float) -> None:
    """Set each test's outcome (and, for comparisons with the control, its minimum)."""
    for t in tests:
        if math.isnan(t.p_holm):
            t.outcome = "untestable"
            continue
        significant = t.p_holm < alpha
        if not t.condition:  # ANOVA and Pearson: across forced conditions, no minimum
            t.outcome = "significant" if significant else "not significant"
            continue
        t.min_effect = minimums[t.metric]
        if not significant:
            t.outcome = "not significant"
        else:
            t.outcome = "changed" if abs(t.effect) >= t.min_effect else "below minimum"


def effect_rank(t: TestResult) -> float:
    """|effect| / minimum: how many minimums the effect spans (unitless, comparable)."""
    size = abs(t.effect) if not math.isnan(t.effect) else 0.0
    if t.min_effect > 0:
        return size / t.min_effect
    return math.inf if size > 0 else 0.0


def ranked_comparisons(tests: Sequence[TestResult]) -> list[TestResult]:
    """The comparisons with the control, largest effect (relative to its minimum) first."""
    against_control = [t for t in tests if t.condition and not math.isnan(t.p_holm)]
    return sorted(against_control, key=lambda t: (-effect_rank(t), -abs(t.effect)))


def describe_effect(t: TestResult) -> str:
    unit = UNITS.get(t.metric, "")
    times = effect_rank(t)
    scale = f", {times:.2g}x the minimum" if math.isfinite(times) else ""
    return (
        f"{t.metric} at {t.condition}: {t.effect:+.3g}{unit} ({CI_LEVEL:.0%} CI "
        f"{t.ci_low:+.3g}..{t.ci_high:+.3g}{scale}; p_holm {t.p_holm:.2g})"
    )


def describe_minimums(minimums: dict) -> str:
    text = next(v for m, v in minimums.items() if m not in ("length", *TEACHER_FORCED_METRICS))
    return (
        f"minimum effects: KL and |dCE| {minimums['kl']:g} nats, text metrics {text:g}, "
        f"length {minimums['length']:g} tokens"
    )


def verdict(
    tests: Sequence[TestResult], conditions: Sequence, alpha: float, minimums: dict
) -> dict:
    """Whether forcing R changed the output by at least the minimum effect, at p < alpha."""
    judge(tests, minimums, alpha)
    ranked = ranked_comparisons(tests)
    changed = [t for t in ranked if t.outcome == "changed"]
    below = [t for t in ranked if t.outcome == "below minimum"]
    gen_changed = [t for t in changed if t.metric in GENERATION_METRICS]
    tf_changed = [t for t in changed if t.metric in TEACHER_FORCED_METRICS]
    forced = [c for c in conditions if not c.is_control]
    identical = nanmean([s["identical"] for c in forced for s in c.samples])
    tail = (
        f" Generated text was identical to the control in {identical:.0%} of forced samples; "
        f"largest mean teacher-forced KL {max(nanmean(c.kl) for c in forced):.3g} nats."
    )
    passing = (
        f"of {len(ranked)} comparisons with the control reach their minimum effect at "
        f"p < {alpha} (Holm-corrected); {describe_minimums(minimums)}."
    )
    if changed:
        text = (
            f"VERDICT: forcing R CHANGED the output: {len(changed)} {passing} "
            f"Changed: {len(gen_changed)} generated-text, {len(tf_changed)} teacher-forced; "
            f"largest: {describe_effect(changed[0])}."
        )
    elif ranked:
        if below:
            n = len(below)
            detectable = (
                f"{n} difference{'s are' if n > 1 else ' is'} detectable (p < {alpha}) but "
                f"below {'their' if n > 1 else 'its'} minimum; the largest: "
            )
        else:
            detectable = "No difference is detectable; the largest: "
        text = (
            f"VERDICT: NO meaningful effect of forcing R on the output: 0 {passing} "
            f"{detectable}{describe_effect((below or ranked)[0])}."
        )
    else:
        text = "VERDICT: no test could be computed (too few observations)."
    return {
        "alpha": alpha,
        "minimum_effects": dict(minimums),
        "changed": bool(changed),
        "changed_generation": bool(gen_changed),
        "changed_teacher_forced": bool(tf_changed),
        "n_comparisons": len(ranked),
        "n_changed": len(changed),
        "n_below_minimum": len(below),
        "n_tests": sum(1 for t in tests if not math.isnan(t.p_holm)),
        "ranking": [{"metric": t.metric, "condition": t.condition} for t in ranked],
        "text": text + tail,
    }
