"""`kssm convert` on inputs that are not what they should be: another model's names, missing,
misshapen or untied parameters, unknown keys, histories and optimizer states built to explode,
tensors viewing one storage over and over, a FIFO. Each is refused with a message naming the
problem (or converted with a note); and which checkpoint a run folder stands for."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from convert_helpers import (
    convert_in_a_process,
    loaded_weights,
    one_storage_state,
    source_weights,
    state_dict,
    training_checkpoint,
)
from torch_zip_writer import tensor, write_checkpoint

from mlx_kssm.checkpoints_convert.convert import convert
from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError
from mlx_kssm.checkpoints_convert.training_state import jsonable

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


def test_a_fifo_source_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "s.pt"
    os.mkfifo(fifo)
    proc = convert_in_a_process(fifo, tmp_path / "out", timeout=60)
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


def test_weights_viewing_one_storage_over_and_over_are_refused(tmp_path):
    state = one_storage_state(400)
    src = write_checkpoint(tmp_path / "s.pt", state)
    model_bytes = 4 * sum(math.prod(t.shape) for t in state.values())
    assert model_bytes > 10 * src.stat().st_size  # what building the model would have cost
    with pytest.raises(CheckpointError, match="tensors view the same data over and over"):
        convert(src, tmp_path / "out")
