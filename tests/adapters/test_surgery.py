"""Torch-Pruning on tiny transformers models, then sync_hf_model / save_pruned / load_pruned.

(The code is in vlprune.adapters.hf.sync and .persist; these tests import it through the
surgery re-export, which must keep working. More: test_sync.py, test_persist.py.)

The pruned models are checked against an independent computation: removing heads, head
dimensions or MLP neurons must equal zeroing their contributions in the *unpruned* model (the
output-projection columns of removed heads/neurons, the query rows of removed head dimensions).
That holds only if the head bookkeeping and the attention scale are right.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

from vlprune.adapters.hf import surgery
from vlprune.adapters.hf.surgery import find_attentions, find_mlps, load_pruned, save_pruned, sync_hf_model
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

OUTPUT_KEYS = ("logits", "logits_per_image", "text_embeds", "image_embeds", "last_hidden_state")


# --------------------------------------------------------------------------------------------
# helpers: how a user drives Torch-Pruning on a transformers model
# --------------------------------------------------------------------------------------------


def _output_transform(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else out[0]


def tp_kwargs(model: nn.Module, *, heads: bool = True) -> dict[str, Any]:
    """BasePruner kwargs: prune MLP neurons (roots fc1 / up+gate / intermediate.dense) and, with
    ``heads``, the heads of every non-fused, non-GQA attention ({q, k, v linear: heads}).

    Every other linear is ignored (it can still lose *input* channels as a dependant). Fused qkv
    (BLIP vision) and GQA attentions (Llama) are left whole: Torch-Pruning 1.6.1 fails on the
    former and hangs building the dependency groups of the latter.
    """
    modules = dict(model.named_modules())
    allowed: set[str] = set()
    num_heads: dict[nn.Module, int] = {}
    for mlp in find_mlps(model):
        allowed.update(p for p in (mlp.up, mlp.gate) if p)
    if heads:
        for att in find_attentions(model):
            if att.fused:
                continue
            module = modules[att.name]
            head_dim = getattr(module, "head_dim", None) or module.attention_head_size
            n_q, n_kv = modules[att.q].out_features // head_dim, modules[att.k].out_features // head_dim
            if n_q != n_kv:
                continue
            allowed.update((att.q, att.k, att.v))
            num_heads.update({modules[att.q]: n_q, modules[att.k]: n_kv, modules[att.v]: n_kv})
    ignored = [m for n, m in modules.items() if isinstance(m, nn.Linear) and n not in allowed]
    return {"num_heads": num_heads, "ignored_layers": ignored, "output_transform": _output_transform}


def tp_prune(model: nn.Module, family: str, *, mode: str = "heads", ratio: float = 0.4) -> None:
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs(family, batch_size=2),  # a dict: BasePruner calls model(**inputs)
        importance=tp.importance.GroupMagnitudeImportance(),
        pruning_ratio=ratio,
        head_pruning_ratio=0.5,
        global_pruning=True,
        prune_num_heads=mode == "heads",
        prune_head_dims=mode == "head_dim",
        **tp_kwargs(model, heads=mode != "mlp"),
    )
    pruner.step()


def outputs(model: nn.Module, family: str, seed: int = 5) -> dict[str, torch.Tensor]:
    inputs = example_inputs(family, batch_size=3, seed=seed)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**inputs)
    found = {k: getattr(out, k) for k in OUTPUT_KEYS if isinstance(getattr(out, k, None), torch.Tensor)}
    assert found
    return found


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every linear weight with std 1.5/sqrt(fan_in): the tiny models' init (std 0.02)
    makes attention nearly uniform, so a wrong scale or head mapping would hardly show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 1.5 / module.in_features**0.5)
    return model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# independent of vlprune's structure detection: (pruned linear, linear whose inputs it feeds)
_PAIRS = [
    (r"(.*)\.q_proj$", (r"\1.out_proj", r"\1.o_proj")),
    (r"(.*)\.(attention|self)\.query$", (r"\1.output.dense",)),
    (r"(.*)\.fc1$", (r"\1.fc2",)),
    (r"(.*)\.up_proj$", (r"\1.down_proj",)),
    (r"(.*)\.intermediate\.dense$", (r"\1.output.dense",)),
]


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``original`` that survive in ``pruned`` (matched by value)."""
    if pruned.shape == original.shape:
        return torch.arange(original.shape[0])
    return torch.tensor([int(torch.nonzero((original == row).all(dim=1))[0, 0]) for row in pruned])


