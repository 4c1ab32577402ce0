"""`kssm sample / intervene / compare / ablate` end to end on tiny models, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import tiny_args
from test_ablate import make_run
from typer.testing import CliRunner

from mlx_kssm import Model, save
from mlx_kssm.cli.app import app
from mlx_kssm.generate import decode_tokens

runner = CliRunner()
TEXT = "The river flows through the old town. It was founded in 1820 by settlers. " * 4


def _tiny_cl100k_model(folder, seed: int):
    """The real vocabulary, so that text round-trips through the tokenizer; tiny otherwise."""
    mx.random.seed(seed)
    return save(Model(tiny_args(vocab_size=100_277)), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return _tiny_cl100k_model(root / "a", 0), _tiny_cl100k_model(root / "b", 1)


def kssm(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_greedy_sample_is_deterministic_and_writes_json(models, tmp_path):
    model = models[0]
    args = ("sample", "--model", model, "--prompt", "The river", "--temp", 0, "--max-tokens", 6)
    first, second = kssm(*args, "--json", tmp_path / "s.json"), kssm(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and first.stdout.startswith("The river")
    (gen,) = json.loads((tmp_path / "s.json").read_text())["generations"]
    assert 0 < len(gen["tokens"]) <= 6 and gen["text"] == decode_tokens(gen["tokens"])
    assert first.stdout.strip() == ("The river" + gen["text"]).strip()
    assert all(len(s["R_layers"]) == 2 and 0 <= s["U"] <= 1 for s in gen["steps"])


def test_show_r_prints_one_line_per_token(models):
    res = kssm("sample", "--model", models[0], "--prompt", "Hi", "--max-tokens", 4, "--show-r")
    lines = [line for line in res.stdout.splitlines() if " R=[" in line]
    assert res.exit_code == 0 and len(lines) == 4 and all("U=" in line for line in lines)


def test_intervene_hits_the_forced_r_and_writes_reports(models, tmp_path):
    text = tmp_path / "valid.txt"
    text.write_text(TEXT)
    out, report = tmp_path / "i.json", tmp_path / "i.md"
    res = kssm(
        "intervene",
        "--model",
        models[0],
        "--force-r",
        "0.96",
        "--trials",
        2,
        "--max-tokens",
        4,
        "--text",
        text,
        "--json",
        out,
        "--report",
        report,
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    control, forced = result["conditions"]
    assert control["target_r"] is None and forced["target_r"] == 0.96
    assert forced["measured_r"] == pytest.approx(0.96, abs=1e-3)
    assert {"U", "distinct_2", "repetition", "length", "kl", "delta_ce"} <= set(forced["metrics"])
    assert "VERDICT" in report.read_text() and "VERDICT" in res.stderr
    assert result["verdict"]["text"].startswith("VERDICT")
    # The minimum is stated in the verdict line and in the report, and can be set.
    assert "KL and |dCE| 0.01 nats" in result["verdict"]["text"]
    assert "`--min-effect`" in report.read_text() and "teacher-forced windows" in res.stderr


def test_compare_two_models(models, tmp_path):
    out, report = tmp_path / "c.json", tmp_path / "c.md"
    res = kssm(
        "compare", *models, "--trials", 2, "--max-tokens", 5, "--json", out, "--report", report
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [m["label"] for m in result["models"]] == ["A", "B"]
    assert {t["test"] for t in result["tests"]} == {"welch_t"}
    assert {"U", "distinct_2", "repetition"} <= {t["metric"] for t in result["tests"]}
    assert "Welch" in report.read_text()
    for t in result["tests"]:  # every difference with its interval and its verdict
        assert t["outcome"] in {"changed", "below minimum", "not significant", "untestable"}
        if t["n"] >= 4 and t["ci_low"] is not None:
            assert t["ci_low"] <= t["effect"] <= t["ci_high"]
    differ = {t["metric"] for t in result["tests"] if t["outcome"] == "changed"}
    assert set(result["verdict"]["differ"]) == differ
    assert "at least 0.05 (length 0.25 tokens)" in result["verdict"]["text"]


def test_ablate_compares_existing_runs(tmp_path):
    a, b = make_run(tmp_path / "a", True), make_run(tmp_path / "b", False)
    res = kssm("ablate", "--runs", a, b, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    for name in ("ablation.md", "ablation.csv", "ablation.png", "ablation.json"):
        assert (tmp_path / "out" / name).is_file()


@pytest.fixture
def bad_inputs(models, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    model = models[0]
    return {
        "negative temperature": ("sample", "--model", model, "--temp", -0.5),
        "missing model": ("sample", "--model", tmp_path / "nope"),
        "not a model": ("sample", "--model", tmp_path),
        "empty prompt file": ("sample", "--model", model, "--prompts", empty),
        "force-r above 1": ("intervene", "--model", model, "--force-r", "0.5,1.2"),
        "force-r below 0": ("intervene", "--model", model, "--force-r", "-0.1"),
        "unknown layer": ("intervene", "--model", model, "--layers", "0,5"),
        "unknown mode": ("intervene", "--model", model, "--mode", "bogus"),
        "negative minimum": ("intervene", "--model", model, "--min-effect", "-1"),
        "alpha of 1": ("intervene", "--model", model, "--alpha", "1"),
        "compare negative minimum": ("compare", model, model, "--min-text-effect", "-0.5"),
        "intervene empty prompts": ("intervene", "--model", model, "--prompts", empty),
        "compare missing model": ("compare", model, tmp_path / "nope"),
        "ablate without data": ("ablate", "--steps", 10),
        "ablate runs not runs": ("ablate", "--runs", tmp_path, tmp_path, "--out", tmp_path / "o"),
    }


def test_bad_input_is_one_line_and_exit_2(bad_inputs):
    for name, args in bad_inputs.items():
        res = kssm(*args)
        assert res.exit_code == 2, (name, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), name
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, res.stderr)


def test_cli_import_stays_light():
    code = (
        "import sys; import mlx_kssm.cli.app; "
        "heavy = [m for m in ('scipy', 'matplotlib', 'rich.table') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
