"""Rerun the training commands whose results README.md and benchmarks/RESULTS.md state.

Each figure is one `kssm train` command, run exactly as published (only `--out` points at a
scratch folder). The script prints (and with ``--markdown FILE`` writes) a table with the
commit, the machine, the MLX version, and for each figure the wall time, the final validation
cross-entropy and the published value it should match.

    python benchmarks/reproduce_figures.py            # every figure (4 runs of the tiny preset)
    python benchmarks/reproduce_figures.py --quick    # the README's first command only
    python benchmarks/reproduce_figures.py --figures wiki-seed-42 wiki-seed-1

When a figure changes, update PUBLISHED below together with the document that states it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPORA = REPO.parent / "shared" / "corpora"  # the project's shared corpora folder
TOLERANCE = 0.03  # nats: how far a rerun may land from the published val CE and still "match"


@dataclass(frozen=True)
class Figure:
    name: str
    args: tuple[str, ...]  # `kssm train` arguments; {corpora} is filled in, --out is added
    published: float | None  # the final val CE the document states (None: not published yet)
    where: str  # the document that states it


def wiki_leads(seed: int, published: float | None) -> Figure:
    """The tiny preset with the published loss (CE + 0.5 reg: the tiny preset's own recipe
    before 2026-11-30) on wiki-leads, 300 steps."""
    args = ("--preset", "tiny", "--data", "{corpora}/wiki-leads", "--steps", "300")
    args += ("--lambda-reg", "0.5", "--seed", str(seed))
    return Figure(f"wiki-seed-{seed}", args, published, "RESULTS.md")


PUBLISHED = (
    Figure("readme", ("--preset", "tiny"), 5.687, "README.md, first command"),
    Figure("readme-reg", ("--preset", "tiny", "--lambda-reg", "0.5"), 6.435, "RESULTS.md"),
    wiki_leads(42, 6.895),
    wiki_leads(1, 6.496),
)
FIGURES = {f.name: f for f in PUBLISHED}


def figure_args(figure: Figure, corpora: Path) -> list[str]:
    return [a.replace("{corpora}", str(corpora)) for a in figure.args]


def command_text(figure: Figure) -> str:
    """The command as a reader types it (corpora under ../shared, the run folder elided)."""
    return shlex.join(["kssm", "train", *figure_args(figure, Path("../shared/corpora"))]) + (
        " --out OUT"
    )


# --------------------------------------------------------------------------- the machine


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes)" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines() -> list[str]:
    mlx = package_version("mlx")
    return [
        f"- commit: {git_commit()}",
        f"- machine: {platform.system()} {platform.machine()}, {cpu_model()}, "
        f"{os.cpu_count()} cores",
        f"- MLX {mlx}, numpy {package_version('numpy')}, Python {platform.python_version()}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- load average at start (1 min): {os.getloadavg()[0]:.2f}",
    ]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    figure: Figure
    wall_s: float
    train_s: float | None
    val_ce: float | None
    peak_rss_mib: float | None
    error: str = ""


def run_figure(figure: Figure, corpora: Path, out: Path, kssm: list[str]) -> Outcome:
    cmd = [*kssm, "train", *figure_args(figure, corpora), "--out", str(out)]
    print(f"[{figure.name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 1024  # KiB on Linux
    if code != 0:
        return Outcome(figure, wall, None, None, peak, f"exit {code}, see {out}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    trains = [r for r in rows if r.get("kind") == "train"]
    train_s = trains[-1].get("elapsed_s") if trains else None
    return Outcome(figure, wall, train_s, evals[-1]["val_ce"] if evals else None, peak)


def markdown(outcomes: list[Outcome], header: list[str]) -> str:
    lines = [*header, ""]
    lines.append(
        "| figure | command | wall time | of which steps | peak RSS | val CE | published |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for o in outcomes:
        val = f"{o.val_ce:.3f}" if o.val_ce is not None else f"failed ({o.error})"
        steps = f"{o.train_s:.0f} s" if o.train_s is not None else ""
        rss = f"{o.peak_rss_mib:.0f} MiB" if o.peak_rss_mib is not None else ""
        published = "" if o.figure.published is None else f"{o.figure.published:.3f}"
        if o.val_ce is not None and o.figure.published is not None:
            off = o.val_ce - o.figure.published
            published += f" ({off:+.3f}{'' if abs(off) <= TOLERANCE else ', MISS'})"
        cell = f"`{command_text(o.figure)}`"
        lines.append(
            f"| {o.figure.name} | {cell} | {o.wall_s:.0f} s | {steps} | {rss} | {val} | {published} |"
        )
    lines.append("")
    lines.append(
        f"val CE: validation cross-entropy at the last step (nats per cl100k token); a rerun "
        f"matches when within {TOLERANCE} of the published value."
    )
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Rerun the training figures of README.md and benchmarks/RESULTS.md."
    )
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument(
        "--figures", nargs="+", choices=list(FIGURES), help="which figures (default: all)"
    )
    pick.add_argument("--quick", action="store_true", help="only the README's first command")
    parser.add_argument(
        "--corpora", type=Path, default=DEFAULT_CORPORA, help=f"default {DEFAULT_CORPORA}"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--keep-runs", type=Path, help="keep the run folders in this new folder")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 unless every figure is within {TOLERANCE}"
    )
    return parser.parse_args(argv)


def find_kssm() -> list[str]:
    """The `kssm` of this Python's environment (else the first on PATH)."""
    kssm = shutil.which("kssm", path=str(Path(sys.executable).parent)) or shutil.which("kssm")
    if kssm is None:
        fail("no `kssm` command found; install the package (pip install -e .) in this Python")
    return [kssm]


def fail(message: str) -> None:
    print(f"reproduce_figures: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    names = ["readme"] if opts.quick else (opts.figures or list(FIGURES))
    figures = [FIGURES[n] for n in names]
    corpora = opts.corpora.resolve()
    if (
        any("{corpora}" in " ".join(f.args) for f in figures)
        and not (corpora / "wiki-leads" / "train.txt").is_file()
    ):
        fail(f"no wiki-leads corpus under {corpora}; pass --corpora FOLDER (or --quick)")
    if opts.markdown and not opts.markdown.resolve().parent.is_dir():
        fail(f"the folder of --markdown {opts.markdown} does not exist")
    if opts.keep_runs and opts.keep_runs.exists():
        fail(f"--keep-runs {opts.keep_runs} already exists; name a new folder")
    kssm_cmd = find_kssm()

    header = ["## Training figures, rerun by `benchmarks/reproduce_figures.py`", ""]
    header += machine_lines()
    runs = Path(tempfile.mkdtemp(prefix="kssm-figures-"))
    outcomes = []
    try:
        for figure in figures:
            outcomes.append(run_figure(figure, corpora, runs / figure.name, kssm_cmd))
            print(f"[{figure.name}] val CE {outcomes[-1].val_ce}", file=sys.stderr, flush=True)
    finally:
        if opts.keep_runs:
            shutil.move(str(runs), opts.keep_runs)
        else:
            shutil.rmtree(runs, ignore_errors=True)
    text = markdown(outcomes, header)
    print(text)
    if opts.markdown:
        write_atomically(opts.markdown, text)
    missed = [
        o
        for o in outcomes
        if o.val_ce is None
        or (o.figure.published is not None and abs(o.val_ce - o.figure.published) > TOLERANCE)
    ]
    return 1 if opts.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
