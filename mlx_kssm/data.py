"""Text -> tokens -> batches (spec: "Training recipe", Data).

What ``--data`` may name, in the order it is tried:
  1. a token folder: ``meta.json`` + ``tokens.*.bin``, as written by this module (reused as is)
  2. a folder with ``train.{txt,jsonl,json,parquet}`` and optionally ``valid.*`` / ``validation.*``
     (WikiText-raw style, like ``../shared/corpora/*``)
  3. one ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file
  4. ``sotu-sample``: the public-domain corpus shipped with the package (``mlx_kssm/corpus/``)
  5. a hub dataset name (default ``wikitext-103-raw-v1``) through ``datasets``: needs a network
Plain text is read directly; jsonl / json / parquet and hub datasets go through ``datasets``.
Without a validation split, the last ~5% of the tokens (cut at a document end) are held out.

Text is tokenised once with cl100k_base, an end-of-text token after each document, into a
token folder under the cache (``$KSSM_CACHE``, default ``~/.cache/mlx-kssm``; the source may be
read-only): flat int32 files plus a JSON sidecar with the token counts, the tokenizer and the
source's fingerprint, so that a changed source or tokenizer is noticed and tokenised again.

Training reads non-overlapping windows of seq_length + 1 tokens in an order drawn from the
seed, one permutation per epoch; the data position is simply the number of windows consumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .io import atomic_folder, replace_folder

SAMPLE_CORPUS = "sotu-sample"
HUB_DEFAULT = "wikitext-103-raw-v1"
META_NAME = "meta.json"
TOKENIZER_NAME = "cl100k_base"
FORMAT_VERSION = 1  # bump when the tokenisation rules change: old caches are then rebuilt
VALID_FRACTION = 0.05  # held out for validation when a source has no validation split
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation")}
LOCAL_ALTERNATIVES = (
    f"use --data {SAMPLE_CORPUS} (shipped with the package), a folder with train.txt/valid.txt "
    "(e.g. ../shared/corpora/wiki-leads), or a .txt/.jsonl/.parquet file"
)
# A WikiText article title: " = Title = " (section titles " = = Section = = " do not match).
TITLE_LINE = re.compile(r"^ = [^=].* = \s*$")
TITLE_LOOKAHEAD = 2_000  # lines read to decide whether a text has WikiText titles


class DataError(ValueError):
    """Bad or unusable data; the message is one line that says what to do."""


@dataclass(frozen=True)
class Source:
    """Where the text comes from, before any tokenising."""

    kind: str  # "tokens" | "files" | "hub"
    name: str  # what the user passed, for messages and cache folder names
    files: dict[str, tuple[Path, ...]] | None = None  # split -> files (kind "files")
    hub: tuple[str, str | None] | None = None  # (dataset path, config) (kind "hub")
    folder: Path | None = None  # the token folder (kind "tokens")


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


# --------------------------------------------------------------------------- sources


def corpus_folder() -> Path:
    """The sample corpus shipped inside the package."""
    return Path(__file__).resolve().parent / "corpus"


def resolve_source(spec: str) -> Source:
    """Interpret ``--data``. Raises DataError for a missing, empty or unreadable path."""
    spec = (spec or "").strip()
    if not spec:
        raise DataError(f"--data is empty; {LOCAL_ALTERNATIVES}")
    path = Path(spec).expanduser()
    if path.exists():
        return _local_source(path, spec)
    if spec == SAMPLE_CORPUS:
        return _local_source(corpus_folder(), spec)
    if _looks_like_path(spec):
        raise DataError(f"data path {spec} does not exist; {LOCAL_ALTERNATIVES}")
    return Source(kind="hub", name=spec, hub=_hub_id(spec))


def _looks_like_path(spec: str) -> bool:
    suffix = Path(spec).suffix.lower()
    return spec.startswith((".", "~", os.sep)) or suffix in TEXT_SUFFIXES + TABLE_SUFFIXES


def _hub_id(spec: str) -> tuple[str, str | None]:
    """'wikitext-103-raw-v1' -> ('wikitext', 'wikitext-103-raw-v1'); 'owner/name:config'."""
    if spec.startswith("wikitext-"):
        return "wikitext", spec
    path, _, config = spec.partition(":")
    return path, config or None


def _local_source(path: Path, spec: str) -> Source:
    if path.is_dir():
        if (path / META_NAME).is_file():
            return Source(kind="tokens", name=spec, folder=path)
        files = {split: _find_split(path, names) for split, names in SPLIT_NAMES.items()}
        if files["train"] is None:
            raise DataError(
                f"{spec} has no train.txt (or train.jsonl/.json/.parquet); {LOCAL_ALTERNATIVES}"
            )
        splits = {k: (v,) for k, v in files.items() if v is not None}
    else:
        if path.suffix.lower() not in TEXT_SUFFIXES + TABLE_SUFFIXES:
            raise DataError(f"{spec}: unsupported file type; {LOCAL_ALTERNATIVES}")
        splits = {"train": (path,)}
    for file in (f for fs in splits.values() for f in fs):
        if not os.access(file, os.R_OK):
            raise DataError(f"{file} is not readable")
        if file.stat().st_size == 0:
            raise DataError(f"{file} is empty")
    return Source(kind="files", name=spec, files=splits)


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in TEXT_SUFFIXES + TABLE_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


# --------------------------------------------------------------------------- documents


def group_documents(lines: Iterable[str]) -> Iterator[str]:
    """Group text lines into documents: at WikiText titles when the text has any, else at
    blank lines (one paragraph block per document, as in ``../shared/corpora/sotu``)."""
    lines = iter(lines)
    head = [line for _, line in zip(range(TITLE_LOOKAHEAD), lines, strict=False)]
    by_title = any(TITLE_LINE.match(line) for line in head)
    current: list[str] = []
    for line in itertools.chain(head, lines):
        starts_new = TITLE_LINE.match(line) if by_title else not line.strip()
        if starts_new and current:
            text = "".join(current).strip()
            if text:
                yield text
            current = []
        if by_title or line.strip():
            current.append(line)
    text = "".join(current).strip()
    if text:
        yield text


def _text_lines(path: Path, advance: Callable[[int], None]) -> Iterator[str]:
    """The lines of a UTF-8 text file, reporting the bytes read for the progress bar."""
    with open(path, "rb") as f:
        for raw in f:
            advance(len(raw))
            yield raw.decode("utf-8", errors="replace")


def _table_rows(path: Path) -> Iterator[str]:
    """The text column of a jsonl / json / parquet file, one document per row."""
    import datasets  # heavy (~2 s): only when such a file is used

    builder = "parquet" if path.suffix.lower() == ".parquet" else "json"
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types for a bad file
        raise DataError(f"cannot read {path}: {_one_line(err)}") from None
    yield from table[_text_column(table.column_names, str(path))]


def _text_column(columns: list[str], where: str) -> str:
    if "text" in columns:
        return "text"
    if len(columns) == 1:
        return columns[0]
    raise DataError(f"{where} has no 'text' column (columns: {', '.join(columns)})")


# --------------------------------------------------------------------------- the hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the proxy in front of it) answers, within ``timeout``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(source: Source):
    """The hub dataset's splits. Offline, only the local ``datasets`` cache is tried: a
    failure then comes at once instead of after ~25 s of retries."""
    path, config = source.hub
    with _offline_unless_reachable() as offline:
        import datasets

        try:
            return datasets.load_dataset(path, config)
        except Exception as err:  # noqa: BLE001 - network errors arrive as many types
            why = "no network and not in the local datasets cache" if offline else _one_line(err)
            raise DataError(
                f"cannot load the hub dataset {source.name!r} ({why}); {LOCAL_ALTERNATIVES}"
            ) from None


@contextlib.contextmanager
def _offline_unless_reachable():
    """HF offline mode for the duration, unless the hub answers (or offline mode is on)."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or ""
    if flag.upper() in ("1", "ON", "YES", "TRUE"):
        yield True
        return
    if hub_reachable():
        yield False
        return
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # read by datasets and huggingface_hub at import
    import datasets

    saved_config = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True  # for when datasets was imported before
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE = saved_config
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hub_splits(dataset) -> dict[str, object]:
    names = {"train": SPLIT_NAMES["train"], "valid": SPLIT_NAMES["valid"]}
    found = {k: next((dataset[n] for n in v if n in dataset), None) for k, v in names.items()}
    if found["train"] is None:
        raise DataError(f"the dataset has no train split (splits: {', '.join(dataset)})")
    return {k: v for k, v in found.items() if v is not None}


