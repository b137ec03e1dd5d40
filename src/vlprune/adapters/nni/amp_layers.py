"""AMP widths and domain-aware layer removal as NNI 3.0 pruners.

Both classes subclass NNI's own :class:`nni.compression.pruning.L1NormPruner` and override only
``__init__`` (where the vlprune criterion decides *what* to cut and writes it as a ``config_list``),
``_collect_data`` and ``_calculate_metrics``. Config lists, target spaces, wrappers, evaluators and
``_generate_sparsity`` (the masks themselves) stay NNI's: the masks come out of NNI's per-op
``sparse_ratio`` rule applied to the vlprune metrics.

* :class:`AMPPruner` — AMP (Shen et al., 2026): entropy Taylor importance of MLP hidden neurons
  (:func:`vlprune.plugins.amp.neuron_importance`) and the adaptive width search
  (:func:`vlprune.plugins.amp.search_widths`). The config list (:func:`amp_config_list`) gives the
  first linear(s) of every MLP (``fc1`` / ``up_proj`` and ``gate_proj``) the ``sparse_ratio`` that
  leaves exactly the searched width; the metric of a neuron is its rank in
  :func:`vlprune.plugins.amp.neuron_order`, so NNI masks exactly the neurons the search switched off.
* :class:`LayerSimilarityPruner` — Khaki et al. (2026): decoder layers chosen by the domain-aware
  similarity ranking (:func:`vlprune.plugins.layer_similarity.domain_similarity`,
  :func:`~vlprune.plugins.layer_similarity.combine_domains`,
  :func:`~vlprune.plugins.layer_selection.select_layers`), masked as whole layers: every attention
  output projection and MLP down projection of a chosen layer is fully masked (``sparse_ratio`` 1.0),
  so the layer adds nothing to the residual stream and the masked model computes what the model with
  those layers removed computes. :func:`vlprune.adapters.nni.speedup.shrink` then removes them.

NNI's rounding (checked, and fenced): NNI masks ``int(n * sparse_ratio)`` channels of a target with
``n`` channels. ``1 - k / n`` written as a float often gives ``n - k - 1`` after ``int()`` (e.g.
``n = 5, k = 4``); :func:`exact_sparse_ratio` returns the float nearest to ``(n - k) / n`` for which
NNI's ``int(n * r)`` is exactly ``n - k`` (at most a few ulps above it).

Whole-layer masks: NNI's own schema accepts ``sparse_ratio=1.0`` (``float``) and its ratio rule
returns an all-zero mask for it. :func:`vlprune.adapters.nni.config.check_config_list`, which
guards the config lists *users* write, refuses ratios outside [0, 1); the layer pruner writes its
1.0 entries itself and does not run them through that check (a user-given ``config_list`` is not a
parameter of :class:`LayerSimilarityPruner`).

Example:
    >>> import vlprune.testbed as tb
    >>> from vlprune.adapters.nni.amp_layers import AMPPruner, LayerSimilarityPruner
    >>> clip = tb.load("clip")
    >>> pruner = AMPPruner(clip, tb.batches("clip", 64, 32, images_only=True), delta_e=5e-3)  # doctest: +SKIP
    >>> _, masks = pruner.compress()                                                       # doctest: +SKIP
    >>> llava = tb.load("llava-deep")
    >>> data = {d: tb.batches("llava-deep", 32, 16, task=d) for d in ("math", "general")}
    >>> pruner = LayerSimilarityPruner(llava, data, n_layers=2, strategy="spacing")         # doctest: +SKIP
    >>> _, masks = pruner.compress(); pruner.unwrap_model()                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from nni.compression.pruning import L1NormPruner
from torch import nn

from vlprune.adapters.nni.config import OneShotInFusion, check_config_list, select_modules
from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import amp
from vlprune.plugins import layer_similarity as ls
from vlprune.plugins.capture import iterate_batches
from vlprune.plugins.layer_selection import select_layers
from vlprune.plugins.structure import mlp_layouts

__all__ = ["AMPPruner", "LayerSimilarityPruner", "amp_config_list", "exact_sparse_ratio", "layer_config_list"]

logger = logging.getLogger(__name__)

_Data = dict[str, dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
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
    """``values`` (one per output channel) in the shape NNI's scaler gives the target's metric."""
    target = target_space.target
    if target_space._scaler is not None:
        shape = target_space._scaler.shrink(target, keepdim=True).shape
    else:
        shape = target.shape
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


# ----------------------------------------------------------------------------------------------
# AMP
# ----------------------------------------------------------------------------------------------
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
        # first linear -> (MLP name, metric per hidden neuron)
        self._metric_of: dict[str, tuple[str, torch.Tensor]] = {}
        for name, layout in layouts.items():
            metric = amp.neuron_ranks(checked[name]) if rank else checked[name]
            for path in (layout.up, layout.gate):
                if path:
                    self._metric_of[path] = (name, metric)
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
                data.setdefault(module_name, {})[target_name] = self._metric_of[module_name][1]
        return data

    def _calculate_metrics(self, data: _Data) -> _Data:
        """Per target, the metric shaped as NNI's scaler shrinks the target (smaller = masked first)."""
        metrics: _Data = {}
        for module_name, targets in data.items():
            for target_name, values in targets.items():
                space = self._target_spaces[module_name][target_name]
                metrics.setdefault(module_name, {})[target_name] = _metric_like(space, values, f"{module_name}.{target_name}")
        return metrics


