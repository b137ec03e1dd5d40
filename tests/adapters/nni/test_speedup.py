"""shrink: NNI masks -> a really smaller model that computes what the masked model computes.

The reference is independent of shrink: a deep copy of the model with its weights multiplied by
the masks (what NNI's wrappers compute), run on the same inputs with the same random draws.
"""

from __future__ import annotations

import copy
import logging

import pytest

pytest.importorskip("nni")

import torch  # noqa: E402
from nni.compression.pruning import L1NormPruner, LevelPruner  # noqa: E402
from torch import nn  # noqa: E402

from vlprune.adapters.hf.families import describe  # noqa: E402
from vlprune.adapters.hf.persist import load_pruned, save_pruned  # noqa: E402
from vlprune.adapters.nni.speedup import ShrinkReport, head_masks, shrink  # noqa: E402
from vlprune.errors import DataError, ModelStructureError, VLPruneError  # noqa: E402
from vlprune.testbed.tiny import example_inputs, tiny_model  # noqa: E402

FAMILIES = ["clip", "vit", "dinov2", "blip", "vilt", "llava", "siglip"]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating outputs of one forward pass, seeded (ViLT samples patches at random)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        out = model(**inputs)
    found = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            found[key] = value
        elif hasattr(value, "items"):  # CLIP's text_model_output / vision_model_output
            found.update({f"{key}.{k}": v for k, v in value.items()
                          if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return found


def masked_copy(model: nn.Module, masks: dict) -> nn.Module:
    """What NNI's wrappers compute: the weights multiplied by the masks, on a copy."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, targets in masks.items():
            module = twin.get_submodule(name)
            for target, mask in targets.items():
                if mask is not None:
                    getattr(module, target).mul_(mask)
    return twin


def assert_same_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def state(model: nn.Module) -> dict:
    """Everything a failed shrink must leave as it was."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "attrs": {n: {k: v for k, v in vars(m).items() if isinstance(v, (int, float, str, bool, tuple))}
                  for n, m in model.named_modules()},
        "config": model.config.to_dict(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["attrs"] == before["attrs"]
    assert after["config"] == before["config"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def nni_masks(model: nn.Module, ratio: float = 0.5, heads: bool = True) -> dict:
    """Masks a user makes with NNI: MLP neurons (out_channel on the first linears) and whole heads
    (granularity [head_dim, -1], one dependency group per attention) where NNI can align them."""
    info = describe(model)
    config = [{"op_names": [m.up for m in info.mlps], "sparse_ratio": ratio, "granularity": "out_channel"}]
    if heads:
        config += [
            {"op_names": [a.q, a.k, a.v], "sparse_ratio": ratio, "granularity": [a.head_dim, -1],
             "dependency_group_id": f"attention{i}"}
            for i, a in enumerate(info.attentions) if not a.fused and a.num_kv_heads == a.num_heads
        ]
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return masks


def dead_rows(mask: dict) -> int:
    return int((~mask["weight"].bool().any(1)).sum())


def tiny_siglip() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import SiglipConfig, SiglipModel

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, **sizes),
        vision_config=dict(image_size=32, patch_size=8, **sizes),
    )
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 100, (2, 16), generator=generator),
              "pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SiglipModel(config).eval(), inputs


def model_and_inputs(family: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if family == "siglip":
        return tiny_siglip()
    return tiny_model(family), example_inputs(family)


def tiny_llama(kv_heads: int = 2, layers: int = 4) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


LLAMA_INPUTS = {"input_ids": torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))}


def head_mask(linear: nn.Linear, heads: list[int], head_dim: int) -> dict:
    """Whole-head keep-mask of a q/k/v linear, as a user builds it by hand."""
    weight = torch.ones_like(linear.weight)
    for h in heads:
        weight[h * head_dim:(h + 1) * head_dim] = 0
    mask = {"weight": weight}
    if linear.bias is not None:
        mask["bias"] = weight[:, 0].clone()
    return mask


def zero_mask(linear: nn.Linear) -> dict:
    mask = {"weight": torch.zeros_like(linear.weight)}
    if linear.bias is not None:
        mask["bias"] = torch.zeros_like(linear.bias)
    return mask


