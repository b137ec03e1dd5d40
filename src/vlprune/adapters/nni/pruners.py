"""ID-weighted and PLATON pruning as NNI 3.0 pruners.

Both classes subclass NNI's own pruners and change only what is scored: NNI keeps config lists,
target spaces, wrappers, evaluators and mask generation.

* :class:`IDWeightedPruner`: NNI's L1 / L2 norm metric (``_NormPruner``) or Taylor metric
  (``TaylorPruner``) of each target, times the intrinsic dimension of that target's module from an
  :class:`~vlprune.IDProfile` (Wang et al., ICML 2024: ``S x ID``).
* :class:`PlatonPruner`: PLATON's upper confidence bound of ``|w * grad|`` (Zhang et al., ICML 2022),
  updated before every optimizer step through the evaluator, as NNI's ``MovementPruner`` does, with
  the sparsity raised on PLATON's cubic schedule between ``warmup_step`` and
  ``cooldown_begin_step``; ``profile=`` gives ID-PLATON.

Where ID weighting matters: a module's ID scales every metric of that module by one constant, so
with a per-layer ``sparse_ratio`` the masks are those of the base metric. The paper ranks the raw
products across layers under *one* global threshold: give the targets a common ``global_group_id``.

**Global groups, fenced.** NNI 3.0's ``global_group_id`` ranking ignores ``max_sparse_ratio`` per
layer (it only clamps the group total), so a layer can be emptied. Both pruners replace that one
step: the lowest metrics across the group are pruned until the group's ``sparse_ratio`` is met,
but no target loses more than its ``max_sparse_ratio`` (nor less than its ``min_sparse_ratio``),
and no target is emptied entirely (it keeps at least ``min_kept`` metric entries: a row for
``out_channel``, a weight for fine-grained; the paper's "each tensor keeps a few weights"). The
per-target counts are then handed back to NNI's ``generate_sparsity`` as plain per-target ratios,
so expansion, bias alignment and every other rule stay NNI's. :func:`fenced_generate_sparsity` is
that step, usable with any NNI metrics.

Example:
    >>> import torch
    >>> from vlprune.adapters.nni.pruners import IDWeightedPruner
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> config = [{"op_names": ["0", "2"], "sparse_ratio": 0.5, "global_group_id": "all", "max_sparse_ratio": 0.8}]
    >>> pruner = IDWeightedPruner(model, config, profile={"0": 40.0, "2": 8.0}, base="l1")
    >>> _, masks = pruner.compress()
    >>> sorted(masks)
    ['0', '2']
    >>> pruner.unwrap_model()
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from nni.compression.base.compressor import Compressor, Pruner
from nni.compression.base.target_space import PruningTargetSpace, TargetType
from nni.compression.pruning.basic_pruner import _NormPruner
from nni.compression.pruning.scheduled_pruner import ScheduledPruner
from nni.compression.pruning.taylor_pruner import TaylorPruner
from nni.compression.pruning.tools import generate_sparsity, is_active_target, norm_metrics
from nni.compression.utils.evaluator import Evaluator
from torch import nn

from vlprune.adapters.nni.config import OneShotInFusion, check_config_list, select_modules
from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.id_weighted import id_weight
from vlprune.plugins.intrinsic_dim import IDProfile
from vlprune.plugins.platon import Platon, cubic_schedule

__all__ = ["IDWeightedPruner", "PlatonPruner", "fenced_generate_sparsity"]

logger = logging.getLogger(__name__)

_Metrics = dict[str, dict[str, torch.Tensor]]
Base = Literal["l1", "l2", "taylor"]


# -- the global-group fence --------------------------------------------------------------------


def _fenced_group_counts(
    group: list[tuple[str, str, PruningTargetSpace]], metrics: _Metrics, min_kept: int
) -> dict[tuple[str, str], int]:
    """How many metric entries of each target one global group prunes (see module docstring)."""
    ratios = {float(space.sparse_ratio) for _, _, space in group}  # type: ignore[arg-type]
    if len(ratios) > 1:
        raise VLPruneError(
            f"the targets of global group {group[0][2].global_group_id!r} have different sparse_ratio {sorted(ratios)}; "
            "give every entry of the group the same sparse_ratio"
        )
    ratio = ratios.pop()
    total = sum(int(space.target.numel()) for _, _, space in group)  # type: ignore[union-attr]
    wanted = int(total * ratio)  # elements, as NNI counts them
    counts: dict[tuple[str, str], int] = {}
    values, grains, owners = [], [], []
    mandatory = 0
    for index, (module_name, target_name, space) in enumerate(group):
        metric = metrics[module_name][target_name].detach().reshape(-1).float().cpu()
        n = metric.numel()
        grain = int(space.target.numel()) // max(n, 1)  # type: ignore[union-attr]
        cap = n if space.max_sparse_ratio is None else int(n * float(space.max_sparse_ratio))
        cap = max(0, min(cap, n - min_kept))
        floor = 0 if not space.min_sparse_ratio else min(int(n * float(space.min_sparse_ratio)), cap)
        counts[(module_name, target_name)] = floor
        mandatory += floor * grain
        ordered = torch.sort(metric, stable=True).values[floor:cap]
        values.append(ordered)
        grains.append(torch.full((ordered.numel(),), grain, dtype=torch.long))
        owners.append(torch.full((ordered.numel(),), index, dtype=torch.long))
    if not values:
        return counts
    value, grain, owner = torch.cat(values), torch.cat(grains), torch.cat(owners)
    order = torch.sort(value, stable=True).indices
    taken = torch.cumsum(grain[order], 0) <= max(0, wanted - mandatory)
    chosen = owner[order][taken]
    for index, extra in zip(*torch.unique(chosen, return_counts=True)):
        module_name, target_name, _ = group[int(index)]
        counts[(module_name, target_name)] += int(extra)
    return counts


def fenced_generate_sparsity(
    metrics: _Metrics,
    target_spaces: Mapping[str, Mapping[str, PruningTargetSpace]],
    min_kept: int = 1,
) -> dict[str, dict[str, torch.Tensor]]:
    """NNI's ``generate_sparsity`` with ``global_group_id`` groups that honour per-target limits.

    Each global group prunes its lowest metric entries (raw values, ranked across the group) until
    the group's ``sparse_ratio`` of elements is pruned, while each target keeps within
    ``[min_sparse_ratio, max_sparse_ratio]`` and keeps at least ``min_kept`` entries. The result
    is handed to NNI as per-target ratios (the target spaces are restored afterwards), so every other
    rule (thresholds, dependency groups, alignment of biases) is NNI's own.

    Args:
        metrics: ``{module_name: {target_name: metric}}``, smaller = pruned first.
        target_spaces: the pruner's ``_target_spaces``.
        min_kept: metric entries every target of a global group keeps at least (>= 0).

    Returns:
        Masks ``{module_name: {target_name: mask}}`` (1 = keep), as NNI's ``generate_sparsity``.

    Example:
        >>> masks = fenced_generate_sparsity(pruner._calculate_metrics(pruner._collect_data()),
        ...                                  pruner._target_spaces)  # doctest: +SKIP
    """
    if min_kept < 0:
        raise VLPruneError(f"min_kept must be >= 0, got {min_kept}")
    groups: dict[Any, list[tuple[str, str, PruningTargetSpace]]] = defaultdict(list)
    for module_name, spaces in target_spaces.items():
        for target_name, space in spaces.items():
            if (
                space.global_group_id is None
                or space.dependency_group_id is not None
                or space.sparse_threshold is not None
                or space.sparse_ratio is None
                or (space.type is TargetType.PARAMETER and space.target is None)
                or target_name not in metrics.get(module_name, {})
            ):
                continue
            groups[space.global_group_id].append((module_name, target_name, space))
    overrides: dict[tuple[str, str], float] = {}
    for group in groups.values():
        for (module_name, target_name), count in _fenced_group_counts(group, metrics, min_kept).items():
            n = metrics[module_name][target_name].numel()
            # NNI's _ratio_mask prunes int(n * ratio) entries; +0.5 survives float rounding
            overrides[(module_name, target_name)] = 0.0 if count == 0 else 1.0 if count >= n else (count + 0.5) / n
    saved: list[tuple[PruningTargetSpace, dict[str, Any]]] = []
    try:
        for (module_name, target_name), ratio in overrides.items():
            space = target_spaces[module_name][target_name]
            saved.append((space, dict(space._setting)))
            space._setting.update(global_group_id=None, sparse_ratio=float(ratio), max_sparse_ratio=None, min_sparse_ratio=None)
        return generate_sparsity(metrics, target_spaces)  # type: ignore[arg-type]
    finally:
        for space, setting in saved:
            space._setting.clear()
            space._setting.update(setting)


# -- shared checks -----------------------------------------------------------------------------


def _profile_ids(profile: IDProfile | Mapping[str, float]) -> dict[str, float]:
    if not isinstance(profile, (IDProfile, Mapping)):
        raise VLPruneError(
            f"profile must be an IDProfile (vlprune.estimate_ids) or a mapping module name -> ID, got {type(profile).__name__}"
        )
    ids = profile.ids() if isinstance(profile, IDProfile) else dict(profile)
    if not ids:
        raise VLPruneError("the ID profile is empty; estimate IDs for the layers you prune first (vlprune.estimate_ids)")
    bad = {n: v for n, v in ids.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0}
    if bad:
        raise VLPruneError(f"intrinsic dimensions must be positive numbers; got {dict(list(bad.items())[:3])}")
    return {str(n): float(v) for n, v in ids.items()}


def _check_profile_covers(ids: Mapping[str, float], model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> None:
    missing = [name for name in select_modules(model, config_list) if name not in ids]
    if missing:
        known = ", ".join(repr(n) for n in list(ids)[:3])
        raise ModelStructureError(
            f"the ID profile has no ID for {len(missing)} module(s) the config_list selects: "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''} (the profile has {known}{' ...' if len(ids) > 3 else ''}); "
            "estimate IDs for these modules (vlprune.estimate_ids(..., modules=...)) or leave them out of the "
            "config_list (exclude_op_names)"
        )


def _check_evaluator(evaluator: Any, who: str, why: str) -> None:
    if evaluator is None:
        raise VLPruneError(
            f"{who} needs an NNI evaluator ({why}): e.g. nni.compression.TorchEvaluator(training_func, "
            "nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-4), training_step)"
        )
    if not isinstance(evaluator, Evaluator):
        raise VLPruneError(
            f"evaluator must be an NNI Evaluator (TorchEvaluator, TransformersEvaluator, LightningEvaluator), "
            f"got {type(evaluator).__name__}"
        )


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise VLPruneError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _guarded_init(pruner: Pruner, init: Any, *args: Any) -> None:
    """Run NNI's constructor; if it fails after wrapping, unwrap so the model is as it was."""
    try:
        init(*args)
    except VLPruneError:
        raise
    except Exception as exc:
        if getattr(pruner, "_is_wrapped", False):
            try:
                pruner.unwrap_model()
            except Exception:  # pragma: no cover - best effort
                logger.exception("could not unwrap after a failed NNI constructor")
        raise VLPruneError(f"NNI could not set up {type(pruner).__name__}: {exc!r}") from exc


