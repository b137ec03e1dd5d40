"""Training entry points of the testbed: batch formats and the staged LLaVA recipe."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlprune.testbed import checkpoint_dir
from vlprune.testbed.data import make_scenes, vocab_index
from vlprune.testbed.train import blip_batch, main


def test_blip_batch_is_bos_caption_sep_with_masked_padding() -> None:
    scenes = make_scenes("train", 5, seed=3)
    batch = blip_batch(scenes)
    vocab = vocab_index()
    words = {i: w for w, i in vocab.items()}
    for i, scene in enumerate(scenes):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n].tolist()
        assert ids[0] == vocab["[BOS]"] and ids[-1] == vocab["[SEP]"]
        assert " ".join(words[t] for t in ids[1:-1]) == scene.caption()
        assert (batch["labels"][i, :n] == batch["input_ids"][i, :n]).all()
        assert (batch["labels"][i, n:] == -100).all()
    assert batch["pixel_values"].shape == (5, 3, 56, 56)


def test_llava_vqa_stage_from_a_stage1_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "llava"
    assert main(["llava", "--stage1", str(checkpoint_dir("llava")), "--vqa-steps", "2", "--out", str(out)]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["vqa_stage"]["steps"] == 2 and log["stage1_from"] == "checkpoint"
    assert len(log["vqa_stage"]["loss"]) == 2 and log["loss"]  # stage-1 loss curve carried over
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    before = LlavaForConditionalGeneration.from_pretrained(checkpoint_dir("llava"), local_files_only=True)
    changed = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values())]
    assert any(changed)  # two steps were trained
