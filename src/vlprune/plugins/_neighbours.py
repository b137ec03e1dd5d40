"""Exact k-nearest-neighbour distances at float32 GEMM speed (the kernel behind TwoNN).

The float32 products ``y_i . y_j`` of the centred rows are computed once per pair, by square
blocks over the upper triangle (the distance matrix is symmetric, so this is half of a plain
``cdist``'s GEMM), keeping a running top-``(k+1)`` per row. Only ``k`` distances per point are
then recomputed in float64 from the original rows, and a point is searched again only when the
float32 margin between its ``k``-th and ``(k+1)``-th neighbour is smaller than a rigorous bound
on the float32 error. The result is the float64 distance to the true ``k`` nearest other rows
(ties aside, where either choice gives the same distance).

Error bound (why the re-check is exact). The rows are shifted by a constant vector ``m`` (the
mean, which does not change any distance) and rounded: ``y_i = fl(x_i - m)`` in the search
dtype (unit roundoff ``u``). With ``n_i = |y_i|``, ``s_i = n_i^2``, the block computed as
``w_ij = fl(y_i.y_j - s_j / 2)`` by one GEMM (and, for the transposed direction, two more
rounded updates ``+ s_j / 2 - s_i / 2``) and ``v_ij = -2 w_ij`` (the squared distance minus
``s_i``), the standard dot-product bound ``|fl(a.b) - a.b| <= gamma_D |a||b|``
(``gamma_D = D u / (1 - D u)``, any summation order), the rounding of ``s``, of the updates and
of ``y`` itself give

    | v_ij + s_i - |x_i - x_j|^2 | <= c (n_i + n_j)^2,   c = 1.01 (gamma_D + 2 u_in + 12 u)

(``u_in`` is the input rounding of a reduced-precision matmul mode, TF32 / BF16, 0 by default).
A point whose exactly recomputed ``k``-th distance is below the lower bound of its
``(k+1)``-th float32 candidate is certified; otherwise every row ``j`` with a lower bound under
that distance is recomputed exactly. When ``c`` is too large for the bound to say anything
(``D`` near a million in float32, or a reduced-precision mode), the search runs in float64.

Example:
    >>> import torch
    >>> from vlprune.plugins._neighbours import knn_distances
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    >>> knn_distances(x, 2)[0].tolist()
    [1.0, 3.0]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vlprune.errors import DataError

__all__ = ["NeighbourStats", "knn_distances", "centred_copy"]

logger = logging.getLogger(__name__)

#: side of the square float32 product blocks: 512 x 512 = 1 MB, large enough for full GEMM speed
DEFAULT_SIDE = 512
#: elements of the float64 (rows x N) temporaries of a re-check: 1M = 8 MB
BLOCK_ELEMENTS = 1024 * 1024
#: elements of one float64 temporary of the exact re-computation: 24K = 192 KB, cache-sized and
#: under torch's parallel grain (32K), so these many small steps never wait on a thread barrier
EXACT_ELEMENTS = 24 * 1024
#: above this error constant the float32 bound cannot certify anything useful: search in float64
_MAX_C = 0.01


@dataclass
class NeighbourStats:
    """What the search did (for tests and logs).

    Attributes:
        rows: number of points.
        search_dtype: dtype of the candidate GEMM.
        error_constant: ``c`` of the bound ``c (n_i + n_j)^2`` on the squared-distance error.
        rechecked: points whose float32 margin was ambiguous and that were searched again.
        recheck_pairs: exact distances computed for those points.
    """

    rows: int = 0
    search_dtype: torch.dtype = torch.float32
    error_constant: float = 0.0
    rechecked: int = 0
    recheck_pairs: int = 0


_PRECISION_UNIT = {"ieee": 0.0, "none": 0.0, "highest": 0.0, "tf32": 2.0**-11, "high": 2.0**-11, "bf16": 2.0**-8, "medium": 2.0**-8}


def _matmul_input_rounding(device: torch.device) -> float:
    """Unit roundoff applied to float32 GEMM inputs by the current precision settings (0: IEEE)."""
    modes = [torch.get_float32_matmul_precision()]
    try:
        if device.type == "cuda":
            modes.append(torch.backends.cuda.matmul.fp32_precision)
            if torch.backends.cuda.matmul.allow_tf32:
                modes.append("tf32")
        else:
            modes.append(torch.backends.mkldnn.matmul.fp32_precision)
    except AttributeError:  # older torch: only the global setting exists
        pass
    return max(_PRECISION_UNIT.get(str(mode), 2.0**-8) for mode in modes)


def _error_constant(dim: int, dtype: torch.dtype, device: torch.device) -> float:
    u = torch.finfo(dtype).eps / 2
    u_in = _matmul_input_rounding(device) if dtype == torch.float32 else 0.0
    if dim * u >= 0.5:
        return float("inf")
    gamma = dim * u / (1 - dim * u)
    return 1.01 * (gamma + 2 * u_in + u_in * u_in + 12 * u)


def centred_copy(x: torch.Tensor, dtype: torch.dtype = torch.float32, rows_per_chunk: int | None = None) -> torch.Tensor:
    """``x`` minus its column mean, in ``dtype``, built without a float64 copy of ``x``.

    The mean is accumulated in float64 and subtracted in ``x``'s precision (float64 input) or in
    ``dtype`` (narrower input): any constant shift leaves the distances unchanged, so only the
    rounding of the result (relative ``u`` per coordinate) enters the error bound.

    Args:
        x: (N, D) float tensor.
        dtype: dtype of the copy.
        rows_per_chunk: rows converted at a time (float64 input only; bounds the temporary).

    Returns:
        (N, D) tensor of ``dtype`` on ``x``'s device.

    Raises:
        DataError: NaN or Inf in ``x`` (found from the column sums, without a separate pass).
    """
    mean = x.sum(dim=0, dtype=torch.float64) / x.shape[0]
    if not bool(torch.isfinite(mean).all()):  # a NaN / Inf entry makes its column sum NaN / Inf
        if bool(torch.isfinite(x).all()):
            raise DataError("the data are too large for float64 sums (|x| ~ 1e308); rescale them")
        raise DataError("the data contain NaN or Inf values; the intrinsic dimension is undefined")
    if x.dtype == torch.float64 and dtype != torch.float64:  # subtract in float64, then round once
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        step = rows_per_chunk or max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):
            out[start : start + step] = x[start : start + step] - mean
        return out
    if x.dtype == dtype:
        return torch.sub(x, mean.to(dtype))
    return x.to(dtype).sub_(mean.to(dtype))


def _exact_distances(x: torch.Tensor, rows: torch.Tensor | slice, cols: torch.Tensor) -> torch.Tensor:
    """float64 ``|x[rows][a] - x[cols[a, b]]|`` from the original rows (direct differences).

    ``rows`` is a slice (a contiguous run of rows) or an index tensor. ``index_select`` and
    sub-grain blocks keep every step free of thread-pool barriers (many small steps)."""
    count, width = cols.shape
    out = torch.empty(count, width, dtype=torch.float64, device=x.device)
    per_block = max(1, EXACT_ELEMENTS // max(1, width * x.shape[1]))
    for a in range(0, count, per_block):
        b = min(count, a + per_block)
        diff = x.index_select(0, cols[a:b].reshape(-1)).to(torch.float64).view(b - a, width, -1)
        if isinstance(rows, slice):
            own = x[rows.start + a : rows.start + b]
        else:
            own = x.index_select(0, rows[a:b])
        diff.sub_(own.to(torch.float64)[:, None, :])
        out[a:b] = torch.linalg.vector_norm(diff, dim=-1)
    return out


def knn_distances(
    x: torch.Tensor, k: int = 2, *, chunk_size: int | None = None, stats: NeighbourStats | None = None
) -> torch.Tensor:
    """Exact distances of every row of ``x`` to its ``k`` nearest other rows.

    The float32 product is computed by square blocks over the upper triangle only (the distance
    matrix is symmetric): each block serves its rows and, transposed, its columns, so the search
    costs about half of a plain ``cdist``'s ``N x N x D`` GEMM. A running top-``(k+1)`` per row
    is kept; then ``k`` distances per row are recomputed in float64 and ambiguous rows re-checked.

    Args:
        x: (N, D) float tensor (any float dtype, any device), N >= k + 1. Not modified.
        k: number of neighbours.
        chunk_size: side of the square GEMM blocks (default 512: a 1 MB float32 block).
        stats: filled in with what the search did, if given.

    Returns:
        (N, k) float64 distances, ascending along dim 1, each the float64 value of
        ``|x_i - x_j|`` computed from direct differences.

    Raises:
        DataError: NaN or Inf in ``x``.

    Example:
        >>> knn_distances(torch.tensor([[0.0], [1.0], [3.0]]), 1).flatten().tolist()
        [1.0, 1.0, 2.0]
    """
    n, dim = x.shape
    stats = stats if stats is not None else NeighbourStats()
    search = torch.float32
    const = _error_constant(dim, search, x.device)
    if const > _MAX_C:
        search = torch.float64
        const = _error_constant(dim, search, x.device)
    stats.rows, stats.search_dtype, stats.error_constant = n, search, const
    y = centred_copy(x, search)
    s = torch.linalg.vector_norm(y, dim=1, dtype=torch.float64).square_()
    norms = s.sqrt()
    n_max = float(norms.max())
    half = (s / 2).to(search)
    m = k + 1  # k candidates to recompute, the (k+1)-th certifies them
    side = max(1, min(n, chunk_size or DEFAULT_SIDE))
    # running best per row of w_ij = y_i.y_j - s_j / 2 = (s_i - |y_i - y_j|^2) / 2: largest = nearest
    best = torch.full((n, m), float("-inf"), dtype=search, device=x.device)
    best_idx = torch.full((n, m), -1, dtype=torch.long, device=x.device)
    buffer = torch.empty(side, side, dtype=search, device=x.device)
    for a0 in range(0, n, side):
        a1 = min(n, a0 + side)
        for b0 in range(a0, n, side):
            b1 = min(n, b0 + side)
            block = buffer[: a1 - a0, : b1 - b0]
            torch.addmm(half[b0:b1].expand(a1 - a0, b1 - b0), y[a0:a1], y[b0:b1].T, beta=-1.0, out=block)
            if a0 == b0:
                block.diagonal().fill_(float("-inf"))
            values, idx = torch.topk(block, min(m, b1 - b0), dim=1)
            _merge(best, best_idx, a0, a1, values, idx + b0)
            if a0 != b0:  # the same block, seen from its columns: w_ji = y_i.y_j - s_i / 2
                block.add_(half[None, b0:b1]).sub_(half[a0:a1, None])
                values, idx = torch.topk(block, min(m, a1 - a0), dim=0)
                _merge(best, best_idx, b0, b1, values.T, idx.T + a0)
    exact = torch.sort(_exact_distances(x, slice(0, n), best_idx[:, :k]), dim=1).values
    kth = exact[:, k - 1].square()
    lower = s - 2 * best[:, k].to(torch.float64) - const * (norms + n_max).square()
    ambiguous = (kth > lower).nonzero().flatten()
    if ambiguous.numel():
        exact[ambiguous] = _recheck(x, y, ambiguous, best_idx[ambiguous, :k], kth[ambiguous], s, norms, const, k, stats)
    logger.debug(
        "knn_distances: %d points, %s search, %d re-checked (%d exact pairs)",
        n, search, stats.rechecked, stats.recheck_pairs,
    )
    return exact


def _merge(best: torch.Tensor, best_idx: torch.Tensor, r0: int, r1: int, values: torch.Tensor, idx: torch.Tensor) -> None:
    """Fold a block's top candidates of rows ``r0:r1`` into the running best (largest ``w``)."""
    both = torch.cat([best[r0:r1], values], dim=1)
    both_idx = torch.cat([best_idx[r0:r1], idx], dim=1)
    top, pos = torch.topk(both, best.shape[1], dim=1)
    best[r0:r1] = top
    best_idx[r0:r1] = both_idx.gather(1, pos)


