"""The torch zip checkpoint reader: dtypes, devices, views, shared storages, hostile and
damaged files. The files are written by tests/torch_zip_writer.py (no torch needed); the last
tests compare with torch.load when torch happens to be installed."""

from __future__ import annotations

import collections
import io
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
from torch_zip_writer import (
    PROTO2,
    Global,
    Reduce,
    Storage,
    Tensor,
    bf16_round_trip,
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
    v3_tensor,
    write_archive,
    write_checkpoint,
    write_pickle_archive,
)

from mlx_kssm.checkpoints_convert import pickle_guard
from mlx_kssm.checkpoints_convert.torch_zip import (
    CheckpointError,
    ForbiddenGlobalError,
    TensorRef,
    read_checkpoint,
)


def sample_object():
    """A little of everything a checkpoint holds, with a base storage for views."""
    base = Storage(np.arange(24, dtype=np.float32), location="mps")
    state = collections.OrderedDict(w=tensor(np.linspace(-1, 1, 6).reshape(2, 3)))
    return {
        "f32_cuda": tensor(np.array([[1.0, -2.0], [3.5, 4.25]]), location="cuda:0"),
        "f16": tensor([1.5, -2.0, 65504.0], "float16"),
        "bf16_mps": tensor([1.0, 3.140625, -0.001, 1e30], "bfloat16", "mps"),
        "f64": tensor([np.pi], "float64"),
        "i64": tensor([1, -2, 3], "int64"),
        "flag": tensor([True, False], "bool"),
        "transposed": Tensor(base, 0, (4, 3), (1, 4)),
        "offset_rows": Tensor(base, 5, (2, 3), (4, 1)),
        "scalar": Tensor(base, 7, (), ()),
        "expanded": Tensor(base, 2, (3, 2), (0, 1)),
        "empty": Tensor(base, 0, (0, 5), (5, 1)),
        "state": state,
        "misc": [1, 2.5, None, "text", (True, False), {"nested": [3]}],
    }


def expected_values():
    base = np.arange(24, dtype=np.float32)
    return {
        "f32_cuda": np.array([[1.0, -2.0], [3.5, 4.25]], np.float32),
        "f16": np.array([1.5, -2.0, 65504.0], np.float16),
        "bf16_mps": bf16_round_trip([1.0, 3.140625, -0.001, 1e30]),
        "f64": np.array([np.pi]),
        "i64": np.array([1, -2, 3]),
        "flag": np.array([True, False]),
        "transposed": base[:12].reshape(3, 4).T,
        "offset_rows": base[5:13].reshape(2, 4)[:, :3],
        "scalar": np.float32(7.0),
        "expanded": np.broadcast_to(base[2:4], (3, 2)),
        "empty": np.zeros((0, 5), np.float32),
    }


def check_sample(root):
    for name, want in expected_values().items():
        ref = root[name]
        assert isinstance(ref, TensorRef), name
        got = ref.numpy()
        assert got.shape == np.shape(want), name
        assert got.dtype == np.asarray(want).dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    want = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(root["state"]["w"].numpy(), want)
    assert root["misc"] == [1, 2.5, None, "text", (True, False), {"nested": [3]}]


@pytest.mark.parametrize(
    "layout", [{}, {"byteorder": "big"}, {"compress": True}, {"prefix": "tiny_checkpoint_12"}]
)
def test_reads_dtypes_devices_and_views(tmp_path, layout):
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", sample_object(), **layout))
    check_sample(root)
    assert root["f32_cuda"].storage.location == "cuda:0"
    assert root["bf16_mps"].storage.location == "mps"
    assert root["bf16_mps"].dtype == "bfloat16"


def test_shared_storage_is_one_storage(tmp_path):
    weight = tensor(np.arange(6, dtype=np.float32).reshape(3, 2))
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", {"a": weight, "b": weight}))
    assert root["a"].same_data(root["b"])
    np.testing.assert_array_equal(root["b"].numpy(), np.arange(6).reshape(3, 2))
    # data.pkl, byteorder, version and a single data/0: the tied weight is stored once
    assert len(zipfile.ZipFile(tmp_path / "c.pt").namelist()) == 4


def test_stored_members_are_memory_mapped_not_copied(tmp_path):
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", {"w": tensor(np.ones((64, 8)))}))
    array = root["w"].numpy()
    bases = []
    while array is not None:
        bases.append(type(array))
        array = getattr(array, "base", None)  # ends at the mmap object
    assert np.memmap in bases


