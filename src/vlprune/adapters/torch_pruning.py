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

__all__ = ["IDWeightedImportance", "group_layer_names", "check_ratio"]

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
