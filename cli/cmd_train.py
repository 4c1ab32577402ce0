"""`kssm train` and `kssm plot` (issue 4): thin wrappers over mlx_kssm.training and
mlx_kssm.experiments.plots. Every option defaults to None, meaning "not given": a fresh run
then takes the preset's value, a resumed run the value its checkpoint recorded."""

from __future__ import annotations

import dataclasses

import typer

from .errors import fail

_MODEL = "Model (its shape is fixed once trained)"
_SCHEDULE = "Optimizer and schedule"
_LOOP = "Evaluation, checkpoints, logging"


def train(
    checkpoint: str | None = typer.Argument(
        None,
        metavar="CHECKPOINT",
        help="With --resume: the checkpoint folder (or run folder) to continue from; "
        "default: the newest checkpoint in --out.",
        show_default=False,
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="published (46M, default) | small | tiny: model + schedule."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="A folder with train.txt/valid.txt, a .txt/.jsonl/.parquet file, 'sotu-sample' "
        "(shipped; the tiny preset's default) or a hub dataset (default "
        "wikitext-103-raw-v1; needs a network).",
    ),
    out: str | None = typer.Option(None, "--out", help="Run folder (default runs/kssm)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer updates in total."),
    seed: int | None = typer.Option(None, "--seed", help="Init, data order and noise."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue exactly from the newest checkpoint (or CHECKPOINT)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Sequences per micro-batch."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per update."),
    seq_length: int | None = typer.Option(None, "--seq-length", help="Tokens per window."),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak learning rate.", rich_help_panel=_SCHEDULE
    ),
    warmup: int | None = typer.Option(
        None, "--warmup", help="Linear warmup steps.", rich_help_panel=_SCHEDULE
    ),
    schedule: str | None = typer.Option(
        None,
        "--schedule",
        help="cosine (to 0) | constant, after warmup.",
        rich_help_panel=_SCHEDULE,
    ),
    decay_steps: int | None = typer.Option(
        None,
        "--decay-steps",
        help="Step where the cosine reaches 0 (default --steps); set it to train in legs.",
        rich_help_panel=_SCHEDULE,
    ),
    weight_decay: float | None = typer.Option(
        None,
        "--weight-decay",
        help="AdamW decoupled weight decay, on every parameter.",
        rich_help_panel=_SCHEDULE,
    ),
    beta1: float | None = typer.Option(
        None, "--beta1", help="AdamW beta1.", rich_help_panel=_SCHEDULE
    ),
    beta2: float | None = typer.Option(
        None, "--beta2", help="AdamW beta2.", rich_help_panel=_SCHEDULE
    ),
    adam_eps: float | None = typer.Option(
        None, "--adam-eps", help="AdamW epsilon.", rich_help_panel=_SCHEDULE
    ),
    grad_clip: float | None = typer.Option(
        None, "--grad-clip", help="Global gradient-norm clip.", rich_help_panel=_SCHEDULE
    ),
    lambda_reg: float | None = typer.Option(
        None,
        "--lambda-reg",
        help="Weight of the regulariser (default 0.5 bistable, 0.0 monostable).",
        rich_help_panel=_SCHEDULE,
    ),
    eval_every: int | None = typer.Option(
        None, "--eval-every", help="Steps between evaluations.", rich_help_panel=_LOOP
    ),
    eval_batches: int | None = typer.Option(
        None, "--eval-batches", help="Fixed validation batches.", rich_help_panel=_LOOP
    ),
    save_every: int | None = typer.Option(
        None, "--save-every", help="Steps between checkpoints.", rich_help_panel=_LOOP
    ),
    keep_last: int | None = typer.Option(
        None, "--keep-last", help="Rolling checkpoints kept.", rich_help_panel=_LOOP
    ),
    sample_tokens: int | None = typer.Option(
        None, "--sample-tokens", help="Sample length at each eval (0: none).", rich_help_panel=_LOOP
    ),
    log_every: int | None = typer.Option(
        None,
        "--log-every",
        help="Steps between train rows in metrics.jsonl.",
        rich_help_panel=_LOOP,
    ),
    max_nonfinite: int | None = typer.Option(
        None,
        "--max-nonfinite",
        help="Stop after this many non-finite steps in a row.",
        rich_help_panel=_LOOP,
    ),
    head: str | None = typer.Option(
        None,
        "--head",
        help="Where the output head's cross-entropy runs: mlx | numpy | auto (numpy on "
        "MLX's Linux CPU wheel, whose BLAS is slow; same numbers).",
        rich_help_panel=_LOOP,
    ),
    monostable: bool | None = typer.Option(
        None, "--monostable", help="The ablation control: u is not clamped.", rich_help_panel=_MODEL
    ),
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Vocabulary (cl100k_base: 100277).", rich_help_panel=_MODEL
    ),
    hidden_dim: int | None = typer.Option(
        None, "--hidden-dim", help="Width d.", rich_help_panel=_MODEL
    ),
    n_layers: int | None = typer.Option(None, "--n-layers", help="Blocks.", rich_help_panel=_MODEL),
    n_oscillators: int | None = typer.Option(
        None, "--n-oscillators", help="Oscillators per layer.", rich_help_panel=_MODEL
    ),
    n_harmonics: int | None = typer.Option(
        None, "--n-harmonics", help="Harmonics of the readout.", rich_help_panel=_MODEL
    ),
    max_positions: int | None = typer.Option(
        None, "--max-positions", help="Learned positions (>= --seq-length).", rich_help_panel=_MODEL
    ),
    eval_noise: bool | None = typer.Option(
        None,
        "--eval-noise",
        help="Draw the phase noise at eval too (as PyTorch did).",
        rich_help_panel=_MODEL,
    ),
) -> None:
    """Train a K-SSM; Ctrl+C saves a checkpoint and exits, --resume continues exactly."""
    given = dict(locals())
    from rich.console import Console

    from mlx_kssm.config import TrainArgs
    from mlx_kssm.data import DataError
    from mlx_kssm.distributed_setup import resolve_on_main
    from mlx_kssm.tokenizer import TokenizerUnavailable
    from mlx_kssm.training import (
        TrainingInputError,
        TrainingStopped,
        resolve_args,
        run_training,
    )

    train_fields = [f.name for f in dataclasses.fields(TrainArgs) if f.name != "preset"]
    model_fields = ["vocab_size", "hidden_dim", "n_layers", "n_oscillators", "n_harmonics"]
    model_fields += ["max_positions", "eval_noise"]
    train_overrides = {k: given[k] for k in train_fields if given.get(k) is not None}
    model_overrides = {k: given[k] for k in model_fields if given[k] is not None}
    if monostable is not None:
        model_overrides["bistable"] = not monostable
    if checkpoint is not None and not resume:
        fail(f"a CHECKPOINT ({checkpoint}) is only read with --resume")
    resume_from = (checkpoint or True) if resume else None

    console = Console(stderr=True)
    try:
        # Under mlx.launch rank 0 resolves (its machine holds the run folder); the others take it.
        given_args = (preset, train_overrides, model_overrides, resume_from)
        train_args, model_args = resolve_on_main(resolve_args, *given_args)
        run_training(train_args, model_args, resume=resume_from, console=console)
    except (TrainingInputError, DataError, TokenizerUnavailable) as err:
        fail(_one_line(err))
    except TrainingStopped as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:  # before the loop took over Ctrl+C (e.g. while tokenising)
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


def plot(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A `kssm train` run folder."),
    out: str | None = typer.Option(
        None, "--out", help="Where to write the PNGs (default RUN_DIR/figures)."
    ),
) -> None:
    """Draw a training run's figures: loss, R per layer, u and |det| per layer."""
    from mlx_kssm.experiments.plots import plot_run

    try:
        paths = plot_run(run_dir, out)
    except ValueError as err:
        fail(_one_line(err))
    for path in paths:
        typer.echo(str(path))


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
