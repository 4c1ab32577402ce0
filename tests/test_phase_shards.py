"""A base whose weights mlx-lm wrote in shards (model-0000k-of-0000n.safetensors with
model.safetensors.index.json, as mlx_lm.convert writes a big model): a Phase-Mamba loads it,
fingerprints it (a changed shard is noticed) and saves and reloads its cores on it (issue 12)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from phase_helpers import write_base

import mlx_kssm
from mlx_kssm.models.base import ConfigError
from mlx_kssm.models.phase_base import base_fingerprint, load_base, random_base
from mlx_kssm.models.phase_mamba import args_for_base

VOCAB, HIDDEN, LAYERS = 61, 32, 3


def write_sharded(folder, base, n_shards: int = 2):
    """The base's weights split over n_shards files plus the index, as mlx-lm saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    write_base(folder, base)  # config.json (and a single file, removed below)
    (folder / "model.safetensors").unlink()
    weights = dict(tree_flatten(base.parameters()))
    names = sorted(weights)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::n_shards]}
        mx.save_safetensors(str(folder / shard), part, metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(part, shard)
    total = sum(v.nbytes for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    base = random_base(VOCAB, HIDDEN, LAYERS, seed=3)
    return write_base(root / "single", base), write_sharded(root / "sharded", base)


def tokens():
    return mx.random.randint(0, VOCAB, (2, 9), key=mx.random.key(4))


def test_a_sharded_base_loads_as_the_single_file_one(bases):
    single, sharded = bases
    assert len(list(sharded.glob("model-*-of-00002.safetensors"))) == 2
    x = tokens()
    np.testing.assert_array_equal(np.array(load_base(sharded)(x)), np.array(load_base(single)(x)))


def test_the_fingerprint_covers_every_shard(bases, tmp_path):
    _, sharded = bases
    found = base_fingerprint(sharded)
    assert found.startswith("sha256:") and found == base_fingerprint(sharded)
    changed = write_sharded(tmp_path / "changed", random_base(VOCAB, HIDDEN, LAYERS, seed=3))
    assert base_fingerprint(changed) == found  # the same weights, the same fingerprint
    second = changed / "model-00002-of-00002.safetensors"
    part = mx.load(str(second))
    name = sorted(part)[0]
    part[name] = part[name] + 1.0  # retrained, same shapes
    mx.save_safetensors(str(second), part, metadata={"format": "mlx"})
    assert base_fingerprint(changed) != found


def test_a_phase_mamba_on_a_sharded_base_saves_and_reloads(bases, tmp_path):
    single, sharded = bases

    def built(base):
        mx.random.seed(0)
        return mlx_kssm.build_model(args_for_base(base, coupling="multiplicative", hook_layers=[1]))

    model = built(sharded)
    assert model.args.base_fingerprint == base_fingerprint(sharded)
    folder = mlx_kssm.save(model, tmp_path / "pm")  # before any call moves the phases
    assert json.loads((folder / "config.json").read_text())["base_path"] == str(sharded)
    again, reference = mlx_kssm.load(folder), built(single)
    x = tokens()
    logits = [np.array(m.eval()(x)) for m in (model, again, reference)]
    np.testing.assert_array_equal(logits[1], logits[0])  # reloaded on the sharded base
    np.testing.assert_array_equal(logits[2], logits[0])  # the same base either way


def test_a_missing_shard_is_a_one_line_error(bases, tmp_path):
    _, sharded = bases
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in sharded.iterdir():
        if "00002-of" not in path.name:
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ConfigError) as err:
        load_base(broken)
    assert "\n" not in str(err.value) and "cannot load the base" in str(err.value)
