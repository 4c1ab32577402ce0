"""`kssm convert` on an original Phase-Mamba checkpoint (issue 12): the fixture written by the
original class becomes a phase_mamba model folder on a given base, with its training state,
and `kssm train --resume` continues it; bad input is one line and exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from phase_helpers import write_base
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm.checkpoints_convert.torch_zip import read_checkpoint
from mlx_kssm.cli.app import app
from mlx_kssm.data import write_token_folder
from mlx_kssm.models.phase_base import random_base
from mlx_kssm.run_folder import load_trainer_state
from mlx_kssm.training import resolve_args, run_training

SOURCE = FIXTURES / "torch-phase-core" / "step_000003.pt"
V3_SOURCE = FIXTURES / "torch-v3-tiny" / "checkpoint_12.pt"
VOCAB, LAYERS = 61, 3
runner = CliRunner()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        48: write_base(root / "b48", random_base(VOCAB, 48, LAYERS, seed=1)),  # the core's width
        32: write_base(root / "b32", random_base(VOCAB, 32, LAYERS, seed=1)),
    }


@pytest.fixture(scope="module")
def original():
    if not SOURCE.is_file():
        pytest.fail(f"the Phase-Mamba fixture is missing ({SOURCE}); clone ../shared beside us")
    return read_checkpoint(SOURCE)


def kssm(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_the_original_checkpoint_converts_to_a_resumable_phase_mamba(original, bases, tmp_path):
    out = tmp_path / "pm"
    res = kssm("convert", SOURCE, out, "--base", bases[48])
    assert res.exit_code == 0, res.output
    assert "phase_mamba on" in res.stdout and "training state: step 3" in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    model = mlx_kssm.load(out)
    args = model.args
    assert (args.coupling, args.dynamics, args.hook_layers) == ("faithful", "per_call", [1])
    assert args.base_path == str(bases[48].resolve())
    state = original["phase_core_state"]
    for name, ref in state.items():
        ours = np.array(dict(mx.load(str(out / "model.safetensors")))[f"cores.0.{name}"])
        np.testing.assert_array_equal(ours, ref.numpy(), err_msg=name)
    np.testing.assert_array_equal(np.array(model.cores[0].phases), state["phases"].numpy())
    trainer = load_trainer_state(out)
    assert trainer["step"] == 3
    assert [row["step"] for row in trainer["history"]] == [1, 2, 3]  # metrics_history
    assert trainer["train_args"]["lr"] == pytest.approx(1e-4)
    assert trainer["train_args"]["weight_decay"] == pytest.approx(0.01)
    assert trainer["train_args"]["batch_size"] == 1 and trainer["train_args"]["steps"] == 500
    optimizer = mx.load(str(out / "optimizer.safetensors"))
    assert int(optimizer["step"]) == 3 and "cores.0.phases.m" not in optimizer
    torch_m = original["optimizer_state"]["state"][1]["exp_avg"].numpy()
    np.testing.assert_array_equal(np.array(optimizer["cores.0.to_phases.weight.m"]), torch_m)


def test_training_resumes_from_the_converted_checkpoint(bases, tmp_path):
    out = tmp_path / "pm"
    assert kssm("convert", SOURCE, out, "--base", bases[48]).exit_code == 0
    rng = np.random.default_rng(0)
    streams = {"train": rng.integers(0, VOCAB, 400), "valid": rng.integers(0, VOCAB, 100)}
    data = write_token_folder(tmp_path / "tokens", streams)
    overrides = dict(out=str(tmp_path / "run"), data=str(data), steps=5, seq_length=16)
    overrides |= dict(eval_every=5, eval_batches=1, sample_tokens=0, save_every=5, log_every=1)
    train, model_args = resolve_args(None, overrides, {}, resume=str(out))
    assert (train.batch_size, train.schedule, train.warmup) == (1, "constant", 0)
    assert train.lr == pytest.approx(1e-4) and model_args.model_type == "phase_mamba"
    run = run_training(train, model_args, resume=str(out))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [row["step"] for row in rows if row["kind"] == "train"]
    assert steps[0] == 4 and steps[-1] == 5  # continued after the original's step 3
    final = run / "checkpoints" / "step_00000005"
    assert int(mx.load(str(final / "optimizer.safetensors"))["step"]) == 5
    before = mx.load(str(out / "model.safetensors"))
    after = mx.load(str(final / "model.safetensors"))
    assert set(before) == set(after)
    moved = [k for k in before if not np.array_equal(np.array(before[k]), np.array(after[k]))]
    assert "cores.0.to_phases.weight" in moved and "cores.0.phases" in moved  # trained, advanced


def test_a_run_folder_converts_its_newest_step(bases, tmp_path):
    run = tmp_path / "phase_run"
    run.mkdir()
    shutil.copy(SOURCE, run / "step_000001.pt")
    shutil.copy(SOURCE, run / "step_000003.pt")
    res = kssm("convert", run, tmp_path / "pm", "--base", bases[48], "--hook-layers", "2")
    assert res.exit_code == 0, res.output
    assert "newest checkpoint step_000003.pt" in res.stdout
    assert mlx_kssm.load(tmp_path / "pm").args.hook_layers == [2]


def test_half_precision_leaves_the_training_state_out(bases, tmp_path):
    res = kssm("convert", SOURCE, tmp_path / "pm", "--base", bases[48], "--dtype", "float16")
    assert res.exit_code == 0, res.output
    assert "training state is left out" in res.stdout
    assert not (tmp_path / "pm" / "optimizer.safetensors").exists()
    assert mlx_kssm.load(tmp_path / "pm").cores[0].omega.dtype == mx.float16


def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(bases, tmp_path):
    out = tmp_path / "pm"
    one_line_error(kssm("convert", SOURCE, out), "Phase-Mamba checkpoint", "--base")
    one_line_error(kssm("convert", SOURCE, out, "--base", bases[32]), "width 48", "hidden_size 32")
    one_line_error(kssm("convert", SOURCE, out, "--base", tmp_path / "nowhere"), "does not exist")
    one_line_error(
        kssm("convert", SOURCE, out, "--base", bases[48], "--hook-layers", "7"), "outside"
    )
    one_line_error(
        kssm("convert", SOURCE, out, "--base", bases[48], "--hook-layers", "x"), "indices"
    )
    one_line_error(kssm("convert", SOURCE, out, "--base", bases[48], "--monostable"), "K-SSM v3")
    if V3_SOURCE.is_file():
        one_line_error(kssm("convert", V3_SOURCE, out, "--base", bases[48]), "not a Phase-Mamba")
    assert not out.exists() and not list(tmp_path.glob(".*pm*"))  # no folder, no temporaries
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    one_line_error(kssm("convert", SOURCE, out, "--base", bases[48]), "not empty", "--force")
    one_line_error(kssm("convert", SOURCE, out, "--base", bases[48], "--force"), "mine.txt")
    assert (out / "mine.txt").read_text() == "keep"
