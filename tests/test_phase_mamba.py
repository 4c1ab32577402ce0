"""Phase-Mamba (issue 12): the original core reproduced against the PyTorch fixture, each
coupling, the hook, the frozen base, the base folder and its fingerprint, the conversion rules.

Bases here are tiny random mlx-lm Mambas written to a temporary folder as mlx-lm writes them
(config.json + model.safetensors), then read back through mlx-lm like any other base.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten

import mlx_kssm
from mlx_kssm.checkpoints_convert import phase_mamba_rules as rules
from mlx_kssm.checkpoints_convert.convert import convert_training_state
from mlx_kssm.checkpoints_convert.torch_zip import CheckpointError, read_checkpoint
from mlx_kssm.io import ModelFolderError
from mlx_kssm.models.base import ConfigError
from mlx_kssm.models.phase_base import load_base, random_base
from mlx_kssm.models.phase_core import CoreArgs, PhaseCore
from mlx_kssm.models.phase_mamba import args_for_base
from mlx_kssm.steps import MLXSteps, loss_terms

FIXTURE = FIXTURES / "torch-phase-core"
VOCAB, HIDDEN, LAYERS = 61, 48, 3  # hidden 48: the fixture core's width


def write_base(folder, base) -> None:
    """An mlx-lm model folder: its ModelArgs as config.json, its weights as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(base.args)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(base.parameters())))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases") / "mamba"
    write_base(folder, random_base(VOCAB, HIDDEN, LAYERS, seed=1))
    return folder


def build(base_dir, seed=0, **fields):
    mx.random.seed(seed)
    return mlx_kssm.build_model(args_for_base(base_dir, **fields))


def tokens(B=2, L=10, seed=1):
    return mx.random.randint(0, VOCAB, (B, L), key=mx.random.key(seed))


def base_logits(base_dir, x) -> np.ndarray:
    """The unhooked base's logits, from a fresh load."""
    return np.array(load_base(base_dir)(x))


# ---------------------------------------------------------------------------- the fixture


@pytest.fixture(scope="module")
def fixture_root():
    path = FIXTURE / "step_000003.pt"
    if not path.is_file():
        pytest.fail(f"the Phase-Mamba fixture is missing ({path}); clone ../shared beside us")
    return read_checkpoint(path)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_converted_core_reproduces_the_original_calls(fixture_root, base_dir, mode):
    """Phases, R and outputs of the five successive calls, to 1e-5, in both modes."""
    expected = np.load(FIXTURE / "expected.npz")
    weights, n, d = rules.core_weights(fixture_root, FIXTURE / "step_000003.pt")
    assert (n, d) == (16, 48)
    model = mlx_kssm.build_model(rules.phase_mamba_args(n, d, base_dir))
    assert (model.args.coupling, model.args.dynamics, model.args.hook_layers) == (
        "faithful",
        "per_call",
        [1],
    )
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.train(mode == "train")
    core = model.cores[0]
    for call in range(5):
        x = mx.array(expected["inputs"][call])
        out, R = core.per_call(x)
        np.testing.assert_allclose(
            np.array(core.phases), expected[f"{mode}_phases"][call], atol=1e-5
        )
        assert abs(float(R) - expected[f"{mode}_R"][call]) < 1e-5
        np.testing.assert_allclose(np.array(out), expected[f"{mode}_outputs"][call], atol=1e-5)
    if mode == "eval":  # the original hook only observes in eval mode
        np.testing.assert_array_equal(np.array(out), expected["inputs"][4])


def test_optimizer_state_maps_by_torch_index(fixture_root):
    source = FIXTURE / "step_000003.pt"
    shapes = rules.optimizer_shapes(16, 48)
    state = convert_training_state(fixture_root, shapes, source)
    assert int(state.optimizer["step"]) == 3
    torch_state = fixture_root["optimizer_state"]["state"]
    for index, name in enumerate(rules.PARAMETER_ORDER):
        ours = rules.our_name(name)
        np.testing.assert_array_equal(
            state.optimizer[f"{ours}.m"], torch_state[index]["exp_avg"].numpy()
        )
        np.testing.assert_array_equal(
            state.optimizer[f"{ours}.v"], torch_state[index]["exp_avg_sq"].numpy()
        )
    assert "cores.0.phases.m" not in state.optimizer  # a buffer has no optimizer state


