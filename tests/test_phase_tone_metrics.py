"""A Phase-Mamba's training logs the paper's tone of R beside R (issue 12): in every train and
eval row of metrics.jsonl and in the progress lines; models without a tone log none."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from phase_helpers import write_base
from rich.console import Console

from mlx_kssm.data import write_token_folder
from mlx_kssm.models.phase_base import random_base
from mlx_kssm.models.phase_tones import tone_of
from mlx_kssm.progress import model_labels
from mlx_kssm.training import resolve_args, run_training

VOCAB = 61


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    rng = np.random.default_rng(0)
    streams = {"train": rng.integers(0, VOCAB, 400), "valid": rng.integers(0, VOCAB, 100)}
    return write_token_folder(tmp_path_factory.mktemp("tone") / "tokens", streams)


def test_each_logged_step_and_eval_carries_the_tone_of_its_r(tokens, tmp_path):
    base = write_base(tmp_path / "base", random_base(VOCAB, 32, 3, seed=0))
    overrides = dict(out=str(tmp_path / "run"), data=str(tokens), steps=3, seq_length=16)
    overrides |= dict(batch_size=2, eval_every=3, eval_batches=1, sample_tokens=0)
    overrides |= dict(save_every=3, log_every=1, lr=0.05)
    model = dict(base_path=str(base), coupling="multiplicative")
    train, model_args = resolve_args("tiny", overrides, model, model_type="phase_mamba")
    screen = io.StringIO()
    run = run_training(train, model_args, console=Console(file=screen, width=300))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    trains = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [1, 2, 3] and len(evals) == 1
    for row in trains:
        assert row["tone"] == tone_of(row["R"])
    assert evals[0]["val_tone"] == tone_of(evals[0]["val_R"])
    lines = [ln for ln in screen.getvalue().splitlines() if re.match(r"step \d/3: ", ln)]
    assert len(lines) == 3
    for line, row in zip(lines, trains, strict=True):
        assert f"tone {row['tone']}" in line, line
    assert f"tone {evals[0]['val_tone']}" in screen.getvalue()


def test_labels_follow_r_and_are_absent_without_a_tone():
    from mlx_kssm.models.phase_mamba import Model

    class Plain:
        pass

    assert model_labels(Plain(), {"R": 0.5}) == {}
    assert model_labels(Model, {"R": 0.45, "U": 0.5}) == {"tone": "Goldilocks"}
    assert model_labels(Model, {"val_R": 0.95, "R": 0.1}, "val_") == {"val_tone": "over-sync"}
    assert model_labels(Model, {"ce": 6.0}) == {}  # no R, no tone
    assert model_labels(Model, {"R": float("nan")}) == {}
