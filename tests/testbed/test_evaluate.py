"""The testbed evaluation harness: metric definitions checked with oracle and shuffled encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlprune import VLPruneError
from vlprune.testbed import evaluate
from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values


class _OracleDualEncoder(nn.Module):
    """Maps each test image and its caption to the same random vector (a perfect retriever);
    with ``shuffle`` the images get a wrong caption's vector instead."""

    def __init__(self, shuffle: bool = False) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tok = build_tokenizer()
        scenes = make_scenes("test", 500, seed=12345)
        g = torch.Generator().manual_seed(0)
        captions = sorted({s.caption() for s in scenes})
        self.vec = {c: torch.randn(64, generator=g) for c in captions}
        order = list(range(len(scenes)))
        if shuffle:
            order = order[1:] + order[:1]
        self.by_image = {
            pixel_values([s])[0].numpy().tobytes(): self.vec[scenes[j].caption()] for s, j in zip(scenes, order)
        }

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.by_image[p.numpy().tobytes()] for p in pixel_values])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
        g = torch.Generator().manual_seed(1)
        return torch.stack([self.vec.get(t, torch.randn(64, generator=g)) for t in texts])


def test_perfect_retriever_scores_one_and_shuffled_scores_near_chance() -> None:
    perfect = evaluate(_OracleDualEncoder(), "retrieval")
    assert perfect["i2t_r1"] == 1.0 and perfect["t2i_r1"] == 1.0
    assert set(perfect) == {"i2t_r1", "t2i_r1", "zeroshot_digit"}
    shuffled = evaluate(_OracleDualEncoder(shuffle=True), "retrieval")
    assert shuffled["i2t_r1"] < 0.02 and shuffled["t2i_r1"] < 0.02


def test_unknown_task_and_wrong_model_are_clear_errors() -> None:
    with pytest.raises(VLPruneError, match="unknown testbed task"):
        evaluate(nn.Linear(2, 2), "poetry")
    with pytest.raises(VLPruneError, match="dual encoder"):
        evaluate(nn.Linear(2, 2), "retrieval")


class _OracleCaptioner(nn.Module):
    """A fake generative model: answers the 'caption' prompt with the scene's true caption (or,
    with ``shift``, another scene's), and every question with nothing."""

    def __init__(self, shift: bool = False) -> None:
        super().__init__()
        from vlprune.testbed.data import vocabulary

        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = {w: i for i, w in enumerate(vocabulary())}
        self.shift = shift
        self.scenes = {pixel_values([s])[0].numpy().tobytes(): s for s in make_scenes("test", 300, seed=12345 + 3)}
        self.order = list(self.scenes.values())

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, **kwargs):
        rows = []
        for ids, pixels in zip(input_ids.tolist(), pixel_values):
            scene = self.scenes.get(pixels.numpy().tobytes())
            words: list[str] = []
            if scene is not None and ids[-2] == self.vocab["caption"]:
                if self.shift:
                    scene = self.order[(self.order.index(scene) + 1) % len(self.order)]
                words = scene.caption().split()
            new = [self.vocab[w] for w in words][:max_new_tokens] + [self.vocab["[EOS]"]]
            rows.append(ids + new + [self.vocab["[PAD]"]] * (max_new_tokens + 1 - len(new)))
        return torch.tensor(rows)


def test_caption_metrics_perfect_and_wrong_captioner() -> None:
    perfect = evaluate(_OracleCaptioner(), "caption")
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] == pytest.approx(1.0, abs=1e-6)
    wrong = evaluate(_OracleCaptioner(shift=True), "caption")
    assert wrong["cider"] < 0.6 and wrong["bleu4"] < perfect["bleu4"]
    vqa = evaluate(_OracleCaptioner(), "vqa", n=20)
    assert vqa == {"math": 0.0, "general": 0.0}


def test_vqa_and_caption_run_on_an_untrained_llava() -> None:
    from transformers import LlavaForConditionalGeneration

    from vlprune.testbed.train import llava_config

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config()).eval()
    scores = evaluate(model, "vqa", n=8)
    assert set(scores) == {"math", "general"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert set(evaluate(model, "caption", n=8)) == {"bleu4", "cider"}
