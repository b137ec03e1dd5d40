"""Helpers shared by the vlprune NNI 3.0 pruners built on ``L1NormPruner`` (:mod:`.amp`, :mod:`.layers`).

NNI's rounding (checked, and fenced): NNI masks ``int(n * sparse_ratio)`` channels of a target with
``n`` channels. ``1 - k / n`` written as a float often gives ``n - k - 1`` after ``int()`` (e.g.
``n = 5, k = 4``); :func:`exact_sparse_ratio` returns the float nearest to ``(n - k) / n`` for which
NNI's ``int(n * r)`` is exactly ``n - k`` (at most a few ulps above it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from nni.compression.pruning import L1NormPruner
from torch import nn

from vlprune.errors import ModelStructureError, VLPruneError

__all__ = ["exact_sparse_ratio"]

logger = logging.getLogger(__name__)

_Data = dict[str, dict[str, torch.Tensor]]


def exact_sparse_ratio(size: int, pruned: int) -> float:
    """The ``sparse_ratio`` for which NNI 3.0 masks exactly ``pruned`` of ``size`` channels.

    NNI masks ``int(size * sparse_ratio)`` channels (truncation). The float ``pruned / size`` is
    often a hair low (``int(5 * (1 - 4 / 5)) == 0``); this returns the float nearest to it that NNI
    turns into ``pruned`` (a few ulps above at most).

    Args:
        size: channels of the target (``>= 1``).
        pruned: channels to mask, ``0 <= pruned <= size``.

    Returns:
        ``r`` with ``int(size * r) == pruned``; 0.0 for ``pruned == 0``, 1.0 for ``pruned == size``.

    Raises:
        VLPruneError: ``size`` or ``pruned`` out of range.

    Example:
        >>> r = exact_sparse_ratio(5, 1)
        >>> int(5 * r), int(5 * (1 - 4 / 5))
        (1, 0)
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise VLPruneError(f"size must be an integer >= 1, got {size!r}")
    if isinstance(pruned, bool) or not isinstance(pruned, int) or not 0 <= pruned <= size:
        raise VLPruneError(f"pruned must be an integer in [0, {size}], got {pruned!r}")
    if pruned in (0, size):
        return float(pruned // size)
    r = pruned / size
    while int(size * r) < pruned:
        r = math.nextafter(r, 1.0)
    while int(size * r) > pruned:
        r = math.nextafter(r, 0.0)
    return r


def _metric_like(target_space: Any, values: torch.Tensor, where: str) -> torch.Tensor:
    """``values`` (one per output channel, or one value for all of them) in the shape NNI's scaler
    gives the target's metric."""
    target = target_space.target
    if target_space._scaler is not None:
        shape = target_space._scaler.shrink(target, keepdim=True).shape
    else:
        shape = target.shape
    if values.numel() == 1:
        values = values.reshape(1).expand(math.prod(shape))
    if math.prod(shape) != values.numel():
        raise ModelStructureError(
            f"{where}: the metric has {values.numel()} values but NNI expects shape {tuple(shape)}; "
            "the vlprune NNI pruners prune output channels (granularity 'out_channel', the default for Linear)"
        )
    return values.detach().to(device=target.device, dtype=torch.float32).reshape(shape)


def _active_targets(pruner: L1NormPruner) -> dict[str, list[str]]:
    """``{module_name: [target names with a sparse_ratio / sparse_threshold]}``."""
    out: dict[str, list[str]] = {}
    for module_name, spaces in pruner._target_spaces.items():
        for target_name, space in spaces.items():
            if space.sparse_ratio is not None or space.sparse_threshold is not None:
                out.setdefault(module_name, []).append(target_name)
    return out


def _init_nni(pruner: L1NormPruner, model: nn.Module, config_list: list[dict[str, Any]], evaluator: Any,
              existed_wrappers: Mapping[str, Any] | None) -> None:
    """NNI's own construction (wrappers, target spaces, scalers); if it fails part-way, the
    wrappers it placed are taken off again so the model is as it was."""
    try:
        L1NormPruner.__init__(pruner, model, config_list, evaluator, dict(existed_wrappers) if existed_wrappers else None)
    except Exception:
        for wrapper in getattr(pruner, "_module_wrappers", {}).values():
            if getattr(wrapper.module, "_nni_wrapper", None) is wrapper:
                wrapper.unwrap()
        raise


def _from_compressor(cls: type, compressor: Any, *args: Any, evaluator: Any = None, **kwargs: Any) -> Any:
    """NNI's ``Compressor.from_compressor`` for pruners whose first arguments are not a config
    list: unwrap ``compressor``, build ``cls(model, *args, ...)`` on its wrappers and evaluator, and
    chain its fused compressors."""
    from nni.compression.base.compressor import Compressor

    if not isinstance(compressor, Compressor):
        raise VLPruneError(f"from_compressor takes an NNI compressor, got {type(compressor).__name__}")
    if compressor._is_wrapped:
        compressor.unwrap_model()
    if compressor.evaluator is not None and evaluator is not None:
        logger.warning("the compressor already has an evaluator; the evaluator passed to from_compressor is ignored")
    try:
        new = cls(compressor.bound_model, *args, evaluator=compressor.evaluator or evaluator,
                  existed_wrappers=compressor._module_wrappers, **kwargs)
    except Exception:
        compressor.wrap_model()  # as it was: wrapped by ``compressor``
        raise
    new.fused_compressors.extend(compressor.fused_compressors)
    return new


def _check_progress(progress: Any) -> bool:
    if not isinstance(progress, bool):
        raise VLPruneError(f"progress must be True or False, got {progress!r}")
    return progress


def _shaped_metrics(pruner: L1NormPruner, data: _Data) -> _Data:
    """NNI's ``_calculate_metrics`` for pruners whose collected data already are the metrics: each
    target's values in the shape NNI's scaler gives it (smaller = masked first)."""
    return {
        module_name: {
            target_name: _metric_like(pruner._target_spaces[module_name][target_name], values, f"{module_name}.{target_name}")
            for target_name, values in targets.items()
        }
        for module_name, targets in data.items()
    }
