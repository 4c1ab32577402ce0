"""K-SSM with a selective scan (issue 11): the oscillators reach the sequence computation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_kssm import build_model

VOCAB = 97
TINY = dict(hidden_dim=32, n_layers=2, n_oscillators=16, n_harmonics=4, state_size=8)


def tiny(**overrides):
    mx.random.seed(0)
    model = build_model({"model_type": "kssm_ssm", "vocab_size": VOCAB, **TINY, **overrides})
    model.eval()
    return model


def n_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def coupled(model, scale=0.5):
    """Give every bank a non-zero path into Delta (it starts at zero: a plain SSM)."""
    for block in model.blocks:
        w = block.osc_to_dt.weight
        block.osc_to_dt.weight = scale * mx.random.normal(w.shape, key=mx.random.key(7))
    return model


def test_the_control_without_banks_is_within_2_percent_of_the_parameters():
    for preset in ({}, dict(hidden_dim=256, n_layers=4, n_oscillators=96, n_harmonics=16)):
        args = {"model_type": "kssm_ssm", **preset}
        with_banks = n_params(build_model(args))
        without = n_params(build_model({**args, "oscillators": False}))
        assert without < with_banks and (with_banks - without) / with_banks < 0.02


def test_the_control_has_no_r():
    model = tiny(oscillators=False)
    x = mx.array([[1, 2, 3]])
    _, stats = model.forward(x)
    assert "R" not in stats and model.n_banks == 0 and set(model.metrics(stats)) == {"delta"}
    with pytest.raises(ValueError, match="no oscillator banks"):
        model(x, return_R=True)


def test_r_moves_from_token_to_token_and_depends_on_the_prefix():
    model = coupled(tiny())
    a = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    b = mx.array([[40, 41, 42, 43, 9, 10, 11, 12]])  # same last four tokens, other prefix
    _, Ra, _ = model(a, return_R=True)
    _, Rb, _ = model(b, return_R=True)
    assert np.ptp(np.array(Ra[0])) > 1e-3  # not one number for the whole sequence
    # Layer 1 reads layer 0's scan, so the same token after another prefix has another R.
    assert (
        np.abs(
            np.array(model.forward(a)[1]["R"][0, 4:, 1] - model.forward(b)[1]["R"][0, 4:, 1])
        ).max()
        > 1e-5
    )


def test_forcing_r_changes_the_step_and_the_output_also_through_the_cache():
    model = coupled(tiny())
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    free, free_stats = model.forward(x)
    forced, forced_stats = model.forward(x, force_r={0: 0.95, 1: 0.95})
    assert np.abs(np.array(forced_stats["R"]) - 0.95).max() < 1e-3
    assert not np.allclose(np.array(forced_stats["delta_mean"]), np.array(free_stats["delta_mean"]))
    assert np.abs(np.array(forced) - np.array(free)).max() > 1e-3
    cache = model.make_cache()  # forced at every step of incremental decoding
    pieces = [model.forward(x[:, :3], cache=cache, force_r={0: 0.95, 1: 0.95})[0]]
    for t in range(3, 8):
        pieces.append(model.forward(x[:, t : t + 1], cache=cache, force_r={0: 0.95, 1: 0.95})[0])
    stepped = np.concatenate([np.array(p) for p in pieces], axis=1)
    np.testing.assert_allclose(stepped, np.array(forced), atol=1e-4)


def test_the_bank_starts_out_of_the_step_and_can_learn_into_it():
    model = tiny()
    assert all(float(mx.abs(b.osc_to_dt.weight).max()) == 0 for b in model.blocks)
    model.train()
    x = mx.random.randint(0, VOCAB, (2, 9), key=mx.random.key(1))

    def loss(m):
        logits, _ = m.forward(x[:, :-1], key=mx.random.key(2))
        return mx.mean(
            mx.logsumexp(logits, -1) - mx.take_along_axis(logits, x[:, 1:, None], -1)[..., 0]
        )

    import mlx.nn as nn

    grads = nn.value_and_grad(model, loss)(model)[1]
    g = grads["blocks"][0]["osc_to_dt"]["weight"]
    assert float(mx.abs(g).max()) > 0  # a gradient path from R into Delta exists
