"""`kssm plot RUN`: a thin wrapper over mlx_kssm.experiments.plots."""

from __future__ import annotations

import typer

from .errors import fail


def plot(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A `kssm train` run folder."),
    out: str | None = typer.Option(
        None, "--out", help="Where to write the PNGs (default RUN_DIR/figures)."
    ),
) -> None:
    """Draw a training run's figures: the loss, and each metric the model reports per layer."""
    from mlx_kssm.experiments.plots import plot_run

    try:
        paths = plot_run(run_dir, out)
    except ValueError as err:
        fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    for path in paths:
        typer.echo(str(path))