def test_rules_refuse_what_is_not_the_original_core(fixture_root, base_dir, tmp_path):
    assert rules.is_phase_mamba_checkpoint(fixture_root)
    assert not rules.is_phase_mamba_checkpoint({"model_state": {}})
    good = rules.core_shapes(16, 48)
    assert rules.infer_core_size(good) == (16, 48)
    with pytest.raises(CheckpointError, match="missing.*phases"):
        rules.infer_core_size({k: v for k, v in good.items() if k != "phases"})
    with pytest.raises(CheckpointError, match="to_modulation.bias"):
        rules.infer_core_size({**good, "to_modulation.bias": (47,)})
    with pytest.raises(CheckpointError, match="not a Phase-Mamba checkpoint"):
        rules.core_weights({"model_state": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="width 32.*hidden_size 48"):
        rules.phase_mamba_args(16, 32, base_dir)


# ---------------------------------------------------------------------------- the couplings


def test_the_hook_applies_the_core_to_the_layer_output(base_dir):
    """Logits = the base's computation with core(x) in place of layer 1's output x."""
    model = build(base_dir, coupling="multiplicative")
    model.eval()
    twin = PhaseCore(CoreArgs(HIDDEN, coupling="multiplicative"))
    twin.load_weights(list(tree_flatten(model.cores[0].parameters())))
    twin.eval()
    x = tokens()
    logits, stats = model.forward(x)

    base = load_base(base_dir)
    h = base.backbone.embeddings(x)
    for i, layer in enumerate(base.layers):
        h = layer(h, None)
        if i == 1:
            h, R = twin.per_call(h)
    expected = base.backbone.embeddings.as_linear(base.backbone.norm_f(h))
    np.testing.assert_allclose(np.array(logits), np.array(expected), atol=1e-5)
    np.testing.assert_allclose(np.array(stats["R"]), float(R), atol=1e-7)
    np.testing.assert_array_equal(np.array(model.cores[0].phases), np.array(twin.phases))


def test_the_base_scans_in_chunks_with_mlx_lms_numbers(base_dir):
    """A Mamba-1 base computes with the chunked scan, and its logits are mlx-lm's own."""
    from mlx_lm.models import mamba
    from mlx_lm.utils import load_model

    from mlx_kssm.models.mamba_lm import ScanMixer

    ours = load_base(base_dir)
    assert all(type(layer.mixer) is ScanMixer for layer in ours.layers)
    theirs, _ = load_model(base_dir)
    assert all(type(layer.mixer) is mamba.MambaBlock for layer in theirs.layers)
    x = mx.array(np.random.default_rng(0).integers(0, VOCAB, (2, 37)))  # not a chunk multiple
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), atol=1e-5)


def test_faithful_observes_in_eval_and_modulates_in_training(base_dir):
    model = build(base_dir)  # faithful, per_call: the original
    x = tokens()
    plain = base_logits(base_dir, x)
    model.eval()
    before = np.array(model.cores[0].phases)
    logits, stats = model.forward(x)
    np.testing.assert_array_equal(np.array(logits), plain)  # unchanged output ...
    after = np.array(model.cores[0].phases)
    assert np.abs(after - before).max() > 1e-4  # ... but the phases advanced
    _, again = model.forward(x)
    assert float(again["R"][0, 0]) != float(stats["R"][0, 0])  # once per call
    model.train()
    assert np.abs(np.array(model(x)) - plain).max() > 1e-4


@pytest.mark.parametrize("coupling", ["multiplicative", "additive"])
def test_the_other_couplings_modulate_at_inference(base_dir, coupling):
    model = build(base_dir, coupling=coupling)
    model.eval()
    x = tokens()
    assert np.abs(np.array(model(x)) - base_logits(base_dir, x)).max() > 1e-4
    core = model.cores[0]
    h = mx.random.normal((2, 5, HIDDEN), key=mx.random.key(4))
    phi = mx.random.uniform(-3, 3, (16,), key=mx.random.key(5))
    m = core.to_modulation(mx.sin(phi))
    want = h + 0.1 * m if coupling == "additive" else h * (1 + 0.1 * mx.tanh(m))
    np.testing.assert_allclose(np.array(core.modulate(h, phi)), np.array(want), atol=1e-6)


