"""Fuzz-style: many malformed checkpoints (seeded mutations of a valid one, crafted pickles for
each bound, zip tricks, non-files), each converted by `kssm convert` in one child process
under a memory cap (RLIMIT_AS) and a time cap. Every one must end in exit code 2 with a
one-line error (byte flips may also convert to exactly the clean result), within bounded time
and memory measured per file.

The child converts all files in-process (one MLX start-up); a driver script reports one JSON
line per file: exit code, stderr, seconds and peak resident memory (the kernel's high-water
mark, reset before each file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
from convert_helpers import (
    one_storage_state,
    sgd_checkpoint,
    source_weights,
    state_dict,
    training_checkpoint,
)
from torch_zip_writer import (
    PROTO2,
    Global,
    deep_dict,
    deep_marked_lists,
    deep_tuple_key,
    doubling_tuples,
    huge_integer,
    late_deep_chain,
    late_doubling_lists,
    local_header_offset,
    many_operations,
    memo_far_ahead,
    patch_central_entry,
    pickle_checkpoint,
    self_containing_list,
    tensor,
    write_checkpoint,
    write_pickle_archive,
    write_raw_zip,
    zeros_deflated,
)

SEED = 20240611
MEMORY_CAP = 1536 << 20  # address space of the child; a clean conversion peaks near 340 MB
SECONDS_PER_FILE = 30.0  # catches hangs; measured 0.02-2 s idle, up to 12.7 s at load average 8
PEAK_MB_PER_FILE = 400  # above the resident memory before the file
TOTAL_TIMEOUT = 300

DRIVER = r"""
import json, os, resource, sys, time
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from typer.testing import CliRunner
from mlx_kssm.cli.app import app

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

runner = CliRunner()
for case in json.loads(sys.stdin.read()):
    print(json.dumps({"start": case["label"]}), flush=True)
    before = rss_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark
    start = time.perf_counter()
    result = runner.invoke(app, ["convert", case["src"], case["out"]])
    seconds = time.perf_counter() - start
    weights = os.path.join(case["out"], "model.safetensors")
    digest = None
    if result.exit_code == 0 and os.path.exists(weights):
        import hashlib
        digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    print(json.dumps({
        "label": case["label"], "exit": result.exit_code, "stderr": result.stderr,
        "exception": repr(result.exception) if result.exit_code not in (0, 2) else None,
        "seconds": seconds, "peak_mb": (rss_kb("VmHWM:") - before) / 1024, "digest": digest,
    }), flush=True)
