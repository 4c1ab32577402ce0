"""benchmarks/ssm_experiment.py without training: its schedule arithmetic, its summary of
seeds, its reading of run folders (resumed legs included) and its one-line input errors."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ssm_experiment.py"
spec = importlib.util.spec_from_file_location("ssm_experiment", SCRIPT)
exp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exp)


@pytest.mark.parametrize("steps", [1, 4, 7, 300, 600, 1200, 997])
def test_eval_interval_ends_on_the_last_step(steps):
    every = exp.eval_interval(steps)
    assert steps % every == 0 and steps // every <= 4


def test_spread_mean_sd_range():
    assert exp.ssm_report.spread([6.0]) == "6.000"
    assert exp.ssm_report.spread([6.0, 6.2, 6.4]) == "6.200 ± 0.200 [6.000, 6.400]"
    assert exp.ssm_report.spread([float("nan")]) == "n/a"


def test_collect_keeps_the_last_row_of_a_repeated_step(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("train.txt", "valid.txt"):
        (corpus / name).write_text("text\n")
    a = exp.parse_args(["--data", str(corpus), "--steps", "20", "--out", str(tmp_path / "o")])
    run = exp.run_dir(a, "ssm", 42)
    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"n_params": 1234}))
    rows = [
        {"kind": "start", "step": 0, "time": "2026-11-30T02:19:00+0000", "from": None},
        {"kind": "train", "step": 10, "skipped": 1, "tokens": 10240, "elapsed_s": 10.0},
        {"kind": "eval", "step": 10, "val_ce": 9.0, "val_R": 0.3, "val_u": 1.0},
        {"kind": "train", "step": 20, "skipped": 3, "tokens": 20480, "elapsed_s": 30.0},  # killed
        {
            "kind": "start",
            "step": 10,
            "time": "2026-11-30T03:00:00+0000",
            "from": "x",
        },  # the resumed leg
        {"kind": "train", "step": 20, "skipped": 0, "tokens": 20480, "elapsed_s": 16.0},
        {"kind": "eval", "step": 20, "val_ce": 8.0, "val_R": 0.4, "val_u": 2.0, "sample": "s"},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "tr')
    (run.parent / "seed42.wall.json").write_text(json.dumps([{"seconds": 5}, {"seconds": 7}]))
    got = exp.collect(a, "ssm", 42)
    assert (got["val_ce"], got["val_R"], got["params"], got["skipped"]) == (8.0, 0.4, 1234, 1)
    assert got["tok_s"] == pytest.approx(20480 / 16.0) and got["wall_s"] == 12
    assert got["ce_path"] == [(10, 9.0), (20, 8.0)]
    assert got["started"] == "2026-11-30T02:19:00+0000"
    assert exp.collect(a, "v3", 42) is None  # not run yet


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/nonexistent"], "expected a folder with train.txt"),
        (["--configs", "v3,nope"], "unknown nope"),
        (["--steps", "300", "--eval-every", "7"], "must divide --steps 300"),
        (["--seeds", "4x"], "comma list of integers"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "valid.txt").write_text("a\n")
    argv = argv if argv[0] == "--data" else ["--data", str(tmp_path), *argv]
    with pytest.raises(SystemExit) as stop:
        exp.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and message in err and "\n" not in err


def test_findings_compare_the_ce_only_rows_too():
    labels = {c: label for c, (label, _) in exp.CONFIGS.items()}
    means = {"v3-ce": 6.0, "ssm-ce": 5.7, "ssm-nobank": 5.75}
    text = "\n".join(exp.ssm_report.findings(means, labels, 5.84, 1))
    assert "(2b) vs (1b), CE only: (2b) ssm bistable, CE only is below (1b)" in text
    assert "by 0.300" in text
    assert "(2b) vs the bigram: 5.700 is below 5.84" in text
    assert "(2b) vs (4), do oscillators help: (2b) ssm bistable, CE only is below (4)" in text
    assert "(2) vs" not in text  # no row (2): nothing said about it
    assert "1 seed(s)" in text


def test_findings_compare_shared_seeds_pairwise():
    import scipy.stats

    labels = {c: label for c, (label, _) in exp.CONFIGS.items()}
    ces = {"ssm-ce": {42: 5.33, 7: 5.36, 1: 5.35}, "ssm-nobank": {42: 5.39, 7: 5.35, 1: 5.40}}
    means = {c: sum(v.values()) / 3 for c, v in ces.items()}
    text = "\n".join(exp.ssm_report.findings(means, labels, 5.84, 3, ces))
    assert "seed by seed, (2b) minus (4): lower in 2 of 3 seeds" in text
    assert "1: -0.050, 7: +0.010, 42: -0.060" in text
    p = scipy.stats.ttest_rel([5.35, 5.36, 5.33], [5.40, 5.35, 5.39]).pvalue
    assert f"p = {p:.2g}" in text and "mean difference -0.033" in text
    assert "seed(s)" not in text  # three seeds: the one-seed caveat is gone
    one_shared = {"ssm-ce": {42: 5.33}, "ssm-nobank": {42: 5.39, 7: 5.35}}
    assert "seed by seed" not in "\n".join(
        exp.ssm_report.findings(means, labels, 5.84, 2, one_shared)
    )


def test_table_names_each_configurations_seed_count_when_they_differ(tmp_path):
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "valid.txt").write_text("a\n")
    a = exp.parse_args(["--data", str(tmp_path), "--steps", "20", "--seeds", "42,7,1"])
    a.configs, a.table = ["v3-ce", "ssm-ce"], tmp_path / "T.md"
    labels = {c: label for c, (label, _) in exp.CONFIGS.items()}

    def run(ce):
        paths = {"ce_path": [(20, ce)], "R_path": [(20, 0.5)], "sample": "s"}
        return {"val_ce": ce, "val_R": 0.5, "val_u": 1.0, "tok_s": 1.0, "wall_s": 1.0,
                "params": 10, "skipped": 0, "started": "t", **paths}  # fmt: skip

    results = {"v3-ce": {42: run(5.8), 7: None, 1: None}, "ssm-ce": {s: run(5.3) for s in a.seeds}}
    text = exp.ssm_report.table(a, "cmd", results, labels, (7.48, 5.84), None, {})
    assert "**Seeds per configuration: (1b) 1, (2b) 3; the issue asks for three each.**" in text
    assert "1 seed(s), the fewest of any configuration here" in text
    results["v3-ce"] = {s: run(5.8 + s / 1000) for s in a.seeds}
    text = exp.ssm_report.table(a, "cmd", results, labels, (7.48, 5.84), None, {})
    assert "Seeds per configuration" not in text and "preliminary" not in text
    assert "seed(s)" not in text and "lower in 3 of 3 seeds" in text
