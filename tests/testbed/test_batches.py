"""vlprune.testbed.batches: every testbed model runs on its own batches, with and without labels."""

from __future__ import annotations

import pytest
import torch

import vlprune
from vlprune.errors import DataError, RegistryError
from vlprune.testbed import batches, example_inputs, load
from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values
from vlprune.testbed.tiny import TINY_FAMILIES, tiny_model


@pytest.mark.parametrize("name", ["clip", "llava", "blip"])
def test_testbed_models_take_their_batches(name: str) -> None:
    model = load(name)
    calib = batches(name, n_samples=20, batch_size=8)
    assert [len(b["pixel_values"]) for b in calib] == [8, 8, 4]
    assert "labels" not in calib[0] and "return_loss" not in calib[0]
    with torch.no_grad():
        model(**calib[0])
        model(**example_inputs(name))
    loss = model(**batches(name, n_samples=8, labels=True)[0]).loss
    assert loss is not None and torch.isfinite(loss)
    assert set(batches(name, 4, images_only=True)[0]) == {"pixel_values"}


def test_batches_are_deterministic_and_held_out() -> None:
    a, b = batches("llava", 16, seed=3), batches("llava", 16, seed=3)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    test = batches("llava", 16, split="test", seed=3)
    assert not torch.equal(a[0]["pixel_values"], test[0]["pixel_values"])


def test_llava_task_selects_the_domain() -> None:
    from vlprune.testbed.data import vocab_index

    vocab = vocab_index()
    caption = batches("llava", 8, task="caption")[0]["input_ids"]
    math = batches("llava", 8, task="math")[0]["input_ids"]
    assert (caption == vocab["caption"]).any(dim=1).all()
    assert (math == vocab["question"]).any(dim=1).all()
    with pytest.raises(DataError, match="choose one of"):
        batches("clip", 8, task="math")


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_models_take_their_batches(family: str) -> None:
    model = tiny_model(family)
    with torch.no_grad():
        model(**batches(f"tiny-{family}", 6, batch_size=4)[1])


def test_bad_names_and_counts_say_what_to_do() -> None:
    with pytest.raises(RegistryError, match="'llava'"):
        batches("lava")
    with pytest.raises(RegistryError, match="name"):
        batches(load("clip"))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="n_samples"):
        batches("clip", 0)


def test_a_tokenizer_only_llava_batch_fails_with_the_fix() -> None:
    """The route that fails in transformers ("Image features and image tokens do not match") now
    names the batch, the missing image tokens and the helper that works."""
    model = load("llava")
    scenes = make_scenes("val", 4)
    enc = build_tokenizer()([s.caption() for s in scenes], padding=True, return_tensors="pt")
    bad = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "pixel_values": pixel_values(scenes)}
    with pytest.raises(vlprune.DataError, match=r"vlprune.testbed.batches\('llava'\)") as info:
        vlprune.estimate_ids(model, [bad], n_samples=4, progress=False)
    assert "image token" in str(info.value) and "input_ids: int64(4," in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