def _chain(cls: type, compressor: Compressor, new_config_list: list[dict[str, Any]], **kwargs: Any) -> Any:
    """NNI's ``Compressor.from_compressor``, re-wrapping ``compressor`` if the new pruner is refused
    (NNI unwraps it first), so a failed chain leaves the model as it was."""
    was_wrapped = getattr(compressor, "_is_wrapped", False)
    try:
        return Compressor.from_compressor.__func__(cls, compressor, new_config_list, **kwargs)  # type: ignore[attr-defined]
    except Exception:
        if was_wrapped and not compressor._is_wrapped:
            compressor.wrap_model()
        raise


def _weight_by_id(metrics: _Metrics, ids: Mapping[str, float]) -> _Metrics:
    out: _Metrics = defaultdict(dict)
    for module_name, targets in metrics.items():
        if module_name not in ids:
            raise ModelStructureError(f"no intrinsic dimension for {module_name!r} in the profile")
        for target_name, metric in targets.items():
            out[module_name][target_name] = id_weight(metric, ids[module_name])
    return out


# -- IDWeightedPruner --------------------------------------------------------------------------


class IDWeightedPruner(Pruner):
    """NNI pruner scoring each target by NNI's norm or Taylor metric times its module's ID.

    ``metric(target) = base_metric(target) x ID(module)`` with the raw ID (the paper's ``S x ID``).
    ``base="l1"`` / ``"l2"`` behave as NNI's ``L1NormPruner`` / ``L2NormPruner`` (one-shot, no
    evaluator needed); ``base="taylor"`` as NNI's ``TaylorPruner`` (needs an evaluator and
    ``training_steps``; the squared ``w * grad`` is summed over those steps). The instance is an
    ``nni.compression.pruning.TaylorPruner`` (taylor) or an ``_NormPruner`` (l1 / l2), so NNI's
    ``AGPPruner`` / ``LinearPruner`` can wrap it.

    Granularity is NNI's: ``out_channel`` by default (rows of a Linear, filters of a Conv), any NNI
    ``granularity`` in the config; ``"granularity": [1]`` scores and prunes single weights (the
    paper's unstructured setting) of any layer type. A ``global_group_id`` ranks the raw
    products across layers, with ``max_sparse_ratio`` honoured per layer (see the module docstring).

    Args:
        model: the model to prune (wrapped in place by NNI; ``unwrap_model()`` before saving).
        config_list: NNI 3.0 config list, e.g. ``[{"op_types": ["Linear"], "sparse_ratio": 0.4,
            "global_group_id": "all", "max_sparse_ratio": 0.8}]``.
        profile: an :class:`~vlprune.IDProfile` or a mapping module name -> ID; must cover every
            selected module.
        base: ``"l1"`` | ``"l2"`` | ``"taylor"``.
        evaluator: an NNI evaluator (required for ``"taylor"``; optional otherwise).
        training_steps: Taylor only: optimizer steps over which gradients are collected.
        existed_wrappers: NNI's, for :meth:`from_compressor`.

    Raises:
        VLPruneError: bad ``base`` / config / profile / evaluator, before the model is touched.
        ModelStructureError: the config selects nothing, an unprunable type, or a module without ID.

    Example:
        >>> pruner = IDWeightedPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.3,
        ...                                    "global_group_id": 0, "max_sparse_ratio": 0.7}],
        ...                           profile=vlprune.estimate_ids(model, batches))  # doctest: +SKIP
        >>> _, masks = pruner.compress()  # doctest: +SKIP
    """

    #: metric entries every target of a global group keeps at least
    min_kept: int = 1

    def __new__(cls, *args: Any, **kwargs: Any) -> IDWeightedPruner:
        if cls is IDWeightedPruner:
            base = kwargs.get("base", args[3] if len(args) > 3 else "l1")
            if base == "taylor":
                cls = _IDWeightedTaylorPruner
            elif base in ("l1", "l2"):
                cls = _IDWeightedNormPruner
            else:
                raise VLPruneError(f"base must be 'l1', 'l2' or 'taylor'; got {base!r}")
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        profile: IDProfile | Mapping[str, float],
        base: Base = "l1",
        evaluator: Evaluator | None = None,
        training_steps: int | None = None,
        existed_wrappers: dict[str, Any] | None = None,
    ) -> None:
        self.ids = _profile_ids(profile)
        if base == "taylor":
            _check_evaluator(evaluator, "IDWeightedPruner(base='taylor')", "gradients come from its training loop")
            if training_steps is None:
                raise VLPruneError("IDWeightedPruner(base='taylor') needs training_steps (optimizer steps to collect gradients over)")
            _check_int("training_steps", training_steps, 1)
        elif training_steps is not None:
            raise VLPruneError(f"training_steps is only used with base='taylor' (base is {base!r}); drop it")
        elif evaluator is not None:
            _check_evaluator(evaluator, "IDWeightedPruner", "")
        check_config_list(model, config_list)
        _check_profile_covers(self.ids, model, config_list)
        self.base: Base = base
        if base == "taylor":
            _guarded_init(self, super().__init__, model, config_list, evaluator, training_steps, existed_wrappers)
        else:
            self.p = 1 if base == "l1" else 2
            _guarded_init(self, super().__init__, model, config_list, evaluator, existed_wrappers)

    @classmethod
    def from_compressor(  # type: ignore[override]
        cls,
        compressor: Compressor,
        new_config_list: list[dict[str, Any]],
        profile: IDProfile | Mapping[str, float],
        base: Base = "l1",
        training_steps: int | None = None,
        evaluator: Evaluator | None = None,
    ) -> IDWeightedPruner:
        """A new pruner on ``compressor``'s model, wrappers and evaluator (NNI's chaining); if it is
        refused, ``compressor`` is wrapped again as it was."""
        return _chain(
            cls, compressor, new_config_list, profile=profile, base=base, training_steps=training_steps, evaluator=evaluator
        )

    def _calculate_metrics(self, data: _Metrics) -> _Metrics:
        return _weight_by_id(super()._calculate_metrics(data), self.ids)  # type: ignore[misc]

    def _generate_sparsity(self, metrics: _Metrics) -> _Metrics:
        return fenced_generate_sparsity(metrics, self._target_spaces, self.min_kept)

    def metrics(self) -> _Metrics:
        """The current ID-weighted metrics ``{module_name: {target_name: metric}}`` (smaller = pruned
        first; the shape of NNI's ``_scaler.shrink(target, keepdim=True)``)."""
        return self._calculate_metrics(self._collect_data())


