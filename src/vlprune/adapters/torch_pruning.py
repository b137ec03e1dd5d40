"""Torch-Pruning adapter: vlprune criteria as ``tp.importance.Importance`` objects.

Here: the importances (:class:`IDWeightedImportance`, :class:`PlatonImportance`,
:class:`AMPEntropyImportance`), per-layer ratio dicts (:func:`amp_ratio_dict`), PLATON's schedule in
tp form (:func:`cubic_scheduler`, :func:`pruning_steps`), the head-step guard of iterative pruning
(:func:`step_pruner`) and the small helpers other importances share. What is specific to
transformers models (:func:`~vlprune.adapters.hf.prune.hf_pruner_kwargs`,
:func:`~vlprune.adapters.hf.prune.prune_hf_model`, :class:`~vlprune.adapters.hf.prune.KeepHeads`,
:class:`~vlprune.adapters.hf.prune.KeepNeurons`, :func:`~vlprune.adapters.hf.prune.positive_dims`,
:func:`~vlprune.adapters.hf.prune.unwrapped_parameters`) lives in :mod:`vlprune.adapters.hf.prune`
and is importable from here as well.

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

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.id_weighted import GroupIDReduce, group_id, id_weight
from vlprune.plugins.intrinsic_dim import IDProfile
from vlprune.plugins.platon import Platon, cubic_schedule

__all__ = [
    "IDWeightedImportance",
    "PlatonImportance",
    "AMPEntropyImportance",
    "KeepHeads",
    "KeepNeurons",
    "step_pruner",
    "head_step_guard",
    "amp_ratio_dict",
    "cubic_scheduler",
    "pruning_steps",
    "group_layer_names",
    "check_ratio",
    "call_importance",
    "check_finite",
    "hf_pruner_kwargs",
    "unwrapped_parameters",
    "positive_dims",
    "prune_hf_model",
]

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


def _group_root(group: Any) -> str:
    names = group_layer_names(group)
    return names[0] if names else "?"


def _missing_grads(group: Any) -> list[str]:
    """Names of the group's parameterised layers whose weight has no ``.grad``."""
    dg = getattr(group, "_DG", None)
    names_of: Mapping[nn.Module, str] = getattr(dg, "_module2name", {}) if dg is not None else {}
    out: list[str] = []
    for dep, _ in group:
        module = dep.target.module
        weight = getattr(module, "weight", None)
        if isinstance(module, _PARAM_TYPES) and isinstance(weight, torch.Tensor) and weight.grad is None:
            name = names_of.get(module, dep.target.name.split(" (")[0])
            if name not in out:
                out.append(name)
    return out


def call_importance(base: Any, group: Any, who: str = "importance") -> torch.Tensor | None:
    """``base(group)`` with the two silent failures of gradient importances made loud.

    * A base that reads ``.grad`` (``GroupTaylorImportance``, ...) on layers without gradients
      fails inside Torch-Pruning with an ``AttributeError`` / ``TypeError``; this raises a
      :class:`VLPruneError` saying to call ``loss.backward()`` first.
    * NaN / inf scores (a NaN pixel, an overflowing loss) make Torch-Pruning's threshold NaN, and
      it then prunes nothing without a word; this raises a :class:`DataError` naming the layer.

    Args:
        base: any Torch-Pruning importance.
        group: a Torch-Pruning group.
        who: the name used in error messages (the wrapper's class).

    Returns:
        The base's scores (None when the base skips the group).

    Raises:
        VLPruneError: no gradients on the group's layers.
        DataError: non-finite scores.
    """
    try:
        scores = base(group)
    except (AttributeError, TypeError) as exc:
        missing = _missing_grads(group)
        if not missing:
            raise
        raise VLPruneError(
            f"{who}: no gradients on {missing[:3]} (group rooted at {_group_root(group)}): "
            f"{type(base).__name__} reads .grad; call loss.backward() before pruner.step() / prune_hf_model"
        ) from exc
    check_finite(scores, group, who)
    return scores