def _recheck(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    first: torch.Tensor,
    kth: torch.Tensor,
    s: torch.Tensor,
    norms: torch.Tensor,
    const: float,
    k: int,
    stats: NeighbourStats,
) -> torch.Tensor:
    """Exact ``k`` nearest distances of the ambiguous ``rows``: their product rows are formed
    again, and every row ``j`` whose per-pair lower bound ``v_ij + s_i - c (n_i + n_j)^2`` is at
    most the current ``k``-th squared distance is recomputed exactly."""
    n = y.shape[0]
    s_search = s.to(y.dtype)
    out = torch.empty(rows.numel(), k, dtype=torch.float64, device=x.device)
    per = max(1, BLOCK_ELEMENTS // (2 * n))
    for a in range(0, rows.numel(), per):
        idx = rows[a : a + per]
        here = torch.arange(idx.numel(), device=x.device)
        v = torch.addmm(s_search.expand(idx.numel(), n), y.index_select(0, idx), y.T, alpha=-2.0)  # s_j - 2 y_i.y_j
        bound = v.to(torch.float64) + s[idx, None] - const * (norms[idx, None] + norms[None, :]).square()
        bound[here, idx] = float("inf")
        keep = bound <= kth[a : a + per, None]
        keep.scatter_(1, first[a : a + per], True)  # the first candidates always stay in the set
        width = int(keep.sum(dim=1).max())
        picked = torch.topk(bound.masked_fill_(~keep, float("inf")), width, dim=1, largest=False).indices
        valid = keep.gather(1, picked)
        dist = _exact_distances(x, idx, picked).masked_fill_(~valid, float("inf"))
        out[a : a + per] = torch.topk(dist, k, dim=1, largest=False, sorted=True).values
        stats.rechecked += idx.numel()
        stats.recheck_pairs += int(valid.sum())
    return out
