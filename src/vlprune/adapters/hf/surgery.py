"""Surgery on transformers models: bookkeeping after Torch-Pruning, save and reload pruned models.

Torch-Pruning changes the *shapes* of a model's linears, norms and embeddings; it does not know
what the attention modules of a transformers model remember about those shapes (``num_heads``,
``head_dim``, ``num_key_value_groups``, ``all_head_size`` ...) nor what the config says
(``intermediate_size``, ``hidden_size`` ...). :func:`sync_hf_model` recomputes them from the weight
shapes, so the pruned model runs, and runs *correctly* (a stale ``head_dim`` can reshape the
queries into the wrong heads without any error).

A stock config cannot describe per-layer widths, or heads narrower than ``hidden_size /
num_heads``, so ``from_pretrained`` alone cannot reload a pruned model. :func:`save_pruned` writes
``save_pretrained`` output plus :data:`SHAPES_FILE`, a JSON record of every module whose parameter
shapes or simple attributes differ from a fresh model built from the saved config, and of the
weights that are tied. :func:`load_pruned` rebuilds the model from its config (nothing is
downloaded), applies the record and loads the weights strictly. The model object is never pickled.

Everything is detected from the model itself (module names and shapes), not from a list of
supported families: attentions are modules with ``q_proj/k_proj/v_proj`` or ``query/key/value``
linear children (BERT style, output ``dense`` in the sibling ``output`` module) or a fused ``qkv``
linear; MLPs are ``fc1/fc2``, ``(gate_proj,) up_proj/down_proj`` or BERT's
``intermediate.dense/output.dense``.

Example:
    >>> import torch_pruning as tp                                  # doctest: +SKIP
    >>> pruner = tp.pruner.BasePruner(model, inputs, importance=imp, pruning_ratio=0.4,
    ...     global_pruning=True, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
    ...     ignored_layers=ignored)                                 # doctest: +SKIP
    >>> pruner.step()                                               # doctest: +SKIP
    >>> sync_hf_model(model, pruned="heads")                        # doctest: +SKIP
    >>> save_pruned(model, "pruned/")                               # doctest: +SKIP
    >>> model = load_pruned("pruned/")                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlprune.adapters.hf.families import AttentionLayout, MLPLayout
from vlprune.adapters.hf.families import attention_layouts as find_attentions
from vlprune.adapters.hf.families import mlp_layouts as find_mlps
from vlprune.errors import ModelStructureError, VLPruneError

__all__ = [
    "sync_hf_model",
    "save_pruned",
    "load_pruned",
    "find_attentions",
    "find_mlps",
    "AttentionLayout",
    "MLPLayout",
    "SHAPES_FILE",
    "ATTENTION_ATTRS",
]

logger = logging.getLogger(__name__)

#: name of the shape record :func:`save_pruned` writes next to the weights
SHAPES_FILE = "vlprune_shapes.json"
_FORMAT = "vlprune.shapes/1"

#: integer attention attributes :func:`sync_hf_model` keeps in step with the weight shapes
ATTENTION_ATTRS: tuple[str, ...] = (
    "num_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "num_key_value_groups",
    "head_dim",
    "attention_head_size",
    "all_head_size",
    "embed_dim",
)
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_SCALE_ATTRS = ("scale", "scaling", "softmax_scale")
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_dim", "partial_rotary_factor")



# ---------------------------------------------------------------------------------------------
# structure detection (generic: names and shapes only)
# ---------------------------------------------------------------------------------------------


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _head_count_attr(module: nn.Module) -> int | None:
    return _int_attr(module, _HEAD_COUNT_ATTRS)


def _owner_config(modules: dict[str, nn.Module], path: str) -> Any:
    """The config of the innermost module on ``path`` (itself included) that has one."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:i]))
        cfg = getattr(module, "config", None) if module is not None else None
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _config_key(model: nn.Module, cfg: Any) -> str:
    root = getattr(model, "config", None)
    if cfg is root:
        return "config"
    if root is not None:
        for attr in getattr(root, "sub_configs", None) or ():
            if getattr(root, attr, None) is cfg:
                return f"config.{attr}"
        for attr, value in vars(root).items():
            if value is cfg:
                return f"config.{attr}"
    return f"config:{getattr(cfg, 'model_type', type(cfg).__name__)}"


