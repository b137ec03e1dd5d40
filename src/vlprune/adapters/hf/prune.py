"""Torch-Pruning on transformers models: :func:`prune_hf_model` and what it is made of.

- :func:`hf_pruner_kwargs`: the ``tp.pruner.BasePruner`` arguments that prune a transformers model's
  MLP neurons and whole attention heads (and nothing else), with a ``forward_fn`` that traces rotary
  attention correctly (:func:`positive_dims`) and the model's :func:`unwrapped_parameters`;
- :class:`KeepHeads` / :class:`KeepNeurons`: floors that keep Torch-Pruning 1.6 from emptying an
  attention or an MLP;
- :func:`prune_hf_model`: one call (kwargs, floors, one ``step()``, ``sync_hf_model``) that leaves the
  model exactly as it was if anything fails.

The criteria themselves (``IDWeightedImportance``, ``PlatonImportance``, ``AMPEntropyImportance``),
the ratio helpers and the schedulers stay in :mod:`vlprune.adapters.torch_pruning`, which re-exports
every name of this module (``from vlprune.adapters.torch_pruning import prune_hf_model`` keeps working).

Example:
    >>> import torch_pruning as tp
    >>> from vlprune.testbed.tiny import tiny_model, example_inputs
    >>> model = tiny_model("clip")
    >>> before = sum(p.numel() for p in model.parameters())
    >>> changed = prune_hf_model(model, example_inputs("clip"), tp.importance.GroupMagnitudeImportance(), 0.5)
    >>> sum(p.numel() for p in model.parameters()) < before
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from vlprune.adapters.hf.families import describe
from vlprune.adapters.hf.sync import sync_hf_model
from vlprune.adapters.hf.undo import restore_on_failure
from vlprune.adapters.torch_pruning import _OUT_FNS, _matches, call_importance, check_ratio
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins.capture import first_tensor

__all__ = [
    "KeepHeads",
    "KeepNeurons",
    "hf_pruner_kwargs",
    "positive_dims",
    "prune_hf_model",
    "unwrapped_parameters",
]

logger = logging.getLogger(__name__)


def _output_transform(output: Any) -> torch.Tensor:
    """The tensor Torch-Pruning traces back from: logits, else the first tensor of the output."""
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
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
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
        forward_fn: how Torch-Pruning runs the model on the example inputs while tracing
            (``forward_fn(model, example_inputs)``, as tp's own argument of that name); None for
            tp's default (``model(**example)`` for a dict). Give it here, not to ``BasePruner``:
            the returned ``forward_fn`` wraps it.

    Returns:
        ``ignored_layers``, ``num_heads``, ``prune_num_heads``, ``prune_head_dims``,
        ``root_module_types``, ``output_transform``, ``unwrapped_parameters`` (see
        :func:`unwrapped_parameters`) and ``forward_fn`` for ``tp.pruner.BasePruner``.

    The returned ``forward_fn`` traces the model with negative ``dim`` arguments of
    cat / split / chunk / narrow / unbind made positive (:func:`positive_dims`). Torch-Pruning 1.6
    reads the dimension autograd saved to tell a channel concat / split / slice (dimension 1)
    from one along another dimension; PyTorch 2.13 reports a negative saved dimension as
    ``2**64 + dim``, which tp takes for the channel dimension. The rotary embedding's
    ``rotate_half`` (``cat((-x2, x1), dim=-1)`` over the head dimension, in Llama, Mistral, Qwen2,
    ... attention) then becomes a channel concat inside a cycle whose index mapping grows at every
    turn, and the first call on a model whose q/k/v heads are pruned never returns (tp's
    ``_fix_dependency_graph_non_recursive``). With positive dimensions tp leaves those ops alone,
    as its checks intend; a negative dimension that resolves to 1 is mapped as before. The groups
    of models without such ops (the testbed's CLIP, ViT, DINOv2, BLIP, ViLT, LLaVA) are unchanged.
    If you build a ``BasePruner`` / ``DependencyGraph`` without these arguments on such a model,
    pass ``forward_fn=`` the returned one (or trace under ``with positive_dims():``).
    """
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
        "unwrapped_parameters": unwrapped_parameters(model),
        "forward_fn": _PositiveDimsForward(forward_fn),
    }


