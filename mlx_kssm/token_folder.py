"""A token folder: flat int32 token files (written here from documents) and the ``meta.json``
sidecar that describes them.

The sidecar names each split's file, and the tokens of the split are ``file[start:stop]``.
A token folder may come from anywhere (``--data FOLDER``), so the sidecar is not trusted:
its files must be regular files inside the folder (no absolute paths, no ``..``, no symbolic
link leading out), of whole int32 tokens, at least as long as it says, and every token id
must be non-negative and (when the sidecar names its tokenizer) inside that vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

META_NAME = "meta.json"
FORMAT_VERSION = 1  # bump when the tokenisation rules change: old caches are then rebuilt
TOKEN_DTYPE = "int32"
TOKEN_LAYOUT = np.dtype("<i4")  # little-endian int32, as written on every supported machine
TOKEN_BYTES = TOKEN_LAYOUT.itemsize
MAX_META_BYTES = 1 << 20  # a sidecar is ~1 KB; a bigger one is not ours
SPLITS = ("train", "valid")
VALID_FRACTION = 0.05  # held out for validation when a source has no validation split
MESSAGE_VALUE_CHARS = 120  # values from files are cut to this length in messages


class DataError(ValueError):
    """Bad or unusable data; the message is one line that says what to do."""


@dataclass
class TokenData:
    """The train and valid token streams (memory-mapped) and the sidecar that describes them."""

    folder: Path
    meta: dict
    train: np.ndarray  # (n_train,) int32
    valid: np.ndarray  # (n_valid,) int32

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def write_token_folder(folder: Path, splits: dict[str, np.ndarray], name: str = "tokens") -> Path:
    """Write already tokenised splits (e.g. synthetic test data) as a token folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    meta_splits = {}
    for split, tokens in splits.items():
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        tokens.tofile(folder / f"tokens.{split}.bin")
        digest.update(split.encode() + tokens.tobytes())
        meta_splits[split] = {"file": f"tokens.{split}.bin", "start": 0, "stop": int(tokens.size)}
    meta = {
        "format": FORMAT_VERSION,
        "source": name,
        "fingerprint": digest.hexdigest()[:24],
        "tokenizer": {"name": "custom"},
        "dtype": TOKEN_DTYPE,
        "splits": meta_splits,
        "n_tokens": {k: v["stop"] for k, v in meta_splits.items()},
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def write_tokens(documents: Iterable[str], path: Path, chunk: int = 512, tokenizer=None) -> int:
    """Tokenise documents (an end-of-text token after each) into a flat int32 file, with
    ``tokenizer`` (a tokenizer.Tokenizer; None: cl100k_base)."""
    from .tokenizer import resolve

    tokenizer = resolve(tokenizer)
    eot = np.array([tokenizer.eot], dtype=TOKEN_DTYPE)
    total = 0
    with open(path, "wb") as f:
        batch: list[str] = []
        for doc in documents:
            if doc and doc.strip():
                batch.append(doc.strip())
            if len(batch) == chunk:
                total += _write_batch(tokenizer, batch, eot, f)
                batch = []
        if batch:
            total += _write_batch(tokenizer, batch, eot, f)
    return total


def _write_batch(tokenizer, docs: list[str], eot: np.ndarray, f) -> int:
    ids = tokenizer.encode_batch(docs)
    flat = np.concatenate([part for doc in ids for part in (np.asarray(doc, TOKEN_DTYPE), eot)])
    flat.tofile(f)
    return flat.size


def hold_out(path: Path, n_tokens: int, eot: int) -> dict:
    """Split one token file: the last ~VALID_FRACTION, from a document start, is validation."""
    if n_tokens == 0:
        empty = {"file": path.name, "start": 0, "stop": 0}
        return {"train": empty, "valid": dict(empty)}
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n_tokens,))
    target = int(n_tokens * (1 - VALID_FRACTION))
    ends = np.flatnonzero(tokens[target:] == eot)
    cut = target + int(ends[0]) + 1 if ends.size and target + ends[0] + 1 < n_tokens else target
    del tokens
    return {
        "train": {"file": path.name, "start": 0, "stop": cut},
        "valid": {"file": path.name, "start": cut, "stop": n_tokens},
    }


