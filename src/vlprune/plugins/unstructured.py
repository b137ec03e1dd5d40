"""Unstructured pruning as in the ID paper: one global threshold over the chosen weights of every
modality, each tensor keeping a minimum number of weights.

* :func:`weight_scores`: magnitude ``|w|``, Taylor ``|w * grad|`` or random scores per weight,
  optionally multiplied by the layer's intrinsic dimension (ID-magnitude ...). PLATON scores come
  from :class:`vlprune.plugins.platon.Platon`; any ``{name: tensor}`` works.
* :func:`global_masks`: the top ``(1 - sparsity)`` of all scores together.
* :func:`apply_masks` / :func:`make_permanent`: ``torch.nn.utils.prune`` masks, which survive
  training (the forward pre-hook recomputes ``weight = weight_orig * weight_mask`` and masked
  weights get zero gradients), then plain weights with zeros.

Example:
    >>> import torch
    >>> from vlprune.plugins.unstructured import global_masks
    >>> masks = global_masks({"a.weight": torch.tensor([[1.0, 4.0]]), "b.weight": torch.tensor([[3.0, 2.0]])}, 0.5, min_keep=0)
    >>> masks["a.weight"].tolist(), masks["b.weight"].tolist()
    ([[False, True]], [[True, False]])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from vlprune.errors import VLPruneError
from vlprune.plugins.id_weighted import id_weight

__all__ = ["global_masks", "weight_scores", "apply_masks", "make_permanent", "sparsity_report", "linear_weight_names"]

logger = logging.getLogger(__name__)


def _min_keep_count(numel: int, min_keep: int | float) -> int:
    if isinstance(min_keep, float) and 0.0 < min_keep < 1.0:
        return min(numel, max(1, int(round(min_keep * numel))))
    if min_keep < 0:
        raise VLPruneError(f"min_keep must be >= 0, got {min_keep!r}")
    return min(numel, int(min_keep))


@torch.no_grad()
def global_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, min_keep: int | float = 0.01
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks by one global threshold over all ``scores``.

    Rule: each tensor first reserves its own ``min_keep`` top-scored weights (an int = a count, a
    float in (0, 1) = a fraction of the tensor, at least 1); the rest of the budget,
    ``round((1 - sparsity) * total)`` minus the reserved weights, goes to the highest remaining
    scores over all tensors together (ties broken by position, deterministically). The kept count
    is exact; if the reserved weights alone exceed the budget, only they are kept (warning).

    Args:
        scores: parameter name -> score tensor of that weight's shape (higher = more important).
        sparsity: fraction of all weights removed, in [0, 1).
        min_keep: weights every tensor keeps.

    Returns:
        parameter name -> bool tensor (True = kept), on the scores' devices.
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise VLPruneError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if not scores:
        raise VLPruneError("no scores given: pass {parameter name: score tensor}")
    flat: list[torch.Tensor] = []
    for name, s in scores.items():
        if not torch.is_tensor(s) or s.numel() == 0:
            raise VLPruneError(f"score of {name!r} must be a non-empty tensor")
        f = s.detach().reshape(-1).to(torch.float64 if s.dtype == torch.float64 else torch.float32).cpu()
        if not torch.isfinite(f).all():
            raise VLPruneError(f"score of {name!r} has NaN or inf values")
        flat.append(f)
    sizes = [f.numel() for f in flat]
    total = sum(sizes)
    budget = int(round((1.0 - float(sparsity)) * total))
    # reserve each tensor's min_keep top weights by giving them +inf priority
    priority = []
    reserved = 0
    for f in flat:
        k = _min_keep_count(f.numel(), min_keep)
        p = f.clone()
        if k:
            p[torch.topk(f, k, sorted=False).indices] = float("inf")
        reserved += k
        priority.append(p)
    if reserved > budget:
        logger.warning("min_keep reserves %d weights, more than the budget of %d: keeping only those", reserved, budget)
        budget = reserved
    allp = torch.cat(priority)
    keep = torch.zeros(total, dtype=torch.bool)
    if budget > 0:
        # stable descending sort: among equal scores, earlier positions win
        order = torch.sort(allp, descending=True, stable=True).indices
        keep[order[:budget]] = True
    out: dict[str, torch.Tensor] = {}
    start = 0
    for (name, s), n in zip(scores.items(), sizes):
        out[name] = keep[start : start + n].reshape(s.shape).to(s.device)
        start += n
    return out


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    modules = dict(model.named_modules())
    module = modules.get(module_name)
    if module is None or not (hasattr(module, attr) or hasattr(module, f"{attr}_orig")):
        raise VLPruneError(f"{name!r} is not a parameter of the model")
    return module, attr


def _trained(module: nn.Module, attr: str) -> torch.Tensor:
    """The trained tensor: ``<attr>_orig`` under a prune reparametrisation, else ``<attr>``."""
    return getattr(module, f"{attr}_orig", None) if hasattr(module, f"{attr}_orig") else getattr(module, attr)


def linear_weight_names(model: nn.Module, exclude: Sequence[str] = ()) -> list[str]:
    """``<module>.weight`` of every ``nn.Linear`` of ``model`` except the modules in ``exclude``."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in set(exclude)]


