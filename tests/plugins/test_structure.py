"""The decoder-layer finder shared by the layer criteria and layer removal."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import vlprune
from vlprune.adapters.hf.families import describe
from vlprune.adapters.hf.layers import decoder_list
from vlprune.plugins.hookspecs import hookimpl
from vlprune.plugins.layer_similarity import decoder_layers
from vlprune.plugins.structure import find_decoder_layers
from vlprune.testbed.tiny import tiny_model


def _lm(kind: str) -> nn.Module:
    import transformers

    common = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
           "llama_base": (transformers.LlamaConfig, transformers.LlamaModel)}[kind]
    extra = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8,
                 shared_expert_intermediate_size=8) if kind == "qwen2_moe" else {}
    torch.manual_seed(0)
    return cls[1](cls[0](**common, **extra)).eval()


@pytest.mark.parametrize("name", ["clip", "vit", "dinov2", "blip", "vilt", "llava", "llama", "qwen2_moe", "llama_base"])
def test_the_finder_agrees_with_the_family_description(name: str) -> None:
    model = _lm(name) if name in ("llama", "qwen2_moe", "llama_base") else tiny_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = list(describe(model).decoder_layers)
    found = find_decoder_layers(model)
    assert found == expected
    assert (len(found) > 0) == (name in ("blip", "llava", "llama", "qwen2_moe", "llama_base"))
    if found:  # criteria and layer removal see the same layers
        assert decoder_layers(model) == found
        path, container = decoder_list(model)
        assert [f"{path}.{i}" for i in range(len(container))] == found


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.dec = nn.ModuleDict({"stack": nn.ModuleList(
            [nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(4, 4)])}) for _ in range(3)])})


def test_a_pattern_takes_outermost_module_list_elements_and_a_registered_rule_supplies_it() -> None:
    model = _Custom()
    assert find_decoder_layers(model) == []
    # "*stack.*" also matches the experts inside each layer: only the layers themselves count
    assert find_decoder_layers(model, "*stack.*") == ["dec.stack.0", "dec.stack.1", "dec.stack.2"]
    from vlprune.adapters.hf.families import FamilyRule

    rule = FamilyRule("mine", (), (("*", "language"),), decoder="dec.stack.*", match=lambda m: isinstance(m, _Custom))

    class Plugin:
        @hookimpl
        def vlprune_register_families(self) -> list[FamilyRule]:
            return [rule]

    plugin = Plugin()
    vlprune.register(plugin, name="test-structure-decoder")
    try:
        assert find_decoder_layers(model) == ["dec.stack.0", "dec.stack.1", "dec.stack.2"]
        assert decoder_layers(model) == find_decoder_layers(model)
        assert decoder_list(model)[0] == "dec.stack"
    finally:
        vlprune.unregister(plugin)
    assert find_decoder_layers(model) == []
