"""NNI 3.0 bridge: vlprune criteria as NNI pruners, and NNI masks made into a really smaller model.

An NNI user keeps the experiment (a ``config_list``, a ``TorchEvaluator``, ``pruner.compress()``,
``AGPPruner`` scheduling, a ``DynamicLayerwiseDistiller`` fusion) and swaps in a vlprune pruner:

* :class:`IDWeightedPruner`: NNI's L1 / L2 / Taylor metric x the layer's intrinsic dimension;
* :class:`PlatonPruner`: PLATON's UCB score on its cubic schedule (``profile=``: ID-PLATON);
* :class:`AMPPruner`: AMP's label-free entropy importance with searched MLP widths;
* :class:`LayerSimilarityPruner`: domain-aware choice of whole decoder layers.

NNI's own ``ModelSpeedup`` fails on torch 2.x (a tracer error, NNI issue 5768), so :func:`shrink`
removes masked channels, heads and layers through Torch-Pruning's dependency graph,
:func:`vlprune.remove_layers` and :func:`vlprune.sync_hf_model` instead.

Needs the ``nni`` extra: ``pip install "vlprune[nni]"``.

Example:
    >>> from vlprune.adapters.nni import IDWeightedPruner, shrink          # doctest: +SKIP
    >>> pruner = IDWeightedPruner(model, config_list, profile, base="l1")   # doctest: +SKIP
    >>> _, masks = pruner.compress(); pruner.unwrap_model()                 # doctest: +SKIP
    >>> shrink(model, masks, example_inputs)                                # doctest: +SKIP
"""

from __future__ import annotations

from vlprune.adapters.nni._shared import exact_sparse_ratio
from vlprune.adapters.nni.amp import AMPPruner, amp_config_list
from vlprune.adapters.nni.config import check_config_list, nni_prunable_types, select_modules
from vlprune.adapters.nni.evaluators import PatchedTransformersEvaluator
from vlprune.adapters.nni.layers import LayerSimilarityPruner, layer_config_list
from vlprune.adapters.nni.pruners import IDWeightedPruner, PlatonPruner, fenced_generate_sparsity
from vlprune.adapters.nni.speedup import ShrinkReport, head_masks, shrink

__all__ = [
    "AMPPruner",
    "IDWeightedPruner",
    "LayerSimilarityPruner",
    "PatchedTransformersEvaluator",
    "PlatonPruner",
    "ShrinkReport",
    "amp_config_list",
    "check_config_list",
    "exact_sparse_ratio",
    "fenced_generate_sparsity",
    "head_masks",
    "layer_config_list",
    "nni_prunable_types",
    "select_modules",
    "shrink",
]
