"""`kssm convert` on synthetic PyTorch K-SSM v3 checkpoints (written without torch).

The fixture written by the real PyTorch code is covered by test_fixture_parity.py."""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args
from mlx.utils import tree_flatten
from torch_zip_writer import (
    Global,
    Reduce,
    Storage,
    Tensor,
    pickle_checkpoint,
    tensor,
    torch_order,
    v3_tensor,
    write_checkpoint,
    write_pickle_archive,
)
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm import Model
from mlx_kssm.checkpoints_convert.convert import convert
from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError
from mlx_kssm.checkpoints_convert.training_state import jsonable
from mlx_kssm.checkpoints_convert.v3_rules import parameter_shapes
from mlx_kssm.cli.app import app
from mlx_kssm.run_folder import is_training_checkpoint, load_trainer_state


def source_weights(**overrides) -> dict[str, np.ndarray]:
    """A tiny model's weights in PyTorch's named_parameters() order."""
    mx.random.seed(0)
    params = dict(tree_flatten(Model(tiny_args(**overrides)).parameters()))
    return {name: np.array(params[name]) for name in torch_order(tiny_args(**overrides).n_layers)}


def state_dict(weights, dtype="float32", location="cpu"):
    """What torch's model.state_dict() holds: the tied head shares embed.weight's storage."""
    state = collections.OrderedDict((k, tensor(v, dtype, location)) for k, v in weights.items())
    state["output_head.weight"] = state["embed.weight"]
    return state


def training_checkpoint(weights, step=3, lr=1e-3):
    """checkpoint_<step>.pt as the seed writes it; exp_avg of parameter i is filled with i + 1."""
    n = len(weights)
    moments = {
        i: {
            "step": tensor(np.float32(step)),
            "exp_avg": tensor(np.full(w.shape, i + 1, np.float32)),
            "exp_avg_sq": tensor(np.full(w.shape, (i + 1) / 1000, np.float32)),
        }
        for i, w in enumerate(weights.values())
    }
    group = {
        "lr": lr,
        "betas": (0.9, 0.95),
        "eps": 1e-8,
        "weight_decay": 0.1,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": True,
        "initial_lr": 2e-3,
        "params": list(range(n)),
    }
    return {
        "step": step,
        "model_state": state_dict(weights),
        "optimizer_state": {"state": moments, "param_groups": [group]},
        "scheduler_state": {"base_lrs": [2e-3], "last_epoch": step, "lr_lambdas": [None]},
        "history": [{"step": 1, "train_ce": 5.5, "val_loss": 6.0, "val_R": 0.25}],
        "best_val_loss": 6.0,
    }


def loaded_weights(folder) -> dict[str, np.ndarray]:
    """As float32 (numpy has no bfloat16; widening float16 is exact)."""
    params = tree_flatten(mlx_kssm.load(folder).parameters())
    return {k: np.array(v.astype(mx.float32)) for k, v in params}


def assert_same_weights(folder, weights):
    got = loaded_weights(folder)
    assert set(got) == set(weights)
    for name, want in weights.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


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


def sgd_checkpoint(weights, step=5):
    """What the seed would save had it trained with torch.optim.SGD(momentum=0.9)."""
    group = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0}
    group.update(nesterov=False, maximize=False, foreach=None, differentiable=False)
    group.update(fused=None, params=list(range(len(weights))))
    state = {
        i: {"momentum_buffer": tensor(np.zeros(w.shape))} for i, w in enumerate(weights.values())
    }
    ckpt = training_checkpoint(weights, step)
    ckpt["optimizer_state"] = {"state": state, "param_groups": [group]}
    return ckpt


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


# -- inputs that are not what they should be --------------------------------------------------


def test_another_models_names_are_listed(tmp_path):
    gpt = {
        "transformer.wte.weight": tensor(np.zeros((10, 4))),
        "transformer.h.0.attn.c_attn.weight": tensor(np.zeros((4, 12))),
        "lm_head.weight": tensor(np.zeros((10, 4))),
    }
    with pytest.raises(CheckpointError) as err:
        convert(write_checkpoint(tmp_path / "gpt.pt", gpt), tmp_path / "out")
    message = str(err.value)
    assert "do not map" in message
    for name in gpt:
        assert name in message


