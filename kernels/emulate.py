"""``python -m mlx_kssm.kernels.emulate``: every Metal kernel body of this package, compiled as
C++ against ``metal_shim.h`` and run over its whole grid on the CPU (see ``emulator.py`` and
README.md), checked against the pure-MLX references and against finite differences.

Per case (shapes chosen to hit the edges: oscillators past the last full SIMD group, channels
past the last full threadgroup, lengths past the last full chunk):
  forward   the float32 build through the op's own ``mx.custom_function`` vs the reference:
            max abs error, within 1e-5 x max(1, max |reference|);
  backward  the float32 build's gradients (``mx.vjp`` through the custom VJP) vs the reference's
            autodiff gradients, and vs central finite differences of the kernel's float64 build;
            the float64 build's gradients vs the same differences. Error relative to the largest
            magnitude of the compared gradient, within 1e-4.
Finite differences (central, step 1e-6 in float64; at 1e-5 their own truncation error reached
5e-5 relative with 32 harmonics) are per element for arguments of up to 64 elements (16 with
--quick), and along 6 (4) random directions, compared as directional derivatives, for larger
ones.
Besides, the exact text MLX generates for every call made here compiles (``-fsyntax-only``).
Exit status 0 when everything is within tolerance, 1 otherwise (or when a kernel breaks a rule
of the model: a race, an out-of-bounds access, a divergent barrier), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ..ops import oscillator as bank_reference
from ..ops import scan as scan_reference
from . import bank, scan
from .emulator import EmulationError, Emulator, check_mlx_text
from .signature import NotModelled

FORWARD_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4
ELEMENTWISE_LIMIT = {"full": 64, "quick": 16}
DIRECTIONS = {"full": 6, "quick": 4}


@dataclass
class Case:
    name: str
    kernel: str  # "bank" or "scan"
    arrays: dict[str, np.ndarray]  # float32 primals, in call order
    n_harmonics: int = 0
    cotangents: list[np.ndarray] = field(default_factory=list)


def bank_case(name, batch, length, n, harmonics, per_osc, noise, seed) -> Case:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    arrays = {
        "shift": rng.normal(0, 0.5, (batch, length, n if per_osc else 1)).astype(f32),
        "omega_0": np.linspace(-np.pi, np.pi, n).astype(f32),
        "coupling": (2 / (1 + np.exp(-rng.normal(0, 1, (batch, length, 1))))).astype(f32),
        "noise_scale": np.array([0.2], dtype=f32),
    }
    if noise:
        arrays["eps"] = rng.normal(0, 1, (batch, length, n)).astype(f32)
    cot = rng.normal(0, 1, (batch, length, 3 * harmonics)).astype(f32)
    return Case(name, "bank", arrays, harmonics, [cot])


def scan_case(name, batch, length, channels, state, has_h0, seed) -> Case:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    arrays = {
        "x": rng.normal(0, 1, (batch, length, channels)).astype(f32),
        "delta": np.log1p(np.exp(rng.normal(-1, 1, (batch, length, channels)))).astype(f32),
        "A": -np.exp(rng.normal(0, 0.5, (channels, state))).astype(f32),
        "B_": rng.normal(0, 1, (batch, length, state)).astype(f32),
        "C": rng.normal(0, 1, (batch, length, state)).astype(f32),
        "D_skip": rng.normal(0, 1, (channels,)).astype(f32),
    }
    if has_h0:
        arrays["h0"] = rng.normal(0, 1, (batch, channels, state)).astype(f32)
    cots = [
        rng.normal(0, 1, (batch, length, channels)).astype(f32),
        rng.normal(0, 1, (batch, channels, state)).astype(f32),
    ]
    return Case(name, "scan", arrays, 0, cots)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            bank_case("bank v3: shared shift, noise, N=40 H=5", 1, 9, 40, 5, False, True, 1),
            bank_case("bank drive: per-oscillator shift, N=24 H=3", 1, 2, 24, 3, True, False, 2),
            scan_case("scan with h0: L=18 D=9 N=16", 1, 18, 9, 16, True, 3),
            scan_case("scan no h0: L=5 D=70 N=4", 1, 5, 70, 4, False, 4),
        ]
    return [
        bank_case("bank v3 published: N=192 H=32, noise", 2, 5, 192, 32, False, True, 1),
        bank_case("bank v3: shared shift, no noise, N=40 H=5", 1, 11, 40, 5, False, False, 5),
        bank_case("bank drive: per-oscillator shift, noise, N=48 H=4", 2, 3, 48, 4, True, True, 2),
        bank_case("bank drive: N=20 H=6, no noise", 1, 3, 20, 6, True, False, 6),
        scan_case("scan with h0: L=37 D=20 N=16", 2, 37, 20, 16, True, 3),
        scan_case("scan no h0: L=9 D=70 N=4", 1, 9, 70, 4, False, 4),
        scan_case("scan N=32 with h0: L=17 D=9", 1, 17, 9, 32, True, 7),
        scan_case("scan N=1 no h0: L=20 D=300", 1, 20, 300, 1, False, 8),
    ]


# -- the computations compared -------------------------------------------------------------------
def reference_fn(case: Case):
    names = list(case.arrays)
    if case.kernel == "bank":

        def f(*a):
            kw = dict(zip(names, a, strict=True))
            eps = kw.pop("eps", None)
            return bank_reference.oscillator_features(**kw, eps=eps, n_harmonics=case.n_harmonics)

        return f

    def g(*a):
        kw = dict(zip(names, a, strict=True))
        return scan_reference.selective_scan(**kw)

    return g


def kernel_fn(case: Case, emulator: Emulator):
    """The op exactly as the dispatch would call it, with the emulator as its runner."""

    def run(launch):
        return [mx.array(o) for o in emulator.run(launch)]

    names = list(case.arrays)
    if case.kernel == "bank":
        op = bank.build(run)

        def f(*a):
            kw = dict(zip(names, a, strict=True))
            eps = kw.pop("eps", None)
            return op(**kw, eps=eps, n_harmonics=case.n_harmonics)

        return f
    selective_scan, _ = scan.build(run)
    return lambda *a: selective_scan(**dict(zip(names, a, strict=True)))


def float64_fns(case: Case, emulator: Emulator):
    """(forward, gradient) of the kernels' float64 build, in numpy."""
    names = list(case.arrays)

    def prims(arrays):
        kw = dict(zip(names, arrays, strict=True))
        if case.kernel == "bank":
            kw.setdefault("eps", None)
            return [kw[k] for k in ("shift", "omega_0", "coupling", "noise_scale", "eps")]
        kw.setdefault("h0", None)
        return [kw[k] for k in ("x", "delta", "A", "B_", "C", "D_skip", "h0")]

    def forward(arrays):
        p = prims(arrays)
        if case.kernel == "bank":
            return [emulator.run(bank.forward_launch(*p, case.n_harmonics))[0]]
        return emulator.run(scan.forward_launch(*p))

    def gradient(arrays, outputs, cotangents):
        p = prims(arrays)
        if case.kernel == "bank":
            launch = bank.backward_launch(*p, outputs[0], cotangents[0])
            return bank.finish_backward(np, emulator.run(launch), *p)
        launch = scan.backward_launch(*p, *cotangents)
        return scan.finish_backward(emulator.run(launch), p[6] is not None)

    return forward, gradient