# PyTorch functions whose ``dim`` ends up in the ``_saved_dim`` Torch-Pruning reads, with the
# position of ``dim`` among their positional arguments (``self`` / ``input`` / ``tensors`` first).
_DIM_ARG: dict[Any, int] = {
    torch.cat: 1,
    torch.concat: 1,
    torch.concatenate: 1,
    torch.split: 2,
    torch.Tensor.split: 2,
    torch.Tensor.split_with_sizes: 2,
    torch.chunk: 2,
    torch.Tensor.chunk: 2,
    torch.tensor_split: 2,
    torch.Tensor.tensor_split: 2,
    torch.narrow: 1,
    torch.Tensor.narrow: 1,
    torch.unbind: 1,
    torch.Tensor.unbind: 1,
}


def _rank(first: Any) -> int | None:
    """Rank of the tensor(s) an op's ``dim`` counts in (cat: the largest; legacy empty 1-D allowed)."""
    if isinstance(first, torch.Tensor):
        return first.dim()
    if isinstance(first, (list, tuple)):
        ranks = [t.dim() for t in first if isinstance(t, torch.Tensor)]
        return max(ranks) if ranks else None
    return None


def positive_dims() -> contextlib.AbstractContextManager[Any]:
    """A context within which negative ``dim`` arguments of ``torch.cat`` / ``concat`` / ``split`` /
    ``chunk`` / ``tensor_split`` / ``narrow`` / ``unbind`` (functions and ``Tensor`` methods) are
    replaced by the equal positive ones. Results are unchanged; only the dimension autograd saves
    becomes one Torch-Pruning 1.6 reads correctly (see :func:`hf_pruner_kwargs`).

    Example:
        >>> with positive_dims():                                                  # doctest: +SKIP
        ...     DG = tp.DependencyGraph().build_dependency(model, example_inputs)
    """
    return _PositiveDims()


