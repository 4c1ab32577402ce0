"""The Metal kernels, executed through the CPU emulator (nobody here can run Metal).

- `python -m mlx_kssm.kernels.emulate --quick` passes (every body vs the references and finite
  differences);
- the emulator is strict: each rule it claims to check fails a body that breaks it;
- the signature it compiles is MLX's, as MLX 0.32 writes it;
- the ops built around the emulator train a tiny model with the same loss and gradients as the
  references, through the dispatch and nn.value_and_grad;
- on this machine (no Metal) the dispatch keeps running the references.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_kssm.kernels import bank, emulate, scan, signature
from mlx_kssm.kernels.emulator import EmulationError, Emulator
from mlx_kssm.kernels.launch import KernelSpec, Launch
from mlx_kssm.ops import dispatch
from mlx_kssm.ops import oscillator as bank_reference
from mlx_kssm.ops import scan as scan_reference


@pytest.fixture(scope="module")
def em32():
    return Emulator("float32")


def emulated(em):
    return lambda launch: [mx.array(o) for o in em.run(launch)]


def test_emulate_quick_passes():
    done = subprocess.run(
        [sys.executable, "-m", "mlx_kssm.kernels.emulate", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "72 checks, all within tolerance" in done.stdout
    assert "float64 vs finite diff." in done.stdout and "| NO |" not in done.stdout


# -- the emulator refuses what it does not model, and catches broken rules -------------------
def toy(body, inputs, n_out=32, grid=(32, 1, 1), group=(32, 1, 1), template=()):
    spec = KernelSpec("toy", ("a",), ("out",), "toy.metal", text=body)
    return Launch(spec, [inputs], list(template), grid, group, [(n_out,)])


def test_a_correct_toy_kernel_runs(em32):
    body = """
    threadgroup float shared[32];
    const uint i = thread_index_in_threadgroup;
    shared[i] = a[i] * 2.0f;
    threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    out[i] = shared[31 - i] + metal::simd_sum(a[i]);
    """
    a = np.arange(32, dtype=np.float32)
    (out,) = em32.run(toy(body, a))
    np.testing.assert_allclose(out, 2 * a[::-1] + a.sum())


@pytest.mark.parametrize(
    "line, message",
    [
        ("out[i] = sin(a[i]);", "does not compile"),  # unqualified: not in the shim
        ("half h = half(a[i]); out[i] = float(h);", "does not compile"),  # no half
        ("out[i] = a[i] * 0.5;", "does not compile"),  # float * double: no double on a GPU
        ("threadgroup float* p = nullptr; out[i] = a[i];", "does not compile"),
        ("out[i] = metal::tanh(a[i]);", "does not compile"),
    ],
)
def test_unknown_metal_is_a_compile_error(em32, line, message):
    body = "const uint i = thread_index_in_threadgroup;\n" + line
    with pytest.raises(EmulationError, match=message):
        em32.run(toy(body, np.ones(32, np.float32)))


@pytest.mark.parametrize(
    "body, message",
    [
        (  # no barrier between a write and another thread's read
            "threadgroup float s[32]; const uint i = thread_index_in_threadgroup;"
            "s[i] = a[i]; out[i] = s[31 - i];",
            "race",  # thread 0 reads before thread 31 writes: reported as a race or uninitialised
        ),
        (  # a barrier without mem_threadgroup does not order threadgroup memory
            "threadgroup float s[32]; const uint i = thread_index_in_threadgroup;"
            "s[i] = a[i]; threadgroup_barrier(metal::mem_flags::mem_none); out[i] = s[31 - i];",
            "race",
        ),
        (  # threadgroup memory is uninitialised
            "threadgroup float s[32]; const uint i = thread_index_in_threadgroup;out[i] = s[i];",
            "uninitialised",
        ),
        ("const uint i = thread_index_in_threadgroup; out[i] = a[i + 1];", "out of bounds"),
        (  # a barrier inside a branch not every thread takes
            "const uint i = thread_index_in_threadgroup; if (i < 16) "
            "{ threadgroup_barrier(metal::mem_flags::mem_threadgroup); } out[i] = a[i];",
            "barrier",
        ),
        (  # a SIMD collective some lanes skip
            "const uint i = thread_index_in_threadgroup; float v = a[i];"
            "if (i < 8) { v = metal::simd_sum(v); } out[i] = v;",
            "SIMD collective",
        ),
        ("out[0] = a[thread_index_in_threadgroup];", "two threads write"),
        (
            "const uint i = thread_index_in_threadgroup; if (i > 0) { out[i] = a[i]; }",
            "never written",
        ),
        (
            "const uint i = thread_index_in_threadgroup; out[i] = 1.0f; out[i] += out[(i + 1) % 32];",
            "did not write",
        ),
    ],
)
def test_broken_rules_are_errors(em32, body, message):
    with pytest.raises(EmulationError, match=message):
        em32.run(toy(body, np.ones(32, np.float32)))


def test_non_uniform_threadgroups_are_refused(em32):
    body = "out[thread_position_in_grid.x] = a[thread_position_in_grid.x];"
    with pytest.raises(EmulationError, match="non-uniform"):
        em32.run(toy(body, np.ones(48, np.float32), n_out=48, grid=(48, 1, 1)))


def test_a_wrong_gradient_fails_the_check(monkeypatch):
    """Flip one sign in the backward body: the emulator's comparison must catch it."""
    source = bank.BACKWARD.source
    broken = source.replace("omega_acc[i] += d_theta0;", "omega_acc[i] -= d_theta0;")
    assert broken != source
    monkeypatch.setattr(bank, "BACKWARD", dataclasses.replace(bank.BACKWARD, text=broken))
    case = emulate.bank_case("broken", 1, 3, 40, 3, False, True, 0)
    rows = []
    emulate.check_case(case, Emulator("float32"), Emulator("float64"), rows, "quick")
    failing = {(r[1], r[2]) for r in rows if r[4] > r[5]}
    assert ("d/domega_0", "vs reference") in failing
    assert ("d/domega_0", "float32 vs finite diff.") in failing
    assert all(r[4] <= r[5] for r in rows if r[1] != "d/domega_0")


