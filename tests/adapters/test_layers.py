"""remove_layers: decoder layers removed from transformers models (depth pruning).

What a user relies on, each checked against an independent computation where one exists:

- the shallower model equals a model freshly built from a config written out by hand (the smaller
  depth, the kept layers' ``layer_types``) and loaded with the kept layers' weights: identical logits
  and greedy tokens;
- cached and uncached greedy ``generate()`` give the same tokens, and the KV cache has one slot per
  kept layer, of that layer's attention type;
- ``save_pruned`` / ``load_pruned`` and plain ``from_pretrained`` reload it exactly;
- with Torch-Pruning width pruning before or after, all of the above still holds;
- bad input raises a ``VLPruneError`` saying what to do and leaves the model exactly as it was.

Tiny models run in float64 so that greedy decoding has no near-ties between the cached and the
uncached computation.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from vlprune.adapters.hf import layers as layers_mod
from vlprune.adapters.hf.layers import LayerRemoval, remove_layers
from vlprune.adapters.hf.persist import load_pruned, save_pruned
from vlprune.adapters.torch_pruning import hf_pruner_kwargs, prune_hf_model
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

F, S = "full_attention", "sliding_attention"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two threads next to another busy process can be
    100x slower (each generate step waits for the second thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
_LM = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


# --------------------------------------------------------------------------------------------
# models: each builder takes the per-layer attention types, so a reference is built from the
# kept layers' types written out independently of remove_layers
# --------------------------------------------------------------------------------------------


def llama(types: list[str], **kw: Any) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=len(types), **{**_LM, **kw}))


def mistral(types: list[str]) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(num_hidden_layers=len(types), sliding_window=4, **_LM))


def qwen2(types: list[str]) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(num_hidden_layers=len(types), use_sliding_window=True, sliding_window=4, layer_types=list(types), **_LM)
    return Qwen2ForCausalLM(cfg)


def qwen3(types: list[str]) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(num_hidden_layers=len(types), head_dim=8, use_sliding_window=True, sliding_window=4,
                      layer_types=list(types), **_LM)
    return Qwen3ForCausalLM(cfg)


def gemma2(types: list[str]) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(num_hidden_layers=len(types), head_dim=8, sliding_window=4, layer_types=list(types), **_LM)
    return Gemma2ForCausalLM(cfg)


def gemma3(types: list[str]) -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(num_hidden_layers=len(types), head_dim=8, sliding_window=4, layer_types=list(types), **_LM)
    return Gemma3ForCausalLM(cfg)


def llava(types: list[str]) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    cfg = copy.deepcopy(tiny_model("llava").config)
    cfg.text_config.num_hidden_layers = len(types)
    return LlavaForConditionalGeneration(cfg)


def blip(types: list[str]) -> nn.Module:
    from transformers import BlipForConditionalGeneration

    cfg = copy.deepcopy(tiny_model("blip").config)
    cfg.text_config.num_hidden_layers = len(types)
    return BlipForConditionalGeneration(cfg)


def build(builder: Callable[[list[str]], nn.Module], types: list[str], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return builder(types).double().eval()


def text_inputs(batch: int = 2, length: int = 12, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def inputs_for(builder: Callable) -> dict[str, torch.Tensor]:
    if builder in (llava, blip):
        out = example_inputs("llava" if builder is llava else "blip", batch_size=2, seed=3)
        out["pixel_values"] = out["pixel_values"].double()
        return out
    return text_inputs()  # 12 tokens: past the sliding window of 4


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], use_cache: bool, n: int = 8) -> Any:
    extra = {} if hasattr(model, "text_decoder") else {"pad_token_id": 0}  # BLIP sets its own
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                              return_dict_in_generate=True, **extra)


def decoder(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(vlprune.describe_model(model).decoder_layers[0].rpartition(".")[0])


def text_config(model: nn.Module) -> Any:
    return model.config.get_text_config()


def kept_weights(model: nn.Module, path: str, kept: list[int]) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with the layers in ``kept`` renumbered 0..k-1, the others dropped."""
    new = {old: i for i, old in enumerate(kept)}
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    out = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            out[key] = value.clone()
        elif int(m.group(1)) in new:
            out[f"{path}.{new[int(m.group(1))]}.{m.group(2)}"] = value.clone()
    return out