# ---------------------------------------------------------------------------------------------
# sync_hf_model
# ---------------------------------------------------------------------------------------------


@dataclass
class _AttnState:
    layout: AttentionLayout
    module: nn.Module
    q_in: int
    q_out: int
    k_out: int
    heads0: int | None
    head_dim0: int | None
    kv0: int | None
    rotary: bool


def _attn_state(modules: dict[str, nn.Module], att: AttentionLayout) -> _AttnState:
    module = modules[att.name]
    q, k, v = modules[att.q], modules[att.k], modules[att.v]
    o = modules[att.o] if att.o else None
    if att.fused:
        if q.out_features % 3:
            raise ModelStructureError(f"attention {att.name}: fused qkv width {q.out_features} is not 3 x a width")
        q_out = k_out = v_out = q.out_features // 3
    else:
        q_out, k_out, v_out = q.out_features, k.out_features, v.out_features
    if k_out != v_out:
        raise ModelStructureError(
            f"attention {att.name}: key width {k_out} != value width {v_out}; Torch-Pruning must prune "
            "keys and values together (pass q, k and v in num_heads)"
        )
    if o is not None and o.in_features != q_out:
        raise ModelStructureError(
            f"attention {att.name}: output projection takes {o.in_features} channels but the query gives "
            f"{q_out}; value heads narrower than query heads are not supported"
        )
    cfg = _owner_config(modules, att.name)
    heads0 = _head_count_attr(module)
    if heads0 is None and cfg is not None:
        heads0 = _int_attr(cfg, ("num_attention_heads",))
    head_dim0 = _int_attr(module, _HEAD_DIM_ATTRS)
    if head_dim0 is None and heads0:
        width = _int_attr(module, ("all_head_size", "inner_dim", "embed_dim"))
        if width and width % heads0 == 0:
            head_dim0 = width // heads0
    kv0 = _int_attr(module, ("num_key_value_heads",))
    groups = _int_attr(module, ("num_key_value_groups",))
    if kv0 is None and heads0:
        kv0 = heads0 // groups if groups else heads0
    rotary = cfg is not None and any(getattr(cfg, key, None) is not None for key in _ROPE_KEYS)
    return _AttnState(att, module, q.in_features, q_out, k_out, heads0, head_dim0, kv0, rotary)


def _is_consistent(state: _AttnState) -> bool:
    """The module's remaining attributes already describe its weight shapes."""
    module, hd = state.module, state.head_dim0
    if hd is None or state.q_out % hd or state.k_out % hd:
        return False
    heads, kv = state.q_out // hd, state.k_out // hd
    if kv == 0 or heads % kv:
        return False
    expected = {
        "num_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_key_value_groups": heads // kv,
        "all_head_size": heads * hd,
    }
    if _head_count_attr(module) is None and _int_attr(module, ("num_key_value_groups",)) is None:
        # nothing records the head count: consistent only if the shapes are the original ones
        return state.heads0 is not None and heads == state.heads0 and kv == state.kv0
    return all(getattr(module, a) == v for a, v in expected.items() if _int_attr(module, (a,)) is not None)


def _explain(state: _AttnState, mode: str) -> tuple[int, int, int] | str:
    """(heads, kv_heads, head_dim) under ``mode``, or why the shapes do not fit it."""
    name = state.layout.name
    if mode == "heads":
        hd = state.head_dim0
        if hd is None:
            return f"attention {name}: its head_dim is unknown (no head_dim / attention_head_size attribute)"
        if state.q_out % hd or state.k_out % hd:
            return f"attention {name}: {state.q_out} query / {state.k_out} key channels are not whole heads of {hd}"
        heads, kv = state.q_out // hd, state.k_out // hd
    else:
        heads, kv = state.heads0, state.kv0
        if not heads or not kv:
            return f"attention {name}: its number of heads is unknown (no num_heads attribute or config)"
        if state.q_out % heads or state.k_out % kv or state.q_out // heads != state.k_out // kv:
            return (
                f"attention {name}: {state.q_out} query / {state.k_out} key channels do not split into "
                f"{heads} / {kv} heads of one size"
            )
        hd = state.q_out // heads
        if state.rotary and hd != state.head_dim0:
            return (
                f"attention {name}: rotary position embeddings fix head_dim at {state.head_dim0}; "
                "prune whole heads"
            )
    if heads < 1 or kv < 1 or heads % kv:
        return (
            f"attention {name}: {heads} query heads cannot share {kv} key/value heads evenly; in GQA "
            "attention prune the same number of query heads from every key/value group, or leave it out"
        )
    if state.layout.fused and heads * hd != state.q_in:
        return (
            f"attention {name}: a fused qkv attention derives its head size from the input width "
            f"({state.q_in}), so its heads cannot be pruned; add its qkv linear to ignored_layers"
        )
    return heads, kv, hd


