"""DivPrune max-min selection, FastV ranking and the random / uniform token baselines."""

from __future__ import annotations

import math

import pytest
import torch

import vlprune
from vlprune.errors import DataError, VLPruneError
from vlprune.plugins.token_diversity import (
    cosine_distances,
    divprune_select,
    max_min_greedy,
    fastv_select,
    keep_count,
    random_select,
    uniform_select,
)


def reference_greedy(features: torch.Tensor, m: int) -> list[int]:
    """Straightforward DivPrune on one (N, D) row, in float64: cosine distances from
    F.cosine_similarity pair by pair; the first token has the farthest nearest neighbour; then at
    every step the min over the whole selected set is recomputed for every candidate."""
    x = features.double()
    n = x.shape[0]
    dist = 1 - torch.nn.functional.cosine_similarity(x.unsqueeze(1), x.unsqueeze(0), dim=-1)
    selected: list[int] = []
    for _ in range(m):
        best, best_j = -math.inf, -1
        for j in range(n):
            if j in selected:
                continue
            if not selected:
                value = min((float(dist[j, k]) for k in range(n) if k != j), default=math.inf)
            else:
                value = min(float(dist[s, j]) for s in selected)
            if value > best:  # strict: ties go to the lowest index
                best, best_j = value, j
        selected.append(best_j)
    return sorted(selected)


def circle(angles: list[float]) -> torch.Tensor:
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


# hand-computed: nearest-neighbour angles 0.25, 0.25, 1.2, 0.4, 0.4, 1.4 -> 4.75 first; then the
# running min (in angle) picks 1.45 (2.98 away), 2.95 (1.5 vs 1.45 / 1.2 / 1.4), 0.0 (1.45 vs 1.2 / 0.4),
# 3.35 (0.4 vs 0.25), 0.25.
CIRCLE = [0.0, 0.25, 1.45, 2.95, 3.35, 4.75]
CIRCLE_ORDER = [5, 2, 3, 0, 4, 1]


@pytest.mark.parametrize("m", range(1, 7))
def test_points_on_a_circle_hand_computed(m: int) -> None:
    assert divprune_select(circle(CIRCLE), m).tolist() == sorted(CIRCLE_ORDER[:m])
    # cosine distance ignores the norm: scaled tokens give the same choice
    scaled = circle(CIRCLE) * torch.tensor([[1.0], [5.0], [0.1], [3.0], [2.0], [0.7]])
    assert divprune_select(scaled, m).tolist() == sorted(CIRCLE_ORDER[:m])


def test_greedy_selection_order_on_the_circle() -> None:
    dist = cosine_distances(circle(CIRCLE).unsqueeze(0))
    assert max_min_greedy(dist, 6).tolist() == [CIRCLE_ORDER]


@pytest.mark.parametrize("seed,n,d,m", [(0, 40, 8, 10), (1, 64, 16, 63), (2, 30, 3, 15), (3, 50, 32, 1), (4, 25, 5, 25)])
def test_matches_the_straightforward_greedy(seed: int, n: int, d: int, m: int) -> None:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    got = divprune_select(x, m)
    assert got.dtype == torch.long and got.shape == (m,)
    assert got.tolist() == reference_greedy(x, m)


def test_kept_tokens_are_more_diverse_than_the_baselines() -> None:
    # two tight clusters of 20 and one far outlier: max-min keeps the outlier and both clusters
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0, 0]) + 0.01 * torch.randn(20, 3, generator=g)
    b = torch.tensor([0, 1.0, 0]) + 0.01 * torch.randn(20, 3, generator=g)
    x = torch.cat([a, b, torch.tensor([[0, 0, 1.0]])])
    idx = divprune_select(x, 3).tolist()
    assert idx[-1] == 40 and sum(i < 20 for i in idx) == 1 and sum(20 <= i < 40 for i in idx) == 1

    def min_pairwise(sel: torch.Tensor) -> float:
        dist = cosine_distances(x[sel])
        return float(dist.masked_fill(torch.eye(len(sel), dtype=torch.bool), math.inf).min())

    assert min_pairwise(divprune_select(x, 3)) > max(min_pairwise(uniform_select(41, 3)), min_pairwise(random_select(41, 3)))


