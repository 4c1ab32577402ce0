"""The numpy head (mlx_kssm/numpy_head.py) and the training step built on it
(mlx_kssm/steps.py) against their pure-MLX twins: same loss, same gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import tiny_args
from mlx.utils import tree_flatten

from mlx_kssm import Model
from mlx_kssm.numpy_head import NumpyHead
from mlx_kssm.steps import MLXSteps, NumpyHeadSteps, make_steps, resolve_head_backend


def mlx_head(h, E, y, scale):
    def loss(h, E):
        return scale * nn.losses.cross_entropy(h @ E.T, y, reduction="sum")

    y = mx.array(y)
    value, (dh, dE) = mx.value_and_grad(loss, argnums=(0, 1))(mx.array(h), mx.array(E))
    return float(value) / scale, np.array(dh), np.array(dE)


@pytest.mark.parametrize("threads,chunk", [(1, 512), (2, 8), (3, 5)])
def test_numpy_head_equals_mlx_cross_entropy(threads, chunk):
    rng = np.random.default_rng(0)
    T, d, V = 37, 16, 301  # 37 tokens in chunks of 5 and 8: ragged last chunks
    h = rng.standard_normal((T, d)).astype(np.float32)
    E = rng.standard_normal((V, d)).astype(np.float32)
    y = rng.integers(0, V, T)
    y[:3] = y[3]  # repeated targets in one chunk
    ce, dh, dE = mlx_head(h, E, y, scale=1.0 / T)
    out = NumpyHead(threads=threads, chunk_tokens=chunk)(h, E, y, scale=1.0 / T)
    assert out.ce_sum == pytest.approx(ce, rel=1e-5)
    np.testing.assert_allclose(out.dh, dh, atol=1e-6)
    np.testing.assert_allclose(out.dE, dE, atol=1e-6)
    assert np.abs(dE).max() > 1e-3  # the comparison is not between two zeros


def test_numpy_head_without_gradients_and_with_large_logits():
    rng = np.random.default_rng(1)
    h = 30.0 * rng.standard_normal((9, 8)).astype(np.float32)  # logits in the hundreds
    E = rng.standard_normal((50, 8)).astype(np.float32)
    y = rng.integers(0, 50, 9)
    out = NumpyHead(threads=2, chunk_tokens=4)(h, E, y, grad=False)
    assert out.dh is None and out.dE is None
    assert np.isfinite(out.ce_sum)
    assert out.ce_sum == pytest.approx(mlx_head(h, E, y, scale=1.0)[0], rel=1e-5)


def step_pair(bistable=True):
    mx.random.seed(0)
    model = Model(tiny_args(bistable=bistable, vocab_size=257))
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    mlx_steps = MLXSteps(model, optimizer, aux_weight=0.5, grad_clip=1.0)
    numpy_steps = NumpyHeadSteps(model, optimizer, aux_weight=0.5, grad_clip=1.0)
    return mlx_steps, numpy_steps


@pytest.mark.parametrize("bistable", [True, False])
def test_numpy_head_step_has_the_mlx_step_loss_and_gradients(bistable):
    mlx_steps, numpy_steps = step_pair(bistable)
    tokens = mx.random.randint(0, 257, (3, 11))  # (B, L+1)
    key = mx.random.key(5)  # phase noise on: both flavours must draw the same
    loss_a, aux_a, grads_a = mlx_steps.micro_step(tokens, key)
    loss_b, aux_b, grads_b = numpy_steps.micro_step(tokens, key)
    assert float(loss_b) == pytest.approx(float(loss_a), abs=1e-5)
    terms_a, terms_b = dict(tree_flatten(aux_a)), dict(tree_flatten(aux_b))  # ce, aux, metrics
    assert terms_a.keys() == terms_b.keys() and len(terms_a) == 5
    for name, a in terms_a.items():
        np.testing.assert_allclose(np.array(terms_b[name]), np.array(a), atol=1e-5, err_msg=name)
    flat_a, flat_b = dict(tree_flatten(grads_a)), dict(tree_flatten(grads_b))
    assert flat_a.keys() == flat_b.keys()
    for name, g in flat_a.items():
        np.testing.assert_allclose(np.array(flat_b[name]), np.array(g), atol=2e-6, err_msg=name)
    assert float(mx.abs(flat_a["embed.weight"]).max()) > 1e-3


def test_numpy_head_eval_batch_equals_mlx():
    mlx_steps, numpy_steps = step_pair()
    tokens = mx.random.randint(0, 257, (2, 9))
    key = mx.random.key(2)
    a = mlx_steps.eval_batch(tokens, key)
    b = numpy_steps.eval_batch(tokens, key)
    flat_a, flat_b = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert flat_a.keys() == flat_b.keys()
    for name, x in flat_a.items():
        np.testing.assert_allclose(np.array(flat_b[name]), np.array(x), rtol=1e-5, atol=1e-5)


def test_head_backend_choice():
    with pytest.raises(ValueError, match="head backend"):
        resolve_head_backend("torch")
    assert resolve_head_backend("mlx") == "mlx"
    assert resolve_head_backend("numpy") == "numpy"
    expected = "numpy" if mx.default_device() == mx.cpu else "mlx"  # this suite runs on Linux
    assert resolve_head_backend("auto") == expected
    steps = make_steps(Model(tiny_args()), optim.AdamW(1e-3), 0.5, 1.0, head="mlx")
    assert isinstance(steps, MLXSteps)
