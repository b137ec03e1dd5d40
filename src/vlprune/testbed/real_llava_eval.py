"""Task numbers of ``llava-real`` on the testbed's fixed evaluation sets, and a blind baseline.

The conventions are the testbed's (:mod:`vlprune.testbed.evaluate`): the same seeds, hence the same
test scenes and questions; greedy decoding; exact match on the answer string. Captions are scored
by exact match, by the fraction of the four (position, digit) pairs named right, and by CIDEr / 10.
:func:`digit_choice_accuracy` is a forced choice among the ten digit words (one forward pass, no
generation): it shows whether the image is read even when free-form answers miss the exact format.
:func:`chance_baseline` gives what a model that never looks at the image scores on the same sets.

Example:
    >>> from vlprune.testbed import real                                          # doctest: +SKIP
    >>> from vlprune.testbed.real_llava_eval import evaluate_llava_real           # doctest: +SKIP
    >>> evaluate_llava_real(real.load("llava-real"), n=100)                       # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlprune.plugins.capture import preserved_mode
from vlprune.testbed.data import DIGIT_WORDS, POSITIONS, Scene, make_scenes, vqa
from vlprune.testbed.real_llava import CAPTION_PROMPT, _ids, answer, llava_real_processor

__all__ = ["eval_questions", "prior_answers", "caption_digits", "digit_choice_accuracy", "evaluate_llava_real", "chance_baseline"]

_EVAL_SEED = 12345  # the testbed's (vlprune.testbed.evaluate): the same test scenes and questions


def eval_questions(domain: str, split: str = "test", n: int = 100) -> tuple[list[Scene], list[str], list[str]]:
    """The testbed's fixed evaluation set of ``domain`` (``"math"`` / ``"general"``): scenes, questions, answers."""
    offset = {"math": 0, "general": 1}[domain]
    scenes = make_scenes(split, n, seed=_EVAL_SEED + 1 + offset)  # type: ignore[arg-type]
    rng = random.Random(_EVAL_SEED + offset)
    qa = [vqa(s, domain, rng) for s in scenes]  # type: ignore[arg-type]
    return scenes, [q for q, _ in qa], [a for _, a in qa]


def prior_answers(questions: Sequence[str], domain: str, n_train: int = 5000) -> list[str]:
    """Blind baseline: for each question, the answer most often right for it on training scenes (no image)."""
    from collections import Counter

    rng = random.Random(7)
    counts: dict[str, Counter] = {}
    for s in make_scenes("train", n_train, seed=4242):
        q, a = vqa(s, domain, rng)  # type: ignore[arg-type]
        counts.setdefault(q, Counter())[a] += 1
    overall = Counter(a for c in counts.values() for a in c.elements()).most_common(1)[0][0]
    return [counts[q].most_common(1)[0][0] if q in counts else overall for q in questions]


def caption_digits(caption: str) -> list[int | None]:
    """The digit named after each of the four positions in ``caption`` (``None`` where absent)."""
    words = caption.replace(",", " , ").split()
    out: list[int | None] = []
    for pos in POSITIONS:
        a, b = pos.split()
        found = None
        for i in range(len(words) - 2):
            if words[i] == a and words[i + 1] == b and words[i + 2] in DIGIT_WORDS:
                found = DIGIT_WORDS.index(words[i + 2])
                break
        out.append(found)
    return out


@torch.no_grad()
def digit_choice_accuracy(model: Any, split: str = "test", n: int = 100, batch_size: int = 16) -> float:
    """Forced choice: for "which digit is at the <position> ?" (positions in turn), the digit word the
    model scores highest for its first answer token, among the ten; chance 0.1. One forward pass per
    batch (no generation), so it measures whether the image is read even when free-form answers miss
    the exact format."""
    scenes = make_scenes(split, n, seed=_EVAL_SEED + 4)  # type: ignore[arg-type]
    prompts = [f"which digit is at the {POSITIONS[i % 4]} ?" for i in range(n)]
    truth = torch.tensor([s.digits[i % 4] for i, s in enumerate(scenes)])
    word_ids = torch.tensor([_ids(w)[0] for w in DIGIT_WORDS])
    proc = llava_real_processor()
    picks = []
    with preserved_mode(model, training=False):
        for i in range(0, n, batch_size):
            logits = model(**proc(scenes[i : i + batch_size], prompts[i : i + batch_size])).logits[:, -1]
            picks.append(logits[:, word_ids].argmax(-1))
    return float((torch.cat(picks) == truth).float().mean())


