"""Model-family knowledge for transformers models: which modules are vision, language, fusion;
attention modules with their head counts; MLP (up, down) pairs; output heads; decoder layers.

Structure is found generically from the model itself (attention = a module with q/k/v linears;
MLP = fc1/fc2, gate/up/down or BERT-style intermediate/output pairs; blocks = the children of a
``ModuleList`` that contain an attention), so it stays right after a model was pruned. A
:class:`FamilyRule` adds what cannot be read off the modules: each path's modality, which linears
are output heads, and where the decoder layers are. Built-in rules cover CLIP, SigLIP, ViT/DeiT,
DINOv2, BLIP, ViLT and LLaVA-family models (transformers 5.x module paths); anything else gets the
generic description with modality ``"unknown"`` and a warning.

Head counts: ``head_dim`` is read from the attention module (``head_dim`` or
``attention_head_size``), else derived as ``hidden_size / num_attention_heads`` of the model config;
the numbers of query and key/value heads are then ``q.out_features // head_dim`` and
``k.out_features // head_dim``, i.e. they follow the actual weight shapes, not stale attributes.

Example:
    >>> from vlprune.adapters.hf.families import describe
    >>> info = describe(model)                                   # doctest: +SKIP
    >>> info.modality_of("vision_model.encoder.layers.0.mlp.fc1")  # doctest: +SKIP
    'vision'
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from vlprune.errors import ModelStructureError

__all__ = [
    "Modality",
    "AttentionInfo",
    "MLPInfo",
    "FamilyInfo",
    "FamilyRule",
    "BUILTIN_RULES",
    "FAMILIES",
    "describe",
    "find_attentions",
    "find_mlps",
]

logger = logging.getLogger(__name__)

Modality = Literal["vision", "language", "fusion", "unknown"]


@dataclass(frozen=True)
class AttentionInfo:
    """One attention module.

    Attributes:
        name: path of the module holding the head attributes.
        q, k, v: paths of the query / key / value linears (all three equal for a fused ``qkv``).
        o: path of the output projection.
        num_heads: query heads.
        num_kv_heads: key/value heads (``num_heads`` unless GQA).
        head_dim: channels per head.
        modality: the module's modality.
    """

    name: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    modality: Modality = "unknown"

    @property
    def fused(self) -> bool:
        """True for one fused qkv linear."""
        return self.q == self.k == self.v


@dataclass(frozen=True)
class MLPInfo:
    """One MLP: ``down(act(up(x)))`` or ``down(act(gate(x)) * up(x))``.

    Attributes:
        name: path of the MLP (or of the layer holding a BERT-style intermediate/output pair).
        up: path of the first linear (fc1 / up_proj / intermediate.dense).
        down: path of the second linear (fc2 / down_proj / output.dense).
        gate: path of the gate linear of gated MLPs, else None.
        hidden: hidden width (``up.out_features``).
        modality: the MLP's modality.
    """

    name: str
    up: str
    down: str
    gate: str | None
    hidden: int
    modality: Modality = "unknown"


@dataclass(frozen=True)
class FamilyRule:
    """What a family adds to the generic structure.

    Attributes:
        name: family name.
        model_types: ``config.model_type`` values it applies to.
        modalities: (glob pattern on module path, modality) pairs; the first match wins.
        heads: glob patterns of output heads / projections (not pruned, not profiled by default).
        decoder: glob pattern of the language-model decoder layers (for layer removal), or "".
    """

    name: str
    model_types: tuple[str, ...]
    modalities: tuple[tuple[str, Modality], ...]
    heads: tuple[str, ...] = ()
    decoder: str = ""

    def matches(self, model: nn.Module) -> bool:
        """True if this rule describes ``model``."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type in self.model_types


_CLIP_LIKE = (
    ("vision_model*", "vision"),
    ("visual_projection", "vision"),
    ("text_model*", "language"),
    ("text_projection", "language"),
    ("vision_tower*", "vision"),
    ("*", "unknown"),
)