def masked_reference(original: nn.Module, pruned: nn.Module, mode: str) -> nn.Module:
    """The unpruned model with the removed heads / head dims / neurons zeroed.

    Call before :func:`sync_hf_model` (which may rescale pruned queries)."""
    reference = copy.deepcopy(original)
    ref, new = dict(reference.named_modules()), dict(pruned.named_modules())
    n_masked = 0
    with torch.no_grad():
        for name, module in list(ref.items()):
            for pattern, targets in _PAIRS:
                if not isinstance(module, nn.Linear) or not re.match(pattern, name):
                    continue
                down = next(re.sub(pattern, t, name) for t in targets if re.sub(pattern, t, name) in ref)
                kept = _kept_rows(new[name].weight, module.weight)
                drop = torch.ones(module.out_features, dtype=torch.bool)
                drop[kept] = False
                if not drop.any():
                    continue
                n_masked += 1
                ref[down].weight[:, drop] = 0  # removed heads / neurons (v channels, for head dims)
                if mode == "head_dim" and pattern.endswith(("q_proj$", "query$")):
                    module.weight[drop] = 0  # removed head dims drop out of q.k
                    if module.bias is not None:
                        module.bias[drop] = 0
    assert n_masked > 0
    return reference


# --------------------------------------------------------------------------------------------
# pruning + sync, checked against the masked unpruned model
# --------------------------------------------------------------------------------------------

CASES = [
    ("clip", "heads"),
    ("vit", "heads"),
    ("dinov2", "heads"),
    ("vilt", "heads"),
    ("blip", "heads"),  # text decoder heads (self + cross); fused vision qkv left whole
    ("llava", "heads"),  # CLIP vision tower heads; Llama decoder MLPs only (GQA left whole)
    ("vit", "head_dim"),
    ("clip", "head_dim"),
    ("vilt", "head_dim"),  # BERT-style scale 1/sqrt(attention_head_size): folded into the query
]


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_pruned_and_synced_model_equals_masked_original(family: str, mode: str) -> None:
    model = sharpen(tiny_model(family))
    original = copy.deepcopy(model)
    before = outputs(original, family)
    tp_prune(model, family, mode=mode)
    reference = masked_reference(original, model, mode)
    record = sync_hf_model(model, pruned=mode)
    assert any(a.startswith(("num_", "head_dim", "attention_head_size")) for r in record.values() for a in r)
    assert n_params(model) < 0.9 * n_params(original)
    got, want = outputs(model, family), outputs(reference, family)
    for key, value in got.items():
        assert value.shape == before[key].shape
        torch.testing.assert_close(value, want[key], rtol=1e-4, atol=1e-4)
    assert sync_hf_model(model, pruned=mode) == {}  # idempotent


def test_head_pruning_updates_attention_attributes_and_keeps_the_scale() -> None:
    model = tiny_model("clip")
    scales = {a.name: dict(model.named_modules())[a.name].scale for a in find_attentions(model)}
    tp_prune(model, "clip", mode="heads")
    record = sync_hf_model(model, pruned="heads")
    modules = dict(model.named_modules())
    for att in find_attentions(model):
        module = modules[att.name]
        assert module.num_heads * module.head_dim == modules[att.q].out_features
        assert module.head_dim == 8 and module.scale == scales[att.name]
        assert record[att.name]["num_heads"] == module.num_heads
    assert model.config.vision_config.num_attention_heads == 4  # CLIP derives head_dim from it: left alone


def test_head_dim_pruning_keeps_the_original_scale() -> None:
    model = tiny_model("vit")
    tp_prune(model, "vit", mode="head_dim")
    sync_hf_model(model, pruned="head_dim")
    att = model.vit.layers[0].attention
    assert att.num_attention_heads == 4 and att.head_dim == att.q_proj.out_features // 4 < 8
    assert att.scaling == 8**-0.5


def test_llava_decoder_mlp_pruning_updates_uniform_config_fields() -> None:
    model = tiny_model("llava")
    tp_prune(model, "llava", mode="heads")
    record = sync_hf_model(model, pruned="heads")
    widths = {m.down_proj.in_features for m in (layer.mlp for layer in model.model.language_model.layers)}
    text = model.config.text_config
    if len(widths) == 1:  # global ranking may or may not keep the layers uniform
        assert text.intermediate_size == widths.pop() and record["config.text_config"]["intermediate_size"]
    for layer in model.model.language_model.layers:
        assert layer.mlp.intermediate_size == layer.mlp.down_proj.in_features
        assert (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features) == (32, 16)


