"""The selective scan as a Metal kernel pair (``scan_forward.metal``, ``scan_backward.metal``),
wrapped in ``mx.custom_function`` with a VJP (backward by recomputation from chunk-start
states), so that it trains under ``nn.value_and_grad`` and ``mx.compile``.

Same calls and numbers as :func:`mlx_kssm.ops.scan.selective_scan` and
:func:`~mlx_kssm.ops.scan.selective_scan_step` (the references). The kernel keeps each state
in a register for the whole sequence, so ``chunk_size`` (the reference's graph-shaping knob)
has no meaning here and is ignored. Anything the kernels do not handle (not float32, a state
size that is not a power of two up to 32, an empty sequence, wrong shapes) runs the reference,
which also raises the reference's errors.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

from ..ops import scan as reference
from .launch import KernelSpec, Launch, Runner, run_metal

FORWARD = KernelSpec(
    name="kssm_scan_forward",
    input_names=("x", "delta", "A", "Bm", "Cm", "Dskip", "h0"),
    output_names=("y", "h_last"),
    source_file="scan_forward.metal",
)
BACKWARD = KernelSpec(
    name="kssm_scan_backward",
    input_names=("x", "delta", "A", "Bm", "Cm", "Dskip", "h0", "dy", "dh_last"),
    output_names=("dx", "ddelta", "dA_parts", "dB_parts", "dC_parts", "dD_parts", "dh0", "ckpt"),
    source_file="scan_backward.metal",
)
THREADS = 256  # per threadgroup: 256 / N channels x N states
CHUNK = 16  # backward: positions recomputed into registers at a time


def supported(x, delta, A, B_, C, D_skip, h0) -> bool:
    if x.ndim != 3 or A.ndim != 2:
        return False
    batch, length, channels = x.shape
    state = A.shape[1]
    arrays = [x, delta, A, B_, C, D_skip] + ([h0] if h0 is not None else [])
    return (
        all(a.dtype == mx.float32 for a in arrays)
        and min(batch, length, channels) >= 1
        and state in (1, 2, 4, 8, 16, 32)
        and tuple(delta.shape) == (batch, length, channels)
        and tuple(A.shape) == (channels, state)
        and tuple(B_.shape) == tuple(C.shape) == (batch, length, state)
        and tuple(D_skip.shape) == (channels,)
        and (h0 is None or tuple(h0.shape) == (batch, channels, state))
    )


def _geometry(x, A):
    batch, length, channels = x.shape
    state = A.shape[1]
    tiles = -(-channels // (THREADS // state))
    return batch, length, channels, state, tiles


def forward_launch(x, delta, A, B_, C, D_skip, h0) -> Launch:
    batch, length, channels, state, tiles = _geometry(x, A)
    return Launch(
        spec=FORWARD,
        inputs=[x, delta, A, B_, C, D_skip, h0 if h0 is not None else _placeholder(x)],
        template=[("T", mx.float32), ("NS", state), ("HAS_H0", h0 is not None)],
        grid=(THREADS * tiles, batch, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(batch, length, channels), (batch, channels, state)],
    )


def backward_launch(x, delta, A, B_, C, D_skip, h0, dy, dh_last) -> Launch:
    batch, length, channels, state, tiles = _geometry(x, A)
    forward = forward_launch(x, delta, A, B_, C, D_skip, h0)
    chunks = -(-length // CHUNK)
    return Launch(
        spec=BACKWARD,
        inputs=forward.inputs + [dy, dh_last],
        template=forward.template + [("CH", CHUNK)],
        grid=forward.grid,
        threadgroup=forward.threadgroup,
        output_shapes=[
            (batch, length, channels),  # dx
            (batch, length, channels),  # ddelta
            (batch, channels, state),  # dA per batch row
            (batch, length, tiles, state),  # dB per threadgroup
            (batch, length, tiles, state),  # dC per threadgroup
            (batch, channels),  # dD_skip per batch row
            (batch, channels, state),  # dh0
            (batch, chunks, channels, state),  # chunk-start states (scratch)
        ],
    )


def finish_backward(outputs, has_h0: bool) -> list:
    """Cotangents of (x, delta, A, B_, C, D_skip[, h0]) from the backward kernel's outputs."""
    dx, ddelta, dA_parts, dB_parts, dC_parts, dD_parts, dh0, _ = outputs
    grads = [
        dx,
        ddelta,
        dA_parts.sum(axis=0),
        dB_parts.sum(axis=2),
        dC_parts.sum(axis=2),
        dD_parts.sum(axis=0),
    ]
    return grads + [dh0] if has_h0 else grads


def _placeholder(like):
    return mx.zeros((1,), dtype=mx.float32) if isinstance(like, mx.array) else like.ravel()[:1] * 0


def build(run: Runner):
    """(selective_scan, selective_scan_step) around ``run``: Metal, or the emulator in tests."""

    @cache
    def op_for(has_h0: bool):
        def backward(primals, cotangents, outputs):
            x, delta, A, B_, C, D_skip = primals[:6]
            h0 = primals[6] if has_h0 else None
            dy, dh_last = cotangents
            launch = backward_launch(x, delta, A, B_, C, D_skip, h0, dy, dh_last)
            return tuple(finish_backward(run(launch), has_h0))

        if has_h0:

            @mx.custom_function
            def fused(x, delta, A, B_, C, D_skip, h0):
                return tuple(run(forward_launch(x, delta, A, B_, C, D_skip, h0)))

        else:

            @mx.custom_function
            def fused(x, delta, A, B_, C, D_skip):
                return tuple(run(forward_launch(x, delta, A, B_, C, D_skip, None)))

        fused.vjp(backward)
        return fused

    def selective_scan(x, delta, A, B_, C, D_skip, h0=None, chunk_size=None):
        if not supported(x, delta, A, B_, C, D_skip, h0):
            return reference.selective_scan(x, delta, A, B_, C, D_skip, h0, chunk_size)
        args = (x, delta, A, B_, C, D_skip) + ((h0,) if h0 is not None else ())
        y, h_last = op_for(h0 is not None)(*args)
        return y, h_last

    def selective_scan_step(x_t, delta_t, A, B_t, C_t, D_skip, h):
        if x_t.ndim != 2 or B_t.ndim != 2 or C_t.ndim != 2:
            return reference.selective_scan_step(x_t, delta_t, A, B_t, C_t, D_skip, h)
        x, delta, B_, C = (a[:, None, :] for a in (x_t, delta_t, B_t, C_t))
        if not supported(x, delta, A, B_, C, D_skip, h):
            return reference.selective_scan_step(x_t, delta_t, A, B_t, C_t, D_skip, h)
        y, h_new = selective_scan(x, delta, A, B_, C, D_skip, h)
        return y[:, 0], h_new

    return selective_scan, selective_scan_step


selective_scan, selective_scan_step = build(run_metal)
