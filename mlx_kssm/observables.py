"""Observables of a model's next-token distribution and its synchrony, used during generation
(and by the experiments): normalised entropy U and the R·U "Goldilocks zone".

R·U (from the Phase-Mamba paper): R is the Kuramoto order parameter of the step, U the
normalised uncertainty of the next-token distribution, U = H(p) / log V, in [0, 1]. The
"Goldilocks zone" is R in [0.40, 0.55] and U in [0.40, 0.60], bounds included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

GOLDILOCKS_R = (0.40, 0.55)
GOLDILOCKS_U = (0.40, 0.60)


def normalized_entropy(logits: mx.array) -> mx.array:
    """U = entropy of softmax(logits) / log V over the last axis. (..., V) -> (...)."""
    logits = logits.astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    # exp(-inf) * -inf is NaN; masked entries (probability 0) contribute nothing.
    plogp = mx.where(mx.isinf(logp), 0.0, mx.exp(logp) * logp)
    return -mx.sum(plogp, axis=-1) / math.log(logits.shape[-1])


def in_goldilocks(R: Sequence[float], U: Sequence[float]) -> np.ndarray:
    """Boolean per step: R and U both inside the Goldilocks zone."""
    R, U = np.asarray(R, dtype=float), np.asarray(U, dtype=float)
    r_ok = (R >= GOLDILOCKS_R[0]) & (R <= GOLDILOCKS_R[1])
    u_ok = (U >= GOLDILOCKS_U[0]) & (U <= GOLDILOCKS_U[1])
    return r_ok & u_ok


def goldilocks_fraction(R: Sequence[float], U: Sequence[float]) -> float:
    """Fraction of steps in the Goldilocks zone (NaN for no steps, and for a model without
    oscillators, whose R is NaN: it is undefined there, not 0)."""
    inside = in_goldilocks(R, U)
    if not inside.size or np.isnan(np.asarray(R, dtype=float)).all():
        return math.nan
    return float(inside.mean())
