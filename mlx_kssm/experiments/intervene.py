"""The causality experiment: force the order parameter R and measure whether the output changes.

Conditions: the free-running model (the control) and one condition per target R.

Modes
    phases  (default) Inside the forward pass, the phases of the forced layers are moved so that
            their R equals the target at every position (models/forcing.py); the readout sees
            the moved phases, so the intervention acts on the computation.
    omega   The published method: the natural frequencies of the forced layers are pulled
            towards (s < 1) or pushed away from (s > 1) their mean, omega' = mean + s (omega -
            mean). R is then not set directly, so s is calibrated per target: the mean R of the
            forced layers on the first evaluation window is measured on a grid s = 0..3 (step
            0.05), the sign change of R(s) - target nearest to s = 1 (the smallest edit) is
            refined by bisection, and where no s reaches the target the closest one is used.
            The measured R is reported either way.
    pattern The original Phase-Mamba intervention (phase_mamba models only): before every
            update the cores' phases are the pattern meant to give the target, which the update
            then moves (interventions.py); R is hit only approximately and measured.

Measurements, per condition
    generations  for every prompt p and trial t (seed + p * trials + t, the same in every
                 condition, so a change of text can only come from the intervention): U,
                 distinct-1/2/4, repetition (rep/16), length, R, and whether the text equals
                 the control's.
    teacher-forced  on evaluation text, run in windows of up to 256 positions: cross-entropy,
                 and the KL divergence KL(p_free || p_forced) between the free and forced
                 next-token distributions, averaged over segments of 32 consecutive positions;
                 each segment is one observation for the statistics (v3 computes every
                 position from its own token, so segments share no computation).

Statistics and verdict (verdict.py): every comparison with the control reports its effect with
a 95% confidence interval; a change is declared only where the effect reaches a stated minimum
(min_effect nats for KL and |delta CE|, min_text_effect for the text metrics) AND its test passes
at p < alpha, Holm-corrected; effects are ranked by size, not by p-value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .interventions import applied, core_phases, restore_phases, scaled_omega
from .model_api import forward_with_r
from .sampling import SamplingSettings, generation_samples
from .stats import nanmean
from .verdict import GENERATION_METRICS, build_tests, minimum_effects, verdict

MODES = ("phases", "omega", "pattern")
# (phase, done, total): progress of the long loops, for a display
Advance = Callable[[str, int, int], None]
OMEGA_GRID = np.round(np.arange(0.0, 3.0001, 0.05), 2)
_OMEGA_BISECTION_STEPS = 24


@dataclass(kw_only=True)
class InterveneSettings(SamplingSettings):
    targets: list[float]
    layers: list[int] | None = None  # None = every layer
    mode: str = "phases"
    alpha: float = 0.01
    min_effect: float = 0.01  # nats: the smallest mean KL or |delta CE| that counts as a change
    # The smallest change of a text metric that counts: the metrics are fractions in [0, 1], and
    # 0.05 is more than one token's worth of distinct-1 in a 32-token text (1/32 = 0.031); for
    # length, the same fraction of max_tokens.
    min_text_effect: float = 0.05
    eval_tokens: int = 2048  # teacher-forced tokens at most
    window: int = 256  # teacher-forced forward length (capped by max_positions)
    segment: int = 32  # teacher-forced positions per statistical observation

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if not self.targets:
            raise ValueError("give at least one target R")
        for r in self.targets:
            check_target(r)
        for name in ("min_effect", "min_text_effect"):
            value = getattr(self, name)
            if not (0.0 <= value < math.inf):  # also rejects NaN
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be a number >= 0, got {value}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")
        super().__post_init__()

    def minimums(self) -> dict[str, float]:
        return minimum_effects(self.min_effect, self.min_text_effect, self.max_tokens)


@dataclass
class Condition:
    name: str
    target_r: float | None  # None: the free-running control
    omega_scale: float | None = None  # omega mode: the pull/push factor s
    pattern: bool = False  # pattern mode: the original Phase-Mamba's phase pattern
    # filled by the measurements
    samples: list[dict] = field(default_factory=list)  # one per prompt x trial
    ce: list[float] = field(default_factory=list)  # teacher-forced, one per segment
    kl: list[float] = field(default_factory=list)
    r_sum: float = 0.0  # forced layers, teacher-forced positions
    r_count: int = 0
    r_max_error: float = 0.0

    @property
    def is_control(self) -> bool:
        return self.target_r is None

    @property
    def measured_r(self) -> float:
        return self.r_sum / self.r_count if self.r_count else math.nan

    def metric(self, name: str) -> list[float]:
        """Per-observation values: per sample (generation metrics) or segment (ce, kl)."""
        if name in ("ce", "kl"):
            return getattr(self, name)
        return [s["metrics"][name] for s in self.samples]

    def summary(self, control: Condition) -> dict[str, float]:
        names = (*GENERATION_METRICS, "R", "R_forced", "goldilocks")
        means = {m: nanmean(self.metric(m)) for m in names}
        means["identical_to_control"] = nanmean([s["identical"] for s in self.samples])
        means["ce"] = nanmean(self.ce)
        means["delta_ce"] = means["ce"] - nanmean(control.ce)
        means["kl"] = nanmean(self.kl)
        return means

    def to_dict(self, control: Condition) -> dict:
        return {
            "name": self.name,
            "target_r": self.target_r,
            "omega_scale": self.omega_scale,
            "measured_r": self.measured_r,
            "measured_r_generation": nanmean(self.metric("R_forced")),
            "r_max_abs_error": None if self.is_control else self.r_max_error,
            "metrics": self.summary(control),
            "teacher_forced": {"ce": self.ce, "kl": self.kl},
            "samples": self.samples,
        }


# ---------------------------------------------------------------------------- parsing


def check_target(r: float) -> None:
    if not (0.0 <= r <= 1.0):  # also rejects NaN
        raise ValueError(f"--force-r values must be in [0, 1], got {r}")


def parse_targets(text: str) -> list[float]:
    """'0.1,0.3,0.5' -> [0.1, 0.3, 0.5] (duplicates dropped, order kept)."""
    targets: list[float] = []
    for part in text.split(","):
        try:
            r = float(part)
        except ValueError:
            raise ValueError(f"--force-r: {part.strip()!r} is not a number") from None
        check_target(r)
        if r not in targets:
            targets.append(r)
    return targets


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'all' or a comma list of layer indices ('0,3') -> sorted indices."""
    if text.strip().lower() == "all":
        return list(range(n_layers))
    layers = set()
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"--layers: {part.strip()!r} is not a layer index") from None
        if not 0 <= i < n_layers:
            raise ValueError(f"--layers: no layer {i}; this model has layers 0..{n_layers - 1}")
        layers.add(i)
    return sorted(layers)


