"""Text -> tokens -> batches (spec: "Training recipe", Data).

What ``--data`` may name, in the order it is tried:
  1. a token folder: ``meta.json`` + ``tokens.*.bin``, as written by this module (reused as is)
  2. a folder with ``train.{txt,jsonl,json,parquet}`` and optionally ``valid.*`` / ``validation.*``
     (WikiText-raw style)
  3. one ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file
  4. ``sotu-sample``: the public-domain corpus shipped with the package (``mlx_kssm/corpus/``)
  5. a hub dataset name (default ``wikitext-103-raw-v1``) through ``datasets``: needs a network
Plain text is read directly; jsonl / json / parquet and hub datasets go through ``datasets``.
Without a validation split, the last ~5% of the tokens (cut at a document end) are held out.

Text is tokenised once with the model's tokenizer (cl100k_base unless the model has its own,
tokenizer.py), an end-of-text token after each document, into a
token folder under the cache (``$KSSM_CACHE``, default ``~/.cache/mlx-kssm``; the source may be
read-only): flat int32 files plus a JSON sidecar with the token counts, the tokenizer and the
source's fingerprint, so that a changed source or tokenizer is noticed and tokenised again.

Training reads non-overlapping windows of seq_length + 1 tokens in an order drawn from the
seed, one permutation per epoch; the data position is simply the number of windows consumed.

The parts live beside this module, which ties them together and re-exports their names:
documents.py (text and tables -> documents; binary and non-UTF-8 text), hub_datasets.py,
token_folder.py (the token files and their sidecar, checked on opening) and windows.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import discard, publish_folder, temporary_folder
from .documents import (
    SPLIT_NAMES,
    TextCount,
    check_is_text,
    group_documents,
    table_rows,
    text_lines,
)
from .hub_datasets import HubUnavailable, hub_documents, hub_id, hub_splits, load_hub
from .token_folder import (
    FORMAT_VERSION,
    MAX_META_BYTES,
    META_NAME,
    TOKEN_DTYPE,
    VALID_FRACTION,
    DataError,
    TokenData,
    check_token_range,
    hold_out,
    one_line,
    open_token_folder,
    write_token_folder,
    write_tokens,
)
from .windows import DataOrder, as_windows, eval_window_ids

__all__ = [
    "VALID_FRACTION",
    "DataError",
    "DataOrder",
    "Source",
    "TokenData",
    "as_windows",
    "check_cache_writable",
    "check_token_range",
    "eval_window_ids",
    "group_documents",
    "open_token_folder",
    "prepare_tokens",
    "resolve_source",
    "write_token_folder",
]

SAMPLE_CORPUS = "sotu-sample"
HUB_DEFAULT = "wikitext-103-raw-v1"
TOKENIZER_NAME = "cl100k_base"
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
LOCAL_ALTERNATIVES = (
    f"use --data {SAMPLE_CORPUS} (shipped with the package), --data FOLDER holding train.txt "
    "(and valid.txt), or --data FILE (.txt, .jsonl or .parquet)"
)


@dataclass(frozen=True)
class Source:
    """Where the text comes from, before any tokenising."""

    kind: str  # "tokens" | "files" | "hub"
    name: str  # what the user passed, for messages and cache folder names
    files: dict[str, tuple[Path, ...]] | None = None  # split -> files (kind "files")
    hub: tuple[str, str | None] | None = None  # (dataset path, config) (kind "hub")
    folder: Path | None = None  # the token folder (kind "tokens")


# --------------------------------------------------------------------------- sources


def corpus_folder() -> Path:
    """The sample corpus shipped inside the package."""
    return Path(__file__).resolve().parent / "corpus"


def resolve_source(spec: str) -> Source:
    """Interpret ``--data``. Raises DataError for a missing, empty, unreadable or binary path."""
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
    return Source(kind="hub", name=spec, hub=hub_id(spec))


def _looks_like_path(spec: str) -> bool:
    suffix = Path(spec).suffix.lower()
    return spec.startswith((".", "~", os.sep)) or suffix in TEXT_SUFFIXES + TABLE_SUFFIXES


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
        if not file.is_file():
            raise DataError(f"{file} is not a regular file; {LOCAL_ALTERNATIVES}")
        if not os.access(file, os.R_OK):
            raise DataError(f"{file} is not readable; check its permissions")
        if file.stat().st_size == 0:
            raise DataError(f"{file} is empty; {LOCAL_ALTERNATIVES}")
        if file.suffix.lower() in TEXT_SUFFIXES:
            check_is_text(file)
    return Source(kind="files", name=spec, files=splits)


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for suffix in TEXT_SUFFIXES + TABLE_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def _load_hub(source: Source):
    path, config = source.hub
    try:
        return load_hub(path, config)
    except HubUnavailable as err:
        raise DataError(
            f"cannot load the hub dataset {one_line(source.name, 80)!r} ({err}); "
            f"{LOCAL_ALTERNATIVES}"
        ) from None


# --------------------------------------------------------------------------- tokenising


def cache_root() -> Path:
    return Path(os.environ.get("KSSM_CACHE") or Path.home() / ".cache" / "mlx-kssm")


def tokenizer_identity(tokenizer=None) -> dict:
    """What the sidecar records of the tokenizer (None: cl100k_base); another one means
    tokenising again."""
    from .tokenizer import resolve

    return resolve(tokenizer).identity()


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


def cache_folder(source: Source, root: Path | None = None, tokenizer: dict | None = None) -> Path:
    """One cache folder per source location and tokenizer (a changed source replaces its own
    cache; cl100k_base's folders carry no tokenizer suffix, as before there were others)."""
    where = (
        source.hub
        if source.kind == "hub"
        else sorted(str(f.resolve()) for fs in source.files.values() for f in fs)
    )
    key = hashlib.sha256(json.dumps([source.kind, where]).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source.name).name or source.name)[:40]
    if tokenizer is not None and tokenizer.get("name") != TOKENIZER_NAME:
        tag = {k: v for k, v in tokenizer.items() if k != "n_vocab"}
        key += "-tok" + hashlib.sha256(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:8]
    return (root or cache_root()) / "tokens" / f"{slug}-{key}"