def test_batch_equals_per_row_loop_and_unbatched_shape() -> None:
    x = torch.randn(5, 60, 12, generator=torch.Generator().manual_seed(3))
    batched = divprune_select(x, 0.25)
    assert batched.shape == (5, 15)
    for b in range(5):
        assert batched[b].tolist() == divprune_select(x[b], 0.25).tolist() == reference_greedy(x[b], 15)


def test_sorted_distinct_in_range() -> None:
    x = torch.randn(3, 100, 6, generator=torch.Generator().manual_seed(4))
    idx = divprune_select(x, 37)
    assert bool((idx.diff(dim=-1) > 0).all()) and int(idx.min()) >= 0 and int(idx.max()) < 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_measured_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(2, 80, 32, generator=torch.Generator().manual_seed(5))
    low = x.to(dtype)
    # the same numbers as float32 give exactly the same choice (distances are not taken in `dtype`)
    assert divprune_select(low, 20).tolist() == divprune_select(low.float(), 20).tolist()
    # well separated tokens (on a circle, >= 0.05 rad apart): half precision changes nothing
    assert divprune_select(circle(CIRCLE).to(dtype), 4).tolist() == sorted(CIRCLE_ORDER[:4])
    assert cosine_distances(low).dtype == torch.float32
    assert cosine_distances(x.double()).dtype == torch.float64


def test_duplicates_and_ties_are_deterministic_and_never_selected_twice() -> None:
    # four identical tokens: all distances 0; ties go to the lowest index, each index once
    same = torch.ones(4, 3)
    assert divprune_select(same, 4).tolist() == [0, 1, 2, 3]
    assert divprune_select(same, 2).tolist() == [0, 1]
    # a duplicated pair: the copy is taken only once everything else is
    x = torch.cat([circle(CIRCLE), circle(CIRCLE)[2:3]])  # token 6 == token 2
    assert divprune_select(x, 6).tolist() == [0, 1, 2, 3, 4, 5]
    # the square's corners: every token ties at the start; lowest index first, then its opposite
    square = circle([0.0, math.pi / 2, math.pi, 3 * math.pi / 2])
    assert divprune_select(square, 2).tolist() == [0, 2]
    assert divprune_select(square, 2).tolist() == divprune_select(square, 2).tolist()


def test_mask_excludes_padding_and_matches_the_unpadded_rows() -> None:
    g = torch.Generator().manual_seed(6)
    rows = [torch.randn(30, 8, generator=g), torch.randn(18, 8, generator=g)]
    x = torch.zeros(2, 30, 8)
    x[0], x[1, :18] = rows[0], rows[1]
    x[1, 18:] = float("nan")  # padding may hold anything, even NaN
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0], mask[1, :18] = True, True
    # an int keep: the same M in every row
    idx = divprune_select(x, 6, mask=mask)
    assert idx.shape == (2, 6)
    for b in range(2):
        assert idx[b].tolist() == divprune_select(rows[b], 6).tolist() == reference_greedy(rows[b], 6)
    # a ratio: per-row counts round(0.5 * n_valid) = 15 and 9, padded with -1 at the end
    idx = divprune_select(x, 0.5, mask=mask)
    assert idx.shape == (2, 15)
    assert idx[0].tolist() == divprune_select(rows[0], 15).tolist()
    assert idx[1, :9].tolist() == divprune_select(rows[1], 9).tolist() and idx[1, 9:].tolist() == [-1] * 6
    # padding is nobody's nearest neighbour: three tokens >= 2 rad apart (cosine distance > 1) and
    # zero padding (distance 1 to all) -- the first token is still the one farthest from the others
    wide = torch.zeros(1, 5, 2)
    wide[0, :3] = circle([0.0, 2.0, 4.1])
    assert divprune_select(wide[0, :3], 1).tolist() == [2]
    assert divprune_select(wide, 1, mask=torch.tensor([[True, True, True, False, False]])).tolist() == [[2]]
    # an all-True mask is the unmasked call
    assert divprune_select(x[:1], 5, mask=torch.ones(1, 30, dtype=torch.bool)).tolist() == divprune_select(x[:1], 5).tolist()


