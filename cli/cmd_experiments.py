"""`kssm sample`, `intervene`, `compare`, `ablate` (issue 5): thin typer layers over
mlx_kssm.generate and mlx_kssm.experiments. The library is imported inside each command so
that `kssm --help` stays fast; bad input ends in a one-line error and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import fail

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Model folder, or a run folder.")]
PromptsOpt = Annotated[
    Path | None, typer.Option("--prompts", help="Text file, one prompt per line.")
]
TempOpt = Annotated[float, typer.Option("--temp", help="Temperature; 0 = greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens; 0 = off.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus mass to keep; 1 = off.")]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Prompt p, trial t use seed + p * trials + t.")
]
TrialsOpt = Annotated[int, typer.Option("--trials", help="Generations per prompt.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="Significance level (Holm-corrected).")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the full result here.")]


# ---------------------------------------------------------------------------- helpers


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _load_model(path: Path):
    from mlx_kssm.io import ModelFolderError, load

    try:
        return load(path)
    except ModelFolderError as err:
        fail(str(err))


def _read_prompts(prompt: str | None, prompts_file: Path | None, default: list[str]) -> list[str]:
    if prompt is not None and prompts_file is not None:
        fail("give --prompt or --prompts, not both")
    if prompts_file is None:
        return [prompt] if prompt is not None else list(default)
    try:
        lines = prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read --prompts {prompts_file}: {err}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        fail(f"--prompts {prompts_file} has no prompts (one per line, blank lines skipped)")
    return prompts


def _encode_prompts(model, prompts: list[str]) -> list[list[int]]:
    """Tokenise and check every prompt before any work starts."""
    from mlx_kssm.generate import check_prompt, encode_prompt
    from mlx_kssm.tokenizer import TokenizerUnavailable

    try:
        encoded = [encode_prompt(p) for p in prompts]
    except TokenizerUnavailable as err:
        fail(str(err))
    for text, tokens in zip(prompts, encoded, strict=True):
        try:
            check_prompt(model, tokens)
        except ValueError as err:
            fail(f"prompt {text[:40]!r}: {err}")
    return encoded


def _check_sampling(temp: float, top_k: int, top_p: float) -> None:
    from mlx_kssm.generate import make_sampler

    try:
        make_sampler(temp, top_k, top_p)
    except ValueError as err:
        fail(str(err))


def _stop_tokens() -> list[int]:
    from mlx_kssm.tokenizer import eot_token

    return [eot_token()]


def _write_outputs(
    result: dict, json_out: Path | None, report: Path | None = None, markdown: str = ""
) -> None:
    from mlx_kssm.experiments.report import write_json

    console = _console()
    try:
        if json_out is not None:
            console.print(f"wrote {write_json(json_out, result)}")
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(markdown, encoding="utf-8")
            console.print(f"wrote {report}")
    except OSError as err:
        fail(f"cannot write the output: {err}")


# ---------------------------------------------------------------------------- sample


def sample(
    model: ModelOpt,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt text; '' starts a new document.")
    ] = None,
    prompts: PromptsOpt = None,
    temp: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    max_tokens: Annotated[
        int,
        typer.Option("--max-tokens", help="Tokens per prompt (fewer if positions run out)."),
    ] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (every prompt).")] = 0,
    show_r: Annotated[
        bool, typer.Option("--show-r", help="Print R (per layer, mean) and U per token.")
    ] = False,
    json_out: JsonOpt = None,
) -> None:
    """Stream generated text; stops at end-of-text, max-tokens, or the model's last position."""
    from mlx_kssm.generate import generate, generation_record, make_sampler

    _check_sampling(temp, top_k, top_p)
    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}")
    texts = _read_prompts(prompt, prompts, [""])
    net = _load_model(model)
    encoded = _encode_prompts(net, texts)
    sampler, console = make_sampler(temp, top_k, top_p), _console()
    records = []
    for text, tokens in zip(texts, encoded, strict=True):
        typer.secho(text, nl=False, dim=True)
        printer = _TokenPrinter(show_r)
        (gen,) = generate(
            net,
            tokens,
            sampler,
            max_tokens,
            seed=seed,
            stop_tokens=_stop_tokens(),
            on_token=printer,
        )
        printer.finish()
        record = generation_record(gen)
        record["prompt"] = text
        records.append(record)
        console.print(_summary_line(record, net.args.max_positions), style="dim", soft_wrap=True)
    settings = dict(model=str(model), temp=temp, top_k=top_k, top_p=top_p, max_tokens=max_tokens)
    _write_outputs({"settings": {**settings, "seed": seed}, "generations": records}, json_out)


