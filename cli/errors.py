"""One-line errors with exit code 2, shared by every command."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def not_landed(command: str, issue: int) -> NoReturn:
    print(f"kssm {command}: not implemented yet (tracked in issue {issue})", file=sys.stderr)
    raise typer.Exit(code=2)
