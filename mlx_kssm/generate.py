"""Text generation: samplers from small factories, and incremental decoding that records the
Kuramoto order parameter R (per layer) and the uncertainty U for every generated token.

Incremental decoding. The prompt is run once through ``model.forward(..., cache=cache)`` with a
fresh ``model.make_cache()``, then every new token is a one-position forward through the same
cache (the model contract, models/base.py): O(1) model work per token for a recurrent model, and
for K-SSM v3, whose cache is only the next position, too (the published sampler re-ran the whole
context for each token).

Positions. A model with learned positions has ``max_positions`` of them (others say None). A
prompt of P tokens sits at positions 0..P-1 and the k-th generated token is fed back at position
P+k-1, so at most ``max_positions - P + 1`` tokens can be generated; generation then stops with
finish reason "max_positions". A prompt longer than ``max_positions`` is an error (ValueError).

Observables. The step that emits token t records R at the position whose logits produced t,
and U = entropy(softmax(logits)) / log V of that same distribution at temperature 1, so that U
describes the model, not the sampler's temperature or truncation.

Randomness. Row (trial) t of a batch draws its tokens from its own key stream, seeded with
``seed + t``, so a trial's text does not depend on how many trials run beside it, and two runs
that differ only in the model (or in a forced R) see the same random numbers. A model that
draws phase noise at eval gets one key per step from ``seed``, shared by the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .observables import goldilocks_fraction, normalized_entropy

# (logits (n, V), keys (n, 2) or None) -> tokens (n,)
Sampler = Callable[[mx.array, "mx.array | None"], mx.array]
LogitsFilter = Callable[[mx.array], mx.array]


# ---------------------------------------------------------------------------- samplers


def greedy(logits: mx.array, keys: mx.array | None = None) -> mx.array:
    """Temperature 0: the most likely token (the first one on ties)."""
    return mx.argmax(logits, axis=-1)


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits of each row, set the others to -inf."""
    if k >= logits.shape[-1]:
        return logits
    others = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logits, others, mx.array(-mx.inf, dtype=logits.dtype), axis=-1)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Nucleus filter: keep the most likely tokens until their mass reaches p (at least one)."""
    order = mx.argsort(-logits, axis=-1)
    ranked = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(ranked, axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs  # the top token always has 0 before it
    kept = mx.where(mass_before < p, ranked, mx.array(-mx.inf, dtype=logits.dtype))
    return mx.put_along_axis(logits, order, kept, axis=-1)


def make_logits_filters(top_k: int = 0, top_p: float = 1.0) -> list[LogitsFilter]:
    """The truncations to apply (after temperature): top-k first, then top-p. 0 / 1.0 = off."""
    if top_k < 0:
        raise ValueError(f"top-k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top-p must be in (0, 1] (1 = off), got {top_p}")
    filters: list[LogitsFilter] = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    return filters


# One independent categorical draw per row, each with its own key.
_categorical_rows = mx.vmap(lambda logits, key: mx.random.categorical(logits, key=key))


def make_sampler(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """A sampler: temperature 0 is greedy; otherwise softmax(logits / temp), truncated."""
    if temp < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temp}")
    filters = make_logits_filters(top_k, top_p)
    if temp == 0:
        return greedy

    def sample(logits: mx.array, keys: mx.array | None) -> mx.array:
        scaled = logits.astype(mx.float32) / temp
        for keep in filters:
            scaled = keep(scaled)
        if keys is None:
            return mx.random.categorical(scaled)
        return _categorical_rows(scaled, keys)

    return sample


# ---------------------------------------------------------------------------- decoding


@dataclass
class Step:
    """One decoding step for every row of the batch."""

    tokens: np.ndarray  # (n,) the token each row drew
    R_layers: np.ndarray  # (n, n_layers) R at the position that produced the token
    U: np.ndarray  # (n,) normalised entropy of that next-token distribution


@dataclass
class Generation:
    """One row's result. The stop token itself is not kept (nor its R and U)."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    R_layers: list[list[float]] = field(default_factory=list)
    U: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "length" | "stop" | "max_positions"

    @property
    def R_mean(self) -> list[float]:
        """Mean R over layers per step (NaN for a model without oscillators)."""
        return [float(np.mean(r)) if len(r) else math.nan for r in self.R_layers]


def check_prompt(model, prompt: Sequence[int]) -> None:
    """Raise ValueError unless the prompt is non-empty, in the vocabulary and fits the model."""
    vocab_size, limit = model.args.vocab_size, model.max_positions
    if len(prompt) == 0:
        raise ValueError("the prompt has no tokens")
    if limit is not None and len(prompt) > limit:
        raise ValueError(
            f"the prompt has {len(prompt)} tokens but the model has only "
            f"{limit} positions; shorten it"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}: "
            "this model was not trained with this tokenizer"
        )


def token_budget(model, prompt_len: int, max_tokens: int) -> int:
    """How many tokens can be generated: max_tokens, or fewer where positions run out."""
    limit = model.max_positions
    if limit is None:
        return max(0, max_tokens)
    return max(0, min(max_tokens, limit - prompt_len + 1))


def trial_keys(seed: int, n: int) -> mx.array:
    """Row t's key stream starts at key(seed + t). Shape (n, 2)."""
    return mx.stack([mx.random.key(seed + t) for t in range(n)])


_split_rows = mx.vmap(mx.random.split)  # (n, 2) -> (n, 2, 2)


