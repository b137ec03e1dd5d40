"""TwoNN against scikit-dimension, and per-layer profiles against hooks + skdim."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import skdim
import torch
from sklearn.datasets import make_swiss_roll

from tests.conftest import batches_for
from vlprune import DataError, IDProfile, ModelStructureError, VLPruneError
from vlprune.plugins.intrinsic_dim import (
    drop_duplicate_rows,
    estimate_ids,
    nearest_neighbour_distances,
    twonn,
    twonn_block_average,
)
from vlprune.testbed.tiny import tiny_model


def _skdim(x: np.ndarray, discard_fraction: float = 0.1, method: str = "linear") -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skdim.id.TwoNN(discard_fraction=discard_fraction, method=method).fit(x).dimension_)


def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(900, 6))
    return {
        "linear_subspace_high_d": (rng.normal(size=(1200, 8)) @ rng.normal(size=(8, 768)) + 3.0),
        "swiss_roll": make_swiss_roll(1200, noise=0.0, random_state=0)[0],
        "hypercube": rng.uniform(size=(1200, 10)),
        "gaussian": rng.normal(size=(1200, 15)),
        "duplicated_rows": np.concatenate([base, base[:300], base[:50]]),
    }


@pytest.mark.parametrize("name", list(_datasets()))
@pytest.mark.parametrize("method,discard", [("linear", 0.1), ("linear", 0.25), ("mle", 0.1), ("mle", 0.0)])
def test_twonn_agrees_with_skdim(name: str, method: str, discard: float) -> None:
    x = _datasets()[name]
    reference = _skdim(np.unique(x, axis=0), discard, method)  # skdim drops every copy; compare on distinct rows
    for dtype in (torch.float64, torch.float32):
        ours = twonn(torch.as_tensor(x, dtype=dtype), discard_fraction=discard, method=method)
        ref = reference if dtype == torch.float64 else _skdim(np.unique(x.astype(np.float32), axis=0), discard, method)
        assert ours == pytest.approx(ref, rel=1e-3), (name, dtype)


def test_twonn_recovers_known_dimensions() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 5)) @ rng.normal(size=(5, 300))
    assert twonn(torch.tensor(x)) == pytest.approx(5.0, rel=0.1)


def test_large_offset_needs_centring() -> None:
    # points far from the origin: uncentred float32 |x|^2 - 2xy cancels catastrophically
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 4)) @ rng.normal(size=(4, 64)) * 1e-2 + 1e3
    ref = _skdim(x.astype(np.float64))
    assert twonn(torch.tensor(x, dtype=torch.float64)) == pytest.approx(ref, rel=1e-3)


def test_nearest_neighbours_exact_against_cdist() -> None:
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(300, 40)))
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    expected = torch.sort(d, dim=1).values[:, :2]
    got = nearest_neighbour_distances(x, chunk_size=37)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_fp16_and_bf16_inputs_are_upcast() -> None:
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(600, 6)) @ rng.normal(size=(6, 50)), dtype=torch.float16)
    ref = _skdim(np.unique(x.double().numpy(), axis=0))
    assert twonn(x) == pytest.approx(ref, rel=1e-3)
    assert np.isfinite(twonn(x.to(torch.bfloat16)))


def test_drop_duplicate_rows_keeps_first_copies_in_order() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0], [3.0, 4.0]])
    torch.testing.assert_close(drop_duplicate_rows(x), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(DataError, match="at least 3 distinct"):
        twonn(torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]))
    x = torch.randn(50, 4)
    x[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        twonn(x)
    with pytest.raises(VLPruneError, match="method"):
        twonn(torch.randn(50, 4), method="bogus")  # type: ignore[arg-type]
    with pytest.raises(VLPruneError, match="discard_fraction"):
        twonn(torch.randn(50, 4), discard_fraction=1.0)
    with pytest.raises(DataError):
        twonn(torch.randn(50))


def test_block_average_matches_manual_partition() -> None:
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(400, 7)))
    g = torch.Generator().manual_seed(11)
    got = twonn_block_average(x, n_blocks=3, generator=g)
    g = torch.Generator().manual_seed(11)
    per = []
    for b in (1, 2, 3):
        perm = torch.randperm(400, generator=g)
        per.append(np.mean([_skdim(x[idx].numpy()) for idx in torch.chunk(perm, b)]))
    assert got == pytest.approx(float(np.mean(per)), rel=1e-3)


def _hooked_rows(model: torch.nn.Module, batches: list[dict], names: list[str]) -> dict[str, np.ndarray]:
    """Independent reference: plain forward hooks storing each module's whole output per sample."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_hook(lambda _m, _i, out, n=n: store[n].append(out.detach().flatten(1).clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v).double().numpy() for n, v in store.items()}


