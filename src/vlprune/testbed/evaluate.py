"""Evaluation harness of the testbed: ``evaluate(model, task, split="test") -> dict[str, float]``.

Tasks (all numbers are fractions in [0, 1], the same on every run: fixed scenes, eval mode, no
sampling):

* ``"retrieval"`` (CLIP-style dual encoders): ``i2t_r1`` / ``t2i_r1``, recall@1 of image-to-caption
  and caption-to-image retrieval among ``n`` test scenes (chance = 1 / n), and ``zeroshot_digit``,
  zero-shot accuracy of naming the top-left digit with prompts "top left <digit>".

Example:
    >>> from vlprune.testbed import evaluate, load
    >>> evaluate(load("clip"), "retrieval")          # doctest: +SKIP
    {'i2t_r1': 0.9..., 't2i_r1': 0.9..., 'zeroshot_digit': 0.9...}
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vlprune.errors import VLPruneError
from vlprune.plugins.capture import preserved_mode
from vlprune.testbed.data import DIGIT_WORDS, build_tokenizer, make_scenes, pixel_values

__all__ = ["TASKS", "evaluate", "retrieval"]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("retrieval",)
_EVAL_SEED = 12345


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def retrieval(model: nn.Module, split: str = "test", n: int = 500, batch_size: int = 250) -> dict[str, float]:
    """Image <-> caption recall@1 among ``n`` scenes, and zero-shot top-left digit accuracy."""
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise VLPruneError(f"task 'retrieval' needs a dual encoder (CLIP-like), got {type(model).__name__}")
    tok = build_tokenizer()
    scenes = make_scenes(split, n, seed=_EVAL_SEED)  # type: ignore[arg-type]
    device = _device(model)

    def embed_images(chunk: list[Any]) -> torch.Tensor:
        out = model.get_image_features(pixel_values=pixel_values(chunk).to(device))
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def embed_texts(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, padding=True, return_tensors="pt").to(device)  # type: ignore[operator]
        out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        out = getattr(out, "pooler_output", out)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    with preserved_mode(model, training=False):
        images = torch.cat([embed_images(scenes[i : i + batch_size]) for i in range(0, n, batch_size)])
        captions = [s.caption() for s in scenes]
        texts = torch.cat([embed_texts(captions[i : i + batch_size]) for i in range(0, n, batch_size)])
        prompts = embed_texts([f"top left {w}" for w in DIGIT_WORDS])
    sims = images @ texts.T
    same = torch.tensor([[a == b for b in captions] for a in captions])  # identical captions count as hits
    i2t = same[torch.arange(n), sims.argmax(dim=1)].float().mean().item()
    t2i = same[sims.argmax(dim=0), torch.arange(n)].float().mean().item()
    truth = torch.tensor([s.digits[0] for s in scenes])
    zeroshot = ((images @ prompts.T).argmax(dim=1) == truth).float().mean().item()
    return {"i2t_r1": i2t, "t2i_r1": t2i, "zeroshot_digit": zeroshot}


def evaluate(model: nn.Module, task: str, split: str = "test", **kwargs: Any) -> dict[str, float]:
    """Evaluate ``model`` on a testbed task.

    Args:
        model: a testbed model (or a pruned one).
        task: one of :data:`TASKS`.
        split: ``"val"`` or ``"test"`` (scenes from that split's digit images).
        **kwargs: task options (e.g. ``n`` scenes).

    Returns:
        metric name -> value in [0, 1].
    """
    if task == "retrieval":
        return retrieval(model, split, **kwargs)
    raise VLPruneError(f"unknown testbed task {task!r}; available: {', '.join(TASKS)} (more arrive with the LLaVA testbed)")