def _hub_documents(split, advance) -> Iterator[str]:
    """Rows are lines (WikiText) when titles appear among the first rows, else documents."""
    rows = split[_text_column(split.column_names, "the dataset")]
    counted = _counted(rows, advance)
    if any(TITLE_LINE.match(row or "") for row in rows[:TITLE_LOOKAHEAD]):
        return group_documents(row if row.endswith("\n") else row + "\n" for row in counted)
    return counted


# --------------------------------------------------------------------------- tokenising


def cache_root() -> Path:
    return Path(os.environ.get("KSSM_CACHE") or Path.home() / ".cache" / "mlx-kssm")


def tokenizer_identity() -> dict:
    """What the sidecar records of the tokenizer; a different one means tokenising again."""
    from .tokenizer import get_encoding

    enc = get_encoding()
    probe = enc.encode_ordinary("Kuramoto oscillators synchronise: R -> 1.\n\u00e9\u4e2d")
    digest = hashlib.sha256(np.asarray(probe, dtype=np.int64).tobytes()).hexdigest()[:16]
    return {"name": TOKENIZER_NAME, "n_vocab": enc.n_vocab, "eot": enc.eot_token, "probe": digest}


def source_fingerprint(source: Source) -> str:
    """A digest of the source's content (local files are read in full: correct beats fast)."""
    digest = hashlib.sha256(f"kssm-tokens-v{FORMAT_VERSION}".encode())
    if source.kind == "hub":
        path, config = source.hub
        digest.update(f"hub:{path}/{config}".encode())
    for split, files in sorted((source.files or {}).items()):
        for file in files:
            digest.update(f"{split}:{file.name}:{file.stat().st_size}".encode())
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:24]