def check_finite(scores: torch.Tensor | None, group: Any, who: str = "importance") -> None:
    """Raise a :class:`DataError` if ``scores`` (one per channel of ``group``) holds NaN or inf.

    Torch-Pruning compares scores with a global threshold; a NaN score makes that threshold NaN
    and nothing is pruned, silently."""
    if scores is None or not isinstance(scores, torch.Tensor):
        return
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    raise DataError(
        f"{who}: {bad} of {scores.numel()} importance scores of the group rooted at {_group_root(group)} are "
        "NaN or inf, so Torch-Pruning would prune nothing; likely NaN/inf in the gradients: check the batch "
        "(e.g. a NaN pixel) and that the loss is finite before loss.backward(), then zero the gradients "
        "(model.zero_grad()) and recompute them"
    )


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

    Raises (when called on a group):
        ModelStructureError: no layer of the group has an ID (``missing="error"``).
        VLPruneError: a gradient base on layers without gradients (call ``loss.backward()`` first).
        DataError: NaN / inf scores (e.g. NaN gradients from a NaN in the batch).

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
        scores = call_importance(self.base, group, type(self).__name__)
        if scores is None:
            return None
        return id_weight(scores, weight)


_fn = tp.pruner.function
_OUT_FNS = (_fn.prune_linear_out_channels, _fn.prune_conv_out_channels)
_IN_FNS = (_fn.prune_linear_in_channels, _fn.prune_conv_in_channels)
_NORM_FNS = (_fn.prune_layernorm_out_channels, _fn.prune_batchnorm_out_channels, _fn.prune_groupnorm_out_channels)


def _matches(fn: Any, candidates: tuple[Any, ...]) -> bool:
    return any(fn == c for c in candidates)  # tp handlers compare with ==, not identity


def _heads_to_remove(pruner: Any) -> int:
    """How many heads Torch-Pruning's next global step will remove (its own rule:
    current heads - int(initial heads * (1 - cumulative head ratio)))."""
    step = pruner.current_step + 1
    if step >= len(pruner.per_step_head_pruning_ratio):
        return 0
    current = 0
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        for dep, _ in group:
            if dep.target.module in pruner.num_heads and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                current += pruner.num_heads[dep.target.module]
                break
    return current - int(pruner.initial_total_heads * (1 - pruner.per_step_head_pruning_ratio[step]))


@contextlib.contextmanager
def head_step_guard(pruner: Any) -> Iterator[None]:
    """Around one ``pruner.step()``: switch head pruning off for a step that removes no head.

    Torch-Pruning 1.6's global head pruning fails on such a step (``UnboundLocalError:
    head_thres``) as soon as channels are still pruned, e.g. on the flat end of a cubic schedule.
    With head pruning off for that one step, attention layers are left as they are (head dims are
    not pruned) and everything else proceeds. Used by :func:`step_pruner` and
    :meth:`PlatonImportance.step`.
    """
    off = bool(getattr(pruner, "prune_num_heads", False) and getattr(pruner, "global_pruning", False)
               and pruner.initial_total_heads > 0 and _heads_to_remove(pruner) <= 0)
    if off:
        pruner.prune_num_heads = False
    try:
        yield
    finally:
        if off:
            pruner.prune_num_heads = True


def step_pruner(pruner: Any) -> None:
    """``pruner.step()`` for iterative head pruning: skips head pruning on a step whose schedule
    removes no head (see :func:`head_step_guard`)."""
    with head_step_guard(pruner):
        pruner.step()