def test_gqa_heads_removed_evenly_sync_config_and_match_masked_original(tmp_path) -> None:
    """Llama GQA (4 query / 2 kv heads): one query head removed from each kv group."""
    model = tiny_model("llava")
    original = copy.deepcopy(model)
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23])  # query heads 0 and 2
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            att = layer.self_attn
            q = nn.Linear(32, 16, bias=False)
            q.weight.copy_(att.q_proj.weight[keep])
            o = nn.Linear(16, 32, bias=False)
            o.weight.copy_(att.o_proj.weight[:, keep])
            att.q_proj, att.o_proj = q, o
        reference = copy.deepcopy(original)
        for layer in reference.model.language_model.layers:
            drop = torch.ones(32, dtype=torch.bool)
            drop[keep] = False
            layer.self_attn.o_proj.weight[:, drop] = 0
    record = sync_hf_model(model)  # "auto": narrower heads would not fit the rotary embedding
    att = model.model.language_model.layers[0].self_attn
    assert (att.num_key_value_groups, att.head_dim) == (1, 8)
    assert record["config.text_config"] == {"num_attention_heads": 2}  # config states head_dim itself
    torch.testing.assert_close(outputs(model, "llava")["logits"], outputs(reference, "llava")["logits"],
                               rtol=1e-4, atol=1e-5)
    save_pruned(model, tmp_path / "gqa")
    again = load_pruned(tmp_path / "gqa")
    assert again.model.language_model.layers[1].self_attn.q_proj.out_features == 16
    assert torch.equal(outputs(again, "llava")["logits"], outputs(model, "llava")["logits"])


def test_residual_stream_pruning_updates_hidden_size(tmp_path) -> None:
    """Torch-Pruning may also narrow the residual stream (roots o_proj / fc2): LayerNorms, the
    patch embedding and the classifier input shrink; config.hidden_size follows."""
    model = tiny_model("vit")
    modules = dict(model.named_modules())
    roots = {n for n in modules if n.endswith((".o_proj", ".fc2"))}
    ignored = [m for n, m in modules.items() if isinstance(m, nn.Linear) and n not in roots]
    pruner = tp.pruner.BasePruner(
        model, example_inputs("vit"), importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.25,
        global_pruning=True, ignored_layers=ignored + [model.classifier], output_transform=_output_transform,
    )
    pruner.step()
    record = sync_hf_model(model, pruned="heads")
    assert record["config"] == {"hidden_size": 24} and model.config.hidden_size == 24
    assert model.vit.layernorm.normalized_shape == (24,) and model.classifier.in_features == 24
    assert model.vit.layers[0].attention.q_proj.out_features == 32  # attention width untouched
    save_pruned(model, tmp_path / "narrow")
    again = load_pruned(tmp_path / "narrow")
    assert again.config.hidden_size == 24 and again.vit.layers[0].attention.head_dim == 8
    assert torch.equal(outputs(again, "vit")["logits"], outputs(model, "vit")["logits"])


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "mode"), [(f, m) for f, m in CASES if m == "heads"] + [("vilt", "head_dim")])
def test_save_load_round_trip_is_exact(family: str, mode: str, tmp_path) -> None:
    model = tiny_model(family)
    n_before = n_params(model)
    tp_prune(model, family, mode=mode)
    sync_hf_model(model, pruned=mode)
    rng = torch.get_rng_state()
    save_pruned(model, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    assert torch.equal(torch.get_rng_state(), rng)  # building models does not move the user's RNG
    assert type(again) is type(model) and not again.training
    assert n_params(again) == n_params(model) < n_before
    expected, got = outputs(model, family), outputs(again, family)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for att in find_attentions(model):
        a, b = again.get_submodule(att.name), model.get_submodule(att.name)
        assert {k: getattr(a, k, None) for k in surgery.ATTENTION_ATTRS} == {
            k: getattr(b, k, None) for k in surgery.ATTENTION_ATTRS
        }


def test_unpruned_model_saves_an_empty_record_and_tied_weights_stay_tied(tmp_path) -> None:
    model = tiny_model("blip")
    decoder = model.text_decoder.cls.predictions.decoder
    embeddings = model.text_decoder.bert.embeddings.word_embeddings
    assert decoder.weight is embeddings.weight
    save_pruned(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / surgery.SHAPES_FILE).read_text())
    assert record["modules"] == {}
    assert any("text_decoder.cls.predictions.decoder.weight" in group for group in record["tied"])
    again = load_pruned(tmp_path / "m")
    text = again.text_decoder
    assert text.cls.predictions.decoder.weight is text.bert.embeddings.word_embeddings.weight
    assert torch.equal(outputs(again, "blip")["logits"], outputs(model, "blip")["logits"])