def finite_differences(forward, arrays, cotangents, index, rng, mode, step=1e-6):
    """d<cot, forward>/d arrays[index]: per element, or along random directions.
    Returns (directions or None, values)."""

    def loss(perturbed):
        outs = forward(perturbed)
        return sum(
            float(np.sum(o.reshape(c.shape) * c)) for o, c in zip(outs, cotangents, strict=True)
        )

    base = arrays[index]
    size = base.size
    if size <= ELEMENTWISE_LIMIT[mode]:
        directions = None
        vectors = [np.eye(size)[j].reshape(base.shape) for j in range(size)]
    else:
        directions = [rng.normal(0, 1, base.shape) for _ in range(DIRECTIONS[mode])]
        vectors = directions
    values = []
    for v in vectors:
        plus = [a if i != index else a + step * v for i, a in enumerate(arrays)]
        minus = [a if i != index else a - step * v for i, a in enumerate(arrays)]
        values.append((loss(plus) - loss(minus)) / (2 * step))
    values = np.array(values)
    return directions, (values.reshape(base.shape) if directions is None else values)


def relative(a, b) -> float:
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    scale = float(np.max(np.abs(b)))
    return 0.0 if err == 0 else err / max(scale, 1e-30)


def project(grad, directions):
    if directions is None:
        return np.asarray(grad, np.float64)
    return np.array([float(np.sum(np.asarray(grad, np.float64) * d)) for d in directions])