# ------------------------------------------------------------------------------------------------
# every family: NNI masks of MLP neurons and heads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_nni_masks_shrink_every_family_to_the_masked_model(family: str) -> None:
    model, inputs = model_and_inputs(family)
    masks = nni_masks(model)
    reference = run(masked_copy(model, masks), inputs)
    info = describe(model)
    params = sum(p.numel() for p in model.parameters())

    report = shrink(model, masks, inputs, progress=False)

    assert_same_outputs(reference, run(model, inputs))
    assert report.verified and report.zeros_left == 0 and report.layers == ()
    assert report.params_before == params
    assert report.params_after == sum(p.numel() for p in model.parameters()) < params
    for mlp in info.mlps:  # every masked row of fc1 / up_proj is gone, and only those
        removed = dead_rows(masks[mlp.up])
        assert model.get_submodule(mlp.up).out_features == mlp.hidden - removed
        assert model.get_submodule(mlp.down).in_features == mlp.hidden - removed
        assert report.channels[mlp.up] == removed
    after = {a.name: a for a in describe(model).attentions}
    for att in info.attentions:
        if att.q not in masks:
            assert after[att.name].num_heads == att.num_heads
            continue
        gone = [h for h in range(att.num_heads)
                if not masks[att.q]["weight"][h * att.head_dim:(h + 1) * att.head_dim].any()]
        assert report.heads[att.name] == tuple(gone) and gone
        assert after[att.name].num_heads == att.num_heads - len(gone)
        assert after[att.name].head_dim == att.head_dim


def test_shrunk_clip_saves_and_reloads(tmp_path) -> None:
    model = tiny_model("clip")
    inputs = example_inputs("clip")
    shrink(model, nni_masks(model), inputs, progress=False)
    expected = run(model, inputs)
    save_pruned(model, tmp_path / "clip")
    assert_same_outputs(expected, run(load_pruned(tmp_path / "clip"), inputs))


# ------------------------------------------------------------------------------------------------
# Llama-style decoder with GQA: heads by hand, gated MLP, whole layers, save / reload
# ------------------------------------------------------------------------------------------------


