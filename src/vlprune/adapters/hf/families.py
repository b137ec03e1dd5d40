"""Model-family knowledge for transformers models: which modules are vision, language, fusion;
attention modules with their head counts; MLP (up, down) pairs; output heads; decoder layers.

Structure is read generically off the model itself, so it stays right after a model was pruned:

- attention: a module whose child ``nn.Linear`` s are ``q_proj/k_proj/v_proj`` (output
  ``o_proj``/``out_proj``/``dense``/``proj``), BERT-style ``query/key/value`` (output: the sibling
  ``output.dense``), or one fused ``qkv`` (output ``projection``/``proj``/``out_proj``/``o_proj``);
- MLP: ``fc1/fc2``, ``up_proj/down_proj`` (+ ``gate_proj``), or a layer with
  ``intermediate.dense`` / ``output.dense``;
- blocks: the elements of an ``nn.ModuleList`` that contain an attention (innermost such lists, so a
  list of stages holding lists of blocks gives the blocks), in registration order.

A :class:`FamilyRule` adds what cannot be read off the modules: each path's modality, which linears
are output heads, and where the decoder layers are. Built-in rules (:data:`BUILTIN_RULES`) cover
CLIP, SigLIP (two-tower and single-tower models), ViT/DeiT, DINOv2, BLIP, ViLT and LLaVA-like models
(transformers 5.x paths, e.g. ``model.vision_tower.encoder.layers.N``,
``model.multi_modal_projector``, ``model.language_model.layers.N``, ``lm_head``), and decoder-only
language models (family ``decoder_lm``: Llama, Mistral, Qwen, Gemma, Phi, OPT, ... by model type,
others by structure: token embeddings + a ``layers`` list, no vision tower; all modules
``language``, decoder layers ``*layers.N``). Anything else gets the generic description with
modality ``"unknown"``, a ``UserWarning`` and a log line.

Modality rule: a rule's ``modalities`` are ``(glob pattern, modality)`` pairs matched with
:func:`fnmatch.fnmatchcase` against the full module path; the first match wins (built-in rules list
the more specific patterns first, e.g. BLIP's ``crossattention`` before ``text_decoder*``);
no match gives ``"unknown"``.

Head-count rule (right for pruned models): let ``q_out`` / ``k_out`` be the query / key linears'
``out_features`` (a fused ``qkv`` gives ``q_out = k_out = out_features / 3``).

1. ``head_dim`` is taken from the module (``head_dim`` or ``attention_head_size``), else from its
   config or the model config (``head_dim``, else ``hidden_size // num_attention_heads``). If it
   divides ``q_out`` and ``k_out``: ``num_heads = q_out // head_dim``,
   ``num_kv_heads = k_out // head_dim`` (whole heads were pruned; stale ``num_heads`` attributes are
   ignored).
2. Otherwise the declared head count (module ``num_heads`` / ``num_attention_heads``, else the
   config's ``num_attention_heads``) is kept and ``head_dim = q_out // num_heads`` (head dims were
   pruned).
3. If neither fits, the attention is skipped with a log warning.

Example:
    >>> from vlprune.testbed.tiny import tiny_model
    >>> info = describe(tiny_model("llava"))
    >>> info.family, info.modality_of("model.multi_modal_projector.linear_1")
    ('llava', 'fusion')
    >>> [(a.num_heads, a.num_kv_heads) for a in info.attentions if a.modality == "language"][0]
    (4, 2)
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from vlprune.errors import ModelStructureError
from vlprune.plugins.structure import MLPLayout, find_decoder_layers, join, linear_child, mlp_layouts

__all__ = [
    "Modality",
    "AttentionInfo",
    "MLPInfo",
    "FamilyInfo",
    "FamilyRule",
    "BUILTIN_RULES",
    "FAMILIES",
    "describe",
    "default_id_modules",
    "find_attentions",
    "find_mlps",
    "AttentionLayout",
    "MLPLayout",
    "attention_layouts",
    "mlp_layouts",
]

logger = logging.getLogger(__name__)

Modality = Literal["vision", "language", "fusion", "unknown"]


@dataclass(frozen=True)
class AttentionInfo:
    """One attention module.

    Attributes:
        name: path of the module holding the q/k/v linears (for BERT-style attention the ``.self``
            / ``.attention`` submodule).
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
    """What a family adds to the generic structure; register more by passing ``rules=`` to
    :func:`describe` (e.g. ``(*BUILTIN_RULES, my_rule)``), later through a pluggy hook.

    Attributes:
        name: family name (several rules may share one, e.g. CLIP and its single-tower models).
        model_types: ``config.model_type`` values it applies to.
        modalities: (glob pattern on the full module path, modality) pairs; the first match wins.
        heads: glob patterns of output heads / projections (usually neither pruned nor profiled).
        decoder: glob on full module paths of the language-model decoder layers (the elements of
            ``nn.ModuleList`` s it matches, outermost only: see
            :func:`vlprune.plugins.structure.find_decoder_layers`), or "".
        match: optional extra test on the model (class, structure) for models whose
            ``model_type`` is not listed.

    Example:
        >>> rule = FamilyRule("mine", ("my_model",), (("enc*", "vision"), ("*", "language")),
        ...                   heads=("lm_head",), decoder="dec.layers.*")
    """

    name: str
    model_types: tuple[str, ...]
    modalities: tuple[tuple[str, Modality], ...]
    heads: tuple[str, ...] = ()
    decoder: str = ""
    match: Callable[[nn.Module], bool] | None = None

    def matches(self, model: nn.Module) -> bool:
        """True if this rule describes ``model``.

        Args:
            model: the model.

        Returns:
            ``config.model_type`` is one of :attr:`model_types`, or :attr:`match` accepts the model.
        """
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in self.model_types:
            return True
        return bool(self.match is not None and self.match(model))


