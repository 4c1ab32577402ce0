"""Loading a model folder that is damaged or describes another model: one line, never a
traceback, and no model built from a config that could not describe one (issue 10)."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm.cli.app import app
from mlx_kssm.config import model_args_for
from mlx_kssm.io import ModelFolderError


@pytest.fixture
def folder(tmp_path):
    model = mlx_kssm.build_model(model_args_for("tiny", vocab_size=200))
    return mlx_kssm.save(model, tmp_path / "m")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"hidden_dim": "big"}, "hidden_dim must be int"),
        ({"hidden_dim": [64]}, "hidden_dim must be int"),
        ({"n_layers": None}, "n_layers must be int"),
        ({"n_layers": 2**63}, "n_layers is"),
        ({"n_layers": 1_000_000}, "must be in [1, 256]"),
        ({"bistable": "yes"}, "bistable must be bool"),
        ({"u_min": 20.0}, "u_min 20.0 must be below"),
        ({"model_type": "gpt9"}, "unknown model_type"),
        ({"hidden_dim": 128}, "from different models"),
        ({"n_layers": 3}, "weights the config needs are missing"),
    ],
)
def test_a_config_that_does_not_fit_is_one_line_and_quick(folder, changes, words):
    edit_config(folder, **changes)
    started = time.perf_counter()
    with pytest.raises(ModelFolderError, match=None) as err:
        mlx_kssm.load(folder)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - started < 30  # no model is built: ~0.1 s idle


def test_a_config_that_is_not_an_object_or_not_json(folder):
    for text in ("[1, 2]", "null", "{not json", "[" * 100_000):
        (folder / "config.json").write_text(text)
        with pytest.raises(ModelFolderError):
            mlx_kssm.load(folder)


@pytest.mark.parametrize("damage", ["truncated", "huge header", "bad offsets", "bad dtype"])
def test_damaged_weights_are_one_line(folder, damage):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "huge header":
        raw = b"\xff" * 8 + raw[8:]
    else:
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        if damage == "bad offsets":
            header[name]["data_offsets"] = [0, 10**12]
        else:
            header[name]["dtype"] = "Q99"
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + raw[8 + n :]
    path.write_bytes(raw)
    with pytest.raises(ModelFolderError, match="damaged") as err:
        mlx_kssm.load(folder)
    assert "\n" not in str(err.value)


def test_the_cli_says_it_in_one_line_with_exit_2(folder):
    edit_config(folder, hidden_dim="big")
    result = CliRunner().invoke(app, ["sample", "--model", str(folder), "--max-tokens", "2"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "hidden_dim must be int" in lines[0]
