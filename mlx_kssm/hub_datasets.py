"""Hugging Face hub datasets as a text source (``--data wikitext-103-raw-v1``, ``owner/name``).

Offline, the hub is not asked at all (only the local ``datasets`` cache is tried), so that a
machine without a network fails at once instead of after ~25 s of retries.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Iterator
from urllib.parse import urlparse

from .documents import SPLIT_NAMES, TITLE_LINE, TITLE_LOOKAHEAD, group_documents, text_column
from .token_folder import DataError, one_line


class HubUnavailable(RuntimeError):
    """The dataset could not be loaded; the message says why, in a few words."""


def hub_id(spec: str) -> tuple[str, str | None]:
    """'wikitext-103-raw-v1' -> ('wikitext', 'wikitext-103-raw-v1'); 'owner/name:config'."""
    if spec.startswith("wikitext-"):
        return "wikitext", spec
    path, _, config = spec.partition(":")
    return path, config or None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the proxy in front of it) answers, within ``timeout``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(path: str, config: str | None):
    """The hub dataset's splits; raises HubUnavailable."""
    with _offline_unless_reachable() as offline:
        import datasets

        try:
            return datasets.load_dataset(path, config)
        except Exception as err:  # noqa: BLE001 - network errors arrive as many types
            why = "no network and not in the local datasets cache" if offline else one_line(err)
            raise HubUnavailable(why) from None


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


def hub_splits(dataset) -> dict[str, object]:
    """The train split and, when there is one, the validation split."""
    found = {k: next((dataset[n] for n in v if n in dataset), None) for k, v in SPLIT_NAMES.items()}
    if found["train"] is None:
        names = one_line(", ".join(map(str, dataset)))
        raise DataError(f"the dataset has no train split (splits: {names}); pick another one")
    return {k: v for k, v in found.items() if v is not None}


def hub_documents(split, advance) -> Iterator[str]:
    """Rows are lines (WikiText) when titles appear among the first rows, else documents."""
    rows = split[text_column(split.column_names, "the dataset")]
    counted = _counted(rows, advance)
    if any(TITLE_LINE.match(row or "") for row in rows[:TITLE_LOOKAHEAD]):
        return group_documents(row if row.endswith("\n") else row + "\n" for row in counted)
    return counted


def _counted(rows: Iterable[str], advance) -> Iterator[str]:
    for row in rows:
        advance(1)
        yield row
