"""The torch zip checkpoint reader on damaged and unsupported files: truncated, flipped bytes,
not a torch zip (empty, legacy format, TorchScript), missing or short storages, views outside
their storage, malformed persistent ids. Each ends in a CheckpointError, or for a flipped byte
that matters to nothing read, in the same values."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from torch_reader_helpers import expected_values, members, sample_object
from torch_zip_writer import (
    Global,
    Reduce,
    Storage,
    Tensor,
    pickle_checkpoint,
    tensor,
    write_archive,
    write_checkpoint,
    write_pickle_archive,
)

from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError, read_checkpoint

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