def _negative(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim < 0


class _PositiveDims(TorchFunctionMode):
    """The torch function mode behind :func:`positive_dims`."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        pos = _DIM_ARG.get(func)
        if pos is not None and args:
            rank = _rank(args[0])
            if rank and _negative(kwargs.get("dim")):
                kwargs["dim"] += rank
            elif rank and len(args) > pos and _negative(args[pos]):
                args = (*args[:pos], args[pos] + rank, *args[pos + 1 :])
        return func(*args, **kwargs)


class _PositiveDimsForward:
    """Torch-Pruning's ``forward_fn``: the given one (or tp's default call) under :func:`positive_dims`."""

    def __init__(self, forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> None:
        if forward_fn is not None and not callable(forward_fn):
            raise VLPruneError(
                f"forward_fn must be callable as forward_fn(model, example_inputs), got {type(forward_fn).__name__}"
            )
        self.forward_fn = forward_fn

    def __call__(self, model: nn.Module, example_inputs: Any) -> Any:
        with positive_dims():
            if self.forward_fn is not None:
                return self.forward_fn(model, example_inputs)
            if isinstance(example_inputs, dict):
                return model(**example_inputs)
            if isinstance(example_inputs, (list, tuple)):
                return model(*example_inputs)
            return model(example_inputs)


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """The parameters Torch-Pruning calls "unwrapped" (held by no module type it knows: RMSNorm
    weights, class / position embeddings, DINOv2 layer scales ...), each with the dimension tp
    would prune anyway (the last one of size > 1).

    Passing them as ``unwrapped_parameters`` changes nothing in what tp prunes; it only replaces
    tp's "Unwrapped parameters detected" warning by this explicit choice. With
    :func:`hf_pruner_kwargs` the residual width is never pruned, so these parameters keep their
    size. One-element parameters (CLIP's ``logit_scale``) have no dimension to name: tp still
    lists them in its warning, harmlessly (it never prunes them).
    """
    from torch_pruning import ops
    from torch_pruning.pruner import function

    known = set(function.PrunerBox) - {ops.OPTYPE.ELEMENTWISE}
    wrapped = {id(p) for m in model.modules() if ops.module2type(m) in known for p in m.parameters()}
    out: list[tuple[nn.Parameter, int]] = []
    for _name, param in model.named_parameters():
        dims = [i for i, size in enumerate(param.shape) if size > 1]
        if id(param) not in wrapped and dims:
            out.append((param, dims[-1]))
    return out


class _FloorWrapper(tp.importance.Importance):
    """Base of the floor wrappers: attributes it lacks (``update()`` / ``step()`` of a stateful base
    such as :class:`~vlprune.adapters.torch_pruning.PlatonImportance`) are the wrapped importance's."""

    base: tp.importance.Importance

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class KeepHeads(_FloorWrapper):
    """Wrap any tp importance so that global head pruning keeps at least ``min_heads`` heads in
    every attention.

    Torch-Pruning 1.6's global head ranking removes every head whose mean importance falls under
    one global threshold, with no per-layer floor: at high ratios it can empty a layer, and the
    next step then fails (division by zero). This wrapper lifts the ``min_heads`` most important
    heads of each attention group to a huge mean score (one channel of each set to ``1e30``), so
    they are never under the threshold; all other scores are the base importance's, unchanged.

    Limit: the floor holds while the head ratio is at most :attr:`max_ratio`
    (``1 - attentions * min_heads / total heads``); beyond it tp's global threshold itself falls on a
    lifted head and empties layers anyway. :func:`prune_hf_model` checks this.

    A second Torch-Pruning 1.6 failure, on an iterative step whose schedule removes no head
    (``UnboundLocalError: head_thres``), is handled by :func:`~vlprune.adapters.torch_pruning.step_pruner` /
    :meth:`~vlprune.adapters.torch_pruning.PlatonImportance.step`, not here.

    Caveat: in global mode Torch-Pruning ranks attention channels together with MLP channels even
    when head dims are not pruned (``prune_head_dims=False``), so lifting a head can shift the
    global MLP ranking by one place (the lifted channel no longer takes a place at the bottom).

    Args:
        base: the importance to wrap (any ``tp.importance.Importance``).
        num_heads: q/k/v linear -> head count at construction (``hf_pruner_kwargs(model)["num_heads"]``);
            the current count is read off the layer's width (head dims are never pruned).
        min_heads: heads each attention keeps, >= 1.

    Example:
        >>> kw = hf_pruner_kwargs(model)                                                  # doctest: +SKIP
        >>> imp = KeepHeads(tp.importance.GroupTaylorImportance(), kw["num_heads"])        # doctest: +SKIP
        >>> tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.6, global_pruning=True, **kw)  # doctest: +SKIP
    """

    LIFT = 1e30

    def __init__(self, base: tp.importance.Importance, num_heads: Mapping[nn.Module, int], min_heads: int = 1) -> None:
        if not (isinstance(min_heads, int) and min_heads >= 1):
            raise VLPruneError(f"min_heads must be an integer >= 1, got {min_heads!r}")
        self.base = base
        self.min_heads = min_heads
        self.head_dim: dict[nn.Module, int] = {}
        for module, heads in num_heads.items():
            width = int(getattr(module, "out_features", 0))
            if heads < 1 or width % heads:
                raise VLPruneError(f"{type(module).__name__} with {width} outputs cannot hold {heads} heads")
            self.head_dim[module] = width // heads
        self._counts = list(num_heads.values())

    @property
    def max_ratio(self) -> float:
        """The largest global head pruning ratio the floor can honour,
        ``1 - attentions * min_heads / total heads`` (``num_heads`` as ``hf_pruner_kwargs`` gives it,
        listing the q, k and v of each attention)."""
        if not self._counts:
            return 0.0
        per = 3 if len(self._counts) % 3 == 0 else 1
        attentions, total = len(self._counts) // per, sum(self._counts) / per
        return max(0.0, 1.0 - attentions * self.min_heads / total)

    def __call__(self, group: Any) -> torch.Tensor | None:
        imp = call_importance(self.base, group, type(self).__name__)
        if imp is None:
            return None
        for dep, _ in group:
            module = dep.target.module
            if module in self.head_dim and _matches(dep.handler, _OUT_FNS):
                heads = int(module.out_features) // self.head_dim[module]
                if heads <= 0 or len(imp) % heads:
                    return imp
                per_head = imp.view(heads, -1)
                keep = torch.argsort(per_head.mean(dim=1), descending=True, stable=True)[: self.min_heads]
                # one channel per kept head carries the lift: the head's mean is huge, and the
                # global channel ranking (which tp also feeds with these channels) moves by one slot
                lifted = per_head.clone()
                lifted[keep, per_head[keep].argmax(dim=1)] = _lift_value(imp)
                return lifted.view(-1)
        return imp


def _lift_value(imp: torch.Tensor) -> float:
    """``KeepHeads.LIFT``, or the dtype's largest finite value if that is smaller (fp16)."""
    return min(KeepHeads.LIFT, float(torch.finfo(imp.dtype).max)) if imp.is_floating_point() else KeepHeads.LIFT


class KeepNeurons(_FloorWrapper):
    """Wrap any tp importance so that every MLP keeps at least ``min_neurons`` hidden neurons.

    Torch-Pruning 1.6 removes, in a layer, every channel under the (global or local) threshold; a
    layer all of whose channels are under it would be emptied, so tp skips that layer entirely and
    prunes *nothing* there: at high ratios the removed fraction then falls as the ratio rises
    (tiny LLaVA: 28% of the parameters at 0.5, 16% at 0.99). This wrapper lifts the
    ``min_neurons`` most important neurons of each MLP group to a huge score, so no layer is ever
    emptied and the removed fraction grows with the ratio. Scores are otherwise the base's; a
    layer that would not have been emptied is pruned exactly as without the wrapper.

    The floor holds while the ratio leaves room for the lifted neurons (the scope keeps
    ``int(channels * (1 - ratio)) >= lifted`` channels); :func:`prune_hf_model` checks this and
    refuses higher ratios.

    Args:
        base: the importance to wrap.
        modules: the first linear(s) of each MLP (``fc1`` / ``up_proj`` / ``gate_proj``), the
            roots of the neuron groups.
        min_neurons: neurons each MLP keeps, >= 1.

    Example:
        >>> info = describe(model)                                                        # doctest: +SKIP
        >>> ups = [model.get_submodule(m.up) for m in info.mlps]                          # doctest: +SKIP
        >>> imp = KeepNeurons(tp.importance.GroupTaylorImportance(), ups)                  # doctest: +SKIP
    """

    def __init__(self, base: tp.importance.Importance, modules: Iterable[nn.Module], min_neurons: int = 1) -> None:
        if not (isinstance(min_neurons, int) and min_neurons >= 1):
            raise VLPruneError(f"min_neurons must be an integer >= 1, got {min_neurons!r}")
        self.base = base
        self.modules = set(modules)
        self.min_neurons = min_neurons

    def __call__(self, group: Any) -> torch.Tensor | None:
        imp = call_importance(self.base, group, type(self).__name__)
        if imp is None:
            return None
        for dep, _ in group:
            if dep.target.module in self.modules and _matches(dep.handler, _OUT_FNS):
                if len(imp) <= self.min_neurons:
                    return imp
                keep = torch.argsort(imp, descending=True, stable=True)[: self.min_neurons]
                lifted = imp.clone()
                lifted[keep] = _lift_value(imp)
                return lifted
        return imp


def _scope_limits(pruner: Any, floors: Mapping[nn.Module, int]) -> tuple[float, float]:
    """(largest global ratio, largest local ratio) that leave every floored group its floor.

    ``floors``: root module (MLP first linear, q/k/v) -> channels lifted in its group. Only the
    groups of Torch-Pruning's default scope count (those in ``pruning_ratio_dict`` are ranked apart)."""
    total = lifted = 0
    local = 1.0
    dg = pruner.DG
    for group in dg.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(group):
            continue
        outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
        if any(m in pruner._layer_to_scope for m in outs):
            continue
        n = len(group[0].idxs)
        floor = next((floors[m] for m in outs if m in floors), 0)
        total += n
        lifted += floor
        if floor:
            local = min(local, 1.0 - floor / n)
    return (1.0 - lifted / total if total else 1.0), local


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
    min_heads: int | None = 1,
    min_neurons: int | None = 1,
) -> dict[str, dict[str, int]]:
    """Prune a transformers model's MLP neurons and attention heads with Torch-Pruning, in one call.

    Builds ``tp.pruner.BasePruner`` with :func:`hf_pruner_kwargs`, runs one ``step()``, then
    :func:`vlprune.adapters.hf.sync.sync_hf_model`. If anything fails, the model's modules,
    parameters (the same objects, with their values) and configs (the same objects, sub-configs
    included) are restored before the error propagates (:mod:`vlprune.adapters.hf.undo`).

    Floors keep the removed fraction growing with the ratio: Torch-Pruning 1.6 skips a layer it
    would empty (and prunes nothing there), so without them a higher ratio can remove *less*.
    Every MLP keeps ``min_neurons`` neurons (:class:`KeepNeurons`) and every attention
    ``min_heads`` heads (:class:`KeepHeads` in global mode); a ratio the floors cannot honour is
    refused with the largest one that works, except the defaulted head ratio, which is capped.

    Args:
        model: the transformers model (pruned in place).
        example_inputs: a dict of tensors for tracing (``model(**example_inputs)``).
        importance: any tp importance (e.g. :class:`~vlprune.adapters.torch_pruning.IDWeightedImportance`). Gradient-based ones need
            ``loss.backward()`` before this call.
        pruning_ratio: fraction of MLP neurons removed, in [0, 1).
        head_pruning_ratio: fraction of heads removed (default: ``pruning_ratio``, capped at what
            ``min_heads`` allows when MLPs are pruned too).
        global_pruning: rank all groups together (right for heads; Torch-Pruning's local mode
            over-removes heads when iterated).
        min_heads: heads every attention keeps (default 1); None: Torch-Pruning's own head
            ranking, which can empty an attention (tp then leaves it whole).
        min_neurons: neurons every MLP keeps (default 1); None: no floor (tp then leaves a layer
            it would empty whole).
        prune_heads / prune_mlp / modalities / ignored_layers: see :func:`hf_pruner_kwargs`.
        pruning_ratio_dict: per-module ratios (tp's ``pruning_ratio_dict``).

    Returns:
        What :func:`sync_hf_model` changed.

    Raises:
        VLPruneError: a ratio outside [0, 1) or above what the floors allow, nothing to prune,
            missing gradients, nothing pruned although a ratio > 0 was asked, or a failure
            inside pruning.
        DataError: NaN / inf importance scores (e.g. from a NaN in the batch).

    Example:
        >>> imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)   # doctest: +SKIP
        >>> model(**batch).loss.backward(); prune_hf_model(model, example, imp, 0.4)      # doctest: +SKIP
    """
    check_ratio(pruning_ratio)
    head_ratio = check_ratio(pruning_ratio if head_pruning_ratio is None else head_pruning_ratio, "head pruning ratio")
    for module, ratio in (pruning_ratio_dict or {}).items():
        check_ratio(ratio, f"pruning ratio of {type(module).__name__}")
    for value, what in ((min_heads, "min_heads"), (min_neurons, "min_neurons")):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise VLPruneError(f"{what} must be an integer >= 1 or None, got {value!r}")
    kwargs = hf_pruner_kwargs(
        model, prune_heads=prune_heads, prune_mlp=prune_mlp, modalities=modalities, ignored_layers=ignored_layers
    )
    if not isinstance(example_inputs, dict):
        raise VLPruneError("example_inputs must be a dict of tensors, as passed to model(**example_inputs)")
    floors: dict[nn.Module, int] = {}  # root module -> channels its group keeps (for the ratio limits)
    if kwargs["prune_num_heads"] and min_heads is not None:
        keep = KeepHeads(importance, kwargs["num_heads"], min_heads=min_heads)
        atts = dict(kwargs["num_heads"])
        most = keep.max_ratio if global_pruning else min((h - min_heads) / h for h in atts.values())
        if head_ratio > most + 1e-9:
            if head_pruning_ratio is None and prune_mlp:
                logger.info("head pruning ratio capped at %.3f so every attention keeps %d head(s)", most, min_heads)
                head_ratio = max(0.0, most)
            else:
                raise VLPruneError(
                    f"head pruning ratio {head_ratio} cannot keep {min_heads} head(s) in every attention: "
                    f"at most {max(0.0, most):.3f} of the heads can go; lower head_pruning_ratio or min_heads"
                )
        if global_pruning and not isinstance(importance, KeepHeads):
            importance = keep
            floors.update({m: min_heads for m in atts})
    if min_neurons is not None and prune_mlp:
        ignored = set(kwargs["ignored_layers"])
        roots = [
            model.get_submodule(path)
            for mlp in describe(model).mlps
            for path in (mlp.up, mlp.gate)
            if path and model.get_submodule(path) not in ignored
        ]
        importance = KeepNeurons(importance, roots, min_neurons=min_neurons)
        floors.update({m: min_neurons for m in roots})
    asked = pruning_ratio > 0 or head_ratio > 0 or any(r > 0 for r in (pruning_ratio_dict or {}).values())
    with restore_on_failure(model):
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
        if floors and prune_mlp:
            most_global, most_local = _scope_limits(pruner, floors)
            most = most_global if global_pruning else most_local
            if pruning_ratio > most + 1e-9:
                raise VLPruneError(
                    f"pruning_ratio {pruning_ratio} cannot be honoured: Torch-Pruning would empty layers (and then "
                    f"leave them whole, removing less than at a lower ratio); with min_neurons={min_neurons} and "
                    f"min_heads={min_heads} at most {max(0.0, most):.3f} can go here; lower pruning_ratio "
                    "(or min_neurons / min_heads)"
                )
        before = sum(p.numel() for p in model.parameters())
        pruner.step()
        if asked and sum(p.numel() for p in model.parameters()) == before:
            raise VLPruneError(
                f"nothing was pruned although pruning_ratio={pruning_ratio} (heads {head_ratio}) was asked; the model is "
                "left as it was. Likely causes: the importance skipped every group (returned None), its scores are all "
                "equal or NaN, or the ratio is too small to remove one neuron / head; check the importance and raise "
                "the ratio"
            )
        return sync_hf_model(model, pruner=pruner)
