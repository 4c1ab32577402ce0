"""The statistics: textbook formulas and scipy on known inputs, and the degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from mlx_kssm.experiments.stats import (
    holm,
    holm_adjust,
    nanmean,
    one_sample_t,
    one_way_anova,
    paired_t,
    pearson,
    welch_t,
)

# McDonald et al. (1991) mussel shell data, the example of scipy.stats.f_oneway's docs.
MUSSELS = [
    [0.0571, 0.0813, 0.0831, 0.0976, 0.0817, 0.0859, 0.0735, 0.0659, 0.0923, 0.0836],
    [0.0873, 0.0662, 0.0672, 0.0819, 0.0749, 0.0649, 0.0835, 0.0725],
    [0.0974, 0.1352, 0.0817, 0.1016, 0.0968, 0.1064, 0.105],
    [0.1033, 0.0915, 0.0781, 0.0685, 0.0677, 0.0697, 0.0764, 0.0689],
    [0.0703, 0.1026, 0.0956, 0.0973, 0.1039, 0.1045],
]


def test_anova_matches_the_textbook_f_statistic():
    res = one_way_anova(MUSSELS, "shell")
    groups = [np.array(g) for g in MUSSELS]
    grand = np.concatenate(groups).mean()
    n, k = sum(g.size for g in groups), len(groups)
    between = sum(g.size * (g.mean() - grand) ** 2 for g in groups) / (k - 1)
    within = sum(((g - g.mean()) ** 2).sum() for g in groups) / (n - k)
    assert res.statistic == pytest.approx(between / within, rel=1e-10)
    assert res.p == pytest.approx(sp.f.sf(between / within, k - 1, n - k), rel=1e-10)
    assert res.statistic == pytest.approx(7.1210, abs=1e-4) and res.p == pytest.approx(
        2.81e-4, rel=1e-2
    )
    assert res.n == n


def test_paired_t_matches_the_formula_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=20)
    b = a + rng.normal(0.3, 0.5, size=20)
    res = paired_t(a, b, "m", "c")
    d = a - b
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert res.statistic == pytest.approx(t, rel=1e-10)
    assert res.p == pytest.approx(2 * sp.t.sf(abs(t), d.size - 1), rel=1e-10)
    assert res.p == pytest.approx(sp.ttest_rel(a, b).pvalue, rel=1e-12)
    assert res.effect == pytest.approx(d.mean()) and res.condition == "c"


def test_welch_t_matches_the_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 15), rng.normal(0.8, 2, 25)
    res = welch_t(a, b)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    assert res.statistic == pytest.approx(t, rel=1e-10)
    assert res.p == pytest.approx(2 * sp.t.sf(abs(t), df), rel=1e-8)


def test_pearson_matches_corrcoef_and_scipy():
    rng = np.random.default_rng(2)
    x = np.repeat([0.1, 0.3, 0.5, 0.7, 0.9], 6)
    y = 2 * x + rng.normal(0, 0.5, x.size)
    res = pearson(x, y)
    assert res.statistic == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    assert res.p == pytest.approx(sp.pearsonr(x, y).pvalue, rel=1e-10)


def test_one_sample_t_one_sided():
    x = [0.2, 0.5, 0.1, 0.4, 0.3]
    res = one_sample_t(x, 0.0, "greater")
    assert res.p == pytest.approx(sp.ttest_1samp(x, 0.0).pvalue / 2, rel=1e-10)


def test_missing_values_are_left_out():
    a = [1.0, 2.0, math.nan, 4.0, 5.5]
    b = [1.5, 2.1, 3.0, math.nan, 5.0]
    assert paired_t(a, b).p == pytest.approx(sp.ttest_rel([1.0, 2.0, 5.5], [1.5, 2.1, 5.0]).pvalue)
    assert paired_t(a, b).n == 3
    groups = [[1.0, math.nan, 2.0], [3.0, 4.0, 3.5]]
    assert one_way_anova(groups).p == pytest.approx(sp.f_oneway([1.0, 2.0], [3.0, 4.0, 3.5]).pvalue)
    assert math.isnan(nanmean([math.nan])) and nanmean([1.0, math.nan, 3.0]) == 2.0


def test_no_difference_at_all_gives_p_one():
    same = [0.5, 0.7, 0.9]
    assert paired_t(same, same).p == 1.0
    assert one_way_anova([[0.2, 0.2], [0.2, 0.2, 0.2]]).p == 1.0
    assert welch_t([3.0, 3.0], [3.0, 3.0, 3.0]).p == 1.0
    assert pearson([0.1, 0.5, 0.9], [2.0, 2.0, 2.0]).p == 1.0
    assert one_sample_t([0.0, 0.0, 0.0], 0.0, "greater").p == 1.0


def test_differences_without_spread_give_p_zero():
    assert paired_t([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]).p == 0.0
    assert one_way_anova([[1.0, 1.0], [2.0, 2.0]]).p == 0.0
    assert welch_t([1.0, 1.0], [2.0, 2.0]).p == 0.0
    assert one_sample_t([0.1, 0.1], 0.0, "greater").p == 0.0
    assert one_sample_t([-0.1, -0.1], 0.0, "greater").p == 1.0  # the wrong direction


def test_too_few_observations_give_nan():
    assert math.isnan(paired_t([1.0], [2.0]).p)
    assert math.isnan(one_way_anova([[1.0], [2.0]]).p)
    assert math.isnan(pearson([0.5, 0.5, 0.5], [1.0, 2.0, 3.0]).p)  # x does not vary


def test_holm_adjustment():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.2, 0.9]), [0.4, 0.9])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    results = [paired_t([1, 2, 3.5], [1.1, 2.0, 3.0]), paired_t([1.0], [2.0])]
    holm_adjust(results)
    assert results[0].p_holm == pytest.approx(results[0].p) and math.isnan(results[1].p_holm)


# ---------------------------------------------------------------------------- effect sizes


def test_t_test_confidence_intervals_match_scipy():
    rng = np.random.default_rng(3)
    a = rng.normal(size=25)
    b = a + rng.normal(0.2, 0.4, size=25)
    res = paired_t(a, b)
    ci = sp.ttest_rel(a, b).confidence_interval(0.95)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert res.cohen_d == pytest.approx((a - b).mean() / (a - b).std(ddof=1), rel=1e-12)

    x = rng.exponential(0.3, size=12)
    res = one_sample_t(x, 0.1, "greater")
    ci = sp.ttest_1samp(x, 0.1).confidence_interval(0.95)  # two-sided, whatever the test
    # The interval is the effect's, mean - mu, as the effect is.
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low - 0.1, ci.high - 0.1), rel=1e-10)
    assert res.effect == pytest.approx(x.mean() - 0.1)

    c, d = rng.normal(0, 1, 15), rng.normal(0.8, 2, 25)
    res = welch_t(c, d)
    ci = sp.ttest_ind(c, d, equal_var=False).confidence_interval(0.95)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    pooled = math.sqrt((c.var(ddof=1) + d.var(ddof=1)) / 2)
    assert res.cohen_d == pytest.approx((c.mean() - d.mean()) / pooled, rel=1e-12)


def test_anova_effect_is_eta_squared_and_pearson_has_scipys_interval():
    groups = [np.array(g) for g in MUSSELS]
    pooled = np.concatenate(groups)
    between = sum(g.size * (g.mean() - pooled.mean()) ** 2 for g in groups)
    eta2 = between / ((pooled - pooled.mean()) ** 2).sum()
    assert one_way_anova(MUSSELS).effect == pytest.approx(eta2, rel=1e-12) and 0 < eta2 < 1

    rng = np.random.default_rng(4)
    x = np.repeat([0.1, 0.5, 0.9], 8)
    y = x + rng.normal(0, 0.3, x.size)
    res = pearson(x, y)
    ci = sp.pearsonr(x, y).confidence_interval(0.95)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert res.ci_low < res.effect < res.ci_high


def test_differences_without_spread_have_an_exact_interval():
    res = paired_t([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])
    assert res.p == 0.0 and res.ci_low == res.ci_high == 0.5
    assert res.cohen_d == math.inf
    none = paired_t([1.0, 2.0], [1.0, 2.0])
    assert (none.effect, none.ci_low, none.ci_high, none.cohen_d) == (0.0, 0.0, 0.0, 0.0)
    res = welch_t([2.0, 2.0], [1.5, 1.5, 1.5])
    assert res.ci_low == res.ci_high == 0.5 and res.cohen_d == math.inf
    assert math.isnan(paired_t([1.0], [2.0]).ci_low)
