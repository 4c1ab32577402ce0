"""benchmarks/phase_experiment.py without training: its one-line input errors, the layers each
leg hooks, the flags it trains with, its reading of finished legs and the table it renders
from them (phase_report.py), and --table-only running nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("phase_experiment", BENCH / "phase_experiment.py")
exp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(exp)
report = exp.phase_report


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("train.txt", "valid.txt"):
        (folder / name).write_text("text\n")
    return folder


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    config = {"model_type": "mamba", "num_hidden_layers": 4, "hidden_size": 8, "vocab_size": 50}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}")  # an empty header
    (folder / "best.json").write_text(json.dumps({"step": 300, "val_ce": 6.349}))
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "/nonexistent"], "expected a folder with train.txt"),
        (["--legs", "faithful,nope"], "unknown nope"),
        (["--force-r", "0.1,x"], "comma list of numbers"),
        (["--force-r", "0.1,1.5"], "must be in [0, 1]"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--lr", "nan"], "--lr must be in (0, 1)"),
        (["--base", "/nonexistent"], "expected an mlx-lm model folder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(corpus, capsys, argv, message):
    argv = argv if argv[0] == "--data" else ["--data", str(corpus), *argv]
    with pytest.raises(SystemExit) as stop:
        exp.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and message in err and "\n" not in err


@pytest.mark.parametrize(
    "n, middle, late, several",
    [(4, [2], [3], [1, 2, 3]), (64, [32], [63], [16, 32, 63]), (2, [1], [1], [0, 1])],
)
def test_each_leg_hooks_the_layers_the_paper_names(n, middle, late, several):
    assert exp.hook_layers("middle", n) == middle  # the original: 32 of 64
    assert exp.hook_layers("late", n) == late
    assert exp.hook_layers("several", n) == several


def test_core_flags_name_the_coupling_layers_and_schedule(corpus, base, tmp_path):
    a = exp.parse_args(["--data", str(corpus), "--base", str(base), "--steps", "30"])
    flags = exp.core_flags(a, base, "several")
    pairs = dict(zip(flags[::2], flags[1::2], strict=False))
    assert pairs["--arch"] == "phase_mamba" and pairs["--base"] == str(base.resolve())
    assert "coupling=multiplicative" in flags and "hook_layers=[1, 2, 3]" in flags
    assert (pairs["--steps"], pairs["--decay-steps"], pairs["--warmup"]) == ("30", "30", "3")
    assert pairs["--eval-every"] == "30"  # one evaluation, at the end


# ---------------------------------------------------------------------------- fake results


def fake_intervene(kl: float, changed: bool) -> dict:
    conds = [{"name": "control", "target_r": None, "measured_r": 0.8}]
    conds += [{"name": f"R={r}", "target_r": r, "measured_r": r} for r in (0.1, 0.9)]
    for c in conds:
        same = 1.0 if kl == 0 else 0.5
        c["metrics"] = {"U": 0.5, "distinct_2": 0.9, "identical_to_control": same}
    tests = []
    for i, c in enumerate(conds[1:]):
        effect = kl * (i + 1) / 2
        tests.append(dict(test="one_sample_t", metric="kl", condition=c["name"], effect=effect,
                          ci_low=effect / 2, ci_high=effect * 2, p=0.001, p_holm=0.002))  # fmt: skip
        tests.append(dict(test="paired_t", metric="ce", condition=c["name"], effect=-kl,
                          ci_low=None, ci_high=None, p=None, p_holm=None))  # fmt: skip
    for metric, p in (("U", 0.44), ("distinct_2", 0.65), ("ce", 0.9)):
        tests.append(dict(test="anova", metric=metric, condition="", effect=0.01, ci_low=None,
                          ci_high=None, p=p, p_holm=1.0, statistic=0.9))  # fmt: skip
    return {"conditions": conds, "tests": tests, "verdict": {"changed": changed}}


def fake_compare() -> dict:
    models = [{"metrics": {"U": 0.5, "distinct_2": 0.9, "repetition": 0.2}}]
    models.append({"metrics": {"U": 0.6, "distinct_2": 0.9, "repetition": 0.2, "R": 0.99}})
    tests = [dict(metric=m, effect=-0.1, ci_low=-0.2, ci_high=0.0, p=0.04, p_holm=0.1)
             for m in ("U", "distinct_2", "repetition")]  # fmt: skip
    return {"models": models, "tests": tests, "verdict": {"differ": []}}


def write_leg(a, leg: str, kl: float, changed: bool, layers: list[int]) -> None:
    run = exp.leg_dir(a, leg)
    (run / "best").mkdir(parents=True)
    (run / "best" / "config.json").write_text(json.dumps({"hook_layers": layers}))
    rows = [{"kind": "train", "step": a.steps, "R": 0.47, "U": 0.5, "tone": "Goldilocks"}]
    rows.append({"kind": "eval", "step": a.steps, "val_ce": 6.3512, "val_R": 0.5, "val_U": 0.5})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run.parent / f"{leg}.compare.json").write_text(json.dumps(fake_compare()))
    (run.parent / f"{leg}.intervene.json").write_text(json.dumps(fake_intervene(kl, changed)))
    walls = [
        {"command": c, "seconds": 60.0, "exit": 0, "commit": "abc"} for c in ("train", "compare")
    ]
    (run.parent / f"{leg}.wall.json").write_text(json.dumps(walls))
    size = {
        "cores": [{"layer": i, "rms_x": 4.0, "coupling": 0.05, "forcing": 0.01} for i in layers]
    }
    (run.parent / f"{leg}.size.json").write_text(json.dumps(size))


def test_the_table_from_fake_legs(corpus, base, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--data", str(corpus), "--base", str(base), "--steps", "12", "--out", str(out)]
    a = exp.parse_args(argv)
    write_leg(a, "faithful", 0.0, False, [2])
    write_leg(a, "multiplicative", 0.004, False, [2])
    write_leg(a, "additive", 0.02, True, [2])
    got = exp.collect(a, "additive")
    assert got["eval"]["val_ce"] == 6.3512 and got["hook_layers"] == [2]
    assert got["seconds"] == {"train": 60.0, "compare": 60.0, "intervene": 0, "size": 0} and got[
        "commits"
    ] == ["abc"]

    def no_subprocess(*args, **kwargs):
        raise AssertionError("--table-only must run nothing")

    monkeypatch.setattr(exp, "stream", no_subprocess)
    (out / "command.json").write_text(json.dumps({"command": "python run.py --x", "started": "T0"}))
    exp.main([*argv, "--table-only"])
    table = (out / "PHASE_RESULTS.md").read_text()
    assert "python run.py --x\n# table rewritten at" in table and "- date: T0" in table
    assert not list(out.glob("*.tmp"))
    assert "faithful (faithful @ 2): largest mean KL 0 nats" in table
    assert "nothing moved at all" in table  # KL exactly 0 and every text the control's
    assert "nothing moved" not in table.split("- multiplicative")[1].split("\n")[0]
    assert "measured so: mean KL exactly 0 and every forced text the control's" in table
    assert "changed the output by at least the stated minimum in additive:" in table
    assert "multiplicative 1.00% of the layer's output, mean KL 0.004 nats; additive" in table
    assert "moves the logits more than the multiplicative one at the same layer (5x)" in table
    assert "A change of 1.0%-1.0% of the output where a multiplicative core acts" in table
    assert (
        "additive term does not grow with the layer's output (rms 4) and changes it by 5" in table
    )
    assert "| additive (additive @ 2) | 6.3512 | 0.99 / 0.8 | 0.02 [0.01, 0.04] |" in table
    assert "| late (multiplicative @ ?) | not run yet |" in table
    assert "| multiplicative | U | 0.9 | 0.44 | 0.01 | 1 |" in table  # the ANOVA rows
    assert "0.5 / 0.6, 0.1 [0, 0.2], 0.04 (0.1)" in table  # compare: phase - base
    assert "0.47, 0.5, Goldilocks" in table  # the logged tone
    assert f"`{base.resolve()}`" in table and "sha256:" in table and "6.349" in table
    assert "the legs ran at abc" in table
    assert (
        "commands per leg, in order, with their commit: faithful: train abc, compare abc;" in table
    )
    assert "| additive | 2 | 4 | 5.00% | 1.00% | 0.02 |" in table  # where the cores act


def test_the_answer_when_no_leg_reaches_the_minimum(corpus, base, tmp_path):
    import phase_findings

    a = exp.parse_args(["--data", str(corpus), "--steps", "12", "--out", str(tmp_path / "o")])
    for leg, kl in (("faithful", 0.0), ("multiplicative", 0.004), ("additive", 0.001)):
        write_leg(a, leg, kl, False, [2])
    text = "\n".join(phase_findings.findings([exp.collect(a, leg) for leg in exp.LEGS]))
    assert (
        "moves the output detectably (mean KL > 0 at p < 0.01 in 2 of 2 legs), by at most 0.004 nats"
        in text
    )
    assert "the effect of R is real but negligible" in text
    assert "(multiplicative), 2.5x below the 0.01-nat minimum" in text
    assert "ANOVA of U across targets, gives p >= 0.44" in text
    assert "moves the logits less than the multiplicative one" in text
    assert "(0.25x)" in text and "Several layers" not in text  # not run
