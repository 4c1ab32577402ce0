"""`kssm sample`: stream generated text, with R and U per token under --show-r."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import (
    JsonOpt,
    ModelOpt,
    PromptsOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    check_model_path,
    check_outputs,
    check_prompt_tokens,
    check_sampling,
    console,
    encode_text,
    load_model,
    model_tokenizer,
    read_prompts,
    stop_tokens,
    write_outputs,
)
from .errors import fail

NO_MIXING_NOTE = (
    "note: this model has no sequence mixing: each position sees only its own token and "
    "position, so of a prompt only its last token and its length shape what follows"
)


def sample(
    model: ModelOpt = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt text; '' starts a new document.")
    ] = None,
    prompts: PromptsOpt = None,
    prompt_ids: Annotated[
        str | None,
        typer.Option("--prompt-ids", help="Prompt as raw token ids, e.g. 1,2,3."),
    ] = None,
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
    from mlx_kssm.experiments.model_api import generate_rows, mixes_sequence
    from mlx_kssm.generate import generation_record, make_sampler

    check_sampling(temp, top_k, top_p)
    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}")
    if prompt_ids is not None and (prompt is not None or prompts is not None):
        fail("give one of --prompt, --prompts and --prompt-ids")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    check_model_path(model)
    check_outputs(**{"--json": json_out})
    texts = read_prompts(prompt, prompts, [""]) if ids is None else []
    net = load_model(model)
    tokenizer = model_tokenizer(net, model)
    if ids is not None:  # checked against the vocabulary before anything decodes them
        vocab = net.args.vocab_size
        outside = [t for t in ids if not 0 <= t < vocab]
        if outside:
            fail(f"--prompt-ids: {outside[0]} is not a token id of this model (0..{vocab - 1})")
        check_prompt_tokens(net, ids, "--prompt-ids")
        texts = [tokenizer.decode(ids)]
    encoded = [ids] if ids is not None else [_encode(net, text, tokenizer) for text in texts]
    out = console()
    if not mixes_sequence(net):
        typer.echo(NO_MIXING_NOTE, err=True)
    sampler = make_sampler(temp, top_k, top_p)
    records = []
    for text, tokens in zip(texts, encoded, strict=True):
        check_prompt_tokens(net, tokens, f"prompt {text[:40]!r}")
        typer.secho(text, nl=False, dim=True)
        printer = _TokenPrinter(show_r, tokenizer, tones=_has_tones(net))
        stop = stop_tokens(tokenizer)
        (gen,) = generate_rows(
            net, tokens, sampler, max_tokens, seed=seed, stop_tokens=stop, on_token=printer
        )
        printer.finish()
        record = generation_record(gen, tokenizer)
        if printer.tones:
            for step in record["steps"]:
                step["tone"] = tone(step["R_mean"])
        record["prompt"] = text
        if show_r:  # the table above is per token; here is the text it makes
            typer.echo(text + record["text"])
        records.append(record)
        out.print(
            _summary_line(record, net.max_positions), style="dim", markup=False, soft_wrap=True
        )
    settings = dict(model=str(model), temp=temp, top_k=top_k, top_p=top_p, max_tokens=max_tokens)
    write_outputs({"settings": {**settings, "seed": seed}, "generations": records}, json_out)


def _parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not p.lstrip("-").isdigit())
        fail(f"--prompt-ids: {bad!r} is not a token id; give integers, e.g. --prompt-ids 1,2,3")
    return ids


def _encode(model, text: str, tokenizer) -> list[int]:
    """A text prompt's tokens; an empty one starts a document: from end-of-text where the
    model's vocabulary has it, else from token 0 (said on stderr)."""
    tokens = encode_text(text, tokenizer)
    vocab, eot = model.args.vocab_size, tokenizer.eot
    if not tokens:
        if eot < vocab:
            return [eot]
        typer.echo(
            f"note: starting from token 0 ({tokenizer.decode([0])!r}): the end-of-text token "
            f"{eot} is outside this model's vocabulary of {vocab}; choose the start "
            "with --prompt-ids",
            err=True,
        )
        return [0]
    outside = [t for t in tokens if t >= vocab]
    if outside:
        fail(
            f"prompt {text[:40]!r}: token id {outside[0]} is outside the model's vocabulary of "
            f"{vocab} (not trained with this tokenizer?); give token ids with --prompt-ids"
        )
    return tokens


def _has_tones(model) -> bool:
    """The Phase-Mamba paper's tones are read from its cores' R."""
    return model.args.model_type == "phase_mamba"


def tone(R: float | None) -> str | None:
    from mlx_kssm.models.phase_tones import tone_of

    return None if R is None else tone_of(R)


class _TokenPrinter:
    """Streams text as tokens arrive; with --show-r one line per token with R (per bank and
    mean; a Phase-Mamba's tone beside it) and U. A model without oscillators shows U only."""

    def __init__(self, show_r: bool, tokenizer, tones: bool = False):
        self.show_r, self.stream, self.index = show_r, tokenizer.stream(), 0
        self.tones = tones

    def __call__(self, row: int, token: int, R_layers: list[float], U: float) -> None:
        piece = self.stream.add(token)
        if not self.show_r:
            typer.echo(piece, nl=False)
            return
        if self.index == 0:
            typer.echo()
        line = f"{self.index:>5} {piece!r:<18}"
        if R_layers:
            mean = sum(R_layers) / len(R_layers)
            line += f" R=[{' '.join(f'{r:.3f}' for r in R_layers)}] mean={mean:.3f}"
        line += f" U={U:.3f}"
        if self.tones and R_layers:
            line += f" {tone(mean)}"
        typer.echo(line)
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
    if s["mean_R"] is None:  # no oscillators
        return f"[{s['n_tokens']} tokens; stopped: {reason}; mean U {s['mean_U']:.3f}]"
    return (
        f"[{s['n_tokens']} tokens; stopped: {reason}; mean R {s['mean_R']:.3f}, "
        f"mean U {s['mean_U']:.3f}, Goldilocks {s['goldilocks_fraction']:.0%}]"
    )
