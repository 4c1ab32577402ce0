"""`kssm train` and `kssm plot` (issue 4)."""

from __future__ import annotations

from .errors import not_landed


def train() -> None:
    not_landed("train", 4)


def plot() -> None:
    not_landed("plot", 4)