CASES = [  # (builder, per-layer types, layers to remove)
    pytest.param(llama, [F] * 4, [1, 2], id="llama"),
    pytest.param(mistral, [F] * 4, [0, 2], id="mistral-sliding"),
    pytest.param(qwen2, [F, S, F, S, S], [1, 2], id="qwen2-mixed"),
    pytest.param(qwen3, [S, F, S, F], [0, 3], id="qwen3-mixed"),
    pytest.param(gemma2, [S, F, S, F], [1, 2], id="gemma2"),
    pytest.param(gemma3, [S, F, S, S, F], [0, 1], id="gemma3"),
    pytest.param(llava, [F] * 4, [0, 2], id="llava"),
    pytest.param(blip, [F] * 3, [1], id="blip-text-decoder"),
]


# --------------------------------------------------------------------------------------------
# the removed-layer model equals a freshly built smaller one; generation; the cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("builder", "types", "remove"), CASES)
def test_equals_fresh_model_with_kept_weights_and_generates_same_tokens_with_and_without_cache(
    builder: Callable, types: list[str], remove: list[int]
) -> None:
    model = build(builder, types)
    path, _ = layers_mod.decoder_list(model)
    kept = [i for i in range(len(types)) if i not in remove]
    kept_objs = [decoder(model)[i] for i in kept]
    container = decoder(model)
    weights = kept_weights(model, path, kept)

    report = remove_layers(model, remove)

    assert isinstance(report, LayerRemoval) and list(report) == remove and report.kept == tuple(kept)
    assert decoder(model) is container and type(container) is nn.ModuleList  # same container, refilled
    assert all(a is b for a, b in zip(container, kept_objs)) and len(container) == len(kept)
    for j, layer in enumerate(container):
        for module in layer.modules():
            for attr in ("layer_idx", "layer_num"):
                if isinstance(module.__dict__.get(attr), int):
                    assert module.__dict__[attr] == j, (attr, j)
    cfg = text_config(model)
    assert cfg.num_hidden_layers == len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        assert list(cfg.layer_types) == [types[k] for k in kept]
    # the reference: a model built from a config with the kept depth and the kept layers' types
    ref = build(builder, [types[k] for k in kept], seed=1)
    ref.load_state_dict(weights, strict=True)
    inputs = inputs_for(builder)
    assert torch.equal(logits(model, inputs), logits(ref, inputs))
    # generation: cached == uncached == the reference
    cached, uncached = generate(model, inputs, True), generate(model, inputs, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, generate(ref, inputs, True).sequences)
    cache = cached.past_key_values
    self_cache = getattr(cache, "self_attention_cache", cache)
    assert len(self_cache.layers) == len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        assert [layer.is_sliding for layer in self_cache.layers] == [types[k] == S for k in kept]


