"""Convert a PyTorch K-SSM v3 checkpoint into this package's model folder (issue 3).

The output is ``config.json`` + ``model.safetensors`` (``mlx_kssm.load`` reads it) and, when
the source holds an AdamW training state, ``optimizer.safetensors`` + ``trainer_state.json``
in the project's training-checkpoint format (mlx_kssm/run_folder.py), so that
``kssm train --resume`` continues the PyTorch run. Everything is read and checked before
anything is written; the folder is written under a temporary name beside OUT_DIR and renamed
at the end (mlx_kssm/atomic.py): a folder that appears at OUT_DIR meanwhile is never replaced,
and the temporaries of a killed conversion are removed by the next one.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..atomic import PublishError, TargetExistsError, discard, publish_folder, temporary_folder
from ..config import ModelArgs
from ..io import CONFIG_NAME, WEIGHTS_NAME, write_model_files
from ..models import build_model
from ..run_folder import OPTIMIZER_NAME, TRAINER_STATE_NAME
from .phase_mamba_rules import is_phase_mamba_checkpoint
from .pickle_guard import clip, describe
from .torch_zip import CheckpointError, TensorRef, read_checkpoint
from .training_state import NotContinuable, TrainingState, convert_training_state
from .v3_rules import OUTPUT_HEAD, infer_config, parameter_shapes

SAVE_DTYPES = ("float16", "bfloat16")
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
# Top-level keys of the seed's files: checkpoint_<step>.pt, best_model.pt, final_model.pt.
KNOWN_KEYS = {
    "step",
    "model_state",
    "optimizer_state",
    "scheduler_state",
    "history",
    "best_val_loss",
    "val_loss",
    "final_stats",
}
# What a conversion writes; --force only ever replaces a folder holding nothing else.
OUTPUT_FILES = {CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, TRAINER_STATE_NAME}
# checkpoint_<step>.pt: K-SSM v3's; step_<step>.pt: Phase-Mamba's (train_phase_mamba.py).
_CHECKPOINT_FILE = re.compile(r"(?:checkpoint|step)_(\d+)\.pt")
_PLAUSIBLE_WEIGHT = 1e4  # no trained K-SSM weight is this large; byte-swapped ones often are


@dataclass
class ConvertReport:
    """What was converted, for the CLI to print and the tests to check."""

    source: Path  # the .pt file read (the newest checkpoint when given a run folder)
    out_dir: Path
    args: ModelArgs
    n_params: int  # without the duplicated tied head
    source_dtypes: list[str]
    locations: list[str]  # devices the storages were saved from
    saved_dtype: str
    step: int | None
    training_state: bool  # optimizer.safetensors + trainer_state.json written
    training_state_left_out: bool = False  # the source had one; the notes say why it is not
    torch_lr_next: float | None = None
    notes: list[str] = field(default_factory=list)


def convert(
    src: str | Path,
    out_dir: str | Path,
    monostable: bool = False,
    dtype: str | None = None,
    force: bool = False,
    base: str | Path | None = None,
    hook_layers: list[int] | None = None,
) -> ConvertReport:
    """Convert ``src`` (a .pt file or a run folder) into the model folder ``out_dir``. An
    original Phase-Mamba checkpoint (phase_convert.py) needs ``base``, the mlx-lm Mamba its
    core was trained on, and may name the ``hook_layers``.

    Raises CheckpointError with a one-line message for any bad input; nothing is written then.
    """
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise CheckpointError(
            f"--dtype must be one of {', '.join(SAVE_DTYPES)}, not {describe(dtype)}"
        )
    source, notes = resolve_source(Path(src))
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)

    root = read_checkpoint(source)
    if is_phase_mamba_checkpoint(root):
        from .phase_convert import convert_phase_mamba

        if monostable:
            raise CheckpointError(
                f"{source} is a Phase-Mamba checkpoint; --monostable is for K-SSM v3"
            )
        return convert_phase_mamba(
            root,
            source,
            out_dir,
            base,
            dtype=dtype,
            force=force,
            hook_layers=hook_layers,
            notes=notes,
        )
    if base is not None or hook_layers is not None:
        raise CheckpointError(
            f"{source} is not a Phase-Mamba checkpoint (no phase_core_state): --base and "
            "--hook-layers are for those; leave them out"
        )
    model_state, layout_notes = split_layout(root, source)
    notes += layout_notes
    refs = model_weights(model_state, source)
    try:
        args = infer_config({k: v.shape for k, v in refs.items()}, bistable=not monostable)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    weights = {name: refs[name].numpy().astype(np.float32, copy=False) for name in refs}
    notes += check_byte_order(refs, weights, source)

    training = None
    if "optimizer_state" in root:
        if dtype is not None:
            notes.append(
                f"weights saved as {dtype}: the training state is left out, because a run "
                "resumed from rounded weights would not continue the PyTorch run"
            )
        else:
            try:
                training = convert_training_state(root, parameter_shapes(args), source)
                notes += training.notes
            except NotContinuable as why:
                notes.append(f"training state left out: {why}; the weights are converted")
    _write(out_dir, args, weights, training, dtype, force)

    lr_next = training.trainer["source"]["torch_lr_next"] if training else None
    step = root.get("step")
    step = step if type(step) is int and 0 <= step < 2**63 else None
    return ConvertReport(
        source=source,
        out_dir=out_dir,
        args=args,
        n_params=sum(w.size for w in weights.values()),
        source_dtypes=sorted({r.dtype for r in refs.values()}),
        locations=sorted({r.storage.location for r in refs.values()}),
        saved_dtype=dtype or "float32",
        step=training.trainer["step"] if training else step,
        training_state=training is not None,
        training_state_left_out="optimizer_state" in root and training is None,
        torch_lr_next=lr_next,
        notes=notes,
    )


# -- finding the input and checking the output ------------------------------------------------


def resolve_source(src: Path) -> tuple[Path, list[str]]:
    """A .pt file, or a run folder's newest ``checkpoint_<step>.pt`` or ``step_<step>.pt``
    (said in the notes).

    A run folder without numbered checkpoints falls back to final_model.pt, then best_model.pt.
    """
    if not src.is_dir():
        return src, []  # a missing or unreadable file is reported by the reader
    found = [p for folder in (src, src / "checkpoints") for p in _numbered_checkpoints(folder)]
    if found:
        _, newest = max(found)
        return newest, [f"{src} is a run folder: converting its newest checkpoint {newest.name}"]
    for name in ("final_model.pt", "best_model.pt"):
        if (src / name).is_file():
            return src / name, [f"{src} is a run folder without checkpoint_<step>.pt: using {name}"]
    raise CheckpointError(
        f"{src} is a folder without checkpoint_<step>.pt, step_<step>.pt, final_model.pt or "
        "best_model.pt"
    )


def _numbered_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    matches = ((_CHECKPOINT_FILE.fullmatch(p.name), p) for p in folder.iterdir())
    return [(int(m.group(1)), p) for m, p in matches if m and p.is_file()]


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty OUT_DIR unless --force, and even then one holding unrelated files.

    Checked again when the new folder is put in place (a folder can appear meanwhile).
    """
    if out_dir.is_symlink() and not out_dir.exists():
        raise CheckpointError(f"{out_dir} is a symbolic link to a folder that does not exist")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise CheckpointError(f"{out_dir} is not empty; pass --force to replace it")
    _only_a_previous_conversion(out_dir)


