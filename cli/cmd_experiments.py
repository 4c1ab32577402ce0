"""`kssm sample`, `intervene`, `compare`, `ablate` (issue 5)."""

from __future__ import annotations

from .errors import not_landed


def sample() -> None:
    not_landed("sample", 5)


def intervene() -> None:
    not_landed("intervene", 5)


def compare() -> None:
    not_landed("compare", 5)


def ablate() -> None:
    not_landed("ablate", 5)