BUILTIN_RULES: tuple[FamilyRule, ...] = (
    FamilyRule("clip", ("clip", "clip_vision_model", "clip_text_model"), _CLIP_LIKE,
               heads=("visual_projection", "text_projection")),
    FamilyRule("siglip", ("siglip", "siglip2", "siglip_vision_model", "siglip_text_model"), _CLIP_LIKE,
               heads=("text_model.head", "vision_model.head*", "head")),
    FamilyRule("vit", ("vit", "deit", "vit_mae", "vit_msn"), (("*", "vision"),),
               heads=("classifier", "cls_classifier", "distillation_classifier", "pooler.dense")),
    FamilyRule("dinov2", ("dinov2", "dinov2_with_registers"), (("*", "vision"),), heads=("classifier",)),
    FamilyRule(
        "blip",
        ("blip",),
        (
            ("vision_model*", "vision"),
            ("text_decoder.bert.encoder.layer.*.crossattention*", "fusion"),
            ("text_encoder.encoder.layer.*.crossattention*", "fusion"),
            ("text_decoder*", "language"),
            ("text_encoder*", "language"),
            ("*", "unknown"),
        ),
        heads=("text_decoder.cls.*", "vision_proj", "text_proj", "itm_head"),
        decoder="text_decoder.bert.encoder.layer.*",
    ),
    FamilyRule(
        "vilt",
        ("vilt",),
        (
            ("embeddings.text_embeddings*", "language"),
            ("embeddings.patch_embeddings*", "vision"),
            ("vilt.embeddings.text_embeddings*", "language"),
            ("vilt.embeddings.patch_embeddings*", "vision"),
            ("*", "fusion"),
        ),
        heads=("pooler.dense", "vilt.pooler.dense", "classifier*"),
    ),
    FamilyRule(
        "llava",
        ("llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava"),
        (
            ("*vision_tower*", "vision"),
            ("*multi_modal_projector*", "fusion"),
            ("*language_model*", "language"),
            ("lm_head", "language"),
            ("*", "unknown"),
        ),
        heads=("lm_head",),
        decoder="*language_model.layers.*",
    ),
)

FAMILIES: tuple[str, ...] = tuple(r.name for r in BUILTIN_RULES)


@dataclass(frozen=True)
class FamilyInfo:
    """What vlprune knows about a model's structure.

    Attributes:
        family: the rule's name, or ``"generic"``.
        blocks: transformer block path -> modality, in forward order.
        linear_modality: every ``nn.Linear`` path -> modality.
        heads: output heads / projections (usually neither pruned nor profiled).
        attentions: the attention modules.
        mlps: the MLPs.
        decoder_layers: language-model decoder layer paths (empty if none).
    """

    family: str
    blocks: dict[str, Modality]
    linear_modality: dict[str, Modality]
    heads: tuple[str, ...]
    attentions: tuple[AttentionInfo, ...]
    mlps: tuple[MLPInfo, ...]
    decoder_layers: tuple[str, ...] = ()
    _rule: FamilyRule | None = field(default=None, repr=False, compare=False)

    def modality_of(self, module_name: str) -> Modality:
        """The modality of any module path (the rule's first matching pattern)."""
        return _modality(self._rule, module_name)

    def modules_of(self, modality: Modality) -> list[str]:
        """The ``nn.Linear`` paths of ``modality``, output heads excluded."""
        heads = set(self.heads)
        return [n for n, m in self.linear_modality.items() if m == modality and n not in heads]


def _modality(rule: FamilyRule | None, name: str) -> Modality:
    if rule is None:
        return "unknown"
    for pattern, modality in rule.modalities:
        if fnmatch.fnmatchcase(name, pattern):
            return modality
    return "unknown"


def _config_head_dim(model: nn.Module, module: nn.Module) -> int | None:
    for cfg in (getattr(module, "config", None), getattr(model, "config", None)):
        if cfg is None:
            continue
        hd = getattr(cfg, "head_dim", None)
        if isinstance(hd, int) and hd > 0:
            return hd
        hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            return hidden // heads
    return None