def test_parameters_and_ordered_dict_metadata(tmp_path):
    """torch pickles nn.Parameter via _rebuild_parameter, and a state dict's _metadata by BUILD."""
    state = collections.OrderedDict(w=tensor([2.0]))
    state._metadata = {"": {"version": 1}}
    rebuild = Global("torch._utils", "_rebuild_parameter")
    param = Reduce(rebuild, tensor([3.0, 4.0]), True, collections.OrderedDict())
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", {"state": state, "p": param}))
    assert root["state"]._metadata == {"": {"version": 1}}
    np.testing.assert_array_equal(root["p"].numpy(), [3.0, 4.0])


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


def members(pickled) -> dict[str, bytes]:
    """data.pkl and the storages it names: ``pickled`` is bytes or pickle_checkpoint's pair."""
    data, storages = pickled if isinstance(pickled, tuple) else (pickled, {})
    return {"data.pkl": data, **{f"data/{k}": s.raw().tobytes() for k, s in storages.items()}}


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


# -- damaged and unsupported files ------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    return write_checkpoint(tmp_path / "good.pt", sample_object())


def read_everything(path):
    root = read_checkpoint(path)
    return {name: root[name].numpy() for name in expected_values()}


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="corrupt|truncated|not a zip"):
        read_everything(cut)


def test_flipped_byte_in_tensor_data_fails_the_crc(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    info = zipfile.ZipFile(good_file).getinfo("archive/data/0")
    start = info.header_offset + 30 + len(info.filename)  # the writer adds no extra field
    data[start + 3] ^= 0x40
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        read_everything(bad)


def test_random_damage_is_an_error_or_harmless(tmp_path, good_file):
    """Never an unexpected exception: each flip is caught, or changes nothing that is read."""
    data = good_file.read_bytes()
    clean = read_everything(good_file)
    rng = np.random.default_rng(0)
    errors = 0
    for i, pos in enumerate(rng.integers(0, len(data), size=60)):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(damaged))
        try:
            got = read_everything(path)
        except CheckpointError:
            errors += 1
            continue
        for name, want in clean.items():
            np.testing.assert_array_equal(got[name], want, err_msg=f"flip at byte {pos}")
    assert errors > 30  # most bytes matter; a reader that checks nothing would fail here


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"hello, I am not a checkpoint", "not a zip archive"),
        (b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" + b"\0" * 64, "legacy"),
    ],
)
def test_not_a_torch_zip(tmp_path, content, message):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(plain)
    script = write_archive(tmp_path / "s.pt", {"data.pkl": b".", "code/m.py": b""})
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_checkpoint(script)


def test_missing_storage_member(tmp_path):
    archive = members(pickle_checkpoint({"w": tensor([1.0, 2.0])}))
    del archive["data/0"]
    with pytest.raises(CheckpointError, match="missing from the archive"):
        read_checkpoint(write_archive(tmp_path / "c.pt", archive))


def test_storage_size_disagrees_with_pickle(tmp_path):
    archive = members(pickle_checkpoint({"w": tensor([1.0, 2.0])}))
    archive["data/0"] = archive["data/0"][:4]
    with pytest.raises(CheckpointError, match="holds 4 bytes"):
        read_checkpoint(write_archive(tmp_path / "c.pt", archive))


@pytest.mark.parametrize(
    "offset, shape, stride",
    [(0, (3, 3), (3, 1)), (7, (2,), (1,)), (0, (2,), (-1,)), (0, (10**12,), (0,))],
)
def test_views_outside_their_storage_are_refused(tmp_path, offset, shape, stride):
    base = Storage(np.arange(8, dtype=np.float32))
    path = write_checkpoint(tmp_path / "c.pt", {"w": Tensor(base, offset, shape, stride)})
    with pytest.raises(CheckpointError, match="storage 0"):
        read_checkpoint(path)


def test_malformed_persistent_id_and_tensor(tmp_path):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "x") if obj == "PID" else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"x": "PID"})
    with pytest.raises(CheckpointError, match="persistent id"):
        read_checkpoint(write_pickle_archive(tmp_path / "a.pt", buf.getvalue()))
    rebuild = Global("torch._utils", "_rebuild_tensor_v2")
    data, _ = pickle_checkpoint({"w": Reduce(rebuild, "not a storage", 0, (1,), (1,))})
    with pytest.raises(CheckpointError, match="without a storage"):
        read_checkpoint(write_pickle_archive(tmp_path / "b.pt", data))


# -- agreement with torch itself (only where torch is installed) ------------------------------


