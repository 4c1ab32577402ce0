"""Acceptance for issue 3: the real PyTorch fixture, converted without torch, reproduces the
outputs PyTorch gave, and a resumed MLX AdamW makes the update PyTorch would have made.

The fixture lives in ../shared/fixtures/torch-v3-tiny/ beside the repository; CI clones the
repository so that it is there. Its absence is a failure, never a skip."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten, tree_unflatten
from torch_zip_writer import torch_order

import mlx_kssm
from mlx_kssm.checkpoints_convert.convert import convert
from mlx_kssm.checkpoints_convert.torch_zip import read_checkpoint
from mlx_kssm.checkpoints_convert.v3_rules import OUTPUT_HEAD, parameter_shapes
from mlx_kssm.run_folder import load_optimizer_state, load_trainer_state

TINY = FIXTURES / "torch-v3-tiny"


@pytest.fixture(scope="module")
def fixture_dir():
    needed = ["checkpoint_12.pt", "best_model.pt", "expected.npz", "config.json"]
    missing = [name for name in needed if not (TINY / name).is_file()]
    if missing:
        pytest.fail(
            f"the PyTorch fixture is missing from {TINY} ({', '.join(missing)}): clone the "
            "project so that ../shared sits beside it"
        )
    return TINY


@pytest.fixture(scope="module")
def converted(fixture_dir, tmp_path_factory):
    """Both fixture files converted once: name -> (report, output folder)."""
    out = tmp_path_factory.mktemp("converted")
    return {
        name: (convert(fixture_dir / name, out / name), out / name)
        for name in ("checkpoint_12.pt", "best_model.pt")
    }


@pytest.mark.parametrize("name", ["checkpoint_12.pt", "best_model.pt"])
def test_converted_fixture_reproduces_pytorch_outputs(fixture_dir, converted, name):
    report, folder = converted[name]
    expected = np.load(fixture_dir / "expected.npz")
    model = mlx_kssm.load(folder)
    assert not model.training and not model.args.eval_noise  # eval mode, oscillator noise off
    logits, stats = model.forward(mx.array(expected["tokens"]))
    assert logits.dtype == mx.float32
    for key, got in [
        ("R_mean", mx.mean(stats["R"], axis=-1)),
        ("R_all", stats["R"]),
        ("reg_loss", stats["reg"]),
        ("u_mean", stats["u_mean"]),
        ("det_mean", stats["det_mean"]),
    ]:
        assert np.shape(got) == expected[key].shape, key
        np.testing.assert_allclose(np.array(got), expected[key], rtol=0, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(np.array(logits), expected["logits"], rtol=0, atol=1e-3)
    assert report.step == 12


def test_config_is_recovered_from_the_shapes(fixture_dir, converted):
    report, folder = converted["checkpoint_12.pt"]
    written = json.loads((fixture_dir / "config.json").read_text())
    args = report.args
    got = (args.vocab_size, args.hidden_dim, args.n_layers, args.n_oscillators, args.n_harmonics)
    assert got == tuple(
        written[k] for k in ("vocab_size", "hidden_dim", "n_layers", "n_oscillators", "n_harmonics")
    )
    assert report.n_params == written["n_params"]
    assert args.bistable and json.loads((folder / "config.json").read_text())["bistable"]
    assert report.locations == ["cpu"] and report.source_dtypes == ["float32"]


def test_fixture_state_dict_order_is_the_spec_order(fixture_dir, converted):
    """The optimizer's indices follow this order; the real file must agree with it."""
    state = read_checkpoint(fixture_dir / "checkpoint_12.pt")["model_state"]
    names = list(state)
    assert names == torch_order(2) + [OUTPUT_HEAD]
    assert names[:-1] == list(parameter_shapes(converted["checkpoint_12.pt"][0].args))
    assert state[OUTPUT_HEAD].same_data(state["embed.weight"])  # stored once


# -- resuming: one AdamW update after conversion equals PyTorch's next update ------------------

UPDATE_TOL = dict(rtol=1e-6, atol=1e-6)  # float32: a few ulps of weights of size ~1


def fixed_gradients() -> dict[str, np.ndarray]:
    """A deterministic, different gradient for every parameter (fixture shapes)."""
    shapes = {
        k: v.shape for k, v in read_checkpoint(TINY / "checkpoint_12.pt")["model_state"].items()
    }
    grads = {}
    for index, name in enumerate(torch_order(2)):
        size = int(np.prod(shapes[name]))
        wave = np.sin(0.37 * np.arange(size, dtype=np.float64) + index)
        grads[name] = (0.01 * wave).astype(np.float32).reshape(shapes[name])
    return grads


