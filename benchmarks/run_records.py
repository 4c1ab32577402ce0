"""Reading and writing the run records the experiment scripts beside this file share."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(ln) for ln in lines if ln.endswith("}")]  # skips a line cut by a kill


def final_eval(run: Path, steps: int) -> dict | None:
    """The evaluation row of ``steps`` in a run folder's metrics.jsonl, if it was reached."""
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "eval"]
    return next((r for r in reversed(evals) if r["step"] == steps), None)


def write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run cmd, echo its output and append it to log; returns (exit code, wall seconds)."""
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
            out.flush()
        code = proc.wait()
    return code, time.perf_counter() - start
