"""`kssm intervene`, `compare`, `ablate` (issue 5): thin typer layers over
mlx_kssm.experiments. The library is imported inside each command so that `kssm --help` stays
fast; bad input ends in a one-line error and exit code 2, and output paths are checked before
any work starts. (`kssm sample` is in cmd_sample.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    AlphaOpt,
    JsonOpt,
    MinTextOpt,
    ModelOpt,
    PromptsOpt,
    SeedOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    TrialsOpt,
    check_model_path,
    check_outputs,
    check_sampling,
    console,
    default_report_path,
    encode_prompts,
    load_model,
    model_tokenizer,
    read_prompts,
    same_tokenizer,
    stop_tokens,
    write_outputs,
)
from .errors import fail

ReportOpt = Annotated[
    Path | None,
    typer.Option(
        "--report", help="Markdown report (default: beside the model).", show_default=False
    ),
]

# ---------------------------------------------------------------------------- intervene


def intervene(
    model: ModelOpt = None,
    force_r: Annotated[
        str, typer.Option("--force-r", help="Target R, or a comma list (0.1,0.3,0.5).")
    ] = "0.1,0.3,0.5,0.7,0.9",
    layers: Annotated[
        str, typer.Option("--layers", help="Layers to force: 'all' or indices (0,3).")
    ] = "all",
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="phases: move the phases to R exactly; omega: scale omega_0 (K-SSM); "
            "pattern: the original Phase-Mamba's phase pattern (approximate R).",
        ),
    ] = "phases",
    prompts: PromptsOpt = None,
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Teacher-forced text (default: packaged valid split)."),
    ] = None,
    trials: TrialsOpt = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per generation.")] = 32,
    temp: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    eval_tokens: Annotated[
        int, typer.Option("--eval-tokens", help="Teacher-forced tokens at most.")
    ] = 2048,
    alpha: AlphaOpt = 0.01,
    min_effect: Annotated[
        float,
        typer.Option(
            "--min-effect", help="Smallest mean KL or |dCE| (nats) that counts as a change."
        ),
    ] = 0.01,
    min_text_effect: MinTextOpt = 0.05,
    json_out: JsonOpt = None,
    report: ReportOpt = None,
) -> None:
    """Force R in the forward pass and test whether the output changes (free model = control).
    A change is declared where an effect reaches its minimum and its test passes."""
    from mlx_kssm.experiments import intervene as exp
    from mlx_kssm.experiments.interventions import check_mode
    from mlx_kssm.experiments.report import attach_text
    from mlx_kssm.experiments.report_intervene import intervene_markdown, print_intervene
    from mlx_kssm.experiments.sampling import DEFAULT_PROMPTS

    try:
        targets = exp.parse_targets(force_r)
        if mode not in exp.MODES:
            raise ValueError(f"--mode must be one of {', '.join(exp.MODES)}, got {mode!r}")
    except ValueError as err:
        fail(str(err))
    check_sampling(temp, top_k, top_p)
    check_model_path(model)
    report = report if report is not None else default_report_path(model, "intervene_report")
    check_outputs(**{"--json": json_out, "--report": report})
    prompt_texts = read_prompts(None, prompts, list(DEFAULT_PROMPTS))
    net = load_model(model)
    if net.n_banks == 0:
        fail(f"{model} has no oscillators (a {net.args.model_type} model): nothing to force")
    try:
        check_mode(net, mode)
    except ValueError as err:
        fail(str(err))
    tokenizer = model_tokenizer(net, model)
    try:
        settings = exp.InterveneSettings(
            targets=targets,
            layers=exp.parse_layers(layers, net.n_banks),
            mode=mode,
            trials=trials,
            max_tokens=max_tokens,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            alpha=alpha,
            min_effect=min_effect,
            min_text_effect=min_text_effect,
            eval_tokens=eval_tokens,
        )
    except ValueError as err:
        fail(str(err))
    encoded = encode_prompts(net, prompt_texts, tokenizer)
    eval_ids, source = _eval_tokens(net, text, prompt_texts, tokenizer)
    out = console()
    with _ProgressBars(out) as bars:
        result = exp.run_intervention(
            net, encoded, eval_ids, settings, stop_tokens(tokenizer), out.log, bars.advance
        )
    result["model"], result["eval_source"] = str(model), source
    attach_text(result, tokenizer.decode, prompt_texts)
    print_intervene(result, out)
    write_outputs(result, json_out, report, intervene_markdown(result, str(model)))


class _ProgressBars:
    """One rich progress bar per phase of the experiment, fed by advance(phase, done, total)."""

    def __init__(self, out):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        columns += (TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self.progress = Progress(*columns, console=out, transient=False)
        self.tasks: dict[str, object] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, phase: str, done: int, total: int) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done)


def _eval_tokens(model, text: Path | None, prompts: list[str], tokenizer) -> tuple[list[int], str]:
    """Teacher-forced tokens: --text, else the packaged valid split, else the prompts."""
    from mlx_kssm.experiments.intervene import packaged_eval_text

    path = text if text is not None else packaged_eval_text()
    if path is None:
        body, source = "\n".join(prompts), "the prompts (no --text and no packaged corpus)"
    else:
        try:
            body, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            fail(f"cannot read --text {path}: {err}")
    ids = tokenizer.encode(body)
    if len(ids) < 2:
        fail(f"the teacher-forced text ({source}) has fewer than 2 tokens")
    if max(ids) >= model.args.vocab_size:
        fail(f"the text has token ids beyond the model's vocabulary of {model.args.vocab_size}")
    return ids, source


# ---------------------------------------------------------------------------- compare


def compare(
    model_a: Annotated[
        Path | None,
        typer.Argument(
            metavar="MODEL_A", help="First model (folder or run folder).", show_default=False
        ),
    ] = None,
    model_b: Annotated[
        Path | None,
        typer.Argument(
            metavar="MODEL_B", help="Second model (folder or run folder).", show_default=False
        ),
    ] = None,
    prompts: PromptsOpt = None,
    trials: TrialsOpt = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per generation.")] = 32,
    temp: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    alpha: AlphaOpt = 0.01,
    min_text_effect: MinTextOpt = 0.05,
    json_out: JsonOpt = None,
    report: ReportOpt = None,
) -> None:
    """Same prompts, trials and seeds on two models; entropy, distinct-2, repetition, t-tests."""
    from mlx_kssm.experiments.compare import CompareSettings, run_comparison
    from mlx_kssm.experiments.report import attach_text, compare_markdown, print_compare
    from mlx_kssm.experiments.sampling import DEFAULT_PROMPTS

    try:
        settings = CompareSettings(
            trials=trials,
            max_tokens=max_tokens,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            alpha=alpha,
            min_text_effect=min_text_effect,
        )
    except ValueError as err:
        fail(str(err))
    check_model_path(model_a, "MODEL_A")
    check_model_path(model_b, "MODEL_B")
    report = report if report is not None else default_report_path(model_a, "compare_report")
    check_outputs(**{"--json": json_out, "--report": report})
    prompt_texts = read_prompts(None, prompts, list(DEFAULT_PROMPTS))
    nets = {"A": load_model(model_a), "B": load_model(model_b)}
    tokenizer = same_tokenizer(
        {
            "MODEL_A": model_tokenizer(nets["A"], model_a),
            "MODEL_B": model_tokenizer(nets["B"], model_b),
        }
    )
    encoded = encode_prompts(nets["A"], prompt_texts, tokenizer)
    encode_prompts(nets["B"], prompt_texts, tokenizer)  # the prompts must fit both models
    out = console()
    result = run_comparison(nets, encoded, settings, stop_tokens(tokenizer), progress=out.log)
    for entry, path in zip(result["models"], (model_a, model_b), strict=True):
        entry["path"] = str(path)
    attach_text(result, tokenizer.decode, prompt_texts)
    print_compare(result, out)
    write_outputs(result, json_out, report, compare_markdown(result))


# ---------------------------------------------------------------------------- ablate


def ablate(
    data: Annotated[
        str | None, typer.Option("--data", help="Training data (as for `kssm train`).")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps per variant.")] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Runs in OUT/bistable, OUT/monostable; reports in OUT.")
    ] = Path("runs/ablation"),
    preset: Annotated[str, typer.Option("--preset", help="Model + schedule preset.")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="The same seed for both variants.")] = 42,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Steps between evaluations (preset's).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Sequences per micro-batch (preset's).")
    ] = None,
    seq_length: Annotated[
        int | None, typer.Option("--seq-length", help="Tokens per window (preset's).")
    ] = None,
    runs: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--runs", help="Compare two existing run folders instead of training."),
    ] = None,
) -> None:
    """Train bistable and monostable alike, then tabulate and plot the published ablation."""
    from mlx_kssm.experiments.ablate import compare_runs
    from mlx_kssm.experiments.report import print_ablation

    terminal = console()
    if runs is None:
        if data is None or steps is None:
            fail("give --data and --steps to train both variants, or --runs A B to compare")
        if steps < 1:
            fail(f"--steps must be at least 1, got {steps}")
        chosen = dict(eval_every=eval_every, batch_size=batch_size, seq_length=seq_length)
        overrides = {k: v for k, v in chosen.items() if v is not None}
        run_dirs = list(_train_both(data, steps, out, preset, seed, overrides, terminal).values())
    else:
        run_dirs = list(runs)
    try:
        result = compare_runs(run_dirs, out)
    except ValueError as err:
        fail(str(err))
    print_ablation(result, terminal)
    for kind in ("report", "csv", "figure", "json"):
        terminal.print(f"wrote {result['files'][kind]}")


def _train_both(data, steps, out, preset, seed, overrides, terminal) -> dict[str, Path]:
    from mlx_kssm.experiments.ablate import AblationInterrupted, train_variants
    from mlx_kssm.training import TrainingStopped

    try:
        return train_variants(
            data, steps, out, preset=preset, console=console, seed=seed, **overrides
        )
    except ValueError as err:  # bad data, preset or settings: nothing was trained
        fail(str(err))
    except TrainingStopped as err:  # diverged: not bad input, but no traceback either
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except AblationInterrupted as err:  # Ctrl+C: the run saved a checkpoint and returned
        typer.echo(f"stopped: {err}", err=True)
        raise typer.Exit(code=130) from None
