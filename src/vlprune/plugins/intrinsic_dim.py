"""Intrinsic dimension (ID) estimation: TwoNN in torch, and per-layer ID profiles of a model.

TwoNN (Facco et al., 2017): for every point, ``mu = r2 / r1`` (distances to the second and first
nearest neighbours). ``log mu`` is exponential with rate ``d``; the estimate fits
``-log(1 - F_emp(mu)) = d * log(mu)`` through the origin (``method="linear"``) or takes the
closed-form maximum likelihood estimate (``method="mle"``). Conventions follow
``skdim.id.TwoNN`` (the reference this module is tested against):

* the ``discard_fraction`` largest ratios are dropped before the linear fit; with ``"mle"`` they
  count as censored observations;
* ``F_emp(i) = i / N`` for the i-th smallest kept ratio (1-based), ``N`` the number of points;
* with ``discard_fraction=0`` the linear fit would need ``-log(0)`` for the largest ratio, so that
  single point is left out of the fit (the official ID-pruning code drops the last two).

Unlike scikit-dimension, exact duplicate rows are collapsed to one copy before the estimate
(scikit-dimension drops every copy); both then see the same distinct points.

Numerics: the data are centred (mean in float64), nearest-neighbour candidates come from one
chunked float32 matrix product, the two neighbour distances of every point are recomputed in
float64 from the original rows, and a point is searched again only where its float32 margin is
within a rigorous error bound (:mod:`vlprune.plugins._neighbours`), so the result does not depend
on the cancellation error of ``|x|^2 + |y|^2 - 2 x.y``. Works on CPU or GPU tensors; fp16 / bf16
input is upcast.

Example:
    >>> import torch
    >>> from vlprune.plugins.intrinsic_dim import twonn
    >>> x = torch.randn(2000, 5) @ torch.randn(5, 100)   # a 5-dimensional subspace of R^100
    >>> round(twonn(x))
    5
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import distributed, id_storage
from vlprune.plugins._neighbours import gram_knn_parts, knn_distances, uses_gram_path
from vlprune.plugins.capture import (
    ActivationCapture,
    ModuleSelector,
    Representation,
    iterate_batches,
    resolve_modules,
)
from vlprune.plugins.id_profile import IDProfile, LayerID
from vlprune.plugins.id_sketch import SparseSignSketch
from vlprune.plugins.id_storage import RowStore, SpillingRows, check_first_batch, default_budget_mb, step_bytes
from vlprune.plugins.id_streamed import streamed_twonn

__all__ = [
    "twonn",
    "twonn_block_average",
    "nearest_neighbour_distances",
    "drop_duplicate_rows",
    "Estimator",
    "LayerID",
    "IDProfile",
    "estimate_ids",
    "PRUNABLE_TYPES",
    "MIN_SAMPLES",
    "prunable_modules",
]

logger = logging.getLogger(__name__)

Estimator = Literal["linear", "mle"]

#: layer types profiled by default: what structured pruning removes channels of
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: fewest distinct samples a layer's TwoNN estimate is computed from: the estimate's relative
#: standard error is about ``1 / sqrt(n)`` (0.38 at 8; the ID-pruning paper uses 2000)
MIN_SAMPLES = 8


def prunable_modules(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` of ``model``, in registration order: the
    default selection of :func:`estimate_ids` for a model vlprune knows nothing about.

    Args:
        model: any ``nn.Module`` (a plain ``nn.Sequential``, a hand-built CNN, ...).

    Returns:
        Module paths.

    Raises:
        ModelStructureError: no Linear or Conv layer; pass ``modules=`` to choose what to profile.

    Example:
        >>> prunable_modules(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)))
        ['0', '3']
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, PRUNABLE_TYPES)]
    if not names:
        raise ModelStructureError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv layer to profile; "
            "pass modules=[...] (names, glob patterns or types) to estimate_ids"
        )
    return names


def _as_2d_float(x: torch.Tensor | object, check_finite: bool = True) -> torch.Tensor:
    """``x`` as a validated 2-D floating tensor (integers become float64; no copy otherwise).

    ``check_finite=False`` leaves the NaN / Inf check to the neighbour search, which gets it
    from the column sums it needs anyway (a full ``isfinite`` pass costs ~10% of a TwoNN)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # pragma: no cover - depends on the foreign type
            raise DataError(f"twonn expects a 2-D tensor or array, got {type(x).__name__}") from exc
    if x.dim() != 2:
        raise DataError(f"twonn expects a 2-D (points x features) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    if check_finite and not bool(torch.isfinite(x).all()):
        raise DataError("the data contain NaN or Inf values; the intrinsic dimension is undefined")
    return x


def _first_copies(x: torch.Tensor) -> torch.Tensor:
    """Indices (ascending) of the rows of ``x`` that have no identical earlier row."""
    n = x.shape[0]
    if n < 2:
        return torch.arange(n, device=x.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    proj = torch.randn(x.shape[1], 2, generator=g, dtype=torch.float64).to(x.device)
    keys = torch.cat([x[i : i + 4096].to(torch.float64) @ proj for i in range(0, n, 4096)])
    _, group, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    shared = (counts[group] > 1).nonzero().flatten().tolist()  # rows whose hash is not unique
    kept_in_group: dict[int, list[int]] = {}
    groups = group.tolist()
    for i in shared:
        kept = kept_in_group.setdefault(groups[i], [])
        if any(torch.equal(x[i], x[j]) for j in kept):
            keep[i] = False
        else:
            kept.append(i)
    return keep.nonzero().flatten()


def drop_duplicate_rows(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` with exact duplicate rows collapsed to their first occurrence (order kept).

    Rows are hashed by two random float64 projections; only rows with equal hashes are compared
    exactly, so the result is exact, and the cost is O(N * D) instead of a lexicographic sort.

    Args:
        x: (N, D) tensor.

    Returns:
        (N', D) tensor with N' <= N distinct rows (``x`` itself when all rows are distinct).

    Example:
        >>> drop_duplicate_rows(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])).tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    keep = _first_copies(x)
    return x if keep.numel() == x.shape[0] else x[keep]


def nearest_neighbour_distances(
    x: torch.Tensor, *, chunk_size: int | None = None, k: int = 2
) -> torch.Tensor:
    """Exact Euclidean distances of every row of ``x`` to its ``k`` nearest other rows.

    Float32 products of the centred data, by blocks of rows against the rows at or after them
    only (the distance matrix is symmetric), find ``k + 1`` candidates per row; the ``k`` best are
    recomputed in float64 from the rows themselves (direct differences), and a row is searched
    again only where the float32 margin to its ``(k+1)``-th candidate is within a rigorous bound
    of the float32 error (see :mod:`vlprune.plugins._neighbours`). So the distances carry no
    cancellation error and are the true nearest ones, at the cost of 58% to 67% of a float32
    ``N x N x D`` GEMM. Memory beyond ``x``: two centred float32 copies (with two extra columns)
    and a (rows x N) float32 block under 16 MB.

    Args:
        x: (N, D) float tensor (CPU or GPU), N >= k + 1.
        chunk_size: rows per product block (default: about N / 6 on one thread, N / 3 on several).
        k: number of neighbours.

    Returns:
        (N, k) float64 tensor, ascending along dim 1.

    Raises:
        DataError: fewer than ``k + 1`` rows.

    Example:
        >>> nearest_neighbour_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]]), k=1).flatten().tolist()
        [1.0, 4.242640687119285, 1.0]
    """
    n = x.shape[0]
    if n < k + 1:
        raise DataError(f"need at least {k + 1} points for {k} nearest neighbours, got {n}")
    return knn_distances(x, k, chunk_size=chunk_size)


def _fit(mu: torch.Tensor, discard_fraction: float, method: Estimator) -> float:
    """The TwoNN estimate from the ratios ``mu = r2 / r1`` (``skdim.id.TwoNN`` conventions)."""
    n = mu.numel()
    n_keep = int(n * (1 - discard_fraction))
    if method == "linear":
        # -log(1 - F) is infinite for F = 1 (only when nothing is discarded)
        n_keep = min(n_keep, n - 1)
    if n_keep < 2:
        raise DataError(
            f"only {n_keep} ratio(s) left after discarding {discard_fraction:.0%} of {n} points; "
            "use more points or a smaller discard_fraction"
        )
    mu_sorted = torch.sort(mu.to(torch.float64)).values[:n_keep]
    log_mu = torch.log(mu_sorted)
    if method == "mle":
        denom = log_mu.sum() + (n - n_keep) * log_mu[-1]
        if denom <= 0:
            raise DataError("all nearest-neighbour ratios equal 1; the intrinsic dimension is undefined")
        return float((n_keep - 1) / denom)
    femp = torch.arange(1, n_keep + 1, dtype=torch.float64, device=mu.device) / n
    y = -torch.log1p(-femp)
    denom = (log_mu * log_mu).sum()
    if denom <= 0:
        raise DataError("all nearest-neighbour ratios equal 1; the intrinsic dimension is undefined")
    return float((log_mu * y).sum() / denom)


def twonn(
    x: torch.Tensor,
    discard_fraction: float = 0.1,
    method: Estimator = "linear",
    *,
    chunk_size: int | None = None,
) -> float:
    """TwoNN intrinsic dimension of the rows of ``x``.

    The cost is about 60% of a float32 ``N x N x D`` matrix product (see
    :func:`nearest_neighbour_distances`); the estimate equals ``skdim.id.TwoNN`` on the
    distinct rows up to float64 rounding (measured: within 1e-6 relative, usually 1e-8).

    Args:
        x: (N, D) tensor (any float dtype, CPU or GPU) or array-like.
        discard_fraction: fraction of the largest ratios ``mu`` left out of the fit, in [0, 1).
        method: ``"linear"`` (Facco et al. least squares) or ``"mle"``.
        chunk_size: rows per distance block (memory vs speed), default automatic.

    Returns:
        The estimated intrinsic dimension.

    Raises:
        DataError: fewer than 3 distinct points, NaN/Inf, or a degenerate fit.
        VLPruneError: a bad ``method`` or ``discard_fraction``.

    Example:
        >>> twonn(torch.rand(1000, 3))   # doctest: +SKIP
        2.9...
    """
    if method not in ("linear", "mle"):
        raise VLPruneError(f"method must be 'linear' or 'mle', got {method!r}")
    if not 0.0 <= discard_fraction < 1.0:
        raise VLPruneError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    value, _ = _twonn_counted(_as_2d_float(x, check_finite=False), discard_fraction, method, chunk_size)
    return value


def _twonn_counted(
    x: torch.Tensor | list[torch.Tensor], discard_fraction: float, method: Estimator, chunk_size: int | None = None
) -> tuple[float, int]:
    """TwoNN on a validated 2-D tensor; also returns the number of distinct points used.

    Duplicates come out of the search itself: a row has an identical copy exactly when its
    exact first-neighbour distance is 0, so only those rows are compared, and the search is
    repeated on the distinct rows only when there were copies.
    """
    n_in = sum(int(b.shape[0]) for b in x) if isinstance(x, list) else x.shape[0]
    if n_in < 3:
        raise DataError(f"TwoNN needs at least 3 distinct points, got {n_in} rows; give more calibration samples")
    if isinstance(x, list):  # row blocks of a Gram-path module (estimate_ids), read in place
        r = gram_knn_parts(x, 2)
    else:
        r = nearest_neighbour_distances(x, chunk_size=chunk_size, k=2)
    suspects = (r[:, 0] == 0).nonzero().flatten()
    if suspects.numel():  # exact duplicates: keep the first copy of each and search again
        if isinstance(x, list):
            x = torch.cat(x).float()
        keep = torch.ones(n_in, dtype=torch.bool, device=x.device)
        keep[suspects] = False
        keep[suspects[_first_copies(x[suspects])]] = True
        x = x[keep]
        logger.info("twonn: dropped %d duplicate row(s) of %d", n_in - x.shape[0], n_in)
        if x.shape[0] < 3:
            raise DataError(
                f"TwoNN needs at least 3 distinct points, got {x.shape[0]} (of {n_in} rows); "
                "give more calibration samples"
            )
        r = nearest_neighbour_distances(x, chunk_size=chunk_size, k=2)
    mu = r[:, 1] / r[:, 0]
    return _fit(mu, discard_fraction, method), int(r.shape[0])


def twonn_block_average(
    x: torch.Tensor,
    n_blocks: int | tuple[int, ...] = 20,
    discard_fraction: float = 0.1,
    method: Estimator = "linear",
    *,
    generator: torch.Generator | None = None,
) -> float:
    """The ID averaged over random splits of the points into 1..``n_blocks`` blocks.

    The ID-pruning paper reports, for each number of blocks b in 1..20, the mean TwoNN estimate
    over the b blocks of a random partition, and then averages over b. Blocks that end up with
    fewer than 3 distinct points are skipped.

    Args:
        x: (N, D) tensor.
        n_blocks: the largest number of blocks (all of 1..n_blocks are used), or an explicit
            tuple of block counts.
        discard_fraction: as in :func:`twonn`.
        method: as in :func:`twonn`.
        generator: source of the random partitions (default: seeded with 0).

    Returns:
        The block-averaged estimate.
    """
    x = _as_2d_float(x)
    x = drop_duplicate_rows(x)
    counts = tuple(range(1, n_blocks + 1)) if isinstance(n_blocks, int) else tuple(n_blocks)
    if not counts or min(counts) < 1:
        raise VLPruneError(f"n_blocks must be >= 1, got {n_blocks}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    per_count: list[float] = []
    for b in counts:
        perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
        estimates = []
        for block in torch.chunk(perm, b):
            if block.numel() < 3:
                continue
            try:
                estimates.append(twonn(x[block], discard_fraction, method))
            except DataError:
                continue
        if estimates:
            per_count.append(sum(estimates) / len(estimates))
    if not per_count:
        raise DataError(f"no block had enough points for TwoNN ({x.shape[0]} points)")
    value = sum(per_count) / len(per_count)
    if not math.isfinite(value):
        raise DataError("block-averaged intrinsic dimension is not finite")
    return value


# ---------------------------------------------------------------------------------------------
def _layer_rows(store: RowStore, name: str, parts_ok: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """THE per-layer rows every estimate is computed from: (rows, features) float32, in RAM.

    The only place the captured rows of a module are read back (the store's RAM and disk copies
    are freed here); a multi-process run gathers the ranks' rows at this point. With
    ``parts_ok`` (one process, a module on the Gram path, batches of one width) the stored
    blocks come back as a list, not joined (:func:`~vlprune.plugins._neighbours.gram_knn_parts`
    reads them in place: joining 9.5 GB of rows cost 1.3 s on real SmolLM2): usually ONE block,
    the module's slab (:func:`~vlprune.plugins.id_storage.anonymous_rows`), which is also
    returned as it is (float32 storage) to the other paths.
    """
    reducer = store[name]
    if distributed.is_active():  # every rank's rows in rank order: the first n_samples of the union
        rows = store.rows(name)
        store.release(name)
        return distributed.gather_rows(rows)[: reducer.n_samples]
    parts = reducer.stored_batches()  # spilled batches are read from disk here, once
    one_width = len({int(b.shape[1]) for b in parts}) == 1
    if parts_ok and one_width and uses_gram_path(reducer.rows, reducer.width):
        rows: torch.Tensor | list[torch.Tensor] = parts
    elif one_width and len(parts) == 1:  # one block (the module's slab, id_storage.anonymous_rows): no copy
        rows = parts[0].float()
    else:
        rows = reducer.joined(parts)
    store.release(name)
    return rows


def _n_rows(rows: torch.Tensor | list[torch.Tensor] | SpillingRows) -> int:
    """Rows of a module's rows in any of the forms :func:`_layer_rows` returns."""
    if isinstance(rows, SpillingRows):
        return rows.rows
    if isinstance(rows, list):
        return sum(int(b.shape[0]) for b in rows)
    return int(rows.shape[0])


def _layer_estimate(
    rows: torch.Tensor | list[torch.Tensor] | SpillingRows,
    name: str,
    n_samples: int,
    representation: str,
    estimator: Estimator,
    discard_fraction: float,
    n_blocks: int | None,
    budget_bytes: int = 0,
) -> tuple[float, int]:
    """TwoNN (or its block average) of one module's rows; returns (ID, distinct rows used).

    ``rows`` is the (rows, features) tensor (:func:`_layer_rows`), or, for a module whose
    distance step does not fit the budget, its store, estimated column block by column block
    (:func:`vlprune.plugins.id_streamed.streamed_twonn`) within ``budget_bytes``."""
    n_rows = _n_rows(rows)
    try:
        if n_rows < MIN_SAMPLES:
            raise DataError(
                f"only {n_rows} sample(s) reached it (n_samples={n_samples}); TwoNN needs at least "
                f"{MIN_SAMPLES} to mean anything (the paper uses 2000): "
                + ("raise n_samples" if n_samples < MIN_SAMPLES else "pass more calibration batches")
            )
        if isinstance(rows, SpillingRows):
            value, n_distinct = streamed_twonn(rows, discard_fraction, estimator, budget_bytes)
        elif n_blocks:
            rows = drop_duplicate_rows(rows)
            value, n_distinct = twonn_block_average(rows, n_blocks, discard_fraction, estimator), rows.shape[0]
        else:
            value, n_distinct = _twonn_counted(rows, discard_fraction, estimator)
        if n_distinct < MIN_SAMPLES:
            raise DataError(
                f"only {n_distinct} distinct sample(s) of {n_rows} reached it; TwoNN needs at least "
                f"{MIN_SAMPLES} to mean anything: pass more (and more varied) calibration batches"
            )
    except DataError as exc:
        hint = (
            " (with representation='cls' a causal text model's first token is the same for "
            "every sample; use 'mean' or 'flatten')"
            if representation == "cls" else ""
        )
        raise DataError(f"module {name}: {exc}{hint}") from exc
    return value, int(n_distinct)


def _warn_short(seen: Mapping[str, int], n_samples: int, representation: str) -> None:
    """One warning when the batches gave the modules fewer rows than ``n_samples``."""
    short = {n: k for n, k in seen.items() if k < n_samples}
    if not short:
        return
    low, high = min(short.values()), max(short.values())
    got = str(low) if low == high else f"{low} to {high}"
    unit = "token rows" if representation == "tokens" else "samples"
    message = (
        f"estimate_ids: n_samples={n_samples} was asked but the batches gave only {got} {unit} to "
        f"{len(short)} of {len(seen)} module(s) (e.g. {next(iter(short))}), so their IDs are estimated on "
        f"{got} {unit}; pass more calibration batches (about {n_samples} samples) or lower n_samples to match"
    )
    warnings.warn(message, UserWarning, stacklevel=3)
    logger.warning(message)


def estimate_ids(
    model: nn.Module,
    batches: Iterable[Any],
    modules: ModuleSelector = None,
    *,
    n_samples: int = 2000,
    representation: Representation = "flatten",
    estimator: Estimator = "linear",
    discard_fraction: float = 0.1,
    n_blocks: int | None = None,
    modality_of: Callable[[str], str] | None = None,
    max_memory_mb: float | None = None,
    storage_dtype: torch.dtype | None = None,
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    spill_dir: str | Path | None = None,
    full_forward: bool = False,
    progress: bool = True,
) -> IDProfile:
    """Intrinsic dimension of every chosen module's output.

    The model runs in eval mode without gradients (its mode is restored, its hooks removed, also
    when something fails). Cost: ONE forward pass over the batches (stopping as soon as every
    module has ``n_samples`` rows), then one TwoNN estimate per module. From the second batch
    on, each forward stops right after the last profiled module has run (what comes after it,
    e.g. a language model's head, 20% of SmolLM2-135M's forward, or a VLM's language model
    behind a profiled vision tower, is not needed), as long as the profiled modules are called
    in the order the first batch showed (:meth:`ActivationCapture.run` ``cut``).

    Memory: the rows of all modules (``n_samples`` x width each; width = tokens x channels for
    ``"flatten"``) are kept in RAM up to ``max_memory_mb`` (less the room one module's distance
    step needs); the batches past it are appended, in ``storage_dtype``, to one file per module
    in a temporary directory under ``spill_dir`` (deleted afterwards, also on errors;
    :mod:`vlprune.plugins.id_storage`). Each module's rows are then read back one module at a
    time, bit for bit what an all-in-RAM capture holds, so the estimate does not depend on the
    budget. The default budget is half the memory available when the call starts
    (``MemAvailable``; 2 GB where that is unknown), and rows also go to disk once the available
    memory falls below a quarter of its starting value (other processes growing meanwhile).
    Each module's rows in RAM live in one memory mapping of their own (returned to the system
    when the profile returns). Real SmolLM2-135M (210 linears, 40 MB of flatten rows per sample)
    over 256 samples x 64 tokens on 2 idle CPU cores: 1.76x to 2.09x one plain forward pass over
    the same batches (median 1.93x over 8 runs; all 9.7 GB of rows in RAM; 2.6x with
    ``max_memory_mb=2048``, 7.7 GB spilled; docs/benchmarks.md, section "``estimate_ids`` at
    real size").

    The estimate is exact for the chosen representation: every stored row enters the
    nearest-neighbour search. ``sketch_dim`` trades that for memory: each batch's rows are
    projected in the capture hook to ``sketch_dim`` values by a seeded sparse sign (sparse
    Johnson-Lindenstrauss) projection (:class:`vlprune.plugins.id_sketch.SparseSignSketch`), so a
    module keeps ``n_samples x sketch_dim`` values. Measured error against the exact estimate on
    real SmolLM2-135M activations (flatten rows of 12 288 to 98 304 values; relative error of a
    layer's ID, median / 90th percentile / max): 256 samples x 64 tokens, all 210 linears:
    ``sketch_dim=256``: 3.9% / 7.3% / 13%, ``1024``: 1.3% / 3.2% / 5.9%, ``4096``: 0.6% / 1.6% /
    2.3% (mean signed +3.6%, +1.1%, +0.3%); 64 samples, the 42 linears of the first 6 layers:
    ``256``: 5.3% / 10.7% / 26%, ``1024``: 3.5% / 9.5% / 13% (``benchmarks/bench_id_scale.py``;
    docs/benchmarks.md).
    It is no substitute for the exact estimate when layers are compared closely.

    Args:
        model: any ``nn.Module`` (transformers models included); fp16/bf16 models work, the
            distances are computed in float32/float64.
        batches: iterable of dicts (``model(**batch)``), tuples or tensors (``model(batch)``);
            materialised as a list.
        modules: module names / glob patterns / types (default: every ``nn.Linear`` and
            ``nn.Conv*``, :func:`prunable_modules`).
        n_samples: rows per module. If the batches hold fewer, the IDs are estimated on what
            they hold, with a ``UserWarning`` (and a log warning) saying how many; fewer than
            :data:`MIN_SAMPLES` distinct rows is an error.
        representation: ``"flatten"`` (paper), ``"cls"``, ``"mean"`` or ``"tokens"``.
        estimator: ``"linear"`` or ``"mle"`` TwoNN.
        discard_fraction: fraction of largest ratios left out, as in ``skdim.id.TwoNN``.
        n_blocks: if set, average over random splits into 1..n_blocks blocks (the paper uses 20).
        modality_of: module name -> modality label (the top-level ``vlprune.estimate_ids`` fills
            it in from the model family).
        max_memory_mb: RAM for the captured rows and one module's distance step (None: half the
            available memory). At least one float32 row of the widest module.
        storage_dtype: dtype of stored rows. None (default): lossless, each module's rows in
            its output's dtype when that is float16 / bfloat16 (a bf16 model's rows take half
            the RAM and disk of float32, with the same values), else float32. A narrower dtype
            than the output's rounds the rows: on real SmolLM2 (float32) at full size
            ``torch.bfloat16`` took 1.57x-1.73x a forward against 2.43x-2.64x for float32 in the
            same runs (before the cut forwards and slabs), with layer IDs within 2.4e-5 (median)
            and 5.8e-3 (max) relative of the exact ones.
        sketch_dim: if set, sketch every module's rows to this many values (inexact; at most the
            narrowest module's row width).
        sketch_seed: seed of the sketch.
        spill_dir: where the temporary directory for rows past the budget goes (default: the
            system temp directory).
        full_forward: run every batch's whole forward (for a model whose profiled modules may
            run again, later in the same forward, in a batch whose calls up to the last one
            match the first batch's).
        progress: show progress bars.

    Returns:
        An :class:`IDProfile`.

    Raises:
        DataError: empty batches, NaN/Inf activations, fewer than :data:`MIN_SAMPLES` distinct
            samples reaching a module.
        ModelStructureError: ``modules`` matches nothing, or a module produced no tensor.
        VLPruneError: ``max_memory_mb`` below one sample's row (the message gives the minimum),
            ``sketch_dim`` larger than a module's row width, or too little disk for the spill.

    Example:
        >>> profile = estimate_ids(model, batches, n_samples=256, max_memory_mb=512)  # doctest: +SKIP
        >>> profile.ids()                                                             # doctest: +SKIP
    """
    config = {k: v for k, v in locals().items() if k not in ("model", "batches", "max_memory_mb", "spill_dir", "full_forward", "progress")}
    with distributed.guard("estimate_ids", model=model, config=config):  # before any collective
        if n_samples < 3:
            raise VLPruneError(f"n_samples must be at least {MIN_SAMPLES} (the paper uses 2000), got {n_samples}")
        if max_memory_mb is not None and not float(max_memory_mb) > 0:
            raise VLPruneError(f"max_memory_mb must be positive (or None for half the available memory), got {max_memory_mb}")
        sketch = SparseSignSketch(sketch_dim, seed=sketch_seed) if sketch_dim is not None else None
        items = iterate_batches(batches)
        names = prunable_modules(model) if modules is None else resolve_modules(model, modules)
    budget_mb = default_budget_mb() if max_memory_mb is None else float(max_memory_mb)
    layers: dict[str, LayerID] = {}
    seen: dict[str, int] = {}
    with RowStore(
        int(budget_mb * 2**20), spill_dir, watch_available=max_memory_mb is None, expected_batches=len(items)
    ) as store:
        reducers = {
            n: store.reducer(
                n, representation, n_samples, storage_dtype,
                transform=(lambda rows, n=n: sketch(rows, name=n)) if sketch is not None else None,
            )
            for n in names
        }
        with distributed.guard("estimate_ids (capture)"), ActivationCapture(model, names, reducers.__getitem__) as cap:
            cap.run(items[:1], progress=False, cut=not full_forward)
            reserve = check_first_batch(reducers, len(items), n_samples, budget_mb, store)
            if len(items) > 1 and not all(r.full for r in reducers.values()):
                cap.run(items[1:], progress=progress, desc="estimate_ids: capture", cut=not full_forward,
                        stop_when=lambda: all(r.full for r in reducers.values()))
        logger.info(
            "estimate_ids: %d modules captured in one pass, %.0f MB in RAM and %.0f MB spilled to disk (budget %.0f MB)",
            len(names), store.ram_bytes / 2**20, store.written_bytes / 2**20, budget_mb,
        )
        # modules whose in-RAM distance step would pass the budget are estimated from their stored rows
        limit = max(reserve, id_storage.STREAM_ABOVE_BYTES)
        over = {n for n, r in reducers.items() if step_bytes(r.rows, r.width) > limit}
        if over and (n_blocks or distributed.is_active()):
            logger.warning(
                "estimate_ids: the distance step of %d module(s) needs more than the %.0f MB budget; it runs in RAM "
                "anyway (block-by-block estimates need n_blocks=None and one process)", len(over), budget_mb,
            )
            over = set()
        elif over:
            logger.info("estimate_ids: %d module(s) estimated column block by column block within the budget", len(over))
        for name in tqdm(names, desc="intrinsic dimension", disable=not progress):
            width = reducers[name].width
            rows = reducers[name] if name in over else _layer_rows(store, name, parts_ok=not n_blocks)
            seen[name] = _n_rows(rows)
            value, n_distinct = _layer_estimate(
                rows, name, n_samples, representation, estimator, discard_fraction, n_blocks, reserve
            )
            store.release(name)
            layers[name] = LayerID(
                name=name,
                id=value,
                n_samples=n_distinct,
                features=int(width),
                modality=modality_of(name) if modality_of else "unknown",
            )
            del rows
    _warn_short(seen, n_samples, representation)
    return IDProfile(
        layers={n: layers[n] for n in names},
        representation=representation,
        estimator=estimator,
        discard_fraction=discard_fraction,
        n_blocks=n_blocks,
        model_class=type(model).__name__,
    )
