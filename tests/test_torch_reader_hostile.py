"""The torch zip checkpoint reader on hostile files: pickles that would run code are refused
before anything runs, and pickles or zips built to exhaust memory or time (deep nesting,
doubling, memo tricks, a deflate bomb, duplicate or overlapping members, a FIFO) are refused in
one short line, before the allocation each bound guards."""

from __future__ import annotations

import os
import pickle
import re
import signal
import struct
import subprocess
import time
import zipfile

import numpy as np
import pytest
from torch_reader_helpers import members
from torch_zip_writer import (
    PROTO2,
    Global,
    Reduce,
    Storage,
    Tensor,
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
    write_archive,
    write_checkpoint,
    write_pickle_archive,
)

from mlx_kssm.checkpoints_convert import pickle_guard
from mlx_kssm.checkpoints_convert.torch_zip import (
    CheckpointError,
    ForbiddenGlobalError,
    read_checkpoint,
)

# -- hostile files: refused before anything runs ---------------------------------------------


def _touch(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


P2 = dict(protocol=2, fix_imports=False)
SYSTEM = f"{os.system.__module__}.system"  # posix.system (nt.system on Windows)

# label -> (marker -> a pickle whose loading would create ``marker``, the global to be named).
# A pickle is bytes, or pickle_checkpoint's (bytes, storages) when it also names tensors.
HOSTILE = {
    "os.system": (lambda m: pickle.dumps(Reduce(os.system, f"touch {m}"), **P2), SYSTEM),
    "builtins.eval": (lambda m: pickle.dumps(Reduce(eval, _touch(m)), **P2), "builtins.eval"),
    "exec, python 2 names": (
        lambda m: pickle.dumps(Reduce(exec, _touch(m)), protocol=2),
        "__builtin__.exec",
    ),
    "subprocess.Popen": (
        lambda m: pickle.dumps(Reduce(subprocess.Popen, ["touch", str(m)]), **P2),
        "subprocess.Popen",
    ),
    "protocol 4 STACK_GLOBAL": (
        lambda m: pickle.dumps(Reduce(os.system, f"touch {m}"), protocol=4),
        SYSTEM,
    ),
    "hidden in a valid checkpoint": (
        lambda m: pickle_checkpoint(
            {"model_state": {"w": tensor([1.0])}, "history": [{"x": Reduce(eval, _touch(m))}]}
        ),
        "__builtin__.eval",
    ),
    "inside tensor arguments": (
        lambda m: pickle_checkpoint(
            {"w": Reduce(Global("torch._utils", "_rebuild_tensor_v2"), Global("posix", "system"))}
        ),
        "posix.system",
    ),
    "a global never called": (
        lambda m: pickle_checkpoint({"x": Global("os", "system")}),
        "os.system",
    ),
    "a torch name off the list": (
        lambda m: pickle_checkpoint({"x": Global("torch", "load")}),
        "torch.load",
    ),
    "numpy reconstruct": (
        lambda m: pickle_checkpoint({"x": Reduce(Global("numpy.core.multiarray", "_reconstruct"))}),
        "numpy.core.multiarray._reconstruct",
    ),
}


class RewrittenTensor(Tensor):
    """A valid tensor, then pickle's BUILD opcode moving it: ``state`` is applied after."""

    def __init__(self, state):
        super().__init__(Storage(np.zeros(4, np.float32)), 0, (4,), (1,))
        self.state = state

    def __reduce__(self):
        return (*super().__reduce__(), self.state)


@pytest.mark.parametrize("state", [{"offset": 10**9}, (None, {"offset": 10**9})])
def test_built_tensors_cannot_be_rewritten(tmp_path, state):
    path = write_checkpoint(tmp_path / "c.pt", {"w": RewrittenTensor(state)})
    with pytest.raises(CheckpointError, match="rewrite a TensorRef"):
        read_checkpoint(path)


@pytest.mark.parametrize("label", HOSTILE)
def test_hostile_pickles_are_refused_without_running(tmp_path, label):
    marker = tmp_path / "pwned"
    make, forbidden = HOSTILE[label]
    path = write_archive(tmp_path / "evil.pt", members(make(marker)))
    with pytest.raises(ForbiddenGlobalError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert forbidden in message
    assert "\n" not in message
    assert not marker.exists(), "the payload ran"


def test_the_hostile_payloads_are_live(tmp_path):
    """Without the allow-list the payloads would run: plain pickle.loads executes one."""
    marker = tmp_path / "ran"
    pickle.loads(HOSTILE["builtins.eval"][0](marker))
    assert marker.exists()


# -- bounds: every refusal is one short line, before the allocation it guards -----------------


def refused(path, match: str) -> str:
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and len(message) < len(str(path)) + 300, message
    assert re.search(match, message), message
    return message


BOUNDS = {
    "a tuple 200,000 deep as a dict key": (deep_tuple_key(200_000), "deeper than 100 levels"),
    "a dict 5,000 deep": (deep_dict(5_000), "deeper than 100 levels"),
    "marks 5,000 deep": (deep_marked_lists(5_000), "deeper than 100 levels"),
    "a memo index of 2**27": (memo_far_ahead(), "memo entry 134,217,728 out of order"),
    "a text memo index of 2**27": (memo_far_ahead(text=True), "out of order"),
    "a tuple doubling 40 times": (doubling_tuples(40), "more than 4,000,000 values"),
    "lists doubling 40 times, filled late": (late_doubling_lists(40), "more than 4,000,000"),
    "a chain 300 deep, filled late": (late_deep_chain(300), "deeper than 100 levels"),
    "a list holding itself": (self_containing_list(), "contains itself"),
    "a 1 MB integer": (huge_integer(1 << 20), "an integer of 1,048,576 bytes"),
    "an extension code": (PROTO2 + b"\x82\x01.", "EXT1 \\(extension-registry codes\\)"),
    "an out-of-band buffer": (b"\x80\x05\x97.", "NEXT_BUFFER"),
    "an unknown opcode": (PROTO2 + b"\xff.", "opcode 0xff"),
    "no STOP": (PROTO2 + b"]]", "truncated"),
    "a stack underflow": (PROTO2 + b"a.", "malformed"),
}


@pytest.mark.parametrize("label", BOUNDS)
def test_pickles_beyond_the_bounds_are_refused_quickly(tmp_path, label):
    data, match = BOUNDS[label]
    path = write_pickle_archive(tmp_path / "c.pt", data)
    start = time.perf_counter()
    refused(path, match)
    assert time.perf_counter() - start < 10  # about a second on a loaded 2-core machine


def test_the_operation_count_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_guard, "MAX_OPCODES", 1000)
    refused(write_pickle_archive(tmp_path / "c.pt", many_operations(600)), "more than 1,000")
    assert read_checkpoint(write_pickle_archive(tmp_path / "d.pt", many_operations(400))) is None


def test_the_bounds_leave_real_checkpoints_alone(tmp_path):
    """A long history with shared keys, tied weights and nested optimizer state reads fine."""
    history = [{"step": i, "train_ce": 5.0 - i / 1e4, "val_R": 0.5} for i in range(20_000)]
    weight = tensor(np.ones((4, 4)))
    obj = {"model_state": {"a": weight, "b": weight}, "history": history}
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", obj))
    assert root["history"] == history and root["model_state"]["a"].same_data(weight_ref(root))


def weight_ref(root):
    return root["model_state"]["b"]


def test_file_values_in_messages_are_cut_short(tmp_path):
    """A 600 KB storage key in a refused file: the message stays one short line."""
    key = "k" * 600_000
    storage = Storage(np.zeros(2, np.float32))
    archive = members(pickle_checkpoint({"w": Tensor(storage, 0, (2,), (1,))}))
    archive["data.pkl"] = archive["data.pkl"].replace(b"X\x01\x00\x00\x000", _unicode(key), 1)
    message = refused(write_archive(tmp_path / "c.pt", archive), "missing from the archive")
    assert "kkkk..." in message


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def test_data_pkl_is_never_read_whole(tmp_path):
    """80 MB of pickle deflated to ~80 KB: refused on its declared size, before inflating."""
    bomb = PROTO2 + b"N0" * (40 << 20) + b"N."
    path = write_archive(
        tmp_path / "c.pt", {"data.pkl": bomb, "byteorder": b"little"}, compress=True
    )
    assert path.stat().st_size < 1 << 20
    refused(path, "data.pkl is 83,886,084 bytes uncompressed; refusing more than 67,108,864")
    order = write_archive(
        tmp_path / "o.pt", {"data.pkl": b"N.", "byteorder": b"little" * 9000}, compress=True
    )
    refused(order, "byteorder is 54,000 bytes uncompressed")


def duplicated(tmp_path, name: str) -> bytes:
    """A valid checkpoint plus a second member called ``name`` (zeros of the same size)."""
    good = write_checkpoint(tmp_path / "good.pt", {"w": tensor(np.arange(4.0))})
    with zipfile.ZipFile(good) as zf:
        size = zf.getinfo(name).file_size
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(good, "a") as zf:
        zf.writestr(name, bytes(size) if "data/" in name else b"\x80\x02}.")
    return good


@pytest.mark.parametrize("name", ["archive/data/0", "archive/data.pkl"])
def test_two_members_of_one_name_are_refused(tmp_path, name):
    refused(duplicated(tmp_path, name), f"two members named {name}; torch.load would read")


def test_zip_tricks_are_refused(tmp_path):
    good = write_checkpoint(tmp_path / "good.pt", {"w": tensor(np.arange(4.0))}).read_bytes()
    cases = {
        "encrypted": (patch_central_entry(good, "archive/data/0", flags=1), "encrypted"),
        "bzip2": (patch_central_entry(good, "archive/data/0", method=12), "compression method 12"),
        "two sizes": (patch_central_entry(good, "archive/data/0", size=8), "two different sizes"),
        "overlap": (
            patch_central_entry(
                good, "archive/data/0", offset=local_header_offset(good, "archive/byteorder")
            ),
            "overlap in the file",
        ),
        "past the end": (
            patch_central_entry(good, "archive/data/0", offset=len(good) - 40),
            "runs past the end",
        ),
    }
    for label, (data, match) in cases.items():
        path = tmp_path / f"{label}.pt"
        path.write_bytes(data)
        refused(path, match)
    stray = write_archive(tmp_path / "stray.pt", {"data.pkl": b"N."})
    with zipfile.ZipFile(stray, "a") as zf:
        zf.writestr("elsewhere/data/0", b"1234")
    refused(stray, "keeps all its members in one folder")
    nul = write_archive(tmp_path / "nul.pt", {"data.pkl": b"N.", "data/0#x": b"1234"})
    nul.write_bytes(nul.read_bytes().replace(b"data/0#x", b"data/0\x00x"))  # zipfile cuts at NUL
    refused(nul, "holds a NUL byte")


def test_an_oversized_zip_directory_is_refused_before_parsing(tmp_path):
    good = bytearray(write_checkpoint(tmp_path / "g.pt", {"w": tensor([1.0])}).read_bytes())
    end = good.rfind(b"PK\x05\x06")
    struct.pack_into("<I", good, end + 12, 200 << 20)  # directory size
    (tmp_path / "big.pt").write_bytes(bytes(good))
    refused(tmp_path / "big.pt", "refusing to parse it")


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "c.pt"
    os.mkfifo(fifo)

    def too_slow(*_):
        raise TimeoutError("opening the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        refused(fifo, "is a FIFO, not a checkpoint file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    refused(tmp_path, "is a folder")
