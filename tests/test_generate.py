"""Samplers, incremental generation with R and U per token, and streaming text."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args

from mlx_kssm import Model
from mlx_kssm.experiments.observables import normalized_entropy
from mlx_kssm.generate import (
    TextStream,
    apply_top_k,
    apply_top_p,
    decode_tokens,
    generate,
    generation_record,
    make_sampler,
)

PROMPT = [5, 17, 42]


@pytest.fixture(scope="module")
def model() -> Model:
    mx.random.seed(3)
    net = Model(tiny_args(vocab_size=512))
    net.eval()
    mx.eval(net.parameters())
    return net


# ---------------------------------------------------------------------------- samplers


def test_greedy_is_argmax():
    logits = mx.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 2.0]])
    assert make_sampler(0.0)(logits, None).tolist() == [1, 0]


def test_top_k_keeps_exactly_the_k_largest():
    logits = mx.array([[0.3, -2.0, 1.5, 0.9, 4.0, -0.1]])
    kept = np.isfinite(np.array(apply_top_k(logits, 3)))[0]
    assert np.flatnonzero(kept).tolist() == [2, 3, 4]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = mx.array(np.log(probs)[None])
    # Sorted mass before each token: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95.
    assert np.flatnonzero(np.isfinite(np.array(apply_top_p(logits, 0.7)))).tolist() == [1, 3]
    assert np.flatnonzero(np.isfinite(np.array(apply_top_p(logits, 0.85)))).tolist() == [1, 2, 3]
    assert np.flatnonzero(np.isfinite(np.array(apply_top_p(logits, 0.01)))).tolist() == [1]


def test_sampling_frequencies_follow_softmax_of_logits_over_temperature():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    n = 4000
    logits = mx.array(np.tile(np.log(probs) * 0.5, (n, 1)))  # temperature 0.5 undoes the 0.5
    keys = mx.stack([mx.random.key(i) for i in range(n)])
    drawn = np.array(make_sampler(0.5)(logits, keys))
    freq = np.bincount(drawn, minlength=4) / n
    assert np.abs(freq - probs).max() < 0.03  # ~4 standard errors at n = 4000


def test_truncated_sampler_never_draws_outside_top_k():
    logits = mx.array(np.tile(np.linspace(0, 1, 50), (500, 1)))
    keys = mx.stack([mx.random.key(i) for i in range(500)])
    drawn = np.array(make_sampler(2.0, top_k=5)(logits, keys))
    assert set(drawn.tolist()) <= {45, 46, 47, 48, 49} and len(set(drawn.tolist())) > 1


@pytest.mark.parametrize("kwargs", [dict(temp=-0.1), dict(top_k=-1), dict(top_p=0.0)])
def test_bad_sampler_settings_raise(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**{"temp": 1.0, **kwargs})


# ---------------------------------------------------------------------------- U


def test_normalized_entropy_bounds():
    assert float(normalized_entropy(mx.zeros((7,)))) == pytest.approx(1.0, abs=1e-6)
    one_hot = mx.array([0.0, -mx.inf, -mx.inf, -mx.inf])
    assert float(normalized_entropy(one_hot)) == pytest.approx(0.0, abs=1e-7)
    p = np.array([0.5, 0.25, 0.25])
    expected = -(p * np.log(p)).sum() / math.log(3)
    assert float(normalized_entropy(mx.array(np.log(p)))) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------- generation


def test_greedy_generation_is_deterministic(model):
    a = generate(model, PROMPT, make_sampler(0.0), 12)[0]
    b = generate(model, PROMPT, make_sampler(0.0), 12)[0]
    assert a.tokens == b.tokens and a.R_layers == b.R_layers and len(a.tokens) == 12


def test_incremental_generation_equals_a_full_forward(model):
    gen = generate(model, PROMPT, make_sampler(0.0), 15)[0]
    logits, stats = model.forward(mx.array([PROMPT + gen.tokens]))
    # Position i predicts token i + 1: the generated tokens come from positions P-1 .. end-1.
    producing = slice(len(PROMPT) - 1, len(PROMPT) - 1 + len(gen.tokens))
    assert np.array(mx.argmax(logits[0, producing], axis=-1)).tolist() == gen.tokens
    np.testing.assert_allclose(gen.R_layers, np.array(stats["R"][0, producing]), atol=1e-6)
    np.testing.assert_allclose(gen.U, np.array(normalized_entropy(logits[0, producing])), atol=1e-6)


def test_seeded_sampling_is_reproducible_and_trials_independent_of_batch(model):
    sampler = make_sampler(1.0)
    batch = generate(model, PROMPT, sampler, 10, seed=7, n=3)
    again = generate(model, PROMPT, sampler, 10, seed=7, n=3)
    alone = generate(model, PROMPT, sampler, 10, seed=8, n=1)[0]
    assert [g.tokens for g in batch] == [g.tokens for g in again]
    assert batch[1].tokens == alone.tokens  # trial 1 uses seed 7 + 1
    assert batch[0].tokens != batch[1].tokens


def test_generation_stops_at_a_stop_token(model):
    free = generate(model, PROMPT, make_sampler(1.0), 20, seed=1)[0]
    stop = free.tokens[5]
    first = free.tokens.index(stop)
    gen = generate(model, PROMPT, make_sampler(1.0), 20, seed=1, stop_tokens=[stop])[0]
    assert gen.tokens == free.tokens[:first] and gen.finish_reason == "stop"
    assert len(gen.R_layers) == len(gen.U) == first


def test_generation_stops_when_positions_run_out(model):
    max_positions = model.args.max_positions
    prompt = list(range(max_positions - 3))
    gen = generate(model, prompt, make_sampler(0.0), 50)[0]
    # Positions P..max_positions-1 take the fed-back tokens: 3 of them, plus the first token.
    assert len(gen.tokens) == 4 and gen.finish_reason == "max_positions"
    assert generate(model, prompt, make_sampler(0.0), 2)[0].finish_reason == "length"


@pytest.mark.parametrize("prompt", [[], list(range(65)), [3, 512]])
def test_bad_prompts_raise(model, prompt):
    with pytest.raises(ValueError):
        generate(model, prompt, make_sampler(0.0), 3)


def test_forced_r_is_recorded_per_token(model):
    gen = generate(model, PROMPT, make_sampler(0.0), 6, force_r={1: 0.9})[0]
    np.testing.assert_allclose(np.array(gen.R_layers)[:, 1], 0.9, atol=1e-3)
    assert np.abs(np.array(gen.R_layers)[:, 0] - 0.9).min() > 1e-3  # layer 0 runs free


# ---------------------------------------------------------------------------- text


def test_text_stream_holds_back_split_characters():
    from mlx_kssm.tokenizer import encode

    text = "naïve 🙂 日本語"
    tokens = encode(text)
    stream = TextStream()
    pieces = [stream.add(t) for t in tokens] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert decode_tokens(tokens) == text


def test_unknown_token_ids_decode_to_replacement_character():
    assert decode_tokens([100270]) == "\ufffd"  # in cl100k's gap between specials


def test_generation_record_has_text_r_and_u_per_step(model):
    gen = generate(model, PROMPT, make_sampler(0.0), 5)[0]
    record = generation_record(gen)
    assert record["tokens"] == gen.tokens and record["text"] == decode_tokens(gen.tokens)
    assert [s["R_layers"] for s in record["steps"]] == gen.R_layers
    assert [s["U"] for s in record["steps"]] == gen.U
    assert record["summary"]["mean_R"] == pytest.approx(np.mean(gen.R_layers))