def _head_dim(model: nn.Module, module: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return _config_head_dim(model, module)


def find_attentions(model: nn.Module, modality_of: Callable[[str], Modality] = lambda n: "unknown") -> list[AttentionInfo]:
    """Attention modules of ``model`` (q_proj/k_proj/v_proj, query/key/value, or fused qkv)."""
    modules = dict(model.named_modules())
    found: list[AttentionInfo] = []
    for name, module in modules.items():
        children = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        prefix = f"{name}." if name else ""
        q = k = v = o = None
        if {"q_proj", "k_proj", "v_proj"} <= children.keys():
            q, k, v = (prefix + x for x in ("q_proj", "k_proj", "v_proj"))
            o = next((prefix + x for x in ("o_proj", "out_proj", "dense", "proj") if x in children), None)
        elif {"query", "key", "value"} <= children.keys():
            q, k, v = (prefix + x for x in ("query", "key", "value"))
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            candidate = f"{parent}.output.dense" if parent else "output.dense"
            o = candidate if isinstance(modules.get(candidate), nn.Linear) else None
        elif "qkv" in children:
            q = k = v = prefix + "qkv"
            o = next((prefix + x for x in ("projection", "proj", "out_proj", "o_proj") if x in children), None)
        if q is None or o is None:
            continue
        hd = _head_dim(model, module)
        if hd is None:
            logger.warning("attention %s: no head_dim on the module or config; skipped", name)
            continue
        q_out = modules[q].out_features
        if q == k:
            heads = kv_heads = q_out // (3 * hd)
        else:
            heads, kv_heads = q_out // hd, modules[k].out_features // hd
        found.append(AttentionInfo(name, q, k, v, o, heads, kv_heads, hd, modality_of(name)))
    return found


def find_mlps(model: nn.Module, modality_of: Callable[[str], Modality] = lambda n: "unknown") -> list[MLPInfo]:
    """MLPs of ``model``: fc1/fc2, gate_proj/up_proj/down_proj, or BERT-style intermediate/output."""
    modules = dict(model.named_modules())
    found: list[MLPInfo] = []
    for name, module in modules.items():
        children = {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}
        prefix = f"{name}." if name else ""
        if {"fc1", "fc2"} <= children.keys():
            up, down, gate = prefix + "fc1", prefix + "fc2", None
        elif {"up_proj", "down_proj"} <= children.keys():
            up, down = prefix + "up_proj", prefix + "down_proj"
            gate = prefix + "gate_proj" if "gate_proj" in children else None
        elif isinstance(modules.get(prefix + "intermediate.dense"), nn.Linear) and isinstance(
            modules.get(prefix + "output.dense"), nn.Linear
        ):
            up, down, gate = prefix + "intermediate.dense", prefix + "output.dense", None
        else:
            continue
        if modules[up].out_features != modules[down].in_features:
            continue
        found.append(MLPInfo(name, up, down, gate, modules[up].out_features, modality_of(name)))
    return found


def describe(model: nn.Module, rules: tuple[FamilyRule, ...] | None = None) -> FamilyInfo:
    """Describe a transformers model's structure and modalities.

    Args:
        model: the model (pruned or not).
        rules: family rules to try (default :data:`BUILTIN_RULES`); the first that matches wins.

    Returns:
        A :class:`FamilyInfo`.

    Raises:
        ModelStructureError: the model has no ``nn.Linear`` at all.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelStructureError(f"{type(model).__name__} has no nn.Linear layer; nothing vlprune can describe")
    rule = next((r for r in (rules if rules is not None else BUILTIN_RULES) if r.matches(model)), None)
    if rule is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        message = (
            f"unknown model family ({type(model).__name__}, model_type={model_type!r}); using the generic "
            "description: every nn.Linear, modality 'unknown'"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)

    def modality_of(name: str) -> Modality:
        return _modality(rule, name)

    attentions = find_attentions(model, modality_of)
    attention_names = [a.name for a in attentions]
    blocks: dict[str, Modality] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for i, _child in enumerate(module):
            path = f"{name}.{i}"
            if any(a.startswith(path + ".") for a in attention_names):
                blocks[path] = modality_of(path)
    heads = tuple(n for n in linears if rule and any(fnmatch.fnmatchcase(n, p) for p in rule.heads))
    decoder = tuple(b for b in blocks if rule and rule.decoder and fnmatch.fnmatchcase(b, rule.decoder))
    return FamilyInfo(
        family=rule.name if rule else "generic",
        blocks=blocks,
        linear_modality={n: modality_of(n) for n in linears},
        heads=heads,
        attentions=tuple(attentions),
        mlps=tuple(find_mlps(model, modality_of)),
        decoder_layers=decoder,
        _rule=rule,
    )
