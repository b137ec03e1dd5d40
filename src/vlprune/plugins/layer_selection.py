"""Layer-selection strategies for depth pruning: which k decoder layers to drop given per-layer
scores (:mod:`vlprune.plugins.layer_similarity` computes them).

* ``rank``: the top k removable layers;
* ``spacing``: the best k with no two adjacent (or, past half the layers, the shortest runs) and
  gaps as even as the scores allow;
* ``consecutive``: the best run of k (Gromov et al.);
* ``regime``: ``rank`` at low budgets, ``spacing`` at high ones (Khaki et al., 2026).

The first / last layers are protected by default. :func:`select_run` picks a run from per-run
scores (e.g. angular distances).

Example:
    >>> select_layers([0.6, 0.9, 0.95, 0.8, 0.93, 0.7], k=2, strategy="spacing")
    [2, 4]
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from vlprune.errors import DataError, VLPruneError

__all__ = ["DEFAULT_REGIME_SWITCH", "Strategy", "select_layers", "select_run"]

logger = logging.getLogger(__name__)

Strategy = Literal["rank", "spacing", "consecutive", "regime"]

#: ``regime`` uses ``rank`` while ``k <= floor(DEFAULT_REGIME_SWITCH * unprotected layers)`` and
#: ``spacing`` above. From the testbed sweep (``benchmarks/bench_layer_drop.py``, llava-deep, 6
#: removable layers, docs/benchmarks.md): summed math + general retention favours ``rank`` at k = 1, 2
#: (1.77 vs 1.73, 1.62 vs 1.54) and ``spacing`` from k = 3 (1.43 vs 1.39, 1.35 vs 1.29, 1.03 vs
#: 0.89), so the switch sits at a third of the removable layers. One model and one seed: a
#: parameter, not a law. On real SmolLM2-135M without a heal (``benchmarks/bench_real_layer_drop.py``,
#: 28 removable layers) ``rank`` beat ``spacing`` at every budget from 2 to 14 (summed retention at
#: k = 12: 0.37 vs 0.02), so above the switch ``select_layers`` logs a warning: heal after removal
#: (the ``layer-drop`` recipe distils) or pass ``strategy="rank"``.
DEFAULT_REGIME_SWITCH: float = 1 / 3


def _check_scores(scores: Any, what: str = "scores") -> torch.Tensor:
    try:
        s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{what} must be a 1-D tensor or sequence of numbers, got {type(scores).__name__}") from exc
    if s.dim() != 1 or s.numel() == 0:
        raise DataError(f"{what} must be a non-empty 1-D tensor (one score per layer), got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        bad = torch.nonzero(~torch.isfinite(s))[:, 0].tolist()
        raise DataError(f"{what} contain NaN or Inf at layer(s) {bad}; recompute them (see the scoring function's errors)")
    return s


def _order(scores: torch.Tensor, higher_is_removable: bool) -> list[int]:
    key = -scores if higher_is_removable else scores
    return torch.sort(key, stable=True).indices.tolist()


def _region(n: int, protect_first: int, protect_last: int) -> tuple[int, int]:
    for what, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise VLPruneError(f"{what} (layers always kept at that end) must be an integer >= 0, got {value!r}")
    return protect_first, n - protect_last  # removable positions: lo .. hi - 1


def _check_k(k: Any, available: int, n: int, protect_first: int, protect_last: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VLPruneError(f"k (the number of layers to remove) must be an integer >= 1, got {k!r}")
    if k > available:
        raise VLPruneError(
            f"cannot remove {k} of {n} layers with protect_first={protect_first}, protect_last={protect_last}: "
            f"at most {max(available, 0)} are removable; lower k or the protection"
        )
    return k


def _spacing(s: torch.Tensor, k: int, evenness: float) -> list[int]:
    """Exact DP over the region's positions: max sum(s) - evenness * var(gaps), no two adjacent."""
    m = s.numel()
    vals = s.tolist()
    c = evenness / (k + 1)
    neg = -math.inf
    # best[j][q]: best objective with j + 1 picks, the last at q (gap terms up to q counted)
    best = [[neg] * m for _ in range(k)]
    prev = [[-1] * m for _ in range(k)]
    for q in range(m):
        best[0][q] = vals[q] - c * q * q
    for j in range(1, k):
        for q in range(2 * j, m):
            top, arg = neg, -1
            for p in range(2 * (j - 1), q - 1):
                if best[j - 1][p] == neg:
                    continue
                v = best[j - 1][p] - c * (q - p - 1) ** 2
                if v > top + 1e-12:
                    top, arg = v, p
            if arg >= 0:
                best[j][q], prev[j][q] = vals[q] + top, arg
    end, arg = neg, -1
    for q in range(m):
        if best[k - 1][q] == neg:
            continue
        v = best[k - 1][q] - c * (m - 1 - q) ** 2
        if v > end + 1e-12:
            end, arg = v, q
    picks = [arg]
    for j in range(k - 1, 0, -1):
        picks.append(prev[j][picks[-1]])
    return sorted(picks)