def open_token_folder(folder: Path) -> TokenData:
    """Memory-map a token folder's train and valid splits, checking them against the sidecar.
    Raises DataError (one line) for anything that does not add up."""
    folder = Path(folder)
    try:
        meta = _read_meta(folder)
        views = {split: _open_split(folder, meta, split) for split in SPLITS}
    except (OSError, ValueError, RecursionError) as err:
        raise DataError(
            f"{folder} is not a usable token folder: {one_line(err)}; tokenise the text again "
            "(pass the text files as --data)"
        ) from None
    return TokenData(folder=folder, meta=meta, train=views["train"], valid=views["valid"])


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str = "the data") -> None:
    """Every token id in 0 .. vocab_size - 1, else DataError. An id outside the embedding
    table is not caught by the model: -1 silently reads another row, a large one crashes."""
    if tokens.size == 0:
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise DataError(
            f"{where} has token id {low}: ids are never negative, so the token files are "
            f"damaged or not {TOKEN_DTYPE}; tokenise the text again"
        )
    if high >= vocab_size:
        raise DataError(
            f"{where} has token id {high} but the model's vocabulary is 0..{vocab_size - 1}; "
            f"use --vocab-size {high + 1} or more, or data tokenised for this model"
        )


def one_line(err: BaseException | str, limit: int = 200) -> str:
    """The first line of an error, cut short (it may carry values read from a file)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the sidecar


def _read_meta(folder: Path) -> dict:
    path = folder / META_NAME
    if path.stat().st_size > MAX_META_BYTES:
        raise ValueError(f"{META_NAME} is over {MAX_META_BYTES // 1024} KB")
    meta = json.loads(path.read_bytes())
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise ValueError(f"{META_NAME} has no 'splits' table")
    missing = [s for s in SPLITS if s not in meta["splits"]]
    if missing:
        raise ValueError(f"{META_NAME} must describe a train and a valid split")
    dtype = meta.get("dtype")
    if dtype != TOKEN_DTYPE:
        raise ValueError(f"tokens of dtype {_short(dtype)} are not supported ({TOKEN_DTYPE} only)")
    for split in SPLITS:
        spec = meta["splits"][split]
        if not isinstance(spec, dict):
            raise ValueError(f"the {split} split is not a table")
        start, stop = spec.get("start"), spec.get("stop")
        if not all(_is_count(x) for x in (start, stop)) or start > stop:
            raise ValueError(
                f"the {split} split's start/stop ({_short(start)}, {_short(stop)}) are not "
                "whole numbers with 0 <= start <= stop"
            )
    return meta


def _open_split(folder: Path, meta: dict, split: str) -> np.ndarray:
    spec = meta["splits"][split]
    start, stop = spec["start"], spec["stop"]
    path = _confined(folder, spec.get("file"))
    size = path.stat().st_size
    if size % TOKEN_BYTES:
        raise ValueError(f"{path.name} is {size} bytes, not whole {TOKEN_DTYPE} tokens")
    n_tokens, expected = size // TOKEN_BYTES, _file_length(meta, spec["file"])
    if n_tokens != expected:  # longer is as wrong as shorter: another dtype, another file
        raise ValueError(f"{path.name} holds {n_tokens} tokens, the sidecar expects {expected}")
    counts = meta.get("n_tokens")
    recorded = counts.get(split) if isinstance(counts, dict) else None
    if recorded is not None and recorded != stop - start:
        raise ValueError(f"the sidecar gives {split} {_short(recorded)} tokens and {stop - start}")
    if n_tokens == 0 or start == stop:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    view = np.memmap(path, dtype=TOKEN_LAYOUT, mode="r")[start:stop]
    _check_ids(view, meta.get("tokenizer"), path.name)
    return view


def _file_length(meta: dict, name: str) -> int:
    """The tokens a file must hold: up to the furthest split that reads it."""
    specs = (meta["splits"][split] for split in SPLITS)
    return max(spec["stop"] for spec in specs if spec.get("file") == name)


def _confined(folder: Path, name) -> Path:
    """The regular file ``name`` inside ``folder``: refuses absolute paths, ``..`` and
    symbolic links that lead out of the folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a split's file name is {_short(name)}, not a file name")
    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or ".." in parts:
        raise ValueError(f"the sidecar names {_short(name)}, outside the token folder")
    root = folder.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ValueError(f"{_short(name)} leads outside the token folder (to {_short(path)})")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{_short(name)} is not a regular file")
    return path


def _check_ids(tokens: np.ndarray, tokenizer, name: str) -> None:
    """Ids below zero (or past the recorded tokenizer's vocabulary) mean a damaged file."""
    low, high = int(tokens.min()), int(tokens.max())
    n_vocab = tokenizer.get("n_vocab") if isinstance(tokenizer, dict) else None
    if low < 0:
        raise ValueError(f"{name} has token id {low}, below 0 (damaged, or not {TOKEN_DTYPE})")
    if _is_count(n_vocab) and high >= n_vocab:
        raise ValueError(f"{name} has token id {high}, its tokenizer has {n_vocab} ids")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(value) -> str:
    text = str(value) if isinstance(value, Path) else repr(value)
    text = text.replace("\n", " ")
    if len(text) <= MESSAGE_VALUE_CHARS:
        return text
    return text[: MESSAGE_VALUE_CHARS - 3] + "..."
