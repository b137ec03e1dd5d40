"""NNI masks -> a really smaller transformers model: :func:`shrink`.

NNI 3.0's ``ModelSpeedup`` fails on torch 2.x (its tracer, NNI issue 5768), even for a two-layer
MLP. :func:`shrink` does its job for the transformers families vlprune knows (CLIP, SigLIP, ViT,
DINOv2, BLIP, ViLT, LLaVA, Llama-style decoders): it reads NNI's masks
(``{module name: {"weight": mask, "bias": mask}}``, 1 = keep), turns them into the structures
they switch off, removes those with Torch-Pruning's dependency graph (or :func:`vlprune.remove_layers`
for whole decoder layers) and brings head counts and configs in line with
:func:`vlprune.sync_hf_model`.

What is removed, and when (a removal is only made where it is exact, i.e. the shrunk model
computes what the masked model computes):

- **MLP neurons**: hidden neuron ``i`` of an MLP goes when row ``i`` of its first linear (fc1 /
  up_proj / intermediate.dense) or of its gate is masked whole (weight row, and the bias entry if
  the layer has a bias), or column ``i`` of its second linear is. The neuron then outputs
  ``act(0) * ... = 0`` (GELU, quick-GELU, SiLU, ReLU all map 0 to 0). Masks made with NNI's
  ``granularity="out_channel"`` on fc1 / up_proj / gate_proj are of this kind.
- **Attention heads**: the masked rows of q, k and v must be whole heads, the same heads in all
  three (for grouped-query attention: whole key/value heads in k and v, and every query head of
  those groups in q). Those heads are removed (q/k/v rows, o_proj columns) and the attention's
  head counts follow. NNI makes such masks with ``granularity=[head_dim, -1]`` and one
  ``dependency_group_id`` per attention for its q, k and v (see the example); NNI cannot group
  the differently shaped q and k/v of grouped-query attention, so there build the masks by hand
  (zero rows ``g*head_dim:(g+1)*head_dim`` of k and v, and the rows of query heads
  ``g*n_rep .. (g+1)*n_rep - 1`` of q). Masked q/k/v rows
  that are not whole heads, or heads masked in some of q/k/v but not all, cannot be removed
  exactly: :class:`~vlprune.errors.ModelStructureError` names the attention. Fused ``qkv``
  linears (BLIP's vision tower) are refused too.
- **All or nothing per block**: an MLP whose every neuron, or an attention whose every head, is
  masked cannot be emptied (NNI's ``global_group_id`` can do that); it keeps its width with zero
  weights, and a warning says so.
- **Decoder layers**: a decoder layer (``vlprune.describe_model(model).decoder_layers``) whose
  attention output projection (o_proj) and MLP output projection (down_proj) are masked whole,
  weights and biases, adds nothing to the residual stream of a pre-norm decoder; it is removed
  with :func:`vlprune.remove_layers` (the masks ``LayerSimilarityPruner`` makes). A BERT-style
  (post-norm) layer is no identity then: it is kept, its masked weights stay zero.
- **Everything else stays as zeros**: masks that switch off no whole structure (fine-grained
  masks, rows of o_proj / down_proj / fc2 / embeddings / heads, which carry the residual width
  vlprune never narrows) are applied (the weights multiplied by the masks) and kept; a warning
  says how many masked weights stay as zeros (``ShrinkReport.zeros_left``). Use
  ``granularity="out_channel"`` on the MLPs' first linears and head masks on q/k/v to make
  masks that shrink.

Masks are applied first, so the returned model always equals the masked model (weights times
masks) -- with ``example_inputs`` this is checked: the masked model and the shrunk model are run
on them and their outputs compared; a difference restores the model and raises. Everything
(masks, names, shapes, head consistency) is checked before the model is touched, and any
failure later restores the model's modules, parameters (the same objects, with their values) and
configs before the error propagates.

Example:
    >>> from nni.compression.pruning import L1NormPruner                               # doctest: +SKIP
    >>> info = vlprune.describe_model(model)                                           # doctest: +SKIP
    >>> config = [{"op_names": [m.up for m in info.mlps], "sparse_ratio": 0.5,
    ...            "granularity": "out_channel"}]                                       # doctest: +SKIP
    >>> config += [{"op_names": [a.q, a.k, a.v], "sparse_ratio": 0.5, "granularity": [a.head_dim, -1],
    ...             "dependency_group_id": a.name} for a in info.attentions
    ...            if not a.fused and a.num_kv_heads == a.num_heads]                    # doctest: +SKIP
    >>> pruner = L1NormPruner(model, config)                                           # doctest: +SKIP
    >>> _, masks = pruner.compress(); pruner.unwrap_model()                            # doctest: +SKIP
    >>> report = shrink(model, masks, example_inputs)                                  # doctest: +SKIP
    >>> vlprune.save_pruned(model, "out/")                                             # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError

__all__ = ["ShrinkReport", "shrink", "head_masks"]

logger = logging.getLogger(__name__)


@dataclass
class ShrinkReport:
    """What :func:`shrink` removed. Module paths are those of the model before shrinking.

    Attributes:
        params_before: parameters before (each shared parameter counted once).
        params_after: parameters after.
        channels: output channels removed per linear (q/k/v, fc1 / up_proj / gate_proj, ...);
            their consumers (o_proj / fc2 / down_proj input columns) follow and are not listed.
        heads: per attention module, the indices (original numbering) of the query heads removed.
        layers: paths of the decoder layers removed.
        zeros_left: masked weights (and biases) that no removal covered: they stay as zeros.
        verified: True when the shrunk model's outputs were compared with the masked model's on
            ``example_inputs`` (and agreed).
    """

    params_before: int
    params_after: int
    channels: dict[str, int] = field(default_factory=dict)
    heads: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    zeros_left: int = 0
    verified: bool = False

    @property
    def removed_fraction(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> str:
        """One line: parameters, neurons/channels, heads, layers, zeros left."""
        return (
            f"{self.params_before:,} -> {self.params_after:,} parameters ({self.removed_fraction:.1%} removed): "
            f"{sum(self.channels.values())} channels in {len(self.channels)} linears, "
            f"{sum(len(h) for h in self.heads.values())} heads in {len(self.heads)} attentions, "
            f"{len(self.layers)} layers; {self.zeros_left} masked weights stay zero"
        )


# ------------------------------------------------------------------------------------------------
# reading and checking the masks
# ------------------------------------------------------------------------------------------------


def _check_unwrapped(model: nn.Module) -> None:
    for name, module in model.named_modules():
        wrapped = "_nni_wrapper" in module._modules or "_nni_wrapper" in module.__dict__
        nni_class = type(module).__module__.startswith("nni.") and type(module).__name__ == "ModuleWrapper"
        if wrapped or nni_class:
            where = name.removesuffix("._nni_wrapper") if name else type(model).__name__
            raise VLPruneError(
                f"the model is still wrapped by an NNI pruner (module {where!r} carries an NNI wrapper, its "
                "weights are buffers): call pruner.unwrap_model() first, then shrink(model, masks, ...)"
            )


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _read_masks(model: nn.Module, masks: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {param name: bool keep-mask on the parameter's device}}``, every entry checked."""
    if isinstance(masks, tuple) and len(masks) == 2 and isinstance(masks[1], Mapping):
        raise VLPruneError(
            "masks is a (model, masks) pair: pass the second item of pruner.compress() "
            "(`_, masks = pruner.compress()`), a dict {module name: {'weight': mask, 'bias': mask}}"
        )
    if not isinstance(masks, Mapping):
        raise VLPruneError(
            f"masks must be a dict {{module name: {{'weight': mask, 'bias': mask}}}} as NNI's pruner.compress() / "
            f"get_masks() return, got {type(masks).__name__}"
        )
    modules = dict(model.named_modules())
    unknown = sorted((str(n) for n in masks if not isinstance(n, str) or n not in modules or n == ""))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
        hint = f"closest: {close}" if close else f"module names look like: {[n for n in modules if n][:3]}"
        more = f" (and {len(unknown) - 1} more of the {len(masks)} masked modules)" if len(unknown) > 1 else ""
        raise ModelStructureError(
            f"masks name module {name!r}{more}, which {type(model).__name__} does not have ({hint}); were the "
            "masks made for another model, or for this one before it was shrunk or had layers removed?"
        )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, targets in masks.items():
        module = modules[name]
        if not isinstance(targets, Mapping):
            raise VLPruneError(
                f"masks[{name!r}] must be a dict {{'weight': mask, 'bias': mask}}, got {type(targets).__name__}"
            )
        read: dict[str, torch.Tensor] = {}
        for target, mask in targets.items():
            if mask is None:  # NNI lists the absent bias of a bias-free layer as None
                continue
            param = module._parameters.get(target) if isinstance(target, str) else None
            if param is None:
                raise ModelStructureError(
                    f"masks[{name!r}] names {target!r}, which is no parameter of {name} "
                    f"({type(module).__name__}; parameters: {[k for k, v in module._parameters.items() if v is not None]})"
                )
            if not isinstance(mask, torch.Tensor):
                raise VLPruneError(f"masks[{name!r}][{target!r}] must be a tensor, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(param.shape):
                raise ModelStructureError(
                    f"masks[{name!r}][{target!r}] has shape {tuple(mask.shape)} but {name}.{target} has shape "
                    f"{tuple(param.shape)}: the masks do not fit this model (made for another model, or before it "
                    "was shrunk?); make the masks on this model"
                )
            values = mask.detach()
            if values.dtype != torch.bool:
                bad = ~((values == 0) | (values == 1))
                if bool(bad.any()):
                    raise DataError(
                        f"masks[{name!r}][{target!r}] holds {int(bad.sum())} values other than 0 and 1 (e.g. "
                        f"{values[bad].flatten()[0].item()!r}); shrink takes keep-masks (1 = keep, 0 = pruned) as NNI "
                        "makes them"
                    )
            read[target] = (values != 0).to(param.device)
        if read:
            out[name] = read
    return out


def _dead_rows(module: nn.Module, keep: Mapping[str, torch.Tensor]) -> set[int]:
    """Output rows whose masked weight row is all zero and whose bias is masked or absent."""
    weight_keep = keep.get("weight")
    if weight_keep is None or weight_keep.dim() < 2:
        return set()
    dead = ~weight_keep.flatten(1).any(1)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        if "bias" in keep:
            dead &= ~keep["bias"]
        else:
            dead &= bias.detach() == 0
    return set(torch.nonzero(dead).flatten().tolist())


def _dead_cols(keep: Mapping[str, torch.Tensor]) -> set[int]:
    weight_keep = keep.get("weight")
    if weight_keep is None or weight_keep.dim() != 2:
        return set()
    return set(torch.nonzero(~weight_keep.any(0)).flatten().tolist())


def _fully_masked(module: nn.Module, keep: Mapping[str, torch.Tensor] | None) -> bool:
    if keep is None or "weight" not in keep or bool(keep["weight"].any()):
        return False
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        return ("bias" in keep and not bool(keep["bias"].any())) or bool((bias.detach() == 0).all())
    return True


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    layers: list[str] = field(default_factory=list)
    kept_layers: list[str] = field(default_factory=list)  # layer masks vlprune cannot remove exactly
    mlps: list[tuple[Any, list[int]]] = field(default_factory=list)  # (MLPInfo, neurons)
    attentions: list[tuple[Any, list[int], list[int]]] = field(default_factory=list)  # (AttentionInfo, q heads, kv heads)
    out_rows: dict[str, list[int]] = field(default_factory=dict)
    in_cols: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.layers or self.mlps or self.attentions)