def _attention_changes(state: _AttnState, heads: int, kv: int, hd: int) -> dict[str, int]:
    values = {
        "num_heads": heads,
        "num_attention_heads": heads,
        "n_heads": heads,
        "num_key_value_heads": kv,
        "num_key_value_groups": heads // kv,
        "head_dim": hd,
        "attention_head_size": hd,
        "head_size": hd,
        "all_head_size": heads * hd,
        "embed_dim": state.q_in,
    }
    module = state.module
    return {a: v for a, v in values.items() if _int_attr(module, (a,)) is not None and getattr(module, a) != v}


def sync_hf_model(
    model: nn.Module, *, pruned: Literal["heads", "head_dim", "auto"] = "auto"
) -> dict[str, dict[str, int | float]]:
    """Bring a transformers model's bookkeeping in line with its (pruned) weight shapes.

    Attention modules: ``num_heads`` / ``num_attention_heads`` / ``num_key_value_heads`` /
    ``num_key_value_groups`` / ``head_dim`` / ``attention_head_size`` / ``all_head_size`` /
    ``embed_dim`` follow the q/k/v linears' shapes.

    - ``pruned="heads"``: Torch-Pruning removed whole heads (``prune_num_heads=True,
      prune_head_dims=False``); ``head_dim`` is kept.
    - ``pruned="head_dim"``: it narrowed every head (``prune_num_heads=False``, its default); the
      number of heads is kept.
    - ``pruned="auto"``: the one of the two that explains every changed attention of the model;
      if both do (e.g. 4 heads of 8 became 16 channels: 2 heads of 8, or 4 of 4), a
      :class:`ModelStructureError` asks for ``pruned=``.

    Attention scale: always the one the original model used, since its weights were trained with
    it. With head pruning it is unchanged anyway. With head-dim pruning ``scale``/``scaling``
    attributes are left alone, and in modules that derive the scale from the head size at run
    time (BERT style: ``1/sqrt(attention_head_size)``) the factor ``sqrt(new/old head_dim)`` is
    folded into the query weights and bias, so q.k is scaled by ``1/sqrt(old head_dim)``: the
    pruned attention equals the original one with the removed dimensions zeroed.

    Configs: a config cannot hold per-layer widths, so only sizes that stay uniform are written:
    ``intermediate_size`` (or DINOv2's ``mlp_ratio``) when every MLP under that config has the same
    width; ``num_attention_heads`` / ``num_key_value_heads`` when every attention under it has the
    same head counts *and* the config states ``head_dim`` itself (else a config-built model would
    derive a wrong head_dim from them); ``hidden_size`` (and ``embed_dim`` / ``hidden_size``
    attributes of its modules) when every LayerNorm under that config has the same new width.
    LayerNorms whose ``normalized_shape`` lags behind their weight are fixed. Everything else is in
    the weight shapes, which :func:`save_pruned` records.

    Everything is checked before anything is changed: if this raises, the model is as it was.
    Calling it twice is harmless (the second call changes nothing).

    Args:
        model: the pruned model, changed in place.
        pruned: what Torch-Pruning removed in attention modules (see above).

    Returns:
        ``{module path or "config" / "config.<sub_config>": {attribute: new value}}`` of what changed.

    Raises:
        ModelStructureError: shapes that no head layout explains (GQA query heads that are no
            multiple of the key/value heads, a pruned fused qkv, ...), or an ambiguous ``"auto"``.
        VLPruneError: an unknown ``pruned`` value.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> sync_hf_model(tiny_model("vit"))  # nothing pruned: nothing to change
        {}
    """
    if pruned not in ("heads", "head_dim", "auto"):
        raise VLPruneError(f"pruned must be 'heads', 'head_dim' or 'auto', got {pruned!r}")
    modules = dict(model.named_modules())
    states = [_attn_state(modules, a) for a in find_attentions(model)]
    # plan everything first; nothing below changes the model until "apply"
    mode, attn_plan = _plan_attentions(model, states, pruned)
    config_plan = _plan_config_heads(modules, states, attn_plan)
    mlp_attrs, mlp_configs = _plan_mlps(model, modules)
    norm_shapes, hidden_attrs, hidden_configs = _plan_hidden(modules, skip={p.state.layout.name for p in attn_plan})
    config_plan += mlp_configs + hidden_configs
    # apply
    plan: dict[str, dict[str, int | float]] = {}
    with torch.no_grad():
        for item in attn_plan:
            for attr, value in item.changes.items():
                setattr(item.state.module, attr, value)
            if item.changes:
                plan[item.state.layout.name] = dict(item.changes)
            if item.fold is not None:
                q = modules[item.state.layout.q]
                q.weight.mul_(item.fold)
                if q.bias is not None:
                    q.bias.mul_(item.fold)
                logger.info("sync_hf_model: %s: query scaled by %.4f to keep the original attention scale",
                            item.state.layout.name, item.fold)
    for module, path, attr, value in mlp_attrs + hidden_attrs:
        setattr(module, attr, value)
        plan.setdefault(path, {})[attr] = value
    for norm, path, shape in norm_shapes:
        norm.normalized_shape = shape
        plan.setdefault(path, {})["normalized_shape"] = shape[0]
    for cfg, values in config_plan:
        for attr, value in values.items():
            setattr(cfg, attr, value)
        plan.setdefault(_config_key(model, cfg), {}).update(values)
    if plan:
        logger.info("sync_hf_model: updated %d module(s)/config(s) (attention mode %s)", len(plan), mode)
    return plan


