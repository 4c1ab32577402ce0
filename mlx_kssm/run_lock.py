"""``RUN/train.lock``: two trainings never write one run folder."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "train.lock"


class RunLocked(ValueError):
    """The run folder is being written by another training (one line, exit code 2)."""


class RunLock:
    """``RUN/train.lock`` (pid, host, start time) so that two trainings never write one folder.
    A lock left by a dead process on this machine is taken over, with a message."""

    def __init__(self, run_dir: Path, console=None):
        self.path = Path(run_dir) / LOCK_NAME
        self.console = console
        self.held = False

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}, f)
            self.held = True
            return self
        raise RunLocked(f"cannot take the lock {self.path}")

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - _mtime(self.path) < 10:  # maybe being written right now
                raise RunLocked(f"{self.path.parent} is locked ({self.path})") from None
            owner, pid, host = {}, None, socket.gethostname()
        if host != socket.gethostname():
            raise RunLocked(
                f"{self.path.parent} is being trained on {host} (pid {pid}); if that run is "
                f"dead, delete {self.path}"
            )
        if pid is not None and _alive(pid):
            raise RunLocked(
                f"{self.path.parent} is being trained by pid {pid} since {owner.get('since')}; "
                "wait for it or choose another --out"
            )
        if self.console is not None:
            self.console.print(
                f"[yellow]taking over a stale lock left by pid {pid} ({self.path})[/]"
            )
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
