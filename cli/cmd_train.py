"""`kssm train` and `kssm plot` (issue 4): thin wrappers over mlx_kssm.training and
mlx_kssm.experiments.plots. Every option defaults to None, meaning "not given": a fresh run
then takes the preset's value, a resumed run the value its checkpoint recorded."""

from __future__ import annotations

from typing import Optional

import typer

from .errors import fail

_MODEL = "Model shape (fresh runs only)"
_SCHEDULE = "Optimizer and schedule"
_LOOP = "Evaluation, checkpoints, logging"


def train(
    checkpoint: Optional[str] = typer.Argument(
        None,
        metavar="[CHECKPOINT]",
        help="With --resume: the checkpoint folder (or run folder) to continue from; "
        "default: the newest checkpoint in --out.",
        show_default=False,
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="published (46M, default) | small | tiny: model + schedule."
    ),
    data: Optional[str] = typer.Option(
        None,
        "--data",
        help="A folder with train.txt/valid.txt, a .txt/.jsonl/.parquet file, 'sotu-sample' "
        "(shipped) or a hub dataset (default wikitext-103-raw-v1; needs a network).",
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/kssm)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer updates in total."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Init, data order and noise."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue exactly from the newest checkpoint (or CHECKPOINT)."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per micro-batch."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per update."),
    seq_length: Optional[int] = typer.Option(None, "--seq-length", help="Tokens per window."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate.", rich_help_panel=_SCHEDULE),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup steps.", rich_help_panel=_SCHEDULE),
    schedule: Optional[str] = typer.Option(
        None, "--schedule", help="cosine (to 0) | constant, after warmup.", rich_help_panel=_SCHEDULE
    ),
    decay_steps: Optional[int] = typer.Option(
        None,
        "--decay-steps",
        help="Step where the cosine reaches 0 (default --steps); set it to train in legs.",
        rich_help_panel=_SCHEDULE,
    ),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", rich_help_panel=_SCHEDULE),
    beta1: Optional[float] = typer.Option(None, "--beta1", rich_help_panel=_SCHEDULE),
    beta2: Optional[float] = typer.Option(None, "--beta2", rich_help_panel=_SCHEDULE),
    adam_eps: Optional[float] = typer.Option(None, "--adam-eps", rich_help_panel=_SCHEDULE),
    grad_clip: Optional[float] = typer.Option(
        None, "--grad-clip", help="Global gradient-norm clip.", rich_help_panel=_SCHEDULE
    ),
    lambda_reg: Optional[float] = typer.Option(
        None,
        "--lambda-reg",
        help="Weight of the regulariser (default 0.5 bistable, 0.0 monostable).",
        rich_help_panel=_SCHEDULE,
    ),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", rich_help_panel=_LOOP),
    eval_batches: Optional[int] = typer.Option(
        None, "--eval-batches", help="Fixed validation batches.", rich_help_panel=_LOOP
    ),
    save_every: Optional[int] = typer.Option(None, "--save-every", rich_help_panel=_LOOP),
    keep_last: Optional[int] = typer.Option(
        None, "--keep-last", help="Rolling checkpoints kept.", rich_help_panel=_LOOP
    ),
    sample_tokens: Optional[int] = typer.Option(
        None, "--sample-tokens", help="Sample length at each eval (0: none).", rich_help_panel=_LOOP
    ),
    log_every: Optional[int] = typer.Option(
        None, "--log-every", help="Steps between train rows in metrics.jsonl.", rich_help_panel=_LOOP
    ),
    max_nonfinite: Optional[int] = typer.Option(
        None, "--max-nonfinite", help="Stop after this many non-finite steps in a row.",
        rich_help_panel=_LOOP,
    ),
    monostable: Optional[bool] = typer.Option(
        None, "--monostable", help="The ablation control: u is not clamped.", rich_help_panel=_MODEL
    ),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", rich_help_panel=_MODEL),
    hidden_dim: Optional[int] = typer.Option(None, "--hidden-dim", rich_help_panel=_MODEL),
    n_layers: Optional[int] = typer.Option(None, "--n-layers", rich_help_panel=_MODEL),
    n_oscillators: Optional[int] = typer.Option(None, "--n-oscillators", rich_help_panel=_MODEL),
    n_harmonics: Optional[int] = typer.Option(None, "--n-harmonics", rich_help_panel=_MODEL),
    max_positions: Optional[int] = typer.Option(None, "--max-positions", rich_help_panel=_MODEL),
    eval_noise: Optional[bool] = typer.Option(
        None, "--eval-noise", help="Draw the phase noise at eval too (as PyTorch did).",
        rich_help_panel=_MODEL,
    ),
) -> None:
    """Train a K-SSM; Ctrl+C saves a checkpoint and exits, --resume continues exactly."""
    given = dict(locals())
    from rich.console import Console

    from mlx_kssm.tokenizer import TokenizerUnavailable
    from mlx_kssm.training import TrainingStopped, resolve_args, run_training

    train_fields = [
        "data", "out", "steps", "seed", "batch_size", "grad_accum", "seq_length", "lr", "warmup",
        "schedule", "decay_steps", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip",
        "lambda_reg", "eval_every", "eval_batches", "save_every", "keep_last", "sample_tokens",
        "log_every", "max_nonfinite",
    ]
    model_fields = [
        "vocab_size", "hidden_dim", "n_layers", "n_oscillators", "n_harmonics", "max_positions",
        "eval_noise",
    ]
    train_overrides = {k: given[k] for k in train_fields if given[k] is not None}
    model_overrides = {k: given[k] for k in model_fields if given[k] is not None}
    if monostable is not None:
        model_overrides["bistable"] = not monostable
    if checkpoint is not None and not resume:
        fail(f"a CHECKPOINT ({checkpoint}) is only read with --resume")
    resume_from = (checkpoint or True) if resume else None

    console = Console(stderr=True)
    try:
        train_args, model_args = resolve_args(preset, train_overrides, model_overrides, resume_from)
        run_training(train_args, model_args, resume=resume_from, console=console)
    except (ValueError, TokenizerUnavailable) as err:  # TrainingInputError, DataError, presets
        fail(_one_line(err))
    except TrainingStopped as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:  # before the loop took over Ctrl+C (e.g. while tokenising)
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


def plot(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A `kssm train` run folder."),
    out: Optional[str] = typer.Option(
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
