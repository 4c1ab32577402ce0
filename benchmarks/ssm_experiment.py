"""Issue 11's experiment: do the oscillators help once the model can use context?

Trains, at one token budget (the tiny preset's model size; RECIPE below: 16 x 64 tokens per
step, lr 3e-2; the same schedule and seed for all) these models and writes a markdown table
with the unigram and bigram baselines:

    v3          (1) K-SSM v3, bistable (the published model: no sequence mixing)
    ssm         (2) K-SSM with a selective scan, bistable
    ssm-mono    (3) the same, monostable (u not clamped)
    ssm-nobank  (4) the same SSM without oscillator banks (the control, within 2% of params)
    v3-ce       (1b) as (1), trained on the cross-entropy alone (u still clamped)
    ssm-ce      (2b) as (2), trained on the cross-entropy alone

Each run is an ordinary `kssm train` run folder under --out; `kssm intervene` then forces R in
(2). Rerunning skips finished runs and resumes interrupted ones, so seeds can be added later
(--seeds 42,7,1). Text between the table's notes markers is kept when the table is rewritten.
The table itself is written by ssm_report.py.

    python benchmarks/ssm_experiment.py --data ../shared/corpora/wiki-leads --steps 300 \\
        --seeds 42,7,1 --out runs/ssm_experiment --table benchmarks/SSM_RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ssm_report  # noqa: E402  (the markdown; beside this file)
from run_records import final_eval, read_jsonl, run_logged, write_text  # noqa: E402

CONFIGS = {  # name -> (label, kssm train flags)
    "v3": ("(1) v3 bistable", ["--arch", "v3", "--lambda-reg", "0.5"]),  # the published loss
    "ssm": ("(2) ssm bistable", ["--arch", "ssm", "--lambda-reg", "0.5"]),
    "ssm-mono": ("(3) ssm monostable", ["--arch", "ssm", "--monostable"]),
    "ssm-nobank": ("(4) ssm without banks", ["--arch", "ssm", "--set", "oscillators=false"]),
    # The same two models trained on CE alone (u still clamped), as the tiny preset now does:
    # the regulariser is what made the bistable runs chaotic (benchmarks/RESULTS.md).
    "v3-ce": ("(1b) v3 bistable, CE only", ["--arch", "v3", "--lambda-reg", "0"]),
    "ssm-ce": ("(2b) ssm bistable, CE only", ["--arch", "ssm", "--lambda-reg", "0"]),
}
# The recipe is pinned here (the tiny preset's as of 2026-11-30, when these runs started) so that
# a later change of the preset does not mix two recipes in one table.
RECIPE = ["--batch-size", "16", "--grad-accum", "1", "--seq-length", "64"]
RECIPE += ["--lr", "3e-2", "--warmup", "30", "--beta2", "0.99", "--eval-batches", "8"]
INTERVENED = ("ssm", "ssm-ce")  # the configurations `kssm intervene` runs on
# Reference cross-entropies (nats per cl100k token, valid split): ../shared/docs/environment.md
BASELINES = {"wiki-leads": (7.48, 5.84), "sotu": (7.14, 5.90)}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/corpora/wiki-leads", help="corpus folder")
    p.add_argument("--steps", type=int, default=600, help="optimizer updates (= --decay-steps)")
    p.add_argument("--seeds", default="42", help="comma list, e.g. 42,7,1")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--out", default="runs/ssm_experiment", help="folder for the run folders")
    p.add_argument("--table", default=None, help="markdown output (default: OUT/SSM_RESULTS.md)")
    p.add_argument("--eval-every", type=int, default=0, help="0: a divisor of --steps, ~steps/4")
    p.add_argument("--intervene", default="0.1,0.5,0.9", help="target Rs for (2), (2b); or 'none'")
    p.add_argument("--trials", type=int, default=2, help="intervene: generations per prompt")
    p.add_argument("--max-tokens", type=int, default=24, help="intervene: tokens per generation")
    p.add_argument("--eval-tokens", type=int, default=2048, help="intervene: teacher-forced")
    p.add_argument("--table-only", action="store_true", help="train nothing; rewrite the table")
    a = p.parse_args(argv)
    a.data = Path(a.data)
    if not (a.data / "train.txt").is_file() or not (a.data / "valid.txt").is_file():
        fail(f"--data {a.data}: expected a folder with train.txt and valid.txt")
    if a.steps < 1 or not all(s.strip().isdigit() for s in a.seeds.split(",")):
        fail("--steps must be at least 1 and --seeds a comma list of integers >= 0")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.configs = [c.strip() for c in a.configs.split(",")]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        fail(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if a.eval_every < 0 or (a.eval_every and a.steps % a.eval_every):
        fail(f"--eval-every must divide --steps {a.steps} so the last eval is at the last step")
    a.eval_every = a.eval_every or eval_interval(a.steps)
    a.out = Path(a.out)
    a.table = Path(a.table) if a.table else a.out / "SSM_RESULTS.md"
    return a


def eval_interval(steps: int, evals: int = 4) -> int:
    """The smallest divisor of steps that gives at most `evals` evaluations."""
    return next(d for d in range(math.ceil(steps / evals), steps + 1) if steps % d == 0)


def kssm() -> str:
    beside = Path(sys.executable).parent / "kssm"
    found = str(beside) if beside.exists() else shutil.which("kssm")
    return found or fail("the kssm command is not installed: pip install -e . in this repository")


def run_dir(a, config: str, seed: int) -> Path:
    return a.out / a.data.name / f"steps{a.steps}" / config / f"seed{seed}"


def intervene_json(a, config: str, seed: int) -> Path:
    return run_dir(a, config, seed).parent / f"seed{seed}.intervene.json"


def stream(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run cmd, echo and append its output to log; returns (exit code, wall seconds)."""
    print("$ " + shlex.join(["kssm", *cmd[1:]]), flush=True)
    return run_logged(cmd, log)


