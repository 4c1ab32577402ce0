"""The selective scan and causal conv of mlx_kssm.ops: chunked == sequential == float64 numpy,
prefill + steps == full forward, gradients, compile, stability, memory."""

from __future__ import annotations

from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from mlx_kssm import ops
from mlx_kssm.ops.scan import default_chunk_size

BATCH, CHANNELS, STATE = 2, 8, 16


def scan_inputs(length, seed=0, batch=BATCH, channels=CHANNELS, state=STATE):
    """x, delta, A, B_, C, D_skip, h0 with Mamba-like scales (delta from softplus, A = -exp)."""
    keys = mx.random.split(mx.random.key(seed), 7)
    x = mx.random.normal((batch, length, channels), key=keys[0])
    delta = nn.softplus(mx.random.normal((batch, length, channels), key=keys[1]) - 2.0)
    A = -mx.exp(mx.random.normal((channels, state), key=keys[2]))
    B_ = mx.random.normal((batch, length, state), key=keys[3])
    C = mx.random.normal((batch, length, state), key=keys[4])
    D_skip = mx.random.normal((channels,), key=keys[5])
    h0 = mx.random.normal((batch, channels, state), key=keys[6])
    return x, delta, A, B_, C, D_skip, h0


def assert_close(got, want, tol=1e-4, what=""):
    np.testing.assert_allclose(np.array(got), np.array(want), atol=tol, rtol=tol, err_msg=what)


def numpy_scan(x, delta, A, B_, C, D_skip, h0):
    """The recurrence in float64 numpy, written from the equations, as an outside check."""
    x, delta, A, B_, C, D_skip, h = (
        np.array(a, dtype=np.float64) for a in (x, delta, A, B_, C, D_skip, h0)
    )
    ys = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = np.exp(delta[:, t, :, None] * A) * h + np.einsum(
            "bd,bn->bdn", delta[:, t] * x[:, t], B_[:, t]
        )
        ys[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + D_skip * x[:, t]
    return ys, h


@cache
def sequential(length, with_h0):
    x, delta, A, B_, C, D_skip, h0 = scan_inputs(length)
    y, h = ops.selective_scan_sequential(x, delta, A, B_, C, D_skip, h0 if with_h0 else None)
    mx.eval(y, h)
    return y, h


def test_sequential_reference_matches_float64_numpy():
    x, delta, A, B_, C, D_skip, h0 = scan_inputs(23, seed=3)
    y, h = ops.selective_scan_sequential(x, delta, A, B_, C, D_skip, h0)
    y_np, h_np = numpy_scan(x, delta, A, B_, C, D_skip, h0)
    assert_close(y, y_np, 1e-5)
    assert_close(h, h_np, 1e-5)


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("length", [1, 5, 37, 130])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, None])
def test_chunked_equals_sequential(chunk_size, length, with_h0):
    x, delta, A, B_, C, D_skip, h0 = scan_inputs(length)
    y, h = ops.selective_scan(x, delta, A, B_, C, D_skip, h0 if with_h0 else None, chunk_size)
    y_ref, h_ref = sequential(length, with_h0)
    assert y.shape == (BATCH, length, CHANNELS) and h.shape == (BATCH, CHANNELS, STATE)
    assert_close(y, y_ref)
    assert_close(h, h_ref)


def test_empty_sequence_keeps_the_state():
    x, delta, A, B_, C, D_skip, h0 = scan_inputs(0)
    y, h = ops.selective_scan(x, delta, A, B_, C, D_skip, h0)
    assert y.shape == (BATCH, 0, CHANNELS)
    assert_close(h, h0, 0)


def test_step_from_empty_history_equals_step_from_zero_state():
    x, delta, A, B_, C, D_skip, _ = scan_inputs(1)
    args = (x[:, 0], delta[:, 0], A, B_[:, 0], C[:, 0], D_skip)
    y_none, h_none = ops.selective_scan_step(*args, None)
    y_zero, h_zero = ops.selective_scan_step(*args, mx.zeros((BATCH, CHANNELS, STATE)))
    assert_close(y_none, y_zero, 0)
    assert_close(h_none, h_zero, 0)


def conv_inputs(length, taps, seed=1):
    keys = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.normal((BATCH, length, CHANNELS), key=keys[0])
    weight = mx.random.normal((taps, CHANNELS), key=keys[1])
    bias = mx.random.normal((CHANNELS,), key=keys[2])
    return x, weight, bias


@pytest.mark.parametrize("taps", [1, 4])
def test_causal_conv_equals_mlx_grouped_conv(taps):
    x, weight, bias = conv_inputs(19, taps)
    y, state = ops.causal_conv1d(x, weight, bias)
    padded = mx.pad(x, [(0, 0), (taps - 1, 0), (0, 0)])
    # MLX's grouped conv weight is (C_out, K, C_in / groups) = (D, K, 1).
    want = mx.conv1d(padded, mx.swapaxes(weight, 0, 1)[:, :, None], groups=CHANNELS) + bias
    assert_close(y, want, 1e-5)
    assert_close(state, x[:, x.shape[1] - (taps - 1) :], 0)