def torch_adamw_reference(p, g, m, v, step, lr, betas, eps, weight_decay):
    """torch.optim.AdamW's documented update (no amsgrad, not maximizing), in float32.

    step is the number of updates already done; torch increments it first.
    """
    b1, b2 = betas
    step += 1
    p = p * np.float32(1 - lr * weight_decay)  # decoupled weight decay
    m = m + (g - m) * np.float32(1 - b1)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * np.float32(b2) + np.float32(1 - b2) * g * g
    bias1, bias2 = 1 - b1**step, 1 - b2**step
    denom = np.sqrt(v) / np.float32(np.sqrt(bias2)) + np.float32(eps)
    p = p - np.float32(lr / bias1) * (m / denom)
    return p, m, v


@pytest.fixture(scope="module")
def resumed(converted):
    """The converted run resumed in MLX for one update on fixed_gradients(): name -> (p, m, v)."""
    _, folder = converted["checkpoint_12.pt"]
    model = mlx_kssm.load(folder)
    trainer = load_trainer_state(folder)
    args = trainer["train_args"]
    optimizer = optim.AdamW(
        learning_rate=trainer["source"]["torch_lr_next"],
        betas=[args["beta1"], args["beta2"]],
        eps=args["adam_eps"],
        weight_decay=args["weight_decay"],
        bias_correction=True,
    )
    optimizer.state = load_optimizer_state(folder)
    grads = fixed_gradients()
    tree = tree_unflatten([(k, mx.array(g)) for k, g in grads.items()])
    optimizer.update(model, tree)
    mx.eval(model.parameters(), optimizer.state)
    params = dict(tree_flatten(model.parameters()))
    state = dict(tree_flatten(optimizer.state))
    assert state["step"].item() == 13
    return {
        name: tuple(np.array(a) for a in (params[name], state[f"{name}.m"], state[f"{name}.v"]))
        for name in grads
    }


def test_resumed_update_equals_torch_adamw_formula(fixture_dir, resumed):
    root = read_checkpoint(fixture_dir / "checkpoint_12.pt")
    group = root["optimizer_state"]["param_groups"][0]
    hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
    grads = fixed_gradients()

    def reference(name, moments_of=None, step=None):
        index = torch_order(2).index(moments_of or name)
        state = root["optimizer_state"]["state"][index]
        count = int(state["step"].numpy()) if step is None else step
        p, m, v = (root["model_state"][name], state["exp_avg"], state["exp_avg_sq"])
        return torch_adamw_reference(p.numpy(), grads[name], m.numpy(), v.numpy(), count, **hyper)

    for name in torch_order(2):
        want = reference(name)
        for got, ref, what in zip(
            resumed[name], want, ("param", "exp_avg", "exp_avg_sq"), strict=True
        ):
            np.testing.assert_allclose(got, ref, **UPDATE_TOL, err_msg=f"{name} {what}")

    # The tolerance has teeth: a run resumed with a fresh step count, or with a neighbour's
    # moments (a slip in the index -> name mapping), lands far outside it.
    def miss(name, **wrong):
        return np.max(np.abs(reference(name, **wrong)[0] - resumed[name][0]))

    assert max(miss(name, step=0) for name in torch_order(2)) > 100 * UPDATE_TOL["atol"]
    norm1 = "blocks.0.norm1.weight"
    assert miss(norm1, moments_of="blocks.0.norm1.bias") > 100 * UPDATE_TOL["atol"]


def test_resumed_update_equals_real_torch_adamw(fixture_dir, resumed):
    torch = pytest.importorskip("torch")
    ckpt = torch.load(fixture_dir / "checkpoint_12.pt", weights_only=True)
    names = [k for k in ckpt["model_state"] if k != OUTPUT_HEAD]  # named_parameters() order
    params = [torch.nn.Parameter(ckpt["model_state"][k].clone()) for k in names]
    group = ckpt["optimizer_state"]["param_groups"][0]
    optimizer = torch.optim.AdamW(
        params,
        lr=group["lr"],
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
    )
    optimizer.load_state_dict(ckpt["optimizer_state"])
    grads = fixed_gradients()
    for name, param in zip(names, params, strict=True):
        param.grad = torch.from_numpy(grads[name])
    optimizer.step()
    for name, param in zip(names, params, strict=True):
        state = optimizer.state[param]
        want = (param.detach(), state["exp_avg"], state["exp_avg_sq"])
        for got, ref, what in zip(
            resumed[name], want, ("param", "exp_avg", "exp_avg_sq"), strict=True
        ):
            np.testing.assert_allclose(got, ref.numpy(), **UPDATE_TOL, err_msg=f"{name} {what}")