@dataclass
class _AttnPlan:
    state: _AttnState
    layout: tuple[int, int, int]  # heads, kv heads, head_dim
    changes: dict[str, int]
    fold: float | None  # factor for the query weights (keeps the original scale), or None


def _plan_attentions(model: nn.Module, states: list[_AttnState], pruned: str) -> tuple[str, list[_AttnPlan]]:
    """The attention mode and, for every attention whose attributes lag behind its shapes, the new ones."""
    changed = [s for s in states if not _is_consistent(s)]
    mode = pruned
    if changed and pruned == "auto":
        fits = {m: [_explain(s, m) for s in changed] for m in ("heads", "head_dim")}
        ok = [m for m, res in fits.items() if all(isinstance(r, tuple) for r in res)]
        if not ok:
            reasons = [r for res in fits.values() for r in res if isinstance(r, str)]
            raise ModelStructureError(f"sync_hf_model: {reasons[0]} (neither whole heads nor narrower heads fit)")
        if len(ok) == 2 and fits["heads"] != fits["head_dim"]:
            example = changed[0]
            raise ModelStructureError(
                f"sync_hf_model: the attention shapes of {type(model).__name__} fit both whole-head and head-dim "
                f"pruning (e.g. {example.layout.name}: {example.q_out} query channels); pass pruned='heads' "
                "(Torch-Pruning prune_num_heads=True, prune_head_dims=False) or pruned='head_dim'"
            )
        mode = ok[0]
    plans = []
    for state in changed:
        res = _explain(state, mode)
        if isinstance(res, str):
            raise ModelStructureError(f"sync_hf_model(pruned={mode!r}): {res}")
        heads, kv, hd = res
        fold = None
        has_scale = any(isinstance(getattr(state.module, a, None), float) for a in _SCALE_ATTRS)
        if state.head_dim0 and hd != state.head_dim0 and not has_scale:
            fold = math.sqrt(hd / state.head_dim0)  # scale derived from the head size at run time
        plans.append(_AttnPlan(state, res, _attention_changes(state, heads, kv, hd), fold))
    return mode, plans