class _TokenPrinter:
    """Streams text as tokens arrive; with --show-r one line per token with R and U."""

    def __init__(self, show_r: bool):
        from mlx_kssm.generate import TextStream

        self.show_r, self.stream, self.index = show_r, TextStream(), 0

    def __call__(self, row: int, token: int, R_layers: list[float], U: float) -> None:
        piece = self.stream.add(token)
        if not self.show_r:
            typer.echo(piece, nl=False)
            return
        if self.index == 0:
            typer.echo()
        layers = " ".join(f"{r:.3f}" for r in R_layers)
        mean = sum(R_layers) / len(R_layers)
        typer.echo(f"{self.index:>5} {piece!r:<18} R=[{layers}] mean={mean:.3f} U={U:.3f}")
        self.index += 1

    def finish(self) -> None:
        typer.echo(self.stream.flush())


def _summary_line(record: dict, max_positions: int) -> str:
    s = record["summary"]
    reason = {
        "stop": "end-of-text",
        "length": "--max-tokens reached",
        "max_positions": f"no position left (the model has {max_positions})",
    }[record["finish_reason"]]
    if not s["n_tokens"]:
        return f"[0 tokens; stopped: {reason}]"
    return (
        f"[{s['n_tokens']} tokens; stopped: {reason}; mean R {s['mean_R']:.3f}, "
        f"mean U {s['mean_U']:.3f}, Goldilocks {s['goldilocks_fraction']:.0%}]"
    )


# ---------------------------------------------------------------------------- intervene


