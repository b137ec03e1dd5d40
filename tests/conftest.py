"""Shared fixtures: seeded tiny models and calibration batches (no downloads)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from vlprune.testbed.tiny import example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def batches_for(family: str, n_batches: int = 4, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Seeded calibration batches for a tiny family."""
    return [example_inputs(family, batch_size=batch_size, seed=100 + i) for i in range(n_batches)]


@pytest.fixture
def clip_model() -> torch.nn.Module:
    return tiny_model("clip")


@pytest.fixture
def llava_model() -> torch.nn.Module:
    return tiny_model("llava")


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmarks(*names: str):
    """Generator for a fixture: the benchmark scripts ``names`` imported from benchmarks/ (their
    siblings, e.g. ``_common``, importable while the fixture lives), in order."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield tuple(importlib.import_module(n) for n in names)
    finally:
        sys.path.remove(str(BENCHMARKS))
