"""mlx-lm's Mamba as a plain base architecture (issue 12): the same numbers as mlx-lm's own
module, a saved folder mlx-lm loads (and one mlx-lm wrote loads here), the tokenizer it was
trained with recorded, and a Phase-Mamba built on it. (The model contract itself is checked by
tests/test_contract.py like every other architecture's.)"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import mamba
from phase_helpers import make_hf_tokenizer, write_base
from typer.testing import CliRunner

import mlx_kssm
from mlx_kssm.cli.app import app
from mlx_kssm.config import model_args_for
from mlx_kssm.models import model_type_for
from mlx_kssm.models.phase_mamba import args_for_base
from mlx_kssm.tokenizer import HFTokenizer, cl100k, tokenizer_for

VOCAB = 97
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, state_size=8)
runner = CliRunner()


def ours(seed=0, **fields):
    mx.random.seed(seed)
    config = {"model_type": "mamba", "vocab_size": VOCAB, "time_step_rank": 2, **TINY, **fields}
    model = mlx_kssm.build_model(config)
    model.eval()
    return model


def mlx_lms(model) -> mamba.Model:
    """mlx-lm's own Mamba with our model's weights."""
    fields = {k: v for k, v in model.args.to_dict().items() if k != "tokenizer"}
    ref = mamba.Model(mamba.ModelArgs(**fields))
    ref.load_weights(list(tree_flatten(model.parameters())))
    return ref


def tokens(L=23, seed=1):
    return mx.random.randint(0, VOCAB, (2, L), key=mx.random.key(seed))


def test_the_chunked_scan_computes_mlx_lms_numbers_whole_and_incrementally():
    model = ours()
    ref = mlx_lms(model)
    x = tokens()
    np.testing.assert_allclose(np.array(model(x)), np.array(ref(x)), atol=1e-5)
    ours_cache, ref_cache = model.make_cache(), ref.make_cache()
    for piece in (x[:, :9], x[:, 9:10], x[:, 10:]):  # a prefill, one token, the rest
        got, want = model(piece, cache=ours_cache), ref(piece, cache=ref_cache)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    logits, stats = model.forward(x)
    assert stats["R"].shape == (2, 23, 0) and model.n_banks == 0
    with pytest.raises(ValueError, match="no oscillators"):
        model.forward(x, force_r={0: 0.5})


def test_a_saved_folder_is_one_mlx_lm_loads(tmp_path):
    from mlx_lm.utils import load_model

    args = model_args_for("tiny", "mamba", vocab_size=VOCAB)
    assert args.tokenizer == "cl100k_base"  # a fresh model records what it is trained with
    mx.random.seed(0)
    model = mlx_kssm.build_model(args)
    model.eval()
    folder = mlx_kssm.save(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["tokenizer"] == "cl100k_base"
    loaded, _ = load_model(folder)  # mlx-lm's loader: its own ModelArgs, our extra key ignored
    assert type(loaded) is mamba.Model
    x = tokens()
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), atol=1e-5)
    assert tokenizer_for(mlx_kssm.load(folder), folder) is cl100k()


def test_a_folder_mlx_lm_wrote_loads_here_with_its_tokenizer(tmp_path):
    ref = mlx_lms(ours(seed=3))
    tok = make_hf_tokenizer(tmp_path / "tok", VOCAB)
    folder = write_base(tmp_path / "lm", ref, tokenizer_files=tok, time_step_rank="auto")
    model = mlx_kssm.load(folder)
    assert model.args.time_step_rank == 2 and model.args.tokenizer is None
    x = tokens()
    np.testing.assert_allclose(np.array(model(x)), np.array(ref(x)), atol=1e-5)
    assert isinstance(tokenizer_for(model, folder), HFTokenizer)


def test_a_phase_mamba_takes_a_mamba_trained_here_as_its_base(tmp_path):
    base = mlx_kssm.save(ours(tokenizer="cl100k_base"), tmp_path / "base")
    args = args_for_base(base, coupling="additive", hook_layers=[-1])
    assert args.vocab_size == VOCAB and args.base_fingerprint.startswith("sha256:")
    model = mlx_kssm.build_model(args)
    model.eval()
    assert model.args.hook_layers == [2]
    plain = mlx_kssm.load(base)
    x = tokens()
    assert np.abs(np.array(model(x)) - np.array(plain(x))).max() > 1e-5  # the core acts
    assert tokenizer_for(args) is cl100k()  # the base's recorded tokenizer


def test_the_cli_knows_the_architecture(tmp_path):
    assert model_type_for("mamba_lm") == model_type_for("mamba") == "mamba"
    res = runner.invoke(app, ["train", "--arch", "mamba_lm", "--preset", "tiny", "--print-config"])
    assert res.exit_code == 0, res.output
    model = json.loads(res.stdout)["model"]
    assert (model["model_type"], model["num_hidden_layers"], model["tokenizer"]) == (
        "mamba",
        4,
        "cl100k_base",
    )
    folder = mlx_kssm.save(ours(), tmp_path / "m")
    res = runner.invoke(app, ["intervene", "--model", str(folder)])
    assert res.exit_code == 2 and "no oscillators" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