def test_per_token_phases_have_a_trajectory_and_decode_incrementally(base_dir):
    model = build(base_dir, coupling="multiplicative", dynamics="per_token", hook_layers=[0, -1])
    model.eval()
    assert model.args.hook_layers == [0, 2] and model.n_banks == 2
    x = tokens(L=11)
    full, stats = model.forward(x)
    assert stats["R"].shape == (2, 11, 2)
    assert np.array(stats["R"]).std(axis=1).min() > 1e-4  # R moves from token to token
    for force in (None, {1: 0.3}):
        full, stats = model.forward(x, force_r=force)
        cache = model.make_cache()
        pieces = [model.forward(x[:, :4], cache=cache, force_r=force)]
        pieces += [model.forward(x[:, t : t + 1], cache=cache, force_r=force) for t in range(4, 11)]
        logits = np.concatenate([np.array(p[0]) for p in pieces], axis=1)
        R = np.concatenate([np.array(p[1]["R"]) for p in pieces], axis=1)
        np.testing.assert_allclose(logits, np.array(full), atol=1e-4)
        np.testing.assert_allclose(R, np.array(stats["R"]), atol=1e-5)
    np.testing.assert_allclose(np.array(stats["R"][..., 1]), 0.3, atol=1e-3)  # forced exactly


def test_forcing_r_per_call_sets_the_phases_the_modulation_reads(base_dir):
    model = build(base_dir, coupling="multiplicative")
    model.eval()
    x = tokens()
    free = np.array(model(x))
    for target in (0.1, 0.5, 0.9):
        logits, stats = model.forward(x, force_r={0: target})
        np.testing.assert_allclose(np.array(stats["R"]), target, atol=1e-3)
        assert np.abs(np.array(logits) - free).max() > 1e-5
    with pytest.raises(ValueError, match="bank 3"):
        model.forward(x, force_r={3: 0.5})


def test_hook_layers_are_resolved_and_checked(base_dir):
    assert build(base_dir).args.hook_layers == [1]  # the middle layer by default
    for bad, match in [([2, -1], "twice"), ([3], "outside"), ("1", "list of layer indices")]:
        with pytest.raises(ConfigError, match=match):
            build(base_dir, hook_layers=bad)
    with pytest.raises(ConfigError, match="faithful coupling is the original per-call"):
        build(base_dir, dynamics="per_token")


# ---------------------------------------------------------------------------- training


def test_the_base_is_frozen_and_only_the_cores_train(base_dir):
    model = build(base_dir, coupling="additive", dynamics="per_token")
    model.train()
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(
        k.startswith("cores.") and not k.endswith(".phases") for k in trainable
    )
    base_before = {k: np.array(v) for k, v in tree_flatten(model.base.parameters())}
    cores_before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    optimizer = optim.AdamW(learning_rate=1e-2)
    optimizer.init(model.trainable_parameters())
    steps = MLXSteps(model, optimizer, aux_weight=0.1, grad_clip=1.0)
    _, _, grads = steps.micro_step(tokens(B=2, L=9), None)
    assert {k for k, _ in tree_flatten(grads)} == set(trainable)
    steps.apply_update(grads)
    mx.eval(model.state, optimizer.state)
    for k, v in tree_flatten(model.base.parameters()):
        np.testing.assert_array_equal(np.array(v), base_before[k], err_msg=k)
    changed = [
        k for k, v in tree_flatten(model.parameters()) if (np.array(v) != cores_before[k]).any()
    ]
    assert set(changed) == set(trainable)


def test_faithful_phases_advance_inside_the_compiled_step(base_dir):
    """The per-call buffer written during a compiled value_and_grad equals the eager one."""
    compiled, eager = build(base_dir, seed=3), build(base_dir, seed=3)
    batch = tokens(B=2, L=9)
    for model in (compiled, eager):
        model.train()
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(compiled.trainable_parameters())
    loss_c, _, grads_c = MLXSteps(compiled, optimizer, 0.0, 1.0).micro_step(batch, None)
    (loss_e, _), grads_e = nn.value_and_grad(eager, loss_terms)(eager, batch, None, 0.0)
    mx.eval(compiled.state)
    np.testing.assert_allclose(float(loss_c), float(loss_e), rtol=1e-6)
    start = np.zeros(16)
    assert np.abs(np.array(compiled.cores[0].phases) - start).max() > 1e-3
    np.testing.assert_allclose(
        np.array(compiled.cores[0].phases), np.array(eager.cores[0].phases), atol=1e-6
    )
    for (k, a), (_, b) in zip(tree_flatten(grads_c), tree_flatten(grads_e), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, err_msg=k)