def _only_a_previous_conversion(folder: Path) -> None:
    """--force deletes the old folder: only ever do that to a previous conversion."""
    strangers = sorted(p.name for p in folder.iterdir() if p.name not in OUTPUT_FILES)
    if strangers:
        shown = ", ".join(clip(name, 40) for name in strangers[:5])
        raise CheckpointError(
            f"{folder} holds files a conversion does not write ({shown}); "
            "refusing to replace it even with --force: choose another folder"
        )


# -- the model weights ------------------------------------------------------------------------


def split_layout(root: Any, source: Path) -> tuple[dict[str, Any], list[str]]:
    """The state dict inside any of the seed's layouts, and notes on keys that were not used.

    Layouts: checkpoint_<step>.pt and best_model.pt and final_model.pt (a dict with
    ``model_state``), or a bare state dict (name -> tensor).
    """
    if not isinstance(root, dict):
        raise CheckpointError(f"{source} holds a {type(root).__name__}, not a checkpoint dict")
    if "model_state" in root:
        model_state = root["model_state"]
        if not isinstance(model_state, dict):
            raise CheckpointError(f"{source}: model_state is not a dict")
        unknown = [_name(k) for k in root if k not in KNOWN_KEYS]
        shown = ", ".join(sorted(unknown[:10])) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        notes = [f"ignored unknown top-level key(s): {shown}"] if unknown else []
        return model_state, notes
    if root and all(isinstance(v, TensorRef) for v in root.values()):
        return root, []
    keys = ", ".join(_name(k) for k in itertools.islice(root, 10))
    raise CheckpointError(
        f"{source}: neither a K-SSM checkpoint (no model_state) nor a state dict of tensors "
        f"(top-level keys: {keys or 'none'})"
    )


def _name(key: Any) -> str:
    """A dict key for a message: a name as it is (clipped), anything else described."""
    return clip(key, 60) if isinstance(key, str) else describe(key, 60)


