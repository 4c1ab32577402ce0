"""Where `kssm intervene` and `kssm compare` write their reports: beside the model by default,
never in the working directory; every output path checked before any work starts; files
written whole (temporary name, then rename)."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import pytest
from conftest import tiny_args
from typer.testing import CliRunner

from mlx_kssm import Model, save
from mlx_kssm.cli.app import app
from mlx_kssm.cli.common import default_report_path
from mlx_kssm.experiments.report import write_json, write_text_atomic

runner = CliRunner()
TEXT = "The river flows through the old town. It was founded in 1820 by settlers. " * 3


def kssm(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made = []
    for i, name in enumerate("ab"):
        mx.random.seed(i)
        made.append(save(Model(tiny_args(vocab_size=100_277)), root / name))
    return made


@pytest.fixture
def quick(tmp_path):
    """Arguments that keep an experiment to a second or two."""
    prompts, text = tmp_path / "p.txt", tmp_path / "t.txt"
    prompts.write_text("The river\n")
    text.write_text(TEXT)
    common = ["--prompts", prompts, "--trials", 2, "--max-tokens", 3]
    return {"intervene": [*common, "--force-r", "0.9", "--text", text], "compare": common}


def test_reports_go_beside_the_model_not_into_the_working_directory(
    models, quick, tmp_path, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = kssm("intervene", "--model", models[0], *quick["intervene"])
    assert res.exit_code == 0, res.output
    report = models[0] / "intervene_report.md"
    assert "minimum effects: KL and |dCE| 0.01 nats" in report.read_text()
    res = kssm("compare", *models, *quick["compare"])
    assert res.exit_code == 0, res.output
    assert "Welch" in (models[0] / "compare_report.md").read_text()
    assert list(work.iterdir()) == []
    leftovers = [p for m in models for p in m.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file left behind


def test_a_runs_checkpoint_or_best_is_reported_in_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000300").mkdir(parents=True)
    (run / "best").mkdir()
    step = run / "checkpoints" / "step_00000300"
    assert default_report_path(step, "r") == run / "r-step_00000300.md"
    assert default_report_path(run / "best", "r") == run / "r-best.md"
    assert default_report_path(run, "r") == run / "r.md"
    assert default_report_path(tmp_path / "model", "r") == tmp_path / "model" / "r.md"


def bad_outputs(tmp_path) -> dict[str, list]:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "missing" / "target.md")
    same = tmp_path / "same.out"
    return {
        "report is a folder": ["--report", tmp_path],
        "report under a file": ["--report", a_file / "r.md"],
        "json under a file": ["--json", a_file / "deeper" / "r.json"],
        "json is a folder": ["--json", tmp_path],
        "dangling link": ["--report", dangling],
        "report and json the same file": ["--report", same, "--json", same],
    }


@pytest.mark.parametrize("command", ["intervene", "compare", "sample"])
def test_bad_output_paths_are_refused_before_any_work(models, quick, tmp_path, command):
    for name, extra in bad_outputs(tmp_path).items():
        if command == "sample" and "--report" in extra:
            continue
        if command == "sample":
            args = ["sample", "--model", models[0], "--max-tokens", 2]
        elif command == "intervene":
            args = ["intervene", "--model", models[0], *quick["intervene"]]
        else:
            args = ["compare", *models, *quick["compare"]]
        res = kssm(*args, *extra)
        assert res.exit_code == 2, (name, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, res.stderr)
        assert res.stdout == "", name  # nothing generated, nothing printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.md",
        "file.txt",
        "p.txt",
        "t.txt",
    ]


def test_a_read_only_folder_is_refused(models, tmp_path, monkeypatch):
    from mlx_kssm.cli import common

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the check see a locked folder
        monkeypatch.setattr(common, "_writable", lambda folder: folder != locked)
    for target in (locked / "s.json", locked / "deeper" / "s.json"):
        res = kssm("sample", "--model", models[0], "--json", target)
        assert res.exit_code == 2 and "is not writable" in res.stderr, res.output
        assert res.stdout == ""
    locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_writes_are_whole_and_leave_no_temporary_files(tmp_path):
    target = write_text_atomic(tmp_path / "new" / "r.md", "hello\n")
    assert target.read_text() == "hello\n"
    write_json(tmp_path / "new" / "r.json", {"x": float("nan"), "y": [1.5]})
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == {"x": None, "y": [1.5]}
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["r.json", "r.md"]

    class Unprintable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        write_json(tmp_path / "new" / "r.json", {"bad": Unprintable()})
    assert json.loads((tmp_path / "new" / "r.json").read_text())["y"] == [1.5]  # kept as it was
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["r.json", "r.md"]
