"""benchmarks/reproduce_figures.py: it runs the published commands and reports what they gave.

`kssm` is replaced by a stand-in script that writes a metrics.jsonl, so that these tests check
the script's plumbing (arguments passed, values read back, table, exit codes) in milliseconds;
the real runs take minutes each and are the script's job, not the suite's."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_figures.py"


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("reproduce_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_figures"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def fake_kssm(folder: Path, val_ce: float, exit_code: int = 0) -> list[str]:
    """A `kssm` that records its arguments and writes one train row and one eval row."""
    script = folder / "kssm"
    script.write_text(
        f"""#!{sys.executable}
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
(out / "argv.json").write_text(json.dumps(args))
rows = [{{"kind": "train", "step": 300, "ce": 6.9, "elapsed_s": 12.5}},
        {{"kind": "eval", "step": 300, "val_ce": {val_ce}}}]
(out / "metrics.jsonl").write_text("\\n".join(json.dumps(r) for r in rows) + "\\n")
sys.exit({exit_code})
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return [str(script)]


def corpora(tmp_path: Path) -> Path:
    (tmp_path / "corpora" / "wiki-leads").mkdir(parents=True)
    (tmp_path / "corpora" / "wiki-leads" / "train.txt").write_text("text\n")
    return tmp_path / "corpora"


def test_runs_the_published_command_and_reports_its_val_ce(figures, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "find_kssm", lambda: fake_kssm(tmp_path, 6.4321))
    report = tmp_path / "figures.md"
    kept = tmp_path / "runs"
    argv = ["--figures", "wiki-seed-1", "--corpora", str(corpora(tmp_path))]
    assert figures.main([*argv, "--markdown", str(report), "--keep-runs", str(kept)]) == 0

    passed = json.loads((kept / "wiki-seed-1" / "argv.json").read_text())
    wiki = str(tmp_path / "corpora" / "wiki-leads")
    assert passed[:7] == ["train", "--preset", "tiny", "--data", wiki, "--steps", "300"]
    assert passed[7:11] == ["--lambda-reg", "0.5", "--seed", "1"]
    text = report.read_text()
    assert "| wiki-seed-1 |" in text and "| 6.432 |" in text and "| 12 s |" in text
    assert (
        "--data ../shared/corpora/wiki-leads --steps 300 --lambda-reg 0.5 --seed 1 --out OUT"
        in text
    )
    assert "- commit: " in text and " cores" in text and "- MLX " in text


def test_quick_runs_the_readme_command_only(figures, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "find_kssm", lambda: fake_kssm(tmp_path, 6.5))
    kept = tmp_path / "runs"
    assert figures.main(["--quick", "--keep-runs", str(kept)]) == 0
    assert [p.name for p in kept.iterdir() if p.is_dir()] == ["readme"]
    passed = json.loads((kept / "readme" / "argv.json").read_text())
    assert passed[:3] == ["train", "--preset", "tiny"] and passed[3] == "--out"


def test_check_fails_on_a_miss_and_on_a_failed_run(figures, tmp_path, monkeypatch, capsys):
    published = figures.Figure("readme", ("--preset", "tiny"), 6.40, "README.md")
    monkeypatch.setitem(figures.FIGURES, "readme", published)
    monkeypatch.setattr(figures, "find_kssm", lambda: fake_kssm(tmp_path, 6.4 + 0.05))
    assert figures.main(["--quick", "--check"]) == 1
    assert "(+0.050, MISS)" in capsys.readouterr().out
    monkeypatch.setattr(figures, "find_kssm", lambda: fake_kssm(tmp_path, 6.41))
    assert figures.main(["--quick", "--check"]) == 0
    monkeypatch.setattr(figures, "find_kssm", lambda: fake_kssm(tmp_path, 6.41, exit_code=2))
    assert figures.main(["--quick", "--check"]) == 1
    assert "failed (exit 2" in capsys.readouterr().out


def test_bad_options_are_one_line_errors(figures, tmp_path, capsys):
    for argv in (
        ["--corpora", str(tmp_path / "missing")],
        ["--quick", "--markdown", str(tmp_path / "no" / "such" / "folder.md")],
        ["--quick", "--keep-runs", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as stop:
            figures.main(argv)
        assert stop.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
