"""`kssm intervene` on a per_call Phase-Mamba core, whose ``phases`` buffer advances once per
forward call: every condition starts from the same saved phases, and the free-running control
is the same whether or not forced conditions ran beside it (issue 12)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from phase_helpers import write_base

import mlx_kssm
from mlx_kssm.experiments.intervene import (
    Condition,
    InterveneSettings,
    measure_generations,
    measure_teacher_forced,
)
from mlx_kssm.experiments.interventions import core_phases, restore_phases
from mlx_kssm.experiments.stats import one_way_anova
from mlx_kssm.models.phase_base import random_base
from mlx_kssm.models.phase_mamba import args_for_base

VOCAB, HIDDEN, LAYERS = 97, 32, 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base(
        tmp_path_factory.mktemp("phase_iv") / "base", random_base(VOCAB, HIDDEN, 3, 0)
    )


def model_for(base, coupling):
    mx.random.seed(0)
    model = mlx_kssm.build_model(args_for_base(base, coupling=coupling, hook_layers=[1]))
    model.eval()
    return model


WINDOWS = [np.random.default_rng(i).integers(0, VOCAB, 25).tolist() for i in range(3)]


def teacher_forced(model, targets):
    conditions = [Condition("control", None)] + [
        Condition(f"c{i}", r) for i, r in enumerate(targets)
    ]
    measure_teacher_forced(model, conditions, [0], WINDOWS, segment=8)
    return conditions


def test_the_phases_buffer_advances_per_call(base):
    """The premise: without restoring, a second forward call starts from other phases."""
    model = model_for(base, "multiplicative")
    x = mx.array([WINDOWS[0]])
    start = core_phases(model)
    first = np.array(model(x))
    assert not np.allclose(np.array(core_phases(model)[0]), np.array(start[0]))
    assert not np.allclose(np.array(model(x)), first)  # the phases moved on
    restore_phases(model, start)
    np.testing.assert_array_equal(np.array(model(x)), first)


@pytest.mark.parametrize("coupling", ["multiplicative", "additive"])
def test_teacher_forced_conditions_start_from_the_same_phases(base, coupling):
    model = model_for(base, coupling)
    start = core_phases(model)
    both = teacher_forced(model, [0.3, 0.3])  # the same target twice: the same numbers
    assert both[1].ce == both[2].ce and both[1].kl == both[2].kl
    assert max(both[1].kl) > 0  # and forcing did something here
    after_both = core_phases(model)
    restore_phases(model, start)
    alone = teacher_forced(model, [])
    assert alone[0].ce == both[0].ce  # the control does not see the forced passes
    np.testing.assert_array_equal(np.array(core_phases(model)[0]), np.array(after_both[0]))


def test_generation_conditions_start_from_the_same_phases(base):
    model = model_for(base, "multiplicative")
    settings = InterveneSettings(targets=[0.7], trials=2, max_tokens=4, temp=0.8)
    conditions = [Condition("control", None), Condition("a", 0.7), Condition("b", 0.7)]
    start = core_phases(model)
    measure_generations(model, conditions, [0], [[1, 2, 3], [4, 5]], settings)
    a, b = conditions[1].samples, conditions[2].samples
    assert [s["tokens"] for s in a] == [s["tokens"] for s in b]
    assert [s["R_layers"] for s in a] == [s["R_layers"] for s in b]
    np.testing.assert_array_equal(np.array(core_phases(model)[0]), np.array(start[0]))


def test_models_without_cores_are_left_alone():
    class NoCores:
        pass

    assert core_phases(NoCores()) is None
    restore_phases(NoCores(), None)


def test_anova_of_identical_groups_is_f_0_p_1():
    """The faithful hook in eval leaves every forced text the control's, so each condition's
    distinct-2 values are the same numbers: ANOVA says F 0, p 1 (scipy alone: p NaN)."""
    group = [1.0, 0.9523809523809523, 1 / 3, 2 / 3, 0.1]
    same = one_way_anova([group, list(group), list(group)], "distinct_2")
    assert (same.statistic, same.p, same.effect) == (0.0, 1.0, 0.0)
    differ = one_way_anova([group, [v + 0.3 for v in group]], "distinct_2")
    assert differ.statistic > 0 and 0 < differ.p < 1 and differ.effect > 0
