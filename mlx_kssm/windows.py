"""Training windows: non-overlapping slices of the token stream, and the seeded order in which
they are read (one permutation per epoch, so a data position is just a count of windows)."""

from __future__ import annotations

import numpy as np


def as_windows(tokens: np.ndarray, seq_length: int) -> np.ndarray:
    """Non-overlapping windows of seq_length + 1 tokens: (n_windows, seq_length + 1), a view."""
    n = tokens.size // (seq_length + 1)
    return tokens[: n * (seq_length + 1)].reshape(n, seq_length + 1)


class DataOrder:
    """The order in which training windows are read: a fresh permutation per epoch, drawn
    from (seed, epoch), so that any position can be recomputed from the seed alone."""

    def __init__(self, n_windows: int, seed: int):
        if n_windows <= 0:
            raise ValueError("no training windows")
        self.n_windows, self.seed = n_windows, seed
        self._epoch, self._perm = -1, None

    def window_ids(self, position: int, count: int) -> np.ndarray:
        """The window indices at data positions position .. position + count - 1."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, index = divmod(position + i, self.n_windows)
            out[i] = self._permutation(epoch)[index]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.n_windows)
        return self._perm


def eval_window_ids(n_windows: int, count: int) -> np.ndarray:
    """A fixed set of validation windows, spread evenly over the validation split."""
    count = min(count, n_windows)
    return np.unique(np.linspace(0, n_windows - 1, count).round().astype(np.int64))