def intervene(
    model: ModelOpt,
    force_r: Annotated[
        str, typer.Option("--force-r", help="Target R, or a comma list (0.1,0.3,0.5).")
    ] = "0.1,0.3,0.5,0.7,0.9",
    layers: Annotated[
        str, typer.Option("--layers", help="Layers to force: 'all' or indices (0,3).")
    ] = "all",
    mode: Annotated[
        str, typer.Option("--mode", help="phases: move the phases; omega: scale omega_0.")
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
    json_out: JsonOpt = None,
    report: Annotated[Path, typer.Option("--report", help="Markdown report.")] = Path(
        "intervene_report.md"
    ),
) -> None:
    """Force R in the forward pass and test whether the output changes (free model = control)."""
    from mlx_kssm.experiments import intervene as exp
    from mlx_kssm.experiments.report import attach_text, intervene_markdown, print_intervene
    from mlx_kssm.experiments.sampling import DEFAULT_PROMPTS
    from mlx_kssm.generate import decode_tokens

    try:
        targets = exp.parse_targets(force_r)
        if mode not in exp.MODES:
            raise ValueError(f"--mode must be one of {', '.join(exp.MODES)}, got {mode!r}")
    except ValueError as err:
        fail(str(err))
    _check_sampling(temp, top_k, top_p)
    net = _load_model(model)
    try:
        forced = exp.parse_layers(layers, len(net.blocks))
        settings = exp.InterveneSettings(
            targets=targets,
            layers=forced,
            mode=mode,
            trials=trials,
            max_tokens=max_tokens,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            alpha=alpha,
            eval_tokens=eval_tokens,
        )
    except ValueError as err:
        fail(str(err))
    prompt_texts = _read_prompts(None, prompts, list(DEFAULT_PROMPTS))
    encoded = _encode_prompts(net, prompt_texts)
    eval_ids, source = _eval_tokens(net, text, prompt_texts)
    console = _console()
    result = exp.run_intervention(
        net, encoded, eval_ids, settings, _stop_tokens(), progress=console.log
    )
    result["model"], result["eval_source"] = str(model), source
    attach_text(result, decode_tokens, prompt_texts)
    print_intervene(result, console)
    _write_outputs(result, json_out, report, intervene_markdown(result, str(model)))


def _eval_tokens(model, text: Path | None, prompts: list[str]) -> tuple[list[int], str]:
    """Teacher-forced tokens: --text, else the packaged valid split, else the prompts."""
    from mlx_kssm.experiments.intervene import packaged_eval_text
    from mlx_kssm.tokenizer import encode

    path = text if text is not None else packaged_eval_text()
    if path is None:
        body, source = "\n".join(prompts), "the prompts (no --text and no packaged corpus)"
    else:
        try:
            body, source = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            fail(f"cannot read --text {path}: {err}")
    ids = encode(body)
    if len(ids) < 2:
        fail(f"the teacher-forced text ({source}) has fewer than 2 tokens")
    if max(ids) >= model.args.vocab_size:
        fail(f"the text has token ids beyond the model's vocabulary of {model.args.vocab_size}")
    return ids, source


# ---------------------------------------------------------------------------- compare


def compare(
    model_a: Annotated[Path, typer.Argument(help="First model (folder or run folder).")],
    model_b: Annotated[Path, typer.Argument(help="Second model (folder or run folder).")],
    prompts: PromptsOpt = None,
    trials: TrialsOpt = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per generation.")] = 32,
    temp: TempOpt = 0.8,
    top_k: TopKOpt = 0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    alpha: AlphaOpt = 0.01,
    json_out: JsonOpt = None,
    report: Annotated[Path, typer.Option("--report", help="Markdown report.")] = Path(
        "compare_report.md"
    ),
) -> None:
    """Same prompts, trials and seeds on two models; entropy, distinct-2, repetition, t-tests."""
    from mlx_kssm.experiments.compare import CompareSettings, run_comparison
    from mlx_kssm.experiments.report import attach_text, compare_markdown, print_compare
    from mlx_kssm.experiments.sampling import DEFAULT_PROMPTS
    from mlx_kssm.generate import decode_tokens

    try:
        settings = CompareSettings(
            trials=trials,
            max_tokens=max_tokens,
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            alpha=alpha,
        )
    except ValueError as err:
        fail(str(err))
    nets = {"A": _load_model(model_a), "B": _load_model(model_b)}
    prompt_texts = _read_prompts(None, prompts, list(DEFAULT_PROMPTS))
    encoded = _encode_prompts(nets["A"], prompt_texts)
    _encode_prompts(nets["B"], prompt_texts)  # the prompts must fit both models
    console = _console()
    result = run_comparison(nets, encoded, settings, _stop_tokens(), progress=console.log)
    for entry, path in zip(result["models"], (model_a, model_b), strict=True):
        entry["path"] = str(path)
    attach_text(result, decode_tokens, prompt_texts)
    print_compare(result, console)
    _write_outputs(result, json_out, report, compare_markdown(result))


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

    console = _console()
    if runs is None:
        if data is None or steps is None:
            fail("give --data and --steps to train both variants, or --runs A B to compare")
        if steps < 1:
            fail(f"--steps must be at least 1, got {steps}")
        chosen = dict(eval_every=eval_every, batch_size=batch_size, seq_length=seq_length)
        overrides = {k: v for k, v in chosen.items() if v is not None}
        run_dirs = list(_train_both(data, steps, out, preset, seed, overrides, console).values())
    else:
        run_dirs = list(runs)
    try:
        result = compare_runs(run_dirs, out)
    except ValueError as err:
        fail(str(err))
    print_ablation(result, console)
    for kind in ("report", "csv", "figure", "json"):
        console.print(f"wrote {result['files'][kind]}")


def _train_both(data, steps, out, preset, seed, overrides, console) -> dict[str, Path]:
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