class PlatonImportance(tp.importance.GroupMagnitudeImportance):
    """PLATON (Zhang et al., ICML 2022) as a structured Torch-Pruning importance.

    Per-weight PLATON scores (``Ibar * Ubar`` of :class:`vlprune.plugins.platon.Platon`) are
    summed over each channel's weights in every layer of a group (rows for out-channels, columns
    for in-channels, entries for norms), then reduced over the group and normalised exactly like
    Torch-Pruning's own magnitude / Taylor importances (``group_reduction``, ``normalizer``).
    ID-PLATON is ``IDWeightedImportance(PlatonImportance(...), profile)``.

    PLATON is stateful: call :meth:`update` after every ``loss.backward()``, and prune with
    :meth:`step` (``imp.step(pruner)`` instead of ``pruner.step()``), which removes the pruned
    channels from the PLATON state too, so the moving averages carry over to the smaller model.
    (A plain ``pruner.step()`` works; the state of reshaped parameters then restarts.)

    Args:
        platon: an existing :class:`Platon` state, or None to make one from ``beta1``,
            ``beta2``, ``delta_t``.
        beta1 / beta2 / delta_t: PLATON's hyperparameters (paper defaults 0.85, 0.95, 10).
        group_reduction / normalizer: as in ``tp.importance.GroupMagnitudeImportance``.
        bias: also score biases.
        missing: a group layer without a PLATON score yet: ``"error"`` (VLPruneError; no window
            has closed) or ``"skip"`` (leave the layer out of the group's score).

    Example:
        >>> imp = PlatonImportance()                                                     # doctest: +SKIP
        >>> pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.5,
        ...     iterative_steps=5, iterative_pruning_ratio_scheduler=cubic_scheduler)     # doctest: +SKIP
        >>> for step in range(total):                                                    # doctest: +SKIP
        ...     loss = model(**batch).loss; loss.backward(); imp.update(model)
        ...     if step in prune_at: imp.step(pruner)
        ...     optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        platon: Platon | None = None,
        *,
        beta1: float = 0.85,
        beta2: float = 0.95,
        delta_t: int = 10,
        group_reduction: str = "mean",
        normalizer: str | None = "mean",
        bias: bool = False,
        missing: Literal["error", "skip"] = "error",
    ) -> None:
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=bias)
        if missing not in ("error", "skip"):
            raise VLPruneError(f"missing must be 'error' or 'skip'; got {missing!r}")
        self.platon = platon if platon is not None else Platon(beta1=beta1, beta2=beta2, delta_t=delta_t)
        self.missing = missing

    def update(self, model: nn.Module) -> bool:
        """Accumulate PLATON after ``loss.backward()``; True when a window closed."""
        return self.platon.update(model.named_parameters())

    def _param_score(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        if name not in self.platon.ibar and self.missing == "skip":
            return None
        score = self.platon.score(name)  # raises the explanatory VLPruneError when unscored
        if score.shape != shape:
            raise VLPruneError(
                f"PLATON state of {name!r} has shape {tuple(score.shape)} but the parameter has {tuple(shape)}; "
                "prune with PlatonImportance.step(pruner) so the state follows the model"
            )
        return score

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        names_of: Mapping[nn.Module, str] = group._DG._module2name
        group_imp: list[torch.Tensor] = []
        group_idxs: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            fn = dep.handler
            root_idxs = group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)) or layer not in names_of:
                continue
            prefix = names_of[layer]
            weight = getattr(layer, "weight", None)
            if weight is None:
                continue
            score = self._param_score(f"{prefix}.weight", weight.shape)
            if score is None:
                continue
            idx = torch.as_tensor(idxs, dtype=torch.long, device=score.device)
            if _matches(fn, _OUT_FNS):
                if getattr(layer, "transposed", False):
                    score = score.transpose(0, 1)
                local = score.flatten(1)[idx].sum(1)
            elif _matches(fn, _IN_FNS):
                if getattr(layer, "groups", 1) not in (1,):
                    continue  # grouped convolutions: not scored
                if not getattr(layer, "transposed", False):
                    score = score.transpose(0, 1)
                local = score.flatten(1).sum(1)[idx]
            elif _matches(fn, _NORM_FNS):
                local = score[idx]
            else:
                continue
            group_imp.append(local)
            group_idxs.append(root_idxs)
            if self.bias and getattr(layer, "bias", None) is not None and not _matches(fn, _IN_FNS):
                bias_score = self._param_score(f"{prefix}.bias", layer.bias.shape)
                if bias_score is not None:
                    group_imp.append(bias_score[idx])
                    group_idxs.append(root_idxs)
        if not group_imp:
            return None
        scores = self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)
        check_finite(scores, group, type(self).__name__)
        return scores

    def step(self, pruner: Any) -> int:
        """Run ``pruner.step()`` and remove the pruned channels from the PLATON state.

        Returns:
            The number of groups pruned.
        """
        with head_step_guard(pruner):
            return self._step(pruner, pruner.DG._module2name)

    def _step(self, pruner: Any, names_of: Mapping[nn.Module, str]) -> int:
        count = 0
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                layer = dep.target.module
                name = names_of.get(layer)
                if name is None or not idxs:
                    continue
                fn = dep.handler
                if _matches(fn, _OUT_FNS) or _matches(fn, _NORM_FNS):
                    dims = {"weight": 1 if getattr(layer, "transposed", False) else 0, "bias": 0}
                elif _matches(fn, _IN_FNS):
                    dims = {"weight": 0 if getattr(layer, "transposed", False) else 1}
                elif isinstance(layer, nn.Embedding):
                    dims = {"weight": 1}
                else:
                    continue
                for attr, dim in dims.items():
                    self.platon.remove(f"{name}.{attr}", dim, idxs)
            group.prune()
            count += 1
        return count


class AMPEntropyImportance(tp.importance.Importance):
    """AMP (Shen et al., 2026) neuron importance for Torch-Pruning: groups rooted at an MLP's
    first linear(s) (``fc1`` / ``up_proj`` / ``gate_proj``) get the AMP score of each hidden
    neuron; every other group is skipped (``None``).

    By default (``rank=True``) the score of a neuron is its rank in
    :func:`vlprune.plugins.amp.neuron_order` (0 = least important), so ties are broken exactly as
    :func:`vlprune.plugins.amp.search_widths` breaks them and a tp step with
    :func:`amp_ratio_dict` removes exactly the neurons the search switched off. ``rank=False``
    returns the raw Taylor scores (e.g. for a global ranking across layers).

    The scores are one-shot: they describe the MLP widths they were computed at. Prune in one step
    (``iterative_steps=1``); a layer whose width no longer matches raises a ``VLPruneError``.

    Args:
        scores: MLP module name -> one score per hidden neuron (:func:`vlprune.plugins.amp.neuron_importance`),
            or None to compute them here from ``model`` and ``batches``.
        model: the model the names refer to (required).
        batches / tau / objective / embed: passed to ``neuron_importance`` when ``scores`` is None.
        rank: return ranks (exact tie-breaking) instead of raw scores.

    Example:
        >>> scores = amp.neuron_importance(model, calib, tau=1 / 15)                   # doctest: +SKIP
        >>> widths = amp.search_widths(model, scores, held_out, delta_e=1e-2, tau=1 / 15) # doctest: +SKIP
        >>> pruner = tp.pruner.BasePruner(model, example, importance=AMPEntropyImportance(scores, model),
        ...     pruning_ratio_dict=amp_ratio_dict(model, widths), **hf_pruner_kwargs(model, prune_heads=False))  # doctest: +SKIP
        >>> pruner.step(); vlprune.sync_hf_model(model)                                   # doctest: +SKIP
    """

    def __init__(
        self,
        scores: Mapping[str, torch.Tensor] | None = None,
        model: nn.Module | None = None,
        *,
        batches: Any = None,
        tau: float = 0.05,
        objective: Any = "entropy",
        embed: Any = None,
        rank: bool = True,
    ) -> None:
        from vlprune.plugins import amp

        if model is None:
            raise VLPruneError("AMPEntropyImportance needs the model its MLP names refer to: AMPEntropyImportance(scores, model)")
        if scores is None:
            if batches is None:
                raise VLPruneError("give AMP scores, or calibration batches to compute them: AMPEntropyImportance(model=m, batches=...)")
            scores = amp.neuron_importance(model, batches, tau=tau, objective=objective, embed=embed)
        layouts = amp.find_mlps(model, list(scores))
        bad = [n for n, v in scores.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
        if bad:
            raise DataError(
                f"AMP scores of {bad[:3]} hold NaN or inf, so Torch-Pruning would prune nothing there; likely NaN/inf "
                "in the calibration batches or the objective: check the batches and recompute amp.neuron_importance"
            )
        self.scores: dict[str, torch.Tensor] = {}
        self._by_module: dict[nn.Module, tuple[str, bool]] = {}
        for name, layout in layouts.items():
            self.scores[name] = amp.neuron_ranks(scores[name]) if rank else scores[name].detach().float().cpu()
            for path in (layout.up, layout.gate):
                if path:
                    self._by_module[model.get_submodule(path)] = (name, True)
            self._by_module[model.get_submodule(layout.down)] = (name, False)

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        for dep, idxs in group:
            hit = self._by_module.get(dep.target.module)
            if hit is None:
                continue
            name, is_up = hit
            fn = dep.handler
            if not _matches(fn, _OUT_FNS if is_up else _IN_FNS):
                continue
            layer = dep.target.module
            width = layer.out_features if is_up else layer.in_features
            if width != len(self.scores[name]):
                raise VLPruneError(
                    f"AMP scores of {name} are for {len(self.scores[name])} neurons but the MLP now has {width}; "
                    "AMP importance is one-shot: prune in one step (iterative_steps=1) or recompute the scores"
                )
            if len(idxs) != len(group[0].idxs):
                continue
            return self.scores[name][torch.as_tensor(idxs, dtype=torch.long)].clone()
        return None


def amp_ratio_dict(model: nn.Module, widths: Mapping[str, int]) -> dict[nn.Module, float]:
    """Torch-Pruning's ``pruning_ratio_dict`` that leaves MLP ``name`` with exactly ``widths[name]``
    hidden neurons (local pruning, one step).

    tp keeps ``int(H * (1 - ratio))`` channels of a layer with ``H``; the ratio given is
    ``(H - k - 0.5) / H``, so rounding lands on ``k`` exactly. MLPs keeping every neuron get no entry.

    Args:
        model: the model (its current MLP widths are ``H``).
        widths: MLP module name -> neurons kept (``1 <= k <= H``), e.g. from ``search_widths``.

    Returns:
        First linear(s) of each MLP (``fc1`` / ``up_proj`` and ``gate_proj``) -> ratio.
    """
    from vlprune.plugins import amp

    layouts = amp.find_mlps(model, list(widths))
    out: dict[nn.Module, float] = {}
    for name, k in widths.items():
        layout = layouts[name]
        size = amp.hidden_size(model, layout)
        if not (isinstance(k, int) and 1 <= k <= size):
            raise VLPruneError(f"width of {name} must be an integer in [1, {size}], got {k!r}")
        if k == size:
            continue
        ratio = (size - k - 0.5) / size
        for path in (layout.up, layout.gate):
            if path:
                out[model.get_submodule(path)] = ratio
    return out


def cubic_scheduler(pruning_ratio: float, steps: int) -> list[float]:
    """PLATON's cubic schedule in Torch-Pruning's scheduler form (``iterative_pruning_ratio_scheduler``):
    the cumulative pruning ratio after each of ``steps`` pruning steps,
    ``ratio * (1 - (1 - k / steps) ** 3)`` for k = 0..steps (fast early, gentle late).

    Calling ``pruner.step()`` at the training steps given by :func:`pruning_steps` reproduces
    :func:`vlprune.plugins.platon.cubic_schedule` at those steps."""
    check_ratio(pruning_ratio)
    if steps < 1:
        raise VLPruneError(f"iterative steps must be >= 1, got {steps}")
    return [1.0 - cubic_schedule(k, steps, 1.0, 1.0 - pruning_ratio, 0, 0.0, 0.0)[0] for k in range(steps + 1)]


def pruning_steps(
    total_steps: int, iterative_steps: int, warmup_steps: int = 0, initial_warmup: float = 1.0, final_warmup: float = 5.0
) -> list[int]:
    """The training steps at which to call the pruner's ``step()`` so that a Torch-Pruning pruner
    with ``iterative_steps`` and :func:`cubic_scheduler` follows PLATON's cubic schedule: evenly
    spaced over the cubic phase (after ``initial_warmup * warmup_steps`` dense steps, ending
    ``final_warmup * warmup_steps`` steps before the end)."""
    cubic_schedule(0, total_steps, 1.0, 1.0, warmup_steps, initial_warmup, final_warmup)  # validates
    if iterative_steps < 1:
        raise VLPruneError(f"iterative steps must be >= 1, got {iterative_steps}")
    t_i = initial_warmup * warmup_steps
    span = total_steps - t_i - final_warmup * warmup_steps
    return [int(round(t_i + span * k / iterative_steps)) for k in range(1, iterative_steps + 1)]


# ---------------------------------------------------------------------------------------------
# transformers models: in vlprune.adapters.hf.prune, re-exported here (imported on first use, so
# that hf.prune, which builds on the helpers above, can import this module without a cycle)
# ---------------------------------------------------------------------------------------------

_HF_NAMES = frozenset({
    "KeepHeads", "KeepNeurons", "hf_pruner_kwargs", "positive_dims", "prune_hf_model", "unwrapped_parameters",
    # private, kept importable from here for existing code
    "_DIM_ARG", "_FloorWrapper", "_PositiveDims", "_PositiveDimsForward", "_lift_value", "_negative",
    "_output_transform", "_rank", "_scope_limits",
})

if TYPE_CHECKING:
    from vlprune.adapters.hf.prune import (  # noqa: F401
        KeepHeads,
        KeepNeurons,
        hf_pruner_kwargs,
        positive_dims,
        prune_hf_model,
        unwrapped_parameters,
    )


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        from vlprune.adapters.hf import prune

        value = getattr(prune, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _HF_NAMES)