def cache_folder(source: Source, root: Path | None = None) -> Path:
    """One cache folder per source location (a changed source replaces its own cache)."""
    where = (
        source.hub
        if source.kind == "hub"
        else sorted(str(f.resolve()) for fs in source.files.values() for f in fs)
    )
    key = hashlib.sha256(json.dumps([source.kind, where]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source.name).name or source.name)[:40]
    return (root or cache_root()) / "tokens" / f"{slug}-{key}"


def prepare_tokens(source: Source, console=None, root: Path | None = None) -> TokenData:
    """Tokenise ``source`` into the cache unless an up-to-date copy is there; open it."""
    if source.kind == "tokens":
        return open_token_folder(source.folder)
    folder = cache_folder(source, root)
    tokenizer = tokenizer_identity()
    fingerprint = source_fingerprint(source)
    stale = _stale_reason(folder, fingerprint, tokenizer)
    if stale is None:
        return open_token_folder(folder)
    if stale and console is not None:
        console.print(f"[yellow]{source.name}: {stale}; tokenising again[/]")
    _tokenise_source(source, folder, fingerprint, tokenizer, console)
    tokens = open_token_folder(folder)
    if console is not None:
        console.print(
            f"tokenised {source.name}: {tokens.train.size:,} train + {tokens.valid.size:,} "
            f"valid tokens in {folder}"
        )
    return tokens


def _stale_reason(folder: Path, fingerprint: str, tokenizer: dict) -> str | None:
    """None if the cached tokens can be reused, "" if there are none, else why not."""
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    if meta.get("format") != FORMAT_VERSION:
        return "the cached tokens were made by another version of mlx-kssm"
    if meta.get("fingerprint") != fingerprint:
        return "the source changed since it was tokenised"
    if meta.get("tokenizer") != tokenizer:
        return "the tokenizer differs from the one that made the cached tokens"
    return None


