"""`kssm convert` on synthetic PyTorch K-SSM v3 checkpoints (written without torch): the layouts
it reads, half-precision and big-endian sources, and the AdamW training state it carries over
(or the note saying why it left the state out).

The fixture written by the real PyTorch code is covered by test_fixture_parity.py; inputs that
are not this model's checkpoints by test_convert_inputs.py; the output folder and the command
line by test_convert_output.py."""

from __future__ import annotations

import json
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args
from convert_helpers import (
    assert_same_weights,
    loaded_weights,
    run_cli,
    sgd_checkpoint,
    source_weights,
    state_dict,
    training_checkpoint,
)
from torch_zip_writer import tensor, torch_order, v3_tensor, write_checkpoint

import mlx_kssm
from mlx_kssm.checkpoints_convert.convert import convert
from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError
from mlx_kssm.run_folder import is_training_checkpoint, load_trainer_state

# -- what gets converted ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["state_dict", "best_model", "final_model", "checkpoint"])
def test_each_layout_converts_to_a_loadable_model(tmp_path, layout):
    weights = source_weights()
    obj = {
        "state_dict": state_dict(weights),
        "best_model": {"step": 7, "model_state": state_dict(weights), "val_loss": 9.5},
        "final_model": {"model_state": state_dict(weights), "final_stats": {"R": 0.5}},
        "checkpoint": training_checkpoint(weights),
    }[layout]
    report = convert(write_checkpoint(tmp_path / "src.pt", obj), tmp_path / "out")
    assert_same_weights(tmp_path / "out", weights)
    assert report.args == tiny_args()
    assert report.n_params == sum(w.size for w in weights.values())
    assert report.training_state == (layout == "checkpoint")
    assert is_training_checkpoint(tmp_path / "out") == (layout == "checkpoint")
    assert report.notes == []


def test_bistable_by_default_and_monostable_on_request(tmp_path):
    src = write_checkpoint(tmp_path / "src.pt", state_dict(source_weights()))
    convert(src, tmp_path / "bi")
    convert(src, tmp_path / "mono", monostable=True)
    assert json.loads((tmp_path / "bi" / "config.json").read_text())["bistable"] is True
    assert json.loads((tmp_path / "mono" / "config.json").read_text())["bistable"] is False
    assert mlx_kssm.load(tmp_path / "mono").args.bistable is False


def test_config_is_read_from_the_shapes(tmp_path):
    overrides = dict(vocab_size=97, hidden_dim=24, n_layers=3, n_oscillators=8, n_harmonics=5)
    overrides.update(max_positions=40, ffn_mult=2)
    weights = source_weights(**overrides)
    report = convert(write_checkpoint(tmp_path / "s.pt", state_dict(weights)), tmp_path / "o")
    assert report.args == tiny_args(**overrides)
    assert_same_weights(tmp_path / "o", weights)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sources_are_widened_exactly(tmp_path, dtype):
    weights = source_weights()
    src = write_checkpoint(tmp_path / "s.pt", state_dict(weights, dtype, location="mps"))
    report = convert(src, tmp_path / "out")
    if dtype == "float16":
        want = {k: v.astype(np.float16).astype(np.float32) for k, v in weights.items()}
    else:  # the test writer stores the top 16 bits of each float32
        want = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in weights.items()}
    assert_same_weights(tmp_path / "out", want)
    assert report.source_dtypes == [dtype] and report.locations == ["mps"]
    assert report.saved_dtype == "float32"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_option_stores_half_weights_without_training_state(tmp_path, dtype):
    weights = source_weights()
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(weights))
    report = convert(src, tmp_path / "out", dtype=dtype)
    stored = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {getattr(mx, dtype)}
    assert not report.training_state and not is_training_checkpoint(tmp_path / "out")
    assert any("training state is left out" in note for note in report.notes)
    got = loaded_weights(tmp_path / "out")["embed.weight"]
    np.testing.assert_allclose(got, weights["embed.weight"], rtol=1e-2)


