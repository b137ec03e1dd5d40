"""AMP inside Torch-Pruning: AMPEntropyImportance + amp_ratio_dict prune exactly the searched neurons."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp

import vlprune
import vlprune.plugins.amp as amp
from vlprune import VLPruneError
from vlprune.adapters.torch_pruning import AMPEntropyImportance, amp_ratio_dict, hf_pruner_kwargs
from vlprune.testbed.tiny import example_inputs, tiny_model

torch.set_num_threads(1)


def _batches(n: int, b: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": example_inputs("clip", batch_size=b, seed=seed + i)["pixel_values"]} for i in range(n)]


def _prune(model: torch.nn.Module, scores: dict[str, torch.Tensor], widths: dict[str, int],
           example: dict[str, torch.Tensor] | None = None) -> None:
    example = example if example is not None else example_inputs("clip", batch_size=2)
    pruner = tp.pruner.BasePruner(
        model, example, importance=AMPEntropyImportance(scores, model), pruning_ratio=0.0,
        pruning_ratio_dict=amp_ratio_dict(model, widths), global_pruning=False,
        **hf_pruner_kwargs(model, prune_heads=False),
    )
    pruner.step()
    vlprune.sync_hf_model(model)


def test_tp_removes_exactly_the_searched_neurons(tmp_path: object) -> None:
    model = tiny_model("clip")
    scores = amp.neuron_importance(model, _batches(2), tau=0.1, progress=False)
    # ties on purpose: equal scores must still be broken as neuron_order breaks them
    name0 = "vision_model.encoder.layers.0.mlp"
    scores[name0][:10] = 0.0
    widths = {n: k for n, k in zip(scores, (5, 17, 30, 64))}
    keep = {n: amp.neuron_order(scores[n])[:k] for n, k in widths.items()}
    x = _batches(1, 4, seed=50)[0]["pixel_values"]
    with amp.neuron_masks(model, keep):
        masked = model.get_image_features(pixel_values=x).pooler_output
    original = copy.deepcopy(model)
    _prune(model, scores, widths)
    for name, k in widths.items():
        fc1 = model.get_submodule(f"{name}.fc1")
        assert fc1.out_features == k and model.get_submodule(f"{name}.fc2").in_features == k
        kept_rows = torch.sort(keep[name]).values
        torch.testing.assert_close(fc1.weight, original.get_submodule(f"{name}.fc1").weight[kept_rows])
    pruned = model.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-6)
    # the text tower is untouched
    assert model.text_model.encoder.layers[0].mlp.fc1.out_features == original.text_model.encoder.layers[0].mlp.fc1.out_features
    # saves and reloads as a physically smaller model
    vlprune.save_pruned(model, tmp_path)
    again = vlprune.load_pruned(tmp_path)
    torch.testing.assert_close(again.get_image_features(pixel_values=x).pooler_output, pruned, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in original.parameters())


def test_searched_widths_through_tp_on_testbed_clip() -> None:
    from vlprune.testbed import load
    from vlprune.testbed.data import make_scenes, pixel_values

    clip = load("clip")
    cal = [{"pixel_values": pixel_values(make_scenes("train", 32, seed=s))} for s in range(2)]
    val = [{"pixel_values": pixel_values(make_scenes("val", 48, seed=60 + s))} for s in range(2)]
    scores = amp.neuron_importance(clip, cal, tau=1 / 15, progress=False)
    widths = amp.search_widths(clip, scores, val, 5e-3, tau=1 / 15, progress=False)
    keep = {n: amp.neuron_order(scores[n])[:k] for n, k in widths.items()}
    with amp.neuron_masks(clip, keep):
        target = amp.evaluate_objective(clip, val, tau=1 / 15)
    _prune(clip, scores, widths, {"pixel_values": val[0]["pixel_values"][:2], "input_ids": torch.ones(2, 5, dtype=torch.long)})
    assert {n: clip.get_submodule(f"{n}.fc1").out_features for n in widths} == widths
    assert amp.evaluate_objective(clip, val, tau=1 / 15) == pytest.approx(target, abs=1e-5)


def test_gated_mlp_ratio_dict_and_importance() -> None:
    model = tiny_model("llava")
    mlps = [m for m in amp.find_mlps(model).values() if m.gate]
    assert mlps
    name = mlps[0].name
    size = model.get_submodule(mlps[0].down).in_features
    ratios = amp_ratio_dict(model, {name: 3})
    assert set(ratios) == {model.get_submodule(mlps[0].up), model.get_submodule(mlps[0].gate)}
    assert all(int(size * (1 - r)) == 3 for r in ratios.values())
    scores = {name: torch.arange(size, dtype=torch.float32)}
    example = example_inputs("llava", batch_size=2)
    pruner = tp.pruner.BasePruner(
        model, example, importance=AMPEntropyImportance(scores, model), pruning_ratio=0.0,
        pruning_ratio_dict=ratios, global_pruning=False, **hf_pruner_kwargs(model, prune_heads=False),
    )
    pruner.step()
    mlp = model.get_submodule(name)
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 3


def test_bad_input() -> None:
    model = tiny_model("clip")
    with pytest.raises(VLPruneError, match="model"):
        AMPEntropyImportance({})
    with pytest.raises(VLPruneError, match="batches"):
        AMPEntropyImportance(None, model)
    name = "vision_model.encoder.layers.0.mlp"
    with pytest.raises(VLPruneError, match="width"):
        amp_ratio_dict(model, {name: 0})
    # one-shot scores on a layer whose width changed
    scores = {name: torch.rand(model.get_submodule(f"{name}.fc2").in_features)}
    imp = AMPEntropyImportance(scores, model)
    _prune(model, {name: scores[name]}, {name: 8})
    example = example_inputs("clip", batch_size=2)
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.0,
                                  pruning_ratio_dict=amp_ratio_dict(model, {name: 4}), global_pruning=False,
                                  **hf_pruner_kwargs(model, prune_heads=False))
    with pytest.raises(VLPruneError, match="one-shot"):
        pruner.step()


def test_get_criterion_by_name() -> None:
    model = tiny_model("clip")
    imp = vlprune.get_criterion("amp_entropy", adapter="torch_pruning", model=model, batches=_batches(1), tau=0.1)
    assert isinstance(imp, AMPEntropyImportance) and imp.scores
