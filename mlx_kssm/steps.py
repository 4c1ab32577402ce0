"""The compiled pieces of one training update, in two flavours that compute the same numbers.

``MLXSteps``: the whole loss, ``CE(h @ E.T) + lambda * reg``, differentiated by MLX in one
compiled function. What every backend with a fast GEMM (Metal, CUDA, Accelerate) should run.

``NumpyHeadSteps``: the body (embedding -> blocks -> final norm, giving h) stays in compiled
MLX; the tied 100K-vocabulary head, its cross-entropy and their gradients dh, dE are computed
by :mod:`mlx_kssm.numpy_head`. The body's gradients come from the surrogate loss
``sum(h * dh) + lambda * reg`` (its gradient is the vector-Jacobian product of the body with
``dh``), and dE is added to the embedding's gradient, since the head is tied. On MLX's Linux CPU
wheel this is several times faster (README, "Training on a Linux CPU"); the tests compare the
two flavours' losses and gradients.
"""

from __future__ import annotations

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .numpy_head import NumpyHead

HEAD_BACKENDS = ("auto", "mlx", "numpy")


def resolve_head_backend(name: str) -> str:
    """ "auto" -> "numpy" on MLX's Linux CPU backend (slow reference BLAS), else "mlx"."""
    if name not in HEAD_BACKENDS:
        raise ValueError(f"unknown head backend {name!r}; choose one of {', '.join(HEAD_BACKENDS)}")
    if name != "auto":
        return name
    on_cpu = mx.default_device() == mx.cpu
    return "numpy" if on_cpu and sys.platform.startswith("linux") else "mlx"


def loss_terms(model, tokens: mx.array, key: mx.array | None, lambda_reg: float):
    """tokens (B, L+1) -> (loss, (ce, reg, R, u_layers, det_layers)); loss = CE + lambda*reg."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    logits, stats = model.forward(inputs, key=key)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
    loss = ce + lambda_reg * stats.reg_loss
    return loss, (ce, stats.reg_loss, mx.mean(stats.R_mean), stats.u_mean, stats.det_mean)


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def make_steps(model, optimizer, lambda_reg: float, grad_clip: float, head: str = "auto"):
    """The step functions for ``head`` ("auto", "mlx" or "numpy")."""
    if resolve_head_backend(head) == "numpy":
        return NumpyHeadSteps(model, optimizer, lambda_reg, grad_clip)
    return MLXSteps(model, optimizer, lambda_reg, grad_clip)


def _compiled_update(model, optimizer, grad_clip: float):
    @partial(
        mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state]
    )
    def apply_update(grads):
        grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)

    return apply_update


class MLXSteps:
    """micro_step(tokens, key) -> (loss, aux, grads); apply_update(grads);
    eval_batch(tokens, key) -> (ce_sum, reg, R_layers, u_layers, det_layers).
    Gradients of micro-batches are summed by the caller, outside the compiled graph, so that
    only one micro-batch's activations are alive at a time."""

    head = "mlx"

    def __init__(self, model, optimizer, lambda_reg: float, grad_clip: float):
        value_and_grad = nn.value_and_grad(model, loss_terms)
        model_state = [model.state]

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def micro_step(tokens, key):
            (loss, aux), grads = value_and_grad(model, tokens, key, lambda_reg)
            return loss, aux, grads

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def eval_batch(tokens, key):
            logits, stats = model.forward(tokens[:, :-1], key=key)
            ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")
            R_layers = mx.mean(stats.R_all, axis=(0, 1))  # (n_layers,)
            return ce, stats.reg_loss, R_layers, stats.u_mean, stats.det_mean

        self.micro_step, self.eval_batch = micro_step, eval_batch
        self.apply_update = _compiled_update(model, optimizer, grad_clip)


class NumpyHeadSteps:
    """Same interface and numbers as MLXSteps; the head runs in numpy (module docstring)."""

    head = "numpy"

    def __init__(self, model, optimizer, lambda_reg: float, grad_clip: float):
        self.model, self.lambda_reg = model, lambda_reg
        self.numpy_head = NumpyHead()
        model_state = [model.state]

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def body(inputs, key):
            h, stats = model.hidden(inputs, key=key)  # (B, L, d)
            R_layers = mx.mean(stats.R_all, axis=(0, 1))  # (n_layers,)
            return h, (stats.reg_loss, R_layers, stats.u_mean, stats.det_mean)

        def surrogate(model, inputs, key, dh):
            h, stats = model.hidden(inputs, key=key)
            return mx.sum(h * dh) + lambda_reg * stats.reg_loss

        surrogate_grad = nn.value_and_grad(model, surrogate)

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def body_grads(inputs, key, dh):
            return surrogate_grad(model, inputs, key, dh)[1]

        self.body, self.body_grads = body, body_grads
        self.apply_update = _compiled_update(model, optimizer, grad_clip)

    def _head(self, h: mx.array, targets: mx.array, grad: bool):
        B, L, d = h.shape
        E = np.asarray(self.model.embed.weight)  # (V, d)
        return self.numpy_head(
            np.asarray(h).reshape(B * L, d),
            E,
            np.asarray(targets).reshape(-1),
            scale=1.0 / (B * L),
            grad=grad,
        )

    def micro_step(self, tokens: mx.array, key: mx.array | None):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
        h, (reg, R_layers, u_layers, det_layers) = self.body(inputs, key)
        mx.eval(h, self.model.embed.weight)
        out = self._head(h, targets, grad=True)
        grads = self.body_grads(inputs, key, mx.array(out.dh.reshape(h.shape)))
        embed = grads["embed"]
        embed["weight"] = embed["weight"] + mx.array(out.dE)
        ce = mx.array(out.ce_sum / out.dh.shape[0], dtype=mx.float32)
        loss = ce + self.lambda_reg * reg
        return loss, (ce, reg, mx.mean(R_layers), u_layers, det_layers), grads

    def eval_batch(self, tokens: mx.array, key: mx.array | None):
        h, (reg, R_layers, u_layers, det_layers) = self.body(tokens[:, :-1], key)
        mx.eval(h, self.model.embed.weight)
        out = self._head(h, tokens[:, 1:], grad=False)
        return mx.array(out.ce_sum, dtype=mx.float32), reg, R_layers, u_layers, det_layers
