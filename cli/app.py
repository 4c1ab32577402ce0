"""The `kssm` command line: a map of the tool. Each command is a thin wrapper, defined in its
own module, over a plain library function; heavy imports happen inside the commands."""

from __future__ import annotations

import typer

from . import cmd_convert, cmd_experiments, cmd_train

app = typer.Typer(
    name="kssm",
    help="Kuramoto state-space language models (K-SSM) in MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("train", help="Train a K-SSM (resumable; Ctrl+C saves and exits).")(cmd_train.train)
app.command("sample", help="Generate text with R and U tracked per token.")(cmd_experiments.sample)
app.command("intervene", help="Force R and measure whether the output changes.")(
    cmd_experiments.intervene
)
app.command("ablate", help="Bistable vs monostable: the published ablation.")(
    cmd_experiments.ablate
)
app.command("convert", help="Convert a PyTorch K-SSM v3 checkpoint (no torch needed).")(
    cmd_convert.convert
)
app.command("compare", help="Compare two models on the same prompts (Phase-Mamba baseline).")(
    cmd_experiments.compare
)
app.command("plot", help="Draw a training run's figures (loss, R and u per layer).")(cmd_train.plot)


def main() -> None:
    app()
