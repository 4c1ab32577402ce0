"""The tiny training run shared by test_training*.py, test_training_hardening.py and
test_distributed.py: the model and run settings (as arguments and as CLI flags), synthetic
tokens a tiny model can learn, a run's metrics rows, and helpers that resume a run or make
chosen steps non-finite."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_kssm.cli.app import app
from mlx_kssm.config import model_args_for, train_args_for
from mlx_kssm.data import write_token_folder
from mlx_kssm.training import Trainer

MODEL = dict(
    vocab_size=128, hidden_dim=32, n_layers=2, n_oscillators=16, n_harmonics=4, max_positions=64
)
# The same settings as CLI flags, for the runs in a subprocess.
MODEL_FLAGS = [
    "--vocab-size",
    "128",
    "--hidden-dim",
    "32",
    "--n-layers",
    "2",
    "--n-oscillators",
    "16",
    "--n-harmonics",
    "4",
    "--max-positions",
    "64",
]
RUN = dict(
    preset="tiny",
    batch_size=4,
    seq_length=16,
    lr=1e-2,
    warmup=3,
    eval_every=4,
    eval_batches=2,
    save_every=4,
    keep_last=2,
    log_every=2,
    sample_tokens=4,
)
RUN_FLAGS = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--seq-length",
    "16",
    "--lr",
    "1e-2",
    "--warmup",
    "3",
    "--eval-every",
    "4",
    "--eval-batches",
    "2",
    "--save-every",
    "4",
    "--keep-last",
    "2",
    "--log-every",
    "2",
    "--sample-tokens",
    "4",
]


def synthetic_stream(n: int, seed: int) -> np.ndarray:
    """Mostly next = 3 * current + 1 (mod 128): something a bigram-like model can learn."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int32)
    out[0] = 1
    noise = rng.random(n) < 0.1
    for i in range(1, n):
        out[i] = rng.integers(128) if noise[i] else (3 * out[i - 1] + 1) % 128
    return out


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "tokens"
    return write_token_folder(
        folder, {"train": synthetic_stream(4_000, 0), "valid": synthetic_stream(600, 1)}
    )


def args_for(token_data, out, **overrides):
    """What `kssm train --preset tiny` with RUN_FLAGS and MODEL_FLAGS resolves to; overrides
    may replace any of those settings."""
    settings = {k: v for k, v in RUN.items() if k != "preset"}
    settings.update(data=str(token_data), out=str(out), **overrides)
    return train_args_for("tiny", **settings), model_args_for("tiny", **MODEL)


def rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def resume_cli(out: Path, steps: int):
    result = CliRunner().invoke(
        app, ["train", "--resume", "--out", str(out), "--steps", str(steps)]
    )
    assert result.exit_code == 0, result.output
    return result


def inject_nan(monkeypatch, bad_steps):
    real = Trainer.gradients

    def gradients(self, stop=None):
        terms, grads = real(self, stop)
        if self.state.step in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms, grads

    monkeypatch.setattr(Trainer, "gradients", gradients)