# -- the training state -----------------------------------------------------------------------


def test_optimizer_moments_follow_named_parameters_order(tmp_path):
    weights = source_weights()
    convert(write_checkpoint(tmp_path / "s.pt", training_checkpoint(weights)), tmp_path / "out")
    state = mx.load(str(tmp_path / "out" / "optimizer.safetensors"))
    names = torch_order(2)
    assert set(state) == {"step", "learning_rate"} | {f"{n}.{k}" for n in names for k in "mv"}
    for index, name in enumerate(names):
        assert np.all(np.array(state[f"{name}.m"]) == index + 1), name
        np.testing.assert_allclose(np.array(state[f"{name}.v"]), (index + 1) / 1000, rtol=1e-7)
        assert state[f"{name}.m"].shape == weights[name].shape
    assert state["step"].item() == 3 and state["step"].dtype == mx.uint64
    assert state["learning_rate"].item() == pytest.approx(1e-3)


def test_trainer_state_records_step_schedule_and_history(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights(), step=3))
    convert(src, tmp_path / "out")
    trainer = load_trainer_state(tmp_path / "out")
    assert trainer["step"] == 3 and trainer["best_val_ce"] is None
    assert "data_position" not in trainer
    assert trainer["history"] == [{"step": 1, "train_ce": 5.5, "val_loss": 6.0, "val_R": 0.25}]
    assert trainer["train_args"] == {
        "lr": 2e-3,
        "beta1": 0.9,
        "beta2": 0.95,
        "adam_eps": 1e-8,
        "weight_decay": 0.1,
    }
    source = trainer["source"]
    assert source["converted_from"] == str(src.resolve())
    assert source["torch_lr_next"] == 1e-3 and source["best_val_loss"] == 6.0
    assert source["torch_scheduler"] == {"base_lrs": [2e-3], "last_epoch": 3, "lr_lambdas": [None]}


def edit_optimizer(ckpt, how):
    opt = ckpt["optimizer_state"]
    if how == "steps differ":
        opt["state"][5]["step"] = tensor(np.float32(2))
    elif how == "amsgrad":
        opt["param_groups"][0]["amsgrad"] = True
    elif how == "Adam with L2":
        opt["param_groups"][0]["decoupled_weight_decay"] = False
    elif how == "two lrs":
        group = opt["param_groups"][0]
        opt["param_groups"] = [
            {**group, "params": group["params"][:4]},
            {**group, "lr": 5e-4, "params": group["params"][4:]},
        ]
    elif how == "moment shape":
        opt["state"][3]["exp_avg"] = tensor(np.zeros(7, np.float32))
    elif how == "a parameter without state":
        del opt["state"][9]
    elif how == "betas not numbers":
        opt["param_groups"][0]["betas"] = {"b": [1]}
    elif how == "too few parameters":
        opt["param_groups"][0]["params"] = opt["param_groups"][0]["params"][:-1]
    return ckpt