def test_llama_gqa_heads_gate_neurons_and_layers(tmp_path) -> None:
    model = tiny_llama(kv_heads=2, layers=4)
    info = describe(model)
    att = info.attentions[0]  # 4 query heads, 2 key/value heads of 8
    layer0 = model.model.layers[0].self_attn
    masks = {  # key/value head 1 and its query heads 2, 3
        att.q: head_mask(layer0.q_proj, [2, 3], 8),
        att.k: head_mask(layer0.k_proj, [1], 8),
        att.v: head_mask(layer0.v_proj, [1], 8),
    }
    layer2 = model.model.layers[2]  # a whole layer, as LayerSimilarityPruner masks it
    masks["model.layers.2.self_attn.o_proj"] = zero_mask(layer2.self_attn.o_proj)
    masks["model.layers.2.mlp.down_proj"] = zero_mask(layer2.mlp.down_proj)
    gates = [m.gate for m in info.mlps]
    pruner = L1NormPruner(model, [{"op_names": gates, "sparse_ratio": 0.25, "granularity": "out_channel"}])
    _, gate_masks = pruner.compress()
    pruner.unwrap_model()
    masks.update(gate_masks)
    reference = run(masked_copy(model, masks), LLAMA_INPUTS)

    report = shrink(model, masks, LLAMA_INPUTS, progress=False)

    assert_same_outputs(reference, run(model, LLAMA_INPUTS))
    assert report.layers == ("model.layers.2",)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert report.heads == {att.name: (2, 3)}
    first = model.model.layers[0].self_attn
    assert first.q_proj.out_features == 16 and first.k_proj.out_features == 8 and first.o_proj.in_features == 16
    assert first.config.num_attention_heads == 4  # per-layer widths live in the modules, not the config
    # the kept layers 0, 1, 3 lose 12 of 48 neurons each (gate rows); layer 2's masks went with it
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [36, 36, 36]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert report.zeros_left == 0

    save_pruned(model, tmp_path / "llama")
    again = load_pruned(tmp_path / "llama")
    assert_same_outputs(run(model, LLAMA_INPUTS), run(again, LLAMA_INPUTS))
    with torch.no_grad():  # cached generation on the shrunk model equals uncached
        cached = model.generate(**LLAMA_INPUTS, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(**LLAMA_INPUTS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_llava_layer_masks_remove_decoder_layers_without_example_inputs() -> None:
    model = tiny_model("llava")
    inputs = example_inputs("llava")
    layer = model.model.language_model.layers[1]
    masks = {
        "model.language_model.layers.1.self_attn.o_proj": zero_mask(layer.self_attn.o_proj),
        "model.language_model.layers.1.mlp.down_proj": zero_mask(layer.mlp.down_proj),
    }
    reference = run(masked_copy(model, masks), inputs)
    report = shrink(model, masks, progress=False)  # no example inputs: layout only, unverified
    assert report.layers == ("model.language_model.layers.1",) and not report.verified
    assert len(model.model.language_model.layers) == 1 and model.config.text_config.num_hidden_layers == 1
    assert_same_outputs(reference, run(model, inputs))


def test_mha_llama_heads_from_nni_dependency_groups_without_example_inputs() -> None:
    model = tiny_llama(kv_heads=4, layers=2)
    masks = nni_masks(model, ratio=0.5)
    reference = run(masked_copy(model, masks), LLAMA_INPUTS)
    report = shrink(model, masks, progress=False)
    assert_same_outputs(reference, run(model, LLAMA_INPUTS))
    assert all(len(h) == 2 for h in report.heads.values()) and len(report.heads) == 2
    assert all(layer.self_attn.q_proj.out_features == 16 for layer in model.model.layers)


def test_blip_text_decoder_layer_masks_are_kept_as_zeros(caplog: pytest.LogCaptureFixture) -> None:
    """BERT-style layers normalise after the residual sum: masked output projections do not make
    them an identity, so the layer stays (its masked weights zero) and the outputs still agree."""
    model = tiny_model("blip")
    inputs = example_inputs("blip")
    prefix = "text_decoder.bert.encoder.layer.0"
    info = describe(model)
    outs = [a.o for a in info.attentions if a.name.startswith(prefix)] + \
        [m.down for m in info.mlps if m.up.startswith(prefix)]
    masks = {name: zero_mask(model.get_submodule(name)) for name in outs}
    reference = run(masked_copy(model, masks), inputs)
    with caplog.at_level(logging.WARNING, logger="vlprune.adapters.nni.speedup"):
        report = shrink(model, masks, inputs, progress=False)
    assert report.layers == () and len(model.text_decoder.bert.encoder.layer) == 2
    assert report.zeros_left == sum(int(m["weight"].numel() + m["bias"].numel()) for m in masks.values())
    assert "post-norm" in caplog.text and "stay as zeros" in caplog.text
    assert_same_outputs(reference, run(model, inputs))


def test_fine_grained_masks_are_applied_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("vit")
    inputs = example_inputs("vit")
    info = describe(model)
    pruner = LevelPruner(model, [{"op_names": [m.up for m in info.mlps], "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    reference = run(masked_copy(model, masks), inputs)
    params = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="vlprune.adapters.nni.speedup"):
        report = shrink(model, masks, inputs, progress=False)
    zeros = sum(int((t == 0).sum()) for m in masks.values() for t in m.values() if t is not None)
    assert report.zeros_left == zeros > 0 and report.params_after == params
    assert "stay as zeros" in caplog.text
    for name, targets in masks.items():  # the masked weights are zero in the model now
        assert not model.get_submodule(name).weight[targets["weight"] == 0].any()
    assert_same_outputs(reference, run(model, inputs))


def test_empty_masks_change_nothing() -> None:
    model = tiny_model("vit")
    before = state(model)
    report = shrink(model, {}, example_inputs("vit"), progress=False)
    assert isinstance(report, ShrinkReport) and report.params_after == report.params_before
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------------------
# bad input: a VLPruneError saying what to do, and the model untouched
# ------------------------------------------------------------------------------------------------


def test_still_wrapped_model_is_refused() -> None:
    model = tiny_model("vit")
    info = describe(model)
    pruner = L1NormPruner(model, [{"op_names": [info.mlps[0].up], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    _, masks = pruner.compress()
    with pytest.raises(VLPruneError, match=r"unwrap_model\(\) first"):
        shrink(model, masks, example_inputs("vit"), progress=False)
    pruner.unwrap_model()
    assert shrink(model, masks, example_inputs("vit"), progress=False).channels[info.mlps[0].up] == 32


def test_masks_of_another_model_are_refused() -> None:
    vit, clip = tiny_model("vit"), tiny_model("clip")
    masks = nni_masks(vit)
    before = state(clip)
    with pytest.raises(ModelStructureError, match=r"masks name module 'vit\.layers\.0\.attention\.k_proj' \(and 7 more of the 8 masked "
                                                  r"modules\).*CLIPModel.*another model"):
        shrink(clip, masks, example_inputs("clip"), progress=False)
    assert_untouched(clip, before)


def test_masks_of_another_shape_are_refused() -> None:
    model = tiny_model("vit")
    masks = nni_masks(model)
    name = describe(model).mlps[1].up
    masks[name]["weight"] = masks[name]["weight"][:40]
    before = state(model)
    with pytest.raises(ModelStructureError, match=rf"masks\['{name}'\]\['weight'\] has shape \(40, 32\) but .* \(64, 32\)"):
        shrink(model, masks, example_inputs("vit"), progress=False)
    assert_untouched(model, before)


def test_different_heads_in_q_and_k_are_refused() -> None:
    model = tiny_model("clip")
    att = describe(model).attentions[1]
    linears = {p: model.get_submodule(p) for p in (att.q, att.k, att.v)}
    masks = {att.q: head_mask(linears[att.q], [0], 8), att.k: head_mask(linears[att.k], [1], 8),
             att.v: head_mask(linears[att.v], [0], 8)}
    before = state(model)
    with pytest.raises(ModelStructureError, match=rf"attention {att.name}: .*different heads.*dependency_group_id"):
        shrink(model, masks, example_inputs("clip"), progress=False)
    assert_untouched(model, before)


def test_rows_that_are_not_whole_heads_are_refused() -> None:
    model = tiny_model("dinov2")
    att = describe(model).attentions[0]
    config = [{"op_names": [att.q, att.k, att.v], "sparse_ratio": 0.25, "granularity": "out_channel",
               "dependency_group_id": 0}]
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    before = state(model)
    with pytest.raises(ModelStructureError, match=rf"{att.name}: {att.q} masks part of head"):
        shrink(model, masks, example_inputs("dinov2"), progress=False)
    assert_untouched(model, before)


def test_an_emptied_mlp_or_attention_keeps_its_width_with_zeros(caplog: pytest.LogCaptureFixture) -> None:
    """NNI's global_group_id can mask a whole MLP or attention; it cannot be emptied, so it stays
    as zeros (exact) while the other masks still shrink."""
    model = tiny_model("vit")
    inputs = example_inputs("vit")
    info = describe(model)
    masks = nni_masks(model)
    full_mlp, full_att = info.mlps[0], info.attentions[1]
    masks[full_mlp.up] = zero_mask(model.get_submodule(full_mlp.up))
    masks.update({p: zero_mask(model.get_submodule(p)) for p in (full_att.q, full_att.k, full_att.v)})
    reference = run(masked_copy(model, masks), inputs)
    with caplog.at_level(logging.WARNING, logger="vlprune.adapters.nni.speedup"):
        report = shrink(model, masks, inputs, progress=False)
    assert_same_outputs(reference, run(model, inputs))
    assert f"all 64 neurons of the MLP {full_mlp.name}" in caplog.text
    assert f"all 4 heads of the attention {full_att.name}" in caplog.text
    assert model.get_submodule(full_mlp.up).out_features == 64 and full_mlp.up not in report.channels
    assert model.get_submodule(info.mlps[1].up).out_features == 32
    assert full_att.name not in report.heads and len(report.heads[info.attentions[0].name]) == 2
    assert report.zeros_left == 64 * 32 + 64 + 3 * (32 * 32 + 32)


def test_malformed_masks_are_refused() -> None:
    model = tiny_model("vit")
    masks = nni_masks(model)
    name = describe(model).mlps[0].up
    before = state(model)
    with pytest.raises(VLPruneError, match="second item of pruner.compress"):
        shrink(model, (model, masks), progress=False)
    with pytest.raises(VLPruneError, match="must be a dict"):
        shrink(model, [masks], progress=False)
    with pytest.raises(ModelStructureError, match=rf"names 'scale', which is no parameter of {name}"):
        shrink(model, {name: {"scale": torch.ones(3)}}, progress=False)
    half = {name: {"weight": masks[name]["weight"] * 0.5}}
    with pytest.raises(DataError, match="values other than 0 and 1"):
        shrink(model, half, progress=False)
    assert_untouched(model, before)


def test_a_shrink_that_would_change_outputs_is_undone() -> None:
    """An MLP activation with act(0) != 0: removing masked neurons is not exact; the comparison
    with the masked model catches it after the removal, and everything is restored."""
    model = tiny_model("vit")
    model.vit.layers[1].mlp.activation_fn = nn.Sigmoid()
    masks = nni_masks(model)
    before = state(model)
    with pytest.raises(ModelStructureError, match="does not compute what the masked model computes"):
        shrink(model, masks, example_inputs("vit"), progress=False)
    assert_untouched(model, before)
    report = shrink(model, masks, example_inputs("vit"), verify=False, progress=False)  # the user's call
    assert not report.verified and report.params_after < report.params_before


def test_gqa_query_heads_outside_their_key_value_group_are_refused() -> None:
    model = tiny_llama(kv_heads=2, layers=2)
    att = describe(model).attentions[1]
    layer = model.model.layers[1].self_attn
    masks = {att.q: head_mask(layer.q_proj, [1, 2], 8), att.k: head_mask(layer.k_proj, [1], 8),
             att.v: head_mask(layer.v_proj, [1], 8)}
    before = state(model)
    with pytest.raises(ModelStructureError, match=r"grouped-query: 2 query heads per key/value head\): query heads \[1, 2\]"):
        shrink(model, masks, LLAMA_INPUTS, progress=False)
    assert_untouched(model, before)


class _ExtraMLP(nn.Module):
    """A ViT MLP whose hidden units also get another linear's output: fc2(act(fc1(x) + extra(x)))."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = mlp.fc1, mlp.fc2, mlp.activation_fn
        self.extra = nn.Linear(mlp.fc1.in_features, mlp.fc1.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x) + self.extra(x)))


def test_channels_tied_to_unmasked_ones_by_the_dependency_graph_are_refused() -> None:
    """fc1's masked rows are not dead when another linear adds into the same hidden units:
    Torch-Pruning's group ties them, and shrink refuses rather than change the model."""
    model = tiny_model("vit")
    model.vit.layers[0].mlp = _ExtraMLP(model.vit.layers[0].mlp)
    masks = nni_masks(model, heads=False)
    before = state(model)
    with pytest.raises(ModelStructureError, match=r"also remove output channels .* of vit\.layers\.0\.mlp\.extra, "
                                                  r"which the masks keep"):
        shrink(model, masks, example_inputs("vit"), progress=False)
    assert_untouched(model, before)


def test_head_masks_builds_whole_head_masks_that_shrink() -> None:
    model = tiny_model("llava")
    inputs = example_inputs("llava")
    info = describe(model)
    lang = [a for a in info.attentions if a.num_kv_heads != a.num_heads][0]  # 4 query / 2 kv heads
    vision = [a for a in info.attentions if a.num_kv_heads == a.num_heads][0]
    masks = head_masks(model, {lang.name: [0, 1], vision.name: [3]})
    independent = {lang.q: head_mask(model.get_submodule(lang.q), [0, 1], 8),
                   lang.k: head_mask(model.get_submodule(lang.k), [0], 8),
                   lang.v: head_mask(model.get_submodule(lang.v), [0], 8),
                   vision.q: head_mask(model.get_submodule(vision.q), [3], 8),
                   vision.k: head_mask(model.get_submodule(vision.k), [3], 8),
                   vision.v: head_mask(model.get_submodule(vision.v), [3], 8)}
    assert masks.keys() == independent.keys()
    for name, targets in independent.items():
        assert masks[name].keys() == targets.keys()
        for target, mask in targets.items():
            assert torch.equal(masks[name][target], mask), (name, target)
    with pytest.raises(ModelStructureError, match=r"split key/value group\(s\) \[0\].*e\.g\. \[0, 1\]"):
        head_masks(model, {lang.name: [1]})
    with pytest.raises(ModelStructureError, match="has no attention 'model.layers.0.self_attn'"):
        head_masks(model, {"model.layers.0.self_attn": [0]})
    reference = run(masked_copy(model, masks), inputs)
    report = shrink(model, masks, inputs, progress=False)
    assert report.heads == {lang.name: (0, 1), vision.name: (3,)}
    assert_same_outputs(reference, run(model, inputs))