@pytest.mark.parametrize("taps", [1, 4])
def test_causal_conv_steps_equal_full(taps):
    x, weight, bias = conv_inputs(11, taps)
    start = mx.random.normal((BATCH, taps - 1, CHANNELS), key=mx.random.key(5))
    y_full, state_full = ops.causal_conv1d(x, weight, bias, start)
    state, ys = start, []
    for t in range(x.shape[1]):
        y_t, state = ops.causal_conv1d_step(x[:, t], state, weight, bias)
        ys.append(y_t)
    assert_close(mx.stack(ys, axis=1), y_full, 1e-5)
    assert_close(state, state_full, 0)


def test_causal_conv_shorter_than_its_window_keeps_older_inputs():
    x, weight, bias = conv_inputs(2, 4)
    start = mx.random.normal((BATCH, 3, CHANNELS), key=mx.random.key(6))
    _, state = ops.causal_conv1d(x, weight, bias, start)
    assert_close(state, mx.concatenate([start[:, 2:], x], axis=1), 0)


def block_full(x_in, conv_w, conv_b, delta, A, B_, C, D_skip, chunk_size):
    """The Mamba block's sequence core: causal conv then scan, as the model will chain them."""
    u, conv_state = ops.causal_conv1d(x_in, conv_w, conv_b)
    y, h = ops.selective_scan(u, delta, A, B_, C, D_skip, None, chunk_size)
    return y, h, conv_state


@pytest.mark.parametrize("chunk_size", [3, 16, None])
def test_prefill_then_steps_equals_full_forward(chunk_size):
    total, prefix, middle = 57, 37, 9
    x_in, delta, A, B_, C, D_skip, _ = scan_inputs(total, seed=2)
    conv_w, conv_b = mx.random.normal((4, CHANNELS), key=mx.random.key(9)), mx.zeros((CHANNELS,))
    y_full, h_full, conv_full = block_full(
        x_in, conv_w, conv_b, delta, A, B_, C, D_skip, chunk_size
    )

    def piece(a, lo, hi):
        return a[:, lo:hi]

    # Prefill a prefix, prefill a second piece from the cache, then one token at a time.
    u, conv_state = ops.causal_conv1d(piece(x_in, 0, prefix), conv_w, conv_b)
    args = [piece(a, 0, prefix) for a in (delta, B_, C)]
    y1, h = ops.selective_scan(u, args[0], A, args[1], args[2], D_skip, None, chunk_size)
    hi = prefix + middle
    u, conv_state = ops.causal_conv1d(piece(x_in, prefix, hi), conv_w, conv_b, conv_state)
    args = [piece(a, prefix, hi) for a in (delta, B_, C)]
    y2, h = ops.selective_scan(u, args[0], A, args[1], args[2], D_skip, h, chunk_size)
    ys = [y1, y2]
    for t in range(hi, total):
        u_t, conv_state = ops.causal_conv1d_step(x_in[:, t], conv_state, conv_w, conv_b)
        y_t, h = ops.selective_scan_step(u_t, delta[:, t], A, B_[:, t], C[:, t], D_skip, h)
        ys.append(y_t[:, None])
    assert_close(mx.concatenate(ys, axis=1), y_full)
    assert_close(h, h_full)
    assert_close(conv_state, conv_full, 0)


def scan_loss(scan, chunk_size, x, delta, A, B_, C, D_skip, h0, y_weight, h_weight):
    kwargs = {} if chunk_size == "sequential" else {"chunk_size": chunk_size}
    y, h = scan(x, delta, A, B_, C, D_skip, h0, **kwargs)
    return mx.sum(y * y_weight) + mx.sum(h * h_weight)


@pytest.mark.parametrize("chunk_size", [3, 16])
def test_gradient_matches_sequential(chunk_size):
    inputs = scan_inputs(37, seed=4)
    y_weight = mx.random.normal((BATCH, 37, CHANNELS), key=mx.random.key(7))
    h_weight = mx.random.normal((BATCH, CHANNELS, STATE), key=mx.random.key(8))
    argnums = tuple(range(7))
    chunked = mx.grad(partial(scan_loss, ops.selective_scan, chunk_size), argnums)
    reference = mx.grad(partial(scan_loss, ops.selective_scan_sequential, "sequential"), argnums)
    got = chunked(*inputs, y_weight, h_weight)
    want = reference(*inputs, y_weight, h_weight)
    for name, g, w in zip(("x", "delta", "A", "B_", "C", "D_skip", "h0"), got, want, strict=True):
        scale = max(1.0, float(mx.max(mx.abs(w))))
        err = float(mx.max(mx.abs(g - w)))
        assert err <= 1e-4 * scale, f"d loss / d {name}: max error {err:.2e} at scale {scale:.1f}"


