"""`kssm convert` (issue 3)."""

from __future__ import annotations

from .errors import not_landed


def convert() -> None:
    not_landed("convert", 3)
