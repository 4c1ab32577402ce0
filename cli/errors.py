"""One-line errors with exit code 2, shared by every command, and the short form of the
command-line parser's own usage errors."""

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


def _parser_exceptions():
    """The parser's exception module: typer >= 0.24 vendors click, older typer uses click."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click import exceptions
    return exceptions


def run_with_short_errors(main, args, prog_name, complete_var, commands, **extra) -> NoReturn:
    """Run a command group's ``main`` (non-standalone) and exit like click, except that a usage
    error is one line, 'error: <what> (see 'kssm CMD --help')', with its exit code (2)."""
    exceptions = _parser_exceptions()
    try:
        code = main(args, prog_name, complete_var, standalone_mode=False, **extra)
    except exceptions.ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `kssm` alone: the help, as asked
            err.show()
            sys.exit(err.exit_code)
        ctx = getattr(err, "ctx", None)
        if ctx is not None:
            where = ctx.command_path
        else:  # some parser errors carry no context: name the command from the arguments
            given = list(sys.argv[1:] if args is None else args)
            where = f"kssm {given[0]}" if given and given[0] in commands else "kssm"
        hint = f" (see '{where} --help')"
        message = " ".join(err.format_message().split())
        typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