def _plan_config_heads(
    modules: dict[str, nn.Module], states: list[_AttnState], plans: list[_AttnPlan]
) -> list[tuple[Any, dict[str, int | float]]]:
    """Head counts for configs whose attentions all agree, where the config states head_dim itself."""
    planned = {p.state.layout.name: p.layout for p in plans}
    by_cfg: dict[int, tuple[Any, set[tuple[int, int, int]]]] = {}
    for state in states:
        cfg = _owner_config(modules, state.layout.name)
        if cfg is None:
            continue
        layout = planned.get(state.layout.name)
        if layout is None:
            hd = state.head_dim0 or 0
            layout = (state.q_out // hd, state.k_out // hd, hd) if hd else (0, 0, 0)
        by_cfg.setdefault(id(cfg), (cfg, set()))[1].add(layout)
    out: list[tuple[Any, dict[str, int | float]]] = []
    for cfg, layouts in by_cfg.values():
        if len(layouts) != 1 or not isinstance(vars(cfg).get("head_dim"), int):
            continue
        heads, kv, hd = next(iter(layouts))
        if hd != cfg.head_dim or not heads:
            continue
        new: dict[str, int | float] = {"num_attention_heads": heads}
        if isinstance(getattr(cfg, "num_key_value_heads", None), int):
            new["num_key_value_heads"] = kv
        new = {a: v for a, v in new.items() if getattr(cfg, a) != v}
        if new:
            out.append((cfg, new))
    return out


def _plan_mlps(
    model: nn.Module, modules: dict[str, nn.Module]
) -> tuple[list[tuple[nn.Module, str, str, int]], list[tuple[Any, dict[str, int | float]]]]:
    """``intermediate_size`` attributes of MLP modules, and config widths that stay uniform."""
    attrs: list[tuple[nn.Module, str, str, int]] = []
    widths: dict[int, tuple[Any, set[int]]] = {}
    for mlp in find_mlps(model):
        up, down = modules[mlp.up], modules[mlp.down]
        gate = modules[mlp.gate] if mlp.gate else None
        width = down.in_features
        if up.out_features != width or (gate is not None and gate.out_features != width):
            raise ModelStructureError(
                f"MLP {mlp.name}: up/gate give {up.out_features}/{gate.out_features if gate else '-'} "
                f"neurons but down takes {width}; prune them in one Torch-Pruning group"
            )
        for holder_path in dict.fromkeys((mlp.name, mlp.up.rpartition(".")[0])):
            holder = modules[holder_path]
            if _int_attr(holder, ("intermediate_size",)) is not None and holder.intermediate_size != width:
                attrs.append((holder, holder_path, "intermediate_size", width))
        cfg = _owner_config(modules, mlp.name)
        if cfg is not None:
            widths.setdefault(id(cfg), (cfg, set()))[1].add(width)
    configs: list[tuple[Any, dict[str, int | float]]] = []
    for cfg, sizes in widths.values():
        if len(sizes) != 1:
            logger.info("sync_hf_model: MLP widths differ per layer under %s; config left as is", type(cfg).__name__)
            continue
        width = next(iter(sizes))
        hidden = getattr(cfg, "hidden_size", None)
        if isinstance(getattr(cfg, "intermediate_size", None), int):
            if cfg.intermediate_size != width:
                configs.append((cfg, {"intermediate_size": width}))
        elif isinstance(getattr(cfg, "mlp_ratio", None), (int, float)) and isinstance(hidden, int):
            # DINOv2: width = int(hidden_size * mlp_ratio) (not for its SwiGLU variant)
            if int(hidden * cfg.mlp_ratio) != width and not getattr(cfg, "use_swiglu_ffn", False):
                if int(hidden * (width / hidden)) == width:
                    configs.append((cfg, {"mlp_ratio": width / hidden}))
    return attrs, configs


def _plan_hidden(
    modules: dict[str, nn.Module], skip: set[str]
) -> tuple[
    list[tuple[nn.LayerNorm, str, tuple[int, ...]]],
    list[tuple[nn.Module, str, str, int]],
    list[tuple[Any, dict[str, int | float]]],
]:
    """LayerNorm shapes lagging behind their weights, and a residual-stream width that changed
    uniformly under a config (``hidden_size``, ``embed_dim`` / ``hidden_size`` attributes)."""
    norm_shapes: list[tuple[nn.LayerNorm, str, tuple[int, ...]]] = []
    widths: dict[int, tuple[Any, set[int]]] = {}
    owner = {name: _owner_config(modules, name) for name in modules}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))
        if not is_norm or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            continue
        if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) != tuple(weight.shape):
            norm_shapes.append((module, name, tuple(weight.shape)))
        if owner[name] is not None:
            widths.setdefault(id(owner[name]), (owner[name], set()))[1].add(weight.shape[0])
    attrs: list[tuple[nn.Module, str, str, int]] = []
    configs: list[tuple[Any, dict[str, int | float]]] = []
    for cfg, sizes in widths.values():
        old = getattr(cfg, "hidden_size", None)
        if not isinstance(old, int) or isinstance(old, bool) or old in sizes:
            continue
        if len(sizes) != 1:
            logger.warning("sync_hf_model: norms under %s have widths %s; hidden_size left at %d",
                           type(cfg).__name__, sorted(sizes), old)
            continue
        new = next(iter(sizes))
        configs.append((cfg, {"hidden_size": new}))
        for name, module in modules.items():
            if owner[name] is not cfg or name in skip:
                continue
            for attr in ("embed_dim", "hidden_size"):
                value = getattr(module, attr, None)
                if value == old and isinstance(value, int) and not isinstance(value, bool):
                    attrs.append((module, name, attr, new))
    return norm_shapes, attrs, configs


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------