def train(a, config: str, seed: int) -> None:
    run = run_dir(a, config, seed)
    if final_eval(run, a.steps):
        print(f"done already: {run}")
        return
    cfg_file = run / "train_config.json"
    if cfg_file.exists():  # resume: the folder's recorded arguments hold
        recorded = json.loads(cfg_file.read_text())["train"]
        if recorded["steps"] != a.steps or recorded["seed"] != seed:
            fail(f"{run} holds a run of {recorded['steps']} steps, seed {recorded['seed']}")
    has_ckpt = any((run / "checkpoints").glob("step_*"))
    if has_ckpt:
        cmd = [kssm(), "train", "--resume", "--out", str(run)]
    else:
        if run.exists() and any(run.iterdir()):  # started, killed before its first checkpoint
            aside = run.with_name(f"{run.name}.unfinished-{int(time.time())}")
            run.rename(aside)
            print(f"{run} had no checkpoint; kept it as {aside} and start again")
        run.parent.mkdir(parents=True, exist_ok=True)
        cmd = [kssm(), "train", "--preset", "tiny", *RECIPE, *CONFIGS[config][1]]
        cmd += ["--data", str(a.data), "--seed", str(seed), "--out", str(run)]
        cmd += ["--steps", str(a.steps), "--decay-steps", str(a.steps)]
        cmd += ["--eval-every", str(a.eval_every), "--save-every", str(a.eval_every)]
        cmd += ["--keep-last", "2"]
    code, seconds = stream(cmd, run.parent / f"{run.name}.log")
    wall_file = run.parent / f"{run.name}.wall.json"
    legs = json.loads(wall_file.read_text()) if wall_file.exists() else []
    legs.append({"seconds": seconds, "exit": code, "command": shlex.join(cmd[1:])})
    write_text(wall_file, json.dumps(legs, indent=1))
    if code != 0:
        print(f"kssm train exited {code} for {config} seed {seed}; continuing", file=sys.stderr)


def intervene(a, config: str, seed: int) -> None:
    run, out = run_dir(a, config, seed), intervene_json(a, config, seed)
    if out.exists() or not final_eval(run, a.steps):
        return
    cmd = [kssm(), "intervene", "--model", str(run), "--force-r", a.intervene]
    cmd += ["--text", str(a.data / "valid.txt"), "--trials", str(a.trials)]
    cmd += ["--max-tokens", str(a.max_tokens), "--eval-tokens", str(a.eval_tokens)]
    cmd += ["--json", str(out), "--report", str(run.parent / f"{run.name}.intervene.md")]
    code, _ = stream(cmd, run.parent / f"{run.name}.log")
    if code:
        print(f"kssm intervene exited {code} for {config} seed {seed}", file=sys.stderr)


# ---------------------------------------------------------------------------- collecting


def gather(a) -> dict:
    """Everything the table shows, read back from the run folders."""
    results = {c: {s: collect(a, c, s) for s in a.seeds} for c in a.configs}
    done = [(c, s) for c in a.configs for s in a.seeds if results[c][s]]
    interventions = {}  # config -> seed -> kssm intervene's JSON
    for config in (c for c in INTERVENED if c in a.configs):
        for seed in a.seeds:
            path = intervene_json(a, config, seed)
            if path.exists():
                interventions.setdefault(config, {})[seed] = json.loads(path.read_text())
    return {
        "results": results,
        "labels": {c: label for c, (label, _) in CONFIGS.items()},
        "baselines": BASELINES.get(a.data.name, (None, None)),
        "train_config": json.loads((run_dir(a, *done[0]) / "train_config.json").read_text())
        if done
        else None,
        "interventions": interventions,
    }


def collect(a, config: str, seed: int) -> dict | None:
    run = run_dir(a, config, seed)
    last = final_eval(run, a.steps)
    if last is None:
        return None
    rows = read_jsonl(run / "metrics.jsonl")
    # A resumed leg repeats the steps after its checkpoint: keep each step's last row.
    trains = sorted({r["step"]: r for r in rows if r.get("kind") == "train"}.items())
    evals = sorted({r["step"]: r for r in rows if r.get("kind") == "eval"}.items())
    legs = json.loads((run.parent / f"{run.name}.wall.json").read_text())
    return {
        "val_ce": last["val_ce"],
        "val_R": last.get("val_R", math.nan),
        "val_u": last.get("val_u", math.nan),
        "tok_s": trains[-1][1]["tokens"] / trains[-1][1]["elapsed_s"],
        "wall_s": sum(leg["seconds"] for leg in legs),
        "params": json.loads((run / "train_config.json").read_text())["n_params"],
        "skipped": sum(r.get("skipped", 0) for _, r in trains),
        "R_path": [(step, r.get("val_R")) for step, r in evals],
        "ce_path": [(step, r["val_ce"]) for step, r in evals],
        "sample": last.get("sample", ""),
        "started": next(r["time"] for r in rows if r.get("kind") == "start"),
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    argv = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--table-only"]
    command = "python benchmarks/ssm_experiment.py " + shlex.join(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.table.parent.mkdir(parents=True, exist_ok=True)

    def write_table():
        write_text(a.table, ssm_report.table(a, command, **gather(a)))
        print(f"table: {a.table}")

    if not a.table_only:
        for seed in a.seeds:
            for config in a.configs:
                train(a, config, seed)
                write_table()
            for config in INTERVENED if a.intervene.lower() != "none" else ():
                if config in a.configs:
                    intervene(a, config, seed)
    write_table()


if __name__ == "__main__":
    main()