# ----------------------------------------------------------------------------------------------
# layer removal
# ----------------------------------------------------------------------------------------------
def _check_pre_norm(model: nn.Module, layers: Sequence[str]) -> None:
    """Masking a layer's output projections makes it an identity only in a pre-norm layer
    (``h + f(norm(h))``); BERT-style layers normalise after the residual sum (``output.LayerNorm``)."""
    for layer in layers:
        post = [n for n, _ in model.get_submodule(layer).named_modules() if n.endswith("output.LayerNorm")]
        if post:
            raise ModelStructureError(
                f"decoder layer {layer!r} of {type(model).__name__} normalises after the residual sum "
                f"(BERT-style, {layer}.{post[0]}): masking its output projections does not make it an identity, so "
                "LayerSimilarityPruner cannot mask it; choose the layers with "
                "vlprune.plugins.layer_similarity.rank_layers / select_layers and remove them with vlprune.remove_layers"
            )


def _layer_outputs(model: nn.Module, layer: str) -> list[str]:
    """Attention output projections and MLP down projections inside decoder layer ``layer``."""
    from vlprune.adapters.hf.families import describe

    prefix = layer + "."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown family: the generic description has no attentions
        try:
            attentions = [a.o for a in describe(model).attentions if a.o and a.o.startswith(prefix)]
        except ModelStructureError:
            attentions = []
    downs = [m.down for m in mlp_layouts(model) if m.down.startswith(prefix)]
    if not attentions or not downs:
        missing = " and ".join(w for w, found in (("attention output projection", attentions), ("MLP down projection", downs)) if not found)
        raise ModelStructureError(
            f"decoder layer {layer!r} of {type(model).__name__} has no {missing} vlprune recognises "
            "(o_proj / out_proj / attention.output.dense, down_proj / fc2 / output.dense), so it cannot be masked "
            "into an identity; remove it with vlprune.remove_layers instead"
        )
    modules = dict(model.named_modules())
    for path in (*attentions, *downs):
        if not isinstance(modules.get(path), nn.Linear):
            raise ModelStructureError(f"{path} in decoder layer {layer!r} is not an nn.Linear; NNI cannot mask it")
    return [*attentions, *downs]


def layer_config_list(model: nn.Module, layers: Sequence[str]) -> list[dict[str, Any]]:
    """NNI config list that masks decoder layers whole: every attention output projection and MLP
    down projection of each layer at ``sparse_ratio`` 1.0 (all output channels, bias included), so
    the layer adds nothing to the residual stream.

    Internal-style list: ``sparse_ratio`` 1.0 is accepted by NNI's schema and rule but refused by
    :func:`vlprune.adapters.nni.config.check_config_list` (for user lists, ratios are in [0, 1)).

    Args:
        model: the model.
        layers: decoder-layer module paths (``vlprune.describe_model(model).decoder_layers``).

    Returns:
        One entry per layer: ``{"op_names": [o_proj..., down_proj...], "sparse_ratio": 1.0}``.

    Raises:
        ModelStructureError: a layer without a recognisable attention output or MLP down projection.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> layer_config_list(tiny_model("llava"), ["model.language_model.layers.1"])  # doctest: +NORMALIZE_WHITESPACE
        [{'op_names': ['model.language_model.layers.1.self_attn.o_proj',
                       'model.language_model.layers.1.mlp.down_proj'], 'sparse_ratio': 1.0}]
    """
    return [{"op_names": _layer_outputs(model, layer), "sparse_ratio": 1.0} for layer in layers]


