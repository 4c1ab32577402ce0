"""The model contract (mlx_kssm/models/base.py), checked for every registered architecture.

A new architecture is tested the day it is registered: it needs only a tiny config in TINY.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_kssm import build_model, load, save
from mlx_kssm.config import train_args_for
from mlx_kssm.data import write_token_folder
from mlx_kssm.models import MODEL_TYPES, get_classes
from mlx_kssm.models.base import ConfigError
from mlx_kssm.run_folder import checkpoint_dirs
from mlx_kssm.steps import MLXSteps
from mlx_kssm.training import run_training

VOCAB = 97
TINY = {
    "kssm_v3": dict(hidden_dim=32, n_layers=2, n_oscillators=16, n_harmonics=4, max_positions=64),
    "phase_mamba": dict(random_base_hidden=32, coupling="additive", dynamics="per_token"),
    "kssm_ssm": dict(
        hidden_dim=32, n_layers=2, n_oscillators=16, n_harmonics=4, state_size=8, chunk_size=4
    ),
    "mamba": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, state_size=8, time_step_rank=2
    ),
}
ARCHS = sorted(MODEL_TYPES)


def tiny(model_type: str, **overrides):
    mx.random.seed(0)
    config = {"model_type": model_type, "vocab_size": VOCAB, **TINY[model_type], **overrides}
    return build_model(config)


def tokens(B=2, L=12, seed=1):
    return mx.random.randint(0, VOCAB, (B, L), key=mx.random.key(seed))


def test_every_registered_architecture_has_a_tiny_config():
    assert set(TINY) == set(MODEL_TYPES)


def test_unknown_model_type_names_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*kssm_v3"):
        get_classes("mamba9")


@pytest.mark.parametrize("arch", ARCHS)
def test_call_forward_and_stats(arch):
    model = tiny(arch)
    model.eval()
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, 12, VOCAB)
    again, stats = model.forward(x)
    np.testing.assert_array_equal(np.array(again), np.array(logits))
    assert isinstance(stats, dict) and all(isinstance(v, mx.array) for v in stats.values())
    aux = model.aux_loss(stats)
    assert aux.shape == () and np.isfinite(float(aux))
    for name, value in model.metrics(stats).items():
        assert value.ndim in (0, 1), name
    if model.n_banks:
        assert stats["R"].shape == (2, 12, model.n_banks)
        _, R_mean, R = model(x, return_R=True)
        np.testing.assert_allclose(np.array(R_mean), np.array(R).mean(-1), atol=1e-6)
        assert ((np.array(R) >= 0) & (np.array(R) <= 1 + 1e-6)).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_decoding_through_the_cache_equals_the_full_forward(arch):
    model = tiny(arch)
    model.eval()
    x = tokens(L=11)
    full = np.array(model(x))
    cache = model.make_cache()
    pieces = [model(x[:, :5], cache=cache)]  # a prefill, then one token at a time
    for t in range(5, 11):
        pieces.append(model(x[:, t : t + 1], cache=cache))
    step_by_step = np.concatenate([np.array(p) for p in pieces], axis=1)
    np.testing.assert_allclose(step_by_step, full, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_generate_step_runs_on_the_model(arch):
    from mlx_lm.generate import generate_step

    model = tiny(arch)
    model.eval()
    prompt = mx.array([3, 1, 4, 1, 5])
    drawn = [int(tok) for tok, _ in generate_step(prompt, model, max_tokens=6)]
    assert len(drawn) == 6 and all(0 <= t < VOCAB for t in drawn)
    # Greedy mlx-lm decoding equals the argmax of our own full forward, token by token.
    seq = [3, 1, 4, 1, 5]
    for t in drawn:
        assert t == int(mx.argmax(model(mx.array([seq]))[0, -1]))
        seq.append(t)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip_and_sanitize_idempotent(arch, tmp_path):
    model = tiny(arch)
    model.eval()
    x = tokens()
    folder = save(model, tmp_path / "m")
    loaded = load(folder)
    assert type(loaded) is type(model) and loaded.args == model.args
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), atol=1e-5)
    weights = dict(tree_flatten(model.parameters()))
    once = model.sanitize(weights)
    twice = model.sanitize(once)
    assert once.keys() == twice.keys()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_forward_is_finite(arch, dtype):
    model = tiny(arch)
    model.eval()
    model.set_dtype(dtype)
    logits = model(tokens())
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_on_one_batch_lower_its_loss(arch):
    model = tiny(arch)
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    steps = MLXSteps(model, optimizer, aux_weight=model.default_aux_weight, grad_clip=1.0)
    batch = tokens(B=4, L=17, seed=3)
    losses = []
    for i in range(8):
        loss, _, grads = steps.micro_step(batch, mx.random.key(i))
        steps.apply_update(grads)
        mx.eval(model.state, optimizer.state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    streams = {"train": rng.integers(0, VOCAB, 3000), "valid": rng.integers(0, VOCAB, 400)}
    return write_token_folder(tmp_path_factory.mktemp("data") / "tokens", streams)


@pytest.mark.parametrize("arch", ARCHS)
def test_k_steps_then_resume_to_n_equals_n_straight(arch, token_folder, tmp_path):
    def run(out, steps, resume=None):
        settings = dict(batch_size=2, seq_length=16, grad_accum=2, warmup=2, eval_every=3)
        settings |= dict(eval_batches=1, save_every=3, sample_tokens=2, log_every=1)
        train = train_args_for(
            "tiny", steps=steps, decay_steps=6, data=str(token_folder), out=str(out), **settings
        )
        config = {"model_type": arch, "vocab_size": VOCAB, **TINY[arch]}
        model_args = get_classes(arch)[1].from_config(config)
        return run_training(train, model_args, resume=resume)

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "legs", 3)
    legs = run(tmp_path / "legs", 6, resume=True)
    a = mx.load(str(checkpoint_dirs(straight)[-1] / "model.safetensors"))
    b = mx.load(str(checkpoint_dirs(legs)[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.array(a[name]), np.array(b[name]), err_msg=name)
