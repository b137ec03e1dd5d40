"""Model families: modalities, blocks, attentions, MLPs, heads, decoder layers (hand-written expectations)."""

from __future__ import annotations

import pytest
from torch import nn

from vlprune import ModelStructureError
from vlprune.adapters.hf.families import FAMILIES, describe
from vlprune.testbed.tiny import tiny_model

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


@pytest.mark.parametrize("family", sorted(EXPECTED_BLOCKS))
def test_blocks_modalities_and_heads(family: str) -> None:
    info = describe(tiny_model(family))
    assert info.family == family
    assert info.blocks == EXPECTED_BLOCKS[family]
    assert set(info.heads) == set(EXPECTED_HEADS[family])
    n_linear = sum(isinstance(m, nn.Linear) for m in tiny_model(family).modules())
    assert len(info.linear_modality) == n_linear


@pytest.mark.parametrize(
    "family,path,modality",
    [
        ("clip", "vision_model.encoder.layers.1.mlp.fc2", "vision"),
        ("clip", "text_model.encoder.layers.0.self_attn.q_proj", "language"),
        ("blip", "text_decoder.bert.encoder.layer.1.crossattention.self.key", "fusion"),
        ("blip", "text_decoder.bert.encoder.layer.1.attention.self.key", "language"),
        ("blip", "vision_model.encoder.layers.0.self_attn.qkv", "vision"),
        ("llava", "model.multi_modal_projector.linear_1", "fusion"),
        ("llava", "model.language_model.layers.1.mlp.down_proj", "language"),
        ("llava", "model.vision_tower.encoder.layers.0.mlp.fc1", "vision"),
        ("vilt", "encoder.layer.0.output.dense", "fusion"),
    ],
)
def test_modality_of_known_paths(family: str, path: str, modality: str) -> None:
    info = describe(tiny_model(family))
    assert info.modality_of(path) == modality
    assert info.linear_modality[path] == modality


@pytest.mark.parametrize("family", sorted(EXPECTED_BLOCKS))
def test_attention_heads_and_mlp_widths_match_config(family: str) -> None:
    info = describe(tiny_model(family))
    # BLIP text layers hold a self- and a cross-attention each
    assert len(info.attentions) == {"clip": 4, "vit": 2, "dinov2": 2, "blip": 6, "vilt": 2, "llava": 4}[family]
    for att in info.attentions:
        assert att.head_dim == 8 and att.num_heads == 4
        assert att.num_kv_heads == (2 if family == "llava" and att.modality == "language" else 4)
    assert len(info.mlps) == len(info.blocks)
    assert all(m.hidden == 64 for m in info.mlps)
    gated = [m for m in info.mlps if m.gate]
    assert len(gated) == (2 if family == "llava" else 0)


def test_fused_qkv_and_bert_style_paths() -> None:
    info = describe(tiny_model("blip"))
    fused = [a for a in info.attentions if a.fused]
    assert [a.q for a in fused] == [f"vision_model.encoder.layers.{i}.self_attn.qkv" for i in (0, 1)]
    assert fused[0].o == "vision_model.encoder.layers.0.self_attn.projection"
    cross = [a for a in info.attentions if a.modality == "fusion"]
    assert cross[0].o == "text_decoder.bert.encoder.layer.0.crossattention.output.dense"
    text_mlp = [m for m in info.mlps if m.modality == "language"][0]
    assert (text_mlp.up, text_mlp.down) == (
        "text_decoder.bert.encoder.layer.0.intermediate.dense",
        "text_decoder.bert.encoder.layer.0.output.dense",
    )


def test_decoder_layers() -> None:
    assert describe(tiny_model("llava")).decoder_layers == ("model.language_model.layers.0", "model.language_model.layers.1")
    assert describe(tiny_model("clip")).decoder_layers == ()


def test_modules_of_excludes_heads() -> None:
    info = describe(tiny_model("clip"))
    vision = info.modules_of("vision")
    assert "visual_projection" not in vision and "vision_model.encoder.layers.0.mlp.fc1" in vision
    assert len(vision) == 12


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim = 2, 4
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(8, 8) for _ in range(4))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])


def test_unknown_model_gets_generic_description_with_warning() -> None:
    with pytest.warns(UserWarning, match="unknown model family"):
        info = describe(_Custom())
    assert info.family == "generic"
    assert set(info.linear_modality.values()) == {"unknown"}
    assert list(info.blocks) == ["blocks.0", "blocks.1"]
    assert [(a.q, a.num_heads, a.head_dim) for a in info.attentions] == [
        ("blocks.0.attn.q_proj", 2, 4), ("blocks.1.attn.q_proj", 2, 4)
    ]
    assert [(m.up, m.down, m.hidden) for m in info.mlps] == [("blocks.0.fc1", "blocks.0.fc2", 16), ("blocks.1.fc1", "blocks.1.fc2", 16)]


def test_no_linear_is_an_error() -> None:
    with pytest.raises(ModelStructureError, match="no nn.Linear"):
        describe(nn.Sequential(nn.ReLU()))


def test_heads_follow_weight_shapes_after_pruning() -> None:
    model = tiny_model("vit")
    att = model.vit.layers[0].attention
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(att, name, nn.Linear(32, 16))
    info = describe(model)
    assert info.attentions[0].num_heads == 2 and info.attentions[1].num_heads == 4


def test_family_names() -> None:
    assert {"clip", "siglip", "vit", "dinov2", "blip", "vilt", "llava"} <= set(FAMILIES)