def _llava_like(model: nn.Module) -> bool:
    """A vision tower, a multi-modal projector and a language model (Mistral3, PaliGemma, ...)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_children()}
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        names |= {n for n, _ in inner.named_children()}
    return {"vision_tower", "multi_modal_projector", "language_model"} <= names


def _decoder_lm_like(model: nn.Module) -> bool:
    """A decoder-only language model: token embeddings and a list of ``layers`` (``model.layers``,
    ``layers`` or ``model.decoder.layers``) and no vision tower."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "vision_config", None) is not None:
        return False
    modules = dict(model.named_modules())
    has_layers = any(isinstance(modules.get(p), nn.ModuleList) for p in ("model.layers", "layers", "model.decoder.layers"))
    has_embed = any(n.endswith("embed_tokens") for n in modules)
    return has_layers and has_embed and not any("vision" in n for n in modules)


#: model types of common decoder-only language models (others match by structure)
_DECODER_LM_TYPES: tuple[str, ...] = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi", "phi3", "olmo", "olmo2", "granite", "stablelm", "starcoder2", "opt", "cohere", "smollm3",
)

_CLIP_LIKE: tuple[tuple[str, Modality], ...] = (
    ("vision_model*", "vision"),
    ("visual_projection", "vision"),
    ("text_model*", "language"),
    ("text_projection", "language"),
    ("classifier*", "vision"),  # CLIP/SigLIP ForImageClassification: vision tower only
    ("*", "unknown"),
)
_CLIP_HEADS = ("visual_projection", "text_projection", "classifier*")
# SigLIP's attention-pooling head (vision) and text head
_SIGLIP_HEADS = ("text_model.head", "vision_model.head.*", "classifier*")

