"""vlprune: vision-language pruning criteria as plugins for Torch-Pruning, NNI and transformers.

Public API (everything a script needs is re-exported here)::

    import vlprune
    vlprune.criteria()                      # registered criteria: name, level, data needed, adapters
    imp = vlprune.get_criterion("id_weighted", adapter="torch_pruning", base=..., profile=...)
    profile = vlprune.estimate_ids(model, batches, n_samples=2000)
    vlprune.sync_hf_model(model)            # after Torch-Pruning changed a transformers model
    vlprune.save_pruned(model, "out/"); model = vlprune.load_pruned("out/")
    scores = vlprune.domain_similarity(model, {"math": mb, "general": gb})   # per decoder layer
    vlprune.remove_layers(model, vlprune.select_layers(scores["math"], k=2, strategy="regime"))
    with vlprune.prune_visual_tokens(model, "divprune", keep=0.1): model.generate(**batch)
    result = vlprune.run_recipe("id-taylor", model="testbed:llava", out="out/id-taylor")  # one line
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.errors import DataError, ModelStructureError, RegistryError, VLPruneError
from vlprune.plugins.capture import ModuleSelector, Representation
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl
from vlprune.plugins.intrinsic_dim import Estimator, IDProfile, LayerID, twonn, twonn_block_average
from vlprune.plugins.intrinsic_dim import estimate_ids as _estimate_ids
from vlprune.plugins.layer_selection import select_layers, select_run
from vlprune.plugins.layer_similarity import (
    angular_distance,
    block_influence,
    combine_domains,
    domain_similarity,
    layer_similarity,
    rank_layers,
)
from vlprune.plugins.registry import check_pairing, criteria, get_criterion, register, unregister

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "VLPruneError",
    "RegistryError",
    "DataError",
    "ModelStructureError",
    "CriterionSpec",
    "hookimpl",
    "criteria",
    "get_criterion",
    "check_pairing",
    "register",
    "unregister",
    "twonn",
    "twonn_block_average",
    "IDProfile",
    "LayerID",
    "estimate_ids",
    "describe_model",
    "sync_hf_model",
    "save_pruned",
    "load_pruned",
    "remove_layers",
    "layer_similarity",
    "block_influence",
    "angular_distance",
    "domain_similarity",
    "combine_domains",
    "rank_layers",
    "select_layers",
    "select_run",
    "prune_visual_tokens",
    "run_recipe",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def describe_model(model: nn.Module) -> Any:
    """Which modules of a transformers model are vision, language, fusion; attentions; MLPs.

    See :func:`vlprune.adapters.hf.families.describe`.
    """
    from vlprune.adapters.hf.families import describe

    return describe(model)


def estimate_ids(
    model: nn.Module,
    batches: Iterable[Any],
    modules: ModuleSelector = None,
    *,
    n_samples: int = 2000,
    representation: Representation = "flatten",
    estimator: Estimator = "linear",
    discard_fraction: float = 0.1,
    n_blocks: int | None = None,
    max_memory_mb: float | None = None,
    storage_dtype: torch.dtype | None = None,
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    spill_dir: str | Path | None = None,
    full_forward: bool = False,
    progress: bool = True,
) -> IDProfile:
    """Per-layer intrinsic dimension of a model, each layer labelled vision / language / fusion.

    By default every ``nn.Linear`` except output heads and projections (``lm_head``,
    classifiers, CLIP projections) is profiled, as in the ID-pruning paper's official code, and in
    any case every layer Torch-Pruning may prune through ``hf_pruner_kwargs`` and the MLPs inside
    output heads that a plain Torch-Pruning script may prune (SigLIP's pooling head ``head.mlp``);
    a model of no known family gets every ``nn.Linear`` and ``nn.Conv*d``
    (:func:`vlprune.adapters.hf.families.default_id_modules`). The modality of each layer comes from
    the model family (``describe_model``). See
    :func:`vlprune.plugins.intrinsic_dim.estimate_ids` for the arguments and the memory bound (one
    forward pass, each forward stopped after the last profiled module unless ``full_forward``;
    ``max_memory_mb=None``: half the available memory, rows past it spilled to disk and read back
    exactly; ``storage_dtype=None``: a bf16 / fp16 model's rows kept in its own dtype, lossless;
    ``sketch_dim``: a seeded random projection, approximate).

    Example:
        >>> profile = vlprune.estimate_ids(model, calib_batches, n_samples=2000)   # doctest: +SKIP
        >>> profile.plot("id.png"); profile.to_json("id.json")                   # doctest: +SKIP
    """
    from vlprune.adapters.hf.families import default_id_modules

    info = describe_model(model)
    if modules is None:
        modules = default_id_modules(model, info)
    return _estimate_ids(
        model,
        batches,
        modules,
        n_samples=n_samples,
        representation=representation,
        estimator=estimator,
        discard_fraction=discard_fraction,
        n_blocks=n_blocks,
        modality_of=info.modality_of,
        max_memory_mb=max_memory_mb,
        storage_dtype=storage_dtype,
        sketch_dim=sketch_dim,
        sketch_seed=sketch_seed,
        spill_dir=spill_dir,
        full_forward=full_forward,
        progress=progress,
    )


def sync_hf_model(model: nn.Module, **kwargs: Any) -> Any:
    """Fix attention / config bookkeeping after Torch-Pruning changed a transformers model.

    See :func:`vlprune.adapters.hf.surgery.sync_hf_model`.
    """
    from vlprune.adapters.hf.surgery import sync_hf_model as _sync

    return _sync(model, **kwargs)


def remove_layers(model: nn.Module, layers: Any, **kwargs: Any) -> Any:
    """Remove decoder layers (depth pruning) in place: the decoder list, ``layer_idx`` and the config.

    ``protect_first=`` / ``protect_last=`` refuse removing the first / last layers. Returns a
    :class:`~vlprune.adapters.hf.layers.LayerRemoval`. See :func:`vlprune.adapters.hf.layers.remove_layers`.

    Example:
        >>> vlprune.remove_layers(model, [1, 2], protect_first=1, protect_last=1)   # doctest: +SKIP
    """
    from vlprune.adapters.hf.layers import remove_layers as _remove

    return _remove(model, layers, **kwargs)


def save_pruned(model: nn.Module, directory: Any, **kwargs: Any) -> Any:
    """Save a pruned transformers model so that :func:`load_pruned` rebuilds it exactly.

    ``processor=`` (a tokenizer / processor) is saved with it; tokenizer files of the checkpoint the
    model came from are copied. See :func:`vlprune.adapters.hf.persist.save_pruned`.
    """
    from vlprune.adapters.hf.surgery import save_pruned as _save

    return _save(model, directory, **kwargs)


def load_pruned(directory: Any, **kwargs: Any) -> nn.Module:
    """Load a model written by :func:`save_pruned`. See :func:`vlprune.adapters.hf.surgery.load_pruned`."""
    from vlprune.adapters.hf.surgery import load_pruned as _load

    return _load(directory, **kwargs)


def prune_visual_tokens(model: nn.Module, method: Any = "divprune", keep: Any = None, **kwargs: Any) -> Any:
    """Prune the visual tokens of a LLaVA-style model at run time (DivPrune, FastV, random, uniform).

    Attached at once; use the result as a context manager or call ``.detach()``. Weights are never
    changed. See :func:`vlprune.adapters.hf.token_pruning.prune_visual_tokens`.

    Example:
        >>> with vlprune.prune_visual_tokens(model, "divprune", keep=0.1):   # doctest: +SKIP
        ...     out = model.generate(**batch)
    """
    from vlprune.adapters.hf.token_pruning import prune_visual_tokens as _prune

    return _prune(model, method, keep, **kwargs)


def run_recipe(recipe: Any, model: Any = None, data: Any = None, out: Any = "pruned/", **kwargs: Any) -> Any:
    """Run a recipe (calibrate -> score -> prune -> distill -> evaluate -> save), resumable.

    ``recipe``: a built-in name (``vlprune recipes`` lists them), a YAML path or a dict; ``model``: a
    model object (left untouched), a model directory or ``"testbed:<name>"``; ``data``: a testbed name,
    a ``.pt`` file of batches or a folder of images with ``captions.jsonl``. Keyword overrides such as
    ``distill={"steps": 20}`` are validated before any work. Returns a
    :class:`~vlprune.recipes.runner.RecipeResult`. See :func:`vlprune.recipes.runner.run_recipe`.

    Example:
        >>> result = vlprune.run_recipe("id-taylor", model="testbed:llava", out="out/id-taylor")  # doctest: +SKIP
        >>> result.metrics["after"], result.paths["report_md"]                                   # doctest: +SKIP
    """
    from vlprune.recipes.runner import run_recipe as _run

    return _run(recipe, model, data, out, **kwargs)
