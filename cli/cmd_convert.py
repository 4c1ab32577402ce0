"""`kssm convert` (issues 3, 12): a PyTorch K-SSM v3 checkpoint, or an original Phase-Mamba
checkpoint on a given base, -> a model folder, without torch."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import fail


def convert(
    src: Path = typer.Argument(
        ...,
        help="A torch .pt checkpoint, or a run folder (its newest checkpoint_<step>.pt or "
        "step_<step>.pt).",
    ),
    out_dir: Path = typer.Argument(..., help="Folder to write config.json + model.safetensors."),
    monostable: bool = typer.Option(
        False,
        "--monostable",
        help="The checkpoint is the monostable ablation (u not clamped); the weights cannot tell.",
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Store the weights as float16 or bfloat16 (default: float32)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT_DIR when it holds a previous conversion."
    ),
    base: Path | None = typer.Option(
        None,
        "--base",
        help="Phase-Mamba checkpoints: the mlx-lm Mamba folder the core was trained on.",
        show_default=False,
    ),
    hook_layers: str | None = typer.Option(
        None,
        "--hook-layers",
        help="Phase-Mamba: the hooked layer(s), e.g. 32 or 16,32 (default: the middle one).",
        show_default=False,
    ),
) -> None:
    # Imported here, not at module level: only `kssm convert` itself pays for them.
    from mlx_kssm.checkpoints_convert.convert import convert as run_convert
    from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError

    layers = _parse_layers(hook_layers) if hook_layers is not None else None
    try:
        report = run_convert(src, out_dir, monostable, dtype, force, base=base, hook_layers=layers)
    except CheckpointError as err:
        fail(str(err))
    except OSError as err:  # e.g. a folder that cannot be listed
        fail(f"{err.filename or src}: {err.strerror or err}")

    args = report.args
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"converted {report.source} -> {report.out_dir}")
    if args.model_type == "phase_mamba":
        typer.echo(
            f"  config: phase_mamba on {args.base_path}, hooked at layer(s) {args.hook_layers}, "
            f"{args.n_oscillators} oscillators, {args.coupling} coupling, {args.dynamics}"
        )
    else:
        _print_v3(args)
    _print_weights_and_state(report)


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        fail(f"--hook-layers {text[:40]!r}: give layer indices, e.g. 32 or 16,32")


def _print_v3(args) -> None:
    typer.echo(
        f"  config: vocab {args.vocab_size}, hidden {args.hidden_dim}, {args.n_layers} layers, "
        f"{args.n_oscillators} oscillators, {args.n_harmonics} harmonics, "
        f"{args.max_positions} positions, {'bistable' if args.bistable else 'monostable'}"
    )


def _print_weights_and_state(report) -> None:
    typer.echo(
        f"  weights: {report.n_params:,} parameters, saved as {report.saved_dtype} "
        f"(source {', '.join(report.source_dtypes)} from {', '.join(report.locations)})"
    )
    if report.training_state:
        data = " --data TEXT --out RUN" if report.args.model_type == "phase_mamba" else ""
        typer.echo(
            f"  training state: step {report.step}, next lr {report.torch_lr_next:g}; "
            f"continue with `kssm train --resume {report.out_dir}{data}`"
        )
    elif report.training_state_left_out:
        step = f"of step {report.step} " if report.step is not None else ""
        typer.echo(f"  weights {step}only: the training state was left out (see the note above)")
    elif report.step is not None:
        typer.echo(f"  weights of step {report.step}; no training state in the source")
