"""Exact k-nearest-neighbour distances at float32 GEMM speed (the kernel behind TwoNN).

The float32 products of the centred rows are computed once per pair: one GEMM per block of rows
``I`` against the columns ``j >= I`` (the distance matrix is symmetric, so 58% to 67% of a plain
``cdist``'s GEMM), each block serving its rows (top-k along rows) and its columns (top-k along
columns), with a running top-``(k+1)`` per row. Only ``k`` distances per point are then
recomputed in float64 from the original rows, and a point is searched again only when the
float32 margin between its ``k``-th and ``(k+1)``-th neighbour is smaller than a rigorous bound
on the float32 error. The result is the float64 distance to the true ``k`` nearest other rows
(ties aside, where either choice gives the same distance).

Error bound (why the re-check is exact). The rows are shifted by a constant vector ``m`` (the
mean, which does not change any distance) and rounded: ``y_i = fl(x_i - m)`` in the search
dtype (unit roundoff ``u``). With ``n_i = |y_i|`` and ``s_i = n_i^2`` (float64), one GEMM of the
augmented rows ``[y_i, -s_i/2, 1]`` and ``[y_j, 1, -s_j/2]`` gives
``z_ij = fl(y_i.y_j - s_i/2 - s_j/2)``, i.e. ``-|y_i - y_j|^2 / 2`` up to rounding. The
dot-product bound ``|fl(a.b) - a.b| <= gamma_{D+2} |a||b|`` (``gamma_n = n u / (1 - n u)``, any
summation order), the rounding of ``s / 2`` and of ``y`` itself give

    | -2 z_ij - |x_i - x_j|^2 | <= c (n_i + n_j)^2,   c = 1.01 (gamma_{D+2} + 2 u_in + 12 u)

(``u_in`` is the input rounding of a reduced-precision matmul mode, TF32 / BF16, 0 by default).
A point whose exactly recomputed ``k``-th squared distance is at most the lower bound
``-2 z - c (n_i + n_max)^2`` of its ``(k+1)``-th candidate (and so of every row not among its
candidates) is certified; otherwise every row ``j`` with ``-2 z_ij - c (n_i + n_j)^2`` under that
distance is recomputed exactly. When ``c`` is too large for the bound to say anything (``D``
near a million in float32, or a reduced-precision mode), the search runs in float64.

Few, wide rows (the ``flatten`` representation: N = 8..512, D = 12k..600k) take another path,
chosen by cost (:func:`uses_gram_path`): the float64 Gram matrix of the shifted rows, accumulated
over large column blocks (``3/4 N^2 D`` float64 work, no copy of the data), gives every squared
distance up to ``c (n_i + n_j)^2`` with the float64 ``c`` (7e-11 at D = 600k). A candidate whose
Gram value this bound certifies to ``GRAM_RELATIVE_TOLERANCE`` (1e-8, below the float32 rounding
of the activations) keeps it; the others (points closer than the bound resolves, copies) get
their exact distance from direct float64 differences in a second pass over column blocks.
Contract: the distances to the true ``k`` nearest rows, each within 5e-9 relative of the float64
value (in practice ~1e-14: the bound is a worst case), exact duplicates at exactly 0.

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

__all__ = ["NeighbourStats", "knn_distances", "gram_knn_parts", "centred_copy", "working_bytes", "uses_gram_path"]

logger = logging.getLogger(__name__)

#: fewest rows per product block (smaller blocks lose GEMM speed)
MIN_ROWS = 256
#: elements of the float64 (rows x N) temporaries of a re-check (1M = 8 MB); 4x this is the
#: float32 product block
BLOCK_ELEMENTS = 1024 * 1024
#: elements of one float64 temporary of the exact re-computation: 24K = 192 KB, cache-sized and
#: under torch's parallel grain (32K), so these many small steps never wait on a thread barrier
EXACT_ELEMENTS = 24 * 1024
#: above this error constant the float32 bound cannot certify anything useful: search in float64
_MAX_C = 0.01
#: float64 values of one column block of the Gram path (8 MB: the conversion writes into cache and
#: the GEMM reads it there; 32 MB blocks made the whole path 1.7x slower at N=256, D=98k)
WIDE_ELEMENTS = 1024 * 1024
#: most rows for the Gram path (its few N x N float64 matrices stay under 40 MB each)
GRAM_MAX_ROWS = 2048
#: per-value cost of the search path's passes (augmented copies, float64 recomputation), in
#: float32 GEMM multiply-adds, plus ``D / SEARCH_DIM_SCALE`` (its float32 bound widens with ``D``,
#: so more margins are re-checked); fitted to side-by-side timings, see :func:`uses_gram_path`
SEARCH_PASS_COST = 100.0
SEARCH_DIM_SCALE = 36.0
#: per-value cost of the Gram path's float64 column-block pass, same unit
GRAM_PASS_COST = 20.0
#: pairs whose exact distances the Gram path computes per pass over the data (bounds memory when
#: many margins are ambiguous, e.g. many copies of one row)
GRAM_PAIR_CHUNK = 4096
#: relative error of a squared distance below which the Gram path uses the Gram value itself
#: (certified by the float64 bound) instead of recomputing it from the rows: 1e-8 is below the
#: float32 rounding (6e-8) of the activations it is computed from
GRAM_RELATIVE_TOLERANCE = 1e-8
#: rows whose mean shifts the data on the Gram path (a shift near the data's centre keeps the
#: bound tight; taking it from a few rows costs no pass over the data)
GRAM_SHIFT_ROWS = 16


@dataclass
class NeighbourStats:
    """What the search did (for tests and logs).

    Attributes:
        rows: number of points.
        search_dtype: dtype of the candidate GEMM.
        error_constant: ``c`` of the bound ``c (n_i + n_j)^2`` on the squared-distance error.
        rechecked: points whose float32 margin was ambiguous and that were searched again.
        recheck_pairs: exact distances computed for those points (on the ``"gram"`` path: every
            exact distance computed, the ``k`` per point included).
        path: ``"search"`` (float32 or float64 GEMM search by row blocks) or ``"gram"`` (few wide
            rows: float64 Gram matrix over column blocks, see :func:`uses_gram_path`).
    """

    rows: int = 0
    search_dtype: torch.dtype = torch.float32
    error_constant: float = 0.0
    rechecked: int = 0
    recheck_pairs: int = 0
    path: str = "search"


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


def centred_copy(
    x: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    rows_per_chunk: int | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` minus its column mean, in ``dtype``, built without a float64 copy of ``x``.

    The mean is accumulated in float64 and subtracted in ``x``'s precision (float64 input) or in
    ``dtype`` (narrower input): any constant shift leaves the distances unchanged, so only the
    rounding of the result (relative ``u`` per coordinate) enters the error bound.

    Args:
        x: (N, D) float tensor.
        dtype: dtype of the copy.
        rows_per_chunk: rows converted at a time (float64 input only; bounds the temporary).
        out: (N, D) tensor of ``dtype`` to write into (e.g. a view of a wider buffer).

    Returns:
        (N, D) tensor of ``dtype`` on ``x``'s device (``out`` when given).

    Raises:
        DataError: NaN or Inf in ``x`` (found from the column sums, without a separate pass).
    """
    mean = x.sum(dim=0, dtype=torch.float64) / x.shape[0]
    if not bool(torch.isfinite(mean).all()):  # a NaN / Inf entry makes its column sum NaN / Inf
        if bool(torch.isfinite(x).all()):
            raise DataError("the data are too large for float64 sums (|x| ~ 1e308); rescale them")
        raise DataError("the data contain NaN or Inf values; the intrinsic dimension is undefined")
    if out is None:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.dtype == torch.float64 and dtype != torch.float64:  # subtract in float64, then round once
        step = rows_per_chunk or max(1, BLOCK_ELEMENTS // max(1, x.shape[1]))
        for start in range(0, x.shape[0], step):
            out[start : start + step] = x[start : start + step] - mean
        return out
    if x.dtype == dtype:
        return torch.sub(x, mean.to(dtype), out=out)
    out.copy_(x)  # exact: a wider float type
    return out.sub_(mean.to(dtype))


def _exact_distances(x: torch.Tensor, rows: torch.Tensor | slice, cols: torch.Tensor) -> torch.Tensor:
    """float64 ``|x[rows][a] - x[cols[a, b]]|`` from the original rows (direct differences).

    ``rows`` is a slice (a contiguous run of rows) or an index tensor. On CPU, ``index_select``
    and sub-grain blocks keep every step free of thread-pool barriers (many small steps); on a
    GPU the blocks are 64x larger (fewer kernel launches). When one row's slab is already above
    the grain (wide rows), a block holds about ``BLOCK_ELEMENTS`` values (many rows per call)."""
    count, width = cols.shape
    out = torch.empty(count, width, dtype=torch.float64, device=x.device)
    per_block = max(1, _exact_limit(width * x.shape[1], x.device) // max(1, width * x.shape[1]))
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


def _exact_limit(slab: int, device: torch.device | str) -> int:
    """Values per float64 temporary of :func:`_exact_distances` for a per-row slab of ``slab``."""
    limit = EXACT_ELEMENTS if slab <= EXACT_ELEMENTS else BLOCK_ELEMENTS
    return limit if torch.device(device).type == "cpu" else 64 * limit


def working_bytes(n: int, dim: int, k: int = 2, *, threads: int = 1, device: str = "cpu") -> int:
    """Memory :func:`knn_distances` needs beyond its input, for budgeting (the path it takes).

    Search path: the two augmented centred copies (``2 N (D + 2)`` float32), the product block
    (under 16 MB), the float64 re-check rows (~6.5 MB), the float64 difference blocks (at least
    one row's ``(k + 1) D`` values) and small per-row arrays. Gram path (few wide rows, see
    :func:`uses_gram_path`): no copy of the data, only one float64 column block of about
    ``WIDE_ELEMENTS`` values, the pair-difference blocks (about ``BLOCK_ELEMENTS`` values), a few
    ``N x N`` float64 matrices and the pair list. Both plus 25% and 8 MB for BLAS packing buffers and allocator
    slack (measured: 176 MB of peak RSS growth at N=5000, D=3072 against 141 MB of tensors;
    19 MB at N=2000, D=768 against 22 MB).

    Args:
        n: rows.
        dim: values per row.
        k: neighbours.
        threads: torch threads (the block is larger on several threads).
        device: ``"cpu"`` or ``"cuda"`` (larger float64 blocks on a GPU).

    Returns:
        Bytes (``x`` itself not included).

    Example:
        >>> round(working_bytes(5000, 3072) / 2**20)
        184
    """
    if uses_gram_path(n, dim, device):
        pairs = min(n * (n - 1) // 2, GRAM_PAIR_CHUNK)
        column = 8 * min(n * dim, max(n * 64, WIDE_ELEMENTS))  # one float64 column block
        steps = 3 * 8 * BLOCK_ELEMENTS  # pass-2 blocks: gathered rows and their float64 differences
        square = 9 * 8 * n * n  # Gram / d2, slack, upper, lower, masks, values, pair indices
        return int(1.25 * (column + steps + square + 3 * 8 * pairs)) + 8 * 2**20
    copies = 2 * n * (dim + 2) * 4
    blocks = 6 if threads == 1 else 3
    rows = max(1, min(n, max(MIN_ROWS, -(-n // blocks)), max(1, 4 * BLOCK_ELEMENTS // n)))
    block = rows * n * 4 + 2 * rows * (k + 1) * 12  # the product block and its two top-k results
    recheck = 13 * (BLOCK_ELEMENTS // 2) + 13 * n  # float32 z, float64 bound, bool mask rows
    per_row = n * (4 * 8 + (k + 1) * 12 + k * 8)  # norms, running best, exact distances
    slab = (k + 1) * dim  # float64 difference blocks: at least one row's candidates
    exact = 3 * 8 * max(slab, _exact_limit(slab, device))
    return int(1.25 * (copies + block + recheck + per_row + exact)) + 8 * 2**20


def _row_block(n: int, chunk_size: int | None) -> int:
    """Rows per product block. ``B`` blocks cost ``1/2 + 1/(2B)`` of the full GEMM and ``3B``
    thread-pool regions: ``B = 6`` on one thread, ``B = 3`` on several (each region ends in a
    barrier, which costs milliseconds when other processes share the cores); at least 256 rows,
    and the (rows x N) float32 block under 16 MB."""
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    blocks = 6 if torch.get_num_threads() == 1 else 3
    return max(1, min(n, max(MIN_ROWS, -(-n // blocks)), max(1, 4 * BLOCK_ELEMENTS // n)))


def knn_distances(
    x: torch.Tensor, k: int = 2, *, chunk_size: int | None = None, stats: NeighbourStats | None = None
) -> torch.Tensor:
    """Exact distances of every row of ``x`` to its ``k`` nearest other rows.

    One float32 GEMM per row block ``I`` gives ``z_ij = y_i.y_j - s_i / 2 - s_j / 2``
    (``= -|y_i - y_j|^2 / 2``, through two augmented columns) for the columns ``j >= I``
    only: the matrix is symmetric, so each block serves its rows (top-k along rows) and its
    columns (top-k along columns), 58% to 67% of a plain ``cdist``'s GEMM, with three
    thread-pool regions per block. A running top-``(k+1)`` per row is kept; then ``k``
    distances per row are recomputed in float64 and ambiguous rows re-checked. Few wide rows
    (:func:`uses_gram_path`) use a float64 Gram matrix over column blocks instead (see
    :func:`_gram_knn`); ``chunk_size`` does not apply there.

    Args:
        x: (N, D) float tensor (any float dtype, any device), N >= k + 1. Not modified.
        k: number of neighbours.
        chunk_size: rows per product block (default: about N / 6 on one thread, N / 3 on
            several, at least 256, the block under 16 MB).
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
    if uses_gram_path(n, dim, x.device):
        return _gram_knn(x, k, stats)
    search = torch.float32
    const = _error_constant(dim + 2, search, x.device)
    if const > _MAX_C:
        search = torch.float64
        const = _error_constant(dim + 2, search, x.device)
    stats.rows, stats.search_dtype, stats.error_constant = n, search, const
    left, right, s = _augmented(x, search)
    norms = s.sqrt()
    n_max = float(norms.max())
    m = k + 1  # k candidates to recompute, the (k+1)-th certifies them
    rows = _row_block(n, chunk_size)
    # running best per row of z_ij = -|y_i - y_j|^2 / 2: largest = nearest
    best = torch.full((n, m), float("-inf"), dtype=search, device=x.device)
    best_idx = torch.full((n, m), -1, dtype=torch.long, device=x.device)
    for a0 in range(0, n, rows):
        a1 = min(n, a0 + rows)
        block = left[a0:a1] @ right[a0:].T  # rows a0:a1, columns a0:n
        block[:, : a1 - a0].fill_diagonal_(float("-inf"))
        values, idx = torch.topk(block, min(m, n - a0), dim=1)
        _merge(best, best_idx, a0, a1, values, idx + a0)
        if a1 < n:  # the same products seen from the columns a1:n
            values, idx = torch.topk(block[:, a1 - a0 :], min(m, a1 - a0), dim=0)
            _merge(best, best_idx, a1, n, values.T, idx.T + a0)
        del block
    exact = torch.sort(_exact_distances(x, slice(0, n), best_idx[:, :k]), dim=1).values
    kth = exact[:, k - 1].square()
    lower = -2 * best[:, k].to(torch.float64) - const * (norms + n_max).square()
    ambiguous = (kth > lower).nonzero().flatten()
    if ambiguous.numel():
        exact[ambiguous] = _recheck(x, left, right, ambiguous, best_idx[ambiguous, :k], kth[ambiguous], norms, const, k, stats)
    logger.debug(
        "knn_distances: %d points, %s search, %d re-checked (%d exact pairs)",
        n, search, stats.rechecked, stats.recheck_pairs,
    )
    return exact


def _augmented(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``left = [y, -s/2, 1]`` and ``right = [y, 1, -s/2]`` (``y`` the centred rows, ``s`` their
    float64 squared norms, also returned), so that ``left @ right.T = y.y^T - s_i/2 - s_j/2``."""
    n, dim = x.shape
    left = torch.empty(n, dim + 2, dtype=dtype, device=x.device)
    centred_copy(x, dtype, out=left[:, :dim])
    s = torch.linalg.vector_norm(left[:, :dim], dim=1, dtype=torch.float64).square_()
    right = torch.empty_like(left)
    right[:, :dim] = left[:, :dim]
    left[:, dim] = right[:, dim + 1] = (s / -2).to(dtype)
    left[:, dim + 1] = right[:, dim] = 1.0
    return left, right, s


def _merge(best: torch.Tensor, best_idx: torch.Tensor, r0: int, r1: int, values: torch.Tensor, idx: torch.Tensor) -> None:
    """Fold a block's top candidates of rows ``r0:r1`` into the running best (largest ``w``)."""
    both = torch.cat([best[r0:r1], values], dim=1)
    both_idx = torch.cat([best_idx[r0:r1], idx], dim=1)
    top, pos = torch.topk(both, best.shape[1], dim=1)
    best[r0:r1] = top
    best_idx[r0:r1] = both_idx.gather(1, pos)


def _recheck(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    rows: torch.Tensor,
    first: torch.Tensor,
    kth: torch.Tensor,
    norms: torch.Tensor,
    const: float,
    k: int,
    stats: NeighbourStats,
) -> torch.Tensor:
    """Exact ``k`` nearest distances of the ambiguous ``rows``: their product rows are formed
    again, and every row ``j`` whose lower bound ``-2 z_ij - c (n_i + n_j)^2`` on the squared
    distance is at most the current ``k``-th squared distance is recomputed exactly."""
    n = left.shape[0]
    out = torch.empty(rows.numel(), k, dtype=torch.float64, device=x.device)
    per = max(1, BLOCK_ELEMENTS // (2 * n))
    for a in range(0, rows.numel(), per):
        idx = rows[a : a + per]
        here = torch.arange(idx.numel(), device=x.device)
        z = left.index_select(0, idx) @ right.T
        bound = (z.to(torch.float64) * -2).sub_(const * (norms[idx, None] + norms[None, :]).square())
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


def uses_gram_path(n: int, dim: int, device: str | torch.device = "cpu") -> bool:
    """Whether :func:`knn_distances` takes the float64 Gram path (few, wide rows).

    The costs, in units of one float32 multiply-add inside a GEMM: the row-block search costs
    ``0.6 N^2 D`` (``1.2 N^2 D`` when the float32 bound is useless and it searches in float64)
    plus about ``SEARCH_PASS_COST`` per value for its two augmented copies and the float64
    recomputation of ``k`` distances per row; the Gram path costs ``1.5 N^2 D`` (3/4 of a float64
    product, twice the price of float32) plus ``GRAM_PASS_COST`` per value for its pass over the
    data in float64 column blocks. The search's per-value cost grows like
    ``D / SEARCH_DIM_SCALE`` (its float32 bound widens with ``D``: more re-checked rows). Fitted
    to side-by-side timings on 2 CPU cores (docs: twonn_speed; the Gram term was 2 N^2 D before
    the symmetric product): the crossover is near ``N = 110`` at ``D = 768``, ``N = 215`` at
    ``D = 4096``, ``N = 470`` at ``D = 12k``, ``N = 1230`` at ``D = 37k``; beyond ``D ~ 170k`` the
    search would run in float64 and the Gram path is taken up to ``GRAM_MAX_ROWS``. ``N`` is capped
    at ``GRAM_MAX_ROWS`` (its ``N x N`` float64 matrices stay under 40 MB each).

    Args:
        n: rows.
        dim: values per row.
        device: where the data are.

    Returns:
        True for the Gram path.

    Example:
        >>> uses_gram_path(8, 600_000), uses_gram_path(5000, 3072)
        (True, False)
    """
    if n > GRAM_MAX_ROWS:
        return False
    device = torch.device(device)
    search_gemm = 0.6 if _error_constant(dim + 2, torch.float32, device) <= _MAX_C else 1.2
    search = (search_gemm * n + SEARCH_PASS_COST + dim / SEARCH_DIM_SCALE) * n * dim
    gram = (1.5 * n + GRAM_PASS_COST) * n * dim
    return gram <= search


def _sub_width(rows: int, device: torch.device) -> int:
    """Columns per elementwise step of the Gram path: ``rows x columns`` under ``EXACT_ELEMENTS``
    on CPU (below torch's parallel grain: such a step never waits on a thread-pool barrier,
    which costs milliseconds on a shared machine), 64x that on a GPU; at least 8 columns."""
    limit = EXACT_ELEMENTS if device.type == "cpu" else 64 * EXACT_ELEMENTS
    return max(8, limit // max(1, rows))


def _column_width(n: int, device: torch.device) -> int:
    """Columns per block of the Gram path: the (rows x columns) float64 block near
    ``WIDE_ELEMENTS`` values (8 MB, on any device), at least 64 columns."""
    return max(64, WIDE_ELEMENTS // max(1, n))


def gram_knn_parts(parts: list[torch.Tensor], k: int = 2, stats: NeighbourStats | None = None) -> torch.Tensor:
    """:func:`knn_distances` on the Gram path for rows held as row blocks (e.g. one per captured
    batch), without joining them first: pass 1 reads each block's columns in place, and the blocks
    are joined only if some pair needs its exact distance recomputed (close points, copies).

    Args:
        parts: (rows_b, D) tensors of one width, any float dtype, in row order.
        k: number of neighbours.
        stats: filled in with what the search did, if given.

    Returns:
        (sum rows_b, k) float64 distances, as :func:`knn_distances` on ``torch.cat(parts)``.

    Raises:
        DataError: NaN or Inf in the rows, blocks of different widths, fewer than ``k + 1`` rows.
    """
    if not parts or len({int(b.shape[1]) for b in parts}) != 1:
        raise DataError("gram_knn_parts needs at least one row block, all of one width")
    if sum(int(b.shape[0]) for b in parts) < k + 1:
        raise DataError(f"need at least {k + 1} points for {k} nearest neighbours")
    return _gram_knn(parts, k, stats if stats is not None else NeighbourStats())


class _Joined:
    """The rows of a list of row blocks, joined (one copy) the first time they are needed."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self.parts = parts
        self._x: torch.Tensor | None = parts[0] if len(parts) == 1 else None

    def __call__(self) -> torch.Tensor:
        if self._x is None:
            self._x = torch.cat(self.parts)
        return self._x


def _gram_knn(x: torch.Tensor | list[torch.Tensor], k: int, stats: NeighbourStats) -> torch.Tensor:
    """The ``k`` nearest distances of few wide rows: one float64 Gram pass, certified values.

    Pass 1 shifts ``x`` by the float64 mean of its first :data:`GRAM_SHIFT_ROWS` rows (any shift
    leaves the distances unchanged; this one costs no pass over the data) and converts it to
    float64 one column block at a time (one fused operation per block, into a reused buffer),
    accumulating the Gram matrix ``G = Y Y^T`` of the shifted rows ``Y`` (row halves: 3/4 of a full
    product); ``d2_ij = G_ii + G_jj - 2 G_ij``. With ``n_i = sqrt(G_ii)``, the float64 dot-product
    bound, the rounding of ``Y`` and of the few operations on ``G`` give
    ``|d2_ij - |x_i - x_j|^2| <= c (n_i + n_j)^2 = e_ij`` with ``c`` of :func:`_error_constant` for
    float64 (``c ~ D 1.1e-16``: 7e-11 at ``D = 600k``). Row ``j`` can be among the ``k`` nearest of
    ``i`` only if ``d2_ij - e_ij`` is at most ``U_i``, the ``k``-th smallest ``d2_ij + e_ij`` of row
    ``i``. On data larger than one column block (``N D > WIDE_ELEMENTS``), such a candidate's
    Gram value is used when the bound certifies it to
    :data:`GRAM_RELATIVE_TOLERANCE` (``e_ij <= tol (d2_ij - e_ij)``; the ``k``-th smallest of values
    each within ``tol`` of the truth is within ``tol`` of the true ``k``-th smallest, so the row's
    distances are certified whichever candidates tie); the other candidates (points closer
    than the bound can resolve, exact copies, the re-check) get their exact distance from direct
    float64 differences of the original rows in a second pass over column blocks. So every
    distance is within ``tol / 2`` relative of the float64 distance to the true ``k``-th nearest
    row (below the float32 rounding of the activations themselves), and exact copies come out as
    exactly 0."""
    parts = x if isinstance(x, list) else [x]
    joined = _Joined(parts)
    n, dim = sum(int(b.shape[0]) for b in parts), int(parts[0].shape[1])
    device = parts[0].device
    const = _error_constant(dim, torch.float64, device)
    stats.rows, stats.search_dtype, stats.error_constant, stats.path = n, torch.float64, const, "gram"
    width = min(dim, _column_width(n, device))
    head = parts[0] if parts[0].shape[0] >= min(n, GRAM_SHIFT_ROWS) else joined()
    shift = head[: min(n, GRAM_SHIFT_ROWS)].to(torch.float64).mean(dim=0)
    flat = torch.empty(n * width, dtype=torch.float64, device=device)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    half = n // 2
    for c0 in range(0, dim, width):
        c1 = min(dim, c0 + width)
        block = flat[: n * (c1 - c0)].view(n, -1)
        r0 = 0
        for part in parts:  # exact float64 of each value, minus the shift: one rounding
            torch.sub(part[:, c0:c1], shift[c0:c1], out=block[r0 : r0 + part.shape[0]])
            r0 += part.shape[0]
        if half >= 32:  # rows [:half] against all, rows [half:] against themselves: 3/4 of the GEMM
            gram[:half].addmm_(block[:half], block.T)
            gram[half:, half:].addmm_(block[half:], block[half:].T)
        else:
            gram.addmm_(block, block.T)
    if half >= 32:
        gram[half:, :half] = gram[:half, half:].T
    if not bool(torch.isfinite(gram).all()):
        if all(bool(torch.isfinite(b).all()) for b in parts):
            raise DataError("the data are too large for float64 sums (|x| ~ 1e154); rescale them")
        raise DataError("the data contain NaN or Inf values; the intrinsic dimension is undefined")
    s = gram.diagonal().clone()
    norms = s.clamp_min(0).sqrt()
    d2 = gram.mul_(-2).add_(s[:, None]).add_(s[None, :])  # G is not needed any more
    slack = torch.add(norms[:, None], norms[None, :]).square_().mul_(const)
    upper = torch.add(d2, slack).fill_diagonal_(float("inf"))
    bound = torch.kthvalue(upper, k, dim=1).values  # U_i
    del upper
    lower = torch.sub(d2, slack).fill_diagonal_(float("inf"))
    maybe = lower <= bound[:, None]  # lower bound <= U_i
    stats.rechecked = int((maybe.sum(dim=1) > k).sum())
    if n * dim > WIDE_ELEMENTS:  # lower > 0 where certified: no copies
        certified = maybe & (slack <= GRAM_RELATIVE_TOLERANCE * lower)
    else:  # data within one block: recomputing every candidate costs less than a block, so do it
        certified = torch.zeros_like(maybe)
    del slack
    possible = lower <= 0
    possible.fill_diagonal_(False)
    # exact copies: one representative each (distance 0, no pass); the rows are read only if any
    rep = _copies_of(joined(), possible) if bool(possible.any()) else torch.arange(n, device=device)
    del lower
    values = torch.full((n, n), float("inf"), dtype=torch.float64, device=device)
    i, j = certified.nonzero(as_tuple=True)
    values[rep[i], rep[j]] = d2[i, j]
    values[rep[j], rep[i]] = d2[i, j]
    del d2
    direct = maybe & ~certified
    pairs = torch.stack([rep[:, None].expand(n, n)[direct], rep[None, :].expand(n, n)[direct]], dim=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]].sort(dim=1).values.unique(dim=0)
    first, second = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    count = first.numel()
    stats.recheck_pairs = count
    if count:
        squares = torch.cat(
            [_pair_squares(joined(), first[p : p + GRAM_PAIR_CHUNK], second[p : p + GRAM_PAIR_CHUNK]) for p in range(0, count, GRAM_PAIR_CHUNK)]
        )
        values[first, second] = squares  # the exact value wins over a certified one of another copy
        values[second, first] = squares
    values = values[rep][:, rep]  # every row sees its representative's distances
    values.masked_fill_(rep[:, None] == rep[None, :], 0.0).fill_diagonal_(float("inf"))
    return torch.topk(values, k, dim=1, largest=False, sorted=True).values.sqrt_()


def _copies_of(x: torch.Tensor, possible: torch.Tensor) -> torch.Tensor:
    """``rep[i]``: the first row that row ``i`` is an exact copy of (``i`` itself if none found).

    ``possible[i, j]`` (squared-distance lower bound <= 0) holds for every pair of exact copies;
    each row is compared with its first and its last possible partner only (direct equality of
    the values, in sub-grain column steps). A copy missed this way is just a row of its own (its distances
    are then computed like any other), so the result is exact either way; the point is that
    many copies of one row do not cost a quadratic number of exact distances."""
    n, dim = x.shape
    possible = possible.clone().fill_diagonal_(False).tril_(-1)
    rows = possible.any(dim=1).nonzero().flatten()
    rep = torch.arange(n, device=x.device)
    if rows.numel() == 0:
        return rep
    flags = possible[rows].to(torch.int8)
    first = flags.argmax(dim=1)  # the first possible partner j < i
    last = n - 1 - flags.flip(1).argmax(dim=1)  # the last possible partner j < i
    same_first = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
    same_last = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
    step = min(dim, _sub_width(2 * rows.numel(), x.device))
    for c0 in range(0, dim, step):
        own = x[rows, c0 : c0 + step]
        same_first &= (own == x[first, c0 : c0 + step]).all(dim=1)
        same_last &= (own == x[last, c0 : c0 + step]).all(dim=1)
    partner = torch.where(same_first, first, last)
    found = same_first | same_last
    for i, j in zip(rows[found].tolist(), partner[found].tolist()):  # ascending: rep[j] is final
        rep[i] = rep[j]
    return rep


def _pair_squares(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """float64 ``|x_a - x_b|^2`` for the pairs ``(first[p], second[p])``: direct differences of
    the original rows (the gathered values converted to float64, exact), squares summed over
    column blocks of about ``BLOCK_ELEMENTS`` pair values (only the rows of the pairs are read)."""
    n, dim = x.shape
    count = first.numel()
    step = min(dim, max(64, BLOCK_ELEMENTS // max(1, count)))
    total = torch.zeros(count, dtype=torch.float64, device=x.device)
    for c0 in range(0, dim, step):
        cols = x[:, c0 : c0 + step]
        diff = cols.index_select(0, first).to(torch.float64)
        diff.sub_(cols.index_select(0, second))  # float64 arithmetic: the float32 values convert exactly
        total.add_(diff.square_().sum(dim=1))
    return total