def test_estimate_ids_matches_hooks_plus_skdim() -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=6, batch_size=10)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    profile = estimate_ids(model, batches, names, n_samples=60, progress=False)
    rows = _hooked_rows(model, batches, names)
    assert list(profile.layers) == names
    for name in names:
        ref = _skdim(np.unique(rows[name], axis=0))
        assert profile[name] == pytest.approx(ref, rel=1e-3), name
        assert profile.layers[name].n_samples == len(np.unique(rows[name], axis=0))


def test_memory_bounded_passes_give_identical_estimates() -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=4, batch_size=10)
    one_pass = estimate_ids(model, batches, n_samples=40, progress=False)
    many_passes = estimate_ids(model, batches, n_samples=40, max_memory_mb=0.05, progress=False)
    assert one_pass.ids() == many_passes.ids()


@pytest.mark.filterwarnings("ignore:estimate_ids. n_samples")  # n_samples=10_000: every row
@pytest.mark.parametrize("representation", ["cls", "mean", "tokens"])
def test_representations_match_manual(representation: str) -> None:
    model = tiny_model("vit")
    batches = batches_for("vit", n_batches=3, batch_size=12)
    name = "vit.encoder.layer.0.output.dense" if "vit.encoder.layer.0.output.dense" in dict(model.named_modules()) else None
    if name is None:
        name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][3]
    outs: list[torch.Tensor] = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    full = torch.cat(outs)
    manual = {"cls": full[:, 0], "mean": full.mean(1), "tokens": full.reshape(-1, full.shape[-1])}[representation]
    profile = estimate_ids(model, batches, [name], n_samples=10_000, representation=representation, progress=False)  # type: ignore[arg-type]
    assert profile[name] == pytest.approx(_skdim(np.unique(manual.double().numpy(), axis=0)), rel=1e-3)