def test_single_token_and_keep_all() -> None:
    assert divprune_select(torch.randn(1, 4), 1).tolist() == [0]
    x = torch.randn(9, 4)
    assert divprune_select(x, 1.0).tolist() == list(range(9))
    assert divprune_select(x, 9).tolist() == list(range(9))


def test_keep_count_rounds_like_the_paper_and_refuses_bad_values() -> None:
    assert keep_count(0.098, 576) == 56 and keep_count(0.5, 5) == 2 and keep_count(0.001, 10) == 1
    assert keep_count(1.0, 7) == 7 and keep_count(1, 7) == 1
    for bad in (0, -3, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(VLPruneError, match="keep"):
            keep_count(bad, 10)
    with pytest.raises(VLPruneError, match="more tokens than there are"):
        keep_count(11, 10)
    with pytest.raises(VLPruneError, match="pass the int 58"):
        keep_count(58.0, 576)


def test_bad_inputs_say_what_to_do() -> None:
    x = torch.randn(2, 10, 4)
    with pytest.raises(VLPruneError, match="at most 10"):
        divprune_select(x, 11)
    with pytest.raises(VLPruneError, match="keep=0 keeps no tokens"):
        divprune_select(x, 0)
    with pytest.raises(VLPruneError, match=r"ratio in \(0, 1\]"):
        divprune_select(x, 1.2)
    with pytest.raises(VLPruneError, match="keep must be"):
        divprune_select(x, True)
    nan = x.clone()
    nan[1, 3, 0] = float("nan")
    with pytest.raises(DataError, match="NaN or Inf"):
        divprune_select(nan, 3)
    with pytest.raises(DataError, match="shape"):
        divprune_select(torch.randn(10), 3)
    with pytest.raises(DataError, match="float tensor"):
        divprune_select(torch.ones(10, 4, dtype=torch.long), 3)
    with pytest.raises(DataError, match=r"mask must have shape \(2, 10\)"):
        divprune_select(x, 3, mask=torch.ones(2, 9, dtype=torch.bool))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 2:] = False
    with pytest.raises(VLPruneError, match="row 1 of the batch .2 valid tokens.*at most 2"):
        divprune_select(x, 3, mask=mask)
    mask[1] = False
    with pytest.raises(DataError, match="row 1 .*no tokens"):
        divprune_select(x, 0.5, mask=mask)


# ---------------------------------------------------------------- FastV


def test_fastv_keeps_the_image_tokens_most_attended_by_the_last_token() -> None:
    b, h, t = 2, 4, 12
    attn = torch.softmax(torch.randn(b, h, t, t, generator=torch.Generator().manual_seed(7)), dim=-1)
    image = range(3, 9)  # six image tokens at positions 3..8
    got = fastv_select(attn, image, 0.5)
    for row in range(b):
        received = {p: sum(float(attn[row, k, t - 1, p]) for k in range(h)) / h for p in image}
        top = sorted(sorted(received, key=lambda p: -received[p])[:3])
        assert got[row].tolist() == top
    # the same from the last row only, a bool mask and explicit positions
    last = attn[:, :, -1, :]
    mask = torch.zeros(t, dtype=torch.bool)
    mask[3:9] = True
    assert fastv_select(last, mask, 3).tolist() == got.tolist()
    assert fastv_select(attn, torch.arange(3, 9), 3).tolist() == got.tolist()
    assert fastv_select(attn.half(), image, 0.5).shape == (2, 3)


def test_fastv_never_keeps_text_tokens_and_breaks_ties_by_position() -> None:
    attn = torch.zeros(1, 2, 1, 8)
    attn[..., 0] = 0.9  # a heavily attended text token (the usual attention sink)
    attn[..., 2:6] = 0.025  # four image tokens, all equal
    assert fastv_select(attn, range(2, 6), 2).tolist() == [[2, 3]]
    # one head attends image token 5 strongly: the head average picks it
    attn[0, 1, 0, 5] = 0.5
    assert fastv_select(attn, range(2, 6), 2).tolist() == [[2, 5]]
    # the mean over heads, not the max: 0.3 from one head loses to 0.2 from two of three heads
    attn = torch.zeros(1, 3, 1, 6)
    attn[0, 0, 0, 3] = 0.3
    attn[0, 1:, 0, 4] = 0.2
    assert fastv_select(attn, range(2, 6), 1).tolist() == [[4]]


