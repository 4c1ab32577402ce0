"""Training when something goes wrong: non-finite steps (one is skipped and counted, a streak
stops the run and keeps the last checkpoint) and bad input at the CLI (one line, exit code 2,
nothing written), including resumes that change the schedule or start from an older checkpoint.

Every run here is the tiny model of training_helpers.py on synthetic tokens."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from training_helpers import MODEL_FLAGS, RUN_FLAGS, args_for, inject_nan, resume_cli, rows
from training_helpers import token_data as token_data  # the module-scoped fixture
from typer.testing import CliRunner

from mlx_kssm.cli.app import app
from mlx_kssm.config import TrainArgs
from mlx_kssm.data import write_token_folder
from mlx_kssm.io import checkpoint_dirs
from mlx_kssm.run_folder import load_trainer_state
from mlx_kssm.training import TrainingStopped, run_training

# --------------------------------------------------------------------------- non-finite


def test_a_nonfinite_step_is_skipped_and_counted(token_data, tmp_path, monkeypatch):
    inject_nan(monkeypatch, bad_steps={5})
    out = run_training(*args_for(token_data, tmp_path / "run", steps=8))
    assert sum(r["skipped"] for r in rows(out, "train")) == 1
    opt = mx.load(str(checkpoint_dirs(out)[-1] / "optimizer.safetensors"))
    assert int(opt["step"]) == 7  # 8 steps, one update skipped
    assert load_trainer_state(checkpoint_dirs(out)[-1])["nonfinite_total"] == 1


def test_nonfinite_steps_in_a_row_stop_and_keep_the_last_checkpoint(
    token_data, tmp_path, monkeypatch
):
    inject_nan(monkeypatch, bad_steps=set(range(5, 100)))
    train, model = args_for(token_data, tmp_path / "run", steps=20, max_nonfinite=3)
    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        run_training(train, model)
    out = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004"]
    assert rows(out)[-1] == {"kind": "stop", "step": 8, "reason": "nonfinite"}
    assert not (out / "train.lock").exists()


# --------------------------------------------------------------------------- bad input


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing data", "does not exist"),
        ("empty data", "is empty"),
        ("too little data", "too little training data"),
        ("seq over positions", "max_positions"),
        ("out under a file", "not a folder"),
        ("checkpoint without --resume", "only read with --resume"),
        ("nothing to resume", "nothing to resume"),
        ("unknown preset", "unknown preset"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    token_data, tmp_path, monkeypatch, case, words
):
    monkeypatch.setenv("KSSM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    data = str(token_data)
    extra = []
    if case == "missing data":
        data = str(tmp_path / "no-such-folder")
    elif case == "empty data":
        (tmp_path / "empty.txt").write_text("")
        data = str(tmp_path / "empty.txt")
    elif case == "too little data":
        data = str(
            write_token_folder(tmp_path / "small", {"train": np.arange(40), "valid": np.arange(40)})
        )
    elif case == "seq over positions":
        extra = ["--seq-length", "65"]
    elif case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    elif case == "checkpoint without --resume":
        extra = [str(tmp_path)]
    elif case == "nothing to resume":
        extra = ["--resume"]
    elif case == "unknown preset":
        extra = ["--preset", "huge"]
    args = ["train", "--data", data, "--out", str(out), *RUN_FLAGS, *MODEL_FLAGS, "--steps", "2"]
    if case == "unknown preset":
        args.remove("tiny")
        args.remove("--preset")
    result = CliRunner().invoke(app, args + extra)
    assert words in one_error_line(result)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=2))
    result = CliRunner().invoke(
        app, ["train", "--data", str(token_data), "--out", str(out), *RUN_FLAGS, *MODEL_FLAGS]
    )
    assert "--resume" in one_error_line(result)


def test_nonfinite_stop_at_the_cli_is_one_line_exit_1(token_data, tmp_path, monkeypatch):
    inject_nan(monkeypatch, bad_steps=set(range(100)))
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            str(token_data),
            "--out",
            str(tmp_path / "run"),
            *RUN_FLAGS,
            *MODEL_FLAGS,
            "--steps",
            "10",
            "--max-nonfinite",
            "2",
        ],
    )
    assert result.exit_code == 1
    assert "not finite for 2 steps in a row" in result.output


def test_every_train_args_field_and_the_pinned_flags_are_options():
    import dataclasses

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    flags = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainArgs)}
    flags |= {"--resume", "--monostable"}
    missing = [flag for flag in sorted(flags) if flag not in result.output]
    assert result.exit_code == 0 and not missing


def test_resume_with_a_longer_schedule_says_the_learning_rate_jumps(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=4))  # cosine ends at 4
    result = resume_cli(out, 8)
    assert "the schedule changed since the checkpoint" in result.output
    assert load_trainer_state(checkpoint_dirs(out)[-1])["step"] == 8


def test_resuming_an_older_checkpoint_of_a_run_must_branch_elsewhere(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=8))
    older = checkpoint_dirs(out)[0]  # step 4; step 8 exists
    result = CliRunner().invoke(app, ["train", "--resume", str(older), "--steps", "10"])
    assert "checkpoints after step_00000004" in one_error_line(result)
    branch = tmp_path / "branch"
    result = CliRunner().invoke(
        app, ["train", "--resume", str(older), "--out", str(branch), "--steps", "6"]
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in checkpoint_dirs(branch)] == ["step_00000006"]