_SIMPLE = (bool, int, float, str, type(None))


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _is_simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _simple_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _is_simple(v)
    }


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise VLPruneError(f"cannot import the recorded model class {path!r}: {exc}") from exc
    if not isinstance(obj, type):
        raise VLPruneError(f"the recorded model class {path!r} is not a class")
    return obj


def _build_from_config(cls: type, config: Any, **kwargs: Any) -> nn.Module:
    """A model of ``cls`` built from ``config`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, **kwargs)
        return cls(config)


def _checkpoint_keys(model: nn.Module) -> dict[str, str]:
    """checkpoint key -> model key, for the keys ``save_pretrained`` renames (transformers 5.x
    reverts its weight conversions on save, e.g. ``vit.layers`` -> ``vit.encoder.layer``)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x saves model keys as they are
        return {}
    names = list(model.state_dict().keys())
    markers = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
    reverted = revert_weight_conversion(model, dict(markers))
    mapping: dict[str, str] = {}
    for saved, tensor in reverted.items():
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1:
            raise VLPruneError(
                f"{type(model).__name__}: save_pretrained merges or splits weights ({saved}); "
                "save_pruned cannot map them back"
            )
        original = names[int(tensor.item())]
        if saved != original:
            mapping[saved] = original
    return mapping


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    return [names for names in groups.values() if len(names) > 1]


