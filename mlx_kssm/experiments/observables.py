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

from ..observables import (  # noqa: F401  (re-exported: the experiments' vocabulary)
    GOLDILOCKS_R,
    GOLDILOCKS_U,
    goldilocks_fraction,
    in_goldilocks,
    normalized_entropy,
)
from .stats import nanmean

REPETITION_WINDOW = 16  # rep/16 of Welleck et al. (2019)


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
