"""Shared fixtures: tiny model configurations keep the suite fast on a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import pytest

# The suite compares `kssm` subprocesses with in-process runs bit for bit, so both must use one
# BLAS: with the mkl extra installed, `kssm` would otherwise restart itself with Intel MKL
# preloaded (tests/test_blas_preload.py exercises that path on purpose).
os.environ.setdefault("KSSM_MKL", "0")

from mlx_kssm import Model, ModelArgs

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        vocab_size=128,
        hidden_dim=32,
        n_layers=2,
        n_oscillators=16,
        n_harmonics=4,
        max_positions=64,
    )
    return ModelArgs(**{**base, **overrides})


@pytest.fixture
def tiny_model() -> Model:
    mx.random.seed(0)
    model = Model(tiny_args())
    model.eval()
    return model