def _main_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def save_pruned(model: nn.Module, directory: str | Path, *, progress: bool = False) -> Path:
    """Save a (pruned) transformers model so that :func:`load_pruned` rebuilds it exactly.

    Writes ``model.save_pretrained(directory)`` (config + safetensors) and :data:`SHAPES_FILE`:
    the model class, the transformers version, the attention implementation, dtypes, tied weights,
    and for every module whose parameter/buffer shapes or simple attributes (``in_features``,
    ``normalized_shape``, ``num_heads``, ``head_dim``, ``scale`` ...) differ from a fresh model
    built from ``model.config``: those shapes and attributes. Call :func:`sync_hf_model` first.

    Args:
        model: a ``transformers.PreTrainedModel``, pruned or not (not changed).
        directory: output directory (created if needed).
        progress: show transformers' "Writing model shards" progress bar.

    Returns:
        The directory, as a ``Path``.

    Raises:
        VLPruneError: not a transformers model, modules added/removed/replaced by other types,
            a reshaped non-persistent buffer, or weights ``save_pretrained`` renames irreversibly.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> save_pruned(tiny_model("vit"), "/tmp/vit_pruned")          # doctest: +SKIP
        PosixPath('/tmp/vit_pruned')
    """
    if not hasattr(model, "save_pretrained") or not hasattr(getattr(model, "config", None), "to_dict"):
        raise VLPruneError(
            f"save_pruned needs a transformers PreTrainedModel (with save_pretrained and config), "
            f"got {type(model).__name__}"
        )
    import transformers

    directory = Path(directory)
    cls = type(model)
    with torch.device("meta"):
        fresh = _build_from_config(cls, copy.deepcopy(model.config))
    fresh_modules = dict(fresh.named_modules())
    model_modules = dict(model.named_modules())
    extra = sorted(set(model_modules) - set(fresh_modules))
    missing = sorted(set(fresh_modules) - set(model_modules))
    if extra or missing:
        raise VLPruneError(
            f"{cls.__name__} differs from a model built from its config by more than shapes: "
            f"added {extra[:3]}, removed {missing[:3]}; update the config (e.g. num_hidden_layers) to match"
        )
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model_modules.items():
        ref = fresh_modules[name]
        if type(module) is not type(ref):
            raise VLPruneError(
                f"module {name!r} is a {type(module).__name__} but a config-built {cls.__name__} has a "
                f"{type(ref).__name__} there; save_pruned records shape changes only"
            )
        entry: dict[str, Any] = {}
        params = {
            p: (None if t is None else list(t.shape))
            for p, t in module._parameters.items()
            if (t is None) != (ref._parameters.get(p) is None)
            or (t is not None and tuple(t.shape) != tuple(ref._parameters[p].shape))
        }
        if params:
            entry["params"] = params
        buffers = {}
        for b, t in module._buffers.items():
            r = ref._buffers.get(b)
            if (t is None) != (r is None) or (t is not None and tuple(t.shape) != tuple(r.shape)):
                if b in module._non_persistent_buffers_set:
                    raise VLPruneError(f"non-persistent buffer {name}.{b} changed shape; it cannot be saved")
                dtype = None if t is None else str(t.dtype).removeprefix("torch.")
                buffers[b] = None if t is None else {"shape": list(t.shape), "dtype": dtype}
        if buffers:
            entry["buffers"] = buffers
        mine, theirs = _simple_attrs(module), _simple_attrs(ref)
        attrs = {
            a: _encode(v)
            for a, v in mine.items()
            if a not in theirs or theirs[a] != v or type(theirs[a]) is not type(v)
        }
        if attrs:
            entry["attrs"] = attrs
        if entry:
            entry["class"] = type(module).__name__
            changed[name] = entry
    del fresh, fresh_modules
    keys = _checkpoint_keys(model)
    main = _main_dtype(model)
    param_dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.dtype != main}
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not progress and bar_was_on:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bar_was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
    record = {
        "format": _FORMAT,
        "model_class": _class_path(cls),
        "model_type": getattr(model.config, "model_type", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(main).removeprefix("torch."),
        "param_dtypes": param_dtypes,
        "tied": _tied_groups(model),
        "modules": changed,
        "checkpoint_keys": keys,
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
    (directory / SHAPES_FILE).write_text(json.dumps(record, indent=1))
    logger.info("save_pruned: %d module(s) differ from the config-built model -> %s", len(changed), directory)
    return directory


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise VLPruneError(f"{directory} holds no weights (*.safetensors or pytorch_model*.bin)")


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / SHAPES_FILE
    if not path.is_file():
        raise VLPruneError(
            f"{directory} has no {SHAPES_FILE}, so it was not written by vlprune's save_pruned "
            "(an unpruned model loads with from_pretrained)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VLPruneError(f"{path} is not valid JSON ({exc}); re-save the model with save_pruned") from exc
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise VLPruneError(f"{path} has format {found!r}, expected {_FORMAT!r}; re-save with this vlprune version")
    for key in ("model_class", "modules", "tied", "checkpoint_keys", "dtype"):
        if key not in record:
            raise VLPruneError(f"{path} lacks {key!r}; the record is damaged, re-save with save_pruned")
    return record


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise VLPruneError(f"{SHAPES_FILE} names an unknown dtype {name!r}")
    return value


def load_pruned(directory: str | Path, model_class: type | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`, with its pruned shapes, in eval mode.

    The model is built from the saved config (``model_class._from_config``; nothing is
    downloaded, the caller's RNG state is untouched), the recorded modules get parameters of the
    recorded shapes and their recorded attributes, the saved tied weights are tied (and only
    those), then every parameter and persistent buffer is loaded strictly from the safetensors.

    Args:
        directory: the directory :func:`save_pruned` wrote.
        model_class: the transformers class to build (default: the recorded one). It must be the
            recorded class or a subclass of it.

    Returns:
        The model in eval mode; its outputs equal the saved model's.

    Raises:
        VLPruneError: no or a damaged record, an incompatible ``model_class`` or config, a record
            naming modules the class does not have, or weights that do not fit.

    Example:
        >>> model = load_pruned("/tmp/vit_pruned")                    # doctest: +SKIP
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise VLPruneError(f"{directory} is not a directory written by save_pruned")
    record = _read_record(directory)
    recorded = _import_class(record["model_class"])
    if model_class is None:
        model_class = recorded
    elif not (isinstance(model_class, type) and issubclass(model_class, recorded)):
        raise VLPruneError(
            f"{directory} holds a {record['model_class']}; cannot load it as "
            f"{getattr(model_class, '__qualname__', model_class)!r} (pass that class or a subclass, or None)"
        )
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise VLPruneError(f"{model_class.__name__} is not a transformers model class (no config_class)")
    try:
        config = config_class.from_pretrained(directory)
    except Exception as exc:  # transformers raises OSError / ValueError / TypeError variously
        raise VLPruneError(f"cannot read the config in {directory}: {exc}") from exc
    if record.get("model_type") not in (None, getattr(config, "model_type", None)):
        raise VLPruneError(
            f"{SHAPES_FILE} is for model_type {record['model_type']!r} but the config is "
            f"{getattr(config, 'model_type', None)!r}; the directory mixes two saves"
        )
    import transformers

    if record.get("transformers_version") != transformers.__version__:
        logger.warning("load_pruned: saved with transformers %s, loading with %s",
                       record.get("transformers_version"), transformers.__version__)
    kwargs: dict[str, Any] = {}
    if record.get("attn_implementation"):
        kwargs["attn_implementation"] = record["attn_implementation"]
    main = _dtype(record["dtype"])
    model = _build_from_config(model_class, config, dtype=main, **kwargs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, entry in record["modules"].items():
            module = modules.get(name)
            if module is None:
                raise VLPruneError(f"{SHAPES_FILE} names module {name!r}, which {model_class.__name__} does not have")
            if entry.get("class") != type(module).__name__:
                raise VLPruneError(
                    f"{SHAPES_FILE} records {name!r} as a {entry.get('class')} but {model_class.__name__} "
                    f"has a {type(module).__name__} there; the record is from another model"
                )
            for pname, shape in entry.get("params", {}).items():
                old = module._parameters.get(pname)
                if shape is None:
                    module._parameters[pname] = None
                else:
                    dtype = old.dtype if old is not None else main
                    grad = old.requires_grad if old is not None else True
                    module._parameters[pname] = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=grad)
            for bname, spec in entry.get("buffers", {}).items():
                if spec is None:
                    module._buffers[bname] = None
                else:
                    module._buffers[bname] = torch.zeros(spec["shape"], dtype=_dtype(spec["dtype"]))
            for attr, value in entry.get("attrs", {}).items():
                setattr(module, attr, _decode(value))
        # ties: exactly the saved ones
        params = dict(model.named_parameters(remove_duplicate=False))
        leader = {name: name for name in params}
        for group in record["tied"]:
            unknown = [n for n in group if n not in params]
            if unknown:
                raise VLPruneError(f"{SHAPES_FILE} ties {unknown}, which {model_class.__name__} does not have")
            for n in group:
                leader[n] = group[0]
        made: dict[str, nn.Parameter] = {}
        used: set[int] = set()
        for name in params:
            lead = leader[name]
            if lead not in made:
                param = params[lead]
                if id(param) in used:  # tied in a config-built model, not in the saved one
                    param = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                made[lead] = param
                used.add(id(param))
            if params[name] is not made[lead]:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._parameters[attr] = made[lead]
        for name, dtype in record.get("param_dtypes", {}).items():
            model.get_parameter(name).data = model.get_parameter(name).data.to(_dtype(dtype))
    keys = record["checkpoint_keys"]
    state = {keys.get(k, k): v for k, v in _read_state_dict(directory).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise VLPruneError(f"the weights in {directory} do not fit the rebuilt model: {exc}") from exc
    if unexpected:
        raise VLPruneError(f"weights in {directory} that the rebuilt {model_class.__name__} lacks: {unexpected[:5]}")
    if missing:
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {id(params[k]) for k in state if k in params}
        absent = [k for k in missing if k not in params or id(params[k]) not in loaded]
        if absent:
            raise VLPruneError(f"weights missing from {directory}: {absent[:5]}")
    n = sum(p.numel() for p in model.parameters())
    if record.get("n_parameters") not in (None, n):
        raise VLPruneError(f"rebuilt model has {n} parameters, the saved one had {record['n_parameters']}")
    logger.info("load_pruned: %s with %d parameters from %s", model_class.__name__, n, directory)
    return model.eval()
