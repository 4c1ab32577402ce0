"""The tied output head's cross-entropy and its gradients, computed with numpy.

Why this exists: on Linux, MLX's CPU wheel runs matmuls on a reference BLAS and its element-wise
work over the (T, V) logits is slow, so for the small presets the 100K-vocabulary head is most
of a training step (README, "Training on a Linux CPU"). numpy's bundled OpenBLAS does the same
arithmetic several times faster. The model's body stays in MLX; only
``h -> logits = h @ E.T -> cross-entropy`` and the gradients with respect to ``h`` and ``E`` are
done here, in float32, chunked over tokens so that the (T, V) logits never exist at once.

Glossary: T tokens (B * L), d hidden size, V vocabulary, E (V, d) the tied embedding.

The math is that of ``nn.losses.cross_entropy(h @ E.T, y)``: for each token
``ce = logsumexp(z) - z[y]`` and ``d ce / d z = softmax(z) - onehot(y)``; tests compare the two.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 512  # rows of logits held at once: 512 x 100,277 float32 = 205 MB


@dataclass
class HeadResult:
    ce_sum: float  # sum over the T tokens of the cross-entropy (nats)
    dh: np.ndarray | None  # (T, d) gradient of scale * ce_sum with respect to h
    dE: np.ndarray | None  # (V, d) gradient of scale * ce_sum with respect to E


class NumpyHead:
    """Reusable buffers and a small thread pool for the element-wise passes (numpy's ufuncs
    run on one core; its BLAS already uses them all)."""

    def __init__(self, threads: int | None = None, chunk_tokens: int = CHUNK_TOKENS):
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.chunk_tokens = chunk_tokens
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._buffer: np.ndarray | None = None

    def __call__(
        self,
        h: np.ndarray,
        E: np.ndarray,
        y: np.ndarray,
        scale: float = 1.0,
        grad: bool = True,
        grad_E: bool = True,
    ) -> HeadResult:
        """h (T, d), E (V, d), y (T,) int -> ce_sum and, with ``grad``, scale * its gradients
        (dE only with ``grad_E``: a frozen head skips that half of the backward GEMMs)."""
        h = np.ascontiguousarray(h, dtype=np.float32)
        E = np.ascontiguousarray(E, dtype=np.float32)
        y = np.asarray(y).reshape(-1)
        T, V = h.shape[0], E.shape[0]
        dh = np.empty_like(h) if grad else None
        grad_E = grad and grad_E
        dE_t = np.zeros((h.shape[1], V), np.float32) if grad_E else None  # (d, V): faster GEMM
        ce_sum = 0.0
        for start in range(0, T, self.chunk_tokens):
            rows = slice(start, min(start + self.chunk_tokens, T))
            hc, yc = h[rows], y[rows]  # (C, d), (C,)
            z = self._logits(hc, E)  # (C, V)
            target = np.einsum("cd,cd->c", hc, E[yc])  # z[c, y_c] without a gather on z
            lse = self._softmax_in_place(z, scale)  # z now holds scale * softmax(z); lse (C,)
            ce_sum += float(np.sum(lse.astype(np.float64) - target))
            if grad:
                z[np.arange(len(yc)), yc] -= scale  # scale * (softmax - onehot)
                np.matmul(z, E, out=dh[rows])  # (C, d)
                if grad_E:
                    dE_t += hc.T @ z  # (d, V)
        return HeadResult(ce_sum, dh, dE_t.T if grad_E else None)  # dE: a (V, d) view

    def _logits(self, hc: np.ndarray, E: np.ndarray) -> np.ndarray:
        shape = (hc.shape[0], E.shape[0])
        if self._buffer is None or self._buffer.size < shape[0] * shape[1]:
            self._buffer = np.empty(shape[0] * shape[1], np.float32)
        z = self._buffer[: shape[0] * shape[1]].reshape(shape)
        np.matmul(hc, E.T, out=z)
        return z

    def _softmax_in_place(self, z: np.ndarray, scale: float) -> np.ndarray:
        """Rows of z -> scale * softmax(z) in place (the scale rides on the normalising pass);
        returns logsumexp per row (float32)."""

        def one_part(part: np.ndarray) -> np.ndarray:
            m = part.max(axis=1, keepdims=True)
            np.subtract(part, m, out=part)
            np.exp(part, out=part)
            s = part.sum(axis=1, keepdims=True)
            np.multiply(part, scale / s, out=part)
            return (m + np.log(s))[:, 0]

        return np.concatenate(self._map(one_part, z))

    def _map(self, fn, z: np.ndarray) -> list:
        """fn over row blocks of z, one block per thread (numpy releases the GIL in ufuncs)."""
        if self._pool is None or z.shape[0] < 2 * self.threads:
            return [fn(z)]
        parts = np.array_split(z, self.threads, axis=0)
        return list(self._pool.map(fn, parts))
