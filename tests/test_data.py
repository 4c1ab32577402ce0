"""Data: sources, documents, the token cache and its sidecar, windows, the seeded order. Files
that are not what they claim (text that is not text, damaged token folders, an unwritable
cache) are covered by test_data_bad_input.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from data_helpers import cache as cache  # autouse: every test gets its own KSSM_CACHE
from data_helpers import lines

from mlx_kssm import data, hub_datasets
from mlx_kssm.data import (
    DataError,
    DataOrder,
    as_windows,
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
