"""`kssm bench`: a thin wrapper over mlx_kssm.bench.run_bench; prints a markdown table."""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import fail


def bench(
    config: str = typer.Option(
        "published,small",
        "--config",
        help="K-SSM v3 presets to measure, comma-separated (published, small, tiny): the train "
        "step and the forward pass for each; generation, the bank and the scan for the first.",
    ),
    batch: int = typer.Option(4, "--batch", help="Sequences per train step / forward pass."),
    seq: int = typer.Option(256, "--seq", help="Tokens per sequence."),
    context: int = typer.Option(512, "--context", help="Prompt tokens before generation."),
    new_tokens: int = typer.Option(16, "--new-tokens", help="Tokens generated (cached path)."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="2 timed repeats instead of 5, 3 recompute-sampler tokens instead of 8.",
    ),
    torch: bool = typer.Option(
        True, "--torch/--no-torch", help="The eager PyTorch reference step, if torch is installed."
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Also write the results as JSON (train_tokens_per_s, peak_memory_bytes, rows).",
    ),
    markdown_out: Path | None = typer.Option(
        None, "--markdown", help="Also write the table to this file."
    ),
) -> None:
    """Measure training, forward, generation, the oscillator bank and the scan on this machine."""
    from mlx_kssm.bench import BenchOptions, markdown, run_bench
    from mlx_kssm.config import model_args_for

    from .common import check_outputs, write_outputs

    configs = tuple(c.strip() for c in config.split(",") if c.strip())
    if not configs:
        fail("--config names no preset; give e.g. --config published,small")
    for name in configs:
        try:
            args = model_args_for(name)
        except ValueError as err:
            fail(f"--config: {err}")
        if args.max_positions is not None and seq > args.max_positions:
            fail(f"--seq {seq} exceeds the {name} preset's {args.max_positions} positions")
        if args.max_positions is not None and context + 1 > args.max_positions:
            fail(
                f"--context {context} leaves no room to generate in {args.max_positions} positions"
            )
    for flag, value in (("--batch", batch), ("--seq", seq), ("--context", context)):
        if value < 1:
            fail(f"{flag} must be at least 1, got {value}")
    if new_tokens < 2:
        fail(f"--new-tokens must be at least 2 (the first includes the prompt), got {new_tokens}")
    check_outputs(**{"--json": json_out, "--markdown": markdown_out})

    options = BenchOptions(configs, batch, seq, context, new_tokens, quick, torch)
    report = run_bench(options, log=lambda message: typer.echo(f"... {message}", err=True))
    command = "kssm bench " + " ".join(
        [f"--config {','.join(configs)}", f"--batch {batch}", f"--seq {seq}"]
        + (["--quick"] if quick else [])
    )
    table = markdown(report, command)
    typer.echo(table)
    write_outputs(report.to_dict(), json_out, markdown_out, table)