class LayerSimilarityPruner(OneShotInFusion, L1NormPruner):
    """Domain-aware decoder-layer removal (Khaki et al., 2026) as an NNI 3.0 pruner.

    At construction (before NNI wraps the model): the per-domain similarity profiles
    (:func:`vlprune.plugins.layer_similarity.domain_similarity`: mean ``cos(h_l, h_{l+1})`` of each
    decoder layer's input and output, per domain), the ranking profile of ``domain``
    (:func:`~vlprune.plugins.layer_similarity.combine_domains`: a domain's own profile, or
    ``"mixed"`` = ``alpha * math + (1 - alpha) * others``) and the ``n_layers`` layers
    :func:`~vlprune.plugins.layer_selection.select_layers` picks with ``strategy``. The config list
    (:func:`layer_config_list`) masks each chosen layer's attention output projection(s) and MLP
    down projection completely, so after ``compress()`` the layer passes its residual input through
    unchanged: the masked model's (uncached) outputs equal those of the model with the layers
    removed (:func:`vlprune.remove_layers`), which :func:`vlprune.adapters.nni.speedup.shrink` does.

    The metric of a target is the negated removability of its layer (constant over its channels;
    with ``sparse_ratio`` 1.0 every channel is masked whatever the metric).

    Args:
        model: a transformers model with decoder layers (LLaVA family, decoder-only LMs).
        domain_batches: domain -> calibration batches, e.g. ``{"math": ..., "general": ...}``
            (``vlprune.testbed.batches("llava", ..., task="math")``).
        n_layers: number of decoder layers to remove (``>= 1``, at most the unprotected layers).
        strategy: ``"rank"`` (default, the top ``n_layers``), ``"spacing"``, ``"consecutive"`` or
            ``"regime"``, as :func:`~vlprune.plugins.layer_selection.select_layers`.
        domain: the ranking: a key of ``domain_batches`` (``"math"``: math-aware ...) or ``"mixed"`` (default).
        alpha, math_key: of ``"mixed"``, as :func:`~vlprune.plugins.layer_similarity.combine_domains`.
        protect_first, protect_last: first / last layers never removed (1 and 1 by default).
        regime_switch, evenness: of the ``"regime"`` / ``"spacing"`` strategies.
        scores: precomputed ``domain_similarity`` profiles (domain -> per-layer tensor), skipping the
            forward passes (``domain_batches`` may then be None).
        tokens, layers: as :func:`~vlprune.plugins.layer_similarity.domain_similarity`.
        evaluator: an NNI evaluator, passed to NNI (not needed for one-shot ``compress()``).
        existed_wrappers: NNI wrappers to share (what ``from_compressor`` passes).
        progress: tqdm bars.

    Attributes:
        scores: domain -> per-layer similarity; ``profile``: the ranking profile used;
        chosen: indices of the removed layers (into ``layer_names``), ascending;
        layer_names: every decoder layer scored; ``removed``: paths of the chosen layers.

    Raises:
        VLPruneError: ``n_layers`` < 1 or above the unprotected layers, an unknown strategy, bad
            ``alpha`` / protection (all before any forward pass or wrapping).
        DataError: no domain, a domain without batches, an unknown ``domain``.
        ModelStructureError: a model without decoder layers, post-norm (BERT-style) decoder layers
            such as BLIP's text decoder (masking their outputs leaves a LayerNorm: no identity), or
            a chosen layer without a recognisable attention output / MLP down projection.

    Example:
        >>> import vlprune.testbed as tb
        >>> model = tb.load("llava-deep")
        >>> data = {d: tb.batches("llava-deep", 32, 16, task=d) for d in ("math", "general")}
        >>> pruner = LayerSimilarityPruner(model, data, n_layers=2, strategy="spacing", domain="math")  # doctest: +SKIP
        >>> _, masks = pruner.compress()                                                              # doctest: +SKIP
        >>> pruner.removed                                                                             # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        domain_batches: Mapping[str, Iterable[Any]] | None,
        n_layers: int,
        strategy: str = "rank",
        domain: str = "mixed",
        *,
        alpha: float = 0.5,
        math_key: str = "math",
        protect_first: int = 1,
        protect_last: int = 1,
        regime_switch: int | float | None = None,
        evenness: float = 0.05,
        scores: Mapping[str, torch.Tensor] | None = None,
        tokens: ls.Tokens = "all",
        layers: ls.LayerSelector = None,
        evaluator: Any = None,
        existed_wrappers: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        progress = _check_progress(progress)
        names = ls.decoder_layers(model, layers)
        _check_pre_norm(model, names)
        select_kw = dict(strategy=strategy, protect_first=protect_first, protect_last=protect_last,
                         regime_switch=regime_switch, evenness=evenness)
        # dry runs on placeholder scores: n_layers, strategy, protection, alpha and domain are
        # refused before any forward pass
        select_layers(torch.zeros(len(names)), n_layers, **select_kw)  # type: ignore[arg-type]
        if scores is None:
            if not isinstance(domain_batches, Mapping) or not domain_batches:
                raise DataError(
                    "domain_batches must be a non-empty mapping of domain name -> batches, e.g. "
                    "{'math': math_batches, 'general': general_batches}"
                    + ("" if domain_batches is None else f"; got {type(domain_batches).__name__}")
                )
            keys: Iterable[str] = domain_batches
        else:
            keys = scores
        ls.combine_domains({d: torch.zeros(len(names)) for d in keys}, domain, alpha, math_key=math_key)

        if scores is None:
            assert domain_batches is not None
            scores = ls.domain_similarity(model, domain_batches, tokens, names, progress=progress)
        profile = ls.combine_domains(scores, domain, alpha, math_key=math_key)
        if profile.numel() != len(names):
            raise DataError(f"scores hold {profile.numel()} values per domain; the model has {len(names)} decoder layers")
        chosen = select_layers(profile, n_layers, **select_kw)  # type: ignore[arg-type]
        self.scores: dict[str, torch.Tensor] = {d: torch.as_tensor(s).detach().double().cpu() for d, s in scores.items()}
        self.profile: torch.Tensor = profile
        self.layer_names: list[str] = list(names)
        self.chosen: list[int] = chosen
        self.removed: list[str] = [names[i] for i in chosen]
        config_list = layer_config_list(model, self.removed)
        self._removability: dict[str, float] = {
            op: float(profile[i]) for i, entry in zip(chosen, config_list) for op in entry["op_names"]
        }
        logger.info("LayerSimilarityPruner: masking decoder layers %s (%s, %s)", chosen, strategy, domain)
        _init_nni(self, model, config_list, evaluator, existed_wrappers)

    @classmethod
    def from_compressor(  # type: ignore[override]
        cls, compressor: Any, domain_batches: Mapping[str, Iterable[Any]] | None, n_layers: int, *,
        evaluator: Any = None, **kwargs: Any,
    ) -> LayerSimilarityPruner:
        """A LayerSimilarityPruner sharing ``compressor``'s wrappers and evaluator (NNI's way to
        chain compressors); the config list is built as by the constructor, whose keyword arguments
        are accepted."""
        return _from_compressor(cls, compressor, domain_batches, n_layers, evaluator=evaluator, **kwargs)

    def _collect_data(self) -> _Data:
        """The removability of the layer each active target belongs to (computed at construction)."""
        data: _Data = {}
        for module_name, targets in _active_targets(self).items():
            if module_name not in self._removability:
                raise ModelStructureError(f"{module_name} is not an output projection of a chosen decoder layer")
            for target_name in targets:
                data.setdefault(module_name, {})[target_name] = torch.tensor([self._removability[module_name]])
        return data

    def _calculate_metrics(self, data: _Data) -> _Data:
        """Per target, minus its layer's removability, constant over the channels (smaller = masked first)."""
        metrics: _Data = {}
        for module_name, targets in data.items():
            for target_name, value in targets.items():
                space = self._target_spaces[module_name][target_name]
                shape = space._scaler.shrink(space.target, keepdim=True).shape if space._scaler is not None else space.target.shape
                metrics.setdefault(module_name, {})[target_name] = _metric_like(
                    space, (-value.float()).expand(math.prod(shape)), f"{module_name}.{target_name}"
                )
        return metrics
