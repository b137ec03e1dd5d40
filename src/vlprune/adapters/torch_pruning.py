"""Torch-Pruning adapter: vlprune criteria as ``tp.importance.Importance`` objects.

Example:
    >>> import torch_pruning as tp, vlprune
    >>> from vlprune.adapters.torch_pruning import IDWeightedImportance
    >>> profile = vlprune.estimate_ids(model, calib_batches, n_samples=2000)      # doctest: +SKIP
    >>> imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)  # doctest: +SKIP
    >>> pruner = tp.pruner.BasePruner(model, example_inputs, importance=imp,        # doctest: +SKIP
    ...                               pruning_ratio=0.4, global_pruning=True)
    >>> pruner.step()                                                             # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins.id_weighted import GroupIDReduce, group_id, id_weight
from vlprune.plugins.intrinsic_dim import IDProfile

__all__ = ["IDWeightedImportance", "group_layer_names", "check_ratio", "hf_pruner_kwargs", "prune_hf_model"]

logger = logging.getLogger(__name__)

_PARAM_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm)


def check_ratio(ratio: float, what: str = "pruning ratio") -> float:
    """Raise a VLPruneError unless ``0 <= ratio < 1``."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise VLPruneError(f"{what} must be in [0, 1), got {ratio!r}")
    return float(ratio)


def group_layer_names(group: Any) -> list[str]:
    """Module names of the parameterised layers a tp group touches, root first, without repeats."""
    dg = getattr(group, "_DG", None)
    names_of: Mapping[nn.Module, str] = getattr(dg, "_module2name", {}) if dg is not None else {}
    out: list[str] = []
    for dep, _ in group:
        module = dep.target.module
        if not isinstance(module, _PARAM_TYPES):
            continue
        name = names_of.get(module)
        if name is None:
            name = dep.target.name.split(" (")[0]
        if name not in out:
            out.append(name)
    return out


class IDWeightedImportance(tp.importance.Importance):
    """Any Torch-Pruning importance, multiplied per group by the intrinsic dimension of its layers.

    ``score(group) = base(group) x ID(group) / scale``, where ``ID(group)`` reduces the IDs of the
    group's layers (``group_id``: mean by default, see :func:`vlprune.plugins.id_weighted.group_id`)
    and ``scale`` is 1 (raw IDs, the paper) or, with ``normalize=True``, the profile's mean ID
    (scores then stay on the base's scale; the ranking is the same).

    High ID = sensitive = kept; low ID = pruned first. Works in local and global mode. All of a
    step's importances are computed before Torch-Pruning 1.6 removes anything, so a group whose
    layers have no ID raises before the model changes.

    Args:
        base: any ``tp.importance.Importance`` (e.g. ``GroupTaylorImportance()``); for gradient
            bases, call ``loss.backward()`` before ``pruner.step()`` as usual.
        profile: an :class:`IDProfile` or a mapping module name -> ID.
        normalize: divide IDs by the profile's mean ID.
        group_id: ``"mean"`` | ``"root"`` | ``"max"`` | ``"min"``.
        missing: what to do with a group none of whose layers has an ID: ``"error"`` (default,
            a VLPruneError naming the layers) or ``"skip"`` (return None: tp leaves the group).

    Example:
        >>> imp = IDWeightedImportance(tp.importance.GroupMagnitudeImportance(p=1), profile)  # doctest: +SKIP
    """

    def __init__(
        self,
        base: tp.importance.Importance,
        profile: IDProfile | Mapping[str, float],
        normalize: bool = False,
        group_id: GroupIDReduce = "mean",
        missing: Literal["error", "skip"] = "error",
    ) -> None:
        if not callable(base):
            raise VLPruneError(f"base must be a Torch-Pruning importance, got {type(base).__name__}")
        ids = profile.ids() if isinstance(profile, IDProfile) else dict(profile)
        if not ids:
            raise VLPruneError("the ID profile is empty; estimate IDs for the layers you prune first")
        bad = {n: v for n, v in ids.items() if not (isinstance(v, (int, float)) and v > 0)}
        if bad:
            raise VLPruneError(f"intrinsic dimensions must be positive numbers; got {dict(list(bad.items())[:3])}")
        if group_id not in ("mean", "root", "max", "min"):
            raise VLPruneError(f"group_id must be mean, root, max or min; got {group_id!r}")
        if missing not in ("error", "skip"):
            raise VLPruneError(f"missing must be 'error' or 'skip'; got {missing!r}")
        self.base = base
        self.ids = ids
        self.normalize = normalize
        self.group_id = group_id
        self.missing = missing
        self.scale = sum(ids.values()) / len(ids) if normalize else 1.0

    def group_weight(self, group: Any) -> float | None:
        """The ID factor applied to ``group`` (None if its layers have no ID and missing='skip')."""
        layers = group_layer_names(group)
        value = group_id(layers, self.ids, self.group_id)
        if value is None:
            if self.missing == "skip":
                logger.debug("no ID for group %s; skipped", layers)
                return None
            raise ModelStructureError(
                f"no intrinsic dimension for any layer of the group rooted at {layers[:1] or '?'} "
                f"(layers: {layers}); estimate IDs for these modules (estimate_ids(modules=...)), add "
                "them to the pruner's ignored_layers, or pass missing='skip'"
            )
        return value / self.scale

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        weight = self.group_weight(group)
        if weight is None:
            return None
        scores = self.base(group)
        if scores is None:
            return None
        return id_weight(scores, weight)