# -- the signature is MLX's ----------------------------------------------------------------
def test_signature_as_mlx_writes_it():
    spec = KernelSpec("myexp", ("inp", "k"), ("out",), "x.metal", text="")
    source = "uint e = thread_position_in_grid.x; out[e] = inp[e] * k[0] + inp_shape[0];"
    inputs = [signature.ArrayMeta("float", 2, 64), signature.ArrayMeta("float", 1, 1)]
    template = [("T", mx.float32), ("N", 3), ("FLAG", True)]
    text = signature.write_signature(spec, source, inputs, ["float"], template)
    name = "custom_kernel_myexp__float_3_1_float_floatc_float"
    assert text == (
        "template <typename T, int N, bool FLAG>\n"
        f"[[kernel]] void {name}(\n"
        "  const device float* inp [[buffer(0)]],\n"
        "  const constant int* inp_shape [[buffer(1)]],\n"
        "  const constant float* k [[buffer(2)]],\n"
        "  device float* out [[buffer(3)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        f"{source}\n}}\n"
        f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}<float, 3, 1>) '
        f"{name}<float, 3, 1>;\n"
    )


def test_attributes_follow_mlx_order_and_substring_rule():
    source = "threads_per_threadgroup.x; thread_index_in_simdgroup; // grid_size"
    assert [a for a, _ in signature.attributes(source)] == [
        "grid_size",
        "thread_index_in_simdgroup",
        "threads_per_threadgroup",
    ]


# -- the ops around the emulator: same numbers as the references ------------------------------
def test_selective_scan_step_and_fallback(em32):
    _, step = scan.build(emulated(em32))
    rng = np.random.default_rng(0)
    batch, channels, state = 2, 5, 8
    x, dt = (mx.array(rng.normal(0, 1, (batch, channels)).astype(np.float32)) for _ in range(2))
    dt = mx.abs(dt)
    A = -mx.abs(mx.array(rng.normal(0, 1, (channels, state)).astype(np.float32)))
    b, c = (mx.array(rng.normal(0, 1, (batch, state)).astype(np.float32)) for _ in range(2))
    skip = mx.ones((channels,))
    h = mx.array(rng.normal(0, 1, (batch, channels, state)).astype(np.float32))
    for carried in (None, h):
        got = step(x, dt, A, b, c, skip, carried)
        want = scan_reference.selective_scan_step(x, dt, A, b, c, skip, carried)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.array(g), np.array(w), atol=1e-5)
    # A state size of 3 is not a power of two: the reference runs (and gives its numbers).
    got = step(x, dt, A[:, :3], b[:, :3], c[:, :3], skip, None)
    want = scan_reference.selective_scan_step(x, dt, A[:, :3], b[:, :3], c[:, :3], skip, None)
    np.testing.assert_array_equal(np.array(got[0]), np.array(want[0]))


def _loss_and_grads(model, tokens):
    def loss(m):
        logits, stats = m.forward(tokens[:, :-1])
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")
        return ce + m.aux_loss(stats)

    value, grads = nn.value_and_grad(model, loss)(model)
    return value, dict(nn.utils.tree_flatten(grads))


@pytest.mark.parametrize("model_type", ["kssm_v3", "kssm_ssm"])
def test_models_train_through_the_emulated_kernels(monkeypatch, em32, model_type):
    """The dispatch hands the models the emulated kernels: loss and every gradient match."""
    from mlx_kssm.models import build_model, get_classes

    _, Args = get_classes(model_type)
    tiny = dict(vocab_size=64, hidden_dim=32, n_layers=1, n_oscillators=40, n_harmonics=3)
    fields = {f.name for f in dataclasses.fields(Args)}
    if "max_positions" in fields:
        tiny["max_positions"] = 16
    mx.random.seed(3)
    model = build_model(Args(**{k: v for k, v in tiny.items() if k in fields}))
    model.train()
    tokens = mx.random.randint(0, 64, (2, 9))
    mx.random.seed(5)
    want_value, want = _loss_and_grads(model, tokens)

    selective_scan, selective_scan_step = scan.build(emulated(em32))
    ops = {
        "oscillator_features": bank.build(emulated(em32)),
        "selective_scan": selective_scan,
        "selective_scan_step": selective_scan_step,
    }
    used = []
    monkeypatch.setattr(dispatch, "kernels_enabled", lambda: True)
    monkeypatch.setattr(dispatch, "on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_load", lambda t: used.append(t) or ops[t.split(":")[1]])
    mx.random.seed(5)  # the same noise draws
    value, got = _loss_and_grads(model, tokens)
    assert "bank:oscillator_features" in used
    if model_type == "kssm_ssm":
        assert "scan:selective_scan" in used
    assert abs(float(value) - float(want_value)) < 1e-5
    assert set(got) == set(want)
    for name, g in got.items():
        scale = max(float(mx.max(mx.abs(want[name]))), 1e-6)
        assert float(mx.max(mx.abs(g - want[name]))) / scale < 1e-4, name


def test_dispatch_runs_the_references_without_metal():
    assert dispatch.KERNELS["oscillator_features"] == "bank:oscillator_features"
    assert not mx.metal.is_available()  # this machine: Linux CPU
    ref = bank_reference.oscillator_features
    assert dispatch.implementation("oscillator_features", ref) is ref
