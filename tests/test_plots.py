"""`kssm plot`: figures from a run's metrics.jsonl, and one-line errors for a bad RUN_DIR."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlx_kssm.cli.app import app
from mlx_kssm.experiments.plots import plot_run, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, n_layers=3, steps=(10, 20, 30, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "start", "step": 0}]
    for i, step in enumerate(steps):
        lines.append(
            {
                "kind": "train",
                "step": step,
                "loss": 9 - i,
                "ce": 8.5 - i,
                "reg": 1.0,
                "R": 0.1 * i,
                "u_layers": [0.5] * n_layers,
                "det_layers": [1.0] * n_layers,
                "lr": 1e-3,
                "tokens_per_s": 100.0,
            }
        )
        lines.append(
            {
                "kind": "eval",
                "step": step,
                "val_ce": 8.4 - i,
                "val_loss": 8.9 - i,
                "val_ppl": 1.0,
                "val_R": 0.2,
                "val_R_layers": [0.1 * i + 0.01 * j for j in range(n_layers)],
                "val_u_layers": [0.3 + i * 0.01] * n_layers,
                "val_det_layers": [0.5] * n_layers,
                "sample": "text",
            }
        )
    # A step logged twice (a resumed run): the later row wins.
    lines.append({**lines[-1], "val_ce": 1.25})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"cut')
    (folder / "train_config.json").write_text(json.dumps({"model": {"bistable": False}}))
    return folder


def test_read_metrics_dedupes_and_skips_a_cut_line(tmp_path):
    train, evals = read_metrics(write_run(tmp_path / "run"))
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in evals] == [10, 20, 30, 40] and evals[-1]["val_ce"] == 1.25


def test_plot_writes_the_figures(tmp_path):
    run = write_run(tmp_path / "run")
    paths = plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "R.png", "u.png", "det.png", "summary.png"]
    for path in paths:
        assert path.parent == run / "figures"
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert not list((run / "figures").glob(".*"))  # no temporary files left


def test_plot_cli_writes_where_asked(tmp_path):
    run = write_run(tmp_path / "run", n_layers=1)
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figs" / "summary.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("make", ["missing", "no metrics", "no rows"])
def test_plot_bad_run_dir_is_one_line_exit_2(tmp_path, make):
    run = tmp_path / "run"
    if make != "missing":
        run.mkdir()
    if make == "no rows":
        (run / "metrics.jsonl").write_text('{"kind": "start", "step": 0}\n')
    result = CliRunner().invoke(app, ["plot", str(run)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert not (run / "figures").exists()
