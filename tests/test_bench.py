"""`kssm bench`: a tiny real run writes the table and the JSON; bad options are one-line errors;
the PyTorch reference computes this package's model (when torch is installed)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_kssm.bench import Report, Row, blas_in_use, markdown
from mlx_kssm.cli.app import app

runner = CliRunner()


def test_tiny_bench_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.md"
    args = ["bench", "--config", "tiny", "--batch", "1", "--seq", "8", "--context", "8"]
    args += ["--new-tokens", "2", "--quick", "--no-torch", "--json", str(out)]
    result = runner.invoke(app, args + ["--markdown", str(table)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["train_tokens_per_s"] > 0 and data["peak_memory_bytes"] > 0
    rows = {(r["measurement"], r["path"]) for r in data["rows"]}
    assert ("train step", "reference") in rows and ("forward", "reference") in rows
    assert ("generation", "cached") in rows and ("generation", "recompute") in rows
    assert any(m.startswith("bank N=32 H=8, forward + backward") for m, _ in rows)
    assert any(m.startswith("scan D=128 N=16, forward") for m, _ in rows)
    assert all(r["tokens_per_s"] > 0 for r in data["rows"]), data["rows"]
    text = table.read_text()
    assert "| train step | tiny | reference | 1 x 8 |" in text
    assert "reference path only" in text  # this machine has no Metal, and says so
    assert data["machine"]["metal"] is False


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "huge"], "unknown preset 'huge'"),
        (["--seq", "0"], "--seq must be at least 1"),
        (["--seq", "5000"], "exceeds the published preset's 1024 positions"),
        (["--context", "1024"], "leaves no room"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--config", ","], "names no preset"),
    ],
)
def test_bad_options_are_one_line_errors(extra, message):
    result = runner.invoke(app, ["bench", *extra])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_json_path_that_is_a_folder_is_refused_before_running(tmp_path):
    result = runner.invoke(app, ["bench", "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


def test_blas_and_table_name_what_is_in_use(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 00000000 08:01 42    /venv/lib/libmkl_rt.so.3\n")
    monkeypatch.setenv("LD_PRELOAD", "/venv/lib/libmkl_rt.so.3")
    assert blas_in_use(str(maps)).startswith("Intel MKL, preloaded")
    # named in LD_PRELOAD but not mapped (the loader refused it): not claimed
    maps.write_text("7f00-7f10 r-xp 00000000 08:01 42    /usr/lib/libc.so.6\n")
    assert blas_in_use(str(maps)).startswith("MLX's bundled reference BLAS (Intel MKL")
    monkeypatch.delenv("LD_PRELOAD")
    assert "bundled" in blas_in_use(str(maps))
    machine = dict(
        platform="Linux x86_64", cpu="cpu", cores=2, date="d", mlx="0.32", device="cpu",
        metal=False, cuda=False, blas="b", torch="not installed", kernels="k",
    )  # fmt: skip
    row = Row("generation", "tiny", "recompute", "1 x 8", 0.0112, 89113.3, 3 << 20)
    text = markdown(Report(machine, {}, [row]))
    # a slow rate keeps three significant digits (it once printed as 0.0)
    assert "| generation | tiny | recompute | 1 x 8 | 0.0112 | 89,113.3 | 3.0 |" in text


def test_torch_reference_is_this_model():
    """With the same weights and no noise, the eager PyTorch v3 gives this package's logits."""
    torch = pytest.importorskip("torch")
    from conftest import tiny_args

    from mlx_kssm.bench_torch import TorchKSSMv3
    from mlx_kssm.models import build_model

    args = tiny_args(vocab_size=64, n_oscillators=8, n_harmonics=3)
    mx.random.seed(0)
    model = build_model(args)
    model.eval()
    reference = TorchKSSMv3(args)
    weights = dict(tree_flatten(model.parameters()))
    state = reference.state_dict()  # the same names: the converter relies on them too
    for name in state:
        state[name] = torch.tensor(np.array(weights[name]))
    reference.load_state_dict(state)
    for block in reference.blocks:
        block.oscillators.noise = False
    tokens = np.random.default_rng(0).integers(0, 64, (2, 7))
    want = np.array(model(mx.array(tokens)))
    with torch.no_grad():
        got, _ = reference(torch.tensor(tokens))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)
    assert sum(p.numel() for p in reference.parameters()) == sum(v.size for v in weights.values())