# ---------------------------------------------------------------------------- interventions


def _forced_layers_r(model, tokens: mx.array, layers: Sequence[int]) -> float:
    _, R = forward_with_r(model, tokens, key=mx.random.key(0))  # fixed noise, if any is drawn
    return float(mx.mean(R[..., list(layers)]))


def calibrate_omega_scale(
    model, layers: Sequence[int], target: float, tokens: mx.array, grid=OMEGA_GRID
) -> float:
    """The pull/push factor s whose mean forced-layer R on ``tokens`` is closest to target."""

    def r_at(s: float) -> float:
        with scaled_omega(model, layers, s):
            return _forced_layers_r(model, tokens, layers)

    gaps = np.array([r_at(s) for s in grid]) - target
    crossings = [i for i in range(len(grid) - 1) if gaps[i] == 0 or gaps[i] * gaps[i + 1] < 0]
    if not crossings:
        return float(grid[int(np.argmin(np.abs(gaps)))])
    i = min(crossings, key=lambda j: abs(grid[j] - 1.0))
    lo, hi, gap_lo = float(grid[i]), float(grid[i + 1]), gaps[i]
    for _ in range(_OMEGA_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        gap_mid = r_at(mid) - target
        if (gap_mid > 0) == (gap_lo > 0):
            lo, gap_lo = mid, gap_mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- measurements


def eval_windows(tokens: Sequence[int], window: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of ``window`` inputs (+1 target), from at most max_tokens tokens."""
    tokens = list(tokens[: max_tokens + 1])
    windows = [tokens[i : i + window + 1] for i in range(0, len(tokens) - 1, window)]
    return [w for w in windows if len(w) >= 2]


def packaged_eval_text() -> Path | None:
    """The validation split of the sample corpus shipped with the package, if there is one."""
    from ..data import corpus_folder

    found = sorted(corpus_folder().glob("valid*.txt"))
    return found[0] if found else None


def _log_probs(model, inputs: mx.array, force_r, key: mx.array) -> tuple[mx.array, mx.array]:
    logits, R = forward_with_r(model, inputs, key=key, force_r=force_r)
    logits = logits[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True), R[0]


def _segment_means(values: mx.array, segment: int) -> list[float]:
    """Means over consecutive runs of ``segment`` positions (the last run may be shorter)."""
    values = np.asarray(values, dtype=float)
    return [float(values[i : i + segment].mean()) for i in range(0, values.size, segment)]


def measure_teacher_forced(
    model,
    conditions: Sequence[Condition],
    layers: Sequence[int],
    windows,
    segment: int,
    advance: Advance | None = None,
) -> None:
    """Per segment: CE and KL(free || forced) of every condition; the forced layers' R.

    Each window's forward passes share one key, so a model that draws phase noise at eval
    draws the same noise in every condition: differences come from the intervention only.
    Likewise every condition of a window starts from the phases the free model had before it
    (a per_call Phase-Mamba core advances its phases once per call), and the free model
    carries its own phases on to the next window, as if the forced passes had not run.
    """
    for index, w in enumerate(windows):
        inputs, targets = mx.array([w[:-1]]), mx.array(w[1:])
        key = mx.random.key(index)
        before = core_phases(model)
        free_logp, free_R = _log_probs(model, inputs, None, key)
        after_free = core_phases(model)
        for cond in conditions:
            if cond.is_control:
                logp, R = free_logp, free_R
            else:
                restore_phases(model, before)
                with applied(model, cond, layers) as force_r:
                    logp, R = _log_probs(model, inputs, force_r, key)
            nll = -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
            kl = mx.sum(mx.exp(free_logp) * (free_logp - logp), axis=-1)
            R = R[:, list(layers)]
            mx.eval(nll, kl, R)
            cond.ce.extend(_segment_means(nll, segment))
            cond.kl.extend(_segment_means(kl, segment))
            cond.r_sum += float(mx.sum(R))
            cond.r_count += R.size
            if not cond.is_control:
                cond.r_max_error = max(cond.r_max_error, float(mx.max(mx.abs(R - cond.target_r))))
        restore_phases(model, after_free)
        if advance:
            advance("teacher-forced windows", index + 1, len(windows))


def measure_generations(
    model,
    conditions: Sequence[Condition],
    layers: Sequence[int],
    prompts: Sequence[Sequence[int]],
    settings: InterveneSettings,
    stop_tokens: Sequence[int] = (),
    advance: Advance | None = None,
) -> None:
    """Generate every prompt x trial in every condition with the same seeds; fill samples.
    Every condition starts from the same saved core phases (see measure_teacher_forced); the
    model is left with them."""
    done, total = 0, len(conditions) * len(prompts)
    start = core_phases(model)

    def one_prompt_done() -> None:
        nonlocal done
        done += 1
        if advance:
            advance("generations (prompts x conditions)", done, total)

    for cond in conditions:
        restore_phases(model, start)
        with applied(model, cond, layers) as force_r:
            cond.samples = generation_samples(
                model, prompts, settings, force_r, stop_tokens, one_prompt_done
            )
        for sample in cond.samples:
            forced = [sample["R_layers"][i] for i in layers] if sample["R_layers"] else []
            sample["metrics"]["R_forced"] = nanmean(forced)
    restore_phases(model, start)
    control = conditions[0]
    for cond in conditions:
        for sample, ref in zip(cond.samples, control.samples, strict=True):
            sample["identical"] = sample["tokens"] == ref["tokens"]


# ---------------------------------------------------------------------------- driver


def make_conditions(
    model, settings: InterveneSettings, layers: Sequence[int], calibration: mx.array
) -> list[Condition]:
    conditions = [Condition("control", None)]
    for r in settings.targets:
        scale = None
        if settings.mode == "omega":
            scale = calibrate_omega_scale(model, layers, r, calibration)
        conditions.append(Condition(f"R={r:g}", r, scale, pattern=settings.mode == "pattern"))
    return conditions


def run_intervention(
    model,
    prompts: Sequence[Sequence[int]],
    eval_tokens: Sequence[int],
    settings: InterveneSettings,
    stop_tokens: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
    advance: Advance | None = None,
) -> dict:
    """Run the whole experiment; returns a JSON-ready result (see module docstring).

    ``progress(message)`` announces each phase; ``advance(phase, done, total)`` reports the
    progress of the teacher-forced pass and of the generations."""
    layers = settings.layers if settings.layers is not None else list(range(model.n_banks))
    window = min(settings.window, model.max_positions or settings.window)
    windows = eval_windows(eval_tokens, window, settings.eval_tokens)
    if not windows:
        raise ValueError("the evaluation text has fewer than 2 tokens")
    if progress and settings.mode == "omega":
        progress("calibrating omega scales")
    conditions = make_conditions(model, settings, layers, mx.array([windows[0][:-1]]))
    if progress:
        progress(f"teacher-forced: {len(windows)} windows of up to {window} tokens")
    measure_teacher_forced(model, conditions, layers, windows, settings.segment, advance)
    if progress:
        progress(f"generating: {len(prompts)} prompts x {settings.trials} trials per condition")
    measure_generations(model, conditions, layers, prompts, settings, stop_tokens, advance)
    tests = build_tests(conditions)
    control = conditions[0]
    decision = verdict(tests, conditions, settings.alpha, settings.minimums())  # sets outcomes
    return {
        "experiment": "intervene",
        "settings": {
            **asdict(settings),
            "layers": layers,
            "window": window,
            "n_windows": len(windows),
            "n_segments": len(control.ce),
            "n_prompts": len(prompts),
        },
        "conditions": [c.to_dict(control) for c in conditions],
        "tests": [t.to_dict() for t in tests],
        "verdict": decision,
    }