def test_fastv_per_row_image_masks_pad_with_minus_one() -> None:
    attn = torch.softmax(torch.randn(2, 2, 10, 10, generator=torch.Generator().manual_seed(8)), dim=-1)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 1:9] = True  # 8 image tokens
    mask[1, 1:5] = True  # 4 image tokens
    out = fastv_select(attn, mask, 0.5)
    assert out.shape == (2, 4) and out[1, 2:].tolist() == [-1, -1]
    assert bool(mask[0, out[0]].all()) and bool(mask[1, out[1, :2]].all())


def test_fastv_bad_inputs() -> None:
    attn = torch.softmax(torch.randn(1, 2, 6, 6), dim=-1)
    with pytest.raises(DataError, match="attention must be"):
        fastv_select(attn[0, 0], range(2, 4), 1)
    with pytest.raises(DataError, match=r"in \[0, 6\)"):
        fastv_select(attn, [2, 6], 1)
    with pytest.raises(DataError, match="repeat"):
        fastv_select(attn, [2, 2], 1)
    with pytest.raises(VLPruneError, match="more image tokens than there are"):
        fastv_select(attn, range(2, 4), 3)
    bad = attn.clone()
    bad[0, 0, -1, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        fastv_select(bad, range(2, 4), 1)


# ---------------------------------------------------------------- baselines


def test_random_select_is_seeded_sorted_and_uniformly_spread() -> None:
    a, b = random_select(100, 10, seed=3), random_select(100, 10, seed=3)
    assert a.tolist() == b.tolist() and a.shape == (10,) and bool((a.diff() > 0).all())
    assert random_select(100, 10, seed=4).tolist() != a.tolist()
    g = torch.Generator().manual_seed(0)
    rows = random_select(100, 0.1, generator=g, batch=4)
    assert rows.shape == (4, 10) and len({tuple(r) for r in rows.tolist()}) == 4
    # every token is about equally likely: 2000 draws of 10 of 20 -> each ~1000 times
    counts = torch.bincount(random_select(20, 10, seed=0, batch=2000).flatten(), minlength=20)
    assert int(counts.min()) > 900 and int(counts.max()) < 1100
    with pytest.raises(VLPruneError, match="seed or a torch.Generator"):
        random_select(10, 3, seed=None)


def test_uniform_select_is_a_stride() -> None:
    assert uniform_select(576, 0.5).tolist() == list(range(0, 576, 2))
    assert uniform_select(576, 144).tolist() == list(range(0, 576, 4))
    assert uniform_select(10, 4).tolist() == [0, 2, 5, 7]
    assert uniform_select(7, 1.0).tolist() == list(range(7))
    assert uniform_select(10, 3, batch=2).tolist() == [[0, 3, 6], [0, 3, 6]]
    for n, m in [(13, 5), (100, 7), (576, 56)]:
        idx = uniform_select(n, m)
        gaps = idx.diff()
        assert len(set(idx.tolist())) == m and int(gaps.max()) - int(gaps.min()) <= 1
    with pytest.raises(VLPruneError, match="at most 10"):
        uniform_select(10, 11)
    with pytest.raises(VLPruneError, match="batch must be"):
        uniform_select(10, 3, batch=0)


def test_registered_as_token_criteria() -> None:
    specs = {s.name: s for s in vlprune.criteria()}
    for name, cls in [("divprune", "DivPrune"), ("fastv", "FastV"), ("random_tokens", "RandomTokens"), ("uniform_tokens", "UniformTokens")]:
        assert specs[name].level == "token" and specs[name].needs == "none"
        assert specs[name].adapters == {"hf_tokens": f"vlprune.adapters.hf.token_pruning:{cls}"}
    x = circle(CIRCLE)
    assert vlprune.get_criterion("divprune", features=x, keep=3).tolist() == sorted(CIRCLE_ORDER[:3])
    assert vlprune.get_criterion("uniform_tokens", n=8, keep=4).tolist() == [0, 2, 4, 6]


def test_features_that_require_grad_are_selected_like_detached_ones() -> None:
    feats = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.equal(divprune_select(feats, keep=7), divprune_select(feats.detach(), keep=7))