# ---------------------------------------------------------------------------------------------
# transformers models
# ---------------------------------------------------------------------------------------------


def _output_transform(output: Any) -> torch.Tensor:
    """The tensor Torch-Pruning traces back from: logits, else the first tensor of the output."""
    from vlprune.plugins.capture import first_tensor

    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    tensor = first_tensor(output)
    if tensor is None:
        raise ModelStructureError("the model output holds no tensor Torch-Pruning can trace")
    return tensor


def hf_pruner_kwargs(
    model: nn.Module,
    *,
    prune_heads: bool = True,
    prune_mlp: bool = True,
    modalities: tuple[str, ...] | None = None,
    ignored_layers: list[nn.Module] | tuple[nn.Module, ...] = (),
) -> dict[str, Any]:
    """The Torch-Pruning arguments that prune a transformers model's MLP neurons and attention heads.

    Only MLP hidden neurons (groups rooted at fc1 / up_proj / gate_proj / intermediate.dense) and
    whole attention heads (groups rooted at q/k/v) are pruned; every other ``nn.Linear`` is ignored,
    so the residual width, embeddings and output heads keep their size. Not pruned, by design:
    heads of GQA attention (removing query heads would break their key/value groups) and of fused
    ``qkv`` attention (BLIP vision); their MLPs are.

    Args:
        model: the transformers model.
        prune_heads: prune attention heads.
        prune_mlp: prune MLP hidden neurons.
        modalities: only prune blocks of these modalities (e.g. ``("language",)``); None for all.
        ignored_layers: more modules to leave alone.

    Returns:
        ``ignored_layers``, ``num_heads``, ``prune_num_heads``, ``prune_head_dims``,
        ``root_module_types`` and ``output_transform`` for ``tp.pruner.BasePruner``.
    """
    from vlprune.adapters.hf.families import describe

    info = describe(model)
    modules = dict(model.named_modules())
    allowed: set[str] = set()
    num_heads: dict[nn.Module, int] = {}
    for mlp in info.mlps:
        if prune_mlp and (modalities is None or mlp.modality in modalities):
            allowed.update(x for x in (mlp.up, mlp.gate) if x)
    for att in info.attentions:
        usable = prune_heads and not att.fused and att.num_kv_heads == att.num_heads and att.num_heads > 1
        if usable and (modalities is None or att.modality in modalities):
            allowed.update((att.q, att.k, att.v))
            for path in (att.q, att.k, att.v):
                num_heads[modules[path]] = att.num_heads
    if not allowed:
        raise ModelStructureError(
            f"nothing to prune in {type(model).__name__}: no MLP or attention of modalities {modalities} "
            f"(modalities present: {sorted(set(info.linear_modality.values()))})"
        )
    extra = list(ignored_layers)
    ignored = [m for n, m in modules.items() if isinstance(m, nn.Linear) and n not in allowed] + extra
    return {
        "ignored_layers": ignored,
        "num_heads": num_heads,
        "prune_num_heads": bool(num_heads),
        "prune_head_dims": False,
        "root_module_types": [nn.Linear],
        "output_transform": _output_transform,
    }


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """What tp pruning changes, by reference: module attributes, parameter and buffer dicts.

    Torch-Pruning replaces parameters by new ones instead of editing them, so keeping the old
    objects is enough to undo a prune (parameter identity is preserved too)."""
    import copy

    snap = []
    for module in model.modules():
        attrs = {k: v for k, v in module.__dict__.items() if k not in ("_modules", "_parameters", "_buffers")}
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            attrs["__config_state__"] = copy.deepcopy(module.config.__dict__)
        snap.append((module, attrs, dict(module._parameters), dict(module._buffers)))
    return snap


