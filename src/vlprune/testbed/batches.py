"""The one way to feed each testbed model: calibration, training and example batches.

Every data-driven call of vlprune (``estimate_ids``, AMP, PLATON, distillation, Torch-Pruning's
tracing) takes batches that the model accepts as ``model(**batch)``. This module makes them for the
testbed models (``"clip"``, ``"llava"``, ``"llava-deep"``, ``"blip"``, trained checkpoints) and for
the tiny config-built models (``"tiny-clip"``, ``"tiny-llava"``, ``"tiny-vit"``, ...):

* ``"llava"`` (and ``"llava-deep"``, the same with 8 decoder layers): ``input_ids`` holding the
  16 ``<image>`` placeholder tokens the vision tower fills, then the prompt (``caption`` or
  ``question ...``) and the answer; ``attention_mask``; ``pixel_values``; with ``labels=True`` the
  answer tokens as ``labels`` (``model(**b).loss``). A tokenizer alone cannot make these: without
  the placeholders transformers stops with "Image features and image tokens do not match".
* ``"clip"``: ``pixel_values`` and the scene captions (``input_ids``, ``attention_mask``); with
  ``labels=True``, ``return_loss=True`` (the contrastive loss).
* ``"blip"``: ``pixel_values`` and ``[BOS] caption [SEP]``; with ``labels=True``, ``labels``.
* ``images_only=True``: ``pixel_values`` only (AMP's image batches, vision towers).

Example:
    >>> from vlprune.testbed import batches, example_inputs
    >>> calib = batches("llava", n_samples=64, batch_size=32)     # 2 batches, no labels
    >>> sorted(calib[0])
    ['attention_mask', 'input_ids', 'pixel_values']
    >>> sorted(example_inputs("clip"))                          # 2 samples, for tracing
    ['attention_mask', 'input_ids', 'pixel_values']
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from vlprune.errors import DataError, RegistryError

__all__ = ["batches", "example_inputs", "TESTBED_MODELS", "TASKS_OF"]

#: testbed checkpoints this module feeds (the tiny families are ``"tiny-<family>"``)
TESTBED_MODELS: tuple[str, ...] = ("clip", "llava", "llava-deep", "blip")
#: what ``task=`` may be for each testbed model
TASKS_OF: dict[str, tuple[str, ...]] = {
    "clip": ("caption",),
    "llava": ("mixed", "caption", "math", "general"),
    "llava-deep": ("mixed", "caption", "math", "general"),
    "blip": ("caption",),
}
_LLAVA_MIX: dict[str, tuple[float, float, float]] = {
    "caption": (1.0, 0.0, 0.0),
    "math": (0.0, 1.0, 0.0),
    "general": (0.0, 0.0, 1.0),
}
_SPLITS = ("train", "val", "test")

Task = Literal["mixed", "caption", "math", "general"]


def _known() -> str:
    from vlprune.testbed.tiny import TINY_FAMILIES

    return ", ".join([*(repr(m) for m in TESTBED_MODELS), *(repr(f"tiny-{f}") for f in TINY_FAMILIES)])


def _check(model: str, n_samples: int, batch_size: int, split: str) -> None:
    from vlprune.testbed.tiny import TINY_FAMILIES

    if not isinstance(model, str):
        raise RegistryError(
            f"batches() takes the testbed model's name (one of {_known()}), not a {type(model).__name__}; "
            "e.g. batches('llava') for vlprune.testbed.load('llava')"
        )
    if model not in TESTBED_MODELS and model.removeprefix("tiny-") not in TINY_FAMILIES:
        raise RegistryError(f"unknown testbed model {model!r}; choose one of {_known()}")
    for name, value in (("n_samples", n_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    if split not in _SPLITS:
        raise DataError(f"split must be one of {_SPLITS}, got {split!r}")


def _tiny_batch(family: str, size: int, seed: int, labels: bool, images_only: bool) -> dict[str, torch.Tensor]:
    from vlprune.testbed.tiny import example_inputs as tiny_inputs

    batch: dict[str, torch.Tensor | bool] = dict(tiny_inputs(family, batch_size=size, seed=seed))
    if images_only:
        return {"pixel_values": batch["pixel_values"]}  # type: ignore[dict-item]
    if labels:
        if family == "clip":
            batch["return_loss"] = True
        elif family in ("llava", "blip"):
            batch["labels"] = batch["input_ids"].clone()  # type: ignore[union-attr]
        else:
            raise DataError(
                f"the tiny {family} model has no loss to train with (labels=True); use labels=False, "
                "or compute your own loss on its outputs"
            )
    return batch  # type: ignore[return-value]


def batches(
    model: str,
    n_samples: int = 256,
    batch_size: int = 32,
    *,
    split: str = "val",
    task: Task | None = None,
    labels: bool = False,
    images_only: bool = False,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Batches that testbed model ``model`` accepts as ``model(**batch)``.

    Scenes come from the held-out ``split`` (``val`` by default: calibration must not see the test
    scenes that :func:`vlprune.testbed.evaluate` scores); the same arguments give the same batches.

    Args:
        model: ``"clip"``, ``"llava"``, ``"llava-deep"``, ``"blip"`` (``vlprune.testbed.load(name)``) or
            ``"tiny-<family>"`` (``vlprune.testbed.tiny.tiny_model(family)``, random inputs).
        n_samples: samples in all; the last batch holds the remainder.
        batch_size: samples per batch.
        split: ``"train"``, ``"val"`` or ``"test"`` scenes.
        task: LLaVA only: ``"mixed"`` (the training mix of captions, math and general VQA; the
            default), ``"caption"``, ``"math"`` or ``"general"`` (one domain).
        labels: add what makes ``model(**batch).loss`` work (``labels`` / ``return_loss=True``), for
            gradient-based criteria (Taylor, PLATON) and training.
        images_only: ``pixel_values`` only (AMP's image batches).
        seed: seed of the scenes and of the task mix.

    Returns:
        A list of ``ceil(n_samples / batch_size)`` dicts of tensors.

    Raises:
        RegistryError: an unknown model name.
        DataError: a bad count, split or task.

    Example:
        >>> grad_batches = batches("llava", n_samples=64, labels=True)
        >>> model = vlprune.testbed.load("llava")                           # doctest: +SKIP
        >>> model(**grad_batches[0]).loss.backward()                        # doctest: +SKIP
    """
    _check(model, n_samples, batch_size, split)
    sizes = [min(batch_size, n_samples - i) for i in range(0, n_samples, batch_size)]
    if model.startswith("tiny-"):
        if task is not None:
            raise DataError(f"task= is for the testbed LLaVA; the tiny models take random inputs (got task={task!r})")
        family = model.removeprefix("tiny-")
        return [_tiny_batch(family, size, seed * 1000 + i, labels, images_only) for i, size in enumerate(sizes)]
    allowed = TASKS_OF[model]
    if task is not None and task not in allowed:
        raise DataError(f"task={task!r} is not a task of the testbed {model}; choose one of {allowed}")
    from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values
    from vlprune.testbed.train import TASK_MIX, blip_batch, llava_batch

    scenes = make_scenes(split, n_samples, seed=seed)  # type: ignore[arg-type]
    rng = random.Random(seed)
    tok = build_tokenizer() if model == "clip" and not images_only else None
    out: list[dict[str, torch.Tensor]] = []
    start = 0
    for size in sizes:
        chunk = scenes[start : start + size]
        start += size
        if images_only:
            out.append({"pixel_values": pixel_values(chunk)})
            continue
        if model in ("llava", "llava-deep"):
            mix = TASK_MIX if task in (None, "mixed") else _LLAVA_MIX[task]
            batch = llava_batch(chunk, rng, mix=mix)
        elif model == "blip":
            batch = blip_batch(chunk)
        else:
            enc = tok([s.caption() for s in chunk], padding=True, return_tensors="pt")  # type: ignore[misc]
            batch = {"pixel_values": pixel_values(chunk), "input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
            if labels:
                batch["return_loss"] = True  # type: ignore[assignment]
        if not labels:
            batch.pop("labels", None)
        out.append(batch)
    return out


def example_inputs(model: str, batch_size: int = 2, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small batch for tracing (Torch-Pruning's ``example_inputs``) and quick checks.

    Args:
        model: as in :func:`batches`.
        batch_size: samples (2 by default).
        seed: seed of the scenes.

    Returns:
        One dict of tensors without labels.

    Example:
        >>> sorted(example_inputs("llava"))
        ['attention_mask', 'input_ids', 'pixel_values']
    """
    return batches(model, n_samples=batch_size, batch_size=batch_size, seed=seed)[0]

