"""Training: schedule, exact resume (k + resume to n == n straight, after --steps k, Ctrl+C or
kill -9), checkpoints and best/, the lock. Non-finite steps and bad input at the CLI are covered
by test_training_errors.py.

Every run here is a tiny model (vocabulary 128) on synthetic tokens so that it takes seconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from training_helpers import MODEL_FLAGS, RUN_FLAGS, args_for, resume_cli, rows
from training_helpers import token_data as token_data  # the module-scoped fixture
from typer.testing import CliRunner

from mlx_kssm import load, training
from mlx_kssm.cli.app import app
from mlx_kssm.config import TrainArgs
from mlx_kssm.io import checkpoint_dirs
from mlx_kssm.run_folder import load_trainer_state
from mlx_kssm.steps import resolve_head_backend
from mlx_kssm.training import TrainingInputError, learning_rate, resolve_args, run_training


def final_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """Weights and optimizer state of a run's newest checkpoint."""
    ckpt = checkpoint_dirs(run_dir)[-1]
    arrays = {f"model.{k}": v for k, v in mx.load(str(ckpt / "model.safetensors")).items()}
    arrays.update({f"opt.{k}": v for k, v in mx.load(str(ckpt / "optimizer.safetensors")).items()})
    return {k: np.array(v) for k, v in arrays.items()}


def assert_identical(run_a: Path, run_b: Path) -> None:
    a, b = final_arrays(run_a), final_arrays(run_b)
    assert a.keys() == b.keys() and len(a) > 30
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst == 0.0


# --------------------------------------------------------------------------- schedule


def test_schedule_warmup_then_cosine_to_zero():
    lr = lambda t: float(learning_rate(t, lr=1.0, warmup=10, decay_steps=110))  # noqa: E731
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.5, abs=1e-6)  # half way down the cosine
    assert lr(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)), abs=1e-6)
    assert lr(110) == pytest.approx(0.0, abs=1e-7) and lr(500) == pytest.approx(0.0, abs=1e-7)
    flat = float(learning_rate(50, lr=2.0, warmup=10, decay_steps=110, schedule="constant"))
    assert flat == 2.0


def test_adamw_takes_the_schedule_at_its_update_count():
    """Update k (0-based) uses the schedule at k, like torch's LambdaLR."""
    schedule = training.make_schedule(TrainArgs(lr=1.0, warmup=4, steps=20))
    opt = optim.AdamW(learning_rate=schedule, bias_correction=True)
    params = {"w": mx.zeros((3,))}
    seen = []
    for _ in range(6):
        params = opt.apply_gradients({"w": mx.ones((3,))}, params)
        seen.append(float(opt.state["learning_rate"]))
    assert seen == pytest.approx([float(schedule(k)) for k in range(6)])
    assert seen[0] == 0.0