def test_unknown_names_beside_real_ones_are_listed(tmp_path):
    state = state_dict(source_weights())
    state["blocks.0.attention.weight"] = tensor(np.zeros(3))
    with pytest.raises(CheckpointError, match="1 name\\(s\\) do not map.*blocks.0.attention"):
        convert(write_checkpoint(tmp_path / "s.pt", state), tmp_path / "out")


def test_missing_parameter_is_named(tmp_path):
    state = state_dict(source_weights())
    del state["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointError, match="missing blocks.1.ffn.2.bias"):
        convert(write_checkpoint(tmp_path / "s.pt", state), tmp_path / "out")


def test_shape_mismatch_is_named(tmp_path):
    weights = source_weights()
    weights["blocks.1.norm2.bias"] = np.zeros(33, np.float32)
    with pytest.raises(CheckpointError, match=r"blocks.1.norm2.bias \(33,\) \(expected \(32,\)\)"):
        convert(write_checkpoint(tmp_path / "s.pt", state_dict(weights)), tmp_path / "out")


def test_output_head_must_be_tied(tmp_path):
    weights = source_weights()
    state = state_dict(weights)
    state["output_head.weight"] = tensor(weights["embed.weight"].copy())  # equal, not shared
    convert(write_checkpoint(tmp_path / "a.pt", state), tmp_path / "a")
    state["output_head.weight"] = tensor(weights["embed.weight"] + 1)
    with pytest.raises(CheckpointError, match="output_head.weight differs"):
        convert(write_checkpoint(tmp_path / "b.pt", state), tmp_path / "b")


def test_unknown_top_level_keys_are_reported(tmp_path):
    ckpt = {"step": 4, "model_state": state_dict(source_weights()), "ema": {}, "notes": "x"}
    report = convert(write_checkpoint(tmp_path / "s.pt", ckpt), tmp_path / "out")
    assert report.notes == ["ignored unknown top-level key(s): ema, notes"]


def nested(depth: int, shared: bool):
    """[[...[1.0]...]]: with ``shared``, each level holds the level below twice (pickle stores
    it once), so the file is tiny while the tree has 2**depth leaves."""
    value = [1.0]
    for _ in range(depth):
        value = [value, value] if shared else [value]
    return value


@pytest.mark.parametrize(
    "shared, depth, message",
    [(True, 40, "expands to more than 4,000,000 values"), (False, 200, "deeper than 100 levels")],
)
def test_a_history_that_would_explode_is_refused(tmp_path, shared, depth, message):
    ckpt = training_checkpoint(source_weights())
    ckpt["history"] = nested(depth, shared)
    src = write_checkpoint(tmp_path / "s.pt", ckpt)
    with pytest.raises(CheckpointError, match=message):
        convert(src, tmp_path / "out")


def test_the_json_walk_has_its_own_bound(monkeypatch):
    """A second line of defence behind the reader's limits."""
    monkeypatch.setattr("mlx_kssm.checkpoints_convert.training_state._JSON_VALUES", 1000)
    with pytest.raises(CheckpointError, match="history is too large or too deeply nested"):
        jsonable(nested(12, shared=True), "history")
    assert jsonable(nested(8, shared=True), "history") == nested(8, shared=True)


def test_state_dict_keys_must_be_names(tmp_path):
    state = state_dict(source_weights())
    state[7] = tensor([1.0])
    with pytest.raises(CheckpointError, match="not name -> tensor: \\['7'\\]"):
        convert(write_checkpoint(tmp_path / "s.pt", state), tmp_path / "out")


def test_a_non_checkpoint_pickle_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="neither a K-SSM checkpoint"):
        convert(write_checkpoint(tmp_path / "s.pt", {"a": 1, "b": [2]}), tmp_path / "out")
    with pytest.raises(CheckpointError, match="holds a list"):
        convert(write_checkpoint(tmp_path / "l.pt", [1, 2]), tmp_path / "out")