def prepare_tokens(
    source: Source, console=None, root: Path | None = None, tokenizer=None
) -> TokenData:
    """Tokenise ``source`` into the cache unless an up-to-date copy is there; open it.

    ``tokenizer``: a tokenizer.Tokenizer, or a function returning one (asked only when
    needed); None is cl100k_base. A token folder made with another named tokenizer is refused.
    """
    from .tokenizer import recorded_mismatch, resolve

    if source.kind == "tokens":
        data = open_token_folder(source.folder)
        problem = recorded_mismatch(data.meta.get("tokenizer"), tokenizer)
        if problem:
            raise DataError(f"{source.name} {problem}")
        return data
    tokenizer = resolve(tokenizer)
    identity = tokenizer_identity(tokenizer)
    folder = cache_folder(source, root, identity)
    fingerprint = source_fingerprint(source)
    stale = _stale_reason(folder, fingerprint, identity)
    if stale is None:
        try:
            return open_token_folder(folder)
        except DataError as err:  # damaged on disk since: the source is there to redo it
            stale = f"the cached tokens cannot be used ({one_line(err, 120)})"
    if stale:
        _say(console, f"{source.name}: {stale}; tokenising again")
    check_cache_writable(folder.parent.parent)
    notes = _tokenise_source(source, folder, fingerprint, tokenizer, identity, console)
    for note in notes:
        _say(console, note)
    tokens = open_token_folder(folder)
    if console is not None:
        console.print(
            f"tokenised {source.name}: {tokens.train.size:,} train + {tokens.valid.size:,} "
            f"valid tokens in {folder}"
        )
    return tokens


def check_cache_writable(root: Path | None = None) -> Path:
    """The token cache (``$KSSM_CACHE``) exists and takes files; else a one-line DataError.
    Checked before tokenising, so that hours of work are not lost at the last write."""
    root = Path(root) if root is not None else cache_root()
    try:
        (root / "tokens").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root / "tokens"):
            pass
    except OSError as err:
        raise DataError(
            f"the token cache {root} is not writable ({err.strerror or one_line(err)}); set "
            "KSSM_CACHE to a folder you can write, e.g. export KSSM_CACHE=/tmp/mlx-kssm-cache"
        ) from None
    return root


def _stale_reason(folder: Path, fingerprint: str, tokenizer: dict) -> str | None:
    """None if the cached tokens can be reused, "" if there are none, else why not."""
    try:
        if (folder / META_NAME).stat().st_size > MAX_META_BYTES:
            return "the cached sidecar is not ours"
        meta = json.loads((folder / META_NAME).read_bytes())
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(meta, dict):
        return "the cached sidecar is not ours"
    if meta.get("format") != FORMAT_VERSION:
        return "the cached tokens were made by another version of mlx-kssm"
    if meta.get("fingerprint") != fingerprint:
        return "the source changed since it was tokenised"
    if meta.get("tokenizer") != tokenizer:
        return "the tokenizer differs from the one that made the cached tokens"
    return None


def _tokenise_source(
    source: Source, folder: Path, fingerprint: str, tokenizer, identity: dict, console
) -> list[str]:
    """Write the token folder to a temporary name and rename it into place. Returns one
    line per text file that held bytes that are not UTF-8 text (to tell the user)."""
    tmp = temporary_folder(folder)
    text_counts: dict[Path, TextCount] = {}
    try:
        with _progress(console, f"tokenising {source.name}") as (advance, set_total):
            if source.kind == "hub":
                splits = hub_splits(_load_hub(source))
                set_total(sum(len(s) for s in splits.values()))
                streams = {k: hub_documents(s, advance) for k, s in splits.items()}
            else:
                set_total(sum(f.stat().st_size for fs in source.files.values() for f in fs))
                streams = {
                    k: _file_documents(fs, advance, text_counts) for k, fs in source.files.items()
                }
            counts = {
                k: write_tokens(docs, tmp / f"tokens.{k}.bin", tokenizer=tokenizer)
                for k, docs in streams.items()
            }
        splits = {k: {"file": f"tokens.{k}.bin", "start": 0, "stop": n} for k, n in counts.items()}
        if "valid" not in splits:
            splits = hold_out(tmp / splits["train"]["file"], counts["train"], identity["eot"])
        meta = {
            "format": FORMAT_VERSION,
            "source": source.name,
            "fingerprint": fingerprint,
            "tokenizer": identity,
            "dtype": TOKEN_DTYPE,
            "splits": splits,
            "n_tokens": {k: v["stop"] - v["start"] for k, v in splits.items()},
            "undecodable_bytes": sum(c.undecodable for c in text_counts.values()),
            "control_bytes": sum(c.control for c in text_counts.values()),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        publish_folder(tmp, folder, replace=True)
    finally:
        discard(tmp)
    return [line for file, c in text_counts.items() if (line := c.report(file))]


def _file_documents(
    files: tuple[Path, ...], advance, counts: dict[Path, TextCount]
) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            counts[file] = TextCount()
            yield from group_documents(text_lines(file, advance, counts[file]))
        else:
            yield from table_rows(file)
            advance(file.stat().st_size)


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


def _say(console, line: str) -> None:
    """A yellow note on the console (the text is printed as is: paths may hold brackets)."""
    if console is not None:
        console.print(line, style="yellow", markup=False, highlight=False)
