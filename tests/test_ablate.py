"""The ablation: reading runs, the comparison table, trajectories, figure, and the driver."""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args

from mlx_kssm import Model, save
from mlx_kssm.experiments.ablate import (
    PUBLISHED,
    AblationInterrupted,
    compare_runs,
    read_evals,
    train_variants,
)


def eval_row(step: int, bistable: bool) -> dict:
    """A synthetic evaluation whose numbers depend on the step and the variant."""
    R = [0.3 + 0.01 * step + 0.1 * bistable, 0.35 + 0.01 * step]
    u = [0.5 + 0.1 * bistable, -0.2 * (not bistable)]
    ce = 7.0 - 0.05 * step + 0.5 * (not bistable)
    return {
        "kind": "eval",
        "step": step,
        "val_ce": ce,
        "val_ppl": 2.0**ce,
        "val_loss": ce + 0.5 * bistable,
        "val_R": sum(R) / 2,
        "val_R_layers": R,
        "val_u_layers": u,
        "val_det_layers": [0.1, 0.1],
        "sample": "text",
    }


def make_run(folder: Path, bistable: bool, steps=(10, 20, 30), resumed_step: int | None = None):
    """A run folder as `kssm train` writes it: metrics.jsonl and a checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "train", "step": s, "loss": 9.0} for s in steps]
    rows += [eval_row(s, bistable) for s in steps]
    if resumed_step is not None:  # a resumed run logs this step again, with newer numbers
        rows.append({**eval_row(resumed_step, bistable), "val_ce": 1.0})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mx.random.seed(0)
    save(Model(tiny_args(bistable=bistable)), folder / "checkpoints" / f"step_{steps[-1]:08d}")
    return folder


def test_read_evals_keeps_the_last_row_of_each_step(tmp_path):
    run = make_run(tmp_path / "run", True, resumed_step=20)
    rows = read_evals(run)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[1]["val_ce"] == 1.0
    assert rows[0]["val_u"] == pytest.approx(0.3)  # mean of the layers' u


def test_read_evals_rejects_folders_without_evaluations(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        read_evals(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(ValueError, match="no evaluations"):
        read_evals(tmp_path)


def test_compare_runs_writes_table_csv_figure_and_report(tmp_path):
    bi = make_run(tmp_path / "bistable", True)
    mono = make_run(tmp_path / "monostable", False, steps=(10, 20))
    res = compare_runs([bi, mono], tmp_path / "out")
    assert [r["variant"] for r in res["runs"]] == ["bistable", "monostable"]
    table = {row["metric"]: row for row in res["table"]}
    assert table["val_R"]["values"] == [eval_row(30, True)["val_R"], eval_row(20, False)["val_R"]]
    assert table["val_loss"]["values"][1] == eval_row(20, False)["val_loss"]
    assert table["val_u"]["values"] == [
        pytest.approx(0.3),
        pytest.approx(0.15),
    ]  # (0.6+0)/2, (0.5-0.2)/2
    assert table["best_val_loss"]["values"][0] == min(
        eval_row(s, True)["val_loss"] for s in (10, 20, 30)
    )
    assert table["val_R"]["published"] == {"bistable": 0.4908, "monostable": 0.4043}
    assert table["val_loss"]["published"]["monostable"] == PUBLISHED["monostable"]["val_loss"]

    out = tmp_path / "out"
    with (out / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0]["run"] == "bistable" and rows[-1]["variant"] == "monostable"
    assert float(rows[4]["val_R_L1"]) == eval_row(20, False)["val_R_layers"][1]
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "ablation.md").read_text()
    assert "| val R |" in report and "0.4908" in report and "ablation.png" in report
    assert json.loads((out / "ablation.json").read_text())["table"][0]["metric"] == "val_R"


def test_train_variants_trains_both_alike(tmp_path, monkeypatch):
    calls = []

    def fake_run_training(train_args, model_args, resume=None, console=None):
        calls.append((train_args, model_args, resume))
        return make_run(Path(train_args.out), model_args.bistable)

    monkeypatch.setitem(
        sys.modules, "mlx_kssm.training", types.SimpleNamespace(run_training=fake_run_training)
    )
    runs = train_variants("corpus", 25, tmp_path / "abl", preset="tiny", seed=7)
    (bi_args, bi_model, bi_resume), (mono_args, mono_model, _) = calls
    assert bi_model.bistable and not mono_model.bistable
    assert bi_args.seed == mono_args.seed == 7 and bi_args.steps == mono_args.steps == 25
    assert bi_args.data == mono_args.data == "corpus" and bi_resume is None
    assert runs == {
        "bistable": tmp_path / "abl" / "bistable",
        "monostable": tmp_path / "abl" / "monostable",
    }
    # A second call finds the checkpoints and resumes each run where it stopped.
    calls.clear()
    train_variants("corpus", 25, tmp_path / "abl", preset="tiny", seed=7)
    assert [c[2] for c in calls] == [runs["bistable"], runs["monostable"]]


def test_an_interrupted_run_stops_the_ablation(tmp_path, monkeypatch):
    trained = []

    def interrupted_run_training(train_args, model_args, resume=None, console=None):
        trained.append(model_args.bistable)  # Ctrl+C at step 20 of 25: saved, returned
        return make_run(Path(train_args.out), model_args.bistable, steps=(10, 20))

    monkeypatch.setitem(
        sys.modules,
        "mlx_kssm.training",
        types.SimpleNamespace(run_training=interrupted_run_training),
    )
    with pytest.raises(AblationInterrupted, match="bistable run stopped before step 25"):
        train_variants("corpus", 25, tmp_path / "abl", preset="tiny")
    assert trained == [True]  # the monostable run was not started


# Steps, batch and window small enough for a 2-core CPU; everything else is the tiny preset.
FAST = dict(
    batch_size=1,
    seq_length=8,
    eval_every=1,
    eval_batches=1,
    save_every=1,
    warmup=1,
    sample_tokens=0,
)


def test_ablation_driver_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("mlx_kssm.training")  # lands with `kssm train` (issue 4)
    monkeypatch.setenv("KSSM_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    words = "the river city was founded in by settlers and grew along old trade roads".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("valid", 120)):
        (data / f"{split}.txt").write_text(" ".join(rng.choice(words, n)) + "\n")

    runs = train_variants(str(data), 2, tmp_path / "abl", preset="tiny", seed=5, **FAST)
    # Run again with a larger budget: both runs resume from their checkpoints.
    runs = train_variants(str(data), 3, tmp_path / "abl", preset="tiny", seed=5, **FAST)
    res = compare_runs([runs["bistable"], runs["monostable"]], tmp_path / "abl")
    assert [r["variant"] for r in res["runs"]] == ["bistable", "monostable"]
    for run in res["runs"]:
        assert [row["step"] for row in run["evals"]] == [1, 2, 3]
    table = {row["metric"]: row["values"] for row in res["table"]}
    assert all(np.isfinite(table[k]).all() for k in ("val_R", "val_loss", "val_ce", "val_u"))
    # lambda_reg defaults to 0.5 for the bistable run and 0 for the monostable one, so only
    # the monostable val loss (CE + lambda * reg) equals its val CE.
    bi, mono = (r["evals"][0] for r in res["runs"])
    assert bi["val_loss"] != bi["val_ce"] and mono["val_loss"] == mono["val_ce"]
    assert (tmp_path / "abl" / "ablation.md").is_file()