def test_qwen2_config_lists_and_thresholds_follow_the_kept_layers() -> None:
    """layer_types is sub-selected, max_window_layers counts the kept layers below it, the model's
    has_sliding_layers follows the new types, and the report lists it all."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(num_hidden_layers=5, use_sliding_window=True, sliding_window=4, max_window_layers=3, **_LM)
    assert cfg.layer_types == [F, F, F, S, S]
    model = Qwen2ForCausalLM(cfg).eval()
    report = remove_layers(model, [3, 4, 0])
    assert model.config.layer_types == [F, F] and model.config.max_window_layers == 2
    assert model.model.has_sliding_layers is False
    assert report.config_changes == {"config": {"num_hidden_layers": 2, "max_window_layers": 2, "layer_types": [F, F]}}
    assert report.renumbered == {"model.layers.0.self_attn": {"layer_idx": 0}, "model.layers.1.self_attn": {"layer_idx": 1}}
    fresh = Qwen2ForCausalLM(copy.deepcopy(model.config))
    assert fresh.model.has_sliding_layers is False and fresh.config.layer_types == [F, F]


def test_trained_testbed_llava_generates_the_same_answers_cached_and_uncached() -> None:
    """The testbed LLaVA (4 decoder layers) without layers 1 and 2: greedy answers to VQA prompts
    agree with and without the KV cache, and equal a fresh 2-layer model loaded with layers 0 and 3."""
    from transformers import LlavaForConditionalGeneration

    from vlprune.testbed.data import make_scenes, pixel_values, vocab_index
    from vlprune.testbed.train import lm_example

    model = vlprune.testbed.load("llava")
    weights = kept_weights(model, "model.language_model.layers", [0, 3])
    ref_cfg = copy.deepcopy(model.config)
    ref_cfg.text_config.num_hidden_layers = 2
    scenes = make_scenes("test", 4, seed=7)
    prompts = ["question how many digits", "question what is the sum", "question which digit is largest", "caption"]
    ids = [lm_example(p, None)[0] for p in prompts]
    width, pad = max(len(x) for x in ids), vocab_index()["[PAD]"]
    input_ids = torch.full((len(ids), width), pad)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):  # left padding, as evaluate.generate_answers does
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values(scenes)}

    remove_layers(model, [1, 2], protect_first=1, protect_last=1)

    assert model.config.text_config.num_hidden_layers == 2
    cached, uncached = generate(model, inputs, True, n=4), generate(model, inputs, False, n=4)
    assert torch.equal(cached.sequences, uncached.sequences)
    ref = LlavaForConditionalGeneration(ref_cfg).eval()
    ref.load_state_dict(weights, strict=True)
    assert torch.equal(logits(model, inputs), logits(ref, inputs))
    assert torch.equal(cached.sequences, generate(ref, inputs, True, n=4).sequences)


# --------------------------------------------------------------------------------------------
# save / reload
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("builder", "types", "remove"), [c for c in CASES if c.id in ("qwen2-mixed", "gemma3", "llava", "blip-text-decoder")])
def test_save_pruned_load_pruned_and_from_pretrained_reload_exactly(
    builder: Callable, types: list[str], remove: list[int], tmp_path: Path
) -> None:
    model = build(builder, types).float()
    remove_layers(model, remove)
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs_for(builder).items()}
    expected = logits(model, inputs)
    save_pruned(model, tmp_path / "m")
    marker = json.loads((tmp_path / "m" / "config.json").read_text())["vlprune"]
    shapes = json.loads((tmp_path / "m" / "vlprune_shapes.json").read_text())
    assert shapes["modules"] == {} and marker["from_pretrained"] is True  # the config describes everything
    again = load_pruned(tmp_path / "m")
    assert torch.equal(logits(again, inputs), expected)
    assert text_config(again).num_hidden_layers == len(types) - len(remove)
    plain = type(model).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(plain, inputs), expected)
    assert torch.equal(generate(plain, inputs, True).sequences, generate(model, inputs, True).sequences)


# --------------------------------------------------------------------------------------------
# Torch-Pruning width pruning before or after
# --------------------------------------------------------------------------------------------


def _tp_width(model: nn.Module, family: str) -> None:
    if family == "llava":  # vlprune's one-call flow
        prune_hf_model(model, example_inputs("llava", batch_size=2), tp.importance.GroupMagnitudeImportance(), 0.4,
                       modalities=("language",))
    else:  # a plain Torch-Pruning script, local: every MLP keeps the same width
        pruner = tp.pruner.BasePruner(model, text_inputs(), importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.4, global_pruning=False, **hf_pruner_kwargs(model))
        pruner.step()
        vlprune.sync_hf_model(model, pruner=pruner)


@pytest.mark.parametrize("order", ["width-then-depth", "depth-then-width"])
@pytest.mark.parametrize("family", ["llava", "llama"])
def test_torch_pruning_width_and_layer_removal_in_either_order(family: str, order: str, tmp_path: Path) -> None:
    if family == "llava":
        model = build(llava, [F] * 4).float()
        inputs = example_inputs("llava", batch_size=2, seed=3)
    else:  # GQA: Torch-Pruning prunes the MLPs (hf_pruner_kwargs leaves GQA heads alone)
        model = build(llama, [F] * 4).float()
        inputs = text_inputs()
    n_params = sum(p.numel() for p in model.parameters())
    steps = [lambda: _tp_width(model, family), lambda: remove_layers(model, [1, 2])]
    for step in steps if order == "width-then-depth" else steps[::-1]:
        step()
    assert len(decoder(model)) == 2 and text_config(model).num_hidden_layers == 2
    assert sum(p.numel() for p in model.parameters()) < n_params * 0.7
    mlp_widths = {layer.mlp.up_proj.out_features for layer in decoder(model)}
    assert max(mlp_widths) < 64  # width pruning reached the kept layers
    model.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    cached, uncached = generate(model, inputs, True), generate(model, inputs, False)
    assert torch.equal(cached.sequences, uncached.sequences)
    expected = logits(model, inputs)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert torch.equal(logits(again, inputs), expected)
    assert torch.equal(generate(again, inputs, True).sequences, cached.sequences)
    if family == "llama":  # uniform widths, stated by the config: plain transformers loads it too
        assert json.loads((tmp_path / "m" / "config.json").read_text())["vlprune"]["from_pretrained"] is True
        plain = type(model).from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
        assert torch.equal(logits(plain, inputs), expected)


def test_sync_after_removal_states_a_width_the_kept_layers_now_share(tmp_path: Path) -> None:
    """Width first with per-layer widths (32, 48, 48), then layer 0 removed: sync_hf_model writes
    intermediate_size=48 into the config and plain from_pretrained loads the saved model."""
    model = build(llama, [F] * 3).float()
    first_up = model.model.layers[0].mlp.up_proj
    prune_hf_model(model, text_inputs(), tp.importance.GroupMagnitudeImportance(), 0.25, global_pruning=False,
                   pruning_ratio_dict={first_up: 0.5})
    assert [layer.mlp.up_proj.out_features for layer in model.model.layers] == [32, 48, 48]
    remove_layers(model, [0])
    assert vlprune.sync_hf_model(model) == {"config": {"intermediate_size": 48}}
    save_pruned(model, tmp_path / "m")
    inputs = text_inputs()
    plain = type(model).from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(plain, inputs), logits(model, inputs))


# --------------------------------------------------------------------------------------------
# what layers accepts
# --------------------------------------------------------------------------------------------


def test_layers_by_path_tensor_single_int_and_the_public_reexport() -> None:
    model = tiny_model("llava")
    names = vlprune.describe_model(model).decoder_layers
    assert vlprune.remove_layers(model, [names[1]]).kept == (0,)
    model = build(llama, [F] * 4)
    assert vlprune.remove_layers(model, torch.tensor([3, 1])).removed == (1, 3)
    assert remove_layers(model, 0).kept == (1,)  # layers 0 and 2 of the original
    assert "remove_layers" in vlprune.__all__
    from vlprune.adapters.hf import surgery

    assert surgery.remove_layers is remove_layers and "remove_layers" in surgery.__all__


def test_empty_list_changes_nothing() -> None:
    model = build(llama, [F] * 3)
    before = snapshot(model)
    report = remove_layers(model, [])
    assert report.removed == () and report.num_layers == 3
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------
# bad input: a VLPruneError saying what to do, and the model untouched
# --------------------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "attrs": {n: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
                  for n, m in model.named_modules()},
        "params": {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "config": json.dumps(model.config.to_dict(), sort_keys=True, default=str),
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    assert after["config"] == before["config"]
    assert after["params"].keys() == before["params"].keys()
    assert all(after["params"][k][0] == before["params"][k][0] for k in after["params"])
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in after["state"])


BAD = [  # (layers, kwargs, words the message must contain)
    pytest.param([0, 1, 2, 3], {}, ["all 4 layers", "keep at least one"], id="all-layers"),
    pytest.param([4], {}, ["out of range", "0..3"], id="out-of-range"),
    pytest.param([-1], {}, ["out of range", "last layer is 3"], id="negative"),
    pytest.param([1, 2, 1], {}, ["[1]", "more than once"], id="duplicates"),
    pytest.param([0, 2], {"protect_first": 1}, ["[0]", "protected", "removable are 1..3"], id="protect-first"),
    pytest.param([3], {"protect_last": 2}, ["[3]", "protect_last=2", "lower the protection"],
                 id="protect-last"),
    pytest.param([1.0], {}, ["float", "indices as ints"], id="float-index"),
    pytest.param([True], {}, ["bool", "indices as ints"], id="bool-index"),
    pytest.param(None, {}, ["NoneType", "list of decoder-layer indices"], id="none"),
    pytest.param({1: 2}, {}, ["dict", "list of decoder-layer indices"], id="dict"),
    pytest.param(torch.tensor([1.0]), {}, ["float32", "integer tensor"], id="float-tensor"),
    pytest.param(["model.layers.x"], {}, ["'model.layers.x'", "model.layers.0"], id="bad-name"),
    pytest.param(["lm_head"], {}, ["'lm_head'", "describe_model"], id="not-a-layer"),
    pytest.param([1], {"protect_first": -1}, ["protect_first", ">= 0"], id="negative-protection"),
    pytest.param([1], {"protect_last": 1.5}, ["protect_last", "int"], id="float-protection"),
]


@pytest.mark.parametrize(("layers", "kwargs", "words"), BAD)
def test_bad_input_raises_a_vlprune_error_and_leaves_the_model_untouched(layers: Any, kwargs: dict, words: list[str]) -> None:
    model = build(llama, [F] * 4)
    before = snapshot(model)
    with pytest.raises(VLPruneError) as info:
        remove_layers(model, layers, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_untouched(model, before)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_a_model_without_decoder_layers_is_refused_naming_its_class_and_the_supported_families(family: str) -> None:
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(ModelStructureError) as info:
        remove_layers(model, [0])
    message = str(info.value)
    assert type(model).__name__ in message and "LLaVA" in message and "Llama" in message
    assert "FamilyRule(decoder=" in message
    assert_untouched(model, before)
    with pytest.raises(VLPruneError, match="an nn.Module"):
        remove_layers("not a model", [0])  # type: ignore[arg-type]


def test_dropping_every_layer_of_a_type_is_refused_where_a_module_keeps_per_type_state() -> None:
    """Gemma3's rotary embedding holds frequencies per layer type; without any sliding layer a model
    built from the new config would not have them: refused before anything changes."""
    model = build(gemma3, [S, F, S, F])
    before = snapshot(model)
    with pytest.raises(ModelStructureError, match=r"no sliding_attention layer.*model\.rotary_emb\.layer_types"):
        remove_layers(model, [0, 2])
    assert_untouched(model, before)
    remove_layers(build(qwen2, [F, S, F, S]), [1, 3])  # Qwen2 keeps no per-type state: fine


def test_a_config_that_refuses_the_new_depth_is_reported_before_anything_changes(monkeypatch) -> None:
    """If the per-layer lists were not adjusted, Qwen2's own validate() refuses the config: the
    error names it and nothing changed."""
    model = build(qwen2, [F, S, F, S])
    before = snapshot(model)
    monkeypatch.setattr(layers_mod, "_config_plan", lambda name, cfg, kept, depth: {"num_hidden_layers": len(kept)})
    with pytest.raises(ModelStructureError, match="layer_types"):
        remove_layers(model, [1])
    assert_untouched(model, before)


@pytest.mark.parametrize("builder", [qwen2, llava], ids=["qwen2", "llava"])
def test_a_failure_while_applying_restores_the_model(builder: Callable, monkeypatch) -> None:
    """The last change (a config field) fails after the list was refilled and the layers
    renumbered: everything is undone, module objects included."""
    model = build(builder, [F, S, F, S] if builder is qwen2 else [F] * 4)
    before = snapshot(model)
    real_setattr, target = setattr, text_config(model)

    def failing_setattr(obj: Any, name: str, value: Any) -> None:
        if obj is target and name == "num_hidden_layers":
            raise RuntimeError("simulated failure")
        real_setattr(obj, name, value)

    monkeypatch.setattr(layers_mod, "setattr", failing_setattr, raising=False)
    with pytest.raises(VLPruneError, match="simulated failure.*restored"):
        remove_layers(model, [0, 2])
    assert_untouched(model, before)
    monkeypatch.undo()
    remove_layers(model, [0, 2])  # and the model still works for a real removal
    assert len(decoder(model)) == 2
