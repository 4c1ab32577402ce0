"""The Phase-Mamba baseline comparison: two models, the same prompts, trials and seeds.

Per generation: U (normalised entropy of the next-token distribution), distinct-1/2,
repetition (rep/16), length, mean R and the Goldilocks fraction. Each metric is compared with a
two-sample Welch t-test (the generations of two models are not paired), Holm-corrected over the
metrics, and reported as a difference of means with its 95% confidence interval. As in the
intervention (verdict.py), the models are said to differ on a metric only where the difference
reaches a stated minimum (min_text_effect: the metrics but length are fractions in [0, 1];
length uses that fraction of max_tokens) and the test passes; differences are ranked by size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .sampling import SamplingSettings, generation_samples
from .stats import CI_LEVEL, holm_adjust, nanmean, welch_t
from .verdict import UNITS, effect_rank, judge

COMPARE_METRICS = ("U", "distinct_1", "distinct_2", "repetition", "length", "R", "goldilocks")


@dataclass(kw_only=True)
class CompareSettings(SamplingSettings):
    alpha: float = 0.01
    min_text_effect: float = 0.05  # as for `kssm intervene` (see InterveneSettings)

    def __post_init__(self):
        if not (0.0 <= self.min_text_effect < math.inf):
            raise ValueError(f"--min-text-effect must be a number >= 0, got {self.min_text_effect}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")
        super().__post_init__()

    def minimums(self) -> dict[str, float]:
        minimums = {m: self.min_text_effect for m in COMPARE_METRICS}
        minimums["length"] = self.min_text_effect * self.max_tokens
        return minimums


def _values(samples: Sequence[dict], metric: str) -> list[float]:
    return [s["metrics"][metric] for s in samples]


def _describe(t) -> str:
    unit = UNITS.get(t.metric, "")
    return f"{t.metric} {t.effect:+.3g}{unit} ({CI_LEVEL:.0%} CI {t.ci_low:+.3g}..{t.ci_high:+.3g})"


def run_comparison(
    models: dict[str, object],
    prompts: Sequence[Sequence[int]],
    settings: CompareSettings,
    stop_tokens: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Generate with both models (label -> model) and test every metric; JSON-ready result."""
    if len(models) != 2:
        raise ValueError("compare needs exactly two models")
    samples = {}
    for label, model in models.items():
        if progress:
            progress(f"generating: {label}")
        samples[label] = generation_samples(model, prompts, settings, stop_tokens=stop_tokens)
    (label_a, a), (label_b, b) = samples.items()
    tests = [
        welch_t(_values(a, m), _values(b, m), m, f"{label_a} - {label_b}") for m in COMPARE_METRICS
    ]
    holm_adjust(tests)
    minimums = settings.minimums()
    judge(tests, minimums, settings.alpha)
    ranked = sorted(tests, key=lambda t: (-effect_rank(t), -abs(t.effect)))
    differ = [t for t in ranked if t.outcome == "changed"]
    below = [t for t in ranked if t.outcome == "below minimum"]
    rule = (
        f"difference of {label_a} - {label_b} at least {settings.min_text_effect:g} "
        f"(length {minimums['length']:g} tokens) and p < {settings.alpha}, Holm-corrected"
    )
    if differ:
        text = f"The models differ ({rule}) on: {'; '.join(_describe(t) for t in differ)}."
    else:
        text = f"No metric differs between the models ({rule})."
    if below:
        text += f" Detectable but below the minimum: {'; '.join(_describe(t) for t in below)}."
    return {
        "experiment": "compare",
        "settings": {**asdict(settings), "n_prompts": len(prompts)},
        "models": [
            {
                "label": label,
                "metrics": {m: nanmean(_values(s, m)) for m in COMPARE_METRICS},
                "samples": s,
            }
            for label, s in samples.items()
        ],
        "tests": [t.to_dict() for t in ranked],
        "verdict": {
            "alpha": settings.alpha,
            "minimum_effects": minimums,
            "differ": [t.metric for t in differ],
            "below_minimum": [t.metric for t in below],
            "text": text,
        },
    }
