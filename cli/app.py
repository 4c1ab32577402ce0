"""The `kssm` command line: a map of the tool. Each command is a thin wrapper, defined in its
own module, over a plain library function; heavy imports happen inside the commands.

Help is plain text (no boxes, no type tags on flags) and a usage error is one line, exit 2."""

from __future__ import annotations

from importlib import metadata

import typer
from typer.core import TyperGroup

from . import cmd_bench, cmd_convert, cmd_experiments, cmd_plot, cmd_sample, cmd_train
from .errors import run_with_short_errors


class _KssmGroup(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        commands = set(self.commands)
        run_with_short_errors(super().main, args, prog_name, complete_var, commands, **extra)


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


app.command("train", help="Train a model: --arch v3 | ssm | phase_mamba (resumable).")(
    cmd_train.train
)
app.command("sample", help="Generate text with R and U tracked per token.")(cmd_sample.sample)
app.command("intervene", help="Force R and measure whether the output changes.")(
    cmd_experiments.intervene
)
app.command("ablate", help="Bistable vs monostable: the published ablation.")(
    cmd_experiments.ablate
)
app.command(
    "convert", help="Convert a PyTorch K-SSM v3 or Phase-Mamba checkpoint (no torch needed)."
)(cmd_convert.convert)
app.command("compare", help="Compare two models on the same prompts (Phase-Mamba baseline).")(
    cmd_experiments.compare
)
app.command("plot", help="Draw a training run's figures (loss and the model's metrics).")(
    cmd_plot.plot
)

app.command("bench", help="Measure speed and memory on this machine (a table to paste).")(
    cmd_bench.bench
)


def main() -> None:
    app()