class _IDWeightedNormPruner(OneShotInFusion, IDWeightedPruner, _NormPruner):
    """IDWeightedPruner with base l1 / l2 (an NNI ``_NormPruner``)."""


class _IDWeightedTaylorPruner(IDWeightedPruner, TaylorPruner):
    """IDWeightedPruner with base taylor (an NNI ``TaylorPruner``)."""


# -- PlatonPruner ------------------------------------------------------------------------------


class PlatonPruner(ScheduledPruner):
    """NNI pruner scoring weights by PLATON's UCB, on PLATON's cubic sparsity schedule.

    After each ``loss.backward()`` (just before the evaluator's first optimizer steps) the PLATON
    state (:class:`vlprune.plugins.platon.Platon`) adds ``|w * grad|`` of every active target to its
    window; every ``delta_t`` steps the EMAs move. After the step, each target's sparsity is its
    configured ``sparse_ratio`` times the cubic fraction ``1 - (1 - (t - warmup) / (cooldown -
    warmup))**3`` (0 up to ``warmup_step``, 1 from ``cooldown_begin_step``), and masks are
    regenerated from the scores every ``delta_t`` steps in the cubic phase and every step after it.
    With ``profile=``, scores are multiplied by their module's ID (ID-PLATON; matters under a
    ``global_group_id``, PLATON's one global threshold). Works under NNI's ``TorchEvaluator``; with
    transformers 5's ``Trainer`` use
    :class:`~vlprune.adapters.nni.evaluators.PatchedTransformersEvaluator` (NNI's
    ``TransformersEvaluator`` fails there). NNI's ``AGPPruner`` / ``LinearPruner`` add nothing: the
    cubic schedule is PLATON's own.

    Granularity: fine-grained by default (single weights, as NNI's ``LevelPruner``);
    ``"granularity": "out_channel"`` in the config prunes rows, scored by the sum of their
    weights' scores.

    Args:
        model: the model to prune.
        config_list: NNI 3.0 config list (final sparsities).
        evaluator: an NNI evaluator whose training loop drives the pruning (required).
        warmup_step: optimizer steps before pruning starts.
        cooldown_begin_step: step at which the final sparsity is reached (> ``warmup_step``).
        beta1: EMA factor of the sensitivity.
        beta2: EMA factor of the uncertainty (1 scores by the sensitivity alone).
        delta_t: PLATON window length and mask period of the cubic phase, in steps.
        profile: optional ID profile (ID-PLATON); must cover every selected module.
        existed_wrappers: NNI's, for :meth:`from_compressor`.

    Raises:
        VLPruneError: no evaluator, ``cooldown_begin_step <= warmup_step``, bad betas / config /
            profile, all before the model is touched.

    Example:
        >>> pruner = PlatonPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.8,
        ...                                "global_group_id": 0}], evaluator, warmup_step=10,
        ...                       cooldown_begin_step=80)  # doctest: +SKIP
        >>> _, masks = pruner.compress(max_steps=100, max_epochs=None)  # doctest: +SKIP
    """

    #: metric entries every target of a global group keeps at least
    min_kept: int = 1

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Evaluator,
        warmup_step: int,
        cooldown_begin_step: int,
        beta1: float = 0.85,
        beta2: float = 0.95,
        delta_t: int = 10,
        profile: IDProfile | Mapping[str, float] | None = None,
        existed_wrappers: dict[str, Any] | None = None,
    ) -> None:
        _check_evaluator(evaluator, "PlatonPruner", "PLATON scores come from the gradients of its training loop")
        _check_int("warmup_step", warmup_step, 0)
        _check_int("cooldown_begin_step", cooldown_begin_step, 1)
        if cooldown_begin_step <= warmup_step:
            raise VLPruneError(
                f"cooldown_begin_step ({cooldown_begin_step}) must be after warmup_step ({warmup_step}): sparsity "
                "rises between the two; e.g. warmup_step=10, cooldown_begin_step=80"
            )
        platon = Platon(beta1=beta1, beta2=beta2, delta_t=delta_t)  # validates the betas and delta_t
        self.ids = None if profile is None else _profile_ids(profile)
        check_config_list(model, config_list)
        if self.ids is not None:
            _check_profile_covers(self.ids, model, config_list)
        self.platon = platon
        self.warmup_step = warmup_step
        self.cooldown_begin_step = cooldown_begin_step
        self.delta_t = delta_t
        _guarded_init(self, super().__init__, model, config_list, evaluator, existed_wrappers)
        self.evaluator: Evaluator
        # the per-layer limit max_sparse_ratio stays fixed; the targets grow on the schedule
        self._scheduled_keys = ["sparse_ratio", "sparse_threshold", "min_sparse_ratio"]
        self._init_sparse_goals()
        # read by NNI's AGPPruner / LinearPruner; PlatonPruner carries its own schedule
        self.interval_steps = 1
        self.total_times = cooldown_begin_step - warmup_step
        self._current_step = 0

    @classmethod
    def from_compressor(  # type: ignore[override]
        cls,
        compressor: Compressor,
        new_config_list: list[dict[str, Any]],
        warmup_step: int,
        cooldown_begin_step: int,
        beta1: float = 0.85,
        beta2: float = 0.95,
        delta_t: int = 10,
        profile: IDProfile | Mapping[str, float] | None = None,
        evaluator: Evaluator | None = None,
    ) -> PlatonPruner:
        """A new PlatonPruner on ``compressor``'s model, wrappers and evaluator (NNI's chaining); if it
        is refused, ``compressor`` is wrapped again as it was."""
        return _chain(
            cls, compressor, new_config_list, warmup_step=warmup_step, cooldown_begin_step=cooldown_begin_step,
            beta1=beta1, beta2=beta2, delta_t=delta_t, profile=profile, evaluator=evaluator,
        )

    def _set_default_sparse_granularity(self, target_space: PruningTargetSpace) -> list[int] | str | None:
        return None  # PLATON scores single weights

    # -- schedule ------------------------------------------------------------------------------

    def schedule(self, step: int) -> tuple[float, bool]:
        """``(fraction of the final sparsity, regenerate masks?)`` after optimizer step ``step`` (1-based).

        PLATON's cubic schedule (:func:`vlprune.plugins.platon.cubic_schedule`) with the dense phase
        ending at ``warmup_step`` and the final phase starting after ``cooldown_begin_step``.
        """
        remaining, update = cubic_schedule(
            step, total_steps=self.cooldown_begin_step + 1, initial_ratio=1.0, final_ratio=0.5,
            warmup_steps=1, initial_warmup=self.warmup_step, final_warmup=1, delta_t=self.delta_t,
        )
        return (1.0 - remaining) / 0.5, update

    def update_sparse_goals(self, current_times: int) -> None:
        """Set every target's sparsity to its goal times the schedule's fraction at step ``current_times``."""
        self._update_sparse_goals_by_ratio(self.schedule(current_times)[0])

    # -- scoring -------------------------------------------------------------------------------

    def _active_parameters(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        for module_name, spaces in self._target_spaces.items():
            for target_name, space in spaces.items():
                if space.type is TargetType.PARAMETER and space.target is not None and self._goal_active(module_name, target_name):
                    out.append((f"{module_name}.{target_name}", space.target))
        return out

    def _goal_active(self, module_name: str, target_name: str) -> bool:
        goals = self.sparse_goals.get(module_name, {}).get(target_name, {})
        return goals.get("sparse_ratio") is not None or goals.get("sparse_threshold") is not None

    def _collect_data(self) -> _Metrics:
        data: _Metrics = defaultdict(dict)
        scored = set(self.platon.names())
        for module_name, spaces in self._target_spaces.items():
            for target_name, space in spaces.items():
                name = f"{module_name}.{target_name}"
                if is_active_target(space) and name in scored:
                    data[module_name][target_name] = self.platon.score(name).detach().clone()
        return data

    def _calculate_metrics(self, data: _Metrics) -> _Metrics:
        # scores are >= 0: the L1 norm of a block is its sum; fine-grained metrics are the scores
        metrics = norm_metrics(p=1, data=data, target_spaces=self._target_spaces)
        for targets in metrics.values():
            for metric in targets.values():
                if not torch.isfinite(metric).all():
                    raise DataError("PLATON scores hold NaN / inf (NaN gradients? check the loss and the batches)")
        return _weight_by_id(metrics, self.ids) if self.ids is not None else metrics

    def _generate_sparsity(self, metrics: _Metrics) -> _Metrics:
        return fenced_generate_sparsity(metrics, self._target_spaces, self.min_kept)

    def metrics(self) -> _Metrics:
        """The current PLATON (x ID) metrics ``{module_name: {target_name: metric}}`` of the targets
        scored so far (smaller = pruned first)."""
        return self._calculate_metrics(self._collect_data())

    # -- NNI plumbing --------------------------------------------------------------------------

    def _register_trigger(self, evaluator: Evaluator) -> None:
        self._current_step = 0

        def accumulate() -> None:  # before optimizer.step(): the gradient belongs to these weights
            self.platon.update(self._active_parameters())

        def prune() -> None:
            self._current_step += 1
            fraction, update = self.schedule(self._current_step)
            self._update_sparse_goals_by_ratio(fraction)
            if update and fraction > 0 and self.platon.windows > 0:
                self.update_masks(self.generate_masks())
                logger.debug("PlatonPruner step %d: masks at %.3f of the final sparsity", self._current_step, fraction)

        evaluator.patch_optimizer_step(before_step_tasks=[accumulate], after_step_tasks=[prune])

    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        self._fusion_compress(max_steps, max_epochs)

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        if (self.interval_steps, self.total_times) != (1, self.cooldown_begin_step - self.warmup_step):
            logger.warning(
                "PlatonPruner follows PLATON's own cubic schedule (warmup_step %d, cooldown_begin_step %d); the "
                "schedule of the AGPPruner / LinearPruner wrapping it is overridden after every step",
                self.warmup_step, self.cooldown_begin_step,
            )
        self._update_sparse_goals_by_ratio(0.0)
        self._register_trigger(evaluator)

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        pass

    def compress(self, max_steps: int | None, max_epochs: int | None = None):  # type: ignore[override]
        """Train through the evaluator for ``max_steps`` steps (or ``max_epochs``), pruning on the way.

        Returns:
            ``(model, masks)`` as NNI's pruners.

        Raises:
            VLPruneError: ``max_steps`` ends before ``cooldown_begin_step`` (the final sparsity would
                never be reached), or neither limit is given.
        """
        if max_steps is None and max_epochs is None:
            raise VLPruneError("PlatonPruner.compress needs max_steps (>= cooldown_begin_step) or max_epochs")
        if max_steps is not None and max_steps < self.cooldown_begin_step:
            raise VLPruneError(
                f"max_steps {max_steps} ends before cooldown_begin_step {self.cooldown_begin_step}: the final sparsity "
                "would never be reached; train longer or lower cooldown_begin_step"
            )
        if max_steps is None:
            logger.warning("PlatonPruner trains by epochs: make sure they hold more than %d steps", self.cooldown_begin_step)
        return super().compress(max_steps, max_epochs)
