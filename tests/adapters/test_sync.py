"""sync_hf_model: how many heads a pruned attention holds, decided from Torch-Pruning's pruner or
from the shapes, and config fields that keep their declared types.

Correctness is checked against the independent reference of test_surgery.py: the unpruned model
with the removed heads / head dimensions / neurons zeroed (``masked_reference``). A wrong head
count or head_dim reshapes the queries into the wrong heads and breaks that equality.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from tests.adapters.test_surgery import masked_reference, outputs, sharpen
from vlprune.adapters.torch_pruning import hf_pruner_kwargs, prune_hf_model
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# a plain Torch-Pruning script on the tiny ViT (tp's own defaults unless stated)
# --------------------------------------------------------------------------------------------


def vit_pruner(model: nn.Module, ratio: float, *, heads: bool = True, residual: bool = False, **kw: Any) -> Any:
    """``tp.pruner.BasePruner`` as a Torch-Pruning user writes it for a ViT.

    ``heads``: pass ``num_heads`` for every q/k/v linear (tp's default then prunes head dims).
    ``residual``: only the classifier is ignored, so tp also narrows the residual stream;
    otherwise only q/k/v and fc1 are roots (what ``masked_reference`` can reproduce).
    """
    layers = model.vit.layers
    num_heads = {}
    if heads:
        num_heads = {
            lin: layer.attention.num_attention_heads
            for layer in layers
            for lin in (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj)
        }
    if residual:
        ignored = [model.classifier]
    else:
        roots = {id(m) for layer in layers for m in (layer.attention.q_proj, layer.attention.k_proj,
                                                      layer.attention.v_proj, layer.mlp.fc1)}
        ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in roots]
    return tp.pruner.BasePruner(
        model, example_inputs("vit"), importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=ratio,
        num_heads=num_heads, ignored_layers=ignored, output_transform=lambda out: out.logits, **kw,
    )


def attention_attrs(model: nn.Module) -> list[tuple[int, int]]:
    return [(layer.attention.num_attention_heads, layer.attention.head_dim) for layer in model.vit.layers]


def assert_close_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_pruner_gives_the_head_counts_when_tp_pruned_heads_and_head_dims() -> None:
    """prune_num_heads=True and prune_head_dims=True at once: 4 heads of 8 -> 2 heads of 5. No
    shape rule can tell that from 10 channels; tp's pruner.num_heads can."""
    model = sharpen(tiny_model("vit"))
    original = copy.deepcopy(model)
    pruner = vit_pruner(model, 0.3, prune_num_heads=True, head_pruning_ratio=0.5)
    pruner.step()
    reference = masked_reference(original, model, "head_dim")  # removed heads and head dims zeroed
    guess = copy.deepcopy(model)
    with pytest.raises(ModelStructureError, match=r"sync_hf_model\(model, pruner=pruner\)"):
        vlprune.sync_hf_model(guess)
    assert attention_attrs(guess) == [(4, 8), (4, 8)]  # a failed sync changes nothing
    record = vlprune.sync_hf_model(model, pruner=pruner)
    assert record["vit.layers.0.attention"] == {"num_attention_heads": 2, "head_dim": 5}
    for layer in model.vit.layers:
        att = layer.attention
        assert att.num_attention_heads == pruner.num_heads[att.q_proj] == 2
        assert att.num_attention_heads * att.head_dim == att.q_proj.out_features
    assert_close_outputs(outputs(model, "vit"), outputs(reference, "vit"))
    assert vlprune.sync_hf_model(model, pruner=pruner) == {}


def test_pruner_resolves_what_the_shapes_cannot(caplog) -> None:
    """tp's defaults with num_heads narrow every head: 8 -> 4 dims, 16 channels, which whole heads
    (2 of 8) explain too. Without the pruner sync takes whole heads and warns; with it, it is right."""
    model = sharpen(tiny_model("vit"))
    original = copy.deepcopy(model)
    pruner = vit_pruner(model, 0.5)
    assert (pruner.prune_num_heads, pruner.prune_head_dims) == (False, True)  # Torch-Pruning's defaults
    pruner.step()
    assert model.vit.layers[0].attention.q_proj.out_features == 16
    reference = masked_reference(original, model, "head_dim")
    guess = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="vlprune"):
        vlprune.sync_hf_model(guess)
    assert attention_attrs(guess) == [(2, 8), (2, 8)]
    assert any("pruner=pruner" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    vlprune.sync_hf_model(model, pruner=pruner)
    assert attention_attrs(model) == [(4, 4), (4, 4)]
    assert_close_outputs(outputs(model, "vit"), outputs(reference, "vit"))


def test_plain_tp_script_with_default_head_settings_then_sync_without_arguments(tmp_path) -> None:
    """The Torch-Pruning README flow on a ViT: num_heads, tp's default head settings, only the
    classifier ignored (so the residual stream narrows too), then ``sync_hf_model(model)``."""
    model, twin = tiny_model("vit"), tiny_model("vit")
    pruner, twin_pruner = vit_pruner(model, 0.3, residual=True), vit_pruner(twin, 0.3, residual=True)
    pruner.step()
    twin_pruner.step()
    widths = {layer.attention.q_proj.out_features for layer in model.vit.layers}
    assert widths == {20}  # 4 heads of 5: no multiple of 8, so the shapes say "head dims"
    record = vlprune.sync_hf_model(model)
    assert record == vlprune.sync_hf_model(twin, pruner=twin_pruner)  # what the pruner says, too
    assert attention_attrs(model) == [(4, 5), (4, 5)] and record["config"]["hidden_size"] == 22
    with torch.no_grad():
        logits = model(**example_inputs("vit", batch_size=3)).logits
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    # the synced model is what a model rebuilt from its config and the shape record computes
    vlprune.save_pruned(model, tmp_path / "vit")
    again = vlprune.load_pruned(tmp_path / "vit")
    assert attention_attrs(again) == [(4, 5), (4, 5)]
    assert torch.equal(outputs(again, "vit")["logits"], outputs(model, "vit")["logits"])


@pytest.mark.parametrize("with_pruner", [False, True])
def test_qkv_pruned_without_num_heads_says_what_happened_and_what_to_do(with_pruner: bool) -> None:
    """A plain tp script without num_heads cuts 32 -> 22 query channels: neither heads of 8 nor 4
    heads of one size. The error names the cause and the fix; the model is left as it was."""
    model = tiny_model("vit")
    pruner = vit_pruner(model, 0.3, heads=False, residual=True, global_pruning=False)
    pruner.step()
    assert model.vit.layers[0].attention.q_proj.out_features == 22
    config = model.config.to_dict()
    with pytest.raises(ModelStructureError) as info:
        vlprune.sync_hf_model(model, **({"pruner": pruner} if with_pruner else {}))
    message = str(info.value)
    assert "was not told this attention's head layout" in message
    assert "hf_pruner_kwargs(model)" in message and "num_heads=" in message
    assert attention_attrs(model) == [(4, 8), (4, 8)] and model.config.to_dict() == config


def test_pruner_argument_errors() -> None:
    model = tiny_model("vit")
    with pytest.raises(VLPruneError, match="num_heads"):
        vlprune.sync_hf_model(model, pruner=object())
    pruner = vit_pruner(model, 0.5)
    pruner.step()
    stale = {m: 3 for m in pruner.num_heads}  # head counts that do not describe the model
    fake = type("FakePruner", (), {"num_heads": stale})()
    with pytest.raises(ModelStructureError, match="pass the pruner that pruned this model"):
        vlprune.sync_hf_model(model, pruner=fake)
    assert attention_attrs(model) == [(4, 8), (4, 8)]


# --------------------------------------------------------------------------------------------
# the README's Torch-Pruning section on the trained testbed models
# --------------------------------------------------------------------------------------------


def _testbed_outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    keys = ("logits_per_image", "text_embeds", "image_embeds", "logits")
    return {k: getattr(out, k) for k in keys if isinstance(getattr(out, k, None), torch.Tensor)}


@pytest.mark.parametrize("name", ["clip", "llava"])
def test_readme_flow_on_the_testbed_syncs_with_and_without_the_pruner(name: str, caplog) -> None:
    """``BasePruner(..., head_pruning_ratio=0.4, **hf_pruner_kwargs(model))``, ``step()``, then
    ``sync_hf_model(model)`` or ``sync_hf_model(model, pruner=pruner)``: same bookkeeping, and the
    model computes what the unpruned one computes with the removed heads and neurons zeroed."""
    from vlprune.testbed import load
    from vlprune.testbed.batches import example_inputs as testbed_inputs

    model = load(name)
    inputs = testbed_inputs(name)
    original = copy.deepcopy(model)
    pruner = tp.pruner.BasePruner(model, inputs, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.4, head_pruning_ratio=0.4, global_pruning=True,
                                  **hf_pruner_kwargs(model))
    pruner.step()
    reference = masked_reference(original, model, "heads")
    plain = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="vlprune"):
        record_plain = vlprune.sync_hf_model(plain)
    record = vlprune.sync_hf_model(model, pruner=pruner)
    assert record == record_plain and any(a.get("num_heads") for a in record.values())
    want = _testbed_outputs(reference, inputs)
    for got in (_testbed_outputs(model, inputs), _testbed_outputs(plain, inputs)):
        assert_close_outputs(got, want)