def _post_norm(layer: nn.Module) -> bool:
    """BERT-style layers normalise after the residual sum (``...output.LayerNorm``)."""
    return any(n.endswith("output.LayerNorm") for n, _ in layer.named_modules())


def _whole_heads(rows: set[int], count: int, head_dim: int, path: str, what: str, att: str) -> list[int]:
    heads = sorted({r // head_dim for r in rows})
    partial = [h for h in heads if any(h * head_dim + j not in rows for j in range(head_dim))]
    if partial:
        raise ModelStructureError(
            f"attention {att}: {path} masks part of head(s) {partial} ({what} rows "
            f"{sorted(r for r in rows if r // head_dim in partial)[:8]}...): only whole heads can be removed; mask "
            f"whole heads (NNI granularity=[{head_dim}, -1] with one dependency_group_id for the attention's q, k "
            f"and v, or head_masks(model, {{attention: heads}})) or leave {path} out of the config list"
        )
    if len(heads) > count:  # cannot happen for a well-formed layout; guards the arithmetic
        raise ModelStructureError(f"attention {att}: {path} has more masked heads than the {count} it holds")
    return heads


def _plan(model: nn.Module, keep: dict[str, dict[str, torch.Tensor]], info: Any) -> _Plan:
    modules = dict(model.named_modules())
    plan = _Plan()
    layer_of: dict[str, str] = {}
    for path in info.decoder_layers:
        atts = [a for a in info.attentions if a.name.startswith(path + ".")]
        mlps = [m for m in info.mlps if m.name.startswith(path + ".") or m.up.startswith(path + ".")]
        if not atts or not mlps:
            continue
        outs = [a.o for a in atts] + [m.down for m in mlps]
        if all(_fully_masked(modules[o], keep.get(o)) for o in outs):
            if _post_norm(modules[path]):
                plan.kept_layers.append(path)
                logger.warning(
                    "shrink: %s has its output projections masked whole, but it normalises after the residual sum "
                    "(post-norm), so it is no identity and is kept; its masked weights stay zero", path)
            else:
                plan.layers.append(path)
                layer_of.update({n: path for n in modules if n.startswith(path + ".")})
    for mlp in info.mlps:
        if mlp.up in layer_of:
            continue
        dead = _dead_rows(modules[mlp.up], keep.get(mlp.up, {}))
        if mlp.gate:
            dead |= _dead_rows(modules[mlp.gate], keep.get(mlp.gate, {}))
        dead |= _dead_cols(keep.get(mlp.down, {}))
        if not dead:
            continue
        if len(dead) >= mlp.hidden:
            logger.warning(
                "shrink: the masks switch off all %d neurons of the MLP %s; an MLP cannot be emptied, so it keeps "
                "its width with zero weights (mask the decoder layer's output projections to remove the layer, or "
                "cap the ratio per layer: NNI's global_group_id can empty a layer)", mlp.hidden, mlp.name)
            continue
        idxs = sorted(dead)
        plan.mlps.append((mlp, idxs))
        for path in (mlp.up, mlp.gate):
            if path:
                plan.out_rows[path] = idxs
        plan.in_cols[mlp.down] = idxs
    for att in info.attentions:
        if att.q in layer_of:
            continue
        rows = {p: _dead_rows(modules[p], keep.get(p, {})) for p in dict.fromkeys((att.q, att.k, att.v))}
        if not any(rows.values()):
            continue
        if att.fused:
            raise ModelStructureError(
                f"attention {att.name}: the masks switch off rows of its fused qkv linear {att.q}; shrink does not "
                "remove heads of fused qkv attention: leave it out of the config list"
            )
        H, K, d = att.num_heads, att.num_kv_heads, att.head_dim
        q_heads = _whole_heads(rows[att.q], H, d, att.q, "query", att.name)
        k_heads = _whole_heads(rows[att.k], K, d, att.k, "key", att.name)
        v_heads = _whole_heads(rows[att.v], K, d, att.v, "value", att.name)
        group = H // K
        from_kv = sorted({h for g in k_heads for h in range(g * group, (g + 1) * group)})
        if k_heads != v_heads or q_heads != from_kv:
            gqa = f" (grouped-query: {group} query heads per key/value head)" if group > 1 else ""
            raise ModelStructureError(
                f"attention {att.name}: the masks switch off different heads in q, k and v{gqa}: query heads "
                f"{q_heads} in {att.q}, key heads {k_heads} in {att.k}, value heads {v_heads} in {att.v}; a head "
                "can only be removed from all three at once. Mask q, k and v of one attention together (NNI: "
                f"granularity=[{d}, -1] and the same dependency_group_id for the three; or build the masks with "
                "vlprune.adapters.nni.speedup.head_masks(model, {attention: heads}), which grouped-query attention needs)"
            )
        if len(q_heads) >= H:
            logger.warning(
                "shrink: the masks switch off all %d heads of the attention %s; an attention cannot be emptied, so "
                "it keeps its heads with zero weights (mask the decoder layer's output projections to remove the "
                "layer)", H, att.name)
            continue
        q_rows = sorted(rows[att.q])
        kv_rows = sorted(rows[att.k])
        plan.attentions.append((att, q_heads, k_heads))
        plan.out_rows[att.q] = q_rows
        plan.out_rows[att.k] = kv_rows
        plan.out_rows[att.v] = kv_rows
        plan.in_cols[att.o] = q_rows
    return plan


def _zeros_left(keep: dict[str, dict[str, torch.Tensor]], plan: _Plan) -> int:
    removed_layers = tuple(p + "." for p in plan.layers)
    left = 0
    for name, targets in keep.items():
        if name.startswith(removed_layers):
            continue
        for target, mask in targets.items():
            zero = ~mask
            covered = torch.zeros_like(zero)
            if name in plan.out_rows:
                covered[plan.out_rows[name]] = True
            if name in plan.in_cols and target == "weight" and zero.dim() == 2:
                covered[:, plan.in_cols[name]] = True
            left += int((zero & ~covered).sum())
    return left


# ------------------------------------------------------------------------------------------------
# undo
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# running and comparing
# ------------------------------------------------------------------------------------------------


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    """One eval-mode forward without gradients, with the random generators seeded and restored, so
    two calls draw the same numbers (ViLT samples image patches at random)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            if isinstance(example_inputs, Mapping):
                return model(**example_inputs)
            if isinstance(example_inputs, (list, tuple)):
                return model(*example_inputs)
            return model(example_inputs)
    finally:
        for module, mode in modes:
            module.training = mode


def _tensors(output: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a model output, by key (nested outputs flattened; tuples such
    as ``hidden_states`` / ``attentions``, whose length follows the depth, and caches skipped)."""
    if isinstance(output, torch.Tensor):
        return {prefix: output} if output.is_floating_point() else {}
    found: dict[str, torch.Tensor] = {}
    if isinstance(output, Mapping):
        for key, value in output.items():
            if isinstance(value, (torch.Tensor, Mapping)):
                found.update(_tensors(value, f"{prefix}.{key}"))
    elif isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        found.update(_tensors(output[0], f"{prefix}[0]"))
    return found


def _compare(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> str | None:
    if before.keys() != after.keys():
        return f"the outputs changed keys: {sorted(before)} -> {sorted(after)}"
    for key, ref in before.items():
        new = after[key]
        if new.shape != ref.shape:
            return f"{key} changed shape {tuple(ref.shape)} -> {tuple(new.shape)}"
        ref32, new32 = ref.float(), new.float()
        rtol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
        scale = float(ref32.abs().max()) if ref32.numel() else 0.0
        if not torch.allclose(new32, ref32, rtol=rtol, atol=rtol * max(scale, 1e-3)):
            diff = float((new32 - ref32).abs().max())
            return f"{key} differs from the masked model's by up to {diff:.3g} (largest value {scale:.3g})"
    return None


# ------------------------------------------------------------------------------------------------
# removal
# ------------------------------------------------------------------------------------------------


def _is_tp_op(module: Any) -> bool:
    return type(module).__module__.startswith("torch_pruning")


def _prune_group(dg: Any, root: nn.Module, out_rows: Mapping[nn.Module, list[int]],
                 in_cols: Mapping[nn.Module, list[int]], names: Mapping[nn.Module, str], members: Iterable[nn.Module]) -> None:
    """Remove ``out_rows[root]`` through tp's group of ``root``, after checking that the group
    touches exactly the planned channels of the modules it ties together (``names``: the modules'
    paths before shrinking, for messages)."""
    idxs = out_rows[root]
    group = dg.get_pruning_group(root, tp.prune_linear_out_channels, list(idxs))
    seen: set[nn.Module] = set()
    for dep, dep_idxs in group:
        module = dep.target.module
        if _is_tp_op(module):
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        expected = (out_rows if out else in_cols).get(module) if isinstance(module, nn.Module) else None
        if expected is None and not out:
            continue  # a consumer of dead channels: removing its inputs is exact
        got = sorted(int(i) for i in dep_idxs)
        if expected is None or got != list(expected):
            name = names.get(module, dep.target.name.split(" (")[0])
            raise ModelStructureError(
                f"removing channels {list(idxs)[:8]}... of {names[root]} would, through Torch-Pruning's dependency "
                f"graph, also remove {'output' if out else 'input'} channels {got[:8]}... of {name}, which the masks "
                f"keep; no dependency-consistent removal honours these masks: mask {name} the same way or leave "
                f"{names[root]} unmasked"
            )
        seen.add(module)
    missing = [names[m] for m in members if m not in seen]
    if missing:
        raise ModelStructureError(
            f"Torch-Pruning's dependency graph does not tie {missing} to {names[root]}, so removing its masked "
            "channels would leave them mismatched; this model's structure is not one shrink knows"
        )
    group.prune()


def _prune_direct(members: Iterable[nn.Module], out_rows: Mapping[nn.Module, list[int]],
                  in_cols: Mapping[nn.Module, list[int]]) -> None:
    for module in dict.fromkeys(members):
        if module in out_rows:
            tp.prune_linear_out_channels(module, list(out_rows[module]))
        if module in in_cols:
            tp.prune_linear_in_channels(module, list(in_cols[module]))


def _dependency_graph(model: nn.Module, example_inputs: Any) -> Any:
    from vlprune.adapters.hf.prune import hf_pruner_kwargs

    kwargs = hf_pruner_kwargs(model)
    return tp.DependencyGraph().build_dependency(
        model,
        example_inputs=example_inputs,
        forward_fn=kwargs["forward_fn"],
        output_transform=kwargs["output_transform"],
        unwrapped_parameters=kwargs["unwrapped_parameters"],
        verbose=False,
    )


def _apply_masks(model: nn.Module, keep: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for name, targets in keep.items():
            module = model.get_submodule(name)
            for target, mask in targets.items():
                param = module._parameters[target]
                param.data = param.data * mask.to(param.dtype)


def head_masks(model: nn.Module, heads: Mapping[str, Iterable[int]]) -> dict[str, dict[str, torch.Tensor]]:
    """Whole-head masks in NNI's format, for :func:`shrink` (or to merge into NNI's masks).

    NNI masks whole heads with ``granularity=[head_dim, -1]`` and a ``dependency_group_id`` per
    attention, except for grouped-query attention, whose q and k/v differ in shape; this builds
    them for any attention ``vlprune.describe_model`` finds (fused qkv excepted).

    Args:
        model: the transformers model.
        heads: attention path (``describe_model(model).attentions[i].name``) -> query heads to
            mask. For grouped-query attention they must be whole key/value groups (query heads
            ``g*n_rep .. (g+1)*n_rep - 1``); key/value head ``g`` is masked with them.

    Returns:
        ``{q/k/v path: {"weight": mask, "bias": mask}}`` (1 = keep; ``"bias"`` where the linear has one).

    Raises:
        ModelStructureError: an unknown attention path, a fused qkv attention, a head index out of
            range, query heads that split a key/value group.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> model = tiny_model("llava")  # language attentions: 4 query heads, 2 key/value heads
        >>> masks = head_masks(model, {"model.language_model.layers.0.self_attn": [2, 3]})
        >>> sorted(name.rsplit(".", 1)[1] for name in masks)
        ['k_proj', 'q_proj', 'v_proj']
    """
    from vlprune.adapters.hf.families import describe

    attentions = {a.name: a for a in describe(model).attentions}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, chosen in heads.items():
        att = attentions.get(name)
        if att is None:
            close = difflib.get_close_matches(str(name), list(attentions), n=3)
            raise ModelStructureError(
                f"{type(model).__name__} has no attention {name!r} (closest: {close or list(attentions)[:3]}); use "
                "the names of vlprune.describe_model(model).attentions"
            )
        if att.fused:
            raise ModelStructureError(f"attention {name} has a fused qkv linear ({att.q}); shrink does not remove its heads")
        chosen = sorted({int(h) for h in chosen})
        bad = [h for h in chosen if not 0 <= h < att.num_heads]
        if bad:
            raise ModelStructureError(f"attention {name} has heads 0..{att.num_heads - 1}; got {bad}")
        group = att.num_heads // att.num_kv_heads
        kv = sorted({h // group for h in chosen})
        split = [g for g in kv if any(h not in chosen for h in range(g * group, (g + 1) * group))]
        if split:
            raise ModelStructureError(
                f"attention {name}: query heads {chosen} split key/value group(s) {split} ({group} query heads per "
                f"key/value head); mask whole groups, e.g. {list(range(split[0] * group, (split[0] + 1) * group))}"
            )
        for path, masked in ((att.q, chosen), (att.k, kv), (att.v, kv)):
            linear = model.get_submodule(path)
            keep = torch.ones(linear.out_features, dtype=torch.bool, device=linear.weight.device)
            for h in masked:
                keep[h * att.head_dim:(h + 1) * att.head_dim] = False
            mask = {"weight": keep[:, None].expand_as(linear.weight).to(linear.weight.dtype).clone()}
            if linear.bias is not None:
                mask["bias"] = keep.to(linear.bias.dtype)
            out[path] = mask
    return out


def shrink(
    model: nn.Module,
    masks: Mapping[str, Mapping[str, torch.Tensor]],
    example_inputs: Any = None,
    *,
    verify: bool = True,
    progress: bool = True,
) -> ShrinkReport:
    """Make a transformers model really smaller from NNI masks: remove the neurons, heads and
    decoder layers the masks switch off (see the module docstring for the rules), in place.

    The masks are applied to the weights first, so the result equals the masked model; masked
    weights that no removal covers stay as zeros (a warning gives their number).

    Args:
        model: the transformers model the masks were made on, unwrapped (``pruner.unwrap_model()``).
        masks: NNI's masks, ``{module name: {"weight": mask, "bias": mask}}`` with 1 = keep (the
            second item of ``pruner.compress()``, or ``pruner.get_masks()``).
        example_inputs: inputs of one forward pass (a dict for ``model(**example_inputs)``, a tuple,
            or a tensor). With them, heads and neurons are removed through Torch-Pruning's
            dependency graph (which also checks that nothing else depends on the removed channels)
            and, with ``verify``, the shrunk model is compared with the masked model on them.
            Without them, the removals follow the family's layout (``vlprune.describe_model``)
            unchecked.
        verify: compare outputs with the masked model's (needs ``example_inputs``).
        progress: show a tqdm bar over the removals.

    Returns:
        A :class:`ShrinkReport`.

    Raises:
        VLPruneError: the model still wrapped by NNI (call ``pruner.unwrap_model()`` first), masks
            that are no dict of tensors, or a failure while shrinking (the model is restored).
        ModelStructureError: masks naming a module or parameter the model does not have, or with
            another shape; masks no exact removal honours (parts of heads, different heads in q/k/v,
            fused qkv); a shrunk model whose outputs differ from the masked model's.
        DataError: mask values other than 0 and 1.

    Example:
        >>> _, masks = pruner.compress(); pruner.unwrap_model()                # doctest: +SKIP
        >>> report = shrink(model, masks, example_inputs)                      # doctest: +SKIP
        >>> report.params_after < report.params_before                        # doctest: +SKIP
        True
    """
    from vlprune.adapters.hf.families import describe
    from vlprune.adapters.hf.layers import remove_layers
    from vlprune.adapters.hf.sync import sync_hf_model
    from vlprune.adapters.hf.undo import restore_on_failure

    _check_unwrapped(model)
    keep = _read_masks(model, masks)
    before = _param_count(model)
    info = describe(model)
    plan = _plan(model, keep, info)
    zeros_left = _zeros_left(keep, plan)
    report = ShrinkReport(params_before=before, params_after=before, zeros_left=zeros_left)
    if zeros_left:
        total = sum(int((~m).sum()) for t in keep.values() for m in t.values())
        logger.warning(
            "shrink: %d of the %d masked weights switch off no whole neuron, head or layer; they stay as zeros "
            "in the shrunk model (use granularity='out_channel' on the MLPs' first linears and whole-head masks "
            "on q/k/v for masks that shrink)", zeros_left, total)
    try:
        with restore_on_failure(model):
            _apply_masks(model, keep)
            check = verify and example_inputs is not None
            reference = _tensors(_forward(model, example_inputs)) if check else {}
            modules = dict(model.named_modules())  # the paths the plan uses: before any layer goes
            if plan.layers:
                remove_layers(model, list(plan.layers))
                report.layers = tuple(plan.layers)
            steps: list[tuple[str, nn.Module, list[nn.Module]]] = []
            for mlp, _ in plan.mlps:
                root = mlp.up if mlp.up in plan.out_rows else mlp.gate
                steps.append(("mlp", modules[root], [modules[p] for p in (mlp.up, mlp.gate, mlp.down) if p]))
            for att, _, _ in plan.attentions:
                kind = "gqa" if att.num_kv_heads != att.num_heads else "mha"
                steps.append((kind, modules[att.q], [modules[p] for p in (att.q, att.k, att.v, att.o)]))
            if steps:
                out_rows = {modules[p]: idxs for p, idxs in plan.out_rows.items()}
                in_cols = {modules[p]: idxs for p, idxs in plan.in_cols.items()}
                names = {m: n for n, m in modules.items()}
                dg = _dependency_graph(model, example_inputs) if example_inputs is not None else None
                for kind, root, members in tqdm(steps, desc="shrink", disable=not progress, leave=False):
                    if dg is None or kind == "gqa":
                        # tp cannot map query rows to key/value rows through repeat_kv: the layout decides
                        _prune_direct(members, out_rows, in_cols)
                    else:
                        _prune_group(dg, root, out_rows, in_cols, names, members)
                sync_hf_model(model, pruned="heads")
            for mlp, idxs in plan.mlps:
                for path in (mlp.up, mlp.gate):
                    if path:
                        report.channels[path] = len(idxs)
            for att, q_heads, _ in plan.attentions:
                report.heads[att.name] = tuple(q_heads)
                report.channels[att.q] = len(plan.out_rows[att.q])
                for path in dict.fromkeys((att.k, att.v)):
                    report.channels[path] = len(plan.out_rows[path])
            if check:
                problem = _compare(reference, _tensors(_forward(model, example_inputs)))
                if problem:
                    raise ModelStructureError(
                        f"the shrunk model does not compute what the masked model computes ({problem}); the model is "
                        "left as it was. Likely an activation with act(0) != 0 or a block structure shrink does not "
                        "know; apply the masks (multiply the weights) instead of shrinking"
                    )
                report.verified = True
    except VLPruneError:
        raise
    except Exception as exc:
        raise VLPruneError(f"shrink failed ({type(exc).__name__}: {exc}); the model is left as it was") from exc
    report.params_after = _param_count(model)
    logger.info("shrink: %s", report.summary())
    return report
