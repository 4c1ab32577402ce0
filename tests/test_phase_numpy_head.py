"""Phase-Mamba trains with the numpy head (steps.py): its head is the frozen base's, so the
step computes dh but no gradient for the head, and gives the MLX step's loss, metrics and
gradients."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_phase_mamba import VOCAB, build, tokens
from test_phase_mamba import base_dir as base_dir  # the module-scoped fixture

from mlx_kssm.steps import MLXSteps, NumpyHeadSteps, make_steps


def pair(folder, coupling):
    """Two identical models (a per-call core advances its phases at each call, so each step
    flavour gets its own), in training mode, with the paper's U term on."""
    models = [build(folder, seed=3, coupling=coupling, lambda_u=0.1) for _ in range(2)]
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(models[0].trainable_parameters())
    for model in models:
        model.train()
    steps = MLXSteps(models[0], optimizer, 0.1, 1.0), NumpyHeadSteps(models[1], optimizer, 0.1, 1.0)
    return models, steps


@pytest.mark.parametrize("coupling", ["faithful", "additive"])
def test_numpy_head_step_equals_the_mlx_step(base_dir, coupling):
    models, (mlx_steps, numpy_steps) = pair(base_dir, coupling)
    batch = tokens(B=3, L=9)
    loss_a, terms_a, grads_a = mlx_steps.micro_step(batch, None)
    loss_b, terms_b, grads_b = numpy_steps.micro_step(batch, None)
    assert float(loss_b) == pytest.approx(float(loss_a), abs=1e-5)
    flat_a, flat_b = dict(tree_flatten(terms_a)), dict(tree_flatten(terms_b))
    assert flat_a.keys() == flat_b.keys() and any("U" in k for k in flat_a)
    for name, a in flat_a.items():
        np.testing.assert_allclose(np.array(flat_b[name]), np.array(a), atol=1e-5, err_msg=name)
    grads_a, grads_b = dict(tree_flatten(grads_a)), dict(tree_flatten(grads_b))
    assert grads_a.keys() == grads_b.keys() and all(k.startswith("cores.") for k in grads_a)
    for name, g in grads_a.items():
        np.testing.assert_allclose(np.array(grads_b[name]), np.array(g), atol=2e-6, err_msg=name)
    assert max(float(mx.abs(g).max()) for g in grads_a.values()) > 1e-4  # gradients reach the core
    mx.eval([model.state for model in models])
    phases_a, phases_b = (np.array(model.cores[0].phases) for model in models)
    assert np.abs(phases_a).max() > 1e-3  # the per-call phases advanced, once in both
    np.testing.assert_allclose(phases_b, phases_a, atol=1e-6)


def test_numpy_head_eval_batch_equals_mlx(base_dir):
    _, (mlx_steps, numpy_steps) = pair(base_dir, "multiplicative")
    batch = tokens(B=2, L=8, seed=4)
    a = dict(tree_flatten(mlx_steps.eval_batch(batch, None)))
    b = dict(tree_flatten(numpy_steps.eval_batch(batch, None)))
    assert a.keys() == b.keys()
    for name, x in a.items():
        np.testing.assert_allclose(np.array(b[name]), np.array(x), rtol=1e-5, atol=1e-5)


def test_auto_picks_the_numpy_head_for_a_frozen_dense_head(base_dir):
    model = build(base_dir)
    weight = model.frozen_head_weight()
    assert weight.shape == (VOCAB, model.base.args.hidden_size)
    steps = make_steps(model, optim.AdamW(1e-3), 0.0, 1.0, head="auto")
    expected = NumpyHeadSteps if mx.default_device() == mx.cpu else MLXSteps
    assert isinstance(steps, expected)
    assert isinstance(make_steps(model, optim.AdamW(1e-3), 0.0, 1.0, head="mlx"), MLXSteps)
