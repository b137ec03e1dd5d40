"""Model structure read off module names alone, shared by criteria and adapters.

Framework-agnostic (no Torch-Pruning, NNI or model-family knowledge): where the two (optionally
gated) linears of every MLP are, so that neuron-level criteria (:mod:`vlprune.plugins.amp`) find
the hidden activations of a model without importing an adapter. :mod:`vlprune.adapters.hf.families`
builds its richer description (modalities, head counts) on top of these.

Example:
    >>> from vlprune.testbed.tiny import tiny_model
    >>> [m.down for m in mlp_layouts(tiny_model("clip"))][:1]
    ['text_model.encoder.layers.0.mlp.fc2']
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["MLPLayout", "mlp_layouts", "linear_child", "join"]


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is the root (``""``)."""
    return f"{prefix}.{name}" if prefix else name


def linear_child(module: nn.Module, name: str) -> nn.Linear | None:
    """The direct child ``name`` of ``module`` if it is an ``nn.Linear``, else ``None``."""
    child = module._modules.get(name)
    return child if isinstance(child, nn.Linear) else None


@dataclass(frozen=True)
class MLPLayout:
    """Where one MLP's linears are.

    Attributes:
        name: path of the module that contains the MLP.
        up: path of the first linear (``fc1`` / ``up_proj`` / ``intermediate.dense``).
        down: path of the second linear (``fc2`` / ``down_proj`` / ``output.dense``).
        gate: path of the gate linear of a gated MLP, else ``None``.
    """

    name: str
    up: str
    down: str
    gate: str | None = None


def mlp_layouts(model: nn.Module) -> list[MLPLayout]:
    """Where the two (optionally gated) linears of every MLP are, from names alone.

    Args:
        model: any ``nn.Module``.

    Returns:
        One :class:`MLPLayout` per MLP, in module order.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> mlp_layouts(tiny_model("llava"))[-1].gate
        'model.language_model.layers.1.mlp.gate_proj'
    """
    found: list[MLPLayout] = []
    for name, module in model.named_modules():
        if linear_child(module, "fc1") is not None and linear_child(module, "fc2") is not None:
            found.append(MLPLayout(name, join(name, "fc1"), join(name, "fc2")))
        elif linear_child(module, "up_proj") is not None and linear_child(module, "down_proj") is not None:
            gate = join(name, "gate_proj") if linear_child(module, "gate_proj") is not None else None
            found.append(MLPLayout(name, join(name, "up_proj"), join(name, "down_proj"), gate))
        else:
            inter, out = module._modules.get("intermediate"), module._modules.get("output")
            if inter is not None and out is not None:
                up, down = linear_child(inter, "dense"), linear_child(out, "dense")
                if up is not None and down is not None:
                    found.append(MLPLayout(name, join(name, "intermediate.dense"), join(name, "output.dense")))
    return found
