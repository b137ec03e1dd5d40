"""The committed testbed models load offline and really learned their tasks (fixed seeds)."""

from __future__ import annotations

import pytest

from vlprune.testbed import evaluate, load


@pytest.mark.slow
def test_testbed_clip_retrieves_far_above_chance() -> None:
    model = load("clip")
    scores = evaluate(model, "retrieval", n=500)
    assert scores["i2t_r1"] > 0.4 and scores["t2i_r1"] > 0.4  # chance: 1/500
    assert scores["zeroshot_digit"] > 0.2  # chance: 0.1
    assert evaluate(model, "retrieval", n=500) == scores  # same numbers on every run


@pytest.mark.slow
def test_testbed_llava_answers_and_captions() -> None:
    model = load("llava")
    vqa = evaluate(model, "vqa", n=200)
    assert vqa["math"] > 0.5 and vqa["general"] > 0.6
    caption = evaluate(model, "caption", n=200)
    assert caption["cider"] > 0.8 and caption["bleu4"] > 0.8


@pytest.mark.slow
def test_testbed_blip_captions() -> None:
    model = load("blip")
    caption = evaluate(model, "caption", n=200)
    assert caption["cider"] > 0.8 and caption["bleu4"] > 0.8
    assert evaluate(model, "caption", n=200) == caption
    from vlprune import VLPruneError

    with pytest.raises(VLPruneError, match="captioner"):
        evaluate(model, "vqa", n=10)


@pytest.mark.slow
def test_testbed_llava_deep_answers_and_has_eight_decoder_layers() -> None:
    import vlprune

    model = load("llava-deep")
    assert len(vlprune.describe_model(model).decoder_layers) == 8
    vqa = evaluate(model, "vqa", n=200)
    assert vqa["math"] > 0.5 and vqa["general"] > 0.6
