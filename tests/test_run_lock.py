"""RUN/train.lock: one training per run folder, races included; a dead holder's lock is free."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import pytest

from mlx_kssm.run_lock import LOCK_NAME, RunLock, RunLocked

TRIALS = 200
HOLDER = """
import sys, time
from mlx_kssm.run_lock import RunLock
lock = RunLock(sys.argv[1]).__enter__()
print("held", flush=True)
time.sleep(120)
"""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def old_format(pid: int, host: str | None = None, since: str = "then") -> str:
    """A lock record as the pid-based lock wrote it (no OS lock, no "lock" field)."""
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": since})


# --------------------------------------------------------------------------- races


def _contender(root: str, n_trials: int, barrier, wins) -> None:
    """One of two processes: in each trial, try to take the lock at the same moment as the
    other, and keep it until both have tried (so the loser cannot win after a release)."""
    for trial in range(n_trials):
        lock = RunLock(os.path.join(root, f"t{trial}"))
        barrier.wait()
        try:
            lock.__enter__()
            won = True
        except RunLocked:
            won = False
        barrier.wait()
        if won:
            with wins.get_lock():
                wins[trial] += 1
            lock.release()


def _hammer(root: str, rounds: int, overlaps, taken) -> None:
    """Take and release one folder's lock over and over, checking nobody else is inside."""
    inside = os.path.join(root, "inside")
    for _ in range(rounds):
        try:
            lock = RunLock(root).__enter__()
        except RunLocked:
            continue
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with overlaps.get_lock():
                overlaps.value += 1
        else:
            os.close(fd)
            os.unlink(inside)
        with taken.get_lock():
            taken.value += 1
        lock.release()


def test_two_processes_racing_for_a_stale_lock_one_wins_every_time(tmp_path):
    """The pid-based lock let both racers take over a stale lock (18 of 200 trials)."""
    pid = dead_pid()
    leftovers = [
        None,  # no file
        "",  # created, never written (killed at once)
        json.dumps({"lock": "flock", "pid": pid, "host": socket.gethostname(), "since": "x"}),
        old_format(pid),  # the pid-based format, holder dead
    ]
    for trial in range(TRIALS):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        left = leftovers[trial % len(leftovers)]
        if left is not None:
            (folder / LOCK_NAME).write_text(left)
    ctx = multiprocessing.get_context("spawn")
    barrier, wins = ctx.Barrier(2, timeout=60), ctx.Array("i", TRIALS)
    procs = [
        ctx.Process(target=_contender, args=(str(tmp_path), TRIALS, barrier, wins))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    assert list(wins) == [1] * TRIALS
    assert not any((tmp_path / f"t{t}" / LOCK_NAME).exists() for t in range(TRIALS))


def test_taking_and_releasing_in_a_loop_never_lets_two_in(tmp_path):
    """The holder deletes the file on exit: a process that opened it just before must not
    then hold a lock on a file that is no longer the lock."""
    ctx = multiprocessing.get_context("spawn")
    overlaps, taken = ctx.Value("i", 0), ctx.Value("i", 0)
    procs = [
        ctx.Process(target=_hammer, args=(str(tmp_path), 400, overlaps, taken)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert overlaps.value == 0 and taken.value > 100


# --------------------------------------------------------------------------- holders


def test_a_live_holder_is_named_and_a_killed_ones_lock_is_taken(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path).__enter__()
        message = str(err.value)
        assert f"being trained by pid {holder.pid} since " in message
        assert "wait for it or choose another --out" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # kill -9 leaves the file, but not the OS lock
    said = []
    with RunLock(tmp_path, say=said.append) as lock:
        assert lock.held
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["lock"] == "flock"
    assert said == [f"taking over a stale lock left by pid {holder.pid} ({tmp_path / LOCK_NAME})"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"by pid {os.getpid()} since"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # free again once released
        pass


def test_an_exception_inside_releases_and_removes_the_file(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path, say=pytest.fail):  # no leftover, nothing to say
        pass


def test_a_file_put_in_its_place_is_not_deleted(tmp_path):
    with RunLock(tmp_path):
        (tmp_path / "other").write_text("someone else's")
        os.replace(tmp_path / "other", tmp_path / LOCK_NAME)
    assert (tmp_path / LOCK_NAME).read_text() == "someone else's"


# --------------------------------------------------------------------------- the older format


def test_older_format_with_a_live_pid_refuses_and_keeps_the_file(tmp_path):
    record = old_format(os.getpid(), since="2024-01-01T00:00:00")
    (tmp_path / LOCK_NAME).write_text(record)
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path).__enter__()
    assert f"pid {os.getpid()} since 2024-01-01T00:00:00; wait for it" in str(err.value)
    assert (tmp_path / LOCK_NAME).read_text() == record


def test_older_format_with_a_dead_pid_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(old_format(pid))
    said = []
    with RunLock(tmp_path, say=said.append):
        pass
    assert len(said) == 1 and f"stale lock left by pid {pid}" in said[0]


def test_a_record_from_another_machine_refuses_and_says_what_to_do(tmp_path):
    (tmp_path / LOCK_NAME).write_text(old_format(123, host="elsewhere-" + "x" * 500))
    with pytest.raises(RunLocked) as err:
        RunLock(tmp_path).__enter__()
    message = str(err.value)
    assert "being trained on elsewhere-" in message and f"delete {tmp_path / LOCK_NAME}" in message
    assert len(message) < 300  # the file's values are cut short


@pytest.mark.parametrize("content", ["not json {", "[1, 2]", "x" * 1_000_000])
def test_an_unreadable_leftover_is_taken_over(tmp_path, content):
    (tmp_path / LOCK_NAME).write_text(content)
    said = []
    with RunLock(tmp_path, say=said.append):
        pass
    assert len(said) == 1 and "unreadable record" in said[0]


# --------------------------------------------------------------------------- bad places


def test_a_symlinked_lock_file_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunLocked, match="symbolic link") as err:
        RunLock(run).__enter__()
    assert "\n" not in str(err.value) and target.read_text() == "keep me"


def test_a_missing_run_folder_is_one_line(tmp_path):
    with pytest.raises(RunLocked, match="choose a writable --out"):
        RunLock(tmp_path / "missing").__enter__()


def test_a_console_is_accepted_as_say(tmp_path):
    class Console:
        def __init__(self):
            self.lines = []

        def print(self, line):
            self.lines.append(line)

    (tmp_path / LOCK_NAME).write_text(old_format(dead_pid()))
    console = Console()
    with RunLock(tmp_path, console):
        pass
    assert len(console.lines) == 1 and "stale lock" in console.lines[0]