def check_case(case: Case, em32: Emulator, em64: Emulator, rows: list, mode: str) -> None:
    names = list(case.arrays)
    args = [mx.array(a) for a in case.arrays.values()]
    cots = [mx.array(c) for c in case.cotangents]
    ref_out, ref_grads = mx.vjp(reference_fn(case), args, cots)
    out, grads = mx.vjp(kernel_fn(case, em32), args, cots)
    ref_out = [ref_out] if isinstance(ref_out, mx.array) else list(ref_out)
    out = [out] if isinstance(out, mx.array) else list(out)
    for i, (o, r) in enumerate(zip(out, ref_out, strict=True)):
        err = float(mx.max(mx.abs(o - r)))
        scale = max(1.0, float(mx.max(mx.abs(r))))
        what = "forward" if len(out) == 1 else f"forward output {i}"
        rows.append((case.name, what, "vs reference", err, err / scale, FORWARD_TOLERANCE))

    forward64, gradient64 = float64_fns(case, em64)
    arrays64 = [a.astype(np.float64) for a in case.arrays.values()]
    cots64 = [c.astype(np.float64) for c in case.cotangents]
    grads64 = gradient64(arrays64, forward64(arrays64), cots64)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        g32, gref, g64 = np.array(grads[i]), np.array(ref_grads[i]), grads64[i]
        err = float(np.max(np.abs(g32 - gref)))
        rows.append(
            (case.name, f"d/d{name}", "vs reference", err, relative(g32, gref), GRADIENT_TOLERANCE)
        )
        directions, fd = finite_differences(forward64, arrays64, cots64, i, rng, mode)
        for label, g in (("float32 vs finite diff.", g32), ("float64 vs finite diff.", g64)):
            p = project(g, directions)
            err = float(np.max(np.abs(p - fd)))
            rows.append((case.name, f"d/d{name}", label, err, relative(p, fd), GRADIENT_TOLERANCE))


def all_launches(case_list: list[Case]) -> list:
    """Every kernel call the cases make, for building ahead (and checking MLX's text)."""
    launches = []
    for case in case_list:
        a = dict(case.arrays)
        if case.kernel == "bank":
            p = [a["shift"], a["omega_0"], a["coupling"], a["noise_scale"], a.get("eps")]
            launches.append(bank.forward_launch(*p, case.n_harmonics))
            cot = case.cotangents[0]
            launches.append(bank.backward_launch(*p, cot, cot))
        else:
            p = [a[k] for k in ("x", "delta", "A", "B_", "C", "D_skip")] + [a.get("h0")]
            launches.append(scan.forward_launch(*p))
            launches.append(scan.backward_launch(*p, *case.cotangents))
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_kssm.kernels.emulate",
        description="Compile every Metal kernel body as C++ and check it on the CPU.",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes only (the CI test)")
    options = parser.parse_args(argv)
    start = time.perf_counter()
    case_list = cases(options.quick)
    em32, em64 = Emulator("float32"), Emulator("float64")
    rows: list = []
    try:
        launches = all_launches(case_list)
        n_texts = check_mlx_text(launches)
        em32.prepare(launches)
        em64.prepare(launches)
        print(f"built: {n_texts} kernels as MLX writes them (syntax), float32 and float64 builds")
        for case in case_list:
            check_case(case, em32, em64, rows, "quick" if options.quick else "full")
    except (EmulationError, NotModelled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    print("| case | quantity | compared | max abs error | relative | tolerance | ok |")
    print("|---|---|---|---|---|---|---|")
    for name, what, compared, err, rel, tol in rows:
        ok = rel <= tol
        failed += not ok
        print(
            f"| {name} | {what} | {compared} | {err:.2e} | {rel:.2e} | {tol:.0e} | {'yes' if ok else 'NO'} |"
        )
    elapsed = time.perf_counter() - start
    verdict = "all within tolerance" if not failed else f"{failed} check(s) above tolerance"
    print(f"{len(rows)} checks, {verdict} ({elapsed:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