#: above this many candidate sets, ``spacing`` with adjacent removals (k > (m + 1) // 2) refuses
_MAX_SPREAD_SETS = 500_000


def _gaps(picks: Sequence[int], m: int) -> list[int]:
    """Kept layers before, between and after the picks (sorted) in a region of ``m`` layers."""
    edges = [-1, *picks, m]
    return [b - a - 1 for a, b in zip(edges, edges[1:])]


def _spread(s: torch.Tensor, k: int, evenness: float) -> list[int] | None:
    """``spacing`` when adjacency cannot be avoided (``k > (m + 1) // 2``): runs of removed layers
    at most ``ceil(k / (m - k + 1))`` long (the shortest possible), then the same objective as
    :func:`_spacing`; exhaustive over the sets (None if there are more than ``_MAX_SPREAD_SETS``)."""
    m = s.numel()
    if math.comb(m, k) > _MAX_SPREAD_SETS:
        return None
    longest = math.ceil(k / (m - k + 1))
    vals = s.tolist()
    c = evenness / (k + 1)
    best, best_picks = -math.inf, None
    for picks in itertools.combinations(range(m), k):
        run = top = 1
        for a, b in zip(picks, picks[1:]):
            run = run + 1 if b == a + 1 else 1
            top = max(top, run)
        if top > longest:
            continue
        gaps = _gaps(picks, m)
        mean = sum(gaps) / len(gaps)
        value = sum(vals[p] for p in picks) - c * sum((g - mean) ** 2 for g in gaps)
        if value > best + 1e-12:
            best, best_picks = value, list(picks)
    return best_picks


def _best_run(run_scores: list[float], higher: bool) -> int:
    best = max(run_scores) if higher else min(run_scores)
    return next(i for i, v in enumerate(run_scores) if v == best)


