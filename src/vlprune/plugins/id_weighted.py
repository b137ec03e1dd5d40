"""ID-weighted importance (Wang et al., ICML 2024): S(theta) = S_base(theta) x ID(layer of theta).

Framework-agnostic math; the Torch-Pruning adapter (``vlprune.adapters.torch_pruning``) and the
NNI adapter call these functions.

A structured group (e.g. an MLP hidden channel: a row of ``fc1`` and a column of ``fc2``) spans
several layers. The paper weights every weight by the ID of its own layer; with a base score that
averages over the group's layers, the faithful group weight is the mean ID of the layers in the
group (``reduce="mean"``, the default). ``"root"`` uses the first profiled layer of the group (the
layer whose outputs are the pruned channels), ``"max"`` / ``"min"`` the extremes.

Example:
    >>> from vlprune.plugins.id_weighted import group_id, id_weight
    >>> group_id(["mlp.fc1", "mlp.fc2"], {"mlp.fc1": 40.0, "mlp.fc2": 20.0})
    30.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from vlprune.errors import VLPruneError
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl

__all__ = ["GroupIDReduce", "group_id", "id_weight", "vlprune_register_criteria"]

GroupIDReduce = Literal["mean", "root", "max", "min"]


def group_id(layers: Sequence[str], ids: Mapping[str, float], reduce: GroupIDReduce = "mean") -> float | None:
    """The ID that weights a group spanning ``layers``.

    Args:
        layers: module names of the group's layers, root first.
        ids: module name -> intrinsic dimension (an ``IDProfile.ids()``).
        reduce: ``"mean"`` | ``"root"`` | ``"max"`` | ``"min"`` over the layers that have an ID.

    Returns:
        The group's ID, or None if no layer of the group has one.
    """
    values = [float(ids[name]) for name in layers if name in ids]
    if not values:
        return None
    if reduce == "mean":
        return sum(values) / len(values)
    if reduce == "root":
        return values[0]
    if reduce == "max":
        return max(values)
    if reduce == "min":
        return min(values)
    raise VLPruneError(f"reduce must be one of mean, root, max, min; got {reduce!r}")


def id_weight(scores: torch.Tensor, layer_id: float, scale: float = 1.0) -> torch.Tensor:
    """``scores * layer_id / scale``: the ID-weighted score (``scale`` = 1 keeps the raw ID, as in
    the paper; the mean ID of the profile keeps scores on the base's scale)."""
    if not layer_id > 0 or not scale > 0:
        raise VLPruneError(f"intrinsic dimensions must be positive, got ID {layer_id} (scale {scale})")
    return scores * (float(layer_id) / float(scale))


@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register ID-weighted importance."""
    return [
        CriterionSpec(
            name="id_weighted",
            level="channel",
            needs="calibration",
            adapters={
                "torch_pruning": "vlprune.adapters.torch_pruning:IDWeightedImportance",
                "nni": "vlprune.adapters.nni.pruners:IDWeightedPruner",
            },
            description="any base importance x the intrinsic dimension of its layer",
            source="Wang et al., ICML 2024",
        )
    ]
