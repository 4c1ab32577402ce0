"""Data: sources, documents, the token cache and its sidecar, windows, the seeded order."""

from __future__ import annotations

import functools
import io
import json
import os
import time

import numpy as np
import pytest

from mlx_kssm import data, documents, hub_datasets
from mlx_kssm.data import (
    DataError,
    DataOrder,
    as_windows,
    check_token_range,
    eval_window_ids,
    group_documents,
    open_token_folder,
    prepare_tokens,
    resolve_source,
    write_token_folder,
)
from mlx_kssm.tokenizer import encode, eot_token

WIKI = """ = Alpha = 

Alpha is the first letter.

 = = History = = 

It is old.

 = Beta = 

Beta comes second.
"""


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KSSM_CACHE", str(root))
    return root


def lines(text):
    return text.splitlines(keepends=True)


def test_documents_split_at_wikitext_titles_not_sections():
    docs = list(group_documents(lines(WIKI)))
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = History = =" in docs[0]
    assert docs[0].endswith("It is old.") and docs[1] == "= Beta = \n\nBeta comes second."


def test_documents_without_titles_split_at_blank_lines():
    text = "First address, one line.\n\nSecond address\ncontinues.\n\n\nThird.\n"
    assert list(group_documents(lines(text))) == [
        "First address, one line.",
        "Second address\ncontinues.",
        "Third.",
    ]