def _restore(snap: list[tuple[nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]) -> None:
    for module, attrs, params, buffers in snap:
        config_state = attrs.pop("__config_state__", None)
        for key in [k for k in module.__dict__ if k not in ("_modules", "_parameters", "_buffers")]:
            if key not in attrs:
                del module.__dict__[key]
        module.__dict__.update(attrs)
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)
        if config_state is not None:
            module.config.__dict__.clear()
            module.config.__dict__.update(config_state)
            attrs["__config_state__"] = config_state


def prune_hf_model(
    model: nn.Module,
    example_inputs: Any,
    importance: tp.importance.Importance,
    pruning_ratio: float,
    *,
    head_pruning_ratio: float | None = None,
    global_pruning: bool = True,
    prune_heads: bool = True,
    prune_mlp: bool = True,
    modalities: tuple[str, ...] | None = None,
    pruning_ratio_dict: dict[nn.Module, float] | None = None,
    ignored_layers: list[nn.Module] | tuple[nn.Module, ...] = (),
) -> dict[str, dict[str, int]]:
    """Prune a transformers model's MLP neurons and attention heads with Torch-Pruning, in one call.

    Builds ``tp.pruner.BasePruner`` with :func:`hf_pruner_kwargs`, runs one ``step()``, then
    :func:`vlprune.adapters.hf.surgery.sync_hf_model`. If anything fails, the model's modules,
    parameters (the same objects) and config are restored before the error propagates.

    Args:
        model: the transformers model (pruned in place).
        example_inputs: a dict of tensors for tracing (``model(**example_inputs)``).
        importance: any tp importance (e.g. ``IDWeightedImportance``). Gradient-based ones need
            ``loss.backward()`` before this call.
        pruning_ratio: fraction of MLP neurons removed, in [0, 1).
        head_pruning_ratio: fraction of heads removed (default: ``pruning_ratio``).
        global_pruning: rank all groups together (right for heads; Torch-Pruning's local mode
            over-removes heads when iterated).
        prune_heads / prune_mlp / modalities / ignored_layers: see :func:`hf_pruner_kwargs`.
        pruning_ratio_dict: per-module ratios (tp's ``pruning_ratio_dict``).

    Returns:
        What :func:`sync_hf_model` changed.

    Raises:
        VLPruneError: a ratio outside [0, 1), nothing to prune, or a failure inside pruning.
    """
    from vlprune.adapters.hf.surgery import sync_hf_model

    check_ratio(pruning_ratio)
    head_ratio = check_ratio(pruning_ratio if head_pruning_ratio is None else head_pruning_ratio, "head pruning ratio")
    for module, ratio in (pruning_ratio_dict or {}).items():
        check_ratio(ratio, f"pruning ratio of {type(module).__name__}")
    kwargs = hf_pruner_kwargs(
        model, prune_heads=prune_heads, prune_mlp=prune_mlp, modalities=modalities, ignored_layers=ignored_layers
    )
    if not isinstance(example_inputs, dict):
        raise VLPruneError("example_inputs must be a dict of tensors, as passed to model(**example_inputs)")
    snap = _snapshot(model)
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=pruning_ratio,
            head_pruning_ratio=head_ratio,
            global_pruning=global_pruning,
            pruning_ratio_dict=dict(pruning_ratio_dict) if pruning_ratio_dict else None,
            **kwargs,
        )
        pruner.step()
        return sync_hf_model(model, pruned="heads")
    except BaseException:
        _restore(snap)
        raise
