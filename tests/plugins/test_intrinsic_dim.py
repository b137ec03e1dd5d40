"""TwoNN against scikit-dimension, and per-layer profiles against hooks + skdim."""

from __future__ import annotations

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