class ScanProbe(nn.Module):
    """A minimal selective layer: x -> (delta, B, C) by one projection, A = -exp(A_log)."""

    def __init__(self, channels, state, scan, **scan_kwargs):
        super().__init__()
        self.proj = nn.Linear(channels, channels + 2 * state)
        self.A_log = mx.log(
            mx.broadcast_to(mx.arange(1, state + 1, dtype=mx.float32), (channels, state))
        )
        self.D = mx.ones((channels,))
        self._scan, self._kwargs, self._sizes = scan, scan_kwargs, (channels, channels + state)

    def __call__(self, x):
        delta, B_, C = mx.split(self.proj(x), self._sizes, axis=-1)
        y, _ = self._scan(
            x, nn.softplus(delta), -mx.exp(self.A_log), B_, C, self.D, None, **self._kwargs
        )
        return y


def one_sgd_step(model, x, compiled):
    def loss_fn(model, x):
        return mx.mean((model(x) - x) ** 2)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.SGD(learning_rate=0.01)
    state = [model.state, optimizer.state]

    def step(x):
        loss, grads = loss_and_grad(model, x)
        optimizer.update(model, grads)
        return loss

    if compiled:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    losses = [step(x) for _ in range(2)]
    mx.eval(losses, model.parameters())
    return losses


def test_trains_under_compile_like_the_sequential_loop():
    x = mx.random.normal((BATCH, 29, CHANNELS), key=mx.random.key(11))
    mx.random.seed(0)
    chunked = ScanProbe(CHANNELS, STATE, ops.selective_scan, chunk_size=4)
    reference = ScanProbe(CHANNELS, STATE, ops.selective_scan_sequential)
    reference.update(chunked.parameters())
    got = one_sgd_step(chunked, x, compiled=True)
    want = one_sgd_step(reference, x, compiled=False)
    assert float(got[1]) < float(got[0])  # the step moved the parameters downhill
    assert_close(mx.stack(got), mx.stack(want))
    for (name, p), (_, q) in zip(
        nn.utils.tree_flatten(chunked.parameters()),
        nn.utils.tree_flatten(reference.parameters()),
        strict=True,
    ):
        assert_close(p, q, what=name)


def test_large_decays_stay_finite_and_exact():
    length = 40
    x, _, _, B_, C, D_skip, h0 = scan_inputs(length, seed=5)
    keys = mx.random.split(mx.random.key(12), 2)
    delta = mx.random.uniform(0.0, 10.0, (BATCH, length, CHANNELS), key=keys[0])
    delta = mx.where(mx.arange(length)[None, :, None] % 7 == 0, 10.0, delta)  # some exactly 10
    A = -mx.random.uniform(0.01, 16.0, (CHANNELS, STATE), key=keys[1])
    A = mx.where(mx.arange(STATE) == 0, -16.0, A)
    inputs = (x, delta, A, B_, C, D_skip, h0)
    y_ref, h_ref = ops.selective_scan_sequential(*inputs)
    for chunk_size in (1, 8, 64):
        y, h = ops.selective_scan(*inputs, chunk_size)
        squared = partial(scan_loss, ops.selective_scan, chunk_size)
        grads = mx.grad(squared, tuple(range(7)))(*inputs, y, mx.zeros_like(h))
        for a in (y, h, *grads):
            assert bool(mx.all(mx.isfinite(a))), f"non-finite value at chunk_size {chunk_size}"
        assert_close(y, y_ref)
        assert_close(h, h_ref)


def test_chunked_forward_never_builds_the_whole_state_sequence():
    batch, length, channels, state = 1, 4096, 64, 16
    x, delta, A, B_, C, D_skip, _ = scan_inputs(length, batch=batch, channels=channels, state=state)
    mx.eval(x, delta, A, B_, C, D_skip)
    whole = batch * length * channels * state * 4  # bytes of one (B, L, D, N) float32 tensor
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    y, h = ops.selective_scan(x, delta, A, B_, C, D_skip)
    mx.eval(y, h)
    extra = mx.get_peak_memory() - base
    # What may remain is a few (B, L, D) arrays (1 MiB each here: padded inputs, outputs);
    # holding every step's state, as MLX's breadth-first schedule did before the scan ordered
    # its steps, measured 19.8 MiB.
    assert extra < whole / 2, (
        f"peak {extra / 2**20:.1f} MiB above inputs; (B, L, D, N) is {whole / 2**20:.0f} MiB"
    )


def test_bad_shapes_and_chunk_sizes_raise_one_line_errors():
    x, delta, A, B_, C, D_skip, _ = scan_inputs(5)
    with pytest.raises(
        ValueError, match=r"^selective_scan: B_ has shape \(2, 5, 3\), expected \(2, 5, 16\)"
    ):
        ops.selective_scan(x, delta, A, B_[..., :3], C, D_skip)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ops.selective_scan(x, delta, A, B_, C, D_skip, None, 0)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\), expected \(K, 8\)"):
        ops.causal_conv1d(x, mx.zeros((3, 4)))


@pytest.mark.parametrize(
    "length,expected", [(1, 1), (5, 2), (64, 8), (256, 16), (1024, 32), (4096, 64)]
)
def test_default_chunk_size_is_near_sqrt_length(length, expected):
    assert default_chunk_size(length) == expected
