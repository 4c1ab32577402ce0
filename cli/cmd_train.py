"""`kssm train` and `kssm plot` (issue 4): thin wrappers over mlx_kssm.training and
mlx_kssm.experiments.plots. Every option defaults to None, meaning "not given": a fresh run
then takes the preset's value, a resumed run the value its checkpoint recorded. --help shows
each preset's value; --print-config shows what a command line resolves to."""

from __future__ import annotations

import dataclasses
import json

import typer

from mlx_kssm.config import TRAIN_PRESETS, TrainArgs, model_args_for, train_args_for

from .errors import fail


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _preset_default(name: str) -> str:
    """A field's default in every preset, for --help: 'published 0.0004, ..., tiny 0.03'."""
    train_field = name in {f.name for f in dataclasses.fields(TrainArgs)}
    values = {
        preset: getattr(train_args_for(preset) if train_field else model_args_for(preset), name)
        for preset in TRAIN_PRESETS
    }
    if len({repr(v) for v in values.values()}) == 1:
        return _show(next(iter(values.values())))
    return ", ".join(f"{preset} {_show(v)}" for preset, v in values.items())


def _with_default(text: str, default: str) -> str:
    """Help text ending in the default, as typer shows a fixed one (typer would put a string
    default in parentheses)."""
    return f"{text}  [default: {default}]"


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
        None,
        "--preset",
        help=_with_default(
            "published (46M) | small | tiny: model + schedule; the other defaults follow it.",
            "published",
        ),
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help=_with_default(
            "A folder with train.txt/valid.txt, a .txt/.jsonl/.parquet file, 'sotu-sample' "
            "(shipped with the package) or a hub dataset name (needs a network).",
            _preset_default("data"),
        ),
    ),
    out: str | None = typer.Option(
        None, "--out", help=_with_default("Run folder.", _preset_default("out"))
    ),
    steps: int | None = typer.Option(
        None, "--steps", help=_with_default("Optimizer updates in total.", _preset_default("steps"))
    ),
    seed: int | None = typer.Option(
        None, "--seed", help=_with_default("Init, data order and noise.", _preset_default("seed"))
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue exactly from the newest checkpoint (or CHECKPOINT)."
    ),
    arch: str | None = typer.Option(
        None,
        "--arch",
        help=_with_default(
            "Architecture: v3 (the published K-SSM, no sequence mixing) | ssm (K-SSM with a "
            "selective scan) | phase_mamba (an oscillator core on a frozen mlx-lm Mamba, "
            "needs --base) | mamba_lm (mlx-lm's Mamba, a base to hook into).",
            "v3",
        ),
        rich_help_panel=_MODEL,
    ),
    base: str | None = typer.Option(
        None,
        "--base",
        help="phase_mamba: the base model's folder (any Mamba mlx-lm can load).",
        rich_help_panel=_MODEL,
    ),
    model_set: list[str] | None = typer.Option(
        None,
        "--set",
        help="KEY=VALUE, repeatable: any field of the architecture's ModelArgs (config.json), "
        "e.g. --set state_size=32, --set oscillators=false, --set coupling=additive, "
        "--set hook_layers=[16,32].",
        rich_help_panel=_MODEL,
    ),
    print_config: bool = typer.Option(
        False,
        "--print-config",
        help="Print the resolved configuration (JSON: train, model) and exit; nothing is written.",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help=_with_default("Sequences per micro-batch.", _preset_default("batch_size")),
    ),
    grad_accum: int | None = typer.Option(
        None,
        "--grad-accum",
        help=_with_default("Micro-batches per update.", _preset_default("grad_accum")),
    ),
    seq_length: int | None = typer.Option(
        None,
        "--seq-length",
        help=_with_default("Tokens per window.", _preset_default("seq_length")),
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help=_with_default("Peak learning rate.", _preset_default("lr")),
        rich_help_panel=_SCHEDULE,
    ),
    warmup: int | None = typer.Option(
        None,
        "--warmup",
        help=_with_default("Linear warmup steps.", _preset_default("warmup")),
        rich_help_panel=_SCHEDULE,
    ),
    schedule: str | None = typer.Option(
        None,
        "--schedule",
        help=_with_default("cosine (to 0) | constant, after warmup.", _preset_default("schedule")),
        rich_help_panel=_SCHEDULE,
    ),
    decay_steps: int | None = typer.Option(
        None,
        "--decay-steps",
        help=_with_default("Step where the cosine reaches 0; set it to train in legs.", "--steps"),
        rich_help_panel=_SCHEDULE,
    ),
    weight_decay: float | None = typer.Option(
        None,
        "--weight-decay",
        help=_with_default(
            "AdamW decoupled weight decay, on every parameter.", _preset_default("weight_decay")
        ),
        rich_help_panel=_SCHEDULE,
    ),
    beta1: float | None = typer.Option(
        None,
        "--beta1",
        help=_with_default("AdamW beta1.", _preset_default("beta1")),
        rich_help_panel=_SCHEDULE,
    ),
    beta2: float | None = typer.Option(
        None,
        "--beta2",
        help=_with_default("AdamW beta2.", _preset_default("beta2")),
        rich_help_panel=_SCHEDULE,
    ),
    adam_eps: float | None = typer.Option(
        None,
        "--adam-eps",
        help=_with_default("AdamW epsilon.", _preset_default("adam_eps")),
        rich_help_panel=_SCHEDULE,
    ),
    grad_clip: float | None = typer.Option(
        None,
        "--grad-clip",
        help=_with_default("Global gradient-norm clip.", _preset_default("grad_clip")),
        rich_help_panel=_SCHEDULE,
    ),
    lambda_reg: float | None = typer.Option(
        None,
        "--lambda-reg",
        help=_with_default(
            "Weight of the regulariser.", "0.5 bistable, 0.0 monostable and with --preset tiny"
        ),
        rich_help_panel=_SCHEDULE,
    ),
    eval_every: int | None = typer.Option(
        None,
        "--eval-every",
        help=_with_default("Steps between evaluations.", _preset_default("eval_every")),
        rich_help_panel=_LOOP,
    ),
    eval_batches: int | None = typer.Option(
        None,
        "--eval-batches",
        help=_with_default("Fixed validation batches.", _preset_default("eval_batches")),
        rich_help_panel=_LOOP,
    ),
    save_every: int | None = typer.Option(
        None,
        "--save-every",
        help=_with_default("Steps between checkpoints.", _preset_default("save_every")),
        rich_help_panel=_LOOP,
    ),
    keep_last: int | None = typer.Option(
        None,
        "--keep-last",
        help=_with_default("Rolling checkpoints kept.", _preset_default("keep_last")),
        rich_help_panel=_LOOP,
    ),
    sample_tokens: int | None = typer.Option(
        None,
        "--sample-tokens",
        help=_with_default(
            "Sample length at each eval (0: none).", _preset_default("sample_tokens")
        ),
        rich_help_panel=_LOOP,
    ),
    log_every: int | None = typer.Option(
        None,
        "--log-every",
        help=_with_default(
            "Steps between train rows in metrics.jsonl.", _preset_default("log_every")
        ),
        rich_help_panel=_LOOP,
    ),
    max_nonfinite: int | None = typer.Option(
        None,
        "--max-nonfinite",
        help=_with_default(
            "Stop after this many non-finite steps in a row.", _preset_default("max_nonfinite")
        ),
        rich_help_panel=_LOOP,
    ),
    head: str | None = typer.Option(
        None,
        "--head",
        help=_with_default(
            "Where the output head's cross-entropy runs: mlx | numpy | auto (numpy on "
            "MLX's Linux CPU wheel, whose BLAS is slow; same numbers).",
            _preset_default("head"),
        ),
        rich_help_panel=_LOOP,
    ),
    monostable: bool | None = typer.Option(
        None,
        "--monostable/--bistable",
        help=_with_default("--monostable: the ablation control, u is not clamped.", "bistable"),
        rich_help_panel=_MODEL,
    ),
    vocab_size: int | None = typer.Option(
        None,
        "--vocab-size",
        help=_with_default("Vocabulary (cl100k_base: 100277).", _preset_default("vocab_size")),
        rich_help_panel=_MODEL,
    ),
    hidden_dim: int | None = typer.Option(
        None,
        "--hidden-dim",
        help=_with_default("Width d.", _preset_default("hidden_dim")),
        rich_help_panel=_MODEL,
    ),
    n_layers: int | None = typer.Option(
        None,
        "--n-layers",
        help=_with_default("Blocks.", _preset_default("n_layers")),
        rich_help_panel=_MODEL,
    ),
    n_oscillators: int | None = typer.Option(
        None,
        "--n-oscillators",
        help=_with_default("Oscillators per layer.", _preset_default("n_oscillators")),
        rich_help_panel=_MODEL,
    ),
    n_harmonics: int | None = typer.Option(
        None,
        "--n-harmonics",
        help=_with_default("Harmonics of the readout.", _preset_default("n_harmonics")),
        rich_help_panel=_MODEL,
    ),
    max_positions: int | None = typer.Option(
        None,
        "--max-positions",
        help=_with_default(
            "Learned positions (>= --seq-length).", _preset_default("max_positions")
        ),
        rich_help_panel=_MODEL,
    ),
    eval_noise: bool | None = typer.Option(
        None,
        "--eval-noise/--no-eval-noise",
        help=_with_default("Draw the phase noise at eval too (as PyTorch did).", "no"),
        rich_help_panel=_MODEL,
    ),
) -> None:
    """Train a K-SSM; Ctrl+C saves a checkpoint and exits, --resume continues exactly.

    Defaults are the preset's (shown per preset); a resumed run keeps what its checkpoint
    recorded unless an option is given. --print-config shows the result.
    """
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
    model_overrides.update(_parse_sets(model_set or []))
    if base is not None:
        model_overrides["base_path"] = base
    model_type = None
    if arch is not None:
        from mlx_kssm.models import ConfigError, model_type_for

        try:
            model_type = model_type_for(arch)
        except ConfigError as err:
            fail(str(err))
    if checkpoint is not None and not resume:
        fail(f"a CHECKPOINT ({checkpoint}) is only read with --resume")
    resume_from = (checkpoint or True) if resume else None

    console = Console(stderr=True)
    try:
        # Under mlx.launch rank 0 resolves (its machine holds the run folder); the others take it.
        given_args = (preset, train_overrides, model_overrides, resume_from, model_type)
        train_args, model_args = resolve_on_main(resolve_args, *given_args)
        if print_config:
            _print_config(train_args, model_args)
            return
        run_training(train_args, model_args, resume=resume_from, console=console)
    except (TrainingInputError, DataError, TokenizerUnavailable) as err:
        fail(_one_line(err))
    except TrainingStopped as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:  # before the loop took over Ctrl+C (e.g. while tokenising)
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


def _parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE pairs; a VALUE that reads as JSON (3, 0.5, true, [16, 32]) is taken
    as such, anything else as a string. Types are checked with the model's config."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            fail(f"--set {item[:40]!r}: expected KEY=VALUE, e.g. --set state_size=32")
        try:
            values[key.strip()] = json.loads(text)
        except ValueError:
            values[key.strip()] = text
    return values


def _print_config(train_args, model_args) -> None:
    """The resolved configuration, checked as a run would check it; lambda_reg resolved too
    (the model's default auxiliary weight when not given)."""
    from mlx_kssm.models import build_model
    from mlx_kssm.models.base import ConfigError
    from mlx_kssm.schedule import aux_weight_for
    from mlx_kssm.training import check_args

    check_args(train_args, model_args)
    try:
        model = build_model(model_args)  # lazy arrays: nothing computed
    except ConfigError as err:  # e.g. a Phase-Mamba with neither --base nor a vocabulary
        fail(f"{_one_line(err)}; fix the configuration (e.g. --base PATH), then --print-config")
    weight = aux_weight_for(train_args, model)
    train = {**train_args.to_dict(), "lambda_reg": weight}
    typer.echo(json.dumps({"train": train, "model": model_args.to_dict()}, indent=2))


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
