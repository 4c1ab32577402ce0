"""Data-parallel training over ``mx.distributed``: everything that knows about ranks.

``kssm train`` started by ``mlx.launch`` (or by hand: ``MLX_HOSTFILE`` + ``MLX_RANK``; or
``mpirun``) joins its ranks' group; alone, it is a group of one and nothing here communicates.

Sharding. A step of w ranks with ``--batch-size b --grad-accum a`` reads the w*a*b windows one
process reads at that data position, as w*a micro-batches of b: rank r takes micro-batches
r*a .. r*a + a - 1, and micro-batch g draws its phase noise from ``noise_key(seed, step, g)``.
Each micro-batch is thus computed as one process with ``--grad-accum w*a`` computes it, and
the data order is addressed by position whatever w is (a run may resume on other ranks).

Reductions. A step's gradients and loss terms are averaged in a bucketed
``nn.average_gradients`` (the numpy head's embedding gradient is among them); evaluation
batches are shared out and summed. Every rank then holds the same numbers and takes the same
decisions (skip a non-finite step, stop a diverging run) without talking.

Stopping together. Ctrl+C on any rank is voted on (a small all-sum) before each step and
between micro-batches. A rank that ends (an error, kill -9) closes its sockets: the others'
next collective fails at once, as ``PeerLost``. One that stops answering without ending
(frozen, a cut cable) would hold the others inside a collective for ever, so a watchdog
thread ends a rank whose collective outlasts ``KSSM_DIST_TIMEOUT`` s (default 600;
``KSSM_DIST_SETUP_TIMEOUT``, default 3600, while connecting and preparing data), in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .run_setup import TrainingInputError
from .trainer import TrainingStopped

TIMEOUT_ENV = "KSSM_DIST_TIMEOUT"
SETUP_TIMEOUT_ENV = "KSSM_DIST_SETUP_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # longer than any gap between two ranks' collectives in a step
DEFAULT_SETUP_TIMEOUT_S = 3600.0  # rank 0 may tokenise a corpus while the others wait
BUCKET_BYTES = 32 * 1024**2  # as nn.average_gradients: one all-sum per 32 MiB
WATCHDOG_EXIT_CODE = 1
# Variables that mean "this process is one rank of several" (ring, MPI, JACCL launchers).
LAUNCHER_VARIABLES = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LAUNCHER_VARIABLES += ("MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES")


class PeerLost(TrainingStopped):
    """A collective failed: another rank ended (its output says why) or the network dropped."""


class Watchdog:
    """Ends the process when a guarded collective outlives its bound. A collective blocked on
    a peer that neither answers nor closes its socket cannot be interrupted from Python, so
    the only way out is ``os._exit`` from this thread, after one line on stderr."""

    def __init__(self, label: str):
        self.label = label
        self._armed: tuple[float, float, str, str] | None = None  # deadline, bound, what, env
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="kssm-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str, bound_s: float, env: str = TIMEOUT_ENV):
        with self._lock:
            self._armed = (time.monotonic() + bound_s, bound_s, what, env)
        try:
            yield
        finally:
            with self._lock:
                self._armed = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            with self._lock:
                armed = self._armed
            if armed is not None and time.monotonic() > armed[0]:
                _, bound_s, what, env = armed
                line = (
                    f"error: {self.label}: no answer from the other ranks for {bound_s:g} s "
                    f"during {what}: a rank is stuck or the network dropped; exiting "
                    f"(set {env} to wait longer for slow ranks)\n"
                )
                os.write(2, line.encode())
                os._exit(WATCHDOG_EXIT_CODE)


class Ranks:
    """This process's place in a data-parallel run: ``size`` ranks, this one ``rank``; rank 0
    (``main``) alone writes the run folder and prints. ``Ranks()`` is a process on its own."""

    def __init__(self, group=None):
        self.group = group
        self.size = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0
        self.timeout_s = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        self.setup_timeout_s = _seconds(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)
        self.watchdog = None
        if self.size > 1:
            self.watchdog = Watchdog(self.label)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.size}"

    # ---- sharding

    def micro_index(self, micro: int, grad_accum: int) -> int:
        """The step's micro-batch that is this rank's ``micro``-th: the index of the window
        block it reads and the counter of its noise key."""
        return self.rank * grad_accum + micro

    def owns(self, index: int) -> bool:
        """Whether the index-th of a list of equal shares (evaluation batches) is this rank's."""
        return index % self.size == self.rank

    def windows_per_step(self, args) -> int:
        return self.size * args.grad_accum * args.batch_size

    def world_record(self, args) -> dict[str, int]:
        """What a checkpoint records of the ranks that made it."""
        return {"size": self.size, "windows_per_step": self.windows_per_step(args)}

    def batch_change(self, saved: dict[str, Any], args) -> str | None:
        """A message when a resumed run reads another number of windows per step than the
        checkpoint's run did (another number of ranks, --batch-size or --grad-accum)."""
        before = (saved.get("world") or {}).get("windows_per_step")
        recorded = saved.get("train_args") or {}
        if before is None and "batch_size" in recorded and "grad_accum" in recorded:
            before = int(recorded["batch_size"]) * int(recorded["grad_accum"])  # one process
        now = self.windows_per_step(args)
        if before is None or before == now:
            return None
        return (
            f"the checkpoint's run read {before} windows per step; this one reads {now} "
            f"({self.size} rank(s) x --batch-size {args.batch_size} x --grad-accum "
            f"{args.grad_accum}): the data order continues, the batch per step changes. To "
            f"continue the same run, make ranks x batch x accumulation = {before}"
        )

    # ---- collectives (each rank must call the same ones in the same order)

    def mean(self, tree: Any, what: str) -> Any:
        """The tree averaged over the ranks: bucketed ``nn.average_gradients``, one bucket
        list per dtype (it would fall back to one all-sum per array on mixed dtypes)."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        values: list[Any] = [None] * len(flat)
        for dtype in {v.dtype for _, v in flat}:
            idx = [i for i in _key_order(flat) if flat[i][1].dtype == dtype]
            averaged = nn.average_gradients([flat[i][1] for i in idx], self.group, BUCKET_BYTES)
            for i, value in zip(idx, averaged, strict=True):
                values[i] = value
        values = self._run(what, lambda: values)
        values = [_laid_out_like(v, local) for v, (_, local) in zip(values, flat, strict=True)]
        return _unflatten(flat, values)

    def sum(self, tree: Any, what: str) -> Any:
        """The tree summed over the ranks (in buckets: for small trees, as evaluation sums)."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        values = [v for _, v in flat]
        summed: list[Any] = [None] * len(values)
        for bucket in _buckets(values, _key_order(flat)):
            joined = mx.concatenate([values[i].reshape(-1) for i in bucket])
            total = self._run(what, lambda j=joined: mx.distributed.all_sum(j, group=self.group))
            offsets = np.cumsum([values[i].size for i in bucket])[:-1].tolist()
            for i, part in zip(bucket, mx.split(total, offsets), strict=True):
                summed[i] = part.reshape(values[i].shape)
        return _unflatten(flat, summed)

    def broadcast(self, tree: Any, what: str) -> Any:
        """Rank 0's tree on every rank (the others pass a tree of the same structure, whose
        values are not used): rank 0's values plus zeros, exact. One all-sum per array: it is
        done once, for a resume, and each array keeps a buffer of its own."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        sent: list[Any] = [None] * len(flat)
        for i in _key_order(flat):
            value = flat[i][1] if self.main else mx.zeros_like(flat[i][1])
            total = mx.distributed.all_sum(value, group=self.group)
            sent[i] = self._run(what, lambda t=total: t, setup=True)
        return _unflatten(flat, sent)

    def any(self, flag: bool, what: str, setup: bool = False) -> bool:
        """True on every rank when it is True on any."""
        if self.size == 1:
            return bool(flag)
        vote = mx.array(int(flag))
        total = self._run(what, lambda: mx.distributed.all_sum(vote, group=self.group), setup)
        return int(total.item()) > 0

    def broadcast_json(self, obj: Any, what: str) -> Any:
        """Rank 0's JSON-able object on every rank."""
        if self.size == 1:
            return obj
        data = json.dumps(obj).encode() if self.main else b""
        n = int(self.broadcast(mx.array(len(data), dtype=mx.int64), what).item())
        raw = np.frombuffer(data, dtype=np.uint8) if self.main else np.zeros(n, np.uint8)
        got = self.broadcast(mx.array(raw), what)
        return json.loads(np.array(got).tobytes().decode())

    def same_everywhere(self, text: str, what: str) -> bool:
        """Whether every rank passed the same text (compared by digest)."""
        if self.size == 1:
            return True
        words = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype=np.int32)
        words = mx.array(words)
        hi = self._run(what, lambda: mx.distributed.all_max(words, group=self.group), True)
        lo = self._run(what, lambda: mx.distributed.all_min(words, group=self.group), True)
        return bool(mx.all(hi == lo).item())

    def _run(self, what: str, compute: Callable[[], Any], setup: bool = False) -> Any:
        """Evaluate a collective under the watchdog; a failed one becomes PeerLost."""
        bound = self.setup_timeout_s if setup else self.timeout_s
        env = SETUP_TIMEOUT_ENV if setup else TIMEOUT_ENV
        with self.watchdog.guard(what, bound, env):
            try:
                result = compute()
                mx.eval(result)
            except RuntimeError as err:
                raise PeerLost(
                    f"{self.label}: lost the other ranks during {what} "
                    f"({' '.join(str(err).split())}); another rank ended (its output says "
                    "why) or the network dropped"
                ) from None
        return result


