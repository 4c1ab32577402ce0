"""Write to a temporary name, then rename: the package's one helper for writes that matter.

A folder is written as ``.{name}.tmp-{pid}-{random}`` beside its target and renamed into
place when complete, so a reader sees the old folder or the new one, never half of one:

    tmp = temporary_folder(target)
    try:
        ...write files into tmp...
        publish_folder(tmp, target, replace=False)
    finally:
        discard(tmp)          # nothing left behind when the writing failed

``publish_folder`` with ``replace=False`` never deletes or overwrites anything that appeared
at the target meanwhile (an empty folder excepted: it holds nothing to lose). With
``replace=True`` the old target is moved aside to ``.{name}.old-{pid}``, the new one renamed in,
then the old one removed. A target that is a symbolic link keeps its link: the folder it points
to is the one replaced (the temporary folder is made beside that folder, on its file system).
A dangling link is refused.

Temporaries of a process killed mid-write (kill -9, power loss) are removed by the next write
to the same target (``clean_stale_temporaries``), only once their process is gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


class PublishError(OSError):
    """The new folder could not be put in place; the message says what happened, in one line."""


class TargetExistsError(PublishError, FileExistsError):
    """Something is at the target that ``publish_folder`` may not replace; it was left as is."""


# -- renaming without replacing ---------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # Linux renameat2 flag
_RENAME_EXCL = 0x4  # macOS renamex_np flag


def _load_rename():
    """The C function that renames without replacing, when the platform has one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # (Windows has no process-wide C library handle)
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        renameat2 = libc.renameat2
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        renameat2.argtypes += [ctypes.c_uint]
        return lambda src, dst: renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        renamex = libc.renamex_np
        renamex.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda src, dst: renamex(src, dst, _RENAME_EXCL)
    return None


_NATIVE_RENAME = _load_rename()


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, which is left untouched."""
    if _NATIVE_RENAME is not None:
        if _NATIVE_RENAME(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
        # the file system cannot do it (some network file systems): fall back below
    # Residual race without the native call: a folder created at ``dst`` between the check and
    # the rename is replaced by POSIX rename only when it is empty (a non-empty one makes the
    # rename fail), so nothing with content can be lost.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# -- temporaries --------------------------------------------------------------------------------


def _real_target(target: str | os.PathLike) -> Path:
    """``target`` made absolute; a symbolic link is followed to the path it names."""
    target = Path(os.path.abspath(target))
    if not target.is_symlink():
        return target
    real = Path(os.path.realpath(target))
    if not real.exists():
        raise PublishError(f"{target} is a symbolic link to {real}, which does not exist")
    return real


def temporary_folder(target: str | os.PathLike) -> Path:
    """A new empty folder ``.{name}.tmp-{pid}-{random}`` beside ``target`` (made if needed).

    Leftovers of dead processes writing the same target are removed first.
    """
    target = _real_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target.parent, target.name)
    while True:
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # the umask applies, as for any folder the user makes
            return tmp
        except FileExistsError:
            continue


def discard(path: str | os.PathLike) -> None:
    """Remove a temporary file or folder if it is still there (a link itself, never its target)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    """Whether a process exists; unknown counts as alive, so nothing live is ever touched."""
    if os.name == "nt" or pid <= 0:
        return True  # (os.kill on Windows would terminate the process)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists but belongs to someone else
    return True


def clean_stale_temporaries(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove ``.{name}.tmp-{pid}-*`` and ``.{name}.old-{pid}`` of processes no longer running.

    Returns what was removed. A process id is only meaningful on this machine: a file system
    shared with other machines (or PID namespaces) could hold a live writer's temporary whose
    number is free here, so keep concurrent writers of one target on one machine.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:tmp-(\d+)-[0-9a-f]+|old-(\d+))")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _is_alive(int(match.group(1) or match.group(2))):
            continue
        discard(entry.path)
        removed.append(Path(entry.path))
    return removed


# -- publishing ---------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    """Flush the folder's files and the folder itself, so the rename publishes complete data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_folder(Path(root))


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # (Windows cannot open a folder; nothing to flush there)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_folder(
    tmp: str | os.PathLike,
    target: str | os.PathLike,
    replace: bool,
    check_old: Callable[[Path], None] | None = None,
) -> Path:
    """Rename the finished folder ``tmp`` to ``target``; returns where it now is.

    ``replace=False``: PublishError if ``target`` exists (an empty folder is removed first, and
    the rename itself never replaces, so anything appearing meanwhile is kept). ``replace=True``:
    the old target is moved aside, ``check_old(moved_aside_path)`` may veto by raising (the old
    target is then moved back and the exception propagates), the new folder renamed in, the
    old one removed. ``tmp`` is left in place on failure, for the caller to discard.
    """
    tmp, target = Path(tmp), _real_target(target)
    _fsync_tree(tmp)
    if not replace or not os.path.lexists(target):
        if target.is_dir() and not target.is_symlink():
            try:
                target.rmdir()  # only ever succeeds on an empty folder
            except OSError:
                raise TargetExistsError(f"{target} exists and is not empty") from None
        try:
            rename_no_replace(tmp, target)
        except FileExistsError:
            raise TargetExistsError(f"{target} already exists; left untouched") from None
    else:
        _replace(tmp, target, check_old)
    _fsync_folder(target.parent)
    return target


def _replace(tmp: Path, target: Path, check_old: Callable[[Path], None] | None) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    discard(old)  # our own pid: a leftover of this very process
    rename_no_replace(target, old)
    try:
        if check_old is not None:
            check_old(old)
        rename_no_replace(tmp, target)
    except BaseException as err:
        try:
            rename_no_replace(old, target)
        except OSError:
            raise TargetExistsError(
                f"{target} appeared while it was being replaced; the previous one is kept at {old}",
            ) from None
        if isinstance(err, FileExistsError):
            raise TargetExistsError(f"{target} changed while it was replaced") from None
        raise
    discard(old)


# -- single files -------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a flushed temporary file in the same folder.

    A symbolic link at ``path`` is kept and the file it names replaced; an existing file's
    permissions are kept. Returns the path written.
    """
    path = _real_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, path.name)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_file():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``atomic_write_bytes`` for text."""
    return atomic_write_bytes(path, text.encode(encoding))
