"""The names and shapes of a PyTorch K-SSM v3 state dict (spec: "Checkpoint files").

The config is not stored in the checkpoint; it is read back from the shapes, then every name
and shape is checked against what that config implies, so that a checkpoint of another model
is refused with the names that do not fit, instead of failing somewhere inside MLX.
"""

from __future__ import annotations

import re

from ..config import ModelArgs
from .errors import CheckpointError
from .pickle_guard import clip

OUTPUT_HEAD = "output_head.weight"  # tied to embed.weight; the MLX model reuses embed.weight
_LAYER = re.compile(r"blocks\.(\d{1,9})\.")  # (a longer number is not a layer: int() of
# thousands of digits is slow, and Python refuses it)
_LISTED = 10  # names shown in an error before "and N more"

Shapes = dict[str, tuple[int, ...]]


def parameter_shapes(args: ModelArgs) -> Shapes:
    """Every parameter's name and shape in ``named_parameters()`` order.

    That order is also the index the torch optimizer state uses for each parameter, and the
    state_dict order without the tied ``output_head.weight`` (which comes last).
    """
    d, n, f = args.hidden_dim, args.n_oscillators, args.ffn_mult * args.hidden_dim
    shapes: Shapes = {
        "pos_embed": (1, args.max_positions, d),
        "embed.weight": (args.vocab_size, d),
    }
    for i in range(args.n_layers):
        block = f"blocks.{i}."
        shapes.update(
            {
                block + "oscillators.omega_0": (n,),
                block + "oscillators.delta_param": (1,),
                block + "oscillators.to_params.weight": (10, d),
                block + "oscillators.to_params.bias": (10,),
                block + "oscillators.readout.weight": (d, args.n_features),
                block + "oscillators.readout.bias": (d,),
                block + "norm1.weight": (d,),
                block + "norm1.bias": (d,),
                block + "norm2.weight": (d,),
                block + "norm2.bias": (d,),
                block + "ffn.0.weight": (f, d),
                block + "ffn.0.bias": (f,),
                block + "ffn.2.weight": (d, f),
                block + "ffn.2.bias": (d,),
            }
        )
    shapes["final_norm.weight"] = (d,)
    shapes["final_norm.bias"] = (d,)
    return shapes


def infer_config(shapes: Shapes, bistable: bool) -> ModelArgs:
    """The ModelArgs whose parameters have exactly these names and shapes.

    ``shapes`` is the state dict's (without the output head). Raises CheckpointError naming
    the parameters that do not map, are missing, or have the wrong shape.
    """
    n_layers = _count_layers(shapes)
    _check_names(shapes, list(parameter_shapes(ModelArgs(n_layers=max(n_layers, 1)))))
    pos, embed = shapes["pos_embed"], shapes["embed.weight"]
    omega = shapes["blocks.0.oscillators.omega_0"]
    readout = shapes["blocks.0.oscillators.readout.weight"]
    ffn = shapes["blocks.0.ffn.0.weight"]
    if [len(pos), len(embed), len(omega), len(readout), len(ffn)] != [3, 2, 1, 2, 2]:
        raise CheckpointError(
            f"shapes do not fit K-SSM v3: pos_embed {_shape(pos)}, embed.weight "
            f"{_shape(embed)}, omega_0 {_shape(omega)}, readout.weight {_shape(readout)}, "
            f"ffn.0.weight {_shape(ffn)}"
        )
    d = embed[1]
    if 0 in (d, embed[0], pos[1], omega[0], readout[1], ffn[0]) or readout[1] % 3 or ffn[0] % d:
        raise CheckpointError(
            f"shapes do not fit K-SSM v3: embed.weight {embed}, pos_embed {pos}, omega_0 "
            f"{omega}, readout.weight {readout} (3H columns), ffn.0.weight {ffn} (a multiple "
            f"of {d} rows)"
        )
    args = ModelArgs(
        vocab_size=embed[0],
        hidden_dim=d,
        n_layers=n_layers,
        n_oscillators=omega[0],
        n_harmonics=readout[1] // 3,
        max_positions=pos[1],
        ffn_mult=ffn[0] // d,
        bistable=bistable,
    )
    wrong = [
        f"{name} {shapes[name]} (expected {shape})"
        for name, shape in parameter_shapes(args).items()
        if shapes[name] != shape
    ]
    if wrong:
        raise CheckpointError(f"shape mismatch for {len(wrong)} parameter(s): {_listing(wrong)}")
    return args


def _count_layers(shapes: Shapes) -> int:
    """The number of blocks, when they are numbered 0..n-1 (a gap is an error, not a guess)."""
    layers = sorted({int(m.group(1)) for name in shapes if (m := _LAYER.match(name))})
    if layers != list(range(len(layers))):
        shown = _listing([str(i) for i in layers])
        raise CheckpointError(f"block numbers are not 0..n-1: found blocks {shown}")
    return len(layers)


def _check_names(shapes: Shapes, expected: list[str]) -> None:
    """Names that do not map (the sign of another model's checkpoint), then missing ones."""
    known = set(expected)
    unknown = [name for name in shapes if name not in known]
    missing = [name for name in expected if name not in shapes]
    if unknown:
        raise CheckpointError(
            f"not a K-SSM v3 checkpoint: {len(unknown)} name(s) do not map to this model: "
            f"{_listing(unknown)}"
            + (f"; {len(missing)} expected name(s) missing" if missing else "")
        )
    if missing:
        raise CheckpointError(f"incomplete K-SSM v3 state dict: missing {_listing(missing)}")


def _shape(shape: tuple[int, ...]) -> str:
    return clip(str(shape), 40)


def _listing(items: list[str]) -> str:
    """At most ``_LISTED`` items, each cut short: names come from the file."""
    shown = ", ".join(clip(item, 60) for item in items[:_LISTED])
    more = len(items) - _LISTED
    return shown + (f" and {more} more" if more > 0 else "")