def _laid_out_like(value: mx.array, model: mx.array) -> mx.array:
    """``value`` in the memory order of ``model`` (e.g. a transposed gradient). The bucket
    returns every array in row order, and a reduction (the gradient norm) adds up in memory
    order: without this, one process and two ranks round the same gradients' norm apart."""
    if value.ndim < 2:
        return value
    strides = memoryview(model).strides
    order = sorted(range(value.ndim), key=lambda axis: -strides[axis])  # outermost first
    if order == list(range(value.ndim)):
        return value
    inverse = sorted(range(value.ndim), key=lambda axis: order[axis])
    return mx.contiguous(value.transpose(order)).transpose(inverse)


def _unflatten(flat: list[tuple[str, Any]], values: list[Any]) -> Any:
    return tree_unflatten([(k, v) for (k, _), v in zip(flat, values, strict=True)])


def _key_order(flat: list[tuple[str, Any]]) -> list[int]:
    """Positions of a flattened tree in key order: the same on every rank, whatever order
    its dicts were built in (a restored optimizer state's is not a fresh one's)."""
    return sorted(range(len(flat)), key=lambda i: flat[i][0])


def _buckets(values: list[mx.array], order: list[int]) -> list[list[int]]:
    """The positions ``order`` lists, grouped by dtype into runs of about BUCKET_BYTES."""
    out: list[list[int]] = []
    for dtype in sorted({v.dtype for v in values}, key=str):
        run, size = [], 0
        for i in order:
            if values[i].dtype != dtype:
                continue
            run.append(i)
            size += values[i].nbytes
            if size >= BUCKET_BYTES:
                out.append(run)
                run, size = [], 0
        if run:
            out.append(run)
    return out


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if not value > 0:  # also NaN
        raise TrainingInputError(f"{name}={raw!r}: give a number of seconds above 0")
    return value


