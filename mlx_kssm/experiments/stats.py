"""Hypothesis tests for the experiments: scipy.stats, with the degenerate cases made explicit.

The experiments often produce samples without any spread (forcing R may leave every generated
text identical to the control). scipy answers those with NaN and a warning; here each such case
gets a defined answer and a note saying why:
    all values equal (no difference at all)     -> p = 1
    no spread within groups, but means differ   -> p = 0
Missing values (NaN, e.g. distinct-4 of a 2-token text) are left out, pairwise for paired tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class TestResult:
    test: str  # "anova" | "paired_t" | "welch_t" | "one_sample_t" | "pearson"
    metric: str
    statistic: float  # F, t or r (NaN where undefined)
    p: float
    n: int  # observations used
    effect: float = math.nan  # mean difference (t-tests), r (pearson), NaN (anova)
    condition: str = ""  # which condition the test is about, when it is about one
    note: str = ""
    p_holm: float = math.nan  # set by holm_adjust over a family of tests

    def to_dict(self) -> dict:
        return asdict(self)


def nanmean(values: Sequence[float]) -> float:
    """Mean of the defined values; NaN (without a warning) when there are none."""
    x = _clean(values)
    return float(x.mean()) if x.size else math.nan


def _clean(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    return x[~np.isnan(x)]


def _paired_clean(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def one_way_anova(groups: Sequence[Sequence[float]], metric: str = "") -> TestResult:
    """One-way ANOVA across groups (scipy.stats.f_oneway)."""
    from scipy import stats

    clean = [g for g in (_clean(g) for g in groups) if g.size]
    n = sum(g.size for g in clean)
    if len(clean) < 2 or n <= len(clean):
        return TestResult("anova", metric, math.nan, math.nan, n, note="too few observations")
    pooled = np.concatenate(clean)
    if np.all(pooled == pooled[0]):
        return TestResult("anova", metric, 0.0, 1.0, n, note="all values equal")
    if all(np.all(g == g[0]) for g in clean):
        return TestResult("anova", metric, math.inf, 0.0, n, note="no spread within groups")
    res = stats.f_oneway(*clean)
    return TestResult("anova", metric, float(res.statistic), float(res.pvalue), n)


def _t_from_differences(
    test: str, diff: np.ndarray, metric: str, condition: str, alternative: str
) -> TestResult | None:
    """The degenerate answers shared by the paired and the one-sample t-test, or None."""
    n = diff.size
    if n < 2:
        return TestResult(
            test, metric, math.nan, math.nan, n, condition=condition, note="too few observations"
        )
    if np.all(diff == diff[0]):
        mean = float(diff[0])
        if mean == 0.0:
            return TestResult(test, metric, 0.0, 1.0, n, 0.0, condition, "no difference at all")
        against = (alternative == "greater" and mean < 0) or (alternative == "less" and mean > 0)
        t = math.copysign(math.inf, mean)
        return TestResult(
            test, metric, t, 1.0 if against else 0.0, n, mean, condition, "constant difference"
        )
    return None


def paired_t(
    a: Sequence[float], b: Sequence[float], metric: str = "", condition: str = ""
) -> TestResult:
    """Paired t-test of a against b (scipy.stats.ttest_rel); effect = mean(a - b)."""
    from scipy import stats

    a, b = _paired_clean(a, b)
    degenerate = _t_from_differences("paired_t", a - b, metric, condition, "two-sided")
    if degenerate is not None:
        return degenerate
    res = stats.ttest_rel(a, b)
    return TestResult(
        "paired_t",
        metric,
        float(res.statistic),
        float(res.pvalue),
        a.size,
        float(np.mean(a - b)),
        condition,
    )


def one_sample_t(
    x: Sequence[float],
    mu: float = 0.0,
    alternative: str = "two-sided",
    metric: str = "",
    condition: str = "",
) -> TestResult:
    """One-sample t-test of mean(x) against mu (scipy.stats.ttest_1samp); effect = mean - mu."""
    from scipy import stats

    x = _clean(x)
    degenerate = _t_from_differences("one_sample_t", x - mu, metric, condition, alternative)
    if degenerate is not None:
        return degenerate
    res = stats.ttest_1samp(x, mu, alternative=alternative)
    return TestResult(
        "one_sample_t",
        metric,
        float(res.statistic),
        float(res.pvalue),
        x.size,
        float(np.mean(x) - mu),
        condition,
    )


def welch_t(
    a: Sequence[float], b: Sequence[float], metric: str = "", condition: str = ""
) -> TestResult:
    """Two-sample t-test without assuming equal variances (Welch); effect = mean(a) - mean(b)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    n = a.size + b.size
    if a.size < 2 or b.size < 2:
        return TestResult(
            "welch_t",
            metric,
            math.nan,
            math.nan,
            n,
            condition=condition,
            note="too few observations",
        )
    effect = float(np.mean(a) - np.mean(b))
    if np.all(a == a[0]) and np.all(b == b[0]):
        if effect == 0.0:
            return TestResult("welch_t", metric, 0.0, 1.0, n, 0.0, condition, "all values equal")
        return TestResult(
            "welch_t",
            metric,
            math.copysign(math.inf, effect),
            0.0,
            n,
            effect,
            condition,
            "no spread within groups",
        )
    res = stats.ttest_ind(a, b, equal_var=False)
    return TestResult(
        "welch_t", metric, float(res.statistic), float(res.pvalue), n, effect, condition
    )


def pearson(x: Sequence[float], y: Sequence[float], metric: str = "") -> TestResult:
    """Pearson correlation (scipy.stats.pearsonr); effect = r.

    When y does not vary at all there is no association to measure: r is undefined and p = 1.
    """
    from scipy import stats

    x, y = _paired_clean(x, y)
    n = x.size
    if n < 3 or np.all(x == x[0]):
        return TestResult("pearson", metric, math.nan, math.nan, n, note="too few distinct x")
    if np.all(y == y[0]):
        return TestResult("pearson", metric, math.nan, 1.0, n, note="metric constant")
    res = stats.pearsonr(x, y)
    r = float(res.statistic)
    return TestResult("pearson", metric, r, float(res.pvalue), n, r)


def holm_adjust(results: Sequence[TestResult]) -> None:
    """Holm-Bonferroni over the family, in place (tests with NaN p are not in the family)."""
    family = [r for r in results if not math.isnan(r.p)]
    adjusted = holm(np.array([r.p for r in family]))
    for result, p in zip(family, adjusted, strict=True):
        result.p_holm = float(p)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    out = np.empty(m)
    out[order] = adjusted
    return out
