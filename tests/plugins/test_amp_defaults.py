"""AMP's defaults on supported models: image batches are checked, the LLaVA default embedding and
rule keep the model usable, and a degenerate width search is announced with its fix (issue 10,
points 4f and 5)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import vlprune.plugins.amp as amp
from vlprune import DataError
from vlprune.testbed.tiny import example_inputs, tiny_model

torch.set_num_threads(1)


@pytest.mark.parametrize("family", ["clip", "llava", "vit"])
def test_batches_without_pixel_values_name_the_keys_and_the_fix(family: str) -> None:
    model = tiny_model(family)
    batch = {k: v for k, v in example_inputs(family, batch_size=4).items() if k != "pixel_values"}
    if family == "vit":
        batch = {"attention_mask": torch.ones(4, 3)}  # ViT takes images only
    keys = str(sorted(batch))
    with pytest.raises(DataError, match=r"needs image batches with 'pixel_values'.*got keys .*pass embed=") as info:
        amp.neuron_importance(model, [batch], progress=False)
    assert keys in str(info.value)
    with pytest.raises(DataError, match="pixel_values"):
        amp.default_embedding(model, batch)


def test_embed_serves_text_batches() -> None:
    """The fix the message names: embed= for other inputs."""
    model = tiny_model("clip")
    batch = {k: v for k, v in example_inputs("clip", batch_size=4).items() if k != "pixel_values"}

    def text(m: torch.nn.Module, b: dict) -> torch.Tensor:
        return amp.pooled_embedding(m.get_text_features(**b))

    scores = amp.neuron_importance(model, [batch], embed=text, progress=False)
    assert scores and all(n.startswith("text_model") for n in scores)


# ------------------------------------------------------------------ testbed LLaVA
@pytest.fixture(scope="module")
def llava() -> torch.nn.Module:
    from vlprune.testbed import load

    return load("llava")


def _images(split: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed.data import make_scenes, pixel_values

    return [{"pixel_values": pixel_values(make_scenes(split, 32, seed=seed + i))} for i in range(n)]


@pytest.fixture(scope="module")
def readme_widths(llava: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """The README's AMP snippet, as written, on the testbed LLaVA."""
    image_batches, held_out_batches = _images("train", 2, 10_000), _images("val", 2, 20_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = amp.neuron_importance(llava, image_batches, tau=1 / 15, progress=False)
        widths = amp.search_widths(llava, scores, held_out_batches, delta_e=1e-2, tau=1 / 15, progress=False)
    return scores, widths, [str(w.message) for w in caught if "AMP search_widths" in str(w.message)]


def test_llava_default_embedding_keeps_images_apart(llava: torch.nn.Module) -> None:
    batch = _images("val", 1, 20_000)[0]
    with torch.no_grad():
        flat = amp.default_embedding(llava, batch)
        pooled = amp.pooled_embedding(amp.image_output(llava, batch))
        assert flat.shape[0] == 32 and flat.shape[1] > pooled.shape[1]  # tokens x width, per image
        # mean-pooled projected tokens barely differ between images: the entropy is near its maximum
        assert float(amp.entropy_objective(pooled, 1 / 15)) > 0.7 * torch.log(torch.tensor(32.0))
        assert float(amp.entropy_objective(flat, 1 / 15)) < 0.3 * torch.log(torch.tensor(32.0))
    assert amp.default_rule(llava, batch) == "change"
    assert amp.default_rule(tiny_model("clip"), example_inputs("clip", batch_size=4)) == "rise"


def test_readme_default_call_does_not_cut_every_llava_mlp_to_the_minimum(readme_widths, llava) -> None:
    """Before: 6/6/6/6 of 384 (VQA 0.717 / 0.930 -> 0.270 / 0.440), without a word."""
    _, widths, warned = readme_widths
    sizes = {n: amp.hidden_size(llava, amp.find_mlps(llava)[n]) for n in widths}
    assert len(widths) == 4 and all(n.startswith("model.vision_tower") for n in widths)
    assert not warned
    assert sum(widths.values()) < sum(sizes.values())  # it prunes
    assert all(widths[n] > sizes[n] // 64 for n in widths)  # no MLP at the search's minimum


def test_a_degenerate_search_warns_with_the_fix(llava, caplog) -> None:
    """The old default (mean-pooled tokens, rule 'rise') reaches the minimum everywhere: said loudly."""
    def pooled(m: torch.nn.Module, b: dict) -> torch.Tensor:
        return amp.pooled_embedding(amp.image_output(m, b))

    scores = amp.neuron_importance(llava, _images("train", 2, 10_000), tau=1 / 15, embed=pooled, progress=False)
    held_out = _images("val", 2, 20_000)
    with pytest.warns(UserWarning, match=r"every one of the 4 searched MLPs.*rule='change'.*delta_e.*embed="):
        widths = amp.search_widths(llava, scores, held_out, delta_e=1e-2, tau=1 / 15, embed=pooled, rule="rise",
                                   progress=False)
    assert set(widths.values()) == {6}
    assert any("smallest width" in r.getMessage() for r in caplog.records)


def test_a_search_that_prunes_nothing_warns() -> None:
    model = tiny_model("vit")
    batches = [example_inputs("vit", batch_size=4, seed=i) for i in range(2)]
    scores = amp.neuron_importance(model, batches, progress=False)
    with pytest.warns(UserWarning, match=r"pruned nothing.*raise delta_e"):
        widths = amp.search_widths(model, scores, batches, 0.0, rule="change", progress=False)
    assert all(w == 64 for w in widths.values())


@pytest.mark.slow
def test_readme_default_widths_keep_llava_vqa(readme_widths, llava) -> None:
    import random

    import torch_pruning as tp

    import vlprune
    from vlprune.adapters.torch_pruning import AMPEntropyImportance, amp_ratio_dict, hf_pruner_kwargs
    from vlprune.testbed import evaluate
    from vlprune.testbed.data import make_scenes
    from vlprune.testbed.train import llava_batch

    scores, widths, _ = readme_widths
    model = copy.deepcopy(llava)
    example = {k: v for k, v in llava_batch(make_scenes("train", 2, seed=1), random.Random(1)).items() if k != "labels"}
    tp.pruner.BasePruner(model, example, importance=AMPEntropyImportance(scores, model), pruning_ratio=0.0,
                         pruning_ratio_dict=amp_ratio_dict(model, widths), global_pruning=False,
                         **hf_pruner_kwargs(model, prune_heads=False)).step()
    vlprune.sync_hf_model(model)
    dense, pruned = evaluate(llava, "vqa", n=300), evaluate(model, "vqa", n=300)
    assert pruned["math"] > dense["math"] - 0.06 and pruned["general"] > dense["general"] - 0.06, (dense, pruned)
