"""The torch zip checkpoint reader on valid files: dtypes, devices, views, shared storages,
newer dtypes, numpy scalars and other tensor kinds. The files are written by
tests/torch_zip_writer.py (no torch needed); two tests compare with torch.load when torch
happens to be installed.

Damaged files are covered by test_torch_reader_damaged.py, hostile files and the reader's bounds
by test_torch_reader_hostile.py."""

from __future__ import annotations

import collections
import zipfile

import numpy as np
import pytest
from torch_reader_helpers import expected_values, sample_object
from torch_zip_writer import (
    Global,
    Reduce,
    pickle_checkpoint,
    tensor,
    v3_tensor,
    write_checkpoint,
    write_pickle_archive,
)

from mlx_kssm.checkpoints_convert.torch_zip import (
    CheckpointError,
    ForbiddenGlobalError,
    TensorRef,
    read_checkpoint,
)


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
