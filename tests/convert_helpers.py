"""Synthetic PyTorch K-SSM v3 checkpoints (written without torch, by torch_zip_writer.py) and
checks of what `kssm convert` made of them: shared by the test_convert*.py files and
test_convert_fuzz.py."""

from __future__ import annotations

import collections
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
from conftest import tiny_args
from mlx.utils import tree_flatten
from torch_zip_writer import Storage, Tensor, tensor, torch_order
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm import Model
from mlx_kssm.checkpoints_convert.v3_rules import parameter_shapes
from mlx_kssm.cli.app import app


def source_weights(**overrides) -> dict[str, np.ndarray]:
    """A tiny model's weights in PyTorch's named_parameters() order."""
    mx.random.seed(0)
    params = dict(tree_flatten(Model(tiny_args(**overrides)).parameters()))
    return {name: np.array(params[name]) for name in torch_order(tiny_args(**overrides).n_layers)}


def state_dict(weights, dtype="float32", location="cpu"):
    """What torch's model.state_dict() holds: the tied head shares embed.weight's storage."""
    state = collections.OrderedDict((k, tensor(v, dtype, location)) for k, v in weights.items())
    state["output_head.weight"] = state["embed.weight"]
    return state


def training_checkpoint(weights, step=3, lr=1e-3):
    """checkpoint_<step>.pt as the seed writes it; exp_avg of parameter i is filled with i + 1."""
    n = len(weights)
    moments = {
        i: {
            "step": tensor(np.float32(step)),
            "exp_avg": tensor(np.full(w.shape, i + 1, np.float32)),
            "exp_avg_sq": tensor(np.full(w.shape, (i + 1) / 1000, np.float32)),
        }
        for i, w in enumerate(weights.values())
    }
    group = {
        "lr": lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.1,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": True,
        "initial_lr": 2e-3,
        "params": list(range(n)),
    }
    return {
        "step": step,
        "model_state": state_dict(weights),
        "optimizer_state": {"state": moments, "param_groups": [group]},
        "scheduler_state": {"base_lrs": [2e-3], "last_epoch": step, "lr_lambdas": [None]},
        "history": [{"step": 1, "train_ce": 5.5, "val_loss": 6.0, "val_R": 0.25}],
        "best_val_loss": 6.0,
    }


def loaded_weights(folder) -> dict[str, np.ndarray]:
    """As float32 (numpy has no bfloat16; widening float16 is exact)."""
    params = tree_flatten(mlx_kssm.load(folder).parameters())
    return {k: np.array(v.astype(mx.float32)) for k, v in params}


def assert_same_weights(folder, weights):
    got = loaded_weights(folder)
    assert set(got) == set(weights)
    for name, want in weights.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def sgd_checkpoint(weights, step=5):
    """What the seed would save had it trained with torch.optim.SGD(momentum=0.9)."""
    group = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0}
    group.update(nesterov=False, maximize=False, foreach=None, differentiable=False)
    group.update(fused=None, params=list(range(len(weights))))
    state = {
        i: {"momentum_buffer": tensor(np.zeros(w.shape))} for i, w in enumerate(weights.values())
    }
    ckpt = training_checkpoint(weights, step)
    ckpt["optimizer_state"] = {"state": state, "param_groups": [group]}
    return ckpt


def one_storage_state(n_layers: int) -> dict:
    """Every weight a view of the same small storage: a file of kilobytes for a model of
    ``n_layers`` layers."""
    shapes = parameter_shapes(tiny_args(n_layers=n_layers))
    base = Storage(np.zeros(max(math.prod(s) for s in shapes.values()), np.float32))
    strides = {s: tuple(math.prod(s[i + 1 :]) for i in range(len(s))) for s in shapes.values()}
    return {name: Tensor(base, 0, s, strides[s]) for name, s in shapes.items()}


def run_cli(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def convert_in_a_process(source, out, timeout: float) -> subprocess.CompletedProcess:
    """`kssm convert SOURCE OUT` in a real child process: for what CliRunner cannot show
    (a blocking open, code a pickle would run in the converting process)."""
    code = "from mlx_kssm.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "convert", str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
