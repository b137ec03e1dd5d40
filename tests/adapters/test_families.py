"""Model families: modalities, blocks, attentions, MLPs, heads, decoder layers.

Expectations are hand-written from the transformers 5.x module trees of the tiny models (and their
configs), not derived from the rules under test.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch import nn

from vlprune.adapters.hf.families import BUILTIN_RULES, FAMILIES, FamilyRule, describe
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model

# transformer blocks in forward order (vision tower before the text side where the model runs it first)
EXPECTED_BLOCKS = {
    "clip": {
        "text_model.encoder.layers.0": "language", "text_model.encoder.layers.1": "language",
        "vision_model.encoder.layers.0": "vision", "vision_model.encoder.layers.1": "vision",
    },
    "vit": {"vit.layers.0": "vision", "vit.layers.1": "vision"},
    "dinov2": {"encoder.layer.0": "vision", "encoder.layer.1": "vision"},
    "blip": {
        "vision_model.encoder.layers.0": "vision", "vision_model.encoder.layers.1": "vision",
        "text_decoder.bert.encoder.layer.0": "language", "text_decoder.bert.encoder.layer.1": "language",
    },
    "vilt": {"encoder.layer.0": "fusion", "encoder.layer.1": "fusion"},
    "llava": {
        "model.vision_tower.encoder.layers.0": "vision", "model.vision_tower.encoder.layers.1": "vision",
        "model.language_model.layers.0": "language", "model.language_model.layers.1": "language",
    },
}

EXPECTED_HEADS = {
    "clip": ("visual_projection", "text_projection"),
    "vit": ("classifier",),
    "dinov2": (),
    "blip": ("text_decoder.cls.predictions.transform.dense", "text_decoder.cls.predictions.decoder"),
    "vilt": ("pooler.dense",),
    "llava": ("lm_head",),
}

# number of nn.Linear per modality, heads included (counted by hand from the module trees:
# CLIP-style layer = q,k,v,out + fc1,fc2; BLIP text layer = 4 self + 4 cross (fusion) + 2 MLP;
# Llama layer = q,k,v,o + gate,up,down)
EXPECTED_LINEAR_COUNTS = {
    "clip": {"vision": 13, "language": 13},
    "vit": {"vision": 13},
    "dinov2": {"vision": 12},
    "blip": {"vision": 8, "language": 14, "fusion": 8},
    "vilt": {"fusion": 13},
    "llava": {"vision": 12, "fusion": 2, "language": 15},
}


def _counts(values: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values.values():
        out[v] = out.get(v, 0) + 1
    return out


@pytest.fixture(scope="module", params=sorted(EXPECTED_BLOCKS))
def described(request: pytest.FixtureRequest):
    model = tiny_model(request.param)
    return request.param, model, describe(model)


def test_blocks_heads_and_linear_modalities(described) -> None:
    family, model, info = described
    assert info.family == family
    assert info.blocks == EXPECTED_BLOCKS[family]
    assert list(info.blocks) == list(EXPECTED_BLOCKS[family])
    assert set(info.heads) == set(EXPECTED_HEADS[family])
    assert set(info.linear_modality) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert _counts(info.linear_modality) == EXPECTED_LINEAR_COUNTS[family]


def test_blocks_are_in_forward_order(described) -> None:
    family, model, info = described
    seen: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[b].register_forward_pre_hook(lambda _m, _a, b=b: seen.append(b) if b not in seen else None)
        for b in info.blocks
    ]
    try:
        with torch.no_grad():
            model(**example_inputs(family))
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == set(info.blocks)
    if family == "clip":  # two independent towers: order within each tower
        for tower in ("vision_model.", "text_model."):
            assert [b for b in seen if b.startswith(tower)] == [b for b in info.blocks if b.startswith(tower)]
    else:
        assert seen == list(info.blocks)


def test_attention_heads_and_mlp_widths_match_config(described) -> None:
    family, model, info = described
    cfg = model.config
    if family in ("vit", "dinov2"):
        by_modality = {"vision": cfg}
    elif family == "vilt":
        by_modality = {"fusion": cfg}
    else:  # blip's cross-attention lives in the text decoder
        by_modality = {"vision": cfg.vision_config, "language": cfg.text_config, "fusion": cfg.text_config}
    # BLIP text layers hold a self- and a cross-attention each
    assert len(info.attentions) == {"clip": 4, "vit": 2, "dinov2": 2, "blip": 6, "vilt": 2, "llava": 4}[family]
    for att in info.attentions:
        c = by_modality[att.modality]
        assert att.num_heads == c.num_attention_heads
        assert att.num_kv_heads == (getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        assert att.head_dim == c.hidden_size // c.num_attention_heads
    if family == "llava":
        assert [a.num_kv_heads for a in info.attentions if a.modality == "language"] == [2, 2]
    assert len(info.mlps) == len(info.blocks)
    for mlp in info.mlps:
        c = by_modality[mlp.modality]
        width = int(c.hidden_size * c.mlp_ratio) if family == "dinov2" else c.intermediate_size
        assert mlp.hidden == width
    gated = [m for m in info.mlps if m.gate]
    assert [m.gate for m in gated] == (
        [f"model.language_model.layers.{i}.mlp.gate_proj" for i in (0, 1)] if family == "llava" else []
    )


@pytest.mark.parametrize(
    "family,path,modality",
    [
        ("clip", "vision_model.encoder.layers.1.mlp.fc2", "vision"),
        ("clip", "text_model.encoder.layers.0.self_attn.q_proj", "language"),
        ("clip", "visual_projection", "vision"),
        ("blip", "text_decoder.bert.encoder.layer.1.crossattention.self.key", "fusion"),
        ("blip", "text_decoder.bert.encoder.layer.1.attention.self.key", "language"),
        ("blip", "vision_model.encoder.layers.0.self_attn.qkv", "vision"),
        ("llava", "model.multi_modal_projector.linear_1", "fusion"),
        ("llava", "model.language_model.layers.1.mlp.down_proj", "language"),
        ("llava", "model.vision_tower.encoder.layers.0.mlp.fc1", "vision"),
        ("llava", "lm_head", "language"),
        ("vilt", "encoder.layer.0.output.dense", "fusion"),
        ("vit", "vit.layers.0.attention.o_proj", "vision"),
        ("dinov2", "encoder.layer.1.mlp.fc1", "vision"),
    ],
)
def test_modality_of_known_paths(family: str, path: str, modality: str) -> None:
    info = describe(tiny_model(family))
    assert info.modality_of(path) == modality
    assert info.linear_modality[path] == modality


def test_modality_of_non_linear_paths() -> None:
    info = describe(tiny_model("llava"))
    assert info.modality_of("model.vision_tower.encoder.layers.0") == "vision"
    assert info.modality_of("model.language_model") == "language"
    assert info.modality_of("model") == "unknown"
    assert describe(tiny_model("vilt")).modality_of("embeddings.text_embeddings.word_embeddings") == "language"


def test_fused_qkv_and_bert_style_paths() -> None:
    info = describe(tiny_model("blip"))
    fused = [a for a in info.attentions if a.fused]
    assert [a.q for a in fused] == [f"vision_model.encoder.layers.{i}.self_attn.qkv" for i in (0, 1)]
    assert fused[0].o == "vision_model.encoder.layers.0.self_attn.projection"
    cross = [a for a in info.attentions if a.modality == "fusion"]
    assert [a.name for a in cross] == [f"text_decoder.bert.encoder.layer.{i}.crossattention.self" for i in (0, 1)]
    assert cross[0].o == "text_decoder.bert.encoder.layer.0.crossattention.output.dense"
    text_mlp = [m for m in info.mlps if m.modality == "language"][0]
    assert (text_mlp.up, text_mlp.down) == (
        "text_decoder.bert.encoder.layer.0.intermediate.dense",
        "text_decoder.bert.encoder.layer.0.output.dense",
    )


def test_decoder_layers() -> None:
    assert describe(tiny_model("llava")).decoder_layers == ("model.language_model.layers.0", "model.language_model.layers.1")
    assert describe(tiny_model("blip")).decoder_layers == (
        "text_decoder.bert.encoder.layer.0", "text_decoder.bert.encoder.layer.1"
    )
    assert describe(tiny_model("clip")).decoder_layers == ()


def test_modules_of_excludes_heads() -> None:
    info = describe(tiny_model("clip"))
    vision = info.modules_of("vision")
    assert "visual_projection" not in vision and "vision_model.encoder.layers.0.mlp.fc1" in vision
    assert len(vision) == 12
    llava = describe(tiny_model("llava"))
    assert llava.modules_of("fusion") == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"]
    assert "lm_head" not in llava.modules_of("language") and len(llava.modules_of("language")) == 14


# ---- models built from configs beyond the tiny testbed (SigLIP, DeiT, single towers, BLIP retrieval)

_V = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_T = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(kind: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    builders = {
        "siglip": lambda: T.SiglipModel(T.SiglipConfig(text_config=_T, vision_config=_V)),
        "siglip_vision": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**_V)),
        "clip_text": lambda: T.CLIPTextModel(T.CLIPTextConfig(**_T)),
        "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**_V, num_labels=3)),
        "blip_retrieval": lambda: T.BlipForImageTextRetrieval(
            T.BlipConfig(vision_config=_V, text_config=dict(_T, encoder_hidden_size=32, sep_token_id=2))
        ),
    }
    return builders[kind]().eval()


def test_siglip_two_towers_and_pooling_head() -> None:
    info = describe(_build("siglip"))
    assert info.family == "siglip"
    assert info.blocks == {
        "text_model.encoder.layers.0": "language", "text_model.encoder.layers.1": "language",
        "vision_model.encoder.layers.0": "vision", "vision_model.encoder.layers.1": "vision",
    }
    assert set(info.heads) == {
        "text_model.head", "vision_model.head.attention.out_proj", "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2",
    }
    # the attention-pooling head's MLP is a head, not a prunable MLP
    assert [m.name for m in info.mlps] == [
        "text_model.encoder.layers.0.mlp", "text_model.encoder.layers.1.mlp",
        "vision_model.encoder.layers.0.mlp", "vision_model.encoder.layers.1.mlp",
    ]
    assert "unknown" not in info.linear_modality.values()


@pytest.mark.parametrize(
    "kind,family,modality,blocks",
    [
        ("siglip_vision", "siglip", "vision", ["encoder.layers.0", "encoder.layers.1"]),
        ("clip_text", "clip", "language", ["encoder.layers.0", "encoder.layers.1"]),
        ("deit", "vit", "vision", ["deit.layers.0", "deit.layers.1"]),
    ],
)
def test_single_tower_models(kind: str, family: str, modality: str, blocks: list[str]) -> None:
    info = describe(_build(kind))
    assert info.family == family
    assert info.blocks == {b: modality for b in blocks}
    assert set(info.linear_modality.values()) == {modality}
    assert all(a.num_heads == 4 and a.head_dim == 8 for a in info.attentions) and len(info.attentions) == 2
    if kind == "deit":
        assert set(info.heads) == {"cls_classifier", "distillation_classifier"}


def test_blip_retrieval_projections() -> None:
    info = describe(_build("blip_retrieval"))
    assert set(info.heads) == {"vision_proj", "text_proj", "itm_head"}
    assert (info.linear_modality["vision_proj"], info.linear_modality["text_proj"], info.linear_modality["itm_head"]) == (
        "vision", "language", "fusion"
    )
    assert info.modality_of("text_encoder.encoder.layer.0.crossattention.self.query") == "fusion"
    assert info.decoder_layers == ()


# ---- head counts follow the weight shapes after pruning


def test_heads_follow_weight_shapes_after_head_pruning() -> None:
    model = tiny_model("vit")
    att = model.vit.layers[0].attention  # still claims 4 heads
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(att, name, nn.Linear(32, 16))
    info = describe(model)
    assert [(a.num_heads, a.head_dim) for a in info.attentions] == [(2, 8), (4, 8)]


def test_gqa_heads_after_pruning_a_kv_group() -> None:
    model = tiny_model("llava")
    att = model.model.language_model.layers[1].self_attn  # 4 query heads, 2 kv heads, head_dim 8
    att.q_proj, att.k_proj, att.v_proj = nn.Linear(32, 16), nn.Linear(32, 8), nn.Linear(32, 8)
    lm = [a for a in describe(model).attentions if a.modality == "language"]
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in lm] == [(4, 2, 8), (2, 1, 8)]


def test_head_dim_pruning_keeps_head_count() -> None:
    model = tiny_model("clip")
    att = model.vision_model.encoder.layers[0].self_attn  # 4 heads x 8; prune 8 -> 5 per head
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(att, name, nn.Linear(32, 20))
    first = describe(model).attentions[2]
    assert first.name == "vision_model.encoder.layers.0.self_attn"
    assert (first.num_heads, first.num_kv_heads, first.head_dim) == (4, 4, 5)


# ---- generic fallback, custom rules, errors


class _Attention(nn.Module):
    def __init__(self, with_head_dim: bool = True) -> None:
        super().__init__()
        self.num_heads = 2
        if with_head_dim:
            self.head_dim = 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))


class _Block(nn.Module):
    def __init__(self, with_head_dim: bool = True) -> None:
        super().__init__()
        self.attn = _Attention(with_head_dim)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


class _Custom(nn.Module):
    def __init__(self, with_head_dim: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(with_head_dim), _Block(with_head_dim)])
        self.out = nn.Linear(8, 3)


def test_unknown_model_gets_generic_description_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vlprune.adapters.hf.families"):
        with pytest.warns(UserWarning, match="unknown model family"):
            info = describe(_Custom())
    assert any("unknown model family" in r.getMessage() and "unknown" in r.getMessage() for r in caplog.records)
    assert info.family == "generic"
    assert set(info.linear_modality.values()) == {"unknown"}
    assert len(info.linear_modality) == 13 and info.heads == ()
    assert list(info.blocks) == ["blocks.0", "blocks.1"]
    assert [(a.q, a.o, a.num_heads, a.head_dim) for a in info.attentions] == [
        ("blocks.0.attn.q_proj", "blocks.0.attn.o_proj", 2, 4), ("blocks.1.attn.q_proj", "blocks.1.attn.o_proj", 2, 4)
    ]
    assert [(m.up, m.down, m.gate, m.hidden) for m in info.mlps] == [
        ("blocks.0.fc1", "blocks.0.fc2", None, 16), ("blocks.1.fc1", "blocks.1.fc2", None, 16)
    ]
    assert info.modality_of("blocks.0.fc1") == "unknown"


def test_generic_head_dim_from_num_heads() -> None:
    with pytest.warns(UserWarning):
        info = describe(_Custom(with_head_dim=False))
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in info.attentions] == [(2, 2, 4), (2, 2, 4)]


def test_blocks_are_the_innermost_lists() -> None:
    class Stages(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stages = nn.ModuleList([nn.ModuleDict({"blocks": nn.ModuleList([_Block(), _Block()])}) for _ in range(2)])

    with pytest.warns(UserWarning):
        info = describe(Stages())
    assert list(info.blocks) == [f"stages.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)]


def test_custom_rule_by_match_callable() -> None:
    rule = FamilyRule(
        "mine", (), (("blocks.0*", "vision"), ("blocks.1*", "language"), ("*", "unknown")),
        heads=("out",), decoder="blocks.1", match=lambda m: isinstance(m, _Custom),
    )
    info = describe(_Custom(), rules=(*BUILTIN_RULES, rule))
    assert info.family == "mine"
    assert info.blocks == {"blocks.0": "vision", "blocks.1": "language"}
    assert info.heads == ("out",) and info.decoder_layers == ("blocks.1",)
    assert info.modules_of("vision") == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
                                         "blocks.0.attn.o_proj", "blocks.0.fc1", "blocks.0.fc2"]
    assert info.linear_modality["out"] == "unknown"


def test_rules_restrict_detection() -> None:
    with pytest.warns(UserWarning, match="unknown model family"):
        info = describe(tiny_model("vit"), rules=[r for r in BUILTIN_RULES if r.name != "vit"])
    assert info.family == "generic" and len(info.attentions) == 2


def test_llava_like_models_match_by_structure() -> None:
    llava = next(r for r in BUILTIN_RULES if r.name == "llava")
    info = describe(tiny_model("llava"), rules=[dataclasses.replace(llava, model_types=())])
    assert info.family == "llava" and info.blocks == EXPECTED_BLOCKS["llava"]


def test_no_linear_is_an_error() -> None:
    with pytest.raises(ModelStructureError, match="no nn.Linear") as err:
        describe(nn.Sequential(nn.ReLU()))
    assert isinstance(err.value, VLPruneError)


def test_family_names() -> None:
    assert FAMILIES == ("clip", "siglip", "vit", "dinov2", "blip", "vilt", "llava", "decoder_lm")


# ---- decoder-only language models


def _tiny_lm(kind: str) -> nn.Module:
    import transformers

    common = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "llama_base": (transformers.LlamaConfig, transformers.LlamaModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = configs[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**common)).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_decoder_only_lms_are_described_without_warning(kind: str) -> None:
    import warnings as _warnings

    model = _tiny_lm(kind)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", UserWarning)
        info = describe(model)
    assert info.family == "decoder_lm"
    assert set(info.linear_modality.values()) == {"language"}
    assert info.heads == ("lm_head",)
    assert info.decoder_layers == ("model.layers.0", "model.layers.1")
    assert all((a.num_heads, a.num_kv_heads) == (4, 2) for a in info.attentions)
    assert [m.gate for m in info.mlps] == ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"]


def test_decoder_lm_rule_by_structure_and_bare_model() -> None:
    info = describe(_tiny_lm("llama_base"))
    assert info.family == "decoder_lm" and info.decoder_layers == ("layers.0", "layers.1") and info.heads == ()
    # LLaVA keeps its own rule (its language model also has layers and embed_tokens)
    assert describe(tiny_model("llava")).family == "llava"


def test_a_plugin_registers_a_family_rule() -> None:
    import vlprune
    from vlprune.plugins.hookspecs import hookimpl

    rule = FamilyRule("mine", (), (("blocks.0*", "vision"), ("*", "language")), heads=("out",),
                      match=lambda m: isinstance(m, _Custom))

    class Plugin:
        @hookimpl
        def vlprune_register_families(self) -> list[FamilyRule]:
            return [rule]

    plugin = Plugin()
    vlprune.register(plugin, name="test-family-plugin")
    try:
        import warnings as _warnings

        with _warnings.catch_warnings():
            _warnings.simplefilter("error", UserWarning)
            info = describe(_Custom())
        assert info.family == "mine" and info.heads == ("out",)
        assert info.modality_of("blocks.1.fc1") == "language"
        assert describe(tiny_model("clip")).family == "clip"  # built-ins still apply
    finally:
        vlprune.unregister(plugin)
    with pytest.warns(UserWarning, match="unknown model family"):
        assert describe(_Custom()).family == "generic"


def test_a_plugin_returning_something_else_is_refused() -> None:
    import vlprune
    from vlprune.plugins.hookspecs import hookimpl

    class Bad:
        @hookimpl
        def vlprune_register_families(self) -> list[object]:
            return ["not a rule"]

    bad = Bad()
    vlprune.register(bad, name="bad-family-plugin")
    try:
        with pytest.raises(VLPruneError, match="FamilyRule"):
            describe(_Custom())
    finally:
        vlprune.unregister(bad)