def generate_steps(
    model,
    prompt: Sequence[int],
    sampler: Sampler,
    max_tokens: int,
    *,
    seed: int = 0,
    n: int = 1,
    force_r: dict[int, float] | None = None,
    stop_tokens: Sequence[int] = (),
) -> Iterator[Step]:
    """Decode n rows from one prompt, one Step per generated token.

    Ends after ``token_budget`` steps, or once every row has drawn a stop token.
    """
    check_prompt(model, prompt)
    budget = token_budget(model, len(prompt), max_tokens)
    keys = trial_keys(seed, n)
    noise_key = mx.random.key(seed)  # only used by models that draw phase noise at eval
    stopped = np.zeros(n, dtype=bool)
    stop = np.asarray(list(stop_tokens), dtype=np.int64)

    tokens = mx.array([list(prompt)] * n)
    cache = model.make_cache()
    for _ in range(budget):
        noise_key, step_key = mx.random.split(noise_key)
        logits, stats = model.forward(tokens, cache=cache, key=step_key, force_r=force_r)
        logits = logits[:, -1]
        R = stats["R"][:, -1] if "R" in stats else mx.zeros((n, 0))  # (n, n_banks)
        keys, sample_keys = _split_rows(keys).transpose(1, 0, 2)
        drawn = sampler(logits, sample_keys)
        U = normalized_entropy(logits)
        mx.eval(drawn, R, U, keys)
        step = Step(np.array(drawn), np.array(R), np.array(U))
        yield step
        stopped |= np.isin(step.tokens, stop)
        if stopped.all():
            return
        tokens = drawn[:, None].astype(mx.int32)


def generate(
    model,
    prompt: Sequence[int],
    sampler: Sampler,
    max_tokens: int,
    *,
    seed: int = 0,
    n: int = 1,
    force_r: dict[int, float] | None = None,
    stop_tokens: Sequence[int] = (),
    on_token: Callable[[int, int, list[float], float], None] | None = None,
) -> list[Generation]:
    """Generate n continuations of ``prompt``; ``on_token(row, token, R_layers, U)`` streams.

    Each row ends at its first stop token (finish "stop"), after ``max_tokens`` ("length"), or
    when the model's positions run out ("max_positions").
    """
    gens = [Generation(prompt=list(prompt)) for _ in range(n)]
    active = [True] * n
    for step in generate_steps(
        model, prompt, sampler, max_tokens, seed=seed, n=n, force_r=force_r, stop_tokens=stop_tokens
    ):
        for row, gen in enumerate(gens):
            if not active[row]:
                continue
            token = int(step.tokens[row])
            if token in stop_tokens:
                gen.finish_reason, active[row] = "stop", False
                continue
            R_layers, U = step.R_layers[row].tolist(), float(step.U[row])
            gen.tokens.append(token)
            gen.R_layers.append(R_layers)
            gen.U.append(U)
            if on_token is not None:
                on_token(row, token, R_layers, U)
    for row, gen in enumerate(gens):
        if active[row] and len(gen.tokens) < max_tokens:
            gen.finish_reason = "max_positions"
    return gens


# ---------------------------------------------------------------------------- text


class TextStream:
    """Tokens -> text as they arrive, with the model's tokenizer (tokenizer.py; None:
    cl100k_base), holding back an unfinished character. Ids the tokenizer does not know (a
    model may draw any id below its vocabulary size) become U+FFFD rather than an exception.
    """

    def __init__(self, tokenizer=None):
        from .tokenizer import resolve

        self._stream = resolve(tokenizer).stream()

    def add(self, token: int) -> str:
        return self._stream.add(int(token))

    def flush(self) -> str:
        return self._stream.flush()


def decode_tokens(tokens: Sequence[int], tokenizer=None) -> str:
    """The text of a token list (robust to ids the tokenizer does not know)."""
    stream = TextStream(tokenizer)
    return "".join(stream.add(t) for t in tokens) + stream.flush()


def encode_prompt(text: str, tokenizer=None) -> list[int]:
    """Prompt tokens; an empty prompt starts from end-of-text, as each training document did."""
    from .tokenizer import resolve

    tokenizer = resolve(tokenizer)
    return tokenizer.encode(text) or [tokenizer.eot]


def generation_record(gen: Generation, tokenizer=None) -> dict:
    """A JSON-ready record: tokens, text, and per step the token's text, R per layer, R, U
    (R null for a model without oscillators)."""
    stream = TextStream(tokenizer)
    steps = [
        {"token": t, "text": stream.add(t), "R_layers": r, "R_mean": _mean_or_none(r), "U": u}
        for t, r, u in zip(gen.tokens, gen.R_layers, gen.U, strict=True)
    ]
    if steps:
        steps[-1]["text"] += stream.flush()
    R_mean = [r for r in gen.R_mean if not math.isnan(r)]
    return {
        "prompt_tokens": gen.prompt,
        "tokens": gen.tokens,
        "text": "".join(s["text"] for s in steps),
        "finish_reason": gen.finish_reason,
        "steps": steps,
        "summary": {
            "n_tokens": len(gen.tokens),
            "mean_R": float(np.mean(R_mean)) if R_mean else None,
            "mean_U": float(np.mean(gen.U)) if gen.U else None,
            "goldilocks_fraction": goldilocks_fraction(R_mean, gen.U) if R_mean else None,
        },
    }


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None
