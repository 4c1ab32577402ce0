"""The torch zip checkpoint reader: dtypes, devices, views, shared storages, hostile and
damaged files. The files are written by tests/torch_zip_writer.py (no torch needed); the last
tests compare with torch.load when torch happens to be installed."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
from torch_zip_writer import (
    Global,
    Reduce,
    Storage,
    Tensor,
    bf16_round_trip,
    pickle_checkpoint,
    tensor,
    write_archive,
    write_checkpoint,
    write_pickle_archive,
)

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
