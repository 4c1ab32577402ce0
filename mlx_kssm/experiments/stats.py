"""Hypothesis tests for the experiments: scipy.stats, with the degenerate cases made explicit.

Every t-test also gives its effect with a confidence interval (CI_LEVEL, t-based) and Cohen's d:
a p-value alone says whether a difference is detectable, not whether it is large enough to
matter (with enough observations a difference of 1e-5 is "significant").

The experiments often produce samples without any spread (forcing R may leave every generated
text identical to the control). scipy answers those with NaN and a warning; here each such case
gets a defined answer and a note saying why:
    all values equal (no difference at all)     -> p = 1
    no spread within groups, but means differ   -> p = 0
    ANOVA: group means equal (up to rounding)   -> F = 0, p = 1
Missing values (NaN, e.g. distinct-4 of a 2-token text) are left out, pairwise for paired tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CI_LEVEL = 0.95


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
    ci_low: float = math.nan  # CI_LEVEL confidence interval of the effect (r for Pearson)
    ci_high: float = math.nan
    cohen_d: float = math.nan  # standardised effect (t-tests); eta squared is in `effect` (anova)
    min_effect: float = math.nan  # the smallest |effect| that counts, where one was stated
    outcome: str = ""  # set by the experiment's verdict: changed | below minimum | ...

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
    """One-way ANOVA across groups (scipy.stats.f_oneway); effect = eta squared (the share of
    the variance that lies between the groups)."""
    from scipy import stats

    clean = [g for g in (_clean(g) for g in groups) if g.size]
    n = sum(g.size for g in clean)
    if len(clean) < 2 or n <= len(clean):
        return TestResult("anova", metric, math.nan, math.nan, n, note="too few observations")
    pooled = np.concatenate(clean)
    if np.all(pooled == pooled[0]):
        return TestResult("anova", metric, 0.0, 1.0, n, 0.0, note="all values equal")
    if all(np.all(g == g[0]) for g in clean):
        return TestResult("anova", metric, math.inf, 0.0, n, 1.0, note="no spread within groups")
    between = sum(g.size * (g.mean() - pooled.mean()) ** 2 for g in clean)
    total = np.sum((pooled - pooled.mean()) ** 2)
    if between <= 1e-12 * total:  # equal group means (e.g. identical groups) up to rounding,
        # where scipy's F comes out as -1e-43 and its p as NaN
        return TestResult("anova", metric, 0.0, 1.0, n, 0.0, note="group means equal")
    res = stats.f_oneway(*clean)
    eta_squared = float(between / total)
    return TestResult("anova", metric, float(res.statistic), float(res.pvalue), n, eta_squared)


def t_interval(mean: float, se: float, df: float) -> tuple[float, float]:
    """The CI_LEVEL confidence interval mean +- t(df) * se (scipy.stats.t.interval); with no
    spread (se = 0) the interval is the mean itself."""
    from scipy import stats

    if se == 0.0:
        return mean, mean
    low, high = stats.t.interval(CI_LEVEL, df, loc=mean, scale=se)
    return float(low), float(high)


def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """The t-based CI_LEVEL confidence interval of mean(x) (at least 2 values)."""
    se = float(np.std(x, ddof=1)) / math.sqrt(x.size)
    return t_interval(float(np.mean(x)), se, x.size - 1)


def cohen_d(mean_difference: float, sd: float) -> float:
    """Standardised effect; infinite when there is a difference but no spread at all."""
    if sd == 0.0:
        return 0.0 if mean_difference == 0.0 else math.copysign(math.inf, mean_difference)
    return mean_difference / sd


def _t_from_differences(
    test: str, diff: np.ndarray, metric: str, condition: str, alternative: str
) -> TestResult:
    """The t-test of mean(diff) = 0 shared by the paired and the one-sample test: effect =
    mean(diff) with its CI, Cohen's d = mean / sd, and the degenerate answers."""
    from scipy import stats

    n = diff.size
    if n < 2:
        note = "too few observations"
        return TestResult(test, metric, math.nan, math.nan, n, condition=condition, note=note)
    if np.all(diff == diff[0]):  # no spread: the interval is the difference itself
        mean = float(diff[0])
        extra = dict(ci_low=mean, ci_high=mean, cohen_d=cohen_d(mean, 0.0))
        if mean == 0.0:
            note = "no difference at all"
            return TestResult(test, metric, 0.0, 1.0, n, 0.0, condition, note, **extra)
        against = (alternative == "greater" and mean < 0) or (alternative == "less" and mean > 0)
        t = math.copysign(math.inf, mean)
        p = 1.0 if against else 0.0
        return TestResult(test, metric, t, p, n, mean, condition, "constant difference", **extra)
    mean, sd = float(np.mean(diff)), float(np.std(diff, ddof=1))
    low, high = mean_ci(diff)
    extra = dict(ci_low=low, ci_high=high, cohen_d=cohen_d(mean, sd))
    res = stats.ttest_1samp(diff, 0.0, alternative=alternative)
    return TestResult(
        test, metric, float(res.statistic), float(res.pvalue), n, mean, condition, **extra
    )


