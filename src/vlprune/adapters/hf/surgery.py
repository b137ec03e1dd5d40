"""Surgery on transformers models: sync after Torch-Pruning, remove decoder layers, save and reload.

A re-export, so that existing imports keep working; the code lives by concern in
:mod:`vlprune.adapters.hf.sync` (attention / config bookkeeping after Torch-Pruning changed the
shapes: :func:`sync_hf_model`), :mod:`vlprune.adapters.hf.layers` (depth pruning:
:func:`remove_layers`) and :mod:`vlprune.adapters.hf.persist` (:func:`save_pruned` /
:func:`load_pruned`).

Example:
    >>> import torch_pruning as tp                                  # doctest: +SKIP
    >>> pruner = tp.pruner.BasePruner(model, inputs, importance=imp, pruning_ratio=0.4,
    ...     **hf_pruner_kwargs(model))                              # doctest: +SKIP
    >>> pruner.step()                                               # doctest: +SKIP
    >>> sync_hf_model(model, pruner=pruner)                         # doctest: +SKIP
    >>> save_pruned(model, "pruned/", processor=processor)          # doctest: +SKIP
    >>> model = load_pruned("pruned/")                              # doctest: +SKIP
"""

from __future__ import annotations

from vlprune.adapters.hf.layers import LayerRemoval, remove_layers
from vlprune.adapters.hf.persist import SHAPES_FILE, load_pruned, save_pruned
from vlprune.adapters.hf.sync import (
    ATTENTION_ATTRS,
    AttentionLayout,
    MLPLayout,
    find_attentions,
    find_mlps,
    sync_hf_model,
)

__all__ = [
    "sync_hf_model",
    "save_pruned",
    "load_pruned",
    "remove_layers",
    "LayerRemoval",
    "find_attentions",
    "find_mlps",
    "AttentionLayout",
    "MLPLayout",
    "SHAPES_FILE",
    "ATTENTION_ATTRS",
]