def evaluate_llava_real(model: Any, split: str = "test", n: int = 100, tasks: Sequence[str] = ("math", "general", "caption", "digit"),
                        batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Task numbers of ``llava-real`` on the testbed's fixed evaluation sets (greedy decoding).

    Args:
        model: :func:`load_llava_real` (or a pruned one / one with token pruning attached).
        split: ``"test"`` (default) or ``"val"``.
        n: scenes per task.
        tasks: any of ``"math"``, ``"general"`` (exact-match VQA accuracy), ``"caption"``, ``"digit"``
            (:func:`digit_choice_accuracy`).
        batch_size: scenes per ``generate`` call.
        progress: tqdm bars.

    Returns:
        ``math`` / ``general``: exact-match accuracy; ``caption_exact``: whole caption right;
        ``caption_digits``: fraction of the four (position, digit) pairs named right;
        ``caption_cider``: CIDEr / 10 as in the testbed (needs pycocoevalcap); ``digit_choice``. All in [0, 1].
    """
    out: dict[str, float] = {}
    for domain in ("math", "general"):
        if domain in tasks:
            scenes, questions, truth = eval_questions(domain, split, n)
            answers = answer(model, scenes, questions, max_new_tokens=6, batch_size=batch_size, progress=progress)
            out[domain] = sum(a == t for a, t in zip(answers, truth)) / n
    if "digit" in tasks:
        out["digit_choice"] = digit_choice_accuracy(model, split, n, batch_size)
    if "caption" in tasks:
        scenes = make_scenes(split, n, seed=_EVAL_SEED + 3)  # type: ignore[arg-type]
        caps = answer(model, scenes, [CAPTION_PROMPT] * n, max_new_tokens=24, batch_size=batch_size, progress=progress)
        out["caption_exact"] = sum(c == s.caption() for c, s in zip(caps, scenes)) / n
        out["caption_digits"] = sum(p == d for c, s in zip(caps, scenes) for p, d in zip(caption_digits(c), s.digits)) / (4 * n)
        try:
            from pycocoevalcap.cider.cider import Cider

            refs = {i: [s.caption()] for i, s in enumerate(scenes)}
            hyps = {i: [c.replace(",", " ,").replace("  ", " ") or "[EMPTY]"] for i, c in enumerate(caps)}
            out["caption_cider"] = float(Cider().compute_score(refs, hyps)[0]) / 10.0
        except ImportError:  # pragma: no cover - a declared dependency of the testbed
            pass
    return out


def chance_baseline(split: str = "test", n: int = 100) -> dict[str, float]:
    """What a blind model scores on the same sets: VQA with :func:`prior_answers`, captions naming
    the most frequent training digit everywhere (digit accuracy about 0.1)."""
    out = {}
    for domain in ("math", "general"):
        _, questions, truth = eval_questions(domain, split, n)
        out[domain] = sum(a == t for a, t in zip(prior_answers(questions, domain), truth)) / n
    scenes = make_scenes(split, n, seed=_EVAL_SEED + 3)  # type: ignore[arg-type]
    train = np.bincount(np.array([s.digits for s in make_scenes("train", 5000, seed=4242)]).ravel(), minlength=10)
    out["caption_digits"] = float(np.mean([d == int(train.argmax()) for s in scenes for d in s.digits]))
    out["caption_exact"] = 0.0
    out["digit_choice"] = 0.1
    return out