"""


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def rezip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def deflate_bomb(path: Path, name: str, megabytes: int, others: dict[str, bytes]) -> Path:
    """A member of ``megabytes`` zeros, deflated to ~1/1000 of that, beside stored ``others``."""
    stream, crc = zeros_deflated(megabytes)
    return write_raw_zip(path, {name: (stream, crc, megabytes << 20), **others})


def build_corpus(root: Path) -> list[dict]:
    """label -> file; "flip" cases may also convert, to exactly the clean result."""
    rng = np.random.default_rng(SEED)
    weights = source_weights()
    good = write_checkpoint(root / "good.pt", training_checkpoint(weights))
    data = good.read_bytes()
    files: dict[str, tuple[Path, str]] = {"clean": (good, "ok")}

    def add(label: str, path: Path, expect: str = "refuse"):
        files[label] = (path, expect)

    def raw(label: str, payload: bytes, expect: str = "refuse"):
        path = root / f"{len(files)}.pt"
        path.write_bytes(payload)
        add(label, path, expect)

    # 1. seeded damage of the valid file: byte flips anywhere, truncations
    for i, pos in enumerate(rng.integers(0, len(data), size=24)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        raw(f"flip {i} at byte {pos}", bytes(damaged), "flip")
    for cut in sorted(rng.integers(0, len(data), size=8)):
        raw(f"truncated to {cut} bytes", data[:cut])
    # 2. damage inside data.pkl, re-zipped with a valid CRC so that it reaches the unpickler
    archive = members_of(good)
    pkl = archive["archive/data.pkl"]
    for i in range(24):
        mutated = bytearray(pkl)
        for pos in rng.integers(0, len(pkl), size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        path = rezip(root / f"pkl{i}.pt", {**archive, "archive/data.pkl": bytes(mutated)})
        add(f"data.pkl mutation {i}", path, "any")
    # 3. a crafted pickle for each bound
    crafted = {
        "tuple 200,000 deep as a dict key": deep_tuple_key(200_000),
        "dict 20,000 deep": deep_dict(20_000),
        "marks 100,000 deep": deep_marked_lists(100_000),
        "memo index 2**27": memo_far_ahead(),
        "text memo index 2**27": memo_far_ahead(text=True),
        "tuple doubling 40 levels": doubling_tuples(40),
        "lists doubling 40 levels, filled late": late_doubling_lists(40),
        "chain 5,000 deep, filled late": late_deep_chain(5_000),
        "list containing itself": self_containing_list(),
        "1 MB integer": huge_integer(1 << 20),
        "2.1M operations": many_operations(1_050_000),
        "extension code": PROTO2 + b"\x82\x01.",
        "out-of-band buffer": b"\x80\x05\x97.",
        "unknown opcode": PROTO2 + b"\xff.",
        "stack underflow": PROTO2 + b"a.",
        "os.system": pickle_checkpoint({"x": Global("posix", "system")})[0],
    }
    for label, payload in crafted.items():
        add(label, write_pickle_archive(root / f"{len(files)}.pt", payload))
    groups = training_checkpoint(weights)
    group = groups["optimizer_state"]["param_groups"][0]
    groups["optimizer_state"]["param_groups"] = [{**group, "params": list(range(15_000))}] * 15_000
    add("param_groups 15,000 x 15,000", write_checkpoint(root / "groups.pt", groups))
    long_key = state_dict(weights)
    long_key["k" * 600_000] = tensor(np.zeros(2))
    add("600 KB key", write_checkpoint(root / "key.pt", long_key))
    add(
        "3,000 layers viewing one storage",
        write_checkpoint(root / "views.pt", one_storage_state(3000)),
    )
    cyclic = training_checkpoint(weights)
    cyclic["history"].append(cyclic["history"])
    add("history containing itself", write_checkpoint(root / "cyclic.pt", cyclic))
    # 4. zip tricks
    for name in ("archive/data/1", "archive/data.pkl"):
        path = root / f"dup{len(files)}.pt"
        path.write_bytes(data)
        with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as zf:
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate it writes
            zf.writestr(name, bytes(len(archive[name])) if "/data/" in name else b"\x80\x02}.")
        add(f"two members named {name}", path)
    tricks = {
        "encrypted member": patch_central_entry(data, "archive/data/0", flags=1),
        "bzip2 member": patch_central_entry(data, "archive/data/0", method=12),
        "stored member with two sizes": patch_central_entry(data, "archive/data/0", size=8),
        "overlapping members": patch_central_entry(
            data, "archive/data/0", offset=local_header_offset(data, "archive/byteorder")
        ),
        "member past the end": patch_central_entry(data, "archive/data/0", offset=len(data) - 9),
    }
    for label, payload in tricks.items():
        raw(label, payload)
    stray = root / "stray.pt"
    stray.write_bytes(data)
    with zipfile.ZipFile(stray, "a") as zf:
        zf.writestr("other/data/0", b"1234")
    add("member outside the folder", stray)
    directory = bytearray(data)
    struct_at = directory.rfind(b"PK\x05\x06") + 12
    directory[struct_at : struct_at + 4] = (200 << 20).to_bytes(4, "little")
    raw("200 MB zip directory", bytes(directory))
    rest = {k: v for k, v in archive.items() if k != "archive/data.pkl"}
    bomb = deflate_bomb(root / "bomb.pt", "archive/data.pkl", 600, rest)
    assert bomb.stat().st_size < 2 << 20  # 600 MB in about 600 KB
    add("600 MB data.pkl deflated", bomb)
    storages = {k: v for k, v in archive.items() if k != "archive/data/0"}
    add("300 MB storage deflated", deflate_bomb(root / "sbomb.pt", "archive/data/0", 300, storages))
    assert (root / "sbomb.pt").stat().st_size < 2 << 20
    for label, order in [("byteorder bomb", b"little" * 50_000), ("byteorder garbage", b"middle")]:
        add(label, rezip(root / f"o{len(files)}.pt", {**archive, "archive/byteorder": order}))
    liar = rezip(root / "liar.pt", {**archive, "archive/byteorder": b"big"})
    add("byteorder record saying big over little data", liar)
    # 5. valid files that are not what is expected, and things that are not files
    add("SGD optimizer state", write_checkpoint(root / "sgd.pt", sgd_checkpoint(weights)), "ok")
    os.mkfifo(root / "fifo.pt")
    add("a FIFO", root / "fifo.pt")
    if os.path.exists("/dev/zero"):
        add("a device", Path("/dev/zero"))
    empty = root / "empty"
    empty.mkdir()
    add("a folder without checkpoints", empty)
    return [
        {"label": label, "src": str(path), "out": str(root / "outs" / str(i)), "expect": expect}
        for i, (label, (path, expect)) in enumerate(files.items())
    ]


def run_driver(corpus: list[dict]) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(MEMORY_CAP)],
        input=json.dumps(corpus),
        capture_output=True,
        text=True,
        timeout=TOTAL_TIMEOUT,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {line["label"]: line for line in lines if "exit" in line}
    started = [line["start"] for line in lines if "start" in line]
    assert proc.returncode == 0, (
        f"the driver died (code {proc.returncode}) on {started[-1] if started else '?'}: "
        f"{proc.stderr[-2000:]}"
    )
    return results


def test_malformed_checkpoints_are_refused_within_bounds(tmp_path):
    corpus = build_corpus(tmp_path)
    results = run_driver(corpus)
    clean = results["clean"]
    assert clean["exit"] == 0 and clean["digest"], clean
    problems, converted_flips = [], 0
    for case in corpus:
        got = results[case["label"]]
        label, expect = case["label"], case["expect"]
        if got["exit"] == 0 and expect in ("ok", "any"):
            continue
        if got["exit"] == 0 and expect == "flip":
            converted_flips += 1
            if got["digest"] != clean["digest"]:
                problems.append(f"{label}: converted to different weights")
            continue
        if expect == "ok" or got["exit"] != 2:
            problems.append(f"{label}: exit {got['exit']} {got['exception'] or got['stderr']}")
            continue
        stderr = got["stderr"]
        if not stderr.startswith("error: ") or stderr.count("\n") != 1 or len(stderr) > 600:
            problems.append(f"{label}: not a short one-line error: {stderr[:300]!r}")
        if got["seconds"] > SECONDS_PER_FILE or got["peak_mb"] > PEAK_MB_PER_FILE:
            problems.append(f"{label}: {got['seconds']:.2f} s, {got['peak_mb']:.0f} MB")
    if os.environ.get("KSSM_FUZZ_REPORT"):  # the measured figures, for the record
        for case in corpus:
            got = results[case["label"]]
            print(
                f"  {got['exit']}  {got['seconds']:6.3f} s  {got['peak_mb']:7.1f} MB  {case['label']}"
            )
    assert not problems, "\n".join(problems)
    refused = sum(results[c["label"]]["exit"] == 2 for c in corpus)
    assert refused > len(corpus) * 0.7, (refused, len(corpus))  # most cases are refusals
    assert converted_flips < 24  # most flips hit a CRC or a header
