"""Pure-MLX references of the selective state-space scan (Mamba-1 family) and its short causal
depthwise convolution.

Glossary (float32 throughout; B = batch, L = length)
    x       (B, L, D)  input of the scan, D channels (the block's inner width)
    delta   (B, L, D)  step size, already positive (softplus'ed by the caller)
    A       (D, N)     diagonal state matrix, negative; N = state size (16 by default)
    B_, C   (B, L, N)  input and output projections of the state, chosen per position
    D_skip  (D,)       skip connection
    h       (B, D, N)  recurrent state

Discretised (zero-order hold on A, Euler on B as in Mamba), per position t:
    deltaA_t   = exp(delta_t * A)              (D, N) for each batch row
    deltaB_u_t = delta_t * B_t * x_t           (D, N), outer product of (D,) and (N,)
    h_t        = deltaA_t * h_{t-1} + deltaB_u_t
    y_t        = sum_N (h_t * C_t) + D_skip * x_t

Three computations of the same recurrence: :func:`selective_scan_sequential` (the plain loop,
ground truth for tests), :func:`selective_scan` (chunked, for training and prefill) and
:func:`selective_scan_step` (one token with a carried state, for generation). Callers go through
:mod:`mlx_kssm.ops`, which may swap in a GPU kernel.
"""

from __future__ import annotations

import math

import mlx.core as mx


