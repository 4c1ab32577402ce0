"""Data-parallel training over mx.distributed: two local ranks (ring backend, loopback, free
ports picked at random) against one process. Every run is the tiny model of training_helpers.py.

Each launch costs two Python start-ups, so the cases share launches: one launch trains three
runs (noise on with the numpy head; noise off with the MLX head; NaN gradients on rank 1), one
is stopped by Ctrl+C and resumed, one loses a rank to kill -9, one to a frozen peer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from training_helpers import MODEL_FLAGS, RUN_FLAGS, args_for, rows
from training_helpers import token_data as token_data  # the module-scoped fixture

from mlx_kssm.distributed import Ranks, launched_as_rank
from mlx_kssm.io import checkpoint_dirs
from mlx_kssm.run_folder import load_trainer_state
from mlx_kssm.training import run_training

TIMEOUT_S = 30  # KSSM_DIST_TIMEOUT of the launched ranks: generous on a loaded CI machine
FROZEN_TIMEOUT_S = 8  # the bound under test with a frozen peer

# A rank running run_training on the jobs in argv[1]: [{"train", "model", "poison"}, ...].
# "poison": from that step on, rank 1's gradients are NaN before they are averaged.
RANK_SCRIPT = """
import json, sys
from mlx.utils import tree_map
from mlx_kssm import distributed
from mlx_kssm.config import TrainArgs
from mlx_kssm.models import model_args_from_config
from mlx_kssm.training import TrainingStopped, run_training

real_mean, poison = distributed.Ranks.mean, None
def mean(self, tree, what):
    step = int(what.rsplit(" ", 1)[-1]) if what.startswith("the gradient") else 0
    if self.rank == 1 and poison is not None and step >= poison:
        tree = (tree[0], tree_map(lambda g: g * float("nan"), tree[1]))
    return real_mean(self, tree, what)
distributed.Ranks.mean = mean
for job in json.loads(sys.argv[1]):
    poison = job.get("poison")
    try:
        run_training(TrainArgs.from_dict(job["train"]), model_args_from_config(job["model"]))
    except TrainingStopped as err:
        print(err)
