"""TwoNN of rows that do not fit the memory budget, read column block by column block.

When one module's rows alone outgrow ``max_memory_mb`` (e.g. 2000 samples of a ViT-L layer's
``"flatten"`` output, 577 x 1024 values each: 4.7 GB), :func:`vlprune.plugins.intrinsic_dim.estimate_ids`
computes its estimate from the stored rows without loading them (:class:`~vlprune.plugins.id_storage.SpillingRows`
reads any column block from RAM or disk):

1. one pass over column blocks accumulates, in float64, the Gram matrix of the centred rows
   (each block centred by its own column means, which is the centring of the whole rows), the
   squared norms, and two random projections per row (a hash for exact duplicates);
2. the ``4`` nearest candidates of every row are read off ``|x|^2 + |y|^2 - 2 x.y`` (N x N,
   float64: 32 MB for N = 2000);
3. a second pass recomputes the distances of these candidate pairs exactly in float64 from the
   rows, as :func:`~vlprune.plugins.intrinsic_dim.nearest_neighbour_distances` does, so the two
   nearest distances carry no cancellation error;
4. exact duplicate rows (a zero distance) are collapsed to their first copy, as in
   :func:`~vlprune.plugins.intrinsic_dim.twonn`, and the search repeats on the distinct rows.

RAM: the N x N Gram matrix and one column block (its width chosen from the budget); the result
equals the in-memory estimate up to float64 rounding (tested against it).

Example:
    >>> from vlprune.plugins.id_streamed import streamed_twonn
    >>> value, n_distinct = streamed_twonn(store["fc1"], 0.1, "linear", budget_bytes=256 * 2**20)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from vlprune.errors import DataError
from vlprune.plugins.id_storage import SpillingRows

__all__ = ["streamed_twonn", "CANDIDATES"]

logger = logging.getLogger(__name__)

#: nearest candidates per row whose distances are recomputed exactly
CANDIDATES = 4


#: fewest columns per block (below, the passes would cost more in Python than in arithmetic)
MIN_COLUMNS = 64


def _column_width(n_rows: int, width: int, bytes_per_column: int, budget_bytes: int) -> int:
    """Columns per block so that a block's temporaries stay within what the budget leaves
    after the N x N float64 Gram matrix and its distance copy (at least :data:`MIN_COLUMNS`)."""
    free = max(budget_bytes - 3 * n_rows * n_rows * 8, 0)
    return max(1, min(width, max(MIN_COLUMNS, free // max(1, n_rows * bytes_per_column))))


def _blocks(width: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(width, start + step)) for start in range(0, width, step)]


def _gram_pass(rows: SpillingRows, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram matrix and squared norms of the centred rows, and duplicate hashes (all float64)."""
    n, width = rows.rows, rows.width
    gram = torch.zeros(n, n, dtype=torch.float64)
    sq = torch.zeros(n, dtype=torch.float64)
    keys = torch.zeros(n, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for start, stop in _blocks(width, step):
        block = rows.column_block(start, stop).double()
        keys += block @ torch.randn(stop - start, 2, generator=g, dtype=torch.float64)
        block -= block.mean(dim=0)
        gram.addmm_(block, block.T)
        sq += block.pow(2).sum(dim=1)
    return gram, sq, keys


def _candidates(gram: torch.Tensor, sq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The CANDIDATES nearest rows (indices into ``keep``) of every kept row."""
    d2 = sq[keep, None] + sq[None, keep] - 2.0 * gram[keep][:, keep]
    d2.fill_diagonal_(math.inf)
    m = min(CANDIDATES, keep.numel() - 1)
    return torch.topk(d2, m, dim=1, largest=False).indices


def _exact_pass(rows: SpillingRows, keep: torch.Tensor, cand: torch.Tensor, step: int) -> torch.Tensor:
    """Exact float64 distances of every kept row to its candidates (positions in ``keep``), sorted."""
    acc = torch.zeros(cand.shape, dtype=torch.float64)
    for start, stop in _blocks(rows.width, step):
        block = rows.column_block(start, stop)[keep].double()
        for j in range(cand.shape[1]):
            acc[:, j] += (block - block[cand[:, j]]).pow(2).sum(dim=1)
    return torch.sort(acc.sqrt(), dim=1).values


def _first_copies(rows: SpillingRows, keys: torch.Tensor, step: int) -> torch.Tensor:
    """Indices of the first copy of every distinct row. Rows with equal hashes are compared
    exactly with the first pending row of their group, one pass per round (one round unless
    different rows share a hash)."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, key in enumerate(keys.tolist()):
        groups.setdefault((key[0], key[1]), []).append(i)
    pending: list[list[int]] = [members for members in groups.values() if len(members) > 1]
    dropped: set[int] = set()
    while pending:
        heads = torch.tensor([g[0] for g in pending for _ in g[1:]])
        others = torch.tensor([i for g in pending for i in g[1:]])
        equal = torch.ones(others.numel(), dtype=torch.bool)
        for start, stop in _blocks(rows.width, step):
            block = rows.column_block(start, stop)
            equal &= (block[others] == block[heads]).all(dim=1)
        flags = iter(equal.tolist())
        still: list[list[int]] = []
        for g in pending:
            rest = [i for i in g[1:] if not next(flags)]
            dropped.update(i for i in g[1:] if i not in rest)
            if len(rest) > 1:
                still.append(rest)
        pending = still
    return torch.tensor([i for i in range(rows.rows) if i not in dropped])


def streamed_twonn(
    rows: SpillingRows,
    discard_fraction: float,
    method: Literal["linear", "mle"],
    budget_bytes: int,
) -> tuple[float, int]:
    """TwoNN of a module's stored rows within ``budget_bytes`` of RAM.

    Args:
        rows: the module's stored rows (in RAM and/or on disk).
        discard_fraction: as :func:`~vlprune.plugins.intrinsic_dim.twonn`.
        method: ``"linear"`` or ``"mle"``.
        budget_bytes: RAM for the Gram matrix and a column block.

    Returns:
        (the estimate, the number of distinct rows used).

    Raises:
        DataError: fewer than 3 distinct rows, or a degenerate fit.
    """
    from vlprune.plugins.intrinsic_dim import _fit  # the shared fit (intrinsic_dim imports this module)

    n, width = rows.rows, rows.width
    if n < 3:
        raise DataError(f"TwoNN needs at least 3 distinct points, got {n} rows; give more calibration samples")
    # float64 blocks: the block, its centred copy and a product temporary
    step = _column_width(n, width, 3 * 8, budget_bytes)
    gram, sq, keys = _gram_pass(rows, step)
    keep = torch.arange(n)
    exact_step = _column_width(n, width, (CANDIDATES + 3) * 8, budget_bytes)
    r = _exact_pass(rows, keep, _candidates(gram, sq, keep), exact_step)
    if bool((r[:, 0] == 0).any()):
        keep = _first_copies(rows, keys, step)
        logger.info("streamed twonn: dropped %d duplicate row(s) of %d", n - keep.numel(), n)
        if keep.numel() < 3:
            raise DataError(
                f"TwoNN needs at least 3 distinct points, got {keep.numel()} (of {n} rows); give more calibration samples"
            )
        r = _exact_pass(rows, keep, _candidates(gram, sq, keep), exact_step)
    mu = r[:, 1] / r[:, 0]
    return _fit(mu, discard_fraction, method), int(keep.numel())