def select_layers(
    scores: torch.Tensor | Sequence[float],
    k: int,
    strategy: Strategy = "rank",
    protect_first: int = 1,
    protect_last: int = 1,
    *,
    higher_is_removable: bool = True,
    regime_switch: int | float | None = None,
    evenness: float = 0.05,
) -> list[int]:
    """Choose ``k`` decoder layers to remove from per-layer scores.

    The first ``protect_first`` and last ``protect_last`` layers are never chosen; below, "region"
    is the ``m`` layers in between.

    Strategies:
        * ``"rank"``: the ``k`` most removable layers of the region (ties: lower index).
        * ``"spacing"``: the ``k`` layers of the region, no two adjacent, maximising
          ``sum of min-max-normalised removability - evenness * variance of the gaps``, where the
          gaps are the numbers of kept layers between consecutive removed ones and at both ends of
          the region (their sum is fixed, so the variance measures evenness). Exact dynamic
          programme, ``O(k m^2)``. ``evenness=0`` gives the best-scoring non-adjacent set; equal
          scores give evenly spaced layers; remaining ties are broken deterministically, towards
          lower indices. Above ``k = (m + 1) // 2`` adjacency is unavoidable: runs of removed layers
          are then at most ``ceil(k / (m - k + 1))`` long (the shortest possible: removals spread
          as evenly as they can be), with the same objective, searched exhaustively (refused, with
          the fix, past 500,000 candidate sets).
        * ``"consecutive"``: the run of ``k`` adjacent layers of the region with the highest mean
          removability (LLM-Streamline / Gromov-style; for Gromov's angular distance, whose score is
          per run, use :func:`select_run`).
        * ``"regime"``: ``"rank"`` while ``k <= switch``, ``"spacing"`` above (the paper's low vs high
          budgets).

    Args:
        scores: one score per layer (1-D), e.g. :func:`layer_similarity` or
            :func:`combine_domains`.
        k: number of layers to remove (>= 1).
        strategy: ``"rank"``, ``"spacing"``, ``"consecutive"`` or ``"regime"``.
        protect_first: layers at the start that are always kept (default 1).
        protect_last: layers at the end that are always kept (default 1).
        higher_is_removable: True for similarities, False for block influence / distances.
        regime_switch: ``"regime"`` only: an int ``k`` threshold, or a float fraction of ``m``
            (``switch = floor(fraction * m)``); default :data:`DEFAULT_REGIME_SWITCH` (provisional).
        evenness: ``"spacing"`` only: weight of the gap-variance penalty (>= 0), relative to the
            scores normalised to [0, 1] over the region. The default 0.05 trades about 0.2 of the
            normalised score range for moving two removed layers from gaps (0, 5, 0) to (2, 3, 0);
            provisional like :data:`DEFAULT_REGIME_SWITCH`.

    Returns:
        The chosen layer indices, sorted ascending.

    Raises:
        VLPruneError: ``k < 1``, ``k`` above the removable layers (the message says how many are),
            an unknown strategy, bad protection / switch / evenness, a spread-out spacing too large to
            search.
        DataError: scores not 1-D or with NaN / Inf.

    Example:
        >>> s = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2, 0.3])
        >>> select_layers(s, 2), select_layers(s, 2, "spacing"), select_layers(s, 2, "consecutive")
        ([1, 2], [1, 3], [1, 2])
    """
    if strategy not in ("rank", "spacing", "consecutive", "regime"):
        raise VLPruneError(f"unknown strategy {strategy!r}; choose 'rank', 'spacing', 'consecutive' or 'regime'")
    s = _check_scores(scores)
    n = s.numel()
    lo, hi = _region(n, protect_first, protect_last)
    m = max(hi - lo, 0)
    k = _check_k(k, m, n, protect_first, protect_last)
    region = s[lo:hi] if higher_is_removable else -s[lo:hi]
    if strategy == "regime":
        switch = _regime_switch(regime_switch, m)
        if k <= switch:
            strategy = "rank"
        else:
            strategy = "spacing"
        logger.debug("regime: k=%d, switch=%d -> %s", k, switch, strategy)
        if strategy == "spacing":
            logger.warning(
                "strategy='regime' chose 'spacing' for k=%d > switch=%d of %d removable layers: spacing won on the "
                "testbed after a heal, but on real SmolLM2 without a heal 'rank' beat it at every budget "
                "(docs/benchmarks.md); heal (distil) after removing the layers, or pass strategy='rank'",
                k, switch, m,
            )
    if strategy == "rank":
        picks = torch.sort(-region, stable=True).indices[:k].tolist()
    elif strategy == "consecutive":
        runs = [float(region[i : i + k].mean()) for i in range(m - k + 1)]
        start = _best_run(runs, higher=True)
        picks = list(range(start, start + k))
    else:
        if isinstance(evenness, bool) or not isinstance(evenness, (int, float)) or not evenness >= 0:
            raise VLPruneError(f"evenness must be a number >= 0, got {evenness!r}")
        span = float(region.max() - region.min())
        normed = (region - region.min()) / span if span > 0 else torch.zeros_like(region)
        if k <= (m + 1) // 2:
            picks = _spacing(normed, k, float(evenness))
        else:
            spread = _spread(normed, k, float(evenness))
            if spread is None:
                raise VLPruneError(
                    f"spacing: {k} of {m} removable layers cannot be non-adjacent (at most {(m + 1) // 2}), and "
                    f"the {math.comb(m, k)} sets with the shortest runs are too many to search; lower k or use "
                    "strategy='rank'"
                )
            picks = spread
    return sorted(lo + p for p in picks)


def _regime_switch(value: int | float | None, m: int) -> int:
    if value is None:
        value = DEFAULT_REGIME_SWITCH
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise VLPruneError(
            f"regime_switch must be an int k >= 0 or a float fraction of the removable layers, got {value!r}"
        )
    return int(value) if isinstance(value, int) else int(math.floor(float(value) * m))


def select_run(
    run_scores: torch.Tensor | Sequence[float],
    k: int,
    protect_first: int = 1,
    protect_last: int = 1,
    *,
    higher_is_removable: bool = False,
) -> list[int]:
    """The run of ``k`` consecutive layers to remove from per-run scores (Gromov et al.).

    Args:
        run_scores: entry ``l`` scores removing layers ``l .. l + k - 1``, e.g.
            ``angular_distance(model, batches, n=k)`` (length ``L - k + 1``).
        k: run length (the ``n`` the scores were computed with).
        protect_first, protect_last: as in :func:`select_layers`; runs touching them are skipped.
        higher_is_removable: False (default) for distances: the smallest distance is removed.

    Returns:
        ``[l*, ..., l* + k - 1]`` for the best allowed start ``l*`` (ties: the lower start).

    Raises:
        VLPruneError: bad ``k`` or protection, or no run fits between the protected layers.
        DataError: scores not 1-D or with NaN / Inf.

    Example:
        >>> select_run(torch.tensor([0.1, 0.3, 0.2, 0.4]), k=2)   # 5 layers; runs may start at 1 or 2
        [2, 3]
    """
    s = _check_scores(run_scores, "run_scores")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VLPruneError(f"k (the run length) must be an integer >= 1, got {k!r}")
    n = s.numel() + k - 1
    lo, hi = _region(n, protect_first, protect_last)
    _check_k(k, hi - lo, n, protect_first, protect_last)
    starts = list(range(lo, hi - k + 1))
    start = starts[_best_run([float(s[i]) for i in starts], higher=higher_is_removable)]
    return list(range(start, start + k))