@pytest.mark.filterwarnings("ignore:estimate_ids. n_samples")  # n_samples=10_000: every row
def test_padding_mask_excludes_padded_tokens() -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=3, batch_size=10)
    for b in batches:
        b["attention_mask"][:, 8:] = 0
    name = "text_model.encoder.layers.0.mlp.fc1"
    profile = estimate_ids(model, batches, [name], n_samples=10_000, representation="tokens", progress=False)
    outs: list[torch.Tensor] = []
    h = dict(model.named_modules())[name].register_forward_hook(lambda _m, _i, o: outs.append(o.detach()[:, :8]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    real_tokens = torch.cat(outs).reshape(-1, 64).double().numpy()
    assert profile.layers[name].n_samples == len(np.unique(real_tokens, axis=0))
    assert profile[name] == pytest.approx(_skdim(np.unique(real_tokens, axis=0)), rel=1e-3)


def test_fp16_and_bf16_models_work() -> None:
    batches = batches_for("vit", n_batches=2, batch_size=16)
    for dtype in (torch.bfloat16, torch.float16):
        model = tiny_model("vit").to(dtype)
        cast = [{k: v.to(dtype) for k, v in b.items()} for b in batches]
        profile = estimate_ids(model, cast, "*.fc1" if any(n.endswith("fc1") for n, _ in model.named_modules()) else None, n_samples=32, progress=False)
        assert all(np.isfinite(v) and v > 0 for v in profile.ids().values())
        assert next(model.parameters()).dtype == dtype


def test_estimate_ids_bad_input() -> None:
    model = tiny_model("clip")
    with pytest.raises(DataError, match="empty"):
        estimate_ids(model, [], progress=False)
    with pytest.raises(ModelStructureError, match="matches no module"):
        estimate_ids(model, batches_for("clip", 1), ["no.such.module"], progress=False)
    with pytest.raises(ModelStructureError, match="matches no module"):
        estimate_ids(model, batches_for("clip", 1), ["*.nothing_like_this"], progress=False)
    with torch.no_grad():
        model.text_model.encoder.layers[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        estimate_ids(model, batches_for("clip", 1), ["text_model.encoder.layers.0.mlp.fc1"], progress=False)


def test_estimate_ids_leaves_model_mode_and_hooks_alone() -> None:
    model = tiny_model("clip").train()
    estimate_ids(model, batches_for("clip", 1), ["*.fc1"], n_samples=8, progress=False)
    assert model.training and model.text_model.encoder.layers[0].mlp.training
    assert not any(m._forward_hooks for m in model.modules())


def test_profile_json_round_trip_and_plot(tmp_path) -> None:
    model = tiny_model("clip")
    profile = estimate_ids(model, batches_for("clip", 2), ["*.fc1", "*.fc2"], n_samples=16, progress=False)
    again = IDProfile.from_json(profile.to_json(tmp_path / "id.json"))
    assert again == profile
    png = profile.plot(tmp_path / "id.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(VLPruneError):
        (tmp_path / "bad.json").write_text("{}")
        IDProfile.from_json(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------
# the GEMM-speed exact kernel (vlprune.plugins._neighbours): exact to float64 rounding
# ---------------------------------------------------------------------------------------------


def _exact_knn_reference(x: np.ndarray, k: int = 2) -> np.ndarray:
    """Independent float64 reference: direct differences to every other row, no matrix product."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty((len(x), k))
    for i in range(len(x)):
        d = np.sqrt(((x - x[i]) ** 2).sum(axis=1))
        d[i] = np.inf
        out[i] = np.sort(d)[:k]
    return out


def _exact_twonn_reference(x: np.ndarray, discard: float = 0.1, method: str = "linear") -> float:
    """skdim's fit on exact float64 (r1, r2) of the distinct rows."""
    r = _exact_knn_reference(np.unique(np.asarray(x, dtype=np.float64), axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skdim.id.TwoNN(discard_fraction=discard, method=method, dist=True).fit(r).dimension_)


@functools.lru_cache(maxsize=1)
def _tight_datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0), np.arange(6.0)), -1).reshape(-1, 3)
    base = rng.normal(size=(700, 30))
    return {
        "curved_768": np.tanh(rng.normal(size=(600, 10)) @ rng.normal(size=(10, 768)) / 3) + 0.01 * rng.normal(size=(600, 768)),
        # lattice sites with a partner at 0.2 to 0.5 (the 1st neighbour); the 2nd, 3rd, ... neighbours are
        # lattice sites at distance ~1, tied up to a 1e-9 jitter: their order is decided below float32 precision
        "near_ties_lattice": np.concatenate(
            [
                np.concatenate([grid, np.zeros((len(grid), 37))], 1),
                np.concatenate([grid, np.zeros((len(grid), 37))], 1)
                + rng.uniform(0.2, 0.5, (len(grid), 1)) * np.linalg.qr(rng.normal(size=(40, 40)))[0][:, :1].T,
            ]
        )
        + 1e-9 * rng.normal(size=(2 * len(grid), 40)),
        "duplicates": np.concatenate([base, base[:200], base[:40], base[5:6]]),
        "gaussian_64": rng.normal(size=(1000, 64)),
    }


@pytest.mark.parametrize("name", list(_tight_datasets()))
def test_twonn_agrees_with_skdim_to_1e6(name: str) -> None:
    x = _tight_datasets()[name]
    for method, discard in (("linear", 0.1), ("mle", 0.0)):
        reference = _skdim(np.unique(x, axis=0), discard, method)
        assert reference == pytest.approx(_exact_twonn_reference(x, discard, method), rel=1e-9)  # skdim is exact here
        assert twonn(torch.tensor(x), discard, method) == pytest.approx(reference, rel=1e-6), (name, method)
        x32 = x.astype(np.float32)
        assert twonn(torch.tensor(x32), discard, method) == pytest.approx(
            _skdim(np.unique(x32.astype(np.float64), axis=0), discard, method), rel=1e-6
        ), (name, method, "float32 input")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_twonn_exact_far_from_the_origin(dtype: type) -> None:
    # spread 1e-2 at offset 1e4: |x|^2 + |y|^2 - 2 x.y without centring cancels every digit
    rng = np.random.default_rng(21)
    x = (rng.normal(size=(800, 5)) @ rng.normal(size=(5, 96)) * 1e-2 + 1e4 * rng.uniform(0.5, 1.0, 96)).astype(dtype)
    x64 = x.astype(np.float64)
    ours = twonn(torch.tensor(x))
    assert ours == pytest.approx(_exact_twonn_reference(x64), rel=1e-9)
    assert ours == pytest.approx(_skdim(np.unique(x64, axis=0) - x64.mean(0)), rel=1e-6)  # skdim on centred data
    torch.testing.assert_close(
        nearest_neighbour_distances(torch.tensor(x)), torch.tensor(_exact_knn_reference(x64)), rtol=1e-12, atol=0
    )


def _misordered_data() -> np.ndarray:
    """Clusters (1st neighbour at 1, 2nd at 1.2 to 1.4, 3rd at 1.25 to 1.45) far apart in a cloud
    of norm ~1e4: the float32 error of a squared distance (~u |x|^2 ~ 10) dwarfs the gaps."""
    rng = np.random.default_rng(22)
    dim = 32
    centres = rng.normal(size=(150, dim)) * 2000.0
    points = []
    for c in centres:
        dirs = np.linalg.qr(rng.normal(size=(dim, 3)))[0].T
        r2 = rng.uniform(1.2, 1.4)
        points += [c, c + dirs[0], c + r2 * dirs[1], c + (r2 + 0.05) * dirs[2]]
    return np.asarray(points)


def test_ambiguous_float32_margins_are_rechecked_exactly() -> None:
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances

    x = _misordered_data()
    exact = _exact_knn_reference(x, 3)
    # a plain float32 search really gets the 2nd/3rd neighbour order wrong on these data
    x32 = torch.tensor(x - x.mean(0), dtype=torch.float32)
    sq = (x32 * x32).sum(1)
    d2_32 = sq[:, None] + sq[None, :] - 2 * x32 @ x32.T
    d2_32.fill_diagonal_(float("inf"))
    naive_r2 = torch.topk(d2_32, 2, largest=False).values[:, 1].clamp_min(0).sqrt().double().numpy()
    assert np.abs(naive_r2 - exact[:, 1]).max() > 0.04
    # ... the kernel notices the ambiguous margins, re-checks those rows and returns the exact distances
    stats = NeighbourStats()
    got = knn_distances(torch.tensor(x), 2, stats=stats)
    assert stats.rechecked > 0 and stats.search_dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(exact[:, :2]), rtol=1e-12, atol=0)
    assert twonn(torch.tensor(x)) == pytest.approx(_exact_twonn_reference(x), rel=1e-9)


def test_chunked_equals_unchunked() -> None:
    x = torch.tensor(_tight_datasets()["curved_768"])
    whole = nearest_neighbour_distances(x, chunk_size=x.shape[0])
    for chunk in (7, 256):
        assert torch.equal(nearest_neighbour_distances(x, chunk_size=chunk), whole), chunk
    assert twonn(x, chunk_size=37) == twonn(x)


def test_float64_search_and_reduced_matmul_precision_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprune.plugins import _neighbours
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances

    x = torch.tensor(_misordered_data())
    exact = torch.tensor(_exact_knn_reference(x.numpy()))
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # may round GEMM inputs to bf16: the bound widens
        stats = NeighbourStats()
        torch.testing.assert_close(knn_distances(x, 2, stats=stats), exact, rtol=1e-12, atol=0)
        assert stats.error_constant > 2**-8
    finally:
        torch.set_float32_matmul_precision(previous)
    monkeypatch.setattr(_neighbours, "_MAX_C", 0.0)  # as for D ~ 1e6: the float32 bound says nothing
    stats = NeighbourStats()
    torch.testing.assert_close(knn_distances(x, 2, stats=stats), exact, rtol=1e-12, atol=0)
    assert stats.search_dtype == torch.float64


def test_duplicates_found_by_the_search_match_drop_duplicate_rows() -> None:
    rng = np.random.default_rng(23)
    base = torch.tensor(rng.normal(size=(300, 12)))
    x = torch.cat([base, base[7:9], base[:3], base[7:8]])[torch.randperm(306, generator=torch.Generator().manual_seed(0))]
    distinct = drop_duplicate_rows(x)
    assert distinct.shape[0] == 300 and torch.equal(distinct, x[np.sort(np.unique(x.numpy(), axis=0, return_index=True)[1])])
    assert twonn(x) == twonn(distinct)


# ---------------------------------------------------------------------------------------------
# few wide rows (the `flatten` representation): the float64 Gram path of _neighbours
# ---------------------------------------------------------------------------------------------


def _wide_data(n: int, dim: int, seed: int) -> np.ndarray:
    """Low rank + noise + a large common offset, with exact duplicate rows at the end."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)) @ rng.normal(size=(6, dim)) + 0.05 * rng.normal(size=(n, dim))
    x += 1e3 * rng.uniform(0.5, 1.0, dim)
    return np.concatenate([x, x[:3], x[5:6]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gram_path_is_exact_on_wide_data_with_offset_and_duplicates(dtype: type) -> None:
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances, uses_gram_path

    x = _wide_data(48, 12_000, 30).astype(dtype)
    x64 = x.astype(np.float64)
    assert uses_gram_path(*x.shape)
    stats = NeighbourStats()
    got = knn_distances(torch.tensor(x), 2, stats=stats)
    assert stats.path == "gram" and stats.search_dtype == torch.float64
    exact = _exact_knn_reference(x64)
    assert (exact[:, 0] == 0).sum() == 8 and torch.equal(got[:, 0] == 0, torch.tensor(exact[:, 0] == 0))  # copies: exactly 0
    torch.testing.assert_close(got, torch.tensor(exact), rtol=1e-12, atol=0)
    distinct = np.unique(x64, axis=0)
    for method, discard in (("linear", 0.1), ("mle", 0.0)):
        ours = twonn(torch.tensor(x), discard, method)
        assert ours == pytest.approx(_exact_twonn_reference(x64, discard, method), rel=1e-9)
        assert ours == pytest.approx(_skdim(distinct - distinct.mean(0), discard, method), rel=1e-6), method


def test_gram_path_rechecks_margins_within_the_float64_bound() -> None:
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances

    # 12 clusters of 4 points (neighbours at 1e-6, 1.2e-6, 1.25e-6) around orthonormal centres of
    # norm ~1: the Gram's squared-distance error (~c (n_i + n_j)^2 ~ 2e-12) exceeds the squared
    # distances themselves, so the order inside a cluster is only decided by the exact recomputation
    rng = np.random.default_rng(31)
    dim = 5000
    frame = np.linalg.qr(rng.normal(size=(dim, 48)))[0].T
    points = []
    for c in range(12):
        centre, dirs = frame[c], frame[12 + 3 * c : 15 + 3 * c]
        points += [centre, centre + 1e-6 * dirs[0], centre + 1.2e-6 * dirs[1], centre + 1.25e-6 * dirs[2]]
    x = np.asarray(points) + 50.0
    stats = NeighbourStats()
    got = knn_distances(torch.tensor(x), 2, stats=stats)
    assert stats.path == "gram" and stats.rechecked == len(x) and stats.recheck_pairs == 12 * 6
    exact = _exact_knn_reference(x)
    torch.testing.assert_close(got, torch.tensor(exact), rtol=1e-12, atol=0)
    assert exact[0::4, 1] == pytest.approx(1.2e-6, rel=1e-6)  # the centres' 2nd neighbour: 1.2e-6, not 1.25e-6
    # k = 1, satellites at 1e-6, 1.02e-6, 1.04e-6 from each centre, each with its own partner 1e-8 away
    # (so no satellite lists the centre): only the bound brings the centre's true nearest into its set
    # (taking the Gram's first candidate alone gives the wrong distance here, 5e-5 relative)
    points = []
    for c in range(12):
        centre, dirs = frame[c], frame[12 + 3 * c : 15 + 3 * c]
        for a, r in enumerate((1.0, 1.02, 1.04)):
            points += [centre + r * 1e-6 * dirs[a], centre + r * 1e-6 * dirs[a] + 1e-8 * frame[(c + 1) % 12]]
        points.append(centre)
    x = np.asarray(points) + 50.0
    torch.testing.assert_close(knn_distances(torch.tensor(x), 1), torch.tensor(_exact_knn_reference(x, 1)), rtol=1e-12, atol=0)


def test_path_selection_on_both_sides_of_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprune.plugins import _neighbours
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances, uses_gram_path

    # the issue-16 part-1 sizes stay on the float32 search; the flatten shapes of real layers do not
    assert not uses_gram_path(2000, 768) and not uses_gram_path(5000, 3072)
    assert uses_gram_path(8, 600_000) and uses_gram_path(64, 100_000) and uses_gram_path(256, 600_000)
    assert not uses_gram_path(_neighbours.GRAM_MAX_ROWS + 1, 10**6)
    dim = 2048
    edge = max(n for n in range(3, 400) if uses_gram_path(n, dim))
    assert all(uses_gram_path(n, dim) for n in range(3, edge + 1)) and not uses_gram_path(edge + 1, dim)
    rng = np.random.default_rng(32)
    data = rng.normal(size=(edge + 1, 8)) @ rng.normal(size=(8, dim)) + 0.1 * rng.normal(size=(edge + 1, dim)) + 300.0
    for rows, path in ((edge, "gram"), (edge + 1, "search")):
        x = torch.tensor(data[:rows], dtype=torch.float32)
        stats = NeighbourStats()
        got = knn_distances(x, 2, stats=stats)
        assert stats.path == path
        torch.testing.assert_close(got, torch.tensor(_exact_knn_reference(x.double().numpy())), rtol=1e-12, atol=0)
        # the other path on the same rows gives the same distances
        monkeypatch.setattr(_neighbours, "uses_gram_path", lambda *a, _p=path, **k: _p == "search")
        other = NeighbourStats()
        torch.testing.assert_close(knn_distances(x, 2, stats=other), got, rtol=1e-12, atol=0)
        assert other.path != path
        monkeypatch.undo()


def test_gram_path_rejects_nan_and_budgets_less_than_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprune.plugins import _neighbours
    from vlprune.plugins._neighbours import working_bytes

    x = torch.tensor(_wide_data(20, 30_000, 33), dtype=torch.float32)
    x[3, 777] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        nearest_neighbour_distances(x)
    # no copy of the data on the Gram path: float64 column blocks only, under the search's two copies
    gram = [working_bytes(n, 600_000) for n in (8, 256)]
    assert gram[1] < 256 * 600_000 * 4 / 4
    monkeypatch.setattr(_neighbours, "uses_gram_path", lambda *a, **k: False)
    search = [working_bytes(n, 600_000) for n in (8, 256)]
    assert gram[0] < search[0] and gram[1] < search[1] / 8 and search[1] > 2 * 256 * 600_000 * 4


def test_gram_path_many_copies_cost_no_quadratic_pairs() -> None:
    from vlprune.plugins._neighbours import NeighbourStats, knn_distances

    rng = np.random.default_rng(34)
    base = rng.normal(size=(30, 8000)) + 100.0
    near = base[0].copy()
    near[17] = np.nextafter(near[17], np.inf)  # 1 ulp from row 0: a possible copy that is not one
    x = np.concatenate([near[None], base, np.repeat(base[:1], 40, axis=0), base[3:5]])
    stats = NeighbourStats()
    got = knn_distances(torch.tensor(x), 2, stats=stats)
    assert stats.path == "gram" and stats.recheck_pairs < 100  # not the 41 * 42 / 2 pairs of the copies
    torch.testing.assert_close(got, torch.tensor(_exact_knn_reference(x)), rtol=1e-12, atol=0)
    assert got[0, 0] > 0 and (got[[1, *range(31, 71)], :2] == 0).all() and (got[[4, 5, 71, 72], 0] == 0).all()
    assert twonn(torch.tensor(x)) == twonn(drop_duplicate_rows(torch.tensor(x)))


def test_gram_path_on_row_blocks_equals_the_joined_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """estimate_ids hands the Gram path its captured batches unjoined: same distances, same IDs."""
    from vlprune.plugins import _neighbours
    from vlprune.plugins._neighbours import NeighbourStats, gram_knn_parts, knn_distances

    x = torch.tensor(_wide_data(48, 12_000, 35), dtype=torch.float32)  # with copies (rows 48.. repeat 0..2, 5)
    parts = [x[:7], x[7:30], x[30:]]
    joins: list[int] = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: (joins.append(len(ts)), real_cat(ts, *a, **k))[1])
    got = gram_knn_parts(parts, 2, stats=(stats := NeighbourStats()))
    monkeypatch.undo()
    assert stats.path == "gram" and joins  # the copies need the rows: joined once
    torch.testing.assert_close(got, knn_distances(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(got, torch.tensor(_exact_knn_reference(x.double().numpy())), rtol=1e-12, atol=0)
    # distinct rows beyond one column block: certified Gram distances, the blocks are never joined
    distinct = torch.tensor(_wide_data(48, 30_000, 36)[:48], dtype=torch.float32)
    joins.clear()
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: (joins.append(len(ts)), real_cat(ts, *a, **k))[1])
    got = gram_knn_parts([distinct[:20], distinct[20:]], 2, stats=(stats := NeighbourStats()))
    monkeypatch.undo()
    assert not joins and stats.recheck_pairs == 0
    torch.testing.assert_close(got, torch.tensor(_exact_knn_reference(distinct.double().numpy())), rtol=1e-12, atol=0)
    # float16 storage reads exactly too
    half = [p.half() for p in (distinct[:20], distinct[20:])]
    torch.testing.assert_close(gram_knn_parts(half, 2), knn_distances(torch.cat(half).float(), 2), rtol=1e-12, atol=0)
    with pytest.raises(DataError, match="one width"):
        gram_knn_parts([x[:10], x[10:, :100]])
    with pytest.raises(DataError, match="at least 3 points"):
        gram_knn_parts([x[:2]])
    assert _neighbours.uses_gram_path(48, 12_000)


def test_estimate_ids_reads_gram_path_batches_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from vlprune.plugins import id_storage, intrinsic_dim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 8192))
    batches = [{"x": torch.randn(8, 16) * (1 + i)} for i in range(4)]
    calls: list[int] = []
    real = intrinsic_dim.gram_knn_parts
    monkeypatch.setattr(intrinsic_dim, "gram_knn_parts", lambda parts, k=2: (calls.append(len(parts)), real(parts, k))[1])
    slabs: list[int] = []
    estimated: list[int] = []
    real_slab, real_counted = id_storage.anonymous_rows, intrinsic_dim._twonn_counted
    monkeypatch.setattr(id_storage, "anonymous_rows", lambda *a: (s := real_slab(*a), slabs.append(s.data_ptr()))[0])
    monkeypatch.setattr(
        intrinsic_dim, "_twonn_counted", lambda x, *a: (estimated.append(x[0].data_ptr()), real_counted(x, *a))[1]
    )
    prof = estimate_ids(model, [b["x"] for b in batches], n_samples=32, modules=["0", "2"], progress=False)
    # module 2 (32 x 8192 float32 = 1 MB, SLAB_MIN_BYTES): its slab holds the 4 batches and is
    # estimated in place; module 0 (512 KB, ordinary allocations): its 4 batches, unjoined
    assert id_storage.SLAB_MIN_BYTES == 2**20
    assert calls == [4, 1] and len(slabs) == 1 and estimated[1] == slabs[0]
    # without slabs (id_storage.SLAB_MIN_BYTES above the modules' rows): 4 blocks each, unjoined
    monkeypatch.setattr(id_storage, "SLAB_MIN_BYTES", 2**40)
    calls.clear()
    again = estimate_ids(model, [b["x"] for b in batches], n_samples=32, modules=["0", "2"], progress=False)
    assert calls == [4, 4] and len(slabs) == 1 and again.ids() == prof.ids()
    monkeypatch.undo()
    for name in ("0", "2"):
        rows = torch.cat([model.get_submodule(name)(b["x"]) if name == "0" else model(b["x"]) for b in batches]).detach()
        assert prof[name] == pytest.approx(twonn(rows), rel=1e-9)
