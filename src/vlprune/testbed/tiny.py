"""Tiny, randomly initialised transformers models built from configs (no download).

Used by tests, examples and ``make demo`` until the trained testbed models exist. Every
builder is seeded, so the same call gives the same weights.

Example:
    >>> from vlprune.testbed.tiny import tiny_model, example_inputs
    >>> model = tiny_model("clip")
    >>> out = model(**example_inputs("clip", batch_size=2))
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from vlprune.errors import RegistryError

__all__ = ["TINY_FAMILIES", "tiny_model", "example_inputs"]

_H, _I, _L, _HEADS = 32, 64, 2, 4
_IMG, _PATCH, _VOCAB, _SEQ = 32, 8, 100, 12


def _vision_kwargs(**extra: Any) -> dict[str, Any]:
    cfg = dict(
        hidden_size=_H,
        intermediate_size=_I,
        num_hidden_layers=_L,
        num_attention_heads=_HEADS,
        image_size=_IMG,
        patch_size=_PATCH,
    )
    cfg.update(extra)
    return cfg


def _text_kwargs(**extra: Any) -> dict[str, Any]:
    cfg = dict(
        hidden_size=_H,
        intermediate_size=_I,
        num_hidden_layers=_L,
        num_attention_heads=_HEADS,
        vocab_size=_VOCAB,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(extra)
    return cfg


def _clip() -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=_text_kwargs(), vision_config=_vision_kwargs(), projection_dim=16)
    return CLIPModel(cfg)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**_vision_kwargs(num_labels=10)))


def _dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = _vision_kwargs()
    cfg.pop("intermediate_size")
    return Dinov2Model(Dinov2Config(mlp_ratio=2, **cfg))


def _blip() -> nn.Module:
    from transformers import BlipConfig, BlipForConditionalGeneration

    cfg = BlipConfig(
        vision_config=_vision_kwargs(),
        text_config=_text_kwargs(encoder_hidden_size=_H, sep_token_id=2),
        projection_dim=16,
    )
    return BlipForConditionalGeneration(cfg)


def _vilt() -> nn.Module:
    from transformers import ViltConfig, ViltModel

    cfg = ViltConfig(
        hidden_size=_H,
        intermediate_size=_I,
        num_hidden_layers=_L,
        num_attention_heads=_HEADS,
        image_size=_IMG,
        patch_size=_PATCH,
        vocab_size=_VOCAB,
        max_position_embeddings=64,
        max_image_length=-1,
    )
    return ViltModel(cfg)


_IMAGE_TOKEN = _VOCAB - 1


def _llava() -> nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **_vision_kwargs()),
        text_config=dict(
            model_type="llama",
            **_text_kwargs(num_key_value_heads=2),
        ),
        image_token_index=_IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(cfg)


TINY_FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "clip": _clip,
    "vit": _vit,
    "dinov2": _dinov2,
    "blip": _blip,
    "vilt": _vilt,
    "llava": _llava,
}


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """Build a tiny random model of ``family`` in eval mode.

    Args:
        family: one of :data:`TINY_FAMILIES` (``clip``, ``vit``, ``dinov2``, ``blip``, ``vilt``, ``llava``).
        seed: seed of the weight initialisation.

    Returns:
        The model, in eval mode, float32, on CPU.
    """
    if family not in TINY_FAMILIES:
        raise RegistryError(f"unknown tiny family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TINY_FAMILIES[family]()
    return model.eval()


def example_inputs(family: str, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs that ``tiny_model(family)(**inputs)`` accepts.

    Args:
        family: as in :func:`tiny_model`.
        batch_size: number of samples.
        seed: seed of the random inputs.

    Returns:
        A dict of tensors (``pixel_values`` and/or ``input_ids`` / ``attention_mask``).
    """
    if family not in TINY_FAMILIES:
        raise RegistryError(f"unknown tiny family {family!r}; choose one of {sorted(TINY_FAMILIES)}")
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, _IMG, _IMG, generator=g)
    ids = torch.randint(3, _VOCAB - 1, (batch_size, _SEQ), generator=g)
    mask = torch.ones(batch_size, _SEQ, dtype=torch.long)
    if family in ("vit", "dinov2"):
        return {"pixel_values": pixels}
    if family == "llava":
        n_img = (_IMG // _PATCH) ** 2
        ids = torch.cat([torch.full((batch_size, n_img), _IMAGE_TOKEN), ids], dim=1)
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