# --------------------------------------------------------------------------- the process's group

_CURRENT: Ranks | None = None


def launched_as_rank(environ=os.environ) -> bool:
    """Whether a launcher (mlx.launch, mpirun, a hand-made hostfile) started this process as
    one of several ranks. ``mlx.launch -n 1`` writes an empty hostfile: a process alone."""
    try:
        with open(environ["MLX_HOSTFILE"]) as f:
            if not f.read().strip():
                return False
    except (KeyError, OSError):  # no hostfile, or one that init will report
        pass
    return any(environ.get(name) for name in LAUNCHER_VARIABLES)


def current_ranks() -> Ranks:
    """This process's ranks, joined once (connecting waits for every rank, within the setup
    timeout). Raises TrainingInputError when the launcher's settings cannot form a group."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if not launched_as_rank():
        _CURRENT = Ranks()
        return _CURRENT
    where = f"rank {os.environ.get('MLX_RANK', '?')}"
    _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)  # a bad value is refused before waiting
    group = _join(where, _seconds(SETUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S))
    _CURRENT = Ranks(group)
    return _CURRENT


# mx.distributed.init holds the GIL while it waits for the peers, so no thread of this process
# can end it: a helper process does after ``bound`` seconds, unless its stdin closes first.
_INIT_GUARD = """import os, select, signal, sys
if not select.select([sys.stdin], [], [], float(sys.argv[1]))[0]:
    sys.stderr.write(sys.argv[3]); sys.stderr.flush(); os.kill(int(sys.argv[2]), signal.SIGKILL)
"""


def _join(where: str, bound: float):
    line = (
        f"error: {where}: could not connect to the other ranks within {bound:g} s; check that "
        "every rank was started, the hostfile's addresses and the firewall (set "
        f"{SETUP_TIMEOUT_ENV} to wait longer)\n"
    )
    guard = subprocess.Popen(
        [sys.executable, "-c", _INIT_GUARD, str(bound), str(os.getpid()), line],
        stdin=subprocess.PIPE,
    )
    try:
        return mx.distributed.init(strict=True)
    except (RuntimeError, ValueError) as err:
        raise TrainingInputError(
            f"{where}: cannot join the distributed run ({' '.join(str(err).split())}); "
            "check MLX_HOSTFILE and MLX_RANK, or start every rank with mlx.launch"
        ) from None
    finally:
        guard.stdin.close()
        guard.wait()