def test_resolve_source_kinds(tmp_path):
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "valid.txt").write_text("b\n")
    src = resolve_source(str(tmp_path))
    assert src.kind == "files" and set(src.files) == {"train", "valid"}
    assert resolve_source("wikitext-103-raw-v1").hub == ("wikitext", "wikitext-103-raw-v1")
    assert resolve_source("someone/corpus:en").hub == ("someone/corpus", "en")
    sample = resolve_source(data.SAMPLE_CORPUS)
    assert all(f[0].stat().st_size > 10_000 for f in sample.files.values())
    assert set(sample.files) == {"train", "valid"}


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: str(p / "missing"), "does not exist"),
        (lambda p: str(p / "nothing.txt"), "does not exist"),
        (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), "empty"),
        (lambda p: (p / "x.csv").write_text("a") and None or str(p / "x.csv"), "unsupported"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "no train.txt"),
        (lambda p: "", "empty"),
    ],
)
def test_bad_sources_raise_one_line(tmp_path, make, words):
    with pytest.raises(DataError) as err:
        resolve_source(make(tmp_path))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_tokenising_a_folder_matches_the_tokenizer_and_caches(tmp_path, cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text(WIKI)
    (folder / "valid.txt").write_text("One paragraph.\n\nAnother one.\n")
    tokens = prepare_tokens(resolve_source(str(folder)))
    eot = eot_token()
    expected = []
    for doc in group_documents(lines(WIKI)):
        expected += encode(doc) + [eot]
    assert tokens.train.tolist() == expected
    assert tokens.valid.tolist() == encode("One paragraph.") + [eot] + encode("Another one.") + [
        eot
    ]
    meta = json.loads((tokens.folder / "meta.json").read_text())
    assert meta["n_tokens"] == {"train": len(expected), "valid": tokens.valid.size}
    assert meta["tokenizer"]["name"] == "cl100k_base" and meta["fingerprint"]
    assert str(tokens.folder).startswith(str(cache))  # never beside the (maybe read-only) source

    # Unchanged source: the cache is reused as it is.
    stamp = (tokens.folder / "tokens.train.bin").stat().st_mtime_ns
    again = prepare_tokens(resolve_source(str(folder)))
    assert (again.folder / "tokens.train.bin").stat().st_mtime_ns == stamp

    # A changed source is noticed and tokenised again.
    (folder / "valid.txt").write_text("Changed text.\n")
    changed = prepare_tokens(resolve_source(str(folder)))
    assert changed.fingerprint != tokens.fingerprint
    assert changed.valid.tolist() == encode("Changed text.") + [eot]


def test_changed_tokenizer_is_noticed(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("Some text.\n\nMore text here.\n")
    first = prepare_tokens(resolve_source(str(tmp_path / "a.txt")))
    meta = json.loads((first.folder / "meta.json").read_text())
    meta["tokenizer"]["probe"] = "another-tokenizer"
    (first.folder / "meta.json").write_text(json.dumps(meta))
    calls = []
    real = data._tokenise_source
    monkeypatch.setattr(data, "_tokenise_source", lambda *a: calls.append(1) or real(*a))
    prepare_tokens(resolve_source(str(tmp_path / "a.txt")))
    assert calls == [1]


def test_single_file_holds_out_the_end_at_a_document_boundary(tmp_path):
    docs = [f"Document number {i} says something about topic {i % 7}." for i in range(400)]
    (tmp_path / "all.txt").write_text("\n\n".join(docs) + "\n")
    tokens = prepare_tokens(resolve_source(str(tmp_path / "all.txt")))
    eot = eot_token()
    everything = []
    for doc in docs:
        everything += encode(doc) + [eot]
    assert tokens.train.tolist() + tokens.valid.tolist() == everything
    assert tokens.train[-1] == eot  # the cut falls right after a document
    share = tokens.valid.size / len(everything)
    assert 0.03 < share < 0.07


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_tables_through_datasets_one_document_per_row(tmp_path, suffix):
    rows = [{"text": "First row is a document.", "id": 1}, {"text": "Second row.", "id": 2}] * 30
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    tokens = prepare_tokens(resolve_source(str(path)))
    eot = eot_token()
    one = encode(rows[0]["text"]) + [eot] + encode(rows[1]["text"]) + [eot]
    assert (tokens.train.tolist() + tokens.valid.tolist()) == one * 30


def test_hub_dataset_offline_fails_fast_naming_local_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy to fall back on
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_datasets, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(DataError) as err:
        prepare_tokens(resolve_source("wikitext-103-raw-v1"))
    assert time.perf_counter() - started < 15  # not ~25 s of retries
    message = str(err.value)
    assert "no network" in message and "\n" not in message
    assert (
        f"--data {data.SAMPLE_CORPUS}" in message and "--data FOLDER holding train.txt" in message
    )
    assert "shared" not in message and "../" not in message  # no path of our own checkout


def test_windows_are_non_overlapping_slices():
    tokens = np.arange(103, dtype=np.int32)
    windows = as_windows(tokens, seq_length=9)  # windows of 10
    assert windows.shape == (10, 10)
    for i in range(10):
        assert windows[i].tolist() == list(range(10 * i, 10 * i + 10))


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(n_windows=13, seed=3)
    epoch0, epoch1 = order.window_ids(0, 13), order.window_ids(13, 13)
    assert sorted(epoch0.tolist()) == list(range(13)) == sorted(epoch1.tolist())
    assert epoch0.tolist() != epoch1.tolist()
    # Any position can be recomputed: reading in pieces equals reading at once.
    pieces = np.concatenate([order.window_ids(p, 5) for p in range(0, 30, 5)])
    assert pieces.tolist() == DataOrder(13, seed=3).window_ids(0, 30).tolist()
    assert DataOrder(13, seed=4).window_ids(0, 13).tolist() != epoch0.tolist()


def test_eval_windows_are_spread_and_distinct():
    ids = eval_window_ids(100, 5)
    assert ids.tolist() == [0, 25, 50, 74, 99]
    assert eval_window_ids(3, 10).tolist() == [0, 1, 2]


def test_token_folder_roundtrip_and_truncation(tmp_path):
    folder = write_token_folder(tmp_path / "t", {"train": np.arange(50), "valid": np.arange(7)})
    opened = open_token_folder(folder)
    assert opened.train.tolist() == list(range(50)) and opened.valid.tolist() == list(range(7))
    assert resolve_source(str(folder)).kind == "tokens"
    with open(folder / "tokens.train.bin", "r+b") as f:
        f.truncate(40)  # 10 tokens left of 50
    with pytest.raises(DataError, match="sidecar expects 50"):
        open_token_folder(folder)


def test_the_shipped_corpus_tokenises_into_enough_for_the_tiny_preset():
    from mlx_kssm.config import train_args_for

    args = train_args_for("tiny")
    assert args.data == data.SAMPLE_CORPUS
    tokens = prepare_tokens(resolve_source(args.data))
    train_windows = len(as_windows(tokens.train, args.seq_length))
    assert tokens.train.size > 200_000 and train_windows >= args.steps * args.batch_size
    assert len(as_windows(tokens.valid, args.seq_length)) >= args.eval_batches * args.batch_size


def test_hub_rows_are_wikitext_lines_grouped_into_articles(monkeypatch):
    """The hub path with the download replaced by a local DatasetDict of WikiText-style rows."""
    import datasets

    rows = lines(WIKI)
    fake = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": rows}),
        validation=datasets.Dataset.from_dict({"text": ["One doc.", "Another doc."]}),
    )
    monkeypatch.setattr(data, "_load_hub", lambda source: fake)
    tokens = prepare_tokens(resolve_source("wikitext-2-raw-v1"))
    eot = eot_token()
    articles = list(group_documents(rows))
    assert tokens.train.tolist() == encode(articles[0]) + [eot] + encode(articles[1]) + [eot]
    assert tokens.valid.tolist() == encode("One doc.") + [eot] + encode("Another doc.") + [eot]


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