BUILTIN_RULES: tuple[FamilyRule, ...] = (
    FamilyRule("clip", ("clip",), _CLIP_LIKE, heads=_CLIP_HEADS),
    FamilyRule("clip", ("clip_vision_model",), (("*", "vision"),), heads=_CLIP_HEADS),
    FamilyRule("clip", ("clip_text_model",), (("*", "language"),), heads=_CLIP_HEADS),
    FamilyRule("siglip", ("siglip", "siglip2"), _CLIP_LIKE, heads=_SIGLIP_HEADS),
    FamilyRule("siglip", ("siglip_vision_model", "siglip2_vision_model"), (("*", "vision"),),
               heads=("head.*", "vision_model.head.*")),
    FamilyRule("siglip", ("siglip_text_model", "siglip2_text_model"), (("*", "language"),),
               heads=("head", "text_model.head")),
    FamilyRule("vit", ("vit", "deit", "vit_mae", "vit_msn"), (("*", "vision"),),
               heads=("classifier", "cls_classifier", "distillation_classifier", "*pooler.dense", "decoder.decoder_pred")),
    FamilyRule("dinov2", ("dinov2", "dinov2_with_registers"), (("*", "vision"),), heads=("classifier",)),
    FamilyRule(
        "blip",
        ("blip",),
        (
            ("vision_model*", "vision"),
            ("vision_proj", "vision"),
            ("*crossattention*", "fusion"),
            ("itm_head", "fusion"),
            ("text_decoder*", "language"),
            ("text_encoder*", "language"),
            ("text_proj", "language"),
            ("*", "unknown"),
        ),
        heads=("text_decoder.cls.*", "vision_proj", "text_proj", "itm_head"),
        decoder="text_decoder.bert.encoder.layer.*",
    ),
    FamilyRule(
        "vilt",
        ("vilt",),
        (
            ("*embeddings.text_embeddings*", "language"),
            ("*embeddings.patch_embeddings*", "vision"),
            ("*", "fusion"),  # single stream: every transformer layer sees both modalities
        ),
        heads=("pooler.dense", "vilt.pooler.dense", "classifier*", "rank_output", "mlm_score.*"),
    ),
    FamilyRule(
        "llava",
        ("llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava", "mistral3",
         "aya_vision", "paligemma"),
        (
            ("*vision_tower*", "vision"),
            ("*multi_modal_projector*", "fusion"),
            ("*language_model*", "language"),
            ("lm_head", "language"),
            ("*", "unknown"),
        ),
        # lm_head; a SigLIP tower's pooling head, whose output LLaVA-like models do not use
        heads=("lm_head", "*vision_tower.head.*", "*vision_tower.vision_model.head.*"),
        decoder="*language_model.layers.*",
        match=_llava_like,
    ),
    FamilyRule(
        "decoder_lm",
        _DECODER_LM_TYPES,
        (("*", "language"),),
        heads=("lm_head", "score", "classifier"),
        decoder="*layers.*",
        match=_decoder_lm_like,
    ),
)

#: built-in family names, in rule order, without duplicates
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(r.name for r in BUILTIN_RULES))


@dataclass(frozen=True)
class FamilyInfo:
    """What vlprune knows about a model's structure.

    Attributes:
        family: the rule's name, or ``"generic"``.
        blocks: transformer block path -> modality, in registration order (forward order within
            each stack; LLaVA/BLIP list the vision tower first, as their forward runs it first).
        linear_modality: every ``nn.Linear`` path -> modality (heads included).
        heads: output heads / projections (usually neither pruned nor profiled).
        attentions: the attention modules (none whose q/k/v are heads).
        mlps: the MLPs (none whose up or down linear is a head).
        decoder_layers: language-model decoder layer paths (empty if none), as
            :func:`vlprune.plugins.structure.find_decoder_layers` finds them with the rule's
            ``decoder`` glob (the layers the layer criteria score and ``remove_layers`` indexes).
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
        """The modality of any module path.

        Args:
            module_name: a module path such as ``"vision_model.encoder.layers.0.mlp.fc1"``.

        Returns:
            The modality of the rule's first matching pattern, ``"unknown"`` if none matches or the
            family is generic.

        Example:
            >>> info.modality_of("model.language_model.layers.0.mlp.up_proj")  # doctest: +SKIP
            'language'
        """
        return _modality(self._rule, module_name)

    def modules_of(self, modality: Modality) -> list[str]:
        """The ``nn.Linear`` paths of ``modality``, output heads excluded.

        Args:
            modality: ``"vision"``, ``"language"``, ``"fusion"`` or ``"unknown"``.

        Returns:
            Paths in registration order.

        Example:
            >>> info.modules_of("fusion")  # doctest: +SKIP
            ['model.multi_modal_projector.linear_1', 'model.multi_modal_projector.linear_2']
        """
        heads = set(self.heads)
        return [n for n, m in self.linear_modality.items() if m == modality and n not in heads]


def _modality(rule: FamilyRule | None, name: str) -> Modality:
    if rule is None:
        return "unknown"
    for pattern, modality in rule.modalities:
        if fnmatch.fnmatchcase(name, pattern):
            return modality
    return "unknown"


def _positive_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _get(obj: object, attr: str) -> object:
    """``getattr`` that also survives configs raising on ambiguous per-layer attributes."""
    try:
        return getattr(obj, attr, None)
    except (AttributeError, RuntimeError):
        return None


def _config_head_dim(model: nn.Module, module: nn.Module) -> int | None:
    for cfg in (_get(module, "config"), _get(model, "config")):
        if cfg is None:
            continue
        hd = _positive_int(_get(cfg, "head_dim"))
        if hd:
            return hd
        hidden = _positive_int(_get(cfg, "hidden_size"))
        heads = _positive_int(_get(cfg, "num_attention_heads"))
        if hidden and heads:
            return hidden // heads
    return None


def _head_dim(model: nn.Module, module: nn.Module) -> int | None:
    """``head_dim`` from the module's attributes, else from its config / the model config."""
    for attr in ("head_dim", "attention_head_size"):
        value = _positive_int(_get(module, attr))
        if value:
            return value
    return _config_head_dim(model, module)


