"""The command line as a new user meets it: plain help with the real defaults, --version,
--print-config, one-line usage errors, the models that exist named when --model is wrong, and
`kssm sample` on a small vocabulary, with raw ids and with a model that does not mix positions."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import tiny_args
from typer.testing import CliRunner

from mlx_kssm import Model, save
from mlx_kssm.cli.app import app
from mlx_kssm.config import TRAIN_PRESETS, train_args_for

runner = CliRunner()
COMMANDS = ("train", "sample", "intervene", "ablate", "convert", "compare", "plot")


def kssm(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """Like the converted PyTorch fixture: a vocabulary of 512, without cl100k's end-of-text."""
    mx.random.seed(0)
    return save(Model(tiny_args(vocab_size=512)), tmp_path_factory.mktemp("m") / "small")


# ---------------------------------------------------------------------------- help, version


def test_help_lists_every_command_in_plain_text():
    res = kssm("--help")
    assert res.exit_code == 0
    for command in COMMANDS:
        assert f"  {command} " in res.stdout, command
    assert "╭" not in res.stdout and "<bool>" not in res.stdout


def test_version():
    from importlib.metadata import version

    res = kssm("--version")
    assert res.exit_code == 0 and res.stdout.startswith(f"kssm {version('mlx-kssm')} (MLX ")


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_type_and_no_none(command):
    res = kssm(command, "--help")
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.stdout and "None" not in res.stdout and "╭" not in res.stdout


def test_train_help_shows_each_presets_defaults():
    text = " ".join(kssm("train", "--help").stdout.split())  # undo the help's line wrapping
    lrs = ", ".join(f"{p} {train_args_for(p).lr:g}" for p in TRAIN_PRESETS)
    assert f"[default: {lrs}]" in text
    assert "--monostable / --bistable" in text and "--eval-noise / --no-eval-noise" in text
    assert f"[default: {train_args_for('tiny').keep_last}]" in text  # the same in every preset


def test_print_config_resolves_the_preset_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = kssm("train", "--preset", "tiny", "--lr", "0.01", "--monostable", "--print-config")
    assert res.exit_code == 0, res.output
    config = json.loads(res.stdout)
    tiny = train_args_for("tiny")
    assert config["train"]["lr"] == 0.01 and config["train"]["steps"] == tiny.steps
    assert config["model"]["bistable"] is False and config["model"]["n_layers"] == 2
    assert config["train"]["lambda_reg"] == 0.0  # resolved: monostable has no regulariser
    assert list(tmp_path.iterdir()) == []
    one_line_error(kssm("train", "--preset", "tiny", "--steps", "0", "--print-config"))


def test_the_tiny_preset_drops_the_kssm_regulariser_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for arch, expected in (("v3", 0.0), ("ssm", 0.0)):
        res = kssm("train", "--preset", "tiny", "--arch", arch, "--print-config")
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["train"]["lambda_reg"] == expected
    res = kssm("train", "--preset", "tiny", "--lambda-reg", "0.5", "--print-config")
    assert json.loads(res.stdout)["train"]["lambda_reg"] == 0.5  # the published loss, on request
    assert train_args_for("tiny", "phase_mamba").lambda_reg is None  # its U weight is its own
    assert train_args_for("published").lambda_reg is None
    # A Phase-Mamba with neither a base nor a vocabulary cannot be built: one line, exit 2.
    assert "--base" in one_line_error(kssm("train", "--arch", "phase_mamba", "--print-config"))