def _tokenise_source(
    source: Source, folder: Path, fingerprint: str, tokenizer: dict, console
) -> None:
    """Write the token folder to a temporary name and rename it into place."""
    tmp = atomic_folder(folder)
    try:
        with _progress(console, f"tokenising {source.name}") as (advance, set_total):
            if source.kind == "hub":
                splits = _hub_splits(_load_hub(source))
                set_total(sum(len(s) for s in splits.values()))
                streams = {k: _hub_documents(s, advance) for k, s in splits.items()}
            else:
                set_total(sum(f.stat().st_size for fs in source.files.values() for f in fs))
                streams = {k: _file_documents(fs, advance) for k, fs in source.files.items()}
            counts = {
                k: _write_tokens(docs, tmp / f"tokens.{k}.bin") for k, docs in streams.items()
            }
        splits = {k: {"file": f"tokens.{k}.bin", "start": 0, "stop": n} for k, n in counts.items()}
        if "valid" not in splits:
            splits = _hold_out(tmp / splits["train"]["file"], counts["train"], tokenizer["eot"])
        meta = {
            "format": FORMAT_VERSION,
            "source": source.name,
            "fingerprint": fingerprint,
            "tokenizer": tokenizer,
            "dtype": "int32",
            "splits": splits,
            "n_tokens": {k: v["stop"] - v["start"] for k, v in splits.items()},
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_documents(files: tuple[Path, ...], advance) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            yield from group_documents(_text_lines(file, advance))
        else:
            yield from _table_rows(file)
            advance(file.stat().st_size)


def _counted(rows: Iterable[str], advance) -> Iterator[str]:
    for row in rows:
        advance(1)
        yield row


def _write_tokens(documents: Iterable[str], path: Path, chunk: int = 512) -> int:
    """Tokenise documents (an end-of-text token after each) into a flat int32 file."""
    from .tokenizer import get_encoding

    enc = get_encoding()
    eot = np.array([enc.eot_token], dtype=np.int32)
    total = 0
    with open(path, "wb") as f:
        batch: list[str] = []
        for doc in documents:
            if doc and doc.strip():
                batch.append(doc.strip())
            if len(batch) == chunk:
                total += _write_batch(enc, batch, eot, f)
                batch = []
        if batch:
            total += _write_batch(enc, batch, eot, f)
    return total


def _write_batch(enc, docs: list[str], eot: np.ndarray, f) -> int:
    ids = enc.encode_ordinary_batch(docs, num_threads=os.cpu_count() or 1)
    flat = np.concatenate([part for doc in ids for part in (np.asarray(doc, np.int32), eot)])
    flat.tofile(f)
    return flat.size


def _hold_out(path: Path, n_tokens: int, eot: int) -> dict:
    """Split one token file: the last ~VALID_FRACTION, from a document start, is validation."""
    if n_tokens == 0:
        empty = {"file": path.name, "start": 0, "stop": 0}
        return {"train": empty, "valid": dict(empty)}
    tokens = np.memmap(path, dtype=np.int32, mode="r", shape=(n_tokens,))
    target = int(n_tokens * (1 - VALID_FRACTION))
    ends = np.flatnonzero(tokens[target:] == eot)
    cut = target + int(ends[0]) + 1 if ends.size and target + ends[0] + 1 < n_tokens else target
    del tokens
    return {
        "train": {"file": path.name, "start": 0, "stop": cut},
        "valid": {"file": path.name, "start": cut, "stop": n_tokens},
    }


def write_token_folder(folder: Path, splits: dict[str, np.ndarray], name: str = "tokens") -> Path:
    """Write already tokenised splits (e.g. synthetic test data) as a token folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    meta_splits = {}
    for split, tokens in splits.items():
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        tokens.tofile(folder / f"tokens.{split}.bin")
        digest.update(split.encode() + tokens.tobytes())
        meta_splits[split] = {"file": f"tokens.{split}.bin", "start": 0, "stop": int(tokens.size)}
    meta = {
        "format": FORMAT_VERSION,
        "source": name,
        "fingerprint": digest.hexdigest()[:24],
        "tokenizer": {"name": "custom"},
        "dtype": "int32",
        "splits": meta_splits,
        "n_tokens": {k: v["stop"] for k, v in meta_splits.items()},
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def open_token_folder(folder: Path) -> TokenData:
    """Memory-map a token folder's splits, checking them against the sidecar."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text())
        views = {k: _open_split(folder, spec) for k, spec in meta["splits"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{folder} is not a usable token folder: {_one_line(err)}") from None
    if "train" not in views or "valid" not in views:
        raise DataError(f"{folder}/{META_NAME} must describe a train and a valid split")
    return TokenData(folder=folder, meta=meta, train=views["train"], valid=views["valid"])


def _open_split(folder: Path, spec: dict) -> np.ndarray:
    path = folder / spec["file"]
    size = path.stat().st_size // 4
    if spec["stop"] > size or spec["start"] > spec["stop"]:
        raise ValueError(f"{path.name} holds {size} tokens, the sidecar expects {spec['stop']}")
    if size == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype=np.int32, mode="r", shape=(size,))[spec["start"] : spec["stop"]]


# --------------------------------------------------------------------------- windows


def as_windows(tokens: np.ndarray, seq_length: int) -> np.ndarray:
    """Non-overlapping windows of seq_length + 1 tokens: (n_windows, seq_length + 1), a view."""
    n = tokens.size // (seq_length + 1)
    return tokens[: n * (seq_length + 1)].reshape(n, seq_length + 1)


class DataOrder:
    """The order in which training windows are read: a fresh permutation per epoch, drawn
    from (seed, epoch), so that any position can be recomputed from the seed alone."""

    def __init__(self, n_windows: int, seed: int):
        if n_windows <= 0:
            raise ValueError("no training windows")
        self.n_windows, self.seed = n_windows, seed
        self._epoch, self._perm = -1, None

    def window_ids(self, position: int, count: int) -> np.ndarray:
        """The window indices at data positions position .. position + count - 1."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, index = divmod(position + i, self.n_windows)
            out[i] = self._permutation(epoch)[index]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.n_windows)
        return self._perm


def eval_window_ids(n_windows: int, count: int) -> np.ndarray:
    """A fixed set of validation windows, spread evenly over the validation split."""
    count = min(count, n_windows)
    return np.unique(np.linspace(0, n_windows - 1, count).round().astype(np.int64))


# --------------------------------------------------------------------------- helpers


class _progress:
    """A rich progress bar when there is a console, else nothing."""

    def __init__(self, console, description: str):
        self.console, self.description = console, description
        self._bar = None

    def __enter__(self):
        if self.console is None:
            return (lambda n: None), (lambda n: None)
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

        self._bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._bar.start()
        task = self._bar.add_task(self.description, total=None)
        return (lambda n: self._bar.advance(task, n)), (lambda n: self._bar.update(task, total=n))

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()
        return False


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
