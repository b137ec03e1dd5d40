"""Bookkeeping after Torch-Pruning (or NNI through Torch-Pruning) changed a transformers model's shapes.

Torch-Pruning changes the *shapes* of a model's linears, norms and embeddings; it does not know
what the attention modules of a transformers model remember about those shapes (``num_heads``,
``head_dim``, ``num_key_value_groups``, ``all_head_size`` ...) nor what the config says
(``intermediate_size``, ``hidden_size`` ...). :func:`sync_hf_model` recomputes them from the weight
shapes, so the pruned model runs, and runs *correctly* (a stale ``head_dim`` can reshape the
queries into the wrong heads without any error).

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
    >>> sync_hf_model(model, pruner=pruner)                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlprune.adapters.hf.families import AttentionLayout, MLPLayout
from vlprune.adapters.hf.families import attention_layouts as find_attentions
from vlprune.adapters.hf.families import mlp_layouts as find_mlps
from vlprune.errors import ModelStructureError, VLPruneError

__all__ = [
    "sync_hf_model",
    "find_attentions",
    "find_mlps",
    "AttentionLayout",
    "MLPLayout",
    "ATTENTION_ATTRS",
]

logger = logging.getLogger(__name__)


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


def _layout_error(state: _AttnState, heads: int, kv: int, hd: int) -> str | None:
    """Why ``heads`` query / ``kv`` key-value heads of ``hd`` cannot be this attention, or None."""
    name = state.layout.name
    if heads < 1 or kv < 1 or hd < 1 or heads % kv:
        return (
            f"attention {name}: {heads} query heads cannot share {kv} key/value heads evenly; in GQA "
            "attention prune the same number of query heads from every key/value group, or leave it out"
        )
    if state.rotary and state.head_dim0 and hd != state.head_dim0:
        return f"attention {name}: rotary position embeddings fix head_dim at {state.head_dim0}; prune whole heads"
    if state.layout.fused and heads * hd != state.q_in:
        return (
            f"attention {name}: a fused qkv attention derives its head size from the input width "
            f"({state.q_in}), so its heads cannot be pruned; add its qkv linear to ignored_layers"
        )
    return None


def _fits_heads(state: _AttnState) -> bool:
    """The q/k widths are whole heads of the original head_dim."""
    hd = state.head_dim0
    return bool(hd) and not state.q_out % hd and not state.k_out % hd


def _fits_head_dims(state: _AttnState) -> bool:
    """The q/k widths are the original head counts of one (narrower) size."""
    heads, kv = state.heads0, state.kv0
    return (
        bool(heads and kv)
        and not state.q_out % heads
        and not state.k_out % kv
        and state.q_out // heads == state.k_out // kv
    )


def _explain(state: _AttnState, mode: str) -> tuple[int, int, int] | str:
    """(heads, kv_heads, head_dim) under ``mode`` ("heads" or "head_dim"), or why the shapes do not fit it."""
    name = state.layout.name
    if mode == "heads":
        hd = state.head_dim0
        if hd is None:
            return f"attention {name}: its head_dim is unknown (no head_dim / attention_head_size attribute)"
        if not _fits_heads(state):
            return f"attention {name}: {state.q_out} query / {state.k_out} key channels are not whole heads of {hd}"
        heads, kv = state.q_out // hd, state.k_out // hd
    else:
        heads, kv = state.heads0, state.kv0
        if not heads or not kv:
            return f"attention {name}: its number of heads is unknown (no num_heads attribute or config)"
        if not _fits_head_dims(state):
            return (
                f"attention {name}: {state.q_out} query / {state.k_out} key channels do not split into "
                f"{heads} / {kv} heads of one size"
            )
        hd = state.q_out // heads
    error = _layout_error(state, heads, kv, hd)
    return error if error is not None else (heads, kv, hd)


#: what happened when Torch-Pruning removed q/k/v channels without knowing the heads, and the fix
_NO_HEAD_LAYOUT = (
    "Torch-Pruning was not told this attention's head layout, so it removed query/key/value channels "
    "without regard to heads and no head_dim describes what is left"
)
_RERUN = (
    "rerun pruning on the original model with tp.pruner.BasePruner(model, example_inputs, ..., "
    "**vlprune.adapters.torch_pruning.hf_pruner_kwargs(model)) (it passes num_heads, output_transform and "
    "the ignored layers), or pass num_heads={q/k/v linear: heads} to the pruner yourself, or put the q/k/v "
    "linears in ignored_layers"
)
_BOTH = (
    "it pruned both heads and head dims (prune_num_heads=True with prune_head_dims=True): call "
    "sync_hf_model(model, pruner=pruner) with its pruner, which knows the head counts"
)


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
    model: nn.Module,
    *,
    pruned: Literal["heads", "head_dim", "auto"] = "auto",
    pruner: Any = None,
) -> dict[str, dict[str, int | float]]:
    """Bring a transformers model's bookkeeping in line with its (pruned) weight shapes.

    Attention modules: ``num_heads`` / ``num_attention_heads`` / ``num_key_value_heads`` /
    ``num_key_value_groups`` / ``head_dim`` / ``attention_head_size`` / ``all_head_size`` /
    ``embed_dim`` follow the q/k/v linears' shapes. How many heads a narrower q/k/v holds is
    decided, for every attention whose attributes lag behind its shapes, by:

    - ``pruner=`` the Torch-Pruning ``BasePruner`` that just ran ``step()`` (the sure way):
      Torch-Pruning keeps ``pruner.num_heads[linear]`` at the current head count of every q/k/v
      linear it was given, so each attention gets its exact heads and ``head_dim`` = width / heads,
      whatever ``prune_num_heads`` / ``prune_head_dims`` were (both at once included). A changed
      attention whose q/k/v linears are not in ``pruner.num_heads`` was pruned without its head
      layout: :class:`ModelStructureError` says how to rerun pruning. ``pruned`` is then unused.
    - ``pruned="heads"``: Torch-Pruning removed whole heads (``prune_num_heads=True,
      prune_head_dims=False``, as :func:`~vlprune.adapters.torch_pruning.hf_pruner_kwargs` sets);
      ``head_dim`` is kept.
    - ``pruned="head_dim"``: it narrowed every head (``prune_num_heads=False, prune_head_dims=True``,
      Torch-Pruning's own default when given ``num_heads``); the number of heads is kept.
    - ``pruned="auto"`` (default): whole heads, since the attention modules still carry their
      original ``head_dim``, unless the shapes show that head dims went (a query width that is
      no multiple of the original ``head_dim`` in some attention): then narrower heads. If both
      readings fit every attention and differ (4 heads of 8 became 16 channels: 2 heads of 8, or 4
      of 4), whole heads are taken and a warning names the alternative. Without the pruner, a
      prune of both heads and head dims cannot be told from shapes: pass ``pruner=``.

    Attention scale: always the one the original model used, since its weights were trained with
    it. With head pruning it is unchanged anyway. With head-dim pruning ``scale``/``scaling``
    attributes are left alone, and in modules that derive the scale from the head size at run
    time (BERT style: ``1/sqrt(attention_head_size)``) the factor ``sqrt(new/old head_dim)`` is
    folded into the query weights and bias, so q.k is scaled by ``1/sqrt(old head_dim)``: the
    pruned attention equals the original one with the removed dimensions zeroed.

    Configs: a config cannot hold per-layer widths, so only sizes that stay uniform are written:
    ``intermediate_size`` (or DINOv2's ``mlp_ratio``) when every MLP under that config has the same
    width; ``num_attention_heads`` / ``num_key_value_heads`` when every attention under it has the
    same head counts *and* the config states ``head_dim`` itself, or derives it
    (``hidden_size // num_attention_heads``: Qwen2) and a model built from it reads a stated
    ``head_dim`` (checked by building one on the meta device): then ``head_dim`` is written as well,
    so the derivation does not go stale (else the counts are left: BERT-style models derive the
    head size and would build wrong widths); ``hidden_size`` (and ``embed_dim`` / ``hidden_size``
    attributes of its modules) when every LayerNorm under that config has the same new width.
    A value is written only if it keeps the field's declared type and passes the config's own
    checks (DINOv2's ``mlp_ratio`` is an ``int``: a width of 1.375 x hidden_size stays out, logged
    at info level). LayerNorms whose ``normalized_shape`` lags behind their weight are fixed.
    Everything else is in the weight shapes, which :func:`~vlprune.adapters.hf.persist.save_pruned`
    records.

    Everything is checked before anything is changed: if this raises, the model is as it was.
    Calling it twice is harmless (the second call changes nothing).

    Args:
        model: the pruned model, changed in place.
        pruned: what Torch-Pruning removed in attention modules (see above), when no ``pruner``.
        pruner: the ``tp.pruner.BasePruner`` (or subclass) that pruned ``model``; call this right
            after its ``step()`` (after every step when pruning iteratively).

    Returns:
        ``{module path or "config" / "config.<sub_config>": {attribute: new value}}`` of what changed.

    Raises:
        ModelStructureError: shapes that no head layout explains (q/k/v pruned without
            ``num_heads``, GQA query heads that are no multiple of the key/value heads, a pruned
            fused qkv, ...), or a ``pruner`` whose head counts do not match the model.
        VLPruneError: an unknown ``pruned`` value, or a ``pruner`` without ``num_heads``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> sync_hf_model(tiny_model("vit"))  # nothing pruned: nothing to change
        {}
        >>> pruner.step(); sync_hf_model(model, pruner=pruner)       # doctest: +SKIP
    """
    if pruned not in ("heads", "head_dim", "auto"):
        raise VLPruneError(f"pruned must be 'heads', 'head_dim' or 'auto', got {pruned!r}")
    head_counts = _pruner_head_counts(pruner) if pruner is not None else None
    if pruner is not None:
        _warn_if_heads_were_not_asked(pruner)
    modules = dict(model.named_modules())
    states = [_attn_state(modules, a) for a in find_attentions(model)]
    # plan everything first; nothing below changes the model until "apply"
    mode, attn_plan = _plan_attentions(model, modules, states, pruned, head_counts)
    config_plan = _plan_config_heads(modules, states, attn_plan)
    mlp_attrs, mlp_configs = _plan_mlps(model, modules)
    norm_shapes, hidden_attrs, hidden_configs = _plan_hidden(modules, skip={p.state.layout.name for p in attn_plan})
    config_plan = _checked_config_plan(config_plan + mlp_configs + hidden_configs)
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


def _warn_if_heads_were_not_asked(pruner: Any) -> None:
    """Torch-Pruning prunes no head unless ``head_pruning_ratio`` is given: say so when a pruner set
    up for head pruning (``prune_num_heads=True`` with ``num_heads``) had it at 0."""
    if not (getattr(pruner, "prune_num_heads", False) and getattr(pruner, "num_heads", None)):
        return
    ratio = getattr(pruner, "head_pruning_ratio", None)
    per_layer = getattr(pruner, "head_pruning_ratio_dict", None) or {}
    if ratio == 0 and not any(v for v in per_layer.values()):
        logger.warning(
            "sync_hf_model: the pruner was set up to prune whole heads (prune_num_heads=True, num_heads) but its "
            "head_pruning_ratio is 0, Torch-Pruning's default, so no head was pruned; pass head_pruning_ratio= "
            "to tp.pruner.BasePruner (or prune_heads=False to hf_pruner_kwargs to prune MLP neurons only)"
        )


def _pruner_head_counts(pruner: Any) -> dict[int, int]:
    """``{id(q/k/v linear): current head count}`` from a Torch-Pruning pruner's ``num_heads``."""
    num_heads = getattr(pruner, "num_heads", None)
    if not isinstance(num_heads, Mapping):
        raise VLPruneError(
            f"pruner= takes the Torch-Pruning pruner that pruned the model (a tp.pruner.BasePruner, whose "
            f"num_heads dict tracks the heads left); got a {type(pruner).__name__} without num_heads"
        )
    counts: dict[int, int] = {}
    for module, heads in num_heads.items():
        if isinstance(heads, int) and not isinstance(heads, bool):
            counts[id(module)] = heads
    return counts


def _from_pruner(
    state: _AttnState, linears: tuple[nn.Module, ...], counts: dict[int, int]
) -> tuple[int, int, int] | str | None:
    """(heads, kv_heads, head_dim) from the pruner's head counts; None if it does not know the attention."""
    name = state.layout.name
    known = [counts.get(id(m)) for m in linears]
    if all(c is None for c in known):
        return None
    heads, kv, v_heads = (known[0],) * 3 if state.layout.fused else tuple(known)
    if heads is None or kv is None or v_heads is None:
        return (
            f"attention {name}: pruner.num_heads lists only some of its q/k/v linears; give Torch-Pruning "
            "all three (hf_pruner_kwargs(model) does)"
        )
    if heads < 1 or kv < 1 or state.q_out % heads or state.k_out % kv or state.q_out // heads != state.k_out // kv:
        return (
            f"attention {name}: the pruner says {heads} query / {kv} key heads but the linears have "
            f"{state.q_out} / {state.k_out} channels; pass the pruner that pruned this model, right after its step()"
        )
    hd = state.q_out // heads
    return _layout_error(state, heads, kv, hd) or (heads, kv, hd)


def _plan_attentions(
    model: nn.Module,
    modules: dict[str, nn.Module],
    states: list[_AttnState],
    pruned: str,
    counts: dict[int, int] | None,
) -> tuple[str, list[_AttnPlan]]:
    """The attention mode and, for every attention whose attributes lag behind its shapes, the new ones."""
    changed = [s for s in states if not _is_consistent(s)]
    layouts: dict[str, tuple[int, int, int]] = {}
    mode = pruned
    if counts is not None:
        mode = "pruner"
        for state in changed:
            att = state.layout
            linears = (modules[att.q],) if att.fused else (modules[att.q], modules[att.k], modules[att.v])
            res = _from_pruner(state, linears, counts)
            if res is None:
                raise ModelStructureError(
                    f"sync_hf_model(pruner=...): attention {att.name} has {state.q_out} query channels "
                    f"(it had {state.heads0} heads of {state.head_dim0}) but its q/k/v linears are not in "
                    f"pruner.num_heads: {_NO_HEAD_LAYOUT}. To prune its heads, {_RERUN}"
                )
            if isinstance(res, str):
                raise ModelStructureError(f"sync_hf_model(pruner=...): {res}")
            layouts[att.name] = res
    else:
        if changed and pruned == "auto":
            mode = _auto_mode(model, changed)
        for state in changed:
            res = _explain(state, mode)
            if isinstance(res, str):
                hint = ""
                if not _fits_heads(state) and not _fits_head_dims(state):
                    hint = f": either {_NO_HEAD_LAYOUT} (then {_RERUN}), or {_BOTH}"
                raise ModelStructureError(f"sync_hf_model(pruned={mode!r}): {res}{hint}")
            layouts[state.layout.name] = res
    plans = []
    for state in changed:
        heads, kv, hd = layouts[state.layout.name]
        fold = None
        has_scale = any(isinstance(getattr(state.module, a, None), float) for a in _SCALE_ATTRS)
        if state.head_dim0 and hd != state.head_dim0 and not has_scale:
            fold = math.sqrt(hd / state.head_dim0)  # scale derived from the head size at run time
        plans.append(_AttnPlan(state, (heads, kv, hd), _attention_changes(state, heads, kv, hd), fold))
    return mode, plans


def _auto_mode(model: nn.Module, changed: list[_AttnState]) -> str:
    """Whole heads unless the shapes rule them out; narrower heads if only they fit; else an error."""
    fits = {m: [_explain(s, m) for s in changed] for m in ("heads", "head_dim")}
    ok = [m for m, res in fits.items() if all(isinstance(r, tuple) for r in res)]
    if not ok:
        for state in changed:
            if not _fits_heads(state) and not _fits_head_dims(state):
                raise ModelStructureError(
                    f"sync_hf_model: attention {state.layout.name}: {state.q_out} query / {state.k_out} key "
                    f"channels are neither whole heads of {state.head_dim0} nor {state.heads0} heads of one size: "
                    f"either {_NO_HEAD_LAYOUT} (then {_RERUN}), or {_BOTH}"
                )
        reasons = [r for res in fits.values() for r in res if isinstance(r, str)]
        raise ModelStructureError(f"sync_hf_model: {reasons[0]} (neither whole heads nor narrower heads fit)")
    if ok == ["heads", "head_dim"] and fits["heads"] != fits["head_dim"]:
        name, q_out, as_heads, as_dims = next(
            (s.layout.name, s.q_out, a, b) for s, a, b in zip(changed, fits["heads"], fits["head_dim"]) if a != b
        )
        logger.warning(
            "sync_hf_model: the attention shapes of %s fit both whole-head and head-dim pruning (e.g. %s: %d "
            "query channels = %d heads of %d, or %d heads of %d); taking whole heads (Torch-Pruning "
            "prune_num_heads=True, prune_head_dims=False, as hf_pruner_kwargs sets). If Torch-Pruning narrowed "
            "the heads instead (its default prune_head_dims=True), call sync_hf_model(model, pruner=pruner) with "
            "the pruner, which never guesses, or pass pruned='head_dim'",
            type(model).__name__, name, q_out, as_heads[0], as_heads[2], as_dims[0], as_dims[2],
        )
    return ok[0]


def _plan_config_heads(
    modules: dict[str, nn.Module], states: list[_AttnState], plans: list[_AttnPlan]
) -> list[tuple[Any, dict[str, int | float]]]:
    """Head counts for configs whose attentions all agree: where the config states head_dim itself,
    or derives it (``hidden_size // num_attention_heads``, Qwen2) and a model built from it honours
    a stated ``head_dim`` (then ``head_dim`` is written too, so the derivation cannot go stale)."""
    planned = {p.state.layout.name: p.layout for p in plans}
    by_cfg: dict[int, tuple[Any, set[tuple[int, int, int]], list[_AttnState]]] = {}
    for state in states:
        cfg = _owner_config(modules, state.layout.name)
        if cfg is None:
            continue
        layout = planned.get(state.layout.name)
        if layout is None:
            hd = state.head_dim0 or 0
            layout = (state.q_out // hd, state.k_out // hd, hd) if hd else (0, 0, 0)
        entry = by_cfg.setdefault(id(cfg), (cfg, set(), []))
        entry[1].add(layout)
        entry[2].append(state)
    out: list[tuple[Any, dict[str, int | float]]] = []
    for cfg, layouts, under in by_cfg.values():
        if len(layouts) != 1:
            continue
        heads, kv, hd = next(iter(layouts))
        stated = vars(cfg).get("head_dim")
        if not heads or not isinstance(getattr(cfg, "num_attention_heads", None), int):
            continue
        new: dict[str, int | float] = {"num_attention_heads": heads}
        if isinstance(getattr(cfg, "num_key_value_heads", None), int):
            new["num_key_value_heads"] = kv
        if isinstance(stated, int):
            if hd != stated:
                continue
        elif stated is None and _derived_head_dim(cfg) == hd:
            if all(getattr(cfg, a) == v for a, v in new.items()):
                continue
            new["head_dim"] = hd
            if not _config_builds(modules, cfg, new, under):
                logger.info(
                    "sync_hf_model: %s derives head_dim from hidden_size / num_attention_heads and a model built "
                    "from it ignores a stated head_dim; head counts left as they are (save_pruned records the widths)",
                    type(cfg).__name__,
                )
                continue
        else:
            continue
        new = {a: v for a, v in new.items() if getattr(cfg, a, None) != v}
        if new:
            out.append((cfg, new))
    return out


def _derived_head_dim(cfg: Any) -> int | None:
    """``hidden_size // num_attention_heads``, the head size a config without ``head_dim`` implies."""
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _config_builds(modules: dict[str, nn.Module], cfg: Any, values: dict[str, int | float], under: list[_AttnState]) -> bool:
    """Whether a model built from ``cfg`` with ``values`` (on the meta device: no memory, no init cost)
    has the current q/k/v widths in every attention of ``under``."""
    owner_path = next((p for p, m in modules.items() if getattr(m, "config", None) is cfg), None)
    if owner_path is None:
        return False
    trial = copy.deepcopy(cfg)
    for attr, value in values.items():
        setattr(trial, attr, value)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = dict(type(modules[owner_path])(trial).named_modules())
    except Exception as exc:  # a class that cannot be built from its config alone: do not guess
        logger.debug("sync_hf_model: building %s from its new config failed: %s", type(modules[owner_path]).__name__, exc)
        return False
    prefix = f"{owner_path}." if owner_path else ""
    for state in under:
        for path in (state.layout.q, state.layout.k, state.layout.v):
            rel = path[len(prefix):] if path.startswith(prefix) else None
            mine, theirs = modules[path], built.get(rel) if rel is not None else None
            if not isinstance(theirs, nn.Linear) or (theirs.in_features, theirs.out_features) != (
                mine.in_features, mine.out_features
            ):
                return False
    return True


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
        elif isinstance(getattr(cfg, "mlp_ratio", None), (int, float)) and isinstance(hidden, int) and hidden > 0:
            # DINOv2: width = int(hidden_size * mlp_ratio) (not for its SwiGLU variant)
            if int(hidden * cfg.mlp_ratio) != width and not getattr(cfg, "use_swiglu_ffn", False):
                # an int ratio where it is exact, else a float one: _checked_config_plan keeps the
                # first that the field's declared type accepts
                ratios: list[int | float] = [width // hidden] if width % hidden == 0 else []
                if int(hidden * (width / hidden)) == width:
                    ratios.append(width / hidden)
                configs.append((cfg, {"mlp_ratio": ratios}))  # type: ignore[dict-item]
    return attrs, configs


def _field_accepts(cfg: Any, attr: str, value: Any) -> str | None:
    """Why ``cfg.<attr> = value`` would break the field's declared type, or None if it is fine.

    Uses the config's own field validators where it has them (transformers 5.x configs are
    ``huggingface_hub`` strict dataclasses), else the dataclass field's annotation if it is a plain
    type; a field without a declared type accepts anything."""
    validators = getattr(type(cfg), "__validators__", None)
    if isinstance(validators, Mapping) and attr in validators:
        for check in validators[attr]:
            try:
                check(value)
            except (TypeError, ValueError) as exc:
                return str(exc)
        return None
    declared: Any = None
    if dataclasses.is_dataclass(cfg):
        declared = next((f.type for f in dataclasses.fields(cfg) if f.name == attr), None)
    if isinstance(declared, type):
        if not isinstance(value, declared) or (declared is int and isinstance(value, bool)):
            return f"field {attr!r} is declared {declared.__name__}, got {type(value).__name__} {value!r}"
    return None


def _config_checks(cfg: Any) -> Callable[[dict[str, Any]], str | None]:
    """A function: {attr: value} -> why a copy of ``cfg`` with those values fails its own checks
    (field validators on assignment, then the class validators ``validate()`` that
    ``save_pretrained`` also runs), or None. Checks the config already fails are not held against it."""

    def run(values: dict[str, Any]) -> str | None:
        trial = copy.deepcopy(cfg)
        try:
            for attr, value in values.items():
                setattr(trial, attr, value)
            if callable(getattr(trial, "validate", None)):
                trial.validate()
        except Exception as exc:  # StrictDataclass*Error, ValueError, ... from the config's own code
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
        return None

    if run({}) is not None:
        return lambda values: None
    return run


def _checked_config_plan(
    plan: list[tuple[Any, dict[str, Any]]]
) -> list[tuple[Any, dict[str, int | float]]]:
    """The planned config values that keep their fields' declared types and the config's own checks.

    A value may be a list of candidates (the first that fits is taken). Each value is tried on a
    copy of the config (field validators, then the class validators ``validate()`` that
    ``save_pretrained`` runs too); what does not fit is left out and logged at info level: the
    width stays in the weight shapes, which ``save_pruned`` records."""
    merged: dict[int, tuple[Any, dict[str, Any]]] = {}
    for cfg, values in plan:
        merged.setdefault(id(cfg), (cfg, {}))[1].update(values)
    out: list[tuple[Any, dict[str, int | float]]] = []
    for cfg, values in merged.values():
        checks = _config_checks(cfg)
        accepted: dict[str, int | float] = {}
        for attr, options in values.items():
            why = "no value expresses it"
            for value in options if isinstance(options, list) else [options]:
                why = _field_accepts(cfg, attr, value) or checks({**accepted, attr: value}) or ""
                if not why:
                    accepted[attr] = value
                    break
            if attr not in accepted:
                logger.info(
                    "sync_hf_model: %s.%s left at %r (the pruned size %r does not fit it: %s); the shapes are "
                    "in the weights and in the record save_pruned writes",
                    type(cfg).__name__, attr, getattr(cfg, attr, None), options, why,
                )
        if accepted:
            out.append((cfg, accepted))
    return out


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
