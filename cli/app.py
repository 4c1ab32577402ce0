"""The `kssm` command line: a map of the tool. Each command is a thin wrapper, defined in its
own module, over a plain library function; heavy imports happen inside the commands.

Help is plain text (no boxes, no type tags on flags) and a usage error is one line, exit 2."""

from __future__ import annotations

import sys
from importlib import metadata

import typer
from typer.core import TyperCommand, TyperGroup

from mlx_kssm import blas_preload

from . import cmd_bench, cmd_convert, cmd_experiments, cmd_plot, cmd_sample, cmd_train
from .errors import run_with_short_errors


class _KssmGroup(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        commands = set(self.commands)
        run_with_short_errors(super().main, args, prog_name, complete_var, commands, **extra)


class _MatmulCommand(TyperCommand):
    """A command whose speed on a Linux CPU rests on the BLAS: once its options parsed, it says
    whether the re-executed process got Intel MKL (blas_preload), in one line on stderr."""

    def invoke(self, ctx):
        notice = blas_preload.start_up_notice()
        if notice:
            typer.echo(notice, err=True)
        return super().invoke(ctx)


# Re-executed with Intel MKL when it is installed (see main); convert and plot do no matmuls.
MATMUL_COMMANDS = ("train", "sample", "intervene", "ablate", "compare", "bench")


app = typer.Typer(
    name="kssm",
    cls=_KssmGroup,
    help="Kuramoto state-space language models (K-SSM) in MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        versions = {name: _installed(name) for name in ("mlx-kssm", "mlx")}
        typer.echo(f"kssm {versions['mlx-kssm']} (MLX {versions['mlx']})")
        raise typer.Exit()


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Kuramoto state-space language models (K-SSM) in MLX."""


app.command(
    "train", cls=_MatmulCommand, help="Train a model: --arch v3 | ssm | phase_mamba (resumable)."
)(cmd_train.train)
app.command("sample", cls=_MatmulCommand, help="Generate text with R and U tracked per token.")(
    cmd_sample.sample
)
app.command(
    "intervene", cls=_MatmulCommand, help="Force R and measure whether the output changes."
)(cmd_experiments.intervene)
app.command("ablate", cls=_MatmulCommand, help="Bistable vs monostable: the published ablation.")(
    cmd_experiments.ablate
)
app.command(
    "convert", help="Convert a PyTorch K-SSM v3 or Phase-Mamba checkpoint (no torch needed)."
)(cmd_convert.convert)
app.command(
    "compare",
    cls=_MatmulCommand,
    help="Compare two models on the same prompts (Phase-Mamba baseline).",
)(cmd_experiments.compare)
app.command("plot", help="Draw a training run's figures (loss and the model's metrics).")(
    cmd_plot.plot
)

app.command(
    "bench", cls=_MatmulCommand, help="Measure speed and memory on this machine (a table to paste)."
)(cmd_bench.bench)


def main() -> None:
    """The `kssm` program. On Linux x86_64 with the `mkl` extra installed, a command that does
    matmuls first re-executes this process with Intel MKL preloaded (blas_preload): the process
    is replaced, so call main() only as a program's entry point."""
    given = sys.argv[1:]
    if given and given[0] in MATMUL_COMMANDS and "--help" not in given:
        blas_preload.reexec_with_mkl()
    app()