"""


class Launch:
    """Two ranks started by hand as mlx.launch would (hostfile + MLX_RANK), each in its own
    session with its output in files; whatever is still running at the end is killed."""

    def __init__(self, tmp: Path, commands: list[list[str]], timeout_s: float = TIMEOUT_S):
        ports = free_ports(len(commands))
        hostfile = tmp / f"hosts-{ports[0]}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
        self.logs = [tmp / f"rank{r}-{ports[0]}" for r in range(len(commands))]
        self.procs = []
        for rank, command in enumerate(commands):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
            env.update({"KSSM_DIST_TIMEOUT": str(timeout_s), "KSSM_DIST_SETUP_TIMEOUT": "60"})
            out = open(f"{self.logs[rank]}.out", "w")
            err = open(f"{self.logs[rank]}.err", "w")
            self.procs.append(
                subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
            )
            out.close(), err.close()

    def wait(self, timeout: float = 120.0) -> list[int]:
        deadline = time.time() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"ranks still running after {timeout} s: {self.errs()}"
                ) from None
        return [p.returncode for p in self.procs]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

    def err(self, rank: int) -> str:
        return Path(f"{self.logs[rank]}.err").read_text()

    def out(self, rank: int) -> str:
        return Path(f"{self.logs[rank]}.out").read_text()

    def errs(self) -> str:
        return " | ".join(self.err(r)[-1500:] for r in range(len(self.procs)))


@pytest.fixture
def launches(tmp_path):
    started: list[Launch] = []

    def launch(commands, **kw):
        started.append(Launch(tmp_path, commands, **kw))
        return started[-1]

    yield launch
    for one in started:
        one.kill()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cli(token_data, out, *extra) -> list[str]:
    """`kssm train` on the tiny model, as test_training.py runs it."""
    program = "from mlx_kssm.cli.app import main; main()"
    command = [sys.executable, "-c", program, "train", "--data", str(token_data)]
    return command + ["--out", str(out), *RUN_FLAGS, *MODEL_FLAGS, *extra]


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    ckpt = checkpoint_dirs(run_dir)[-1]
    return {k: np.array(v) for k, v in mx.load(str(ckpt / "model.safetensors")).items()}


def worst_difference(run_a: Path, run_b: Path) -> float:
    a, b = weights(run_a), weights(run_b)
    assert a.keys() == b.keys() and len(a) > 20
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def wait_until(predicate, launch: Launch, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert all(p.poll() is None for p in launch.procs), launch.errs()
        time.sleep(0.05)
    raise AssertionError(f"timed out: {launch.errs()}")


def trained_steps(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in rows(run_dir, "train")), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


# --------------------------------------------------------------------------- alone


def test_a_process_without_a_launcher_is_alone_and_shards_nothing():
    assert not launched_as_rank({})
    assert launched_as_rank({"MLX_RANK": "1", "MLX_HOSTFILE": "/nonexistent"})
    ranks = Ranks()
    assert (ranks.size, ranks.rank, ranks.main) == (1, 0, True)
    assert [ranks.micro_index(m, 3) for m in range(3)] == [0, 1, 2]
    tree = {"a": mx.ones((2,)), "b": [mx.zeros((3,), dtype=mx.int32)]}
    assert ranks.mean(tree, "x") is tree and ranks.any(True, "x") and not ranks.any(False, "x")


def test_a_resume_that_reads_another_batch_per_step_says_how_to_keep_it():
    ranks = Ranks()
    two_ranks = {"world": {"size": 2, "windows_per_step": 8}, "train_args": {}}
    train, _ = args_for("unused", "unused", batch_size=4, grad_accum=2)
    assert ranks.batch_change(two_ranks, train) is None  # 1 x 4 x 2 = 2 x 4 x 1
    train, _ = args_for("unused", "unused", batch_size=4, grad_accum=1)
    message = ranks.batch_change(two_ranks, train)
    assert "read 8 windows per step; this one reads 4" in message
    assert message.endswith("make ranks x batch x accumulation = 8")
    older = {"train_args": {"batch_size": 4, "grad_accum": 1}}  # a checkpoint without "world"
    assert ranks.batch_change(older, train) is None


# --------------------------------------------------------------------------- equal numbers


def test_two_ranks_of_batch_b_equal_one_process_and_rank_0_alone_writes(
    token_data, tmp_path, launches
):
    """Noise on (numpy head): two ranks x batch 4 are one process x batch 4 x accumulation 2,
    micro-batch for micro-batch (same windows, same noise keys), to the bit. Noise off and no
    regulariser (MLX head): the loss is a mean over the batch's rows, so they are also one
    process x batch 8 (the issue's statement), to rounding: the rounding of two means of 4
    against one of 8, which Adam enlarges step by step (at lr 1e-2, 1.5e-5 after 6 steps even
    within one process; hence lr 1e-3 here). One evaluation batch for two ranks there: rank 1
    adds zeros."""
    n = 6
    noisy = dict(steps=n, head="numpy")
    plain = dict(steps=n, head="mlx", lambda_reg=0.0, eval_batches=1, eval_every=3, lr=1e-3)
    poisoned = dict(steps=20, max_nonfinite=2, save_every=2)
    jobs = {0: [], 1: []}
    for name, settings in (("noisy", noisy), ("plain", plain), ("poisoned", poisoned)):
        for rank in (0, 1):  # rank 1 is given folders of its own: it must create none
            train, model = args_for(token_data, tmp_path / f"{name}-rank{rank}", **settings)
            model.train_noise = name != "plain"
            job = {"train": train.to_dict(), "model": model.to_dict()}
            jobs[rank].append({**job, "poison": 5} if name == "poisoned" else job)
    script = [sys.executable, "-c", RANK_SCRIPT]
    launch = launches([script + [json.dumps(jobs[r])] for r in (0, 1)])
    assert launch.wait() == [0, 0], launch.errs()

    assert not any((tmp_path / f"{name}-rank1").exists() for name in ("noisy", "plain"))
    assert not (tmp_path / "poisoned-rank1").exists() and launch.err(1) == ""
    # Rank 1's NaN gradients reach rank 0 through the mean: both stop at step 6 (5 and 6 in
    # a row), rank 0 saying why, rank 1 pointing to it.
    assert "stopped at step 6: the loss or the gradients were not finite" in launch.out(0)
    assert launch.out(1) == "rank 1 of 2: stopped together with rank 0, whose output says why\n"
    assert [p.name for p in checkpoint_dirs(tmp_path / "poisoned-rank0")][-1] == "step_00000004"
    state = load_trainer_state(checkpoint_dirs(tmp_path / "noisy-rank0")[-1])
    assert state["data_position"]["windows"] == n * 8 and state["world"]["size"] == 2

    one = run_training(*args_for(token_data, tmp_path / "one-noisy", grad_accum=2, **noisy))
    assert worst_difference(tmp_path / "noisy-rank0", one) == 0.0
    # The same 8 validation windows, one batch of 4 per rank: the same sums.
    two_evals = [r["val_ce"] for r in rows(tmp_path / "noisy-rank0", "eval")]
    assert len(two_evals) == 2 and two_evals == [r["val_ce"] for r in rows(one, "eval")]
    train, model = args_for(token_data, tmp_path / "one-plain", batch_size=8, **plain)
    model.train_noise = False
    one = run_training(train, model)
    assert worst_difference(tmp_path / "plain-rank0", one) <= 1e-5
    evals = rows(tmp_path / "plain-rank0", "eval")
    assert [r["step"] for r in evals] == [3, 6] and all(np.isfinite(r["val_ce"]) for r in evals)


# --------------------------------------------------------------------------- stop together


def test_ctrl_c_stops_both_ranks_and_the_run_resumes_with_two_ranks_then_with_one(
    token_data, tmp_path, launches
):
    out = tmp_path / "run"
    launch = launches([cli(token_data, out, "--steps", "100000", "--decay-steps", "60")] * 2)
    wait_until(lambda: trained_steps(out) >= 4, launch)
    for proc in launch.procs:  # what a terminal's Ctrl+C does to the local ranks
        os.kill(proc.pid, signal.SIGINT)
    assert launch.wait(60) == [0, 0], launch.errs()
    assert "stopped at step" in launch.err(0) and launch.err(1) == ""
    assert not (out / "train.lock").exists()
    stopped = load_trainer_state(checkpoint_dirs(out)[-1])["step"]

    # Resume with two ranks, then with one (accumulating the other rank's share).
    resumed = launches([cli(token_data, out, "--resume", "--steps", str(stopped + 3))] * 2)
    assert resumed.wait() == [0, 0], resumed.errs()
    n = stopped + 6
    train, model = args_for(token_data, out, steps=n, grad_accum=2, decay_steps=60)
    run_training(train, model, resume=True)
    steps = [r["step"] for r in rows(out, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == n

    straight = args_for(token_data, tmp_path / "straight", steps=n, grad_accum=2, decay_steps=60)
    assert worst_difference(out, run_training(*straight)) == 0.0


@pytest.mark.parametrize("how", ["kill-9", "freeze"])
def test_a_lost_rank_ends_the_other_with_one_line_in_bounded_time(
    token_data, tmp_path, launches, how
):
    out = tmp_path / "run"
    command = cli(token_data, out, "--steps", "100000", "--decay-steps", "60")
    launch = launches([command] * 2, timeout_s=FROZEN_TIMEOUT_S)
    wait_until(lambda: trained_steps(out) >= 2, launch)
    victim, survivor = launch.procs[1], launch.procs[0]
    lost_at = time.time()
    os.kill(victim.pid, signal.SIGKILL if how == "kill-9" else signal.SIGSTOP)
    survivor.wait(timeout=FROZEN_TIMEOUT_S + 30)
    waited = time.time() - lost_at
    launch.kill()
    assert survivor.returncode == 1
    last = launch.err(0).strip().splitlines()[-1]
    if how == "kill-9":  # the closed socket is noticed at the next collective
        assert waited < 15, waited
        assert last.startswith("error: rank 0 of 2: lost the other ranks during"), last
        assert "the newest checkpoint is" in last and "--resume" in last
        kept = load_trainer_state(checkpoint_dirs(out)[-1])["step"]  # the last completed update
        assert kept == max(r["step"] for r in rows(out) if "step" in r)
    else:  # nothing is closed: the watchdog ends the waiting rank
        assert FROZEN_TIMEOUT_S - 3 <= waited < FROZEN_TIMEOUT_S + 15, waited  # (already waiting)
        assert last.startswith("error: rank 0 of 2: no answer from the other ranks for 8 s"), last


# --------------------------------------------------------------------------- setup


def test_rank_0s_refusal_stops_rank_1_at_once_with_a_line_pointing_to_it(
    token_data, tmp_path, launches
):
    out = tmp_path / "run"
    out.mkdir()
    lock = {"pid": os.getpid(), "host": os.uname().nodename, "since": "now"}  # a live one
    (out / "train.lock").write_text(json.dumps(lock))
    launch = launches([cli(token_data, out, "--steps", "4")] * 2)
    assert launch.wait(60) == [2, 1], launch.errs()
    assert "is being trained by pid" in launch.err(0).strip().splitlines()[-1]
    assert launch.err(1).strip() == (
        "error: rank 1 of 2: stopped because rank 0 failed while taking the lock "
        "(its output says why)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"]


def test_a_rank_whose_peers_never_come_ends_with_one_line(token_data, tmp_path):
    """mx.distributed.init blocks, holding the GIL, until every rank has connected."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(2)]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    env["KSSM_DIST_SETUP_TIMEOUT"] = "2"
    started = time.time()
    proc = subprocess.run(
        cli(token_data, tmp_path / "run", "--steps", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.time() - started < 30 and proc.returncode != 0
    assert proc.stderr.strip() == (
        "error: rank 0: could not connect to the other ranks within 2 s; check that every "
        "rank was started, the hostfile's addresses and the firewall (set "
        "KSSM_DIST_SETUP_TIMEOUT to wait longer)"
    )
    assert not (tmp_path / "run").exists()
