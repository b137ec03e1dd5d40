"""Visual-token selection: DivPrune (Alvar et al., CVPR 2025) and the token baselines.

Plain tensor functions, no model knowledge (the run-time adapter that drops tokens inside a
transformers model is ``vlprune.adapters.hf.token_pruning``). METHODS.md section 5.

* :func:`divprune_select` — max-min diversity. ``D = 1 - cos`` between the tokens (float32, or
  float64 for float64 input, whatever the model dtype). The first token is the one whose nearest
  other token is farthest; then, greedily, the token whose smallest distance to the already selected
  set is largest. A running minimum per candidate makes the greedy loop O(M N) after the N x N
  distance matrix (the straightforward loop that recomputes the minimum over the selected set at
  every step is O(M^2 N)).
* :func:`fastv_select` — FastV's ranking: image tokens by the head-averaged attention they receive
  from the last query token (at layer K-1; K = 2 and R = 50 % dropped in the paper).
* :func:`random_select` (seeded) and :func:`uniform_select` (every ``n/M``-th token) — baselines.

Conventions shared by all four:

* ``keep`` is an ``int >= 1`` (a count) or a ``float`` in ``(0, 1]`` (a ratio of the tokens a row
  has: ``M = round(keep * n)`` with Python's ``round``, as the official DivPrune code, and at least 1).
  ``keep=1`` keeps one token, ``keep=1.0`` keeps all. Booleans are refused; a count as a float
  (``58.0``) is refused (pass ``58``). :func:`keep_count` does this conversion.
* The result is a ``torch.long`` tensor of token indices in original (ascending) order, one row per
  sample: ``(B, M)`` for batched input, ``(M,)`` for unbatched input. When rows have different numbers
  of valid tokens (``mask=`` / per-row image masks) and ``keep`` is a ratio, each row keeps
  ``round(keep * n_valid)`` tokens and rows are right-padded with ``-1`` to the longest
  (``(idx >= 0)`` is the row's mask). An int ``keep`` gives the same ``M`` to every row.
* Ties are broken towards the lowest index, so results are deterministic.

Example:
    >>> import torch
    >>> from vlprune.plugins.token_diversity import divprune_select, uniform_select
    >>> angles = torch.tensor([0.0, 0.25, 1.45, 2.95, 3.35, 4.75])
    >>> pts = torch.stack([angles.cos(), angles.sin()], dim=-1)      # 6 tokens on a circle
    >>> divprune_select(pts, keep=4).tolist()
    [0, 2, 3, 5]
    >>> uniform_select(576, keep=0.25)[:4].tolist()
    [0, 4, 8, 12]
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlprune.errors import DataError, VLPruneError
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl

__all__ = [
    "DIVPRUNE_KEEP",
    "FASTV_LAYER",
    "FASTV_KEEP",
    "keep_count",
    "cosine_distances",
    "divprune_select",
    "max_min_greedy",
    "fastv_scores",
    "fastv_select",
    "random_select",
    "uniform_select",
]

logger = logging.getLogger(__name__)

#: DivPrune's retained ratio in the paper (56 of LLaVA-1.5's 576 visual tokens; ~84 % fewer TFLOPs)
DIVPRUNE_KEEP: float = 0.098
#: FastV's K: image tokens are ranked with the attention of layer K-1 and dropped from layer K on
FASTV_LAYER: int = 2
#: FastV's kept fraction of the image tokens (R = 50 % dropped)
FASTV_KEEP: float = 0.5


def keep_count(keep: int | float, n: int, what: str = "tokens") -> int:
    """The number of tokens ``keep`` means out of ``n``.

    Args:
        keep: an ``int >= 1`` (a count, at most ``n``) or a ``float`` in ``(0, 1]`` (a ratio:
            ``round(keep * n)``, at least 1). Booleans are refused.
        n: how many tokens there are.
        what: what the ``n`` things are called in error messages.

    Returns:
        M, with ``1 <= M <= n``.

    Raises:
        VLPruneError: ``keep`` is not a count or ratio, ``<= 0``, a count ``> n``, a ratio ``> 1``,
            or ``n < 1``.

    Example:
        >>> keep_count(0.098, 576), keep_count(58, 576), keep_count(1.0, 576)
        (56, 58, 576)
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise VLPruneError(
            f"keep must be an int >= 1 (a number of {what}) or a float in (0, 1] (a ratio), got {keep!r}"
        )
    if n < 1:
        raise DataError(f"there are no {what} to select from (n={n}); give at least one")
    if isinstance(keep, numbers.Integral):
        count = int(keep)
        if count < 1:
            raise VLPruneError(f"keep={keep!r} keeps no {what}; give an int >= 1 or a ratio in (0, 1]")
        if count > n:
            raise VLPruneError(
                f"keep={keep!r} asks for more {what} than there are ({n}); give at most {n} or a ratio in (0, 1]"
            )
        return count
    ratio = float(keep)
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        hint = f"pass the int {int(ratio)} for a count" if math.isfinite(ratio) and ratio > 1 and ratio.is_integer() else "give a ratio in (0, 1] or an int count"
        raise VLPruneError(f"keep={keep!r} is not a ratio in (0, 1]; {hint}")
    return max(1, min(n, round(ratio * n)))


