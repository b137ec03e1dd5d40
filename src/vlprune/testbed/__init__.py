"""The embedded default: real-digit vision-language tasks, small models the project trained itself,
and an evaluation harness.

    >>> from vlprune.testbed import load, evaluate
    >>> model = load("clip")                      # offline, from the checkpoints in this package
    >>> evaluate(model, "retrieval")              # doctest: +SKIP
    >>> calib = batches("clip", n_samples=64)      # what model(**batch) takes, for every testbed model
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlprune.errors import RegistryError
from vlprune.testbed.batches import batches, example_inputs
from vlprune.testbed.evaluate import TASKS, evaluate

__all__ = ["CHECKPOINTS", "MODELS", "TASKS", "load", "evaluate", "checkpoint_dir", "batches", "example_inputs"]

CHECKPOINTS = Path(__file__).parent / "checkpoints"
MODELS: dict[str, str] = {
    "clip": "CLIPModel",
    "llava": "LlavaForConditionalGeneration",
    "llava-deep": "LlavaForConditionalGeneration",
    "blip": "BlipForConditionalGeneration",
}


def checkpoint_dir(name: str) -> Path:
    """Directory of the committed checkpoint ``name``."""
    if name not in MODELS:
        raise RegistryError(f"unknown testbed model {name!r}; available: {', '.join(MODELS)}")
    path = CHECKPOINTS / name
    if not (path / "config.json").is_file():
        raise RegistryError(
            f"testbed checkpoint {name!r} is missing at {path}; rebuild it with python -m vlprune.testbed.train {name}"
        )
    return path


def load(name: str) -> nn.Module:
    """Load testbed model ``name`` (offline, eval mode)."""
    import transformers

    path = checkpoint_dir(name)
    return getattr(transformers, MODELS[name]).from_pretrained(path, local_files_only=True).eval()