def model_weights(model_state: dict[str, Any], source: Path) -> dict[str, TensorRef]:
    """The state dict's tensors, without the tied output head (checked to be tied first)."""
    not_tensors = [
        _name(k)
        for k, v in model_state.items()
        if not (isinstance(k, str) and isinstance(v, TensorRef))
    ]
    if not_tensors:
        raise CheckpointError(
            f"{source}: model_state entries that are not name -> tensor: {not_tensors[:5]}"
        )
    refs = {k: v for k, v in model_state.items() if k != OUTPUT_HEAD}
    unsupported = [(k, v.dtype) for k, v in refs.items() if v.dtype not in FLOAT_DTYPES]
    if unsupported:
        name, dtype = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise CheckpointError(
            f"{source}: unsupported dtype {dtype} for tensor {_name(name)}{more}; K-SSM "
            "weights are float16, bfloat16, float32 or float64"
        )
    stored = {ref.storage.key: ref.storage.numel for ref in refs.values()}
    total = sum(ref.size for ref in refs.values())
    if total > sum(stored.values()):
        # Each parameter of a state dict has its own storage; views of one storage repeated
        # over many parameters would make the model (and the memory it takes) far larger
        # than the file.
        raise CheckpointError(
            f"{source}: the weights hold {total:,} values but the file stores "
            f"{sum(stored.values()):,}: tensors view the same data over and over; refusing "
            "to build a model larger than its file"
        )
    head, embed = model_state.get(OUTPUT_HEAD), refs.get("embed.weight")
    if head is not None and embed is not None and not _tied(head, embed):
        raise CheckpointError(
            f"{source}: {OUTPUT_HEAD} differs from embed.weight; this model ties them, so "
            "the head cannot be dropped"
        )
    return refs


def _tied(head: TensorRef, embed: TensorRef) -> bool:
    """The same storage (torch saves a tied weight once), or at least the same values."""
    if head.same_data(embed):
        return True
    return head.shape == embed.shape and np.array_equal(head.numpy(), embed.numpy())


def check_byte_order(refs: dict[str, TensorRef], weights: dict, source: Path) -> list[str]:
    """A note when the checkpoint was saved big-endian (its values were byte-swapped).

    The byteorder record is one word in the archive: if the weights read its way look
    broken (not finite, or huge) while read the other way they look like weights, the record
    is wrong, and converting would silently produce garbage: refused.
    """
    archive = next(iter(refs.values())).archive
    if archive.byteorder != "big":
        return []
    if not _plausible(weights.values()):
        as_little = (ref.numpy(byteorder="little") for ref in refs.values())
        if _plausible(w.astype(np.float32, copy=False) for w in as_little):
            raise CheckpointError(
                f"{source}: its byteorder record says big-endian, but the weights only make "
                "sense read as little-endian: the record looks wrong; re-save the checkpoint "
                "with torch"
            )
    return ["the checkpoint was saved big-endian: its values were byte-swapped to little-endian"]


def _plausible(arrays) -> bool:
    """Weights a trained model could hold: all finite, none enormous."""
    for array in arrays:
        if array.size and not (
            np.isfinite(array).all() and np.abs(array).max() < _PLAUSIBLE_WEIGHT
        ):
            return False
    return True


# -- writing ----------------------------------------------------------------------------------


def _write(
    out_dir: Path,
    args: ModelArgs,
    weights: dict[str, np.ndarray],
    training: TrainingState | None,
    dtype: str | None,
    force: bool,
) -> None:
    """Build the MLX model from the weights; write it with the training state into a temporary
    folder beside OUT_DIR, then rename that into place (see mlx_kssm/atomic.py)."""
    model = build_model(args)
    # Each array is copied into MLX once; the numpy side is mostly a view of the mapped file.
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.eval()
    tmp = None
    try:
        tmp = temporary_folder(out_dir)
        write_model_files(model, tmp, dtype=getattr(mx, dtype) if dtype else None)
        if training is not None:
            optimizer = {k: mx.array(v) for k, v in training.optimizer.items()}
            mx.save_safetensors(str(tmp / OPTIMIZER_NAME), optimizer)
            state = json.dumps(training.trainer, indent=2, sort_keys=True)
            (tmp / TRAINER_STATE_NAME).write_text(state)
        publish_folder(tmp, out_dir, replace=force, check_old=_only_a_previous_conversion)
    except TargetExistsError:
        raise CheckpointError(
            f"{out_dir} was created or filled by something else during the conversion; it was "
            "left untouched and nothing was written: choose another folder"
        ) from None
    except (OSError, RuntimeError) as err:  # MLX reports a failed write (disk full) as a
        # RuntimeError
        reason = err if isinstance(err, PublishError) else getattr(err, "strerror", None) or err
        raise CheckpointError(f"cannot write {out_dir}: {clip(str(reason), 200)}") from None
    finally:
        if tmp is not None:
            discard(tmp)