@torch.no_grad()
def weight_scores(
    model: nn.Module,
    names: Sequence[str] | None = None,
    kind: str = "magnitude",
    ids: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Weight-level scores ``|w|`` (magnitude), ``|w * grad|`` (taylor) or uniform (random),
    times the layer's raw ID when ``ids`` (module name -> ID) is given.

    Layers under a ``torch.nn.utils.prune`` mask are scored on ``weight_orig`` (and its gradient);
    keys stay ``<module>.weight``.
    """
    if kind not in ("magnitude", "taylor", "random"):
        raise VLPruneError(f"kind must be magnitude, taylor or random; got {kind!r}")
    names = list(names) if names is not None else linear_weight_names(model)
    if ids is not None:
        missing = [n for n in names if n.rpartition(".")[0] not in ids]
        if missing:
            raise VLPruneError(f"no intrinsic dimension for {len(missing)} layer(s), e.g. {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        module, attr = _resolve(model, name)
        w = _trained(module, attr)
        if kind == "magnitude":
            s = w.detach().abs().float()
        elif kind == "taylor":
            if w.grad is None:
                raise VLPruneError(f"{name!r} has no gradient: call loss.backward() first (taylor scores)")
            s = (w.detach() * w.grad.detach()).abs().float()
        else:
            s = torch.rand(w.shape, generator=generator).to(w.device)
        if ids is not None:
            s = id_weight(s, ids[name.rpartition(".")[0]])
        out[name] = s
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Apply keep-masks with ``torch.nn.utils.prune.custom_from_mask``; an existing mask on the
    same weight is replaced (not combined). Everything is validated before anything changes."""
    plan = []
    for name, mask in masks.items():
        module, attr = _resolve(model, name)
        target = _trained(module, attr)
        if tuple(mask.shape) != tuple(target.shape):
            raise VLPruneError(f"mask of {name!r} has shape {tuple(mask.shape)}, the weight {tuple(target.shape)}")
        plan.append((module, attr, mask))
    for module, attr, mask in plan:
        existing = getattr(module, f"{attr}_mask", None)
        value = mask.to(device=_trained(module, attr).device, dtype=_trained(module, attr).dtype)
        if existing is not None and hasattr(module, f"{attr}_orig"):
            existing.copy_(value)
            setattr(module, attr, getattr(module, f"{attr}_orig") * existing)
        else:
            torch_prune.custom_from_mask(module, attr, value)


def make_permanent(model: nn.Module) -> int:
    """``torch.nn.utils.prune.remove`` on every masked weight; returns how many modules."""
    count = 0
    for module in model.modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
            count += 1
    return count


@torch.no_grad()
def sparsity_report(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, float]:
    """Fraction of zero weights per chosen weight and ``"overall"`` (size-weighted)."""
    names = list(names) if names is not None else linear_weight_names(model)
    out: dict[str, float] = {}
    zeros = total = 0
    for name in names:
        module, attr = _resolve(model, name)
        w = getattr(module, attr)
        z = int((w == 0).sum())
        out[name] = z / w.numel()
        zeros += z
        total += w.numel()
    out["overall"] = zeros / max(1, total)
    return out
