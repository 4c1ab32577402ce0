"""Shared by the test_torch_reader*.py files: a sample checkpoint holding a little of everything
(dtypes, devices, views of one storage, a state dict, plain values), the values it must read
as, and the archive members of a pickle."""

from __future__ import annotations

import collections

import numpy as np
from torch_zip_writer import Storage, Tensor, bf16_round_trip, tensor


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


def members(pickled) -> dict[str, bytes]:
    """data.pkl and the storages it names: ``pickled`` is bytes or pickle_checkpoint's pair."""
    data, storages = pickled if isinstance(pickled, tuple) else (pickled, {})
    return {"data.pkl": data, **{f"data/{k}": s.raw().tobytes() for k, s in storages.items()}}
