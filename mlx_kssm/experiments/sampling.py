"""Generations for many prompts and trials, as JSON-ready records with their metrics.

Shared by the intervention and the model comparison: trial t of prompt p uses seed
``seed + p * trials + t``, so two runs that differ only in the model or the intervention draw
the same random numbers (paired samples), while different prompts and trials draw their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..generate import Sampler, make_sampler
from .model_api import generate_rows
from .observables import generation_metrics

# Used by `kssm intervene` and `kssm compare` when no --prompts file is given: short openings
# in the register of the training text (encyclopaedic English).
DEFAULT_PROMPTS = (
    "The history of the city",
    "In the early twentieth century,",
    "The species is found in",
    "He was born in",
    "The album was released",
)


@dataclass(kw_only=True)
class SamplingSettings:
    trials: int = 3  # generations per prompt
    max_tokens: int = 32
    temp: float = 0.8  # the published sampler's temperature
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    def __post_init__(self):
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        if self.max_tokens < 1:
            raise ValueError(f"max-tokens must be at least 1, got {self.max_tokens}")
        self.sampler()  # validates temp, top_k and top_p

    def sampler(self) -> Sampler:
        return make_sampler(self.temp, self.top_k, self.top_p)


def generation_samples(
    model,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    force_r: dict[int, float] | None = None,
    stop_tokens: Sequence[int] = (),
    on_prompt: Callable[[], None] | None = None,
) -> list[dict]:
    """One record per prompt x trial: tokens, finish reason, per-layer mean R and the metrics.

    ``on_prompt()`` is called after each prompt's trials (for a progress display)."""
    sampler = settings.sampler()
    records = []
    for p, prompt in enumerate(prompts):
        gens = generate_rows(
            model,
            prompt,
            sampler,
            settings.max_tokens,
            seed=settings.seed + p * settings.trials,
            n=settings.trials,
            force_r=force_r,
            stop_tokens=stop_tokens,
        )
        for t, gen in enumerate(gens):
            n = len(gen.tokens)  # 0 when the first token drawn is a stop token
            R_layers = np.asarray(gen.R_layers, dtype=float).reshape(n, -1) if n else None
            records.append(
                {
                    "prompt": p,
                    "trial": t,
                    "tokens": gen.tokens,
                    "finish_reason": gen.finish_reason,
                    "R_layers": R_layers.mean(axis=0).tolist() if n else [],
                    "metrics": generation_metrics(gen),
                }
            )
        if on_prompt is not None:
            on_prompt()
    return records
