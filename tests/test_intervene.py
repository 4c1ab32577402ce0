"""The causality experiment: forcing acts on the computation, hits its target, and the
statistics and verdict report an effect when there is one and none when there is none."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args

from mlx_kssm import Model
from mlx_kssm.experiments.intervene import (
    InterveneSettings,
    calibrate_omega_scale,
    eval_windows,
    parse_layers,
    parse_targets,
    run_intervention,
    scaled_omega,
)
from mlx_kssm.experiments.model_api import forward_with_r

RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 512, 4).tolist() for _ in range(2)]
EVAL = RNG.integers(0, 512, 257).tolist()


@pytest.fixture(scope="module")
def model() -> Model:
    mx.random.seed(1)
    net = Model(tiny_args(vocab_size=512))
    net.eval()
    mx.eval(net.parameters())
    return net


def _settings(**overrides) -> InterveneSettings:
    base = dict(targets=[0.3, 0.96], trials=2, max_tokens=6, eval_tokens=256, segment=16)
    return InterveneSettings(**{**base, **overrides})


# ---------------------------------------------------------------------------- forcing


@pytest.mark.parametrize("target", [0.05, 0.3, 0.55, 0.96])
def test_forced_r_is_hit_at_every_position(model, target):
    tokens = mx.array([EVAL[:64], EVAL[64:128]])
    _, R = forward_with_r(model, tokens, force_r={0: target, 1: target})
    assert np.abs(np.array(R) - target).max() < 1e-3


def test_forcing_changes_the_readout_input_and_the_logits(model):
    tokens = mx.array([EVAL[:32]])
    free_logits, free = model.forward(tokens)
    forced_logits, forced = model.forward(tokens, force_r={1: 0.9})
    # Layer 0 is upstream and unforced: its readout input must not move.
    np.testing.assert_array_equal(
        np.array(free["features"][:, :, 0]), np.array(forced["features"][:, :, 0])
    )
    moved = np.abs(np.array(free["features"][:, :, 1]) - np.array(forced["features"][:, :, 1]))
    assert moved.max() > 0.1  # the readout sees the moved phases, not only the reported R
    H = model.args.n_harmonics
    np.testing.assert_allclose(np.array(forced["features"][:, :, 1, 2 * H]), 0.9, atol=1e-3)
    assert np.abs(np.array(free_logits) - np.array(forced_logits)).max() > 1e-3


def test_omega_scaling_is_restored_and_pulls_r_up(model):
    before = np.array(model.blocks[0].oscillators.omega_0)
    tokens = mx.array([EVAL[:32]])
    free_r = float(mx.mean(forward_with_r(model, tokens)[1][..., 0]))
    with scaled_omega(model, [0], 0.0):  # every natural frequency at the mean: R -> 1
        pulled_r = float(mx.mean(forward_with_r(model, tokens)[1][..., 0]))
    np.testing.assert_array_equal(np.array(model.blocks[0].oscillators.omega_0), before)
    assert pulled_r > 0.99 > free_r


def test_omega_calibration_reaches_a_reachable_target(model):
    tokens = mx.array([EVAL[:32]])
    s = calibrate_omega_scale(model, [0, 1], 0.8, tokens)
    with scaled_omega(model, [0, 1], s):
        r = float(mx.mean(forward_with_r(model, tokens)[1]))
    assert 0 < s < 1 and r == pytest.approx(0.8, abs=1e-3)


# ---------------------------------------------------------------------------- parsing


def test_parse_targets_and_layers():
    assert parse_targets("0.1, 0.3,0.1,1") == [0.1, 0.3, 1.0]
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("2,0", 3) == [0, 2]
    for bad in ["1.5", "-0.1", "nan", "x"]:
        with pytest.raises(ValueError):
            parse_targets(bad)
    for bad in ["3", "-1", "a"]:
        with pytest.raises(ValueError):
            parse_layers(bad, 3)


def test_eval_windows_cover_the_text_once():
    windows = eval_windows(list(range(100)), 32, 1000)
    assert [w[0] for w in windows] == [0, 32, 64, 96] and windows[-1] == [96, 97, 98, 99]
    assert sum(len(w) - 1 for w in windows) == 99  # every token but the first is a target once
    assert eval_windows(list(range(100)), 32, 40)[-1][-1] == 40


# ---------------------------------------------------------------------------- experiment


def test_intervention_reports_targets_and_an_effect(model):
    res = run_intervention(model, PROMPTS, EVAL, _settings())
    control, *forced = res["conditions"]
    assert control["target_r"] is None and control["metrics"]["kl"] == 0.0
    for cond in forced:
        assert cond["measured_r"] == pytest.approx(cond["target_r"], abs=1e-3)
        assert cond["r_max_abs_error"] < 1e-3
        assert cond["measured_r_generation"] == pytest.approx(cond["target_r"], abs=1e-3)
        assert cond["metrics"]["kl"] > 0
        assert len(cond["samples"]) == len(PROMPTS) * 2
    tests = res["tests"]
    assert {t["test"] for t in tests} == {"paired_t", "one_sample_t", "anova", "pearson"}
    assert all(t["p_holm"] >= t["p"] for t in tests if t["p"] == t["p"])
    # KL > 0 over 16 segments is far beyond chance: the verdict must say R changed the output.
    assert res["verdict"]["changed"] and res["verdict"]["changed_teacher_forced"]
    assert "CHANGED" in res["verdict"]["text"]


def test_intervention_without_an_effect_says_so(model):
    # Zero readout weights: the oscillator bank's output no longer depends on the phases, so
    # forcing R cannot change anything downstream.
    net = Model(model.args)
    net.update(model.parameters())
    for block in net.blocks:
        block.oscillators.readout.weight = mx.zeros_like(block.oscillators.readout.weight)
    net.eval()
    res = run_intervention(net, PROMPTS, EVAL, _settings(temp=1.0))
    for cond in res["conditions"][1:]:
        assert cond["measured_r"] == pytest.approx(cond["target_r"], abs=1e-3)
        assert cond["metrics"]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert cond["metrics"]["identical_to_control"] == 1.0
    # Not trivially identical: the two trials (seeds 0 and 1) of a prompt differ.
    samples = res["conditions"][0]["samples"]
    assert samples[0]["tokens"] != samples[1]["tokens"]
    assert not res["verdict"]["changed"] and "NO meaningful effect" in res["verdict"]["text"]
    assert "No difference is detectable" in res["verdict"]["text"]


def _scaled_readout(model, scale: float) -> Model:
    """The model with every oscillator readout scaled: forcing R then moves the logits by an
    amount that shrinks with ``scale``."""
    net = Model(model.args)
    net.update(model.parameters())
    for block in net.blocks:
        block.oscillators.readout.weight = block.oscillators.readout.weight * scale
    net.eval()
    return net


def test_a_generation_that_stops_at_once_is_recorded_empty(model):
    """Every token a stop token: each generation ends before its first token (seen on a trained
    model whose first draw was end-of-text); the run still reports, with empty samples."""
    vocab = model.args.vocab_size
    res = run_intervention(model, PROMPTS, EVAL, _settings(), stop_tokens=list(range(vocab)))
    for cond in res["conditions"]:
        assert cond["samples"] and all(s["tokens"] == [] for s in cond["samples"])
        assert all(s["R_layers"] == [] for s in cond["samples"])
    assert "verdict" in res


def test_a_detectable_but_negligible_effect_is_not_called_a_change(model):
    # The case of the issue: KL of order 1e-5 nats, significant over every segment, and text
    # that hardly changes. The verdict must say NO meaningful effect and name the minimum.
    res = run_intervention(_scaled_readout(model, 1e-2), PROMPTS, EVAL, _settings())
    kl_tests = [t for t in res["tests"] if t["test"] == "one_sample_t"]
    assert all(0 < t["effect"] < 1e-3 and t["p_holm"] < 0.01 for t in kl_tests)
    assert {t["outcome"] for t in kl_tests} == {"below minimum"}
    verdict = res["verdict"]
    assert not verdict["changed"] and verdict["n_below_minimum"] >= 2
    assert "NO meaningful effect" in verdict["text"] and "below" in verdict["text"]
    assert "0.01 nats" in verdict["text"] and verdict["minimum_effects"]["kl"] == 0.01
    # The user's minimum decides, not the test: the same run with a tiny minimum is a change.
    lenient = run_intervention(
        _scaled_readout(model, 1e-2), PROMPTS, EVAL, _settings(min_effect=1e-7)
    )
    assert lenient["verdict"]["changed"] and "CHANGED" in lenient["verdict"]["text"]
    assert "1e-07 nats" in lenient["verdict"]["text"]
    same = [(t["metric"], t["p_holm"]) for t in lenient["tests"]]
    assert same == [(t["metric"], t["p_holm"]) for t in res["tests"]]


def test_effects_come_with_confidence_intervals_and_are_ranked_by_size(model):
    res = run_intervention(model, PROMPTS, EVAL, _settings())
    by_key = {(t["metric"], t["condition"]): t for t in res["tests"] if t["condition"]}
    for t in by_key.values():
        if t["n"] >= 2:
            assert t["ci_low"] <= t["effect"] <= t["ci_high"], t
    ranking = [by_key[(r["metric"], r["condition"])] for r in res["verdict"]["ranking"]]
    sizes = [abs(t["effect"]) / t["min_effect"] for t in ranking]
    assert sizes == sorted(sizes, reverse=True) and len(ranking) == len(by_key)
    # Forcing R to 0.96 moves the logits further than 0.3 (free R is about 0.1 here).
    kl = {t["condition"]: t["effect"] for t in ranking if t["metric"] == "kl"}
    assert kl["R=0.96"] > kl["R=0.3"]
    assert res["verdict"]["text"].count("largest: kl at R=0.96") == 1


def test_the_largest_effect_is_named_not_the_smallest_p_value():
    from mlx_kssm.experiments.intervene import Condition
    from mlx_kssm.experiments.stats import TestResult
    from mlx_kssm.experiments.verdict import minimum_effects, verdict

    control, forced = Condition("control", None), Condition("R=0.5", 0.5)
    for cond in (control, forced):
        cond.samples = [{"identical": False}]
    forced.kl = [0.5]
    big = TestResult("paired_t", "ce", 3.0, 1e-3, 20, 0.4, "R=0.5", p_holm=1e-3)
    sure = TestResult("one_sample_t", "kl", 50.0, 1e-30, 20, 0.02, "R=0.5", p_holm=1e-30)
    decision = verdict([sure, big], [control, forced], 0.01, minimum_effects(0.01, 0.05, 32))
    assert decision["ranking"][0] == {"metric": "ce", "condition": "R=0.5"}
    assert "largest: ce at R=0.5: +0.4 nats" in decision["text"]


def test_progress_is_reported_for_every_window_and_generation(model):
    calls = []
    settings = _settings(targets=[0.5])
    run_intervention(model, PROMPTS, EVAL, settings, advance=lambda *a: calls.append(a))
    windows = [c for c in calls if c[0].startswith("teacher-forced")]
    generations = [c for c in calls if c[0].startswith("generations")]
    window = min(settings.window, model.args.max_positions)
    n_windows = len(eval_windows(EVAL, window, settings.eval_tokens))
    assert [c[1] for c in windows] == list(range(1, n_windows + 1))
    assert {c[2] for c in windows} == {n_windows}
    assert [c[1] for c in generations] == list(range(1, 2 * len(PROMPTS) + 1))


@pytest.mark.parametrize("bad", [dict(min_effect=-0.1), dict(min_text_effect=float("nan"))])
def test_minimum_effects_must_be_numbers_at_least_zero(bad):
    with pytest.raises(ValueError, match="must be a number >= 0"):
        _settings(**bad)


def test_omega_mode_moves_r_and_leaves_the_model_as_it_was(model):
    before = [np.array(b.oscillators.omega_0) for b in model.blocks]
    res = run_intervention(model, PROMPTS, EVAL, _settings(mode="omega", targets=[0.8]))
    cond = res["conditions"][1]
    assert cond["omega_scale"] is not None and 0 < cond["omega_scale"] < 1
    assert cond["measured_r"] > res["conditions"][0]["measured_r"] + 0.3
    for b, omega in zip(model.blocks, before, strict=True):
        np.testing.assert_array_equal(np.array(b.oscillators.omega_0), omega)


def test_results_are_reproducible_with_phase_noise(model):
    # PyTorch drew the phase noise at eval too; with it on, every number must still come from
    # fixed keys, the same in every condition (or noise would pass for an effect).
    net = Model(replace(model.args, eval_noise=True))
    net.update(model.parameters())
    net.eval()
    settings = _settings(targets=[0.5], mode="omega")
    first, second = (run_intervention(net, PROMPTS, EVAL, settings) for _ in range(2))
    for a, b in zip(first["conditions"], second["conditions"], strict=True):
        assert a["teacher_forced"] == b["teacher_forced"] and a["omega_scale"] == b["omega_scale"]
        assert [s["tokens"] for s in a["samples"]] == [s["tokens"] for s in b["samples"]]
