"""Per-token observables of a generation and the text metrics the experiments compare.

R·U (from the Phase-Mamba paper): R is the Kuramoto order parameter of the step, U the
normalised uncertainty of the next-token distribution, U = H(p) / log V, in [0, 1]. The
"Goldilocks zone" is R in [0.40, 0.55] and U in [0.40, 0.60], bounds included.

Text metrics are undefined (NaN) when a generation is too short to have any n-gram; the
statistics leave such samples out rather than inventing a value for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .stats import nanmean

GOLDILOCKS_R = (0.40, 0.55)
GOLDILOCKS_U = (0.40, 0.60)
REPETITION_WINDOW = 16  # rep/16 of Welleck et al. (2019)


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
    """Fraction of steps in the Goldilocks zone (NaN for no steps)."""
    inside = in_goldilocks(R, U)
    return float(inside.mean()) if inside.size else math.nan


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct-n: unique n-grams / n-grams in one sequence (NaN when it has none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens: Sequence[int], window: int = REPETITION_WINDOW) -> float:
    """rep/w: fraction of tokens (after the first) that already occur in the previous w tokens.

    Catches loops such as "the the the" that a global distinct-1 would dilute.
    """
    if len(tokens) < 2:
        return math.nan
    hits = sum(tokens[i] in tokens[max(0, i - window) : i] for i in range(1, len(tokens)))
    return hits / (len(tokens) - 1)


def text_metrics(tokens: Sequence[int]) -> dict[str, float]:
    """The metrics of generated tokens that do not need the model."""
    return {
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "distinct_4": distinct_n(tokens, 4),
        "repetition": repetition_rate(tokens),
        "length": float(len(tokens)),
    }


def generation_metrics(gen) -> dict[str, float]:
    """Text metrics plus mean R (over layers and steps), mean U and the Goldilocks fraction."""
    R_mean = gen.R_mean
    return {
        **text_metrics(gen.tokens),
        "U": nanmean(gen.U),
        "R": nanmean(R_mean),
        "goldilocks": goldilocks_fraction(R_mean, gen.U),
    }
