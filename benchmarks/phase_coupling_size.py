"""How far a Phase-Mamba's cores move their hooked layers' outputs, measured where they act
(phase_experiment.py runs this per leg; it reads no gradients and trains nothing).

On one window of text, per core: the coupling's change of its layer's output, rms(out - x) /
rms(x), with free phases; and what forcing can do there, rms(out at R = 0.9 - out at R = 0.1)
/ rms(x). Every pass starts from the same saved phases. Set beside the teacher-forced KL of
`kssm intervene`, this tells a modulation that is small where it is applied from one that is
washed out further on (the normalisation reading of the published null).

    python benchmarks/phase_coupling_size.py RUN_OR_MODEL TEXT_FILE --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WINDOW = 256


def rms(a) -> float:
    import mlx.core as mx

    return float(mx.sqrt(mx.mean(mx.square(a.astype(mx.float32)))))


def measure(model, tokens) -> list[dict]:
    """Per core: its layer, and the two relative sizes of the module docstring."""
    from mlx_kssm.experiments.interventions import core_phases, restore_phases
    from mlx_kssm.models.phase_mamba import CoupledLayer

    seen: dict[int, tuple] = {}
    hooked = [layer for layer in model.layers if isinstance(layer, CoupledLayer)]
    for layer in hooked:

        def record(bank, x, couple=layer._couple):
            out = couple(bank, x)
            seen[bank] = (x, out)
            return out

        layer._couple = record
    start = core_phases(model)
    runs = {}
    for name, target in (("free", None), ("low", 0.1), ("high", 0.9)):
        restore_phases(model, start)
        force = None if target is None else dict.fromkeys(range(model.n_banks), target)
        model.forward(tokens, force_r=force)
        runs[name] = dict(seen)
    restore_phases(model, start)
    result = []
    for bank, layer in enumerate(model.args.hook_layers):
        x, out = runs["free"][bank]
        size = rms(x)
        result.append(
            {
                "layer": layer,
                "rms_x": size,
                "coupling": rms(out - x) / size,
                "forcing": rms(runs["high"][bank][1] - runs["low"][bank][1]) / size,
            }
        )
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="phase_mamba model or run folder")
    p.add_argument("text", type=Path, help="text file; its first 256 tokens are used")
    p.add_argument("--json", type=Path, required=True, help="output file")
    a = p.parse_args(argv)
    import mlx.core as mx

    from mlx_kssm.cli.common import load_model, model_tokenizer

    model = load_model(a.model)
    if model.args.model_type != "phase_mamba":
        print(f"error: {a.model} is a {model.args.model_type}, not a phase_mamba", file=sys.stderr)
        sys.exit(2)
    model.eval()
    ids = model_tokenizer(model, a.model).encode(a.text.read_text(encoding="utf-8"))[:WINDOW]
    if len(ids) < 2:
        print(f"error: {a.text} has fewer than 2 tokens", file=sys.stderr)
        sys.exit(2)
    cores = measure(model, mx.array([ids]))
    tmp = a.json.with_name(a.json.name + ".tmp")
    tmp.write_text(
        json.dumps({"model": str(a.model), "tokens": len(ids), "cores": cores}, indent=1)
    )
    tmp.replace(a.json)
    for c in cores:
        print(
            f"layer {c['layer']}: coupling {c['coupling']:.3g}, forcing {c['forcing']:.3g} of rms(x) {c['rms_x']:.3g}"
        )


if __name__ == "__main__":
    main()