def test_torch_load_reads_the_writers_files_alike(tmp_path):
    """The synthetic files above are real torch files: torch.load reads the same values."""
    torch = pytest.importorskip("torch")
    path = write_checkpoint(tmp_path / "c.pt", sample_object())
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = read_checkpoint(path)
    for name in expected_values():
        want = theirs[name]
        want = want.float() if want.dtype == torch.bfloat16 else want
        np.testing.assert_array_equal(ours[name].numpy(), want.numpy(), err_msg=name)


def test_reader_matches_torch_on_files_torch_wrote(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(48, generator=gen)
    tied = torch.randn(5, 3, generator=gen)
    obj = {
        "f32": torch.randn(3, 4, generator=gen),
        "f16": torch.randn(7, generator=gen).half(),
        "bf16": torch.randn(2, 5, generator=gen).bfloat16(),
        "transposed": base.view(6, 8).t(),
        "sliced": base.view(6, 8)[1:5:2, 3:],
        "scalar": torch.tensor(12.0),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "ints": torch.arange(5),
        "embed": tied,
        "head": tied,
        "history": [{"step": 1, "loss": 2.5}],
    }
    path = tmp_path / "torch.pt"
    torch.save(obj, path)
    ours, theirs = read_checkpoint(path), torch.load(path, weights_only=True)
    for name, want in theirs.items():
        if not isinstance(want, torch.Tensor):
            assert ours[name] == want
            continue
        want = want.detach()
        want = want.float() if want.dtype == torch.bfloat16 else want
        np.testing.assert_array_equal(ours[name].numpy(), want.numpy(), err_msg=name)
    assert ours["embed"].same_data(ours["head"])


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


# -- valid files beyond the first format: newer dtypes, numpy scalars, other tensor kinds ------


def test_newer_dtypes_are_read_or_named(tmp_path):
    root = read_checkpoint(
        write_checkpoint(
            tmp_path / "c.pt",
            {
                "u16": v3_tensor(np.array([[1, 65535]], np.uint16), "uint16"),
                "f8": v3_tensor(np.array([0x38, 0x40], np.uint8), "float8_e4m3fn"),
            },
        )
    )
    assert root["u16"].dtype == "uint16" and root["u16"].shape == (1, 2)
    np.testing.assert_array_equal(root["u16"].numpy(), [[1, 65535]])
    assert root["f8"].dtype == "float8_e4m3fn"
    with pytest.raises(CheckpointError, match="float8_e4m3fn tensor cannot be read without torch"):
        root["f8"].numpy()


def test_numpy_scalars_become_numbers(tmp_path):
    values = {"f64": np.float64(2.5), "f32": np.float32(-1.25), "i64": np.int64(-7)}
    values.update(u8=np.uint8(200), flag=np.bool_(False), f16=np.float16(0.5))
    root = read_checkpoint(write_checkpoint(tmp_path / "c.pt", values))
    assert root == {"f64": 2.5, "f32": -1.25, "i64": -7, "u8": 200, "flag": False, "f16": 0.5}
    assert all(type(v) in (int, float, bool) for v in root.values())


@pytest.mark.parametrize(
    "global_name, what",
    [
        (("torch._utils", "_rebuild_qtensor"), "a quantized tensor"),
        (("torch._utils", "_rebuild_sparse_tensor"), "a sparse tensor"),
        (("numpy.core.multiarray", "_reconstruct"), "a numpy array or object"),
    ],
)
def test_legitimate_but_unsupported_names_are_named_honestly(tmp_path, global_name, what):
    data, _ = pickle_checkpoint({"x": Reduce(Global(*global_name), 1)})
    with pytest.raises(ForbiddenGlobalError) as err:
        read_checkpoint(write_pickle_archive(tmp_path / "c.pt", data))
    assert f"holds {what} ({'.'.join(global_name)}), which this converter does not read" in str(
        err.value
    )


def test_numpy_stand_ins_build_numbers_only(tmp_path):
    dtype = Global("numpy", "dtype")
    cases = {
        "an object dtype": Reduce(dtype, "O8", False, True),
        "a string dtype": Reduce(dtype, "U5", False, True),
        "a scalar of the wrong size": Reduce(
            Global("numpy._core.multiarray", "scalar"), np.dtype("f8"), b"\x00" * 3
        ),
        "codecs other than latin1": Reduce(Global("_codecs", "encode"), "x", "utf-7"),
    }
    for label, payload in cases.items():
        data, _ = pickle_checkpoint({"x": payload})
        with pytest.raises(CheckpointError, match="corrupt data.pkl"):
            read_checkpoint(write_pickle_archive(tmp_path / f"{label}.pt", data))
