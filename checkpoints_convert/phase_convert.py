"""Convert an original Phase-Mamba checkpoint (the seed's ``step_{:06d}.pt``) into a
``phase_mamba`` model folder on a given base (issue 12; names and shapes:
phase_mamba_rules.py).

The file holds only the core: the base it was trained on is named with ``--base`` (an mlx-lm
Mamba folder; its hidden size must be the core's width). The result is the original
computation (faithful coupling, per-call dynamics, the checkpoint's ``phases`` buffer) hooked at
the base's middle layer unless ``hook_layers`` says otherwise (layer 32 of Mamba-2.8B's 64, as
the original). With the AdamW state the folder is also a training checkpoint, recording the
original recipe (spec: "Training"), so that ``kssm train --resume`` continues the run.
Writing is the K-SSM converter's (convert.py): checked first, written under a temporary name
and renamed, nothing replaced without --force.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models.base import ConfigError
from . import phase_mamba_rules as rules
from .errors import CheckpointError
from .training_state import NotContinuable, convert_training_state

# What the seed's train_phase_mamba.py ran (spec: "Training"): AdamW at a constant lr,
# batch 1, at most 256 tokens, 500 steps. The optimizer's own lr, betas, eps and weight decay
# are read from the checkpoint.
ORIGINAL_RECIPE = dict(
    steps=500, batch_size=1, grad_accum=1, seq_length=256, warmup=0, schedule="constant"
)
HOW_TO_GET_A_BASE = (
    "the mlx-lm Mamba its core was trained on (state-spaces/mamba-2.8b-hf converted with "
    "mlx_lm.convert, see README)"
)


def convert_phase_mamba(
    root: dict[str, Any],
    source: Path,
    out_dir: Path,
    base: str | Path | None,
    *,
    dtype: str | None = None,
    force: bool = False,
    hook_layers: list[int] | None = None,
    notes: list[str] | None = None,
):
    """Convert the Phase-Mamba checkpoint ``root`` (read from ``source``) into ``out_dir``.
    Raises CheckpointError with a one-line message; nothing is written then."""
    from .convert import ConvertReport, _write, check_byte_order

    notes = list(notes or [])
    if base is None:
        raise CheckpointError(
            f"{source} is a Phase-Mamba checkpoint: pass --base FOLDER, {HOW_TO_GET_A_BASE}"
        )
    refs = rules.core_state(root, source)
    weights, n, d = rules.core_weights(root, source)
    notes += check_byte_order(refs, weights, source)
    fields = {} if hook_layers is None else {"hook_layers": list(hook_layers)}
    args = rules.phase_mamba_args(n, d, base, **fields)
    unknown = rules.unknown_keys(root)
    if unknown:
        notes.append(f"ignored unknown top-level key(s): {', '.join(unknown[:10])}")

    training = None
    if "optimizer_state" in root:
        if dtype is not None:
            notes.append(
                f"weights saved as {dtype}: the training state is left out, because a run "
                "resumed from rounded weights would not continue the original run"
            )
        else:
            training = _training_state(root, n, d, source, notes)
    try:
        _write(out_dir, args, weights, training, dtype, force)
    except ConfigError as err:  # e.g. hook_layers outside the base's layers
        raise CheckpointError(f"{err}") from None

    step = root.get("step")
    step = step if type(step) is int and 0 <= step < 2**63 else None
    trained = [name for name in weights if not name.endswith(".phases")]  # the buffer is state
    return ConvertReport(
        source=source,
        out_dir=out_dir,
        args=args,
        n_params=sum(weights[name].size for name in trained),
        source_dtypes=sorted({r.dtype for r in refs.values()}),
        locations=sorted({r.storage.location for r in refs.values()}),
        saved_dtype=dtype or "float32",
        step=training.trainer["step"] if training else step,
        training_state=training is not None,
        training_state_left_out="optimizer_state" in root and training is None,
        torch_lr_next=training.trainer["source"]["torch_lr_next"] if training else None,
        notes=notes,
    )


def _training_state(root: dict[str, Any], n: int, d: int, source: Path, notes: list[str]):
    """The AdamW state and trainer_state.json, with the original recipe recorded; None (and a
    note) when MLX AdamW cannot continue it."""
    history = root.get("metrics_history", [])
    try:  # the history is the per-step metrics the original logged
        training = convert_training_state(
            {**root, "history": history}, rules.optimizer_shapes(n, d), source
        )
    except NotContinuable as why:
        notes.append(f"training state left out: {why}; the weights are converted")
        return None
    notes += training.notes
    train_args = training.trainer["train_args"]
    train_args.update(ORIGINAL_RECIPE)
    training.trainer["source"]["metrics"] = _jsonable_metrics(root.get("metrics"))
    notes.append(
        f"resuming follows the original recipe (AdamW lr {train_args['lr']:g} constant, batch 1, "
        "256 tokens, 500 steps); kssm train flags change any of it"
    )
    return training


def _jsonable_metrics(metrics: Any) -> Any:
    from .training_state import jsonable

    return jsonable(metrics, "metrics")