def test_weights_untied_against_the_config_stay_untied(tmp_path) -> None:
    model = tiny_model("blip")
    decoder = model.text_decoder.cls.predictions.decoder
    decoder.weight = nn.Parameter(decoder.weight.detach() * 2)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    text = again.text_decoder
    assert text.cls.predictions.decoder.weight is not text.bert.embeddings.word_embeddings.weight
    assert torch.equal(outputs(again, "blip")["logits"], outputs(model, "blip")["logits"])


def test_load_pruned_with_explicit_class_and_dtype(tmp_path) -> None:
    from transformers import ViTForImageClassification

    model = tiny_model("vit")
    tp_prune(model, "vit")
    sync_hf_model(model, pruned="heads")
    model = model.to(torch.float64)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m", model_class=ViTForImageClassification)
    assert again.vit.layers[0].attention.q_proj.weight.dtype == torch.float64
    inputs = {k: v.double() for k, v in example_inputs("vit", 3).items()}
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


# --------------------------------------------------------------------------------------------
# errors, failure safety
# --------------------------------------------------------------------------------------------


def _attention_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        a.name: {k: getattr(model.get_submodule(a.name), k, None) for k in ("num_heads", "head_dim", "scale")}
        for a in find_attentions(model)
    }


def test_sync_failure_leaves_model_unchanged() -> None:
    model = tiny_model("llava")
    layers = model.model.language_model.layers
    layers[0].self_attn.q_proj = nn.Linear(32, 16, bias=False)  # valid: 2 query heads for 2 kv heads
    layers[0].self_attn.o_proj = nn.Linear(16, 32, bias=False)
    layers[1].self_attn.q_proj = nn.Linear(32, 24, bias=False)  # 3 query heads cannot share 2 kv heads
    layers[1].self_attn.o_proj = nn.Linear(24, 32, bias=False)
    layers[1].mlp.gate_proj = nn.Linear(32, 40, bias=False)
    layers[1].mlp.up_proj = nn.Linear(32, 40, bias=False)
    layers[1].mlp.down_proj = nn.Linear(40, 32, bias=False)
    config, state = model.config.to_dict(), _attention_state(model)
    with pytest.raises(ModelStructureError, match="share 2 key/value heads"):
        sync_hf_model(model, pruned="heads")
    assert layers[0].self_attn.num_key_value_groups == 2 and layers[1].mlp.intermediate_size == 64
    assert model.config.to_dict() == config and _attention_state(model) == state


def test_sync_auto_takes_whole_heads_and_warns_when_shapes_are_ambiguous(caplog) -> None:
    """16 channels: 2 heads of 8, or 4 heads of 4. The default follows hf_pruner_kwargs (whole
    heads) and the warning names the alternative and the way to be sure."""
    model = _ambiguous_vit()
    with caplog.at_level(logging.WARNING, logger="vlprune"):
        record = sync_hf_model(model)
    assert record["vit.layers.0.attention"] == {"num_attention_heads": 2}
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 heads of 8, or 4 heads of 4" in warning
    assert "pruner=pruner" in warning and "pruned='head_dim'" in warning
    model = _ambiguous_vit()
    assert sync_hf_model(model, pruned="head_dim")["vit.layers.0.attention"] == {"head_dim": 4}
    assert sync_hf_model(_ambiguous_vit(), pruned="heads") == record


def _ambiguous_vit() -> nn.Module:
    model = tiny_model("vit")
    for layer in model.vit.layers:  # 16 channels: 2 heads of 8, or 4 heads of 4
        att = layer.attention
        att.q_proj, att.k_proj, att.v_proj = (nn.Linear(32, 16) for _ in range(3))
        att.o_proj = nn.Linear(16, 32)
    return model