def _declared_heads(model: nn.Module, module: nn.Module) -> int | None:
    """Query heads the module (else its config, else the model config) declares."""
    for attr in ("num_heads", "num_attention_heads"):
        value = _positive_int(_get(module, attr))
        if value:
            return value
    for cfg in (_get(module, "config"), _get(model, "config")):
        value = _positive_int(_get(cfg, "num_attention_heads"))
        if value:
            return value
    return None


def _head_shape(model: nn.Module, name: str, module: nn.Module, q_out: int, k_out: int) -> tuple[int, int, int] | None:
    """(num_heads, num_kv_heads, head_dim) from the linear shapes; see the module docstring."""
    hd = _head_dim(model, module)
    if hd and q_out % hd == 0 and k_out % hd == 0 and q_out >= hd and k_out >= hd:
        return q_out // hd, k_out // hd, hd
    heads = _declared_heads(model, module)
    if heads and q_out % heads == 0:
        hd = q_out // heads
        if k_out % hd == 0:
            return heads, k_out // hd, hd
    logger.warning(
        "attention %s: %d query / %d key channels fit neither head_dim=%s nor num_heads=%s; skipped",
        name, q_out, k_out, hd, heads,
    )
    return None


_OUT_NAMES = ("o_proj", "out_proj", "dense", "proj", "projection")