def paired_t(
    a: Sequence[float], b: Sequence[float], metric: str = "", condition: str = ""
) -> TestResult:
    """Paired t-test of a against b (the t-test of the differences, as scipy.stats.ttest_rel);
    effect = mean(a - b) with its CI; Cohen's d_z = mean(a - b) / sd(a - b)."""
    a, b = _paired_clean(a, b)
    return _t_from_differences("paired_t", a - b, metric, condition, "two-sided")


def one_sample_t(
    x: Sequence[float],
    mu: float = 0.0,
    alternative: str = "two-sided",
    metric: str = "",
    condition: str = "",
) -> TestResult:
    """One-sample t-test of mean(x) against mu (scipy.stats.ttest_1samp); effect = mean - mu."""
    return _t_from_differences("one_sample_t", _clean(x) - mu, metric, condition, alternative)


def welch_t(
    a: Sequence[float], b: Sequence[float], metric: str = "", condition: str = ""
) -> TestResult:
    """Two-sample t-test without assuming equal variances (Welch); effect = mean(a) - mean(b)
    with its Welch CI; Cohen's d over the root mean of the two variances."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    n = a.size + b.size
    if a.size < 2 or b.size < 2:
        note = "too few observations"
        return TestResult("welch_t", metric, math.nan, math.nan, n, condition=condition, note=note)
    if np.all(a == a[0]) and np.all(b == b[0]):  # no spread: the difference is exact
        effect = float(a[0] - b[0])
        extra = dict(ci_low=effect, ci_high=effect, cohen_d=cohen_d(effect, 0.0))
        if effect == 0.0:
            note = "all values equal"
            return TestResult("welch_t", metric, 0.0, 1.0, n, 0.0, condition, note, **extra)
        t, note = math.copysign(math.inf, effect), "no spread within groups"
        return TestResult("welch_t", metric, t, 0.0, n, effect, condition, note, **extra)
    effect = float(np.mean(a) - np.mean(b))
    va, vb = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    se2_a, se2_b = va / a.size, vb / b.size
    df = (se2_a + se2_b) ** 2 / (se2_a**2 / (a.size - 1) + se2_b**2 / (b.size - 1))
    low, high = t_interval(effect, math.sqrt(se2_a + se2_b), df)
    extra = dict(ci_low=low, ci_high=high, cohen_d=cohen_d(effect, math.sqrt((va + vb) / 2)))
    res = stats.ttest_ind(a, b, equal_var=False)
    return TestResult(
        "welch_t", metric, float(res.statistic), float(res.pvalue), n, effect, condition, **extra
    )


def pearson(x: Sequence[float], y: Sequence[float], metric: str = "") -> TestResult:
    """Pearson correlation (scipy.stats.pearsonr); effect = r, with its Fisher CI (n > 3).

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
    result = TestResult("pearson", metric, r, float(res.pvalue), n, r)
    if n > 3 and abs(r) < 1.0:
        ci = res.confidence_interval(CI_LEVEL)
        result.ci_low, result.ci_high = float(ci.low), float(ci.high)
    return result


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