def test_sync_auto_decides_when_only_one_layout_fits() -> None:
    model = tiny_model("vit")
    att = model.vit.layers[0].attention  # 12 channels: 4 heads of 3, not whole heads of 8
    att.q_proj, att.k_proj, att.v_proj = (nn.Linear(32, 12) for _ in range(3))
    att.o_proj = nn.Linear(12, 32)
    assert sync_hf_model(model) == {"vit.layers.0.attention": {"head_dim": 3}}
    with pytest.raises(ModelStructureError, match="whole heads"):
        sync_hf_model(_narrowed_vit(12), pruned="heads")
    with pytest.raises(VLPruneError, match="pruned must be"):
        sync_hf_model(model, pruned="neurons")  # type: ignore[arg-type]


def _narrowed_vit(width: int) -> nn.Module:
    model = tiny_model("vit")
    att = model.vit.layers[0].attention
    att.q_proj, att.k_proj, att.v_proj = (nn.Linear(32, width) for _ in range(3))
    att.o_proj = nn.Linear(width, 32)
    return model


def test_sync_rejects_a_pruned_fused_qkv() -> None:
    model = tiny_model("blip")
    att = model.vision_model.encoder.layers[0].self_attn
    att.qkv, att.projection = nn.Linear(32, 48), nn.Linear(16, 32)
    with pytest.raises(ModelStructureError, match="fused qkv"):
        sync_hf_model(model, pruned="heads")
    assert att.num_heads == 4


def test_load_pruned_errors(tmp_path) -> None:
    with pytest.raises(VLPruneError, match="save_pruned"):
        load_pruned(tmp_path / "missing")
    with pytest.raises(VLPruneError, match="save_pruned"):
        load_pruned(tmp_path)
    model = tiny_model("vit")
    tp_prune(model, "vit")
    sync_hf_model(model, pruned="heads")
    save_pruned(model, tmp_path / "m")
    path = tmp_path / "m" / surgery.SHAPES_FILE
    good = json.loads(path.read_text())

    def write(record: Any) -> None:
        path.write_text(record if isinstance(record, str) else json.dumps(record))

    write("{not json")
    with pytest.raises(VLPruneError, match="not valid JSON"):
        load_pruned(tmp_path / "m")
    write({**good, "format": "something-else"})
    with pytest.raises(VLPruneError, match="format"):
        load_pruned(tmp_path / "m")
    write({**good, "modules": {**good["modules"], "no.such.module": {"class": "Linear"}}})
    with pytest.raises(VLPruneError, match="no.such.module"):
        load_pruned(tmp_path / "m")
    write({**good, "model_class": "transformers:NoSuchModel"})
    with pytest.raises(VLPruneError, match="cannot import"):
        load_pruned(tmp_path / "m")
    write(good)
    from transformers import CLIPModel, ViTModel

    with pytest.raises(VLPruneError, match="cannot load it as"):
        load_pruned(tmp_path / "m", model_class=CLIPModel)
    with pytest.raises(VLPruneError, match="cannot load it as"):
        load_pruned(tmp_path / "m", model_class=ViTModel)
    modules = dict(good["modules"])
    modules["vit.layers.0.mlp.fc1"] = {**modules["vit.layers.0.mlp.fc1"], "class": "Conv2d"}
    write({**good, "modules": modules})
    with pytest.raises(VLPruneError, match="another model"):
        load_pruned(tmp_path / "m")
    modules["vit.layers.0.mlp.fc1"] = {
        **good["modules"]["vit.layers.0.mlp.fc1"], "params": {"weight": [8, 32], "bias": [8]}
    }
    write({**good, "modules": modules})
    with pytest.raises(VLPruneError, match="do not fit"):
        load_pruned(tmp_path / "m")
    write(good)
    assert isinstance(load_pruned(tmp_path / "m"), nn.Module)


def test_save_pruned_errors(tmp_path) -> None:
    with pytest.raises(VLPruneError, match="PreTrainedModel"):
        save_pruned(nn.Linear(2, 2), tmp_path / "x")
    model = tiny_model("vit")
    model.vit.layers[0].mlp.activation_fn = nn.Identity()  # a replaced module is not a shape change
    with pytest.raises(VLPruneError, match="records shape changes only"):
        save_pruned(model, tmp_path / "y")
    model = tiny_model("vit")
    del model.vit.layers[1]  # fewer layers than the config says
    with pytest.raises(VLPruneError, match="num_hidden_layers"):
        save_pruned(model, tmp_path / "z")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
