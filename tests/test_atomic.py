"""mlx_kssm/atomic.py: write to a temporary name, then rename; never lose what was not ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mlx_kssm import atomic
from mlx_kssm.atomic import (
    PublishError,
    TargetExistsError,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temporaries,
    discard,
    publish_folder,
    temporary_folder,
)


def folder_with(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=["native", "fallback"])
def rename_kind(request, monkeypatch):
    """Every test runs with the kernel's no-replace rename and with the portable fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_NATIVE_RENAME", None)
    return request.param


def test_the_native_no_replace_rename_is_found_on_linux():
    if sys.platform.startswith("linux"):
        assert atomic._NATIVE_RENAME is not None


def test_temporary_folder_sits_beside_the_target(tmp_path):
    tmp = temporary_folder(tmp_path / "deep" / "out")
    assert tmp.parent == tmp_path / "deep" and tmp.is_dir() and not any(tmp.iterdir())
    pid, token = tmp.name.removeprefix(".out.tmp-").split("-")
    assert int(pid) == os.getpid() and len(token) == 8
    umask = os.umask(0)
    os.umask(umask)
    assert tmp.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not private


def test_publish_to_a_new_or_empty_target(tmp_path, rename_kind):
    for target in (tmp_path / "new", folder_with(tmp_path / "empty")):
        tmp = folder_with(temporary_folder(target), a="1")
        assert publish_folder(tmp, target, replace=False) == target
        assert contents(target) == {"a": "1"} and not tmp.exists()
    assert hidden(tmp_path) == []


def test_without_replace_nothing_at_the_target_is_touched(tmp_path, rename_kind):
    """What appears at the target while the new folder is written is never deleted."""
    target = tmp_path / "out"
    tmp = folder_with(temporary_folder(target), new="new")
    folder_with(target, mine="precious")  # appears meanwhile
    with pytest.raises(TargetExistsError, match="out"):
        publish_folder(tmp, target, replace=False)
    assert contents(target) == {"mine": "precious"}
    assert contents(tmp) == {"new": "new"}  # left for the caller to discard
    (tmp_path / "file").write_text("x")
    with pytest.raises(TargetExistsError):
        publish_folder(tmp, tmp_path / "file", replace=False)
    assert (tmp_path / "file").read_text() == "x"


def test_replace_moves_the_old_aside_then_removes_it(tmp_path, rename_kind):
    target = folder_with(tmp_path / "out", old="old")
    tmp = folder_with(temporary_folder(target), new="new")
    publish_folder(tmp, target, replace=True)
    assert contents(target) == {"new": "new"}
    assert hidden(tmp_path) == []


def test_replace_can_be_vetoed_and_the_old_folder_comes_back(tmp_path, rename_kind):
    target = folder_with(tmp_path / "out", thesis="years of work")
    tmp = folder_with(temporary_folder(target), new="new")
    seen = []

    def veto(old):
        seen.append(contents(old))
        raise ValueError("not ours to replace")

    with pytest.raises(ValueError, match="not ours"):
        publish_folder(tmp, target, replace=True, check_old=veto)
    assert seen == [{"thesis": "years of work"}]
    assert contents(target) == {"thesis": "years of work"}
    discard(tmp)
    assert hidden(tmp_path) == []


def test_a_symlinked_target_keeps_its_link_and_leaves_no_debris(tmp_path, rename_kind):
    real = folder_with(tmp_path / "disk" / "run7", old="old")
    link = tmp_path / "out"
    link.symlink_to(real)
    tmp = folder_with(temporary_folder(link), new="new")
    assert tmp.parent == real.parent  # same file system as the folder it replaces
    publish_folder(tmp, link, replace=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert contents(link) == {"new": "new"}
    assert hidden(tmp_path) == [] and hidden(real.parent) == []


def test_a_dangling_link_is_refused(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(PublishError, match="symbolic link to .*nowhere, which does not exist"):
        temporary_folder(link)
    assert not (tmp_path / "nowhere").exists()


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [
        folder_with(tmp_path / f".out.tmp-{dead}-0123abcd", big="data"),
        folder_with(tmp_path / f".out.old-{dead}", old="old"),
    ]
    kept = [
        folder_with(tmp_path / f".out.tmp-{alive}-0123abcd"),  # a live writer's
        folder_with(tmp_path / f".out.tmp-{os.getpid()}-0123abcd"),  # our own
        folder_with(tmp_path / f".other.tmp-{dead}-0123abcd"),  # another target's
        folder_with(tmp_path / ".out.tmp-k2j3h4"),  # not our naming: unknown owner
    ]
    (tmp_path / f".out.tmp-{dead}-feedbeef").write_text("a file temporary")
    stale.append(tmp_path / f".out.tmp-{dead}-feedbeef")
    assert sorted(clean_stale_temporaries(tmp_path, "out")) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_writer_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    """kill -9 while the temporary folder is being filled; the next write removes it."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from mlx_kssm.atomic import temporary_folder
        tmp = temporary_folder({str(tmp_path / "out")!r})
        (tmp / "model.safetensors").write_bytes(bytes(1 << 20))
        print(tmp, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    leftover = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    assert os.path.isdir(leftover) and leftover.startswith(str(tmp_path / ".out.tmp-"))
    tmp = temporary_folder(tmp_path / "out")
    assert not os.path.exists(leftover)
    assert hidden(tmp_path) == [tmp.name]


def test_atomic_write_replaces_whole_files_only(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_text(path, "one")
    path.chmod(0o600)
    atomic_write_bytes(path, b"two")
    assert path.read_text() == "two" and path.stat().st_mode & 0o777 == 0o600

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "three")
    assert path.read_text() == "two"
    assert hidden(tmp_path) == []


def test_atomic_write_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert hidden(tmp_path) == []