@pytest.mark.parametrize(
    "how, message",
    [
        ("steps differ", "different AdamW step counts"),
        ("moment shape", "exp_avg of blocks.0.oscillators.delta_param"),
        ("a parameter without state", "missing: \\['blocks.0.norm1.bias'\\]"),
        ("betas not numbers", "hyperparameters are not numbers"),
        ("too few parameters", "holds 31 parameters, the model 32"),
    ],
)
def test_damaged_adamw_states_are_refused(tmp_path, how, message):
    ckpt = edit_optimizer(training_checkpoint(source_weights()), how)
    with pytest.raises(CheckpointError, match=message):
        convert(write_checkpoint(tmp_path / "s.pt", ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "how, reason",
    [
        ("amsgrad", "amsgrad"),
        ("Adam with L2", "Adam with L2 weight decay, not AdamW"),
        ("two lrs", "param groups have lr 0.0005, 0.001"),
    ],
)
def test_optimizers_mlx_cannot_continue_give_the_weights_only(tmp_path, how, reason):
    """A well-formed state MLX AdamW cannot continue: weights converted, the reason noted."""
    weights = source_weights()
    ckpt = edit_optimizer(training_checkpoint(weights), how)
    report = convert(write_checkpoint(tmp_path / "s.pt", ckpt), tmp_path / "out")
    assert_same_weights(tmp_path / "out", weights)
    assert not report.training_state and not is_training_checkpoint(tmp_path / "out")
    assert report.step == 3
    [note] = report.notes
    assert note.startswith("training state left out: ") and reason in note
    assert note.endswith("the weights are converted")


def test_an_sgd_state_converts_the_weights_and_says_why_not_the_state(tmp_path):
    weights = source_weights()
    src = write_checkpoint(tmp_path / "s.pt", sgd_checkpoint(weights))
    result = run_cli(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "note: training state left out: the optimizer is SGD, not AdamW" in result.stdout
    assert "not numbers" not in result.output
    assert "weights of step 5 only: the training state was left out" in result.stdout
    assert_same_weights(tmp_path / "out", weights)
    assert not is_training_checkpoint(tmp_path / "out")


def test_numpy_scalars_in_the_history_are_read_as_numbers(tmp_path):
    """Valid files log np.float64 losses; they are rebuilt as numbers, nothing else of numpy."""
    ckpt = training_checkpoint(source_weights())
    ckpt["history"] = [{"step": np.int64(1), "val_loss": np.float64(6.5), "ok": np.bool_(True)}]
    ckpt["best_val_loss"] = np.float32(6.25)
    convert(write_checkpoint(tmp_path / "s.pt", ckpt), tmp_path / "out")
    trainer = load_trainer_state(tmp_path / "out")
    assert trainer["history"] == [{"step": 1, "val_loss": 6.5, "ok": True}]
    assert trainer["source"]["best_val_loss"] == 6.25


@pytest.mark.parametrize("dtype", ["uint16", "float8_e4m3fn"])
def test_newer_torch_dtypes_get_an_honest_message(tmp_path, dtype):
    state = state_dict(source_weights())
    state["blocks.0.norm1.bias"] = v3_tensor(
        np.zeros(32, np.uint16 if dtype == "uint16" else np.uint8), dtype
    )
    with pytest.raises(CheckpointError) as err:
        convert(write_checkpoint(tmp_path / "s.pt", state), tmp_path / "out")
    message = str(err.value)
    assert f"unsupported dtype {dtype} for tensor blocks.0.norm1.bias" in message
    assert "refused" not in message and "never needs" not in message


def test_newer_dtypes_outside_the_weights_do_not_matter(tmp_path):
    weights = source_weights()
    ckpt = {
        "model_state": state_dict(weights),
        "mask": v3_tensor(np.arange(4, dtype=np.uint16), "uint16"),
    }
    report = convert(write_checkpoint(tmp_path / "s.pt", ckpt), tmp_path / "out")
    assert_same_weights(tmp_path / "out", weights)
    assert report.notes == ["ignored unknown top-level key(s): mask"]


def test_big_endian_checkpoints_convert_with_a_note(tmp_path):
    weights = source_weights()
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(weights), byteorder="big")
    report = convert(src, tmp_path / "out")
    assert_same_weights(tmp_path / "out", weights)
    assert report.training_state
    assert "saved big-endian: its values were byte-swapped to little-endian" in report.notes[0]
    state = mx.load(str(tmp_path / "out" / "optimizer.safetensors"))
    assert np.all(np.array(state["embed.weight.m"]) == 2)


def test_a_byteorder_record_that_lies_is_refused(tmp_path):
    """Little-endian data labelled "big": converting it would give byte-swapped garbage."""
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    with zipfile.ZipFile(src) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    members["archive/byteorder"] = b"big"
    liar = tmp_path / "liar.pt"
    with zipfile.ZipFile(liar, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    result = run_cli(liar, tmp_path / "out")
    assert result.exit_code == 2
    assert "byteorder record says big-endian, but the weights only make sense" in result.stderr
    assert not (tmp_path / "out").exists()
