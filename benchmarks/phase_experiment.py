"""Issue 12's experiment: was Phase-Mamba's published null result (forcing R: ANOVA p = 0.44)
an artifact of the eval-mode hook, of the normalisation, or real?

On one small base (a frozen mlx-lm Mamba; trained here with `kssm train --arch mamba_lm` when
no --base is given) it trains an oscillator core per leg, with the same schedule and seed:

    faithful        the original: modulates in training only, observes in eval; middle layer
    multiplicative  the same modulation, active at inference; middle layer
    additive        h + s * to_modulation(sin phi) (the paper's first fix); middle layer
    late            multiplicative at the last layer (the paper's "hook a late layer")
    several         multiplicative at a quarter, the middle and the last layer

"Middle" is layer n/2 of n, as the original's layer 32 of Mamba-2.8B's 64. Then, per leg,
`kssm compare BASE LEG` (the baseline comparison) and `kssm intervene LEG --force-r ...`
(teacher-forced KL and dCE, entropy, distinct-2, p-values, ANOVA), measures how far the cores
move their layers' outputs (phase_coupling_size.py), and writes a markdown table
(phase_report.py). Rerunning skips finished steps and resumes interrupted training; --table-only
only rewrites the table.

    python benchmarks/phase_experiment.py --base /tmp/base/best --steps 12 \\
        --out runs/phase_experiment --table benchmarks/PHASE_RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phase_report  # noqa: E402  (beside this script)
from run_records import final_eval, read_jsonl, run_logged, write_text  # noqa: E402

LEGS = {  # name -> (coupling, where the core is hooked)
    "faithful": ("faithful", "middle"),
    "multiplicative": ("multiplicative", "middle"),
    "additive": ("additive", "middle"),
    "late": ("multiplicative", "late"),
    "several": ("multiplicative", "several"),
}
# The paper's experiments use 8 prompts; its prompts are not published, so these are ours,
# in the register of the training text (encyclopaedic English).
PROMPTS = (
    "The history of the city",
    "In the early twentieth century,",
    "The species is found in",
    "He was born in",
    "The album was released",
    "The river flows through",
    "During the war, the army",
    "The university was founded",
)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def positive(name: str, value, minimum=1) -> None:
    if not value >= minimum:  # also rejects NaN
        fail(f"--{name} must be at least {minimum}, got {value}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="mlx-lm Mamba folder; default: train one")
    p.add_argument("--base-steps", type=int, default=300, help="steps when training the base")
    p.add_argument("--data", default="../shared/corpora/wiki-leads", help="corpus folder")
    p.add_argument("--legs", default=",".join(LEGS), help=f"subset of {','.join(LEGS)}")
    p.add_argument("--steps", type=int, default=100, help="core training steps per leg")
    p.add_argument("--batch-size", type=int, default=16, help="core training sequences/step")
    p.add_argument("--seq-length", type=int, default=64, help="core training tokens/sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="core learning rate (AdamW, cosine)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches at the end")
    p.add_argument("--seed", type=int, default=42, help="training seed, the same for every leg")
    p.add_argument("--force-r", default="0.1,0.3,0.5,0.7,0.9", help="intervene targets")
    p.add_argument("--trials", type=int, default=5, help="generations per prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per generation")
    p.add_argument("--eval-tokens", type=int, default=2048, help="intervene: teacher-forced")
    p.add_argument("--out", default="runs/phase_experiment", help="folder for everything")
    p.add_argument("--table", default=None, help="markdown output (default: OUT/PHASE_RESULTS.md)")
    p.add_argument("--table-only", action="store_true", help="run nothing; rewrite the table")
    a = p.parse_args(argv)
    a.data = Path(a.data)
    if not (a.data / "train.txt").is_file() or not (a.data / "valid.txt").is_file():
        fail(f"--data {a.data}: expected a folder with train.txt and valid.txt")
    for name in ("base_steps", "steps", "batch_size", "seq_length", "eval_batches"):
        positive(name.replace("_", "-"), getattr(a, name))
    for name in ("trials", "max_tokens", "eval_tokens"):
        positive(name.replace("_", "-"), getattr(a, name))
    positive("seed", a.seed, 0)
    if not 0 < a.lr < 1:  # also rejects NaN
        fail(f"--lr must be in (0, 1), got {a.lr}")
    a.legs = [leg.strip() for leg in a.legs.split(",")]
    unknown = [leg for leg in a.legs if leg not in LEGS]
    if unknown:
        fail(f"--legs: unknown {', '.join(unknown)}; choose from {', '.join(LEGS)}")
    try:
        targets = [float(r) for r in a.force_r.split(",")]
    except ValueError:
        fail(f"--force-r {a.force_r!r}: expected a comma list of numbers such as 0.1,0.5,0.9")
    if not all(0 <= r <= 1 for r in targets):
        fail(f"--force-r values must be in [0, 1], got {a.force_r}")
    a.out = Path(a.out)
    a.table = Path(a.table) if a.table else a.out / "PHASE_RESULTS.md"
    if a.base is not None:
        a.base = Path(a.base).expanduser().resolve()
        if not (a.base / "config.json").is_file():
            fail(f"--base {a.base}: expected an mlx-lm model folder with config.json")
    return a


def hook_layers(where: str, n_layers: int) -> list[int]:
    """The layers a leg hooks in a base of n_layers (the original: 32 of 64, "middle")."""
    last = n_layers - 1
    return {
        "middle": [n_layers // 2],
        "late": [last],
        "several": sorted({n_layers // 4, n_layers // 2, last}),
    }[where]


def base_layers(base: Path) -> int:
    config = json.loads((base / "config.json").read_text())
    n = config.get("num_hidden_layers") or config.get("n_layer")
    if not isinstance(n, int) or n < 1:
        fail(f"{base / 'config.json'} names no layer count (num_hidden_layers)")
    return n


# ---------------------------------------------------------------------------- running


def kssm() -> str:
    beside = Path(sys.executable).parent / "kssm"
    found = str(beside) if beside.exists() else shutil.which("kssm")
    if not found:
        fail("the kssm command is not installed: pip install -e . in this repository")
    return found


def base_run(a) -> Path:
    return a.out / "base"


def leg_dir(a, leg: str) -> Path:
    return a.out / "legs" / leg


def stream(cmd: list[str], log: Path, label: str | None = None) -> int:
    """Run cmd, echo and append its output to log; record its wall time (under label, by
    default the kssm subcommand); its exit code."""
    label = label or cmd[1]
    print("$ " + shlex.join(["kssm", *cmd[1:]] if label == cmd[1] else cmd), flush=True)
    code, seconds = run_logged(cmd, log)
    walls = log.with_suffix(".wall.json")
    rows = json.loads(walls.read_text()) if walls.exists() else []
    rows.append(
        {"command": label, "seconds": seconds, "exit": code, "commit": phase_report.commit()}
    )
    write_text(walls, json.dumps(rows, indent=1))
    if code:
        print(f"kssm {cmd[1]} exited {code}; see {log}", file=sys.stderr)
    return code


def train(run: Path, steps: int, fresh: list[str], log: Path) -> bool:
    """Train run to `steps` (fresh flags), resuming from its newest checkpoint; True when done."""
    if final_eval(run, steps):
        return True
    if any((run / "checkpoints").glob("step_*")):
        cmd = [kssm(), "train", "--resume", "--out", str(run)]
    else:
        if run.exists() and any(run.iterdir()):  # killed before its first checkpoint
            aside = run.with_name(f"{run.name}.unfinished-{int(time.time())}")
            run.rename(aside)
            print(f"{run} had no checkpoint; kept it as {aside} and start again")
        run.parent.mkdir(parents=True, exist_ok=True)
        cmd = [kssm(), "train", *fresh, "--out", str(run)]
    stream(cmd, log)
    return final_eval(run, steps) is not None


def ensure_base(a) -> Path:
    if a.base is not None:
        return a.base
    run = base_run(a)
    fresh = ["--arch", "mamba_lm", "--preset", "tiny", "--data", str(a.data)]
    fresh += ["--steps", str(a.base_steps), "--seed", str(a.seed), "--keep-last", "1"]
    fresh += ["--eval-every", str(a.base_steps), "--save-every", str(max(1, a.base_steps // 3))]
    if not train(run, a.base_steps, fresh, a.out / "base.log"):
        fail(f"training the base did not finish; see {a.out / 'base.log'} and rerun to resume")
    return run / "best"


def core_flags(a, base: Path, leg: str) -> list[str]:
    coupling, where = LEGS[leg]
    layers = hook_layers(where, base_layers(base))
    flags = ["--arch", "phase_mamba", "--base", str(base), "--preset", "tiny"]
    flags += ["--set", f"coupling={coupling}", "--set", f"hook_layers={json.dumps(layers)}"]
    flags += ["--data", str(a.data), "--seed", str(a.seed), "--steps", str(a.steps)]
    flags += ["--decay-steps", str(a.steps), "--warmup", str(max(1, a.steps // 10))]
    flags += ["--lr", f"{a.lr:g}", "--batch-size", str(a.batch_size)]
    flags += ["--seq-length", str(a.seq_length), "--eval-batches", str(a.eval_batches)]
    flags += ["--eval-every", str(a.steps), "--save-every", str(max(1, a.steps // 3))]
    return [*flags, "--keep-last", "1", "--log-every", "1"]


def sampling_flags(a) -> list[str]:
    prompts = a.out / "prompts.txt"
    if not prompts.exists():
        write_text(prompts, "\n".join(PROMPTS) + "\n")
    flags = ["--prompts", str(prompts), "--trials", str(a.trials)]
    return [*flags, "--max-tokens", str(a.max_tokens)]


def run_leg(a, base: Path, leg: str) -> None:
    run, log = leg_dir(a, leg), a.out / "legs" / f"{leg}.log"
    if not train(run, a.steps, core_flags(a, base, leg), log):
        print(f"{leg}: training did not finish; rerun to resume", file=sys.stderr)
        return
    compare = run.parent / f"{leg}.compare.json"
    if not compare.exists():
        cmd = [kssm(), "compare", str(base), str(run), *sampling_flags(a)]
        stream([*cmd, "--json", str(compare), "--report", str(compare.with_suffix(".md"))], log)
    intervene = run.parent / f"{leg}.intervene.json"
    if not intervene.exists():
        cmd = [kssm(), "intervene", "--model", str(run), "--force-r", a.force_r]
        cmd += [*sampling_flags(a), "--text", str(a.data / "valid.txt")]
        cmd += ["--eval-tokens", str(a.eval_tokens), "--json", str(intervene)]
        stream([*cmd, "--report", str(intervene.with_suffix(".md"))], log)
    size = run.parent / f"{leg}.size.json"
    if not size.exists():
        script = Path(__file__).resolve().parent / "phase_coupling_size.py"
        cmd = [sys.executable, str(script), str(run), str(a.data / "valid.txt")]
        stream([*cmd, "--json", str(size)], log, "size")


# ---------------------------------------------------------------------------- collecting


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def collect(a, leg: str) -> dict:
    """What the table shows of one leg, from its run folder and its experiment outputs."""
    run = leg_dir(a, leg)
    walls = load_json(a.out / "legs" / f"{leg}.wall.json") or []
    trains = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train"]
    config = load_json(run / "best" / "config.json") or {}
    return {
        "name": leg,
        "coupling": LEGS[leg][0],
        "hook_layers": config.get("hook_layers"),
        "eval": final_eval(run, a.steps),
        "last_train": trains[-1] if trains else None,
        "compare": load_json(run.parent / f"{leg}.compare.json"),
        "intervene": load_json(run.parent / f"{leg}.intervene.json"),
        "size": load_json(run.parent / f"{leg}.size.json"),
        "commits": sorted({w.get("commit", "?") for w in walls}),
        "runs": [f"{w['command']} {w.get('commit', '?')[:7]}" for w in walls],
        "seconds": {
            kind: sum(w["seconds"] for w in walls if w["command"] == kind)
            for kind in ("train", "compare", "intervene", "size")
        },
    }


def base_facts(a, base: Path | None) -> dict:
    """The base's path, fingerprint (as the cores record it), size and validation CE."""
    if base is None or not (base / "config.json").is_file():
        return {"path": str(base) if base else None}
    from mlx_kssm.models.phase_base import base_fingerprint

    best = load_json(base / "best.json") or {}
    train_config = load_json(base.parent / "train_config.json") or {}
    return {
        "path": str(base),
        "fingerprint": base_fingerprint(base),
        "config": json.loads((base / "config.json").read_text()),
        "val_ce": best.get("val_ce"),
        "step": best.get("step"),
        "train": train_config.get("train"),
        "self_trained": a.base is None,
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    command = "python benchmarks/phase_experiment.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    started = phase_report.now()
    a.out.mkdir(parents=True, exist_ok=True)
    ran = a.out / "command.json"  # the last command that ran legs: what --table-only shows
    if a.table_only and ran.exists():
        last = json.loads(ran.read_text())
        command = f"{last['command']}\n# table rewritten at {started} by: {command}"
        started = last["started"]
    elif not a.table_only:
        write_text(ran, json.dumps({"command": command, "started": started}))
    a.table.parent.mkdir(parents=True, exist_ok=True)
    base = a.base if a.base is not None else (base_run(a) / "best")

    def write_table() -> None:
        legs = [collect(a, leg) for leg in a.legs]
        settings = {**vars(a), "n_prompts": len(PROMPTS)}
        text = phase_report.render(settings, base_facts(a, base), legs, command, started)
        write_text(a.table, text)
        print(f"table: {a.table}")

    if not a.table_only:
        base = ensure_base(a)
        for leg in a.legs:
            run_leg(a, base, leg)
            write_table()
    write_table()


if __name__ == "__main__":
    main()
