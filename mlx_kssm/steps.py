"""The compiled pieces of one training update, in two flavours that compute the same numbers.

The loss of every architecture is ``CE + w * model.aux_loss(stats)`` (w: the user's weight or
``model.default_aux_weight``); what is logged besides is ``model.metrics(stats)``, a dict of
scalars or per-bank vectors. Nothing here knows an architecture's names.

``MLXSteps``: the whole loss differentiated by MLX in one compiled function. What every backend
with a fast GEMM (Metal, CUDA, Accelerate) should run.

``NumpyHeadSteps``: the body (``model.hidden``, giving h) stays in compiled MLX; the tied
100K-vocabulary head (the parameter ``model.TIED_EMBEDDING`` names), its cross-entropy and
their gradients dh, dE are computed by :mod:`mlx_kssm.numpy_head`. The body's gradients come
from the surrogate loss ``sum(h * dh) + w * aux`` (its gradient is the vector-Jacobian product
of the body with ``dh``), and dE is added to the embedding's gradient, since the head is tied.
A model whose head is frozen (Phase-Mamba: the base's, ``model.frozen_head_weight()``) gets
the same with no dE at all.
On MLX's Linux CPU wheel this is several times faster (README, "Training on a Linux CPU"); the
tests compare the two flavours' losses and gradients.

Both return ``micro_step(tokens, key) -> (loss, (ce, aux, metrics), grads)`` and
``eval_batch(tokens, key) -> (ce_sum, aux, metrics)``.
"""

from __future__ import annotations

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

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


def loss_terms(model, tokens: mx.array, key: mx.array | None, aux_weight: float):
    """tokens (B, L+1) -> (loss, (ce, aux, metrics)); loss = CE + aux_weight * aux."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    logits, stats = model.forward(inputs, key=key)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits, targets, reduction="mean")
    aux = model.aux_loss(stats)
    return ce + aux_weight * aux, (ce, aux, model.metrics(stats))


class UntiedHeadError(ValueError):
    """--head numpy asked for a model whose output head is not its embedding."""


def tied_embedding(model) -> tuple[list[str], mx.array]:
    """The path (keys) and the array of the model's tied output head; UntiedHeadError if none."""
    name = getattr(model, "TIED_EMBEDDING", None)
    if name is None:
        raise UntiedHeadError(
            f"--head numpy computes a tied output head, but {model.args.model_type} has an "
            "untied one; use --head mlx"
        )
    path, node = name.split("."), model.parameters()
    for part in path:
        node = node[part]
    return path, node


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def frozen_head(model) -> mx.array | None:
    """The (V, d) output matrix of a model whose head is not trained (Phase-Mamba's frozen
    base), or None: ``model.frozen_head_weight()`` where the model has one."""
    weight = getattr(model, "frozen_head_weight", None)
    return weight() if callable(weight) else None


def make_steps(model, optimizer, aux_weight: float, grad_clip: float, head: str = "auto"):
    """The step functions for ``head`` ("auto", "mlx" or "numpy"); "auto" keeps a model in
    MLX when its head is neither tied nor frozen, an explicit "numpy" refuses it
    (UntiedHeadError)."""
    backend = resolve_head_backend(head)
    numpy_able = (
        getattr(model, "TIED_EMBEDDING", None) is not None or frozen_head(model) is not None
    )
    if backend == "numpy" and head == "auto" and not numpy_able:
        backend = "mlx"
    if backend == "numpy":
        if frozen_head(model) is None:
            tied_embedding(model)  # refuse an untied model before compiling anything
        return NumpyHeadSteps(model, optimizer, aux_weight, grad_clip)
    return MLXSteps(model, optimizer, aux_weight, grad_clip)


def _compiled_update(model, optimizer, grad_clip: float):
    @partial(
        mx.compile, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state]
    )
    def apply_update(grads):
        grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)

    return apply_update


