"""AMP adaptive MLP widths as an NNI 3.0 pruner.

:class:`AMPPruner` subclasses NNI's own :class:`nni.compression.pruning.L1NormPruner` and overrides
only ``__init__`` (where AMP decides *what* to cut and writes it as a ``config_list``),
``_collect_data`` and ``_calculate_metrics``. Config lists, target spaces, wrappers, evaluators and
``_generate_sparsity`` (the masks themselves) stay NNI's.

AMP (Shen et al., 2026): entropy Taylor importance of MLP hidden neurons
(:func:`vlprune.plugins.amp.neuron_importance`) and the adaptive width search
(:func:`vlprune.plugins.amp.search_widths`). The config list (:func:`amp_config_list`) gives the
first linear(s) of every MLP (``fc1`` / ``up_proj`` and ``gate_proj``) the ``sparse_ratio`` that
leaves exactly the searched width (:func:`vlprune.adapters.nni._shared.exact_sparse_ratio`); the
metric of a neuron is its rank in :func:`vlprune.plugins.amp.neuron_order`, so NNI masks exactly the
neurons the search switched off.

Example:
    >>> import vlprune.testbed as tb
    >>> from vlprune.adapters.nni import AMPPruner
    >>> clip = tb.load("clip")
    >>> pruner = AMPPruner(clip, tb.batches("clip", 64, 32, images_only=True), delta_e=5e-3)  # doctest: +SKIP
    >>> _, masks = pruner.compress()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from nni.compression.pruning import L1NormPruner
from torch import nn

from vlprune.adapters.nni._shared import (
    _active_targets,
    _check_progress,
    _Data,
    _from_compressor,
    _init_nni,
    _shaped_metrics,
    exact_sparse_ratio,
)
from vlprune.adapters.nni.config import OneShotInFusion, check_config_list, select_modules
from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import amp
from vlprune.plugins.capture import iterate_batches

__all__ = ["AMPPruner", "amp_config_list"]

logger = logging.getLogger(__name__)


def amp_config_list(model: nn.Module, widths: Mapping[str, int]) -> list[dict[str, Any]]:
    """NNI 3.0 config list leaving MLP ``name`` of ``model`` with exactly ``widths[name]`` hidden neurons.

    One entry per narrowed MLP: its first linear(s) (``fc1`` / ``up_proj`` and, for a gated MLP,
    ``gate_proj``; output channels = hidden neurons) with ``sparse_ratio`` =
    :func:`exact_sparse_ratio` ``(H, H - k)`` (NNI's rounding lands on ``H - k`` masked exactly).
    MLPs keeping every neuron get no entry (as :func:`vlprune.adapters.torch_pruning.amp_ratio_dict`).

    Args:
        model: the model (its current MLP widths are ``H``).
        widths: MLP module name -> neurons kept (``1 <= k <= H``), e.g. from
            :func:`vlprune.plugins.amp.search_widths`.

    Returns:
        ``[{"op_names": [...], "sparse_ratio": r}, ...]`` in ``widths`` order; empty if nothing is narrowed.

    Raises:
        ModelStructureError: a name that is not an MLP of ``model``.
        VLPruneError: a width that is not an integer in ``[1, H]``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> amp_config_list(tiny_model("clip"), {"vision_model.encoder.layers.0.mlp": 48})
        [{'op_names': ['vision_model.encoder.layers.0.mlp.fc1'], 'sparse_ratio': 0.25}]
    """
    layouts = amp.find_mlps(model, list(widths))
    out: list[dict[str, Any]] = []
    for name, k in widths.items():
        layout = layouts[name]
        size = amp.hidden_size(model, layout)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
            raise VLPruneError(f"width of {name} must be an integer in [1, {size}], got {k!r}")
        if k == size:
            continue
        ops = [p for p in (layout.gate, layout.up) if p]
        out.append({"op_names": ops, "sparse_ratio": exact_sparse_ratio(size, size - k)})
    return out


def _check_delta_e(delta_e: Any, needed: bool) -> float | None:
    if delta_e is None:
        if needed:
            raise VLPruneError(
                "delta_e is needed to search the widths (largest objective increase per layer, the paper: 2e-4 to "
                "1e-1); give delta_e=..., or a config_list to skip the search"
            )
        return None
    if isinstance(delta_e, bool) or not isinstance(delta_e, (int, float)) or not math.isfinite(delta_e) or delta_e < 0:
        raise VLPruneError(
            f"delta_e must be a finite number >= 0 (largest objective increase per layer, the paper: 2e-4 to 1e-1), "
            f"got {delta_e!r}"
        )
    return float(delta_e)


class AMPPruner(OneShotInFusion, L1NormPruner):
    """AMP (Shen et al., 2026) as an NNI 3.0 pruner: entropy Taylor importance of MLP hidden
    neurons and, unless a ``config_list`` is given, the adaptive per-MLP widths.

    At construction (before NNI wraps the model): the neuron scores
    (:func:`vlprune.plugins.amp.neuron_importance` on ``batches``), then, without a ``config_list``,
    the width search (:func:`vlprune.plugins.amp.search_widths` on ``held_out``) and the config list
    :func:`amp_config_list` built from the widths. ``compress()`` then lets NNI mask, per targeted
    first linear, its ``sparse_ratio`` of output channels with the smallest metric; the metric is
    each neuron's rank in :func:`vlprune.plugins.amp.neuron_order` (``rank=True``), so the masks keep
    exactly ``neuron_order(scores)[:width]`` — the neurons the search kept — and the masked model
    equals the model with the other neurons removed.

    A given ``config_list`` is checked with :func:`vlprune.adapters.nni.config.check_config_list`
    and may target only first linears of scored MLPs (``fc1`` / ``up_proj`` / ``gate_proj``, output
    channels); its ratios, ``max_sparse_ratio`` and ``global_group_id`` are NNI's to apply (for a
    global ranking across MLPs pass ``rank=False``: raw Taylor scores).

    One-shot: call ``compress()`` with no training arguments. Hooks go on ``wrapper.module``; call
    ``unwrap_model()`` before saving; :func:`vlprune.adapters.nni.speedup.shrink` makes the masked
    model physically smaller.

    Args:
        model: a model whose MLPs :func:`vlprune.plugins.amp.find_mlps` recognises (CLIP / ViT /
            SigLIP / BLIP / LLaVA vision towers, Llama-style gated MLPs).
        batches: calibration batches (each ``B >= 2``), e.g. ``{"pixel_values": ...}``.
        delta_e: largest accepted objective increase per MLP in the search (``>= 0``; the paper:
            2e-4 to 1e-1). Needed without ``config_list``; checked when given.
        config_list: an NNI config list to use instead of the searched widths.
        tau: softmax temperature of the objective; default 0.05 (``1/tau = 20``), the default of
            :mod:`vlprune.plugins.amp` and of the Torch-Pruning path (the paper: ``1/tau`` 15 to 20).
        rule: the search rule, ``"rise"`` (official), ``"change"`` or None (default):
            :func:`vlprune.plugins.amp.default_rule` per model (``"change"`` for LLaVA-like token-set
            embeddings, else ``"rise"``), as the Torch-Pruning path.
        held_out: batches the search evaluates the objective on; default ``batches``.
        scores: precomputed ``neuron_importance`` scores (MLP name -> one per hidden neuron), skipping
            the importance pass.
        mlps: MLP module names to score (default: every MLP reaching the objective).
        objective, embed: the objective, as in :func:`vlprune.plugins.amp.neuron_importance`.
        halvings, min_keep: of the search, as in :func:`vlprune.plugins.amp.search_widths`.
        rank: metric = rank in ``neuron_order`` (exact tie-breaking, default) or the raw score.
        evaluator: an NNI evaluator, passed to NNI (not needed for one-shot ``compress()``).
        existed_wrappers: NNI wrappers to share (what ``from_compressor`` passes; the scores are
            computed on the unwrapped model, without the other compressor's masks).
        progress: tqdm bars.

    Attributes:
        scores: MLP name -> raw AMP score per hidden neuron.
        widths: MLP name -> searched width (None when a ``config_list`` was given).
        search_log: one dict per search evaluation (``mlp``, ``kept``, ``objective``, ``accepted``).

    Raises:
        VLPruneError: bad ``delta_e``, ``tau``, ``rule``, ``halvings``, ``min_keep`` or config list
            (before anything is computed or wrapped; the model is left as it was).
        DataError: empty ``batches`` / ``held_out``, batches of one sample, a non-finite objective.
        ModelStructureError: no MLP, unknown ``mlps``, scores of the wrong length, a config entry
            targeting something other than an MLP's first linear.

    Example:
        >>> import vlprune.testbed as tb
        >>> clip = tb.load("clip")
        >>> cal = tb.batches("clip", 64, 32, images_only=True)
        >>> val = tb.batches("clip", 96, 48, images_only=True, seed=1)
        >>> pruner = AMPPruner(clip, cal, delta_e=5e-3, held_out=val, tau=1 / 15)   # doctest: +SKIP
        >>> _, masks = pruner.compress()                                           # doctest: +SKIP
        >>> pruner.unwrap_model()                                                   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        delta_e: float | None,
        config_list: list[dict[str, Any]] | None = None,
        tau: float = 0.05,
        rule: Literal["rise", "change"] | None = None,
        *,
        held_out: Iterable[Any] | None = None,
        scores: Mapping[str, torch.Tensor] | None = None,
        mlps: Iterable[str] | None = None,
        objective: amp.Objective | amp.ObjectiveFn = "entropy",
        embed: amp.EmbedFn | None = None,
        halvings: int = 6,
        min_keep: int = 1,
        rank: bool = True,
        evaluator: Any = None,
        existed_wrappers: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        # --- every argument checked before any forward pass or wrapping --------------------------
        delta_e = _check_delta_e(delta_e, needed=config_list is None)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
            raise VLPruneError(f"tau must be a positive number (the paper uses 1/tau = 15 to 20), got {tau!r}")
        if rule not in ("rise", "change", None):
            raise VLPruneError(f"rule must be 'rise', 'change' or None (per model), got {rule!r}")
        if isinstance(halvings, bool) or not isinstance(halvings, int) or halvings < 1:
            raise VLPruneError(f"halvings must be an integer >= 1, got {halvings!r}")
        if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
            raise VLPruneError(f"min_keep must be an integer >= 1, got {min_keep!r}")
        if not isinstance(rank, bool):
            raise VLPruneError(f"rank must be True or False, got {rank!r}")
        progress = _check_progress(progress)
        data = iterate_batches(batches)
        try:
            held = data if held_out is None else iterate_batches(held_out)
        except DataError:
            raise DataError("held_out is empty; give at least one batch, or leave it None to search on batches") from None
        if config_list is not None:
            check_config_list(model, config_list)
            candidates = amp.find_mlps(model, mlps if scores is None else list(scores))
            self._check_targets(model, config_list, {p for m in candidates.values() for p in (m.up, m.gate) if p})

        # --- the criterion: scores, then widths -------------------------------------------------
        if scores is None:
            scores = amp.neuron_importance(model, data, mlps, tau, objective=objective, embed=embed, progress=progress)
        layouts = amp.find_mlps(model, list(scores))
        checked: dict[str, torch.Tensor] = {}
        for name, layout in layouts.items():
            s = torch.as_tensor(scores[name]).detach().float().cpu()
            size = amp.hidden_size(model, layout)
            if s.dim() != 1 or s.numel() != size:
                raise ModelStructureError(f"scores of {name} have shape {tuple(s.shape)}; the MLP has {size} hidden neurons")
            if not bool(torch.isfinite(s).all()):
                raise DataError(
                    f"AMP scores of {name} hold NaN or inf; check the calibration batches and recompute the scores"
                )
            checked[name] = s
        self.scores: dict[str, torch.Tensor] = checked
        self.widths: dict[str, int] | None = None
        self.search_log: list[dict[str, Any]] = []
        if config_list is None:
            assert delta_e is not None
            self.widths = amp.search_widths(
                model, checked, held, delta_e, tau, objective=objective, embed=embed, halvings=halvings,
                min_keep=min_keep, rule=rule, progress=progress, log=self.search_log,
            )
            config_list = amp_config_list(model, self.widths)
            if not config_list:  # search_widths has warned, with the fix
                logger.warning("AMPPruner: the search kept every neuron, the config list is empty: NNI masks nothing")
        # first linear (and gate) -> metric per hidden neuron of its MLP
        self._metric_of: dict[str, torch.Tensor] = {}
        for name, layout in layouts.items():
            metric = amp.neuron_ranks(checked[name]) if rank else checked[name]
            for path in (layout.up, layout.gate):
                if path:
                    self._metric_of[path] = metric
        self._check_targets(model, config_list, set(self._metric_of))
        _init_nni(self, model, config_list, evaluator, existed_wrappers)

    @classmethod
    def from_compressor(  # type: ignore[override]
        cls, compressor: Any, new_config_list: list[dict[str, Any]] | None, batches: Iterable[Any],
        delta_e: float | None = None, *, evaluator: Any = None, **kwargs: Any,
    ) -> AMPPruner:
        """An AMPPruner sharing ``compressor``'s wrappers and evaluator (NNI's way to chain
        compressors): ``AMPPruner.from_compressor(other, config_list_or_None, batches, delta_e, ...)``;
        further keyword arguments as the constructor's."""
        return _from_compressor(cls, compressor, batches, delta_e, new_config_list, evaluator=evaluator, **kwargs)

    @staticmethod
    def _check_targets(model: nn.Module, config_list: list[dict[str, Any]], allowed: set[str]) -> None:
        """Every module the config list selects is in ``allowed`` (first linears of the scored
        MLPs) and is pruned by output channel; nothing is wrapped yet."""
        selected = select_modules(model, config_list)
        bad = [n for n in selected if n not in allowed]
        if bad:
            firsts = sorted(allowed)
            raise ModelStructureError(
                f"AMPPruner's config_list selects {bad[:3]}{' ...' if len(bad) > 3 else ''}, which are not the first "
                f"linear of a scored MLP; AMP scores MLP hidden neurons, so target the MLPs' fc1 / up_proj / gate_proj "
                f"(e.g. {firsts[:2]}) with op_names"
            )
        for i, config in enumerate(config_list):
            names = set(config.get("target_names") or ["weight", "bias"])
            if not names <= {"weight", "bias"} or config.get("granularity", "default") not in ("default", "out_channel"):
                raise VLPruneError(
                    f"config_list[{i}]: AMPPruner masks output channels of weights (one metric per hidden neuron); "
                    "leave target_names and granularity at their defaults"
                )

    def _collect_data(self) -> _Data:
        """The AMP metric of every active target (computed at construction: the scores fix the config list)."""
        data: _Data = {}
        for module_name, targets in _active_targets(self).items():
            if module_name not in self._metric_of:  # guarded at construction; kept for from_compressor misuse
                raise ModelStructureError(f"{module_name} is not the first linear of a scored MLP; AMPPruner has no metric for it")
            for target_name in targets:
                data.setdefault(module_name, {})[target_name] = self._metric_of[module_name]
        return data

    def _calculate_metrics(self, data: _Data) -> _Data:
        """Per target, the metric shaped as NNI's scaler shrinks the target (smaller = masked first)."""
        return _shaped_metrics(self, data)
