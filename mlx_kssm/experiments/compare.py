"""The Phase-Mamba baseline comparison: two models, the same prompts, trials and seeds.

Per generation: U (normalised entropy of the next-token distribution), distinct-1/2,
repetition (rep/16), length, mean R and the Goldilocks fraction. Each metric is compared with a
two-sample Welch t-test (the generations of two models are not paired), Holm-corrected over the
metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .sampling import SamplingSettings, generation_samples
from .stats import holm_adjust, nanmean, welch_t

COMPARE_METRICS = ("U", "distinct_1", "distinct_2", "repetition", "length", "R", "goldilocks")


@dataclass(kw_only=True)
class CompareSettings(SamplingSettings):
    alpha: float = 0.01


def _values(samples: Sequence[dict], metric: str) -> list[float]:
    return [s["metrics"][metric] for s in samples]


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
    differ = [t.metric for t in tests if t.p_holm < settings.alpha]
    if differ:
        text = (
            f"The models differ at p < {settings.alpha} (Holm-corrected) on: {', '.join(differ)}."
        )
    else:
        text = f"No metric differs between the models at p < {settings.alpha} (Holm-corrected)."
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
        "tests": [t.to_dict() for t in tests],
        "verdict": {"alpha": settings.alpha, "differ": differ, "text": text},
    }