# ---------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    "args, hint",
    [
        (("sample", "--bogus"), "kssm sample --help"),
        (("sample", "--temp", "hot"), "kssm sample --help"),
        (("nonsense",), "kssm --help"),
        (("train", "--steps"), "kssm train --help"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, hint):
    assert hint in one_line_error(kssm(*args))


def test_usage_error_through_the_installed_entry_point():
    code = "import sys; sys.argv = ['kssm', 'sample', '--bogus']; from mlx_kssm.cli.app import main; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == "error: No such option: --bogus (see 'kssm sample --help')"


def test_a_wrong_or_missing_model_names_the_models_nearby(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mx.random.seed(0)
    save(Model(tiny_args()), tmp_path / "runs" / "tiny")
    save(Model(tiny_args()), tmp_path / "runs" / "ablation" / "bistable" / "best")
    for args in [
        ("sample", "--model", "runs/tny"),
        ("sample",),
        ("intervene", "--model", tmp_path / "nothing"),
        ("compare", "runs/tiny"),
    ]:
        line = one_line_error(kssm(*args))
        assert "runs/tiny" in line and "runs/ablation/bistable" in line, line
    (tmp_path / "runs").rename(tmp_path / "elsewhere")
    assert "kssm train --preset tiny" in one_line_error(kssm("sample"))


# ---------------------------------------------------------------------------- sample


def test_sample_on_a_small_vocabulary_starts_from_a_token_it_has(small_vocab_model, tmp_path):
    out = tmp_path / "s.json"
    res = kssm("sample", "--model", small_vocab_model, "--max-tokens", 3, "--json", out)
    assert res.exit_code == 0, res.output
    assert "starting from token 0" in res.stderr and "100257" in res.stderr
    (gen,) = json.loads(out.read_text())["generations"]
    assert gen["prompt_tokens"] == [0] and len(gen["tokens"]) == 3


def test_prompt_ids(small_vocab_model, tmp_path):
    out = tmp_path / "s.json"
    args = ("sample", "--model", small_vocab_model, "--temp", 0, "--max-tokens", 4)
    res = kssm(*args, "--prompt-ids", "5, 17,300", "--json", out)
    assert res.exit_code == 0, res.output
    (gen,) = json.loads(out.read_text())["generations"]
    assert gen["prompt_tokens"] == [5, 17, 300] and len(gen["tokens"]) == 4
    assert "512 is not a token id of this model (0..511)" in one_line_error(
        kssm(*args, "--prompt-ids", "1,512")
    )
    assert "'x'" in one_line_error(kssm(*args, "--prompt-ids", "1,x"))
    assert "-1 is not a token id" in one_line_error(kssm(*args, "--prompt-ids=-1"))
    assert "has 65 tokens" in one_line_error(kssm(*args, "--prompt-ids", ",".join(["7"] * 65)))
    one_line_error(kssm(*args, "--prompt-ids", "1", "--prompt", "Hi"))
    # Text whose tokens the vocabulary lacks: the error says what to do instead.
    assert "--prompt-ids" in one_line_error(kssm(*args, "--prompt", "Zebra crossing"))


def test_a_model_without_sequence_mixing_says_so_once(small_vocab_model, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("!\n#\n")  # single-byte tokens: inside a vocabulary of 512
    args = ("sample", "--model", small_vocab_model, "--prompts", prompts, "--max-tokens", 2)
    res = kssm(*args)  # K-SSM v3 has no sequence mixing
    assert res.exit_code == 0, res.output
    assert res.stderr.count("no sequence mixing") == 1
    monkeypatch.setattr(Model, "mixes_sequence", True)
    res = kssm(*args)
    assert res.exit_code == 0 and "no sequence mixing" not in res.stderr


def test_show_r_prints_the_text_too(small_vocab_model, tmp_path):
    out = tmp_path / "s.json"
    res = kssm(
        "sample",
        "--model",
        small_vocab_model,
        "--prompt-ids",
        "33,34",
        "--max-tokens",
        3,
        "--show-r",
        "--json",
        out,
    )
    assert res.exit_code == 0, res.output
    (gen,) = json.loads(out.read_text())["generations"]
    rows = [line for line in res.stdout.splitlines() if " R=[" in line]
    assert len(rows) == 3
    assert res.stdout.rstrip("\n").splitlines()[-1] == gen["prompt"] + gen["text"]
    assert gen["prompt"] == "BC"  # ids 33, 34 are cl100k's 'B' and 'C'
