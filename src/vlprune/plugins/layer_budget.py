"""Layer- and modality-level pruning budgets from intrinsic dimension (Wang et al., ICML 2024).

The ID-pruning work ranks layers with (seed 001)

    ``Score_l = ID_l / Comp_l + lam * Utility_l``

where ``Comp_l`` is the layer's parameter count and ``Utility_l`` the drop of a task metric
when the layer is removed, and it reports that low-ID language layers tolerate pruning better
than high-ID vision layers ("an asymmetric pruning strategy for vision and language
modalities"). This module turns both findings into budgets Torch-Pruning (``pruning_ratio_dict``)
or an unstructured per-layer pruner can take:

* :func:`layer_complexity`, :func:`layer_utility` and :func:`layer_scores` compute the score;
* :func:`layer_ratios` maps scores to per-layer ratios whose parameter-weighted mean is the
  requested total (higher score -> lower ratio);
* :func:`modality_budgets` splits a total ratio between modalities (low ID -> cut harder) and
  :func:`modality_ratio_dict` expands it to ``{module: ratio}``.

Example:
    >>> from vlprune.plugins.layer_budget import layer_ratios, layer_scores
    >>> scores = layer_scores({"a": 10.0, "b": 40.0}, {"a": 100, "b": 100})
    >>> scores
    {'a': 0.4, 'b': 1.6}
    >>> ratios = layer_ratios(scores, {"a": 100, "b": 100}, total_ratio=0.4)
    >>> {k: round(v, 3) for k, v in ratios.items()}
    {'a': 0.64, 'b': 0.16}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.intrinsic_dim import IDProfile, LayerID

__all__ = [
    "RatioRule",
    "ModalityRule",
    "layer_complexity",
    "layer_utility",
    "layer_scores",
    "layer_ratios",
    "modality_budgets",
    "modality_ratio_dict",
]

logger = logging.getLogger(__name__)

RatioRule = Literal["inverse", "exp"]
ModalityRule = Literal["inverse_id", "uniform"]

#: a profile as :func:`modality_budgets` takes it
ProfileLike = IDProfile | Mapping[str, Any]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _finite(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise VLPruneError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise VLPruneError(f"{what} must be finite, got {x}")
    return x


def _check_total(total_ratio: float) -> float:
    total = _finite(total_ratio, "total_ratio")
    if not 0.0 <= total < 1.0:
        raise VLPruneError(f"total_ratio must be in [0, 1), got {total}")
    return total


def _solve_scale(
    log_weights: Sequence[float], params: Sequence[float], total: float, lo: float, hi: float
) -> list[float]:
    """Ratios ``clip(c * w_l, lo, hi)`` with ``c >= 0`` chosen (bisection) so that the
    ``params``-weighted mean is ``total``; ``lo <= total <= hi`` must hold (checked by callers).

    ``w_l = exp(log_weights[l])`` is rescaled so that its largest value is 1, which keeps very
    spread weights finite.
    """
    p_total = float(sum(params))
    if total <= lo:
        return [lo] * len(params)
    if total >= hi:
        return [hi] * len(params)
    top = max(log_weights)
    weights = [math.exp(v - top) for v in log_weights]
    if min(weights) <= 0.0:
        raise VLPruneError(
            "the scores are too spread for this strength (a layer's weight underflows to 0); "
            "use a smaller strength"
        )

    def mean_at(c: float) -> float:
        return sum(p * min(hi, max(lo, c * w)) for p, w in zip(params, weights)) / p_total

    c_lo, c_hi = 0.0, hi / min(weights)  # mean_at(c_lo) = lo < total <= hi = mean_at(c_hi)
    for _ in range(4000):
        mid = 0.5 * (c_lo + c_hi)
        if mid <= c_lo or mid >= c_hi:
            break
        if mean_at(mid) < total:
            c_lo = mid
        else:
            c_hi = mid
    # the mean is continuous and piecewise linear in c: solve it exactly on the final piece
    ratios = [min(hi, max(lo, c_hi * w)) for w in weights]
    free = [i for i, r in enumerate(ratios) if lo < r < hi]
    if free:
        free_set = set(free)
        fixed = sum(params[i] * ratios[i] for i in range(len(ratios)) if i not in free_set)
        slope = sum(params[i] * weights[i] for i in free)
        c_exact = (total * p_total - fixed) / slope
        polished = [min(hi, max(lo, c_exact * w)) for w in weights]
        if abs(sum(p * r for p, r in zip(params, polished)) / p_total - total) <= abs(
            mean_at(c_hi) - total
        ):
            ratios = polished
    return ratios


def _profile_entries(profile: ProfileLike) -> dict[str, tuple[float, str]]:
    """module name -> (ID, modality) from an IDProfile or a mapping."""
    if isinstance(profile, IDProfile):
        items: Mapping[str, Any] = profile.layers
    elif isinstance(profile, Mapping):
        items = profile
    else:
        raise VLPruneError(
            f"profile must be an IDProfile or a mapping module name -> (ID, modality), "
            f"got {type(profile).__name__}"
        )
    out: dict[str, tuple[float, str]] = {}
    for name, entry in items.items():
        if isinstance(entry, LayerID):
            value, modality = entry.id, entry.modality
        elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
            value, modality = entry
        else:
            raise VLPruneError(
                f"profile entry for {name!r} must be a LayerID or an (ID, modality) pair, got {entry!r}"
            )
        value = _finite(value, f"the ID of {name!r}")
        if value <= 0:
            raise VLPruneError(f"the ID of {name!r} is {value}; intrinsic dimensions must be positive")
        out[str(name)] = (value, str(modality))
    if not out:
        raise VLPruneError("the ID profile is empty; estimate IDs first (vlprune.estimate_ids)")
    return out


# ---------------------------------------------------------------------------------------------
# layer score
# ---------------------------------------------------------------------------------------------


def layer_complexity(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Number of parameters of each named module (``Comp_l`` of the layer score).

    Parameters of submodules count; a parameter shared within one module counts once.

    Args:
        model: the model.
        names: module paths, as in ``model.named_modules()``.

    Returns:
        module name -> parameter count, in the order of ``names``.

    Raises:
        ModelStructureError: a name that is not a module of ``model``.

    Example:
        >>> layer_complexity(nn.Sequential(nn.Linear(4, 3)), ["0"])
        {'0': 15}
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ModelStructureError(
            f"{len(missing)} name(s) are not modules of {type(model).__name__}: {missing[:5]}; "
            "use names from model.named_modules()"
        )
    return {n: sum(p.numel() for p in modules[n].parameters()) for n in names}


def layer_utility(
    model: nn.Module,
    layers: Sequence[str],
    metric: Callable[[nn.Module], float],
    mode: str = "zero",
    progress: bool = True,
) -> dict[str, float]:
    """The drop of a task metric when each layer is removed (``Utility_l`` of the layer score).

    ``metric(model)`` is evaluated once on the intact model (the baseline) and once per layer
    with that layer removed; ``Utility_l = baseline - metric``, so with a higher-is-better metric
    (CIDEr, accuracy, or minus a loss) a large utility means an important layer and a layer the
    model does not use has utility 0. Removal mode ``"zero"`` sets every parameter of the module
    (weight and bias of a Linear, recursively for a block) to 0 in place: for a Linear inside a
    residual branch this removes that sublayer's contribution. The original values are copied
    back bitwise into the same tensors after each evaluation, also when ``metric`` raises. The
    metric is called as given (set eval mode / ``torch.no_grad()`` inside it as needed).
    A parameter tied to another module is zeroed there too while its layer is removed.

    Args:
        model: the model (left as it was on return).
        layers: module paths to remove one at a time.
        metric: model -> score, higher is better.
        mode: removal mode; only ``"zero"``.
        progress: show a tqdm progress bar.

    Returns:
        module name -> ``baseline - metric(model without the layer)``, in the order of ``layers``.

    Raises:
        ModelStructureError: a name that is not a module of ``model``, or a module without
            parameters (raised before the model is touched).
        VLPruneError: an unknown ``mode``, an empty or duplicated ``layers``.
        DataError: the metric returned NaN or Inf (the model is restored first).

    Example:
        >>> def metric(m):                                   # doctest: +SKIP
        ...     with torch.no_grad():
        ...         return -float(loss_fn(m(x), y))
        >>> layer_utility(model, ["encoder.layers.0.mlp.fc2"], metric)   # doctest: +SKIP
        {'encoder.layers.0.mlp.fc2': 0.031}
    """
    if mode != "zero":
        raise VLPruneError(f"mode must be 'zero', got {mode!r}")
    names = list(layers)
    if not names:
        raise VLPruneError("layers is empty; give the module names whose utility to measure")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise VLPruneError(f"layers lists {duplicated[:5]} more than once; give each module once")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ModelStructureError(
            f"{len(missing)} name(s) are not modules of {type(model).__name__}: {missing[:5]}; "
            "use names from model.named_modules()"
        )
    empty = [n for n in names if next(modules[n].parameters(), None) is None]
    if empty:
        raise ModelStructureError(
            f"module(s) {empty[:5]} have no parameters, so zeroing cannot remove them; "
            "choose modules with weights (e.g. nn.Linear)"
        )

    baseline = _finite_metric(metric(model), "the baseline")
    logger.info("layer_utility: baseline metric %.6g over %d layer(s)", baseline, len(names))
    out: dict[str, float] = {}
    for name in tqdm(names, desc="layer utility", disable=not progress):
        params = list(modules[name].parameters())
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p in params:
                    p.zero_()
            value = metric(model)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            del saved
        out[name] = baseline - _finite_metric(value, f"the metric without {name!r}")
        logger.debug("layer_utility: %s -> %.6g", name, out[name])
    return out


def _finite_metric(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise VLPruneError(f"metric must return a number; {what} was {value!r}") from None
    if not math.isfinite(x):
        raise DataError(f"{what} is {x}; the metric must return a finite number")
    return x


def layer_scores(
    ids: Mapping[str, float],
    complexity: Mapping[str, float],
    utility: Mapping[str, float] | None = None,
    lam: float = 0.0,
    normalize: bool = True,
) -> dict[str, float]:
    """``Score_l = ID_l / Comp_l + lam * Utility_l`` for every layer of ``ids`` (seed 001).

    ``ID_l / Comp_l`` (dimensions per parameter, ~1e-5) and ``Utility_l`` (metric points) live
    on unrelated scales, so with ``normalize=True`` (default) both terms are rescaled before
    they are combined:

    * ``a_l = (ID_l / Comp_l) / mean_k(ID_k / Comp_k)`` (mean 1 over the layers);
    * ``u_l = Utility_l / mean_k |Utility_k|`` (mean 1 when no utility is negative; the sign of
      a layer whose removal improved the metric is kept; all-zero utilities stay 0);
    * ``Score_l = a_l + lam * u_l``.

    Then ``lam`` is the weight of utility relative to ID per parameter (``lam = 1``: equal
    weight). With ``normalize=False`` the raw formula is used.

    Args:
        ids: module name -> intrinsic dimension (``IDProfile.ids()``), all positive.
        complexity: module name -> parameter count (:func:`layer_complexity`), all positive.
        utility: module name -> metric drop when the layer is removed (:func:`layer_utility`);
            required when ``lam != 0``.
        lam: weight of the utility term, >= 0.
        normalize: rescale both terms to mean 1 before combining.

    Returns:
        module name -> score, in the order of ``ids``; higher = more important.

    Raises:
        VLPruneError: empty ``ids``; a layer missing from ``complexity`` (or ``utility``);
            a non-positive or non-finite ID or complexity; a negative ``lam``; ``lam != 0``
            without ``utility``.

    Example:
        >>> layer_scores({"a": 10.0, "b": 20.0}, {"a": 10, "b": 10}, normalize=False)
        {'a': 1.0, 'b': 2.0}
    """
    if not ids:
        raise VLPruneError("ids is empty; estimate intrinsic dimensions first (vlprune.estimate_ids)")
    lam = _finite(lam, "lam")
    if lam < 0:
        raise VLPruneError(f"lam must be >= 0 (a larger utility means a more important layer), got {lam}")
    if lam != 0 and utility is None:
        raise VLPruneError(f"lam = {lam} needs utility; compute it with layer_utility(...) or set lam=0")
    names = list(ids)
    missing = [n for n in names if n not in complexity]
    if missing:
        raise VLPruneError(
            f"complexity has no entry for {len(missing)} layer(s) of ids: {missing[:5]}; "
            "compute it with layer_complexity(model, list(ids))"
        )
    ratio: dict[str, float] = {}
    for n in names:
        value = _finite(ids[n], f"the ID of {n!r}")
        comp = _finite(complexity[n], f"the complexity of {n!r}")
        if value <= 0:
            raise VLPruneError(f"the ID of {n!r} is {value}; intrinsic dimensions must be positive")
        if comp <= 0:
            raise VLPruneError(
                f"the complexity of {n!r} is {comp}; give layers with parameters (count > 0)"
            )
        ratio[n] = value / comp
    util: dict[str, float] = {n: 0.0 for n in names}
    if utility is not None:
        missing = [n for n in names if n not in utility]
        if missing:
            raise VLPruneError(
                f"utility has no entry for {len(missing)} layer(s) of ids: {missing[:5]}; "
                "measure every layer with layer_utility(model, list(ids), metric)"
            )
        util = {n: _finite(utility[n], f"the utility of {n!r}") for n in names}
    if normalize:
        mean_ratio = sum(ratio.values()) / len(ratio)
        ratio = {n: v / mean_ratio for n, v in ratio.items()}
        scale = sum(abs(v) for v in util.values()) / len(util)
        if scale > 0:
            util = {n: v / scale for n, v in util.items()}
        elif utility is not None and lam != 0:
            logger.warning("layer_scores: every utility is 0; the utility term adds nothing")
    return {n: ratio[n] + lam * util[n] for n in names}


# ---------------------------------------------------------------------------------------------
# per-layer and per-modality ratios
# ---------------------------------------------------------------------------------------------


def layer_ratios(
    scores: Mapping[str, float],
    params: Mapping[str, int],
    total_ratio: float,
    min_ratio: float = 0.0,
    max_ratio: float = 0.9,
    *,
    rule: RatioRule = "inverse",
    strength: float = 1.0,
) -> dict[str, float]:
    """Per-layer pruning ratios from layer scores, with a fixed overall ratio.

    ``ratio_l = clip(c * w_l, min_ratio, max_ratio)`` with

    * ``rule="inverse"`` (default): ``w_l = (mean_score / score_l) ** strength`` (scores must
      be positive): a layer with twice the score gets half the ratio while nothing is clipped;
    * ``rule="exp"``: ``w_l = exp(-strength * (score_l - mean_score) / std_score)``, for scores
      of any sign (``std = 0`` gives equal ratios);

    and ``c >= 0`` found by bisection (then solved exactly on its linear piece) so that the
    parameter-weighted mean ``sum_l params_l * ratio_l / sum_l params_l`` equals
    ``total_ratio``. Hence: a higher score never gets a higher ratio, every ratio is within
    ``[min_ratio, max_ratio]``, and the total is met exactly whenever
    ``min_ratio <= total_ratio <= max_ratio``. ``strength = 0`` gives every layer ``total_ratio``.

    The result fits Torch-Pruning's ``pruning_ratio_dict`` (after mapping names to modules) or
    an unstructured per-layer budget.

    Args:
        scores: module name -> score (:func:`layer_scores`), higher = more important.
        params: module name -> parameter count (:func:`layer_complexity`), all positive.
        total_ratio: the overall fraction of parameters to prune, in [0, 1).
        min_ratio: the least ratio of any layer, >= 0.
        max_ratio: the largest ratio of any layer, <= 1.
        rule: ``"inverse"`` or ``"exp"`` (above).
        strength: how strongly the score spreads the ratios, >= 0.

    Returns:
        module name -> pruning ratio, in the order of ``scores``.

    Raises:
        VLPruneError: empty ``scores``; a layer missing from ``params`` or with a non-positive
            count; non-finite scores; non-positive scores with ``rule="inverse"``; ``total_ratio``
            outside [0, 1) or outside ``[min_ratio, max_ratio]`` (infeasible); bad bounds,
            ``rule`` or ``strength``.

    Example:
        >>> r = layer_ratios({"a": 1.0, "b": 3.0}, {"a": 10, "b": 10}, total_ratio=0.4)
        >>> {k: round(v, 3) for k, v in r.items()}
        {'a': 0.6, 'b': 0.2}
    """
    if not scores:
        raise VLPruneError("scores is empty; compute them with layer_scores(...)")
    total = _check_total(total_ratio)
    lo = _finite(min_ratio, "min_ratio")
    hi = _finite(max_ratio, "max_ratio")
    if not 0.0 <= lo <= hi <= 1.0:
        raise VLPruneError(f"need 0 <= min_ratio <= max_ratio <= 1, got min_ratio={lo}, max_ratio={hi}")
    if not lo <= total <= hi:
        raise VLPruneError(
            f"total_ratio {total} cannot be reached with every layer's ratio in [{lo}, {hi}]; "
            "lower total_ratio or widen min_ratio / max_ratio"
        )
    strength = _finite(strength, "strength")
    if strength < 0:
        raise VLPruneError(f"strength must be >= 0, got {strength}")
    if rule not in ("inverse", "exp"):
        raise VLPruneError(f"rule must be 'inverse' or 'exp', got {rule!r}")
    names = list(scores)
    missing = [n for n in names if n not in params]
    if missing:
        raise VLPruneError(
            f"params has no entry for {len(missing)} layer(s) of scores: {missing[:5]}; "
            "compute it with layer_complexity(model, list(scores))"
        )
    counts = [_finite(params[n], f"the parameter count of {n!r}") for n in names]
    bad = [n for n, c in zip(names, counts) if c <= 0]
    if bad:
        raise VLPruneError(f"layer(s) {bad[:5]} have a non-positive parameter count; leave them out")
    values = [_finite(scores[n], f"the score of {n!r}") for n in names]
    mean = sum(values) / len(values)
    if rule == "inverse":
        if min(values) <= 0:
            raise VLPruneError(
                "rule='inverse' needs positive scores; some are <= 0 (e.g. a negative utility "
                "term): use rule='exp', or a smaller lam in layer_scores"
            )
        log_w = [strength * (math.log(mean) - math.log(v)) for v in values]
    else:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        log_w = [0.0 if std == 0 else -strength * (v - mean) / std for v in values]
    ratios = _solve_scale(log_w, counts, total, lo, hi)
    logger.info(
        "layer_ratios: %d layers, total %.4f, ratios in [%.4f, %.4f]", len(names), total, min(ratios), max(ratios)
    )
    return dict(zip(names, ratios))


def modality_budgets(
    profile: ProfileLike,
    total_ratio: float,
    params: Mapping[str, int] | None = None,
    rule: str = "inverse_id",
    strength: float = 1.0,
    max_ratio: float = 0.9,
) -> dict[str, float]:
    """Split a total pruning ratio between modalities from an ID profile (asymmetric pruning).

    Rules:

    * ``"inverse_id"``: ``ratio_m = min(c * (1 / mean_ID_m) ** strength, max_ratio)``, where
      ``mean_ID_m`` is the plain mean ID of the modality's profiled layers and ``c`` is found by
      bisection so that the parameter-weighted mean ratio over all profiled layers,
      ``sum_l params_l * ratio_{m(l)} / sum_l params_l``, equals ``total_ratio``. The low-ID
      modality (language in the paper) is cut harder; ``strength = 0`` is uniform.
    * ``"uniform"``: every modality gets ``total_ratio``.

    Modalities are whatever the profile's layers carry (``"vision"``, ``"language"``,
    ``"fusion"``, ``"unknown"``...).

    Args:
        profile: an :class:`IDProfile`, or a mapping module name -> ``(ID, modality)``
            (or -> :class:`LayerID`).
        total_ratio: the overall fraction to prune, in [0, ``max_ratio``].
        params: parameters per profiled layer name (:func:`layer_complexity`); default: every
            layer counts equally.
        rule: ``"inverse_id"`` or ``"uniform"``.
        strength: exponent of ``1 / mean_ID``, >= 0.
        max_ratio: the largest ratio of any modality, <= 1.

    Returns:
        modality -> pruning ratio, modalities in the order they first appear in the profile.

    Raises:
        VLPruneError: an empty profile, non-positive IDs, a layer missing from ``params``,
            ``total_ratio`` outside [0, 1) or above ``max_ratio``, an unknown ``rule``, a
            negative ``strength``.

    Example:
        >>> profile = {"v.fc": (100.0, "vision"), "t.fc": (10.0, "language")}
        >>> b = modality_budgets(profile, 0.4)
        >>> {k: round(v, 4) for k, v in b.items()}
        {'vision': 0.0727, 'language': 0.7273}
    """
    entries = _profile_entries(profile)
    total = _check_total(total_ratio)
    hi = _finite(max_ratio, "max_ratio")
    if not 0.0 <= hi <= 1.0:
        raise VLPruneError(f"max_ratio must be in [0, 1], got {hi}")
    if total > hi:
        raise VLPruneError(
            f"total_ratio {total} cannot be reached with every modality's ratio <= max_ratio {hi}; "
            "lower total_ratio or raise max_ratio"
        )
    strength = _finite(strength, "strength")
    if strength < 0:
        raise VLPruneError(f"strength must be >= 0, got {strength}")
    if rule not in ("inverse_id", "uniform"):
        raise VLPruneError(f"rule must be 'inverse_id' or 'uniform', got {rule!r}")
    if params is None:
        counts = {n: 1.0 for n in entries}
    else:
        missing = [n for n in entries if n not in params]
        if missing:
            raise VLPruneError(
                f"params has no entry for {len(missing)} profiled layer(s): {missing[:5]}; "
                "compute it with layer_complexity(model, list(profile))"
            )
        counts = {n: _finite(params[n], f"the parameter count of {n!r}") for n in entries}
        bad = [n for n, c in counts.items() if c <= 0]
        if bad:
            raise VLPruneError(f"layer(s) {bad[:5]} have a non-positive parameter count")
    ids_of: dict[str, list[float]] = {}
    weight_of: dict[str, float] = {}
    for name, (value, modality) in entries.items():
        ids_of.setdefault(modality, []).append(value)
        weight_of[modality] = weight_of.get(modality, 0.0) + counts[name]
    modalities = list(ids_of)
    if rule == "uniform":
        return {m: total for m in modalities}
    mean_ids = {m: sum(v) / len(v) for m, v in ids_of.items()}
    log_w = [-strength * math.log(mean_ids[m]) for m in modalities]
    ratios = _solve_scale(log_w, [weight_of[m] for m in modalities], total, 0.0, hi)
    out = dict(zip(modalities, ratios))
    logger.info(
        "modality_budgets: %s",
        ", ".join(f"{m} (mean ID {mean_ids[m]:.1f}) -> {r:.4f}" for m, r in out.items()),
    )
    return out


def modality_ratio_dict(
    model: nn.Module, profile: ProfileLike, budgets: Mapping[str, float]
) -> dict[nn.Module, float]:
    """``{module: ratio}`` for every profiled module, each at its modality's budget.

    This is the form Torch-Pruning's ``pruning_ratio_dict`` takes.

    Args:
        model: the model the profile was estimated on.
        profile: as in :func:`modality_budgets`.
        budgets: modality -> ratio (:func:`modality_budgets`).

    Returns:
        module -> pruning ratio, in profile order.

    Raises:
        ModelStructureError: a profiled name that is not a module of ``model``.
        VLPruneError: a profiled modality without a budget, or a budget outside [0, 1].

    Example:
        >>> budgets = modality_budgets(profile, 0.4)                      # doctest: +SKIP
        >>> pruner = tp.pruner.MetaPruner(model, inputs, importance,      # doctest: +SKIP
        ...     pruning_ratio_dict=modality_ratio_dict(model, profile, budgets))
    """
    entries = _profile_entries(profile)
    modules = dict(model.named_modules())
    missing = [n for n in entries if n not in modules]
    if missing:
        raise ModelStructureError(
            f"{len(missing)} profiled name(s) are not modules of {type(model).__name__}: {missing[:5]}; "
            "was the profile estimated on this model?"
        )
    unbudgeted = sorted({m for _, m in entries.values() if m not in budgets})
    if unbudgeted:
        raise VLPruneError(
            f"budgets has no ratio for modality/ies {unbudgeted}; give one per modality "
            "(modality_budgets(profile, ...) does)"
        )
    for m, r in budgets.items():
        if not 0.0 <= _finite(r, f"the budget of {m!r}") <= 1.0:
            raise VLPruneError(f"the budget of {m!r} is {r}; ratios must be in [0, 1]")
    return {modules[n]: float(budgets[m]) for n, (_, m) in entries.items()}