# --------------------------------------------------------------------------------------------
# config fields keep their declared types
# --------------------------------------------------------------------------------------------


def _check_config_types(cfg: Any) -> None:
    """Every field of ``cfg`` (and of its sub-configs) passes its declared type's validator."""
    validators = getattr(type(cfg), "__validators__", {})
    for field in dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ():
        for check in validators.get(field.name, []):
            check(getattr(cfg, field.name))
        value = getattr(cfg, field.name)
        if hasattr(value, "to_dict") and dataclasses.is_dataclass(value):
            _check_config_types(value)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()


def test_dinov2_uniform_mlp_prune_keeps_mlp_ratio_an_int(caplog) -> None:
    """DINOv2's mlp_ratio is declared int: 44 neurons of a 32-wide stream (1.375) stay out of the
    config (logged); 32 neurons (ratio 1) go in as the int 1."""
    model = tiny_model("dinov2")
    assert model.config.mlp_ratio == 2
    with caplog.at_level(logging.INFO, logger="vlprune"):
        prune_hf_model(model, example_inputs("dinov2"), tp.importance.MagnitudeImportance(), 0.3,
                       prune_heads=False, global_pruning=False)
    assert {layer.mlp.fc1.out_features for layer in model.encoder.layer} == {44}
    assert model.config.mlp_ratio == 2 and type(model.config.mlp_ratio) is int
    assert any("mlp_ratio" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    _check_config_types(model.config)
    model = tiny_model("dinov2")
    record = prune_hf_model(model, example_inputs("dinov2"), tp.importance.MagnitudeImportance(), 0.5,
                            prune_heads=False, global_pruning=False)
    assert record["config"] == {"mlp_ratio": 1} and type(model.config.mlp_ratio) is int
    _check_config_types(model.config)


def test_config_values_that_break_the_configs_own_checks_stay_out() -> None:
    """CLIP's config requires hidden_size % num_attention_heads == 0 (checked again by
    save_pretrained): a residual width of 30 with 4 heads is left to the shape record."""
    from transformers import CLIPVisionConfig

    from vlprune.adapters.hf.sync import _checked_config_plan

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    plan = _checked_config_plan([(cfg, {"intermediate_size": 40}), (cfg, {"hidden_size": 30})])
    assert plan == [(cfg, {"intermediate_size": 40})]
    plan = _checked_config_plan([(cfg, {"hidden_size": 24, "intermediate_size": 4.5})])
    assert plan == [(cfg, {"hidden_size": 24})]
    assert (cfg.hidden_size, cfg.intermediate_size) == (32, 64)  # planning changes nothing


def test_a_pruner_set_up_for_heads_with_no_head_ratio_is_reported(caplog) -> None:
    """tp's head_pruning_ratio defaults to 0: with **hf_pruner_kwargs(model) and no head ratio no head
    goes, and sync_hf_model(pruner=) says so with the fix."""
    import torch_pruning as tp

    from vlprune.adapters.torch_pruning import hf_pruner_kwargs
    from vlprune.testbed.tiny import example_inputs, tiny_model

    model = tiny_model("vit")
    pruner = tp.pruner.BasePruner(model, example_inputs("vit"), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.3, global_pruning=True, **hf_pruner_kwargs(model))
    pruner.step()
    with caplog.at_level("WARNING", logger="vlprune.adapters.hf.sync"):
        vlprune.sync_hf_model(model, pruner=pruner)
    assert "head_pruning_ratio" in caplog.text
    caplog.clear()
    model = tiny_model("vit")
    pruner = tp.pruner.BasePruner(model, example_inputs("vit"), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.3, head_pruning_ratio=0.3, global_pruning=True, **hf_pruner_kwargs(model))
    pruner.step()
    with caplog.at_level("WARNING", logger="vlprune.adapters.hf.sync"):
        vlprune.sync_hf_model(model, pruner=pruner)
    assert "head_pruning_ratio" not in caplog.text


# --------------------------------------------------------------------------------------------
# Qwen2 MHA: its config has no head_dim (derived as hidden_size // num_attention_heads)
# --------------------------------------------------------------------------------------------


def _qwen2_mha() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _kept_heads(new: torch.Tensor, old: torch.Tensor, head_dim: int) -> list[int]:
    blocks = [old[h * head_dim:(h + 1) * head_dim] for h in range(old.shape[0] // head_dim)]
    return [next(h for h, b in enumerate(blocks) if torch.equal(b, new[i:i + head_dim]))
            for i in range(0, new.shape[0], head_dim)]


@pytest.mark.parametrize("uniform", [True, False], ids=["same-heads-per-layer", "global"])
def test_qwen2_mha_head_pruning_keeps_config_heads_and_head_dim_consistent(uniform: bool, tmp_path) -> None:
    model = _qwen2_mha()
    reference = copy.deepcopy(model)
    assert "head_dim" not in vars(model.config)  # the case: head_dim derived from the head count
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    prune_hf_model(model, {"input_ids": ids[:1, :8]}, tp.importance.GroupMagnitudeImportance(), 0.5,
                   head_pruning_ratio=0.5, prune_mlp=False, global_pruning=not uniform)
    heads = [layer.self_attn.q_proj.out_features // 8 for layer in model.model.layers]
    assert sum(heads) < 8 and (len(set(heads)) == 1) == uniform
    # independent reference: the unpruned model with the removed heads' o_proj columns zeroed
    for new, old in zip(model.model.layers, reference.model.layers):
        kept = _kept_heads(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight, 8)
        assert kept == _kept_heads(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight, 8)
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                old.self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
    cfg = model.config
    if uniform:  # the config states every shape: heads, kv heads and the unchanged head_dim
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size) == (heads[0], heads[0], 8, 32)
        built = type(model)(copy.deepcopy(cfg))
        assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    else:  # per-layer head counts: the config keeps its values (and derivation), the record holds the widths
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, vars(cfg).get("head_dim")) == (4, 4, None)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)
        cached = model.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:, :6], attention_mask=mask[:, :6], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    vlprune.save_pruned(model, tmp_path)
    loaded = vlprune.load_pruned(tmp_path).eval()
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == {**cfg.to_dict(), "_name_or_path": ""}
    state, got = model.state_dict(), loaded.state_dict()
    assert state.keys() == got.keys() and all(torch.equal(state[k], got[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(loaded.generate(ids[:, :6], max_new_tokens=6, do_sample=False),
                           model.generate(ids[:, :6], max_new_tokens=6, do_sample=False))
    if uniform:  # plain transformers reads it too
        plain = type(model).from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["clip", "vilt"])
def test_a_config_whose_model_ignores_head_dim_keeps_its_head_counts(family: str) -> None:
    """CLIP and ViLT derive the head size from hidden_size / num_heads and read no head_dim: writing
    the smaller head count would make a config-built model's heads wider than the real ones, so the
    counts stay and no head_dim is added (ViT / DINOv2 / Qwen2 read a stated head_dim: both written)."""
    model = tiny_model(family)
    configs = [model.config] + [getattr(model.config, s) for s in getattr(model.config, "sub_configs", {}) or {}]
    before = [(c.to_dict().get("num_attention_heads"), "head_dim" in vars(c)) for c in configs]
    prune_hf_model(model, example_inputs(family), tp.importance.GroupMagnitudeImportance(), 0.5,
                   head_pruning_ratio=0.5, prune_mlp=False, global_pruning=False)
    widths = {m.q_proj.out_features for n, m in model.named_modules() if hasattr(m, "q_proj") and "attn" in n}
    widths |= {m.query.out_features for m in model.modules() if hasattr(m, "query") and isinstance(m.query, nn.Linear)}
    assert widths and max(widths) < 32  # every attention lost heads (hidden size 32)
    assert [(c.to_dict().get("num_attention_heads"), "head_dim" in vars(c)) for c in configs] == before


@pytest.mark.parametrize("family", ["vit", "dinov2"])
def test_configs_that_read_head_dim_get_heads_and_head_dim(family: str) -> None:
    model = tiny_model(family)
    x = example_inputs(family)
    prune_hf_model(model, x, tp.importance.GroupMagnitudeImportance(), 0.5, head_pruning_ratio=0.5,
                   prune_mlp=False, global_pruning=False)
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.head_dim) == (2, 8)
    built = type(model)(copy.deepcopy(cfg))
    assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
