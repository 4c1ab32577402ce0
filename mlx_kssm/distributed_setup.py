"""How a run sets itself up and ends on several ranks (the ranks themselves: distributed.py).

Rank 0 alone reads the run folder: it resolves the run's arguments (only its machine need
hold the checkpoint being resumed) and restores the checkpoint, then sends the others what
they lack. Every rank prepares the data (rank 0 first, as ranks on one machine share a token
cache) and checks that all hold the same tokens. Ranks other than 0 print nothing of their
own but their errors, and point to rank 0's output when they stop because it did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .distributed import PeerLost, Ranks, current_ranks
from .trainer import TrainingStopped


def together(ranks: Ranks, what: str, step: Callable[[], Any], main_only: bool = False) -> Any:
    """``step()`` on every rank (or on rank 0 alone), then a vote: where it failed, every rank
    stops at once, the failed ones with their own error, the others with a line pointing to
    them (rather than finding a peer gone at their next collective). Alone: ``step()``."""
    if ranks.size == 1:
        return step()
    result, error = None, None
    if ranks.main or not main_only:
        try:
            result = step()
        except Exception as err:  # noqa: BLE001  (re-raised below, after the vote)
            error = err
    if ranks.any(error is not None, what, setup=True):
        if error is not None:
            raise error
        who = "rank 0" if main_only else "another rank"
        raise TrainingStopped(
            f"{ranks.label}: stopped because {who} failed while {what} (its output says why)"
        )
    return result


def resolve_on_main(resolve: Callable, *args: Any):
    """``resolve(*args) -> (TrainArgs, ModelArgs)`` run by rank 0 alone (only its machine
    need hold the run folder being resumed); the other ranks receive its result."""
    from .config import TrainArgs
    from .models import model_args_from_config

    ranks = current_ranks()
    resolved = together(ranks, "resolving the arguments", lambda: resolve(*args), main_only=True)
    if ranks.size == 1:
        return resolved
    payload = (
        {"train": resolved[0].to_dict(), "model": resolved[1].to_dict()} if ranks.main else None
    )
    payload = ranks.broadcast_json(payload, "sending the run's arguments")
    return TrainArgs.from_dict(payload["train"]), model_args_from_config(payload["model"])


def check_same_data(ranks: Ranks, data) -> None:
    """Every rank must train on the same tokens: a different copy would silently make each
    rank's shard come from a different corpus."""
    from .data import DataError

    head, tail = data.train[:65_536], data.train[-65_536:]
    digest = hashlib.sha256(np.ascontiguousarray(head).tobytes())
    digest.update(np.ascontiguousarray(tail).tobytes())
    mine = f"{data.fingerprint} {data.train.size} {data.valid.size} {digest.hexdigest()}"
    if not ranks.same_everywhere(mine, "comparing the ranks' data"):
        raise DataError(
            f"{ranks.label}: the ranks' training data differ (this rank's: "
            f"{data.train.size:,} + {data.valid.size:,} tokens, fingerprint {data.fingerprint}); "
            "give every machine the same --data"
        )


def sync_from_main(trainer) -> None:
    """Rank 0's weights, optimizer state and loop state on every rank, where they differ (a
    resume: rank 0 alone read the checkpoint; machines of different kinds). Weights built
    from the seed, usually equal everywhere, are kept as built: received, they would come in
    row order where a built one may be a transposed view, and products round by layout."""
    ranks = trainer.dist
    if ranks.size == 1:
        return
    model, optimizer = trainer.model, trainer.optimizer
    optimizer.init(model.trainable_parameters())  # a restored state is kept; same tree everywhere
    layout = [(k, v.shape, str(v.dtype)) for k, v in tree_flatten(model.parameters())]
    layout += [(k, v.shape, str(v.dtype)) for k, v in tree_flatten(optimizer.state)]
    layout.sort()
    if not ranks.same_everywhere(json.dumps(layout), "comparing the ranks' models"):
        raise TrainingStopped(
            f"{ranks.label}: the ranks built different models or optimizer states; run the "
            "same mlx-kssm version on every machine"
        )
    if not ranks.same_everywhere(_digest(model.parameters()), "comparing the ranks' weights"):
        model.update(ranks.broadcast(model.parameters(), "sending rank 0's weights"))
    if not ranks.same_everywhere(_digest(optimizer.state), "comparing the optimizer states"):
        optimizer.state = ranks.broadcast(optimizer.state, "sending rank 0's optimizer state")
    state = ranks.broadcast_json(dataclasses.asdict(trainer.state), "sending the loop state")
    trainer.state = type(trainer.state)(**state)
    mx.eval(model.parameters(), optimizer.state)


def _digest(tree: Any) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(tree_flatten(tree), key=lambda item: item[0]):
        raw = value.view(mx.uint16) if value.dtype == mx.bfloat16 else value  # numpy has none
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(np.array(raw)).tobytes())
    return digest.hexdigest()


class NullLog:
    """The metrics log of a rank that does not write (every rank but 0)."""

    def write(self, row: dict[str, Any]) -> None:
        del row


@contextlib.contextmanager
def follower_errors(ranks: Ranks):
    """On ranks other than 0, a stop that rank 0 also takes (and explains) is reported in a
    short line that points to rank 0's output instead of repeating or guessing its reasons."""
    try:
        yield
    except PeerLost:
        raise
    except TrainingStopped as err:
        if ranks.main or str(err).startswith(ranks.label):  # already this rank's own line
            raise
        raise TrainingStopped(
            f"{ranks.label}: stopped together with rank 0, whose output says why"
        ) from None