def _features(features: torch.Tensor, name: str = "features") -> tuple[torch.Tensor, bool]:
    """(B, N, D) float view of ``features`` and whether the input was unbatched."""
    if not isinstance(features, torch.Tensor) or not (features.is_floating_point() and features.dim() in (2, 3)):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise DataError(f"{name} must be a float tensor of shape (tokens, dim) or (batch, tokens, dim), got {shape}")
    unbatched = features.dim() == 2
    features = features.detach()  # a selection has no gradient; features straight from a model may carry one
    return (features.unsqueeze(0) if unbatched else features), unbatched


def _valid_mask(mask: torch.Tensor | None, batch: int, n: int, device: torch.device, name: str = "mask") -> torch.Tensor | None:
    """(B, N) bool mask of valid tokens, or None when every token is valid."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise DataError(f"{name} must be a bool tensor of shape (batch, tokens) marking valid tokens, got {type(mask).__name__}")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.shape[-1] != n or mask.shape[0] not in (1, batch) or mask.dim() != 2:
        raise DataError(f"{name} must have shape ({batch}, {n}) (batch, tokens) to match the features, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all():
            raise DataError(f"{name} must be a bool (or 0/1 integer) tensor marking valid tokens, got dtype {mask.dtype}")
        mask = mask != 0
    mask = mask.to(device).expand(batch, n)
    if bool(mask.all()):
        return None
    return mask


def _row_counts(keep: int | float, valid: torch.Tensor | None, batch: int, n: int, what: str) -> list[int]:
    """M per row (an int keep: the same everywhere; a ratio: of each row's valid count)."""
    if valid is None:
        return [keep_count(keep, n, what)] * batch
    counts = valid.sum(-1).tolist()
    out = []
    for b, c in enumerate(counts):
        try:
            out.append(keep_count(keep, int(c), what))
        except VLPruneError as err:
            raise type(err)(f"row {b} of the batch ({int(c)} valid {what}): {err}") from None
    return out


def _sorted_padded(chosen: torch.Tensor, counts: list[int], n: int) -> torch.Tensor:
    """Sort each row's first counts[b] indices ascending; pad the rest with -1."""
    m_max = chosen.shape[1]
    if all(c == m_max for c in counts):
        return chosen.sort(dim=-1).values
    width = torch.arange(m_max, device=chosen.device)
    live = width.unsqueeze(0) < torch.tensor(counts, device=chosen.device).unsqueeze(1)
    out = chosen.masked_fill(~live, n).sort(dim=-1).values
    return out.masked_fill(out == n, -1)


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distances ``1 - cos`` between tokens, in float32 (float64 for float64 input).

    Zero vectors are at distance 1 from every token (cosine 0). Values are clamped at 0, so duplicate
    tokens are exactly at distance 0.

    Args:
        features: (N, D) or (B, N, D) float tensor, any float dtype.

    Returns:
        (N, N) or (B, N, N) distances (float32 or float64); the diagonal is 0.

    Example:
        >>> cosine_distances(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])).tolist()
        [[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    """
    x, unbatched = _features(features)
    dist = _distances(*_unit(x))
    return dist[0] if unbatched else dist


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) features in float32 (float64 kept) and their (B, N, 1) norms."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x, torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _distances(x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """(B, N, N) clamped ``1 - cos`` with a zero diagonal from :func:`_unit`'s output."""
    x = x / norms.clamp_min(1e-12)
    dist = torch.baddbmm(torch.ones((), dtype=x.dtype, device=x.device), x, x.transpose(1, 2), alpha=-1.0)
    dist.clamp_(min=0.0).diagonal(dim1=1, dim2=2).zero_()
    return dist


def divprune_select(
    features: torch.Tensor,
    keep: int | float,
    mask: torch.Tensor | None = None,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """DivPrune: the ``M`` most diverse tokens by greedy max-min cosine distance.

    The first token is the one whose nearest other (valid) token is farthest; then each step adds the
    candidate whose smallest distance to the selected set is largest (running minimum: O(M N) per row
    after the distance matrix). Distances are ``1 - cos`` in float32 (float64 for float64 features),
    whatever the features' dtype; ties go to the lowest index.

    Args:
        features: (N, D) or (B, N, D) token features (DivPrune: the visual tokens after the
            multimodal projector, i.e. the LLM's input embeddings), any float dtype.
        keep: an ``int >= 1`` (tokens kept per row) or a ``float`` in ``(0, 1]`` (``round(keep * n)``
            of a row's ``n`` valid tokens, at least 1; the paper keeps 0.098, :data:`DIVPRUNE_KEEP`).
        mask: optional (B, N) (or (N,)) bool tensor, True for valid tokens, when rows have different
            token counts (padding). Invalid tokens are never selected nor used as anyone's nearest
            neighbour. With a ratio ``keep``, rows keep different counts and are right-padded with -1.
        progress: show a tqdm bar over the greedy steps.

    Returns:
        ``torch.long`` indices into N, ascending per row: (B, M) (M = the largest row count; rows with
        fewer are padded with -1), or (M,) for (N, D) input. On ``features.device``.

    Raises:
        DataError: features not (N, D) / (B, N, D) float, NaN or Inf in a valid token, a bad mask.
        VLPruneError: a bad ``keep`` (see :func:`keep_count`), including more than a row's valid tokens.

    Example:
        >>> x = torch.randn(2, 576, 64)
        >>> idx = divprune_select(x, keep=0.098)
        >>> idx.shape, bool((idx.diff(dim=-1) > 0).all())
        (torch.Size([2, 56]), True)
        >>> kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))   # (2, 56, 64)
    """
    x, unbatched = _features(features)
    batch, n, _ = x.shape
    valid = _valid_mask(mask, batch, n, x.device)
    counts = _row_counts(keep, valid, batch, n, "tokens")
    if valid is not None:
        x = x.masked_fill(~valid.unsqueeze(-1), 0)
    x, norms = _unit(x)
    if not bool(torch.isfinite(norms).all()):  # a NaN / Inf anywhere in a token makes its norm non-finite
        raise DataError(
            "features contain NaN or Inf"
            + (" in valid tokens" if valid is not None else "")
            + " (or a token whose norm overflows float32); DivPrune needs finite token features "
            "(check the model's dtype / overflow upstream)"
        )
    chosen = max_min_greedy(_distances(x, norms), max(counts), valid, progress=progress)
    out = _sorted_padded(chosen, counts, n)
    logger.debug("DivPrune kept %s of %d tokens per row", counts if len(set(counts)) > 1 else counts[0], n)
    return out[0] if unbatched else out


def max_min_greedy(
    dist: torch.Tensor, m: int, valid: torch.Tensor | None = None, *, progress: bool = False
) -> torch.Tensor:
    """DivPrune's greedy on a distance matrix (the part :func:`divprune_select` runs after
    :func:`cosine_distances`): O(M N) per row with a running minimum.

    Args:
        dist: (B, N, N) float distances, zero diagonal (overwritten: pass a copy to keep it).
        m: tokens to select per row (at most each row's valid count).
        valid: optional (B, N) bool mask of the tokens that may be selected / be nearest neighbours.
        progress: show a tqdm bar over the steps.

    Returns:
        (B, m) ``torch.long`` indices in selection order (not sorted).

    Example:
        >>> max_min_greedy(cosine_distances(torch.eye(3)[None] + 0.1), 2).tolist()
        [[0, 1]]
    """
    batch, n, _ = dist.shape
    inf = float("inf")
    # the first token: the farthest nearest other (valid) token
    dist.diagonal(dim1=1, dim2=2).fill_(inf)
    if valid is not None:
        # in place: invalid columns stay +inf, harmless later (their running minimum starts at -inf)
        nearest = dist.masked_fill_(~valid.unsqueeze(1), inf).amin(dim=-1).masked_fill_(~valid, -inf)
    else:
        nearest = dist.amin(dim=-1)
    # from now on the diagonal is -inf: the running minimum of a selected token drops to -inf as it
    # is selected, so it is never selected twice, without a separate bookkeeping step
    dist.diagonal(dim1=1, dim2=2).fill_(-inf)
    flat = dist.view(batch * n, n)
    offsets = torch.arange(batch, device=dist.device) * n if batch > 1 else None

    def row_of(idx: torch.Tensor) -> torch.Tensor:  # (B, N) distances of each row's token idx
        return flat.index_select(0, idx if offsets is None else idx + offsets)

    idx = nearest.argmax(dim=-1)  # first maximum: ties to the lowest index
    picked = [idx]
    score = row_of(idx)  # running min over the selected set (a fresh tensor)
    if valid is not None:
        score.masked_fill_(~valid, -inf)
    for _ in tqdm(range(1, m), desc="DivPrune", disable=not progress, leave=False):
        idx = score.argmax(dim=-1)
        picked.append(idx)
        torch.minimum(score, row_of(idx), out=score)
    return torch.stack(picked, dim=1)


def _image_mask(image: Any, batch: int, t: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool mask of image positions from a bool mask or integer positions."""
    if isinstance(image, (range, list, tuple)):
        image = torch.as_tensor(list(image), dtype=torch.long)
    if isinstance(image, slice):
        image = torch.arange(t)[image]
    if not isinstance(image, torch.Tensor) or image.dim() not in (1, 2) or image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(
            "image_positions must be a bool mask (T,) / (B, T) of image tokens or integer positions (P,) / (B, P), "
            f"got {got}"
        )
    image = image.to(device)
    if image.dtype == torch.bool:
        if image.shape[-1] != t or (image.dim() == 2 and image.shape[0] not in (1, batch)):
            raise DataError(f"the image-token mask must have shape ({t},) or ({batch}, {t}), got {tuple(image.shape)}")
        return image.reshape(-1, t).expand(batch, t)
    pos = image.reshape(-1, image.shape[-1]).long()
    if pos.shape[0] not in (1, batch):
        raise DataError(f"image positions must have shape (P,) or ({batch}, P), got {tuple(image.shape)}")
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= t):
        raise DataError(f"image positions must lie in [0, {t}) (the attention's sequence length), got {int(pos.min())}..{int(pos.max())}")
    out = torch.zeros(pos.shape[0], t, dtype=torch.bool, device=device)
    out.scatter_(1, pos, True)
    if int(out.sum(-1).min()) != pos.shape[1]:
        raise DataError("image positions repeat a position; give each image token once")
    return out.expand(batch, t)


def fastv_scores(attention: torch.Tensor) -> torch.Tensor:
    """FastV's score of every position: the head-averaged attention it receives from the last query.

    Args:
        attention: layer-(K-1) attention probabilities, (B, heads, Q, T) (the last query row is used)
            or just that row, (B, heads, T). Any float dtype; averaged in float32 (float64 kept).

    Returns:
        (B, T) float scores (higher = more attended = kept first).

    Example:
        >>> attn = torch.softmax(torch.randn(1, 8, 20, 20), dim=-1)
        >>> fastv_scores(attn).shape
        torch.Size([1, 20])
    """
    if not isinstance(attention, torch.Tensor) or attention.dim() not in (3, 4) or not attention.is_floating_point():
        got = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise DataError(
            "attention must be float attention weights (batch, heads, queries, keys) or the last query's row "
            f"(batch, heads, keys); got {got} (run the layer with output_attentions=True / eager attention)"
        )
    row = attention[:, :, -1, :] if attention.dim() == 4 else attention
    work = torch.float64 if row.dtype == torch.float64 else torch.float32
    row = row.to(work)
    if not bool(torch.isfinite(row).all()):
        raise DataError("attention contains NaN or Inf; FastV needs finite attention weights")
    return row.mean(dim=1)


def fastv_select(attention: torch.Tensor, image_positions: Any, keep: int | float) -> torch.Tensor:
    """FastV's ranking: the image tokens most attended by the last query token (layer K-1).

    Image tokens are ordered by the head-averaged attention they receive from the last query row
    (descending; ties to the lowest position) and the top ``M`` are kept; text tokens are not
    ranked (FastV keeps them all). FastV keeps :data:`FASTV_KEEP` = 0.5 at layer :data:`FASTV_LAYER`.

    Args:
        attention: (B, heads, Q, T) attention weights of layer K-1, or the last query's row
            (B, heads, T); see :func:`fastv_scores`.
        image_positions: which positions are image tokens: a bool mask (T,) / (B, T), integer
            positions (P,) / (B, P), or a ``range`` / ``slice`` / list of positions.
        keep: an int count or a ratio in (0, 1] of each row's image tokens (see :func:`keep_count`).

    Returns:
        ``torch.long`` positions in T of the kept image tokens, ascending, (B, M); rows with fewer
        (per-row masks and a ratio) are right-padded with -1.

    Raises:
        DataError: bad attention / positions shape, NaN or Inf in the attention.
        VLPruneError: a bad ``keep``.

    Example:
        >>> attn = torch.softmax(torch.randn(1, 8, 40, 40), dim=-1)
        >>> fastv_select(attn, range(5, 29), keep=0.5).shape    # 24 image tokens at 5..28
        torch.Size([1, 12])
    """
    scores = fastv_scores(attention)
    batch, t = scores.shape
    image = _image_mask(image_positions, batch, t, scores.device)
    counts = _row_counts(keep, image, batch, t, "image tokens")
    ranked = scores.masked_fill(~image, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    return _sorted_padded(ranked[:, : max(counts)], counts, t)


def _rows(batch: int | None) -> int:
    if batch is None:
        return 1
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise VLPruneError(f"batch must be an int >= 1 or None (one unbatched row), got {batch!r}")
    return int(batch)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise VLPruneError(f"n must be the number of tokens (an int), got {n!r}")
    return int(n)


def random_select(
    n: int,
    keep: int | float,
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    batch: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random baseline: ``M`` of ``n`` tokens drawn uniformly without replacement.

    Args:
        n: number of tokens.
        keep: an int count or a ratio in (0, 1] (see :func:`keep_count`).
        seed: seed of a fresh CPU generator (the default 0 makes calls reproducible); ignored when
            ``generator`` is given.
        generator: a ``torch.Generator`` (CPU) to draw from; successive calls then differ.
        batch: None for one (M,) row, or a number of independent rows (batch, M).
        device: where the result goes (default CPU).

    Returns:
        ``torch.long`` indices, ascending: (M,) or (batch, M).

    Example:
        >>> random_select(10, 3, seed=1).tolist() == random_select(10, 3, seed=1).tolist()
        True
    """
    n = _check_n(n)
    m = keep_count(keep, n)
    rows = _rows(batch)
    if generator is None:
        if seed is None:
            raise VLPruneError("random_select needs a seed or a torch.Generator (determinism); got seed=None and no generator")
        generator = torch.Generator().manual_seed(int(seed))
    out = torch.stack([torch.randperm(n, generator=generator)[:m] for _ in range(rows)]).sort(dim=-1).values
    out = out.to(device) if device is not None else out
    return out[0] if batch is None else out


def uniform_select(
    n: int,
    keep: int | float,
    *,
    batch: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform-stride baseline: ``floor(i * n / M)`` for ``i = 0 .. M-1`` (every ``n/M``-th token from 0).

    Args:
        n: number of tokens.
        keep: an int count or a ratio in (0, 1] (see :func:`keep_count`).
        batch: None for one (M,) row, or a number of identical rows (batch, M).
        device: where the result goes (default CPU).

    Returns:
        ``torch.long`` indices, ascending and distinct: (M,) or (batch, M).

    Example:
        >>> uniform_select(10, 4).tolist()
        [0, 2, 5, 7]
    """
    n = _check_n(n)
    m = keep_count(keep, n)
    rows = _rows(batch)
    out = torch.div(torch.arange(m, device=device) * n, m, rounding_mode="floor")
    return out if batch is None else out.unsqueeze(0).expand(rows, m).clone()


@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register ``divprune``, ``fastv``, ``random_tokens`` and ``uniform_tokens``."""
    adapter = "vlprune.adapters.hf.token_pruning:"
    here = "vlprune.plugins.token_diversity:"
    return [
        CriterionSpec(
            name="divprune",
            level="token",
            needs="none",
            adapters={"hf_tokens": adapter + "DivPrune"},
            description="max-min cosine diversity of the visual tokens after the projector (greedy); training-free",
            source="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025",
            factory=here + "divprune_select",
        ),
        CriterionSpec(
            name="fastv",
            level="token",
            needs="none",
            adapters={"hf_tokens": adapter + "FastV"},
            description="image tokens most attended by the last token at layer K-1 (run-time attention), dropped from layer K",
            source="Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024",
            factory=here + "fastv_select",
        ),
        CriterionSpec(
            name="random_tokens",
            level="token",
            needs="none",
            adapters={"hf_tokens": adapter + "RandomTokens"},
            description="seeded random subset of the visual tokens (baseline)",
            source="baseline",
            factory=here + "random_select",
        ),
        CriterionSpec(
            name="uniform_tokens",
            level="token",
            needs="none",
            adapters={"hf_tokens": adapter + "UniformTokens"},
            description="every (n/M)-th visual token, uniform stride (baseline)",
            source="baseline",
            factory=here + "uniform_select",
        ),
    ]