def test_run_folder_uses_its_newest_numbered_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step, folder in [(2, run), (10, run / "checkpoints"), (9, run)]:
        weights = source_weights()
        weights["final_norm.bias"] = np.full(32, step, np.float32)  # tells them apart
        write_checkpoint(folder / f"checkpoint_{step}.pt", training_checkpoint(weights, step))
    write_checkpoint(run / "best_model.pt", {"step": 1, "model_state": state_dict(weights)})
    report = convert(run, tmp_path / "out")
    assert report.source == run / "checkpoints" / "checkpoint_10.pt"  # 10 > 9 > 2, not by name
    assert "checkpoint_10.pt" in report.notes[0]
    assert loaded_weights(tmp_path / "out")["final_norm.bias"][0] == 10


def test_run_folder_without_numbered_checkpoints(tmp_path):
    write_checkpoint(tmp_path / "best_model.pt", {"model_state": state_dict(source_weights())})
    assert convert(tmp_path, tmp_path / "out").source.name == "best_model.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without checkpoint_<step>.pt"):
        convert(tmp_path / "empty", tmp_path / "out2")


def test_out_dir_is_only_replaced_with_force(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    convert(src, out)
    with pytest.raises(CheckpointError, match="not empty; pass --force"):
        convert(src, out, monostable=True)
    assert json.loads((out / "config.json").read_text())["bistable"] is True
    convert(src, out, monostable=True, force=True)
    assert json.loads((out / "config.json").read_text())["bistable"] is False
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty")  # an empty folder is fine without --force


def test_force_never_deletes_unrelated_files(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="thesis.tex"):
        convert(src, precious, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "s.pt"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A disk that fills up half-way through: an error, no OUT_DIR, no temporary folder."""
    real_save = mx.save_safetensors

    def fill_up(path, arrays, **kwargs):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half")
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        real_save(path, arrays, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", fill_up)
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    with pytest.raises(CheckpointError, match="cannot write .*out: .*Unable to write"):
        convert(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


# -- the command line: one-line errors, exit code 2, nothing written --------------------------


def run_cli(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def test_cli_converts_and_says_what_it_did(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    result = run_cli(src, tmp_path / "out", "--monostable")
    assert result.exit_code == 0, result.output
    assert "vocab 128, hidden 32, 2 layers" in result.stdout and "monostable" in result.stdout
    assert "training state: step 3, next lr 0.001" in result.stdout
    assert mlx_kssm.load(tmp_path / "out").args.bistable is False


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list, str]]:
    """label -> (the arguments after `convert`, a piece of the expected message)."""
    good = write_checkpoint(tmp_path / "good.pt", state_dict(source_weights()))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" + bytes(40))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    evil = pickle_checkpoint({"x": Global("posix", "system")})[0]
    evil = write_pickle_archive(tmp_path / "evil.pt", evil)
    other = write_checkpoint(tmp_path / "gpt.pt", {"lm_head.weight": tensor(np.zeros((4, 2)))})
    out = tmp_path / "out"
    return {
        "missing file": ([tmp_path / "nope.pt", out], "does not exist"),
        "truncated": ([cut, out], "corrupt or truncated"),
        "legacy format": ([legacy, out], "re-save it with torch >= 1.6"),
        "hostile": ([evil, out], "posix.system"),
        "another model": ([other, out], "do not map to this model: lm_head.weight"),
        "non-empty OUT_DIR": ([good, busy], "pass --force"),
        "bad dtype": ([good, out, "--dtype", "int8"], "float16, bfloat16"),
    }


@pytest.mark.parametrize(
    "label",
    [
        "missing file",
        "truncated",
        "legacy format",
        "hostile",
        "another model",
        "non-empty OUT_DIR",
        "bad dtype",
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, label):
    args, message = bad_inputs(tmp_path)[label]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no OUT_DIR, no temp folder


def test_hostile_file_in_a_real_process(tmp_path):
    """The installed entry point itself: exit code 2, one line, the payload never runs."""
    marker = tmp_path / "pwned"
    payload = Reduce(eval, f"open({str(marker)!r}, 'w').close()")
    evil = write_pickle_archive(tmp_path / "evil.pt", pickle.dumps(payload, fix_imports=False))
    code = "from mlx_kssm.cli.app import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "convert", str(evil), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "builtins.eval" in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- the output folder: written aside, renamed in, nothing lost --------------------------------


def appearing_out(monkeypatch, out: Path, **files):
    """Make ``out`` appear (with ``files``) while the conversion writes its temporary folder."""
    import mlx_kssm.checkpoints_convert.convert as module

    real = module.write_model_files

    def write_and_race(model, folder, dtype=None):
        real(model, folder, dtype=dtype)
        out.mkdir(exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)

    monkeypatch.setattr(module, "write_model_files", write_and_race)


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_appearing_at_out_during_conversion_is_kept(tmp_path, monkeypatch, force):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    appearing_out(monkeypatch, out, **{"notes.txt": "mine"})
    result = run_cli(src, out, *(["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert ("--force" if force else "left untouched") in result.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == {"notes.txt": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.pt"]  # no temporaries


def test_an_empty_out_filled_during_conversion_is_kept(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    out = tmp_path / "out"
    out.mkdir()
    appearing_out(monkeypatch, out, **{"draft.md": "keep"})
    with pytest.raises(CheckpointError, match="created or filled by something else"):
        convert(src, out)
    assert (out / "draft.md").read_text() == "keep"


def test_a_conversion_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    """kill -9 while the temporary folder holds the weights; the next conversion removes it."""
    src = write_checkpoint(tmp_path / "s.pt", training_checkpoint(source_weights()))
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "import mlx_kssm.checkpoints_convert.convert as c\n"
        "real = c.write_model_files\n"
        "def stall(model, folder, dtype=None):\n"
        "    real(model, folder, dtype=dtype)\n"
        "    print(folder, flush=True)\n"
        "    time.sleep(120)\n"
        "c.write_model_files = stall\n"
        f"c.convert({str(src)!r}, {str(out)!r})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    leftover = Path(child.stdout.readline().strip())
    child.kill()  # SIGKILL: no cleanup handler runs
    child.wait(timeout=60)
    child.stdout.close()
    assert (leftover / "model.safetensors").is_file() and leftover.name.startswith(".out.tmp-")
    report = convert(src, out)
    assert report.training_state and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "s.pt"]


def test_a_symlinked_out_is_replaced_through_its_link(tmp_path):
    src = write_checkpoint(tmp_path / "s.pt", state_dict(source_weights()))
    real = tmp_path / "disk" / "model"
    convert(src, real)
    link = tmp_path / "out"
    link.symlink_to(real)
    convert(src, link, monostable=True, force=True)
    assert link.is_symlink() and json.loads((real / "config.json").read_text())["bistable"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out", "s.pt"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["model"]  # no .model.old-PID
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="symbolic link to a folder that does not exist"):
        convert(src, dangling)
    assert not (tmp_path / "nowhere").exists()


def test_a_fifo_source_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "s.pt"
    os.mkfifo(fifo)
    code = "from mlx_kssm.cli.app import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "convert", str(fifo), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "is a FIFO, not a checkpoint file" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_param_groups_that_repeat_one_long_list_are_refused_cheaply(tmp_path):
    """15,000 groups sharing one list of 15,000 indices: 225M values once expanded."""
    ckpt = training_checkpoint(source_weights())
    group = ckpt["optimizer_state"]["param_groups"][0]
    indices = list(range(15_000))
    ckpt["optimizer_state"]["param_groups"] = [{**group, "params": indices}] * 15_000
    src = write_checkpoint(tmp_path / "s.pt", ckpt)
    with pytest.raises(CheckpointError, match="more than 4,000,000 values"):
        convert(src, tmp_path / "out")


def one_storage_state(n_layers: int) -> dict:
    """Every weight a view of the same small storage: a file of kilobytes for a model of
    ``n_layers`` layers."""
    shapes = parameter_shapes(tiny_args(n_layers=n_layers))
    base = Storage(np.zeros(max(math.prod(s) for s in shapes.values()), np.float32))
    strides = {s: tuple(math.prod(s[i + 1 :]) for i in range(len(s))) for s in shapes.values()}
    return {name: Tensor(base, 0, s, strides[s]) for name, s in shapes.items()}


def test_weights_viewing_one_storage_over_and_over_are_refused(tmp_path):
    state = one_storage_state(400)
    src = write_checkpoint(tmp_path / "s.pt", state)
    model_bytes = 4 * sum(math.prod(t.shape) for t in state.values())
    assert model_bytes > 10 * src.stat().st_size  # what building the model would have cost
    with pytest.raises(CheckpointError, match="tensors view the same data over and over"):
        convert(src, tmp_path / "out")