# --------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("head", ["mlx", "numpy"])
def test_steps_k_then_resume_to_n_equals_n_straight(token_data, tmp_path, head):
    n, k = 14, 6
    run = dict(grad_accum=2, head=head)
    straight = run_training(*args_for(token_data, tmp_path / "straight", steps=n, **run))
    # First leg: --steps k with the full run's schedule; second leg: --resume --steps n.
    legs = tmp_path / "legs"
    run_training(*args_for(token_data, legs, steps=k, decay_steps=n, **run))
    train, model = resolve_args(None, {"out": str(legs), "steps": n}, {}, resume=True)
    assert train.decay_steps == n and train.grad_accum == 2  # recorded by the first leg
    assert train.head == head
    run_training(train, model, resume=True)
    assert_identical(straight, legs)
    # The log holds each step once, as if the run had never stopped.
    steps = [r["step"] for r in rows(legs, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == n
    # The same evaluations, to the bit (the first leg also evaluated at its last step, k).
    leg_evals = {r["step"]: r["val_ce"] for r in rows(legs, "eval")}
    assert {r["step"]: r["val_ce"] for r in rows(straight, "eval")}.items() <= leg_evals.items()
    assert set(leg_evals) == {4, 8, 12, 14, k}


def cli_command(token_data, out, *extra) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from mlx_kssm.cli.app import main; main()",
        "train",
        "--data",
        str(token_data),
        "--out",
        str(out),
        *RUN_FLAGS,
        *MODEL_FLAGS,
        "--steps",
        "100000",
        "--decay-steps",
        "60",
        *extra,
    ]


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def trained_steps(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in rows(run_dir, "train")), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9"])
def test_interrupted_run_resumes_exactly(token_data, tmp_path, how):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_command(token_data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if how == "ctrl-c":
        wait_for(lambda: trained_steps(out) >= 6, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]  # saved and exited cleanly
        assert "stopped at step" in err
        assert not (out / "train.lock").exists()
    else:
        wait_for(lambda: len(checkpoint_dirs(out)) >= 2, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert (out / "train.lock").exists()  # left behind: the resume must take it over
    stopped_at = load_trainer_state(checkpoint_dirs(out)[-1])["step"]
    n = stopped_at + 7
    result = resume_cli(out, n)
    if how == "kill-9":
        assert "stale lock" in result.output
    straight = run_training(*args_for(token_data, tmp_path / "straight", steps=n, decay_steps=60))
    assert load_trainer_state(checkpoint_dirs(out)[-1])["step"] == n
    assert_identical(straight, out)
    steps = [r["step"] for r in rows(out, "train")]
    assert steps == sorted(set(steps))  # rows logged after the last checkpoint were dropped


def test_first_ctrl_c_asks_to_stop_and_rearms_the_default_so_a_second_one_kills():
    before = signal.getsignal(signal.SIGINT)
    with training.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # handled here, at the next bytecode
        assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # the next one ends the process
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------- run folder


def test_run_folder_checkpoints_best_and_metrics(token_data, tmp_path):
    # The published loss (CE + 0.5 reg; the tiny preset alone trains on CE): its rows add up.
    out = run_training(*args_for(token_data, tmp_path / "run", steps=12, lambda_reg=0.5))
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000008", "step_00000012"]
    state = load_trainer_state(checkpoint_dirs(out)[-1])
    assert state["step"] == 12 and state["data_position"]["windows"] == 12 * 4
    assert state["train_args"]["steps"] == 12 and state["rng"]["seed"] == 42

    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [4, 8, 12]
    for row in evals:
        assert len(row["val_R_layers"]) == len(row["val_u_layers"]) == 2
        assert len(row["val_det_layers"]) == 2 and isinstance(row["sample"], str)
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_ce"]))
        assert row["val_loss"] == pytest.approx(row["val_ce"] + 0.5 * row["val_reg"])
    assert evals[-1]["val_ce"] < math.log(128)  # it learns the synthetic rule
    best = min(evals, key=lambda r: r["val_ce"])
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]
    train_rows = rows(out, "train")
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    keys = {"loss", "ce", "reg", "R", "lr", "tokens_per_s", "u_layers", "grad_norm"}
    assert keys <= set(train_rows[0])

    config = json.loads((out / "train_config.json").read_text())
    assert config["train"]["steps"] == 12 and config["model"]["hidden_dim"] == 32
    assert config["aux_loss"] == {"name": "reg", "weight": 0.5}
    assert config["train"]["head"] == "auto" and config["head"] == resolve_head_backend("auto")

    # load(RUN) takes the newest checkpoint's weights; RUN/best the best ones.
    newest = mx.load(str(checkpoint_dirs(out)[-1] / "model.safetensors"))
    loaded = dict(tree_flatten(load(out).parameters()))
    assert all(np.array_equal(np.array(newest[k]), np.array(v)) for k, v in loaded.items())
    load(out / "best")


def test_monostable_default_lambda_is_zero(token_data, tmp_path):
    train, model = args_for(token_data, tmp_path / "mono", steps=4)
    model.bistable = False
    out = run_training(train, model)
    row = rows(out, "eval")[-1]
    assert row["val_loss"] == row["val_ce"]


def test_resume_of_a_converted_checkpoint_without_data_position(token_data, tmp_path):
    """A PyTorch-converted checkpoint: partial train_args, no data position."""
    first = run_training(*args_for(token_data, tmp_path / "first", steps=4))
    converted = tmp_path / "converted" / "step_00000004"
    shutil.copytree(checkpoint_dirs(first)[-1], converted)
    state = {
        "step": 4,
        "best_val_ce": None,
        "history": [],
        "train_args": {"lr": 1e-2, "steps": 100},
        "source": {"torch_lr_next": 0.01},
    }
    (converted / "trainer_state.json").write_text(json.dumps(state))
    new = tmp_path / "newrun"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--resume",
            str(converted),
            "--out",
            str(new),
            "--data",
            str(token_data),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--seq-length",
            "16",
            "--eval-every",
            "3",
            "--eval-batches",
            "1",
            "--sample-tokens",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "data order starts afresh" in result.output
    assert load_trainer_state(checkpoint_dirs(new)[-1])["step"] == 6
    assert [p.name for p in (tmp_path / "converted").iterdir()] == ["step_00000004"]


# --------------------------------------------------------------------------- the lock


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(token_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "train.lock"
    host = os.uname().nodename
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "since": "now"}))
    with pytest.raises(TrainingInputError, match="being trained by pid"):
        run_training(*args_for(token_data, out, steps=2))
    assert lock.exists() and not (out / "metrics.jsonl").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": host, "since": "then"}))
    run_training(*args_for(token_data, out, steps=2))
    assert not lock.exists() and checkpoint_dirs(out)
