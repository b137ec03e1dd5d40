"""Peers that share the registry as baselines: Torch-Pruning's own magnitude, Taylor and random
importances (NNI counterparts are added with the NNI adapter)."""

from __future__ import annotations

from vlprune.plugins.hookspecs import CriterionSpec, hookimpl

__all__ = ["vlprune_register_criteria"]


@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register the baseline criteria."""
    return [
        CriterionSpec(
            name="magnitude",
            level="channel",
            needs="none",
            adapters={
                "torch_pruning": "torch_pruning.pruner.importance:GroupMagnitudeImportance",
                "nni": "nni.compression.pruning:L1NormPruner",
            },
            description="L_p norm of the weights of each channel group",
            source="Torch-Pruning; NNI 3.0",
        ),
        CriterionSpec(
            name="taylor",
            level="channel",
            needs="gradients",
            adapters={
                "torch_pruning": "torch_pruning.pruner.importance:GroupTaylorImportance",
                "nni": "nni.compression.pruning:TaylorPruner",
            },
            description="first-order Taylor |w * dL/dw| of each channel group (call loss.backward() first)",
            source="Torch-Pruning; NNI 3.0",
        ),
        CriterionSpec(
            name="random",
            level="channel",
            needs="none",
            adapters={"torch_pruning": "torch_pruning.pruner.importance:RandomImportance"},
            description="uniformly random scores",
            source="Torch-Pruning",
        ),
    ]
