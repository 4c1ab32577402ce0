"""Every use the experiments and the CLI make of the model's forward pass, its properties and
the decoding loop, each in one small function, so that a change of those interfaces is adapted
here and nowhere else."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx


def forward_with_r(
    model, tokens: mx.array, *, key: mx.array | None = None, force_r: dict | None = None
) -> tuple[mx.array, mx.array]:
    """logits (B, L, V) and the order parameter R per bank (B, L, n_banks)."""
    logits, stats = model.forward(tokens, key=key, force_r=force_r)
    return logits, stats["R"]


def mixes_sequence(model) -> bool:
    """Whether a position's output can depend on earlier positions (K-SSM v3: it cannot)."""
    return bool(getattr(model, "mixes_sequence", True))


def generate_rows(
    model,
    prompt: Sequence[int],
    sampler,
    max_tokens: int,
    *,
    seed: int,
    n: int = 1,
    force_r: dict | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int, int, list[float], float], None] | None = None,
) -> list:
    """n generations (mlx_kssm.generate.Generation) of one prompt, trial t seeded seed + t."""
    from ..generate import generate

    return generate(
        model,
        prompt,
        sampler,
        max_tokens,
        seed=seed,
        n=n,
        force_r=force_r,
        stop_tokens=stop_tokens,
        on_token=on_token,
    )
