"""Distillation recipe: teacher = unpruned model, student = pruned; label-free; resumable."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlprune.plugins.amp as amp
from vlprune import VLPruneError
from vlprune.recipes.distill import default_features, distill, distill_loss
from vlprune.testbed.tiny import example_inputs, tiny_model

torch.set_num_threads(1)


def _images(step: int, b: int = 8) -> dict[str, torch.Tensor]:
    return {"pixel_values": example_inputs("clip", batch_size=b, seed=1000 + step)["pixel_values"]}


def _pruned_clip(teacher: torch.nn.Module) -> torch.nn.Module:
    """A physically pruned copy: every vision MLP keeps 16 of its neurons."""
    import torch_pruning as tp

    import vlprune
    from vlprune.adapters.torch_pruning import AMPEntropyImportance, amp_ratio_dict, hf_pruner_kwargs

    student = copy.deepcopy(teacher)
    scores = amp.neuron_importance(student, [_images(0)], tau=0.1, progress=False)
    widths = {n: 16 for n in scores}
    tp.pruner.BasePruner(
        student, example_inputs("clip", batch_size=2), importance=AMPEntropyImportance(scores, student),
        pruning_ratio=0.0, pruning_ratio_dict=amp_ratio_dict(student, widths), global_pruning=False,
        **hf_pruner_kwargs(student, prune_heads=False),
    ).step()
    vlprune.sync_hf_model(student)
    return student


def _gap(student: torch.nn.Module, teacher: torch.nn.Module) -> float:
    batch = _images(999, 16)
    with torch.no_grad():
        s, t = default_features(student, batch), default_features(teacher, batch)
    return float(F.mse_loss(s["embed"], t["embed"]) + F.mse_loss(s["tokens"], t["tokens"]))


def test_distill_loss_terms_match_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s = {"embed": torch.randn(3, 4, generator=g), "tokens": torch.randn(3, 5, 4, generator=g),
         "logits": torch.randn(3, 5, 7, generator=g)}
    t = {k: torch.randn(v.shape, generator=g) for k, v in s.items()}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = distill_loss(s, t, embed_weight=0.5, token_weight=2.0, logit_weight=1.5, temperature=2.0, mask=mask)
    e = ((s["embed"] - t["embed"]) ** 2).mean()
    k = ((s["tokens"] - t["tokens"]) ** 2).mean()
    pt, ps = torch.softmax(t["logits"] / 2, -1), torch.softmax(s["logits"] / 2, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    kl = (kl * mask).sum() / mask.sum() * 4.0
    assert float(out["embed"]) == pytest.approx(float(e), rel=1e-5)
    assert float(out["tokens"]) == pytest.approx(float(k), rel=1e-5)
    assert float(out["logits"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(out["total"]) == pytest.approx(float(0.5 * e + 2.0 * k + 1.5 * kl), rel=1e-5)
    with pytest.raises(VLPruneError, match="shape"):
        distill_loss({"embed": torch.zeros(2, 3)}, {"embed": torch.zeros(2, 4)})
    with pytest.raises(VLPruneError, match="no distillation term"):
        distill_loss(s, t, embed_weight=0.0, token_weight=0.0)


def test_distill_closes_the_gap_without_labels_and_leaves_teacher_alone() -> None:
    teacher = tiny_model("clip")
    student = _pruned_clip(teacher)
    before_teacher = copy.deepcopy(teacher.state_dict())
    gap0 = _gap(student, teacher)

    def batches(step: int) -> dict[str, torch.Tensor]:
        batch = _images(step)
        batch["labels"] = torch.full((8,), -5)  # would break any label-based loss: must be ignored
        return batch

    log = distill(student, teacher, batches, steps=40, lr=3e-3, progress=False)
    assert _gap(student, teacher) < 0.5 * gap0
    assert log["loss"][-1][1] < log["loss"][0][1]
    assert set(log["terms"]) == {"embed", "tokens", "total"}
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # flags restored
    assert not student.training and not teacher.training


def test_distill_resumes_exactly(tmp_path: Path) -> None:
    teacher = tiny_model("clip")
    base = _pruned_clip(teacher)
    straight = copy.deepcopy(base)
    distill(straight, teacher, _images, steps=10, lr=1e-3, progress=False)

    resumed = copy.deepcopy(base)
    distill(resumed, teacher, _images, steps=10, lr=1e-3, checkpoint=tmp_path, save_every=3, progress=False)
    # a run that "stopped" after 6 steps, then resumed from its checkpoint in a fresh student
    stopped = copy.deepcopy(base)

    class Stop(Exception):
        pass

    def stopping(step: int) -> dict[str, torch.Tensor]:
        if step == 6:
            raise Stop
        return _images(step)

    ckpt = tmp_path / "second"
    with pytest.raises(Stop):
        distill(stopped, teacher, stopping, steps=10, lr=1e-3, checkpoint=ckpt, save_every=3, progress=False)
    fresh = copy.deepcopy(base)
    log = distill(fresh, teacher, _images, steps=10, lr=1e-3, checkpoint=ckpt, save_every=3, progress=False)
    assert log["start_step"] == 6
    for a, b, c in zip(straight.state_dict().values(), resumed.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    # a finished checkpoint: nothing left to do
    assert distill(fresh, teacher, _images, steps=10, checkpoint=ckpt, progress=False)["start_step"] == 10


def test_distill_bad_input(tmp_path: Path) -> None:
    teacher = tiny_model("clip")
    with pytest.raises(VLPruneError, match="same object"):
        distill(teacher, teacher, _images, steps=2, progress=False)
    student = _pruned_clip(teacher)
    with pytest.raises(VLPruneError, match="steps"):
        distill(student, teacher, _images, steps=0, progress=False)
    # checkpoint of a model of other shapes
    distill(student, teacher, _images, steps=1, checkpoint=tmp_path, progress=False)
    with pytest.raises(VLPruneError, match="other shapes"):
        distill(copy.deepcopy(teacher), teacher, _images, steps=2, checkpoint=tmp_path, progress=False)
    # a student whose embedding width differs from the teacher's
    other = copy.deepcopy(teacher)
    proj = other.visual_projection
    other.visual_projection = torch.nn.Linear(proj.in_features, proj.out_features + 3, bias=False)
    with pytest.raises(VLPruneError, match="shape"):
        distill(other, teacher, _images, steps=1, progress=False)
    # a model with nothing to distil from (a classifier's logits need logit_weight > 0)
    vit = tiny_model("vit")
    with pytest.raises(VLPruneError, match="no embedding"):
        distill(copy.deepcopy(vit), vit, lambda s: {"pixel_values": torch.randn(2, 3, 32, 32)}, steps=1, progress=False)


def test_logit_distillation_on_llava() -> None:
    teacher = tiny_model("llava")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = example_inputs("llava", batch_size=2)
    feats = default_features(student, batch, logits=True)
    assert {"embed", "tokens", "logits"} <= set(feats)
    log = distill(student, teacher, lambda s: batch, steps=15, lr=2e-3, logit_weight=1.0, temperature=2.0, progress=False)
    assert "logits" in log["terms"]
    assert log["loss"][-1][1] < log["loss"][0][1]