def _declared_head_attr(module: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention module's projections are.

    Attributes:
        name: path of the module that holds the head attributes (``num_heads`` ...).
        q, k, v: paths of the query / key / value linears (all three the same path when fused).
        o: path of the output projection, or ``None`` if it was not found.
        fused: one ``qkv`` linear whose output is ``[q | k | v]``.
    """

    name: str
    q: str
    k: str
    v: str
    o: str | None
    fused: bool = False


def attention_layouts(model: nn.Module) -> list[AttentionLayout]:
    """Where the q/k/v/output linears of every attention are, from names alone (no head counts:
    valid even when the shapes no longer fit any head layout, which sync code needs).

    Args:
        model: any ``nn.Module`` (typically a transformers model).

    Returns:
        One :class:`AttentionLayout` per attention, in module order.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> [a.q for a in attention_layouts(tiny_model("vit"))][:1]
        ['vit.layers.0.attention.q_proj']
    """
    modules = dict(model.named_modules())
    found: list[AttentionLayout] = []
    for name, module in modules.items():
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if all(linear_child(module, x) is not None for x in (q, k, v)):
                out = next((join(name, o) for o in _OUT_NAMES if linear_child(module, o) is not None), None)
                if out is None:  # BERT style: <attention>.self.{query,key,value} + <attention>.output.dense
                    parent = name.rpartition(".")[0]
                    sibling = modules.get(join(parent, "output.dense")) if name else None
                    out = join(parent, "output.dense") if isinstance(sibling, nn.Linear) else None
                found.append(AttentionLayout(name, join(name, q), join(name, k), join(name, v), out))
                break
        else:
            if linear_child(module, "qkv") is not None and _declared_head_attr(module) is not None:
                out = next((join(name, o) for o in _OUT_NAMES if linear_child(module, o) is not None), None)
                qkv = join(name, "qkv")
                found.append(AttentionLayout(name, qkv, qkv, qkv, out, fused=True))
    return found


def _unknown(_name: str) -> Modality:
    return "unknown"


def find_attentions(model: nn.Module, modality_of: Callable[[str], Modality] = _unknown) -> list[AttentionInfo]:
    """Attention modules of ``model`` (q_proj/k_proj/v_proj, query/key/value, or fused qkv).

    Args:
        model: any ``nn.Module``.
        modality_of: maps a module path to its modality (default: always ``"unknown"``).

    Returns:
        One :class:`AttentionInfo` per attention, in registration order; head counts follow the
        rule in the module docstring.

    Example:
        >>> [a.num_heads for a in find_attentions(tiny_model("vit"))]  # doctest: +SKIP
        [4, 4]
    """
    modules = dict(model.named_modules())
    found: list[AttentionInfo] = []
    for lay in attention_layouts(model):
        if lay.o is None:
            continue
        if lay.fused:
            q_out = k_out = modules[lay.q].out_features // 3
        else:
            q_out, k_out = modules[lay.q].out_features, modules[lay.k].out_features
        shape = _head_shape(model, lay.name, modules[lay.name], q_out, k_out)
        if shape is None:
            continue
        heads, kv_heads, hd = shape
        found.append(AttentionInfo(lay.name, lay.q, lay.k, lay.v, lay.o, heads, kv_heads, hd, modality_of(lay.name)))
    return found


def find_mlps(model: nn.Module, modality_of: Callable[[str], Modality] = _unknown) -> list[MLPInfo]:
    """MLPs of ``model``: fc1/fc2, gate_proj/up_proj/down_proj, or BERT-style intermediate/output.

    Args:
        model: any ``nn.Module``.
        modality_of: maps a module path to its modality (default: always ``"unknown"``).

    Returns:
        One :class:`MLPInfo` per MLP whose up width equals its down input width, in registration order.

    Example:
        >>> [m.hidden for m in find_mlps(tiny_model("vit"))]  # doctest: +SKIP
        [64, 64]
    """
    modules = dict(model.named_modules())
    found: list[MLPInfo] = []
    for lay in mlp_layouts(model):
        if modules[lay.up].out_features != modules[lay.down].in_features:
            logger.debug("%s: %s and %s do not chain; not an MLP", lay.name, lay.up, lay.down)
            continue
        found.append(MLPInfo(lay.name, lay.up, lay.down, lay.gate, modules[lay.up].out_features, modality_of(lay.name)))
    return found


def _find_blocks(model: nn.Module, attention_names: Sequence[str]) -> list[str]:
    """Elements of ``nn.ModuleList`` s that contain an attention; innermost level only."""
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        for i in range(len(module)):
            path = f"{name}.{i}" if name else str(i)
            if any(a.startswith(path + ".") for a in attention_names):
                candidates.append(path)
    return [p for p in candidates if not any(c.startswith(p + ".") for c in candidates)]


def describe(model: nn.Module, rules: Sequence[FamilyRule] | None = None) -> FamilyInfo:
    """Describe a transformers model's structure and modalities.

    Args:
        model: the model (pruned or not).
        rules: family rules to try in order (default: the rules plugins register through the
            ``vlprune_register_families`` hook, then :data:`BUILTIN_RULES`); the first that
            matches wins. With none matching, the generic description is returned (modality
            ``"unknown"``) with a ``UserWarning`` and a log warning.

    Returns:
        A :class:`FamilyInfo`.

    Raises:
        ModelStructureError: the model has no ``nn.Linear`` at all.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> info = describe(tiny_model("clip"))
        >>> info.family, info.heads
        ('clip', ('visual_projection', 'text_projection'))
        >>> info.blocks["vision_model.encoder.layers.0"]
        'vision'
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelStructureError(
            f"{type(model).__name__} has no nn.Linear layer; nothing vlprune can describe "
            "(pass a transformer model whose projections are nn.Linear)"
        )
    if rules is None:
        from vlprune.plugins.registry import family_rules

        candidates: tuple[FamilyRule, ...] = (*family_rules(), *BUILTIN_RULES)
    else:
        candidates = tuple(rules)
    rule = next((r for r in candidates if r.matches(model)), None)
    if rule is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        message = (
            f"unknown model family ({type(model).__name__}, model_type={model_type!r}); using the generic "
            "description: every nn.Linear, modality 'unknown'. Pass rules=(*BUILTIN_RULES, FamilyRule(...)) "
            "to describe it"
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        logger.warning(message)

    def modality_of(name: str) -> Modality:
        return _modality(rule, name)

    heads = tuple(n for n in linears if rule is not None and any(fnmatch.fnmatchcase(n, p) for p in rule.heads))
    head_set = set(heads)
    attentions = [a for a in find_attentions(model, modality_of) if not {a.q, a.k, a.v} <= head_set]
    mlps = [m for m in find_mlps(model, modality_of) if m.up not in head_set and m.down not in head_set]
    blocks = {b: modality_of(b) for b in _find_blocks(model, [a.name for a in attentions])}
    # the one decoder finder (layer criteria and remove_layers use it too), given this rule's glob
    decoder = tuple(find_decoder_layers(model, rule.decoder)) if rule is not None and rule.decoder else ()
    info = FamilyInfo(
        family=rule.name if rule is not None else "generic",
        blocks=blocks,
        linear_modality={n: modality_of(n) for n in linears},
        heads=heads,
        attentions=tuple(attentions),
        mlps=tuple(mlps),
        decoder_layers=decoder,
        _rule=rule,
    )
    logger.debug(
        "%s: family %s, %d blocks, %d attentions, %d MLPs, heads %s",
        type(model).__name__, info.family, len(blocks), len(attentions), len(mlps), heads,
    )
    return info


def default_id_modules(model: nn.Module, info: FamilyInfo | None = None) -> list[str]:
    """The modules ``vlprune.estimate_ids`` profiles when ``modules`` is not given.

    * A model of a known family: every ``nn.Linear`` except its output heads / projections (the
      ID-pruning paper's official choice), and in any case every linear of an MLP or attention
      :func:`describe` found, i.e. every root Torch-Pruning may prune through
      ``hf_pruner_kwargs``, so ``IDWeightedImportance`` finds an ID for each of its groups; and the
      linears of MLPs inside output heads (SigLIP's attention-pooling head ``head.mlp.fc1/fc2``),
      which a plain Torch-Pruning script without ``hf_pruner_kwargs`` may prune.
    * Any other model (a plain ``nn.Sequential``, a hand-built CNN): every ``nn.Linear`` and
      ``nn.Conv1d/2d/3d`` (:func:`vlprune.plugins.intrinsic_dim.prunable_modules`), modality
      ``"unknown"``; which layer is an output head cannot be told from the modules, so none is left out.

    Args:
        model: the model.
        info: its :func:`describe` result, if already computed.

    Returns:
        Module paths in registration order.

    Raises:
        ModelStructureError: nothing to profile; pass ``modules=`` to ``estimate_ids``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> names = default_id_modules(tiny_model("clip"))
        >>> "visual_projection" in names, "vision_model.encoder.layers.0.mlp.fc1" in names
        (False, True)
    """
    from vlprune.plugins.intrinsic_dim import prunable_modules

    has_linear = any(isinstance(m, nn.Linear) for m in model.modules())
    if info is None and has_linear:
        info = describe(model)
    if info is None or info.family == "generic":
        return prunable_modules(model)
    heads = set(info.heads)
    pruned = {p for m in info.mlps for p in (m.up, m.gate, m.down) if p}
    pruned |= {p for a in info.attentions for p in (a.q, a.k, a.v, a.o)}
    # MLPs inside output heads too (SigLIP's attention-pooling head: head.mlp.fc1/fc2): a plain
    # Torch-Pruning script may prune their hidden neurons, so IDWeightedImportance needs their ID
    pruned |= {p for m in mlp_layouts(model) for p in (m.up, m.gate, m.down) if p}
    names = [n for n in info.linear_modality if n not in heads or n in pruned]
    if not names:
        raise ModelStructureError(
            f"{type(model).__name__} has no nn.Linear outside its output heads {list(heads)[:3]}; "
            "pass modules=[...] to estimate_ids"
        )
    return names
