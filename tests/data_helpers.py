"""Shared by the test_data*.py files: every test gets its own token cache (KSSM_CACHE, an
autouse fixture each file imports), and text is split into lines as the data code reads it."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("KSSM_CACHE", str(root))
    return root


def lines(text):
    return text.splitlines(keepends=True)
