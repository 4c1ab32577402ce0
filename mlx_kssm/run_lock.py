"""``RUN/train.lock``: two trainings never write one run folder.

The lock is an OS lock (``flock``) on ``RUN/train.lock``, held for the whole run. The kernel
releases it when the holder exits or dies (kill -9 included), so a lock left by a dead run is
simply free: there is no "is the holder still alive?" guess, and no takeover in which two
waiting processes could both win. The file also holds the holder's pid, host and start time,
only to say who is training in the refusal message.

Removing the file. A lock file left in the folder after a run would look like a live run to a
person, so the holder deletes it on exit, while still holding the lock. That opens one race:
a second process may have opened the old file just before the unlink and lock it just after
the holder closes it, while a third process creates and locks a new file. So a process that
gets the lock checks that the file it locked is still the one at ``RUN/train.lock`` (same
device and inode); if not, it drops it and tries again. Since the file is only ever removed
by its lock holder, the inode at the path can then not change while the lock is held.

Lock files of the older, pid-based format (a JSON record without ``"lock": "flock"``, made by
an exclusive create and no OS lock) are honoured: a live pid on this machine refuses, a dead
one is taken over with a message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "train.lock"
LOCK_KIND = "flock"  # marks records written under an OS lock (the older format has none)
MAX_RECORD_BYTES = 4096  # a lock record is ~100 bytes; never read a huge file whole
RECORD_READ_TRIES = 20  # a refusing process may read the record while the holder writes it
ACQUIRE_TRIES = 100  # each retry means another process removed the file under us


class RunLocked(ValueError):
    """The lock cannot be taken: another training holds it, or the file cannot be made.
    The message is one line that says what to do (exit code 2 at the CLI)."""


class RunLock:
    """Context manager holding ``RUN/train.lock`` for a run.

    ``say``: a callable taking one line (or an object with ``print``, e.g. a rich Console),
    told when the lock of a run that died is taken over.
    """

    def __init__(self, run_dir: str | os.PathLike, say=None):
        self.path = Path(run_dir) / LOCK_NAME
        self._say = getattr(say, "print", say)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError("RunLock is not re-entrant")
        for _ in range(ACQUIRE_TRIES):
            fd = self._open()
            try:
                if not self._lock_or_refuse(fd):
                    os.close(fd)
                    continue
                self._take(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RunLocked(f"cannot take the lock {self.path}: it keeps being replaced; try again")

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def release(self) -> None:
        """Delete the file (only if it is still ours), then let the OS lock go."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # a lock file left behind is harmless: the next run finds it unlocked
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ taking the lock

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as err:
            why = "it is a symbolic link" if err.errno == errno.ELOOP else err.strerror
            raise RunLocked(
                f"cannot create the lock {self.path} ({why}); choose a writable --out"
            ) from None

    def _lock_or_refuse(self, fd: int) -> bool:
        """Lock ``fd``: True if it is the file at the path, False to try again; raises
        RunLocked when another process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(self._held_message(_read_record_settled(fd))) from None
        except OSError as err:  # e.g. a file system without locks
            raise RunLocked(
                f"cannot lock {self.path} ({err.strerror}); choose an --out on a local disk"
            ) from None
        return _same_file(fd, self.path)

    def _take(self, fd: int) -> None:
        """With the OS lock held: look at what a previous holder left, then write our record."""
        left = _read_record(fd)
        if left is not None:
            self._judge_leftover(left)
        record = {"lock": LOCK_KIND, "pid": os.getpid(), "host": _host(), "since": _now()}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _judge_leftover(self, left: dict | str) -> None:
        """A file that was free for the OS lock but not empty: a run that died, or a run of
        the older pid-based format (which takes no OS lock) that may still be alive."""
        if not isinstance(left, dict):
            self._tell(f"taking over a stale lock with an unreadable record ({self.path})")
            return
        pid, host = left.get("pid"), left.get("host")
        if host not in (None, _host()):
            # Our lock was free, yet a run on another machine wrote the record: either it died,
            # or this file system does not share locks between machines. Only a person knows.
            raise RunLocked(
                f"{self.path.parent} is being trained on {_short(host)} (pid {_short(pid)}); "
                f"if that run is dead, delete {self.path}"
            )
        older_format = left.get("lock") != LOCK_KIND
        if older_format and isinstance(pid, int) and _alive(pid):
            raise RunLocked(self._held_message(left))
        self._tell(f"taking over a stale lock left by pid {_short(pid)} ({self.path})")

    def _held_message(self, record: dict | str | None) -> str:
        if not isinstance(record, dict):
            return (
                f"{self.path.parent} is being trained (locked by {self.path}); wait for it or "
                "choose another --out"
            )
        host = record.get("host")
        where = f" on {_short(host)}" if host not in (None, _host()) else ""
        return (
            f"{self.path.parent} is being trained by pid {_short(record.get('pid'))}{where} "
            f"since {_short(record.get('since'))}; wait for it or choose another --out"
        )

    def _tell(self, message: str) -> None:
        if self._say is not None:
            self._say(message)


# --------------------------------------------------------------------------- helpers


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is (still) the file at ``path``."""
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read_record(fd: int) -> dict | str | None:
    """The record in the lock file: a dict, the raw text if it is not one, None if empty."""
    raw = os.pread(fd, MAX_RECORD_BYTES, 0)
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode("utf-8", "replace")
    return record if isinstance(record, dict) else str(record)


def _read_record_settled(fd: int) -> dict | str | None:
    """The holder's record, allowing it a moment to finish writing it (it writes right after
    taking the lock, so an empty or partial record is only ever seen for a few microseconds)."""
    for _ in range(RECORD_READ_TRIES):
        record = _read_record(fd)
        if isinstance(record, dict):
            return record
        time.sleep(0.01)
    return record


def _alive(pid: int) -> bool:
    if isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def _short(value, limit: int = 80) -> str:
    """A value from the file, cut short: the file is not trusted to be small or sane."""
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _host() -> str:
    return socket.gethostname()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
