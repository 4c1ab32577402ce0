"""mlx_kssm/safetensors_check.py: a damaged .safetensors is a one-line ValueError, before
anything is loaded; a good one gives its names, dtypes and shapes."""

from __future__ import annotations

import json
import os
import struct

import mlx.core as mx
import pytest

from mlx_kssm.safetensors_check import check_safetensors


def write_raw(path, header, data: bytes = b"", length: int | None = None):
    """A file with exactly this header (a dict is JSON-encoded; bytes are taken as they are)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "model.safetensors"
    weights = {
        "a.weight": mx.zeros((2, 3)),
        "b.bias": mx.ones((5,), dtype=mx.bfloat16),
        "step": mx.array(3, dtype=mx.uint64),
        "empty": mx.zeros((0, 4)),
    }
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return path


def test_a_file_mlx_wrote_is_described(good):
    assert check_safetensors(good) == {
        "a.weight": ("F32", (2, 3)),
        "b.bias": ("BF16", (5,)),
        "step": ("U64", ()),
        "empty": ("F32", (0, 4)),
    }


def rejected(path, match, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        check_safetensors(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < len(str(path)) + 200, message
    assert match in message, message
    return message


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1])
def test_truncated_files(good, tmp_path, keep):
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    rejected(cut, "truncated" if keep != -1 else "fall outside the data")


def test_a_huge_header_length_is_refused_before_reading(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {}, length=2**63)
    rejected(path, "header length 9,223,372,036,854,775,808 exceeds the limit")
    small = write_raw(tmp_path / "y.safetensors", {"t": entry(offsets=(0, 24))}, bytes(24))
    rejected(small, "exceeds the limit of 10 bytes", max_header_bytes=10)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"\xff\xfe not utf8", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"t": 1, "t": 2}', "a name appears twice"),
        ({"__metadata__": {"a": 1}}, "__metadata__ must map strings to strings"),
        ({"t": {"dtype": "F32", "shape": [1]}}, "is not {dtype, shape, data_offsets}"),
        ({"t": entry(dtype="F33")}, "unknown dtype 'F33'"),
        ({"t": entry(dtype=7)}, "unknown dtype 7"),
        ({"t": entry(shape=(2, -3))}, "bad shape [2, -3]"),
        ({"t": entry(shape=(2.0, 3))}, "bad shape"),
        ({"t": entry(shape=(True, 3))}, "bad shape"),
        ({"t": {**entry(), "shape": "2x3"}}, "bad shape"),
        ({"t": entry(offsets=(24, 0))}, "fall outside the data"),
        ({"t": entry(offsets=(0, 48))}, "fall outside the data"),
        ({"t": entry(offsets=(-1, 23))}, "bad data_offsets"),
        ({"t": {**entry(), "data_offsets": [0]}}, "bad data_offsets"),
        ({"t": entry(shape=(2, 2), offsets=(0, 24))}, "24 bytes of data for shape [2, 2] x F32"),
        ({"t": entry(shape=(2**62, 2**62))}, "bytes of data for shape"),
        ({"a": entry(offsets=(0, 24)), "b": entry(offsets=(0, 24))}, "overlaps"),
        ({"a": entry(shape=(1,), offsets=(4, 8))}, "4 bytes before 'a' are unused"),
    ],
)
def test_damaged_headers(tmp_path, header, match):
    path = write_raw(tmp_path / "x.safetensors", header, bytes(24))
    rejected(path, match)


def test_long_names_and_values_are_cut_short(tmp_path):
    name = "n" * 600_000
    path = write_raw(tmp_path / "x.safetensors", {name: entry(dtype="Q" * 600_000)}, bytes(24))
    message = rejected(path, "unknown dtype")
    assert "nnnn..." in message and "QQQ..." in message


def test_not_a_regular_file(tmp_path):
    rejected(tmp_path, "not a regular file")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    rejected(fifo, "not a regular file")  # opened without blocking
    rejected(tmp_path / "missing.safetensors", "cannot read")


def test_mlx_files_with_null_metadata_are_accepted(tmp_path):
    import mlx.core as mx

    path = tmp_path / "opt.safetensors"
    mx.save_safetensors(str(path), {"a.m": mx.zeros((3,)), "step": mx.array(2)})
    assert set(check_safetensors(path)) == {"a.m", "step"}
