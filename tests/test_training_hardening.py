"""Training under careless or hostile conditions (issue 10): damaged checkpoints, a full disk,
non-finite streaks, a stop between micro-batches, out-of-range token ids, bad flags."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from training_helpers import MODEL_FLAGS, RUN_FLAGS, args_for, inject_nan, rows
from training_helpers import token_data as token_data  # the module-scoped fixture
from typer.testing import CliRunner

from mlx_kssm import run_folder, trainer, training
from mlx_kssm.cli.app import app
from mlx_kssm.data import DataError, prepare_tokens, resolve_source, write_token_folder
from mlx_kssm.run_folder import checkpoint_dirs, load_trainer_state
from mlx_kssm.training import TrainingInputError, TrainingStopped, run_training


def one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_a_damaged_newest_checkpoint_is_skipped_on_resume(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=8, decay_steps=12))
    newest = checkpoint_dirs(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a crash or a full disk
    said = []
    ckpt = training.find_checkpoint(True, out, said.append)
    assert ckpt == checkpoint_dirs(out)[-2] and "damaged checkpoint step_00000008" in said[0]


def test_every_checkpoint_damaged_is_one_line(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=4))
    for ckpt in checkpoint_dirs(out):
        (ckpt / "trainer_state.json").write_text("{not json")
    with pytest.raises(TrainingInputError, match="damaged"):
        training.find_checkpoint(True, out)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(
    token_data, tmp_path, monkeypatch
):
    real = run_folder.save_training_checkpoint
    calls = []

    def full_disk(target, *a, **kw):
        calls.append(target)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(target, *a, **kw)

    monkeypatch.setattr(trainer, "save_training_checkpoint", full_disk)
    with pytest.raises(TrainingStopped, match="No space left on device.*newest intact one"):
        run_training(*args_for(token_data, tmp_path / "run", steps=12))
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_00000004"]


def test_no_checkpoint_is_written_during_a_nonfinite_streak_and_resume_starts_afresh(
    token_data, tmp_path, monkeypatch
):
    inject_nan(monkeypatch, bad_steps={7})  # step 8's update is the bad one (0-based step 7)
    train, model = args_for(token_data, tmp_path / "run", steps=8, max_nonfinite=3)
    out = run_training(train, model)
    # step 8 ended a streak: its checkpoint would hold what the last good update left, but
    # "the last good checkpoint" must never be one written during a streak.
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004"]
    monkeypatch.undo()
    state = load_trainer_state(checkpoint_dirs(out)[-1])
    assert "nonfinite_in_row" not in state  # a resumed leg starts a new count


def test_a_stop_between_micro_batches_drops_the_step(token_data, tmp_path):
    train, model_args = args_for(token_data, tmp_path / "run", steps=4, grad_accum=2)
    data = prepare_tokens(resolve_source(str(token_data)))
    t = trainer.Trainer(train, model_args, data, tmp_path / "run")
    t.build()
    assert t.train_step(stop=lambda: True) is None  # asked to stop after micro-batch 1 of 2
    assert t.state.step == 0 and t.state.data_position == 0
    metrics = t.train_step(stop=lambda: False)
    assert metrics is not None and t.state.step == 1 and t.state.data_position == 8


def test_a_run_that_would_take_over_a_week_says_so(token_data, tmp_path):
    said = []
    train, model_args = args_for(token_data, tmp_path / "run", steps=10**7)

    class Fake:
        args, say, state = train, said.append, trainer.LoopState(step=1)

    training._warn_if_long(Fake, seconds=2.0)
    assert "over a week" in said[0] and "--preset small or tiny" in said[0]


@pytest.mark.parametrize("bad", [-1, -100_000_000, 128])
def test_token_ids_outside_the_vocabulary_are_refused_before_training(tmp_path, bad):
    stream = np.arange(2_000) % 100
    stream[777] = bad
    folder = write_token_folder(tmp_path / "t", {"train": stream, "valid": np.arange(300) % 100})
    train, model_args = args_for(folder, tmp_path / "run", steps=2)
    with pytest.raises(DataError, match=f"token id {bad}"):
        run_training(train, model_args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--n-layers", "0"], "n_layers is 0"),
        (["--hidden-dim", "0"], "hidden_dim is 0"),
        (["--beta2", "1.5"], "--beta2"),
    ],
)
def test_impossible_model_or_recipe_flags_are_one_line(token_data, tmp_path, flags, words):
    args = ["train", "--data", str(token_data), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args + RUN_FLAGS + MODEL_FLAGS + flags)
    assert words in one_line(result)
    assert not (tmp_path / "run").exists()


def test_a_dangling_symlink_out_is_one_line(token_data, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")
    args = ["train", "--data", str(token_data), "--out", str(link)]
    result = CliRunner().invoke(app, args + RUN_FLAGS + MODEL_FLAGS)
    assert "symlink" in one_line(result)
    assert not (tmp_path / "gone").exists()


def test_train_rows_name_the_models_metrics(token_data, tmp_path):
    out = run_training(*args_for(token_data, tmp_path / "run", steps=4))
    row = rows(out, "train")[0]
    for key in ("R", "R_layers", "u", "u_layers", "det", "det_layers", "reg", "seconds_per_step"):
        assert key in row, key