class MLXSteps:
    """micro_step(tokens, key) -> (loss, (ce, aux, metrics), grads); apply_update(grads);
    eval_batch(tokens, key) -> (ce_sum, aux, metrics).
    Gradients of micro-batches are summed by the caller, outside the compiled graph, so that
    only one micro-batch's activations are alive at a time."""

    head = "mlx"

    def __init__(self, model, optimizer, aux_weight: float, grad_clip: float):
        value_and_grad = nn.value_and_grad(model, loss_terms)
        model_state = [model.state]

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def micro_step(tokens, key):
            (loss, terms), grads = value_and_grad(model, tokens, key, aux_weight)
            return loss, terms, grads

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def eval_batch(tokens, key):
            logits, stats = model.forward(tokens[:, :-1], key=key)
            ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="sum")
            return ce, model.aux_loss(stats), model.metrics(stats)

        self.micro_step, self.eval_batch = micro_step, eval_batch
        self.apply_update = _compiled_update(model, optimizer, grad_clip)


class NumpyHeadSteps:
    """Same interface and numbers as MLXSteps; the head runs in numpy (module docstring)."""

    head = "numpy"

    def __init__(self, model, optimizer, aux_weight: float, grad_clip: float):
        self.model, self.aux_weight = model, aux_weight
        # A frozen head (no gradient for it) or the tied embedding (its gradient is added).
        self.frozen = frozen_head(model)
        self.embedding_path = None if self.frozen is not None else tied_embedding(model)[0]
        self.numpy_head = NumpyHead()
        model_state = [model.state]

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def body(inputs, key):
            h, stats = model.hidden(inputs, key=key)  # (B, L, d)
            return h, model.aux_loss(stats), model.metrics(stats)

        def surrogate(model, inputs, key, dh):
            h, stats = model.hidden(inputs, key=key)
            return mx.sum(h * dh) + aux_weight * model.aux_loss(stats)

        surrogate_grad = nn.value_and_grad(model, surrogate)

        @partial(mx.compile, inputs=model_state, outputs=model_state)
        def body_grads(inputs, key, dh):
            return surrogate_grad(model, inputs, key, dh)[1]

        self.body, self.body_grads = body, body_grads
        self.apply_update = _compiled_update(model, optimizer, grad_clip)
        # Buffers a forward pass writes (Phase-Mamba's per-call core phases): a training step
        # runs the body twice, so the second pass must start from the state the first saw.
        trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
        self.buffer_names = [k for k, _ in tree_flatten(model.parameters()) if k not in trainable]

    def _buffers(self) -> list[tuple[str, mx.array]]:
        if not self.buffer_names:  # K-SSM: nothing to save on every step
            return []
        values = dict(tree_flatten(self.model.parameters()))
        return [(k, values[k]) for k in self.buffer_names]

    def _head(self, h: mx.array, targets: mx.array, grad: bool):
        B, L, d = h.shape
        E = self.frozen if self.frozen is not None else tied_embedding(self.model)[1]  # (V, d)
        mx.eval(h, E)
        return self.numpy_head(
            np.asarray(h).reshape(B * L, d),
            np.asarray(E),
            np.asarray(targets).reshape(-1),
            scale=1.0 / (B * L),
            grad=grad,
            grad_E=self.frozen is None,
        )

    def micro_step(self, tokens: mx.array, key: mx.array | None):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
        before = self._buffers()
        h, aux, metrics = self.body(inputs, key)
        out = self._head(h, targets, grad=True)
        if before:
            self.model.update(tree_unflatten(before))  # so the buffers advance once per step
        grads = self.body_grads(inputs, key, mx.array(out.dh.reshape(h.shape)))
        if self.embedding_path is not None:
            *parents, leaf = self.embedding_path
            node = grads
            for part in parents:
                node = node[part]
            node[leaf] = node[leaf] + mx.array(out.dE)  # the tied head's share of the gradient
        ce = mx.array(out.ce_sum / out.dh.shape[0], dtype=mx.float32)
        return ce + self.aux_weight * aux, (ce, aux, metrics), grads

    def eval_batch(self, tokens: mx.array, key: mx.array | None):
        h, aux, metrics = self.body(tokens[:, :-1], key)
        out = self._head(h, tokens[:, 1:], grad=False)
        return mx.array(out.ce_sum, dtype=mx.float32), aux, metrics
