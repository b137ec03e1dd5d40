"""Evaluation harness of the testbed: ``evaluate(model, task, split="test") -> dict[str, float]``.

Tasks (all numbers are fractions in [0, 1], the same on every run: fixed scenes, eval mode, no
sampling):

* ``"vqa"`` (LLaVA-style generative models): exact-match accuracy of the greedy answer per domain,
  ``math`` and ``general``, on ``n`` test scenes each;
* ``"caption"`` (generative: the LLaVA with the prompt "caption", or the BLIP captioner from the
  image alone): ``bleu4`` and ``cider`` of greedy captions against the generated
  reference caption, with pycocoevalcap's ``Bleu`` and ``Cider`` scorers (CIDEr is reported
  divided by 10 so that it lies in [0, 1], like the other numbers: a perfect caption scores 1.0);
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
from vlprune.plugins.capture import model_device, preserved_mode
from vlprune.testbed.data import DIGIT_WORDS, build_tokenizer, make_scenes, pixel_values, vocab_index

__all__ = ["TASKS", "evaluate", "retrieval", "vqa_accuracy", "caption_scores", "generate_answers", "generate_captions"]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("retrieval", "vqa", "caption")
_EVAL_SEED = 12345


@torch.no_grad()
def retrieval(model: nn.Module, split: str = "test", n: int = 500, batch_size: int = 250) -> dict[str, float]:
    """Image <-> caption recall@1 among ``n`` scenes, and zero-shot top-left digit accuracy."""
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise VLPruneError(f"task 'retrieval' needs a dual encoder (CLIP-like), got {type(model).__name__}")
    tok = build_tokenizer()
    scenes = make_scenes(split, n, seed=_EVAL_SEED)  # type: ignore[arg-type]
    device = model_device(model)

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


def _decode(ids: list[int], words: dict[int, str], stop: set[int]) -> str:
    """The words of ``ids`` up to the first stop token."""
    tokens = []
    for t in ids:
        if t in stop:
            break
        tokens.append(words.get(t, "[UNK]"))
    return " ".join(tokens)


@torch.no_grad()
def generate_answers(model: nn.Module, scenes: list[Any], prompts: list[str], max_new_tokens: int = 20, batch_size: int = 100) -> list[str]:
    """Greedy answers of a testbed LLaVA to ``prompts`` about ``scenes`` (left-padded batches)."""
    from vlprune.testbed.train import lm_example

    vocab = vocab_index()
    words = {i: w for w, i in vocab.items()}
    pad, eos = vocab["[PAD]"], vocab["[EOS]"]
    device = model_device(model)
    answers: list[str] = []
    with preserved_mode(model, training=False):
        for start in range(0, len(scenes), batch_size):
            chunk, texts = scenes[start : start + batch_size], prompts[start : start + batch_size]
            ids = [lm_example(t, None)[0] for t in texts]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                input_ids[i, width - len(x) :] = torch.tensor(x)
                mask[i, width - len(x) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                pixel_values=pixel_values(chunk).to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
            answers.extend(_decode(row, words, {eos, pad}) for row in out[:, width:].tolist())
    return answers


@torch.no_grad()
def generate_captions(model: nn.Module, scenes: list[Any], max_new_tokens: int = 20, batch_size: int = 100) -> list[str]:
    """Greedy captions of a testbed BLIP (``generate(pixel_values)``: starts at ``[BOS]``, stops at ``[SEP]``)."""
    vocab = vocab_index()
    words = {i: w for w, i in vocab.items()}
    stop = {vocab["[SEP]"], vocab["[PAD]"], vocab["[EOS]"]}
    device = model_device(model)
    captions: list[str] = []
    with preserved_mode(model, training=False):
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            out = model.generate(pixel_values=pixel_values(chunk).to(device), max_new_tokens=max_new_tokens, do_sample=False)
            captions.extend(_decode(row[1:], words, stop) for row in out.tolist())  # row[0] is [BOS]
    return captions


def _is_blip_captioner(model: nn.Module) -> bool:
    return hasattr(model, "text_decoder") and hasattr(model, "vision_model") and hasattr(model, "generate")


def vqa_accuracy(model: nn.Module, split: str = "test", n: int = 300) -> dict[str, float]:
    """Exact-match VQA accuracy per domain on ``n`` scenes each."""
    import random

    from vlprune.testbed.data import vqa

    out: dict[str, float] = {}
    for offset, domain in enumerate(("math", "general")):
        scenes = make_scenes(split, n, seed=_EVAL_SEED + 1 + offset)  # type: ignore[arg-type]
        rng = random.Random(_EVAL_SEED + offset)
        qa = [vqa(s, domain, rng) for s in scenes]  # type: ignore[arg-type]
        answers = generate_answers(model, scenes, [f"question {q}" for q, _ in qa], max_new_tokens=4)
        out[domain] = sum(a == truth for a, (_, truth) in zip(answers, qa)) / n
    return out


def caption_scores(model: nn.Module, split: str = "test", n: int = 300) -> dict[str, float]:
    """BLEU-4 and CIDEr (/10) of greedy captions on ``n`` scenes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    scenes = make_scenes(split, n, seed=_EVAL_SEED + 3)  # type: ignore[arg-type]
    if _is_blip_captioner(model):
        captions = generate_captions(model, scenes, max_new_tokens=20)
    else:
        captions = generate_answers(model, scenes, ["caption"] * n, max_new_tokens=17)
    refs = {i: [s.caption()] for i, s in enumerate(scenes)}
    hyps = {i: [c if c else "[EMPTY]"] for i, c in enumerate(captions)}
    bleu = Bleu(4).compute_score(refs, hyps, verbose=0)[0][3]
    cider = Cider().compute_score(refs, hyps)[0]
    return {"bleu4": float(bleu), "cider": float(cider) / 10.0}


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
    if task == "vqa" and _is_blip_captioner(model):
        raise VLPruneError("the testbed BLIP is a captioner: evaluate it with task 'caption'")
    if task in ("vqa", "caption"):
        if not hasattr(model, "generate"):
            raise VLPruneError(f"task {task!r} needs a generative model (LLaVA-like), got {type(model).__name__}")
        return vqa_accuracy(model, split, **kwargs) if task == "vqa" else caption_scores(model, split, **kwargs)
    raise VLPruneError(f"unknown testbed task {task!r}; available: {', '.join(TASKS)} (more arrive with the LLaVA testbed)")