def test_u_term_metrics_and_aux(base_dir):
    model = build(base_dir, lambda_u=0.1, u_target=0.4)
    assert model.default_aux_weight == 0.1
    _, stats = model.forward(tokens())
    U = np.array(stats["U"])
    assert U.shape == (2,) and ((U > 0) & (U <= 1)).all()
    assert abs(float(model.aux_loss(stats)) - abs(U.mean() - 0.4)) < 1e-6
    metrics = model.metrics(stats)
    assert set(metrics) == {"R", "U", "RU", "goldilocks"} and metrics["R"].shape == (1,)
    assert build(base_dir).default_aux_weight == 0.0  # the code's behaviour: U only logged


# ---------------------------------------------------------------------------- folders


def test_a_model_folder_holds_the_cores_and_names_its_base(base_dir, tmp_path):
    model = build(base_dir, coupling="additive", dynamics="per_token", hook_layers=[0, 2])
    model.eval()
    folder = mlx_kssm.save(model, tmp_path / "pm")
    saved = mx.load(str(folder / "model.safetensors"))
    assert saved and all(k.startswith("cores.") for k in saved)
    config = json.loads((folder / "config.json").read_text())
    assert config["base_path"] == str(base_dir.resolve())
    assert config["base_fingerprint"].startswith("sha256:")
    x = tokens()
    loaded = mlx_kssm.load(folder)
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), atol=1e-6)


def test_a_different_base_behind_the_path_is_refused(base_dir, tmp_path):
    other = tmp_path / "base"
    shutil.copytree(base_dir, other)
    folder = mlx_kssm.save(build(other), tmp_path / "pm")
    mlx_kssm.load(folder)  # same base: fine
    write_base(other, random_base(VOCAB, HIDDEN, LAYERS, seed=2))  # same shapes, new values
    with pytest.raises(ModelFolderError, match="not the one this core was built on") as err:
        mlx_kssm.load(folder)  # the loader's own error type: the CLI turns it into exit 2
    assert "\n" not in str(err.value)


def test_bad_bases_are_one_line_errors(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        args_for_base(tmp_path / "nowhere")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' model; phase_mamba hooks a Mamba"):
        args_for_base(llama)
    with pytest.raises(ConfigError, match="vocab_size 7 differs"):
        mlx_kssm.build_model(
            {"model_type": "phase_mamba", "base_path": str(base_dir), "vocab_size": 7}
        )


def test_a_mamba2_base_works_too(tmp_path):
    from mlx_lm.models import mamba2

    args = mamba2.ModelArgs(
        model_type="mamba2", num_heads=4, head_dim=16, vocab_size=VOCAB, hidden_size=32,
        intermediate_size=64, state_size=16, num_hidden_layers=2, layer_norm_epsilon=1e-5,
        conv_kernel=4, n_groups=1, use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
        time_step_limit=(0.001, 100.0), time_step_rank="auto",
    )  # fmt: skip
    write_base(tmp_path / "m2", mamba2.Model(args))
    model = build(tmp_path / "m2", coupling="additive", dynamics="per_token")
    model.eval()
    x = tokens(L=7)
    full = np.array(model(x))
    cache = model.make_cache()
    steps = [model(x[:, :3], cache=cache)] + [
        model(x[:, t : t + 1], cache=cache) for t in range(3, 7)
    ]
    np.testing.assert_allclose(np.concatenate([np.array(s) for s in steps], 1), full, atol=1e-4)


def test_set_dtype_reaches_the_base(base_dir):
    model = build(base_dir, coupling="multiplicative")
    model.set_dtype(mx.bfloat16)
    assert model.base.backbone.embeddings.weight.dtype == mx.bfloat16
    assert model.cores[0].omega.dtype == mx.bfloat16
    logits = model(tokens())
    assert logits.dtype == mx.bfloat16 and np.isfinite(np.array(logits.astype(mx.float32))).all()
