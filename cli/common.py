"""What the experiment commands share: options, loading a model (naming the models that exist
nearby when the path is wrong), prompts, and output paths checked before any work starts."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Annotated

import typer

from .errors import fail

ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m", help="Model folder, or a run folder (required).", show_default=False
    ),
]
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
MinTextOpt = Annotated[
    float,
    typer.Option(
        "--min-text-effect",
        help="Smallest change of a text metric that counts (U, distinct-n and repetition are "
        "fractions; length: this fraction of --max-tokens).",
    ),
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the full result here.")]

RUNS_DIR = Path("runs")
_SCAN_LIMIT = 5000  # folder entries looked at when listing the models nearby: bounded time
_LISTED = 6


def console():
    from rich.console import Console

    return Console(stderr=True)


# ---------------------------------------------------------------------------- models


def _is_model_or_run(path: Path) -> bool:
    from mlx_kssm.io import checkpoint_dirs, is_model_folder

    return is_model_folder(path) or bool(checkpoint_dirs(path)) or is_model_folder(path / "best")


def nearby_models(path: Path | None = None) -> list[str]:
    """Model and run folders beside ``path``, in ./runs (two levels) and in the working
    directory, as the user would type them."""
    roots = [(RUNS_DIR, 2), (Path("."), 1)]
    if path is not None and path.parent.is_dir():
        roots.insert(0, (path.parent, 1))
    found: dict[str, None] = {}
    budget = _SCAN_LIMIT

    def scan(folder: Path, depth: int) -> None:
        nonlocal budget
        try:  # a folder of a million entries costs no more than the budget left
            entries = sorted(itertools.islice(folder.iterdir(), max(budget, 0)))
        except OSError:
            return
        budget -= len(entries)
        for child in entries:
            if child.name.startswith(".") or not child.is_dir():
                continue
            if _is_model_or_run(child):
                found[os.path.normpath(child)] = None
            elif depth > 1:
                scan(child, depth - 1)

    for root, depth in roots:
        if root.is_dir():
            scan(root, depth)
    return list(found)


def models_hint(path: Path | None = None) -> str:
    names = nearby_models(path)
    if not names:
        return (
            "no model or run folder found nearby (./runs, .); train one with "
            "`kssm train --preset tiny --out runs/tiny`"
        )
    more = f" (and {len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return "found: " + ", ".join(names[:_LISTED]) + more


def check_model_path(path: Path | None, what: str = "--model") -> Path:
    """The given model path, if it holds a model (cheap: no weights read); else exit 2 with the
    models that exist nearby."""
    from mlx_kssm.io import ModelFolderError, resolve_model_folder

    if path is None:
        fail(f"give {what}: a model folder or a run folder; {models_hint()}")
    try:
        resolve_model_folder(path)
    except ModelFolderError as err:
        fail(f"{str(err).rstrip('.')}; {models_hint(path)}")
    return path


def load_model(path: Path):
    from mlx_kssm.io import ModelFolderError, load

    try:
        return load(path)
    except ModelFolderError as err:
        fail(str(err))


# ---------------------------------------------------------------------------- output paths


def default_report_path(model: Path, stem: str) -> Path:
    """Reports go beside the model: MODEL/STEM.md for a model or run folder. A run's
    checkpoint or best/ folder is replaced as training goes on, so a report about one goes to
    the run folder, named after it: RUN/STEM-step_00000300.md, RUN/STEM-best.md."""
    model = Path(model)
    if model.parent.name == "checkpoints" and model.name.startswith("step_"):
        return model.parent.parent / f"{stem}-{model.name}.md"
    if model.name == "best" and (model.parent / "checkpoints").is_dir():
        return model.parent / f"{stem}-best.md"
    return model / f"{stem}.md"


def check_output_path(path: Path, flag: str) -> None:
    """Exit 2 unless a file can be written at ``path``: not a folder, and its folder (or the
    nearest one that exists above it, where the rest will be made) is a writable folder."""
    if path.is_dir():
        fail(f"{flag} {path} is a folder; give a file name, e.g. {path / 'report.md'}")
    if path.is_symlink() and not path.exists():
        fail(
            f"{flag} {path} is a link to nothing ({os.readlink(path)}); remove it or choose another name"
        )
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        fail(f"{flag} {path}: {probe} is not a folder")
    if not _writable(probe):
        fail(f"{flag} {path}: the folder {probe} is not writable; choose another path with {flag}")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_outputs(**paths: Path | None) -> None:
    """Check every output path given (flag name -> path) and that no two are the same file."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        check_output_path(path, flag)
        key = path.resolve()
        if key in seen:
            fail(f"{seen[key]} and {flag} name the same file ({path}); give them different names")
        seen[key] = flag


def write_outputs(
    result: dict, json_out: Path | None, report: Path | None = None, markdown: str = ""
) -> None:
    from mlx_kssm.experiments.report import write_json, write_text_atomic

    out = console()
    try:
        if json_out is not None:
            out.print(f"wrote {write_json(json_out, result)}")
        if report is not None:
            out.print(f"wrote {write_text_atomic(report, markdown)}")
    except OSError as err:
        fail(f"cannot write the output: {err}")


# ---------------------------------------------------------------------------- prompts


def read_prompts(prompt: str | None, prompts_file: Path | None, default: list[str]) -> list[str]:
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


def model_tokenizer(model, path: Path):
    """The tokenizer the model at ``path`` was trained with (cl100k_base, or its own: a
    Phase-Mamba's base's, an mlx-lm folder's); exit 2 with what to do when there is none."""
    from mlx_kssm.io import resolve_model_folder
    from mlx_kssm.tokenizer import TokenizerUnavailable, tokenizer_for

    try:
        return tokenizer_for(model, resolve_model_folder(path))
    except TokenizerUnavailable as err:
        fail(str(err))


def same_tokenizer(tokenizers: dict[str, object]) -> object:
    """One tokenizer for several models (label -> tokenizer), or exit 2: token metrics of
    texts cut by different tokenizers are not comparable."""
    (first, tok), *others = tokenizers.items()
    for label, other in others:
        if other.identity() != tok.identity():
            fail(
                f"{first} and {label} use different tokenizers ({tok.name} and {other.name}); "
                "compare models that share one"
            )
    return tok


def encode_text(text: str, tokenizer=None) -> list[int]:
    from mlx_kssm.tokenizer import TokenizerUnavailable, resolve

    try:
        return resolve(tokenizer).encode(text)
    except TokenizerUnavailable as err:
        fail(str(err))


def check_prompt_tokens(model, tokens: list[int], label: str) -> None:
    from mlx_kssm.generate import check_prompt

    try:
        check_prompt(model, tokens)
    except ValueError as err:
        fail(f"{label}: {err}")


def encode_prompts(model, prompts: list[str], tokenizer=None) -> list[list[int]]:
    """Tokenise and check every prompt before any work starts (an empty prompt starts from
    the end-of-text token, as every training document did)."""
    from mlx_kssm.tokenizer import resolve

    tokenizer = resolve(tokenizer)
    encoded = [encode_text(p, tokenizer) or [tokenizer.eot] for p in prompts]
    for text, tokens in zip(prompts, encoded, strict=True):
        check_prompt_tokens(model, tokens, f"prompt {text[:40]!r}")
    return encoded


def check_sampling(temp: float, top_k: int, top_p: float) -> None:
    from mlx_kssm.generate import make_sampler

    try:
        make_sampler(temp, top_k, top_p)
    except ValueError as err:
        fail(str(err))


def stop_tokens(tokenizer=None) -> list[int]:
    from mlx_kssm.tokenizer import resolve

    return [resolve(tokenizer).eot]
