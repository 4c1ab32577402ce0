"""Data from files that are not what they claim: text that is not UTF-8 (Latin-1, binaries
named .txt, control bytes), token folders whose sidecar points outside the folder or whose
tokens are damaged, a damaged cache, and a cache that cannot be written. Each is refused in one
line before anything is written, tokenised again, or trained on with the replaced bytes
reported."""

from __future__ import annotations

import functools
import io
import json
import os
import time

import numpy as np
import pytest
from data_helpers import cache as cache  # autouse: every test gets its own KSSM_CACHE
from data_helpers import lines

from mlx_kssm import data, documents
from mlx_kssm.data import (
    DataError,
    check_token_range,
    group_documents,
    open_token_folder,
    prepare_tokens,
    resolve_source,
    write_token_folder,
)
from mlx_kssm.tokenizer import encode, eot_token

# --------------------------------------------------------------------------- text that is not text


def recording_console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=400, color_system=None)


@functools.cache
def png_bytes() -> bytes:
    """A real PNG image (random pixels), as a user might rename one to .txt by mistake."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, np.random.default_rng(0).random((24, 24, 3)), format="png")
    return buffer.getvalue()


def test_latin1_text_trains_and_the_replaced_bytes_are_reported(tmp_path):
    text = "Le caf\u00e9 \u00e9tait ferm\u00e9.\n\nUne autre phrase, sans accent.\n" * 20
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("latin-1"))
    n_accents = text.count("\u00e9")
    console = recording_console()
    tokens = prepare_tokens(resolve_source(str(path)), console=console)
    out = console.file.getvalue()
    assert (
        f"of {len(text):,} bytes, {n_accents:,} are not valid UTF-8 (trained on as U+FFFD)" in out
    )
    assert str(path) in out and "iconv" in out
    assert tokens.meta["undecodable_bytes"] == n_accents and tokens.meta["control_bytes"] == 0
    replaced = text.replace("\u00e9", "\ufffd")
    eot = eot_token()
    expected = []
    for doc in group_documents(lines(replaced)):
        expected += encode(doc) + [eot]
    assert tokens.train.tolist() + tokens.valid.tolist() == expected


def test_clean_utf8_says_nothing_about_bytes(tmp_path):
    (tmp_path / "ok.txt").write_text(
        "Caf\u00e9 \u4e2d\u6587 \U0001f600.\n\nTabs\tand\fform feeds.\n"
    )
    console = recording_console()
    tokens = prepare_tokens(resolve_source(str(tmp_path / "ok.txt")), console=console)
    assert "bytes" not in console.file.getvalue() and tokens.meta["undecodable_bytes"] == 0


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: png_bytes(), "are not UTF-8"),
        (lambda: np.random.default_rng(1).bytes(20_000), "are not UTF-8"),
        (lambda: "Hello, UTF-16 text.\n".encode("utf-16-le") * 50, "control bytes such as NUL"),
        (lambda: "Hello, UTF-16 text.\n".encode("utf-16") * 50, "is UTF-16 text"),
        (
            lambda: (
                "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440\n".encode("cp1251") * 50
            ),
            "are not UTF-8",
        ),
        (lambda: b"text\x00\x00\x00\x00" * 500, "control bytes such as NUL"),
    ],
    ids=["png", "random", "utf16-no-bom", "utf16-bom", "cp1251", "nul-padded"],
)
def test_binary_files_named_txt_are_refused_before_anything_is_written(
    tmp_path, cache, make, words
):
    path = tmp_path / "data.txt"
    path.write_bytes(make())
    with pytest.raises(DataError) as err:
        resolve_source(str(path))
    message = str(err.value)
    assert words in message and str(path) in message and "\n" not in message
    assert "iconv" in message and not cache.exists()
    folder = tmp_path / "corpus"  # the same file as a folder's train.txt
    folder.mkdir()
    (folder / "train.txt").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match=words):
        resolve_source(str(folder))


def test_a_binary_tail_after_a_text_head_is_refused_while_reading(tmp_path, cache):
    head = ("A plain paragraph of English text.\n\n" * 3000).encode()
    assert len(head) > documents.SNIFF_BYTES
    path = tmp_path / "mixed.txt"
    path.write_bytes(head + png_bytes() * 200)
    source = resolve_source(str(path))  # the head looks like text
    with pytest.raises(DataError, match=r"mixed.txt is not text: \d+% of its [\d,]+ bytes"):
        prepare_tokens(source)
    tokens_root = cache / "tokens"
    assert not tokens_root.exists() or not any(tokens_root.iterdir())  # no half-written cache


# --------------------------------------------------------------------------- token folders


def token_folder(tmp_path, **meta_changes):
    folder = write_token_folder(tmp_path / "tok", {"train": np.arange(40), "valid": np.arange(9)})
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in meta_changes.items():
        meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def set_file(folder, split, name):
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"][split]["file"] = name
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "name, words",
    [
        ("../outside.bin", "outside the token folder"),
        ("sub/../../outside.bin", "outside the token folder"),
        ("ABSOLUTE", "outside the token folder"),
        ("link.bin", "leads outside the token folder"),
        (".", "leads outside the token folder"),
        ("fifo.bin", "not a regular file"),
        (7, "not a file name"),
    ],
)
def test_a_sidecar_cannot_point_outside_its_folder(tmp_path, name, words):
    outside = tmp_path / "outside.bin"
    np.arange(40, dtype=np.int32).tofile(outside)  # valid tokens: only the place is wrong
    folder = token_folder(tmp_path)
    (folder / "link.bin").symlink_to(outside)
    os.mkfifo(folder / "fifo.bin")
    set_file(folder, "train", str(outside) if name == "ABSOLUTE" else name)
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare_tokens(resolve_source(str(folder)))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - started < 5  # the FIFO is never opened


def test_a_symlink_inside_the_folder_to_a_file_inside_is_fine(tmp_path):
    folder = token_folder(tmp_path)
    (folder / "alias.bin").symlink_to(folder / "tokens.train.bin")
    set_file(folder, "train", "alias.bin")
    assert open_token_folder(folder).train.tolist() == list(range(40))


def write_raw_tokens(folder, split, values, dtype=np.int32):
    np.asarray(values, dtype=dtype).tofile(folder / f"tokens.{split}.bin")


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda f: write_raw_tokens(f, "train", [1, 2, -1] + [0] * 37), "token id -1, below 0"),
        (lambda f: write_raw_tokens(f, "valid", [-(10**8)] * 9), "token id -100000000"),
        (lambda f: write_raw_tokens(f, "train", range(40), np.int64), "holds 80 tokens"),
        (lambda f: write_raw_tokens(f, "train", range(41)), "holds 41 tokens"),
        (lambda f: (f / "tokens.valid.bin").write_bytes(b"\x01" * 35), "not whole int32 tokens"),
        (lambda f: edit_meta(f, dtype="int64"), "dtype 'int64' are not supported"),
        (lambda f: edit_meta(f, dtype=None), "dtype None are not supported"),
        (lambda f: edit_split(f, start=5, stop=2), "0 <= start <= stop"),
        (lambda f: edit_split(f, start=True), "0 <= start <= stop"),
        (lambda f: edit_split(f, stop=-3), "0 <= start <= stop"),
        (lambda f: edit_split(f, "valid", stop="9"), "valid split's start/stop (0, '9')"),
        (lambda f: edit_meta(f, splits={"train": {}, "valid": 3}), "train split's start/stop"),
        (lambda f: edit_meta(f, n_tokens={"train": 39, "valid": 9}), "gives train 39 tokens"),
        (lambda f: edit_meta(f, splits=[1, 2]), "no 'splits' table"),
        (lambda f: edit_meta(f, tokenizer={"name": "x", "n_vocab": 30}), "its tokenizer has 30"),
        (lambda f: (f / "meta.json").write_text("[" * 100_000 + "]" * 100_000), "token folder"),
        (lambda f: (f / "meta.json").write_text(" " * (2 << 20) + "{}"), "over 1024 KB"),
    ],
)
def test_a_damaged_token_folder_is_refused_in_one_line(tmp_path, damage, words):
    folder = token_folder(tmp_path)
    damage(folder)
    with pytest.raises(DataError) as err:
        open_token_folder(folder)
    message = str(err.value)
    assert words in message and "\n" not in message and len(message) < 400


def edit_meta(folder, **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def edit_split(folder, split="train", **changes):
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"][split].update(changes)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_check_token_range_checks_both_ends():
    check_token_range(np.array([0, 5, 9], np.int32), 10)
    check_token_range(np.zeros(0, np.int32), 10)
    with pytest.raises(DataError, match=r"token id -1: ids are never negative"):
        check_token_range(np.array([3, -1, 2], np.int32), 10)
    with pytest.raises(DataError, match=r"token id -100000000"):
        check_token_range(np.array([-(10**8)], np.int32), 10)
    with pytest.raises(DataError) as err:
        check_token_range(np.array([3, 10], np.int32), 10, where="the valid split")
    assert str(err.value).startswith("the valid split has token id 10")
    assert "vocabulary is 0..9" in str(err.value) and "--vocab-size 11" in str(err.value)


def test_a_damaged_cache_is_tokenised_again(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.\n\nMore text here.\n" * 30)
    first = prepare_tokens(resolve_source(str(tmp_path / "a.txt")))
    expected = first.train.tolist()
    cached = first.folder / first.meta["splits"]["train"]["file"]
    del first
    damaged = np.fromfile(cached, dtype=np.int32)
    damaged[3] = -1
    damaged.tofile(cached)
    console = recording_console()
    again = prepare_tokens(resolve_source(str(tmp_path / "a.txt")), console=console)
    assert "the cached tokens cannot be used" in console.file.getvalue()
    assert again.train.tolist() == expected


# --------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_an_unwritable_cache_is_one_line_before_tokenising(tmp_path, monkeypatch, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    root = blocker if where == "a file" else blocker / "cache"
    monkeypatch.setenv("KSSM_CACHE", str(root))
    (tmp_path / "a.txt").write_text("Some text.\n\nMore.\n")
    calls = []
    monkeypatch.setattr(data, "_tokenise_source", lambda *a: calls.append(a))
    with pytest.raises(DataError) as err:
        prepare_tokens(resolve_source(str(tmp_path / "a.txt")))
    message = str(err.value)
    assert "KSSM_CACHE" in message and str(root) in message and "not writable" in message
    assert "\n" not in message and calls == [] and blocker.read_text() == "not a folder"


def test_control_bytes_are_reported_only_beyond_a_stray_one(tmp_path):
    stray = "A line of text.\n\n" * 400 + "one \x02 stray\n"
    (tmp_path / "stray.txt").write_text(stray)
    console = recording_console()
    tokens = prepare_tokens(resolve_source(str(tmp_path / "stray.txt")), console=console)
    assert tokens.meta["control_bytes"] == 1 and "control bytes" not in console.file.getvalue()
    many = "Text\x00\x00 with NULs.\n\n" * 100  # 2 NULs in 21 bytes: over 5%
    (tmp_path / "many.txt").write_text(many)
    with pytest.raises(DataError, match="control bytes such as NUL"):
        resolve_source(str(tmp_path / "many.txt"))
    some = "A longer line of ordinary text, with one NUL\x00 in it.\n\n" * 100
    (tmp_path / "some.txt").write_text(some)
    console = recording_console()
    prepare_tokens(resolve_source(str(tmp_path / "some.txt")), console=console)
    assert f"of {len(some):,} bytes, 100 are control bytes such as NUL" in console.file.getvalue()