def selective_scan_sequential(
    x: mx.array,
    delta: mx.array,
    A: mx.array,
    B_: mx.array,
    C: mx.array,
    D_skip: mx.array,
    h0: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The selective scan as a plain loop over positions (tests only; O(L) graph nodes).

        deltaA_t   = exp(delta_t * A)
        deltaB_u_t = delta_t * B_t * x_t
        h_t        = deltaA_t * h_{t-1} + deltaB_u_t,     h_{-1} = h0 (zeros if None)
        y_t        = sum_N (h_t * C_t) + D_skip * x_t

    Returns y (B, L, D) and the final state h_{L-1} (B, D, N).
    """
    batch, length, channels = x.shape
    h = mx.zeros((batch, channels, A.shape[1]), dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(length):
        delta_A = mx.exp(delta[:, t, :, None] * A)  # (B, D, N)
        delta_B_u = (delta[:, t] * x[:, t])[:, :, None] * B_[:, t, None, :]  # (B, D, N)
        h = delta_A * h + delta_B_u
        ys.append(mx.sum(h * C[:, t, None, :], axis=-1))  # (B, D)
    y = mx.stack(ys, axis=1) if ys else mx.zeros_like(x)
    return y + D_skip * x, h


def selective_scan_step(
    x_t: mx.array,
    delta_t: mx.array,
    A: mx.array,
    B_t: mx.array,
    C_t: mx.array,
    D_skip: mx.array,
    h: mx.array | None,
) -> tuple[mx.array, mx.array]:
    """One position of the recurrence with a carried state: O(D N) work, whatever came before.

    x_t, delta_t (B, D); B_t, C_t (B, N); h (B, D, N) or None for an empty history.
    Returns y_t (B, D) and the new state (B, D, N).
    """
    delta_B_u = (delta_t * x_t)[:, :, None] * B_t[:, None, :]
    if h is None:
        h_new = delta_B_u
    else:
        h_new = mx.exp(delta_t[:, :, None] * A) * h + delta_B_u
    y_t = mx.sum(h_new * C_t[:, None, :], axis=-1) + D_skip * x_t
    return y_t, h_new


def default_chunk_size(length: int) -> int:
    """The power of two nearest sqrt(length) (at least 1).

    The chunked scan runs T steps within chunks (all chunks at once) plus L / T steps across
    them, so T ~ sqrt(L) gives the shortest graph, and its per-step tensors, (B, L/T, D, N) and
    (B, T, D, N), are then both about B sqrt(L) D N floats. Measured on a loaded 2-core x86
    CPU (benchmarks/RESULTS.md, "Selective scan"), compiled forward+backward at B=4, L=1024,
    D=128, N=16: 1.04 s at T=16, 0.72 s at T=32 (this default), 1.73 s at T=64, 2.24 s at
    T=128, and 15.1 s (5.7 GB) for the sequential loop. Between neighbouring sizes the order
    flips from run to run on that machine (eager, T=64 was fastest); sizes far from sqrt(L)
    (T=128 at L=1024, T=4 at L=64) were slower in every mode measured.
    """
    if length <= 1:
        return 1
    return 2 ** round(math.log2(math.sqrt(length)))


def _check_scan_shapes(x, delta, A, B_, C, D_skip, h0) -> None:
    batch, length, channels = x.shape
    state = A.shape[-1]
    expected = {
        "delta": (delta.shape, (batch, length, channels)),
        "A": (A.shape, (channels, state)),
        "B_": (B_.shape, (batch, length, state)),
        "C": (C.shape, (batch, length, state)),
        "D_skip": (D_skip.shape, (channels,)),
    }
    if h0 is not None:
        expected["h0"] = (h0.shape, (batch, channels, state))
    for name, (got, want) in expected.items():
        if tuple(got) != want:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(got)}, expected {want} "
                f"for x of shape {tuple(x.shape)} and A of shape {tuple(A.shape)}"
            )


def _chunks(a: mx.array, n_chunks: int, chunk: int, pad: int) -> mx.array:
    """(B, L, F) -> (B, n_chunks, chunk, F), zero-padded at the end."""
    if pad:
        a = mx.pad(a, [(0, 0), (0, pad), (0, 0)])
    return a.reshape(a.shape[0], n_chunks, chunk, a.shape[-1])


def _after(state: mx.array, output: mx.array) -> mx.array:
    """``state`` itself, but only once ``output`` (computed from it) has been evaluated.

    MLX schedules a lazy graph breadth-first from its outputs, so the per-step outputs, which
    feed one wide stack, would run last and keep every step's state alive until then: the
    whole (B, L, D, N) sequence in memory. Ordering each output before the next step lets
    every state be freed as soon as the next one exists (forward peak, B=1, L=4096, D=64, N=16:
    5.7 MiB instead of 19.8 MiB, no measured change in time).
    """
    return mx.depends(state, output)


def selective_scan(
    x: mx.array,
    delta: mx.array,
    A: mx.array,
    B_: mx.array,
    C: mx.array,
    D_skip: mx.array,
    h0: mx.array | None = None,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """The selective scan over a whole sequence, chunked: the training and prefill computation.

    Same inputs, outputs and numbers (to float32 rounding) as :func:`selective_scan_sequential`.
    The sequence is cut into n = ceil(L / T) chunks of T positions (T = ``chunk_size``, default
    :func:`default_chunk_size`; the tail is padded with delta = 0, x = 0, which is the identity
    step, so the final state is exact). By linearity, the state inside chunk c is the state the
    chunk builds from zero plus the decayed state it starts from:

        h_t = l_t + exp(S_t) * h_start(c),     S_t = A * sum_{s in c, s <= t} delta_s

    1. Local pass, T steps, all chunks at once: l_t = deltaA_t * l_{t-1} + deltaB_u_t from
       l = 0 at each chunk's start, emitting the local outputs C_t . l_t and each chunk's
       local end state e(c). Tensors (B, n, D, N).
    2. Carry pass, n steps: with the cumulative log-decay S_t of the chunk (a cumsum of delta,
       times A), all T outputs of chunk c get their carried part C_t . (exp(S_t) * h_start)
       in parallel, and h_start(c + 1) = exp(S_T) * h_start(c) + e(c). Tensors (B, T, D, N).

    Every exponent is delta * A <= 0, so decays only underflow to 0 and never overflow (any
    delta >= 0, any A <= 0).

    Memory. No (B, L, D, N) tensor is built: each per-step tensor is (B, n, D, N) or
    (B, T, D, N), 4 B max(n, T) D N bytes, about 4 B sqrt(L) D N at the default T (B=4, L=256,
    D=128, N=16: 0.5 MiB, against 8 MiB for the whole sequence). MLX's lazy evaluator runs
    ahead by a dozen or so such tensors, so the measured forward peak above the inputs is
    ~16 of them: 8.5 MiB at that shape (the sequential loop: 8.2), 5.7 MiB at B=1, L=4096,
    D=64 (whole: 16 MiB). Autodiff keeps the per-step tensors of both passes for the backward
    pass, a few B L D N floats in total, as any differentiated loop does.

    The textbook alternative within a chunk, y_t = sum_{s<=t} C_t . exp(S_t - S_s) deltaB_u_s
    with a causal mask, needs a (B, T, T, D, N) tensor here because Mamba-1's A differs per
    (channel, state) pair; it took 2.8-10x the plain loop's time on a 2-core x86 CPU
    (benchmarks/RESULTS.md, "Selective scan"), so it is not used.
    """
    _check_scan_shapes(x, delta, A, B_, C, D_skip, h0)
    batch, length, channels = x.shape
    state = A.shape[1]
    if chunk_size is None:
        chunk_size = default_chunk_size(length)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if length == 0:
        h = mx.zeros((batch, channels, state), dtype=x.dtype) if h0 is None else h0
        return mx.zeros_like(x), h
    chunk = min(chunk_size, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length

    delta_c = _chunks(delta, n_chunks, chunk, pad)  # (B, n, T, D)
    u_c = _chunks(delta * x, n_chunks, chunk, pad)  # (B, n, T, D)
    b_c = _chunks(B_, n_chunks, chunk, pad)  # (B, n, T, N)
    c_c = _chunks(C, n_chunks, chunk, pad)  # (B, n, T, N)

    # 1. Local pass. mx.split rather than indexing per step: its gradient is one concatenate,
    # where per-step indexing would scatter into a full-size zero array at every step.
    per_step = (mx.split(a, chunk, axis=2) for a in (delta_c, u_c, b_c, c_c))
    local, local_y = None, []
    for d_t, u_t, b_t, c_t in zip(*per_step, strict=True):
        # d_t, u_t (B, n, 1, D) -> (B, n, D, 1); b_t (B, n, 1, N) broadcasts over D as is.
        d_t, u_t = mx.swapaxes(d_t, 2, 3), mx.swapaxes(u_t, 2, 3)
        delta_B_u = u_t * b_t  # (B, n, D, N)
        if local is None:
            local = delta_B_u
        else:
            local = mx.exp(d_t * A) * _after(local, local_y[-1]) + delta_B_u
        local_y.append(mx.sum(local * c_t, axis=-1))  # (B, n, D)
    y = mx.stack(local_y, axis=2)  # (B, n, T, D)

    # 2. Carry pass: cumulative log-decay within each chunk, a short recurrence across them.
    log_decay = mx.cumsum(delta_c, axis=2)  # (B, n, T, D), times A below
    per_chunk = zip(
        mx.split(log_decay, n_chunks, axis=1),
        mx.split(c_c, n_chunks, axis=1),
        mx.split(local, n_chunks, axis=1),
        strict=True,
    )
    h, carried = h0, []
    for s_c, c_chunk, end_c in per_chunk:
        s_c, c_chunk, end_c = s_c[:, 0], c_chunk[:, 0], end_c[:, 0]
        if h is None:  # nothing carried into the first chunk
            carried.append(mx.zeros((batch, chunk, channels), dtype=x.dtype))
            h = end_c
            continue
        if carried:
            h = _after(h, carried[-1])
        decay = mx.exp(s_c[..., None] * A)  # (B, T, D, N)
        carried.append(mx.sum(decay * h[:, None] * c_chunk[:, :, None, :], axis=-1))
        h = mx.exp(s_c[:, -1, :, None] * A) * h + end_c
    y = y + mx.stack(carried, axis=1)
    y = y.reshape(batch, n_chunks * chunk, channels)[:, :length]
    return y + D_skip * x, h


def causal_conv1d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    conv_state: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Depthwise causal convolution over a sequence: each channel its own K-tap filter.

        y_t = bias + sum_{k=0}^{K-1} weight[k] * x_{t-K+1+k}

    (weight[K-1] meets the current position; cross-correlation order, as nn.Conv1d.)
    x (B, L, D); weight (K, D); bias (D,) or None; conv_state (B, K-1, D): the K-1 inputs before
    x, oldest first, or None for zeros (left padding). Returns y (B, L, D) and the new conv
    state, the last K-1 inputs (B, K-1, D), ready for :func:`causal_conv1d_step`.
    """
    batch, length, channels = x.shape
    taps = weight.shape[0]
    if tuple(weight.shape) != (taps, channels) or taps < 1:
        raise ValueError(
            f"causal_conv1d: weight has shape {tuple(weight.shape)}, expected (K, {channels})"
        )
    if conv_state is None:
        conv_state = mx.zeros((batch, taps - 1, channels), dtype=x.dtype)
    padded = mx.concatenate([conv_state, x], axis=1)  # (B, K-1+L, D)
    y = sum(weight[k] * padded[:, k : k + length] for k in range(taps))
    if bias is not None:
        y = y + bias
    return y, padded[:, padded.shape[1] - (taps - 1) :]


def causal_conv1d_step(
    x_t: mx.array,
    conv_state: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """One position of :func:`causal_conv1d`: x_t (B, D), conv_state (B, K-1, D).

    Returns y_t (B, D) and the new conv state (B, K-1, D) (the window shifted by one)."""
    window = mx.concatenate([conv_state, x_t[:, None, :]], axis=1)  # (B, K, D)
    y_t = mx.sum(window * weight, axis=1)
    if bias is not None:
        y_t = y_t + bias
    return y_t, window[:, 1:]
