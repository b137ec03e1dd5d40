"""estimate_ids at real scale (issue 16 part 2): one forward pass whatever the memory budget, rows
past the budget spilled to disk and read back bit for bit, a budget taken from the available
memory, an optional random-projection sketch, and the bad inputs refused with the model untouched."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import batches_for
from vlprune import VLPruneError
from vlprune.plugins import id_storage, id_streamed
from vlprune.plugins.capture import ActivationCapture, StoreRows
from vlprune.plugins.id_sketch import SparseSignSketch
from vlprune.plugins.id_storage import RowStore, available_memory_bytes, default_budget_mb, step_bytes
from vlprune.plugins.intrinsic_dim import estimate_ids, twonn
from vlprune.testbed.tiny import tiny_model


def _count_forwards(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]
    handle = model.register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def _spy_store(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(RAM budget for the rows, bytes spilled to disk) of every RowStore when it closes."""
    seen: list[tuple[int, int]] = []
    close = RowStore.close

    def spying_close(self: RowStore) -> None:
        seen.append((self.budget.limit, self.written_bytes))
        close(self)

    monkeypatch.setattr(RowStore, "close", spying_close)
    return seen


# ------------------------------------------------------------------ the spill path is exact
def test_spilled_rows_give_the_in_memory_estimates_bit_for_bit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=4, batch_size=10)
    stores = _spy_store(monkeypatch)
    modules = ["*.layers.0.mlp.fc1", "*.layers.1.self_attn.q_proj", "vision_model.embeddings.patch_embedding"]  # linears, a conv
    in_memory = estimate_ids(model, batches, modules, n_samples=40, max_memory_mb=4096, progress=False)
    # room for the widest module's distance step and a few rows: nearly every row goes to disk
    widest = max(x.features for x in in_memory.layers.values())
    budget_mb = (step_bytes(40, widest) + 4 * widest * 4) / 2**20
    spilled = estimate_ids(model, batches, modules, n_samples=40, max_memory_mb=budget_mb, spill_dir=tmp_path, progress=False)
    assert stores[0][1] == 0 and stores[1][1] > 0  # the first never touched the disk, the second did
    assert in_memory.ids() == spilled.ids()
    assert [x.n_samples for x in in_memory.layers.values()] == [x.n_samples for x in spilled.layers.values()]
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone


def test_modules_too_wide_for_the_budget_are_estimated_block_by_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Below one module's distance step the estimate streams column blocks from disk: the same
    estimate up to float64 rounding, duplicates collapsed as twonn does."""
    model, batches = _manifold_model(width=1500, n=200)
    x = torch.cat(batches)
    batches = list(torch.cat([x, x[:30], x[:5]]).split(47))  # 35 duplicate rows
    in_memory = estimate_ids(model, batches, n_samples=235, max_memory_mb=4096, progress=False)
    monkeypatch.setattr(id_storage, "STREAM_ABOVE_BYTES", 0)  # stream even this small step
    streamed_calls: list[int] = []
    original = id_streamed._gram_pass
    monkeypatch.setattr(id_streamed, "_gram_pass", lambda rows, step: (streamed_calls.append(step), original(rows, step))[1])
    budget_mb = step_bytes(235, 1500) / 2 / 2**20  # half of what the in-RAM step needs
    streamed = estimate_ids(model, batches, n_samples=235, max_memory_mb=budget_mb, spill_dir=tmp_path, progress=False)
    assert streamed_calls and max(streamed_calls) < 1500  # several column blocks
    assert streamed.layers["0"].n_samples == in_memory.layers["0"].n_samples == 200
    assert streamed["0"] == pytest.approx(in_memory["0"], rel=1e-12)
    for method in ("mle",):
        a = estimate_ids(model, batches, n_samples=235, estimator=method, progress=False)["0"]
        b = estimate_ids(model, batches, n_samples=235, estimator=method, max_memory_mb=budget_mb, progress=False)["0"]
        assert b == pytest.approx(a, rel=1e-12)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("slab_min_bytes", [0, id_storage.SLAB_MIN_BYTES], ids=["slab", "no-slab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_store_reads_back_what_store_rows_keeps(
    dtype: torch.dtype, slab_min_bytes: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(id_storage, "SLAB_MIN_BYTES", slab_min_bytes)
    torch.manual_seed(0)
    # flatten rows of batches with different sequence lengths (padded to the longest), a padding mask
    outputs = [torch.randn(3, t, 5) for t in (4, 7, 2, 7)]
    masks = [torch.ones(3, t) for t in (4, 7, 2, 7)]
    masks[1][0, 5:] = 0
    plain = StoreRows("flatten", n_samples=11, dtype=dtype)
    with RowStore(budget_bytes=3 * 20 * 4, spill_dir=tmp_path) as store:  # the first batch in RAM, the rest on disk
        spill = store.reducer("m", "flatten", n_samples=11, dtype=dtype)
        for out, mask in zip(outputs, masks):
            plain.update(out, mask)
            spill.update(out, mask)
        assert spill.ram_bytes > 0 and spill.disk_bytes > 0
        expected = plain.result()
        assert expected.shape == (11, 35)
        assert torch.equal(spill.result(), expected)
        assert torch.equal(spill.column_block(10, 30), expected[:, 10:30])
        store.release("m")
        assert list(store.directory.iterdir()) == []
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("store", ["plain", "slab"])
def test_stored_rows_are_copies_of_the_output(store: str, tmp_path: Path) -> None:
    """An in-place op after the module (ReLU(inplace=True)) must not change the stored rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True))
    x = torch.randn(20, 4)
    with RowStore(2**20, tmp_path) as rows_store:
        reducer = (lambda n: StoreRows("flatten")) if store == "plain" else (lambda n: rows_store.reducer(n, n_samples=2**16))
        with ActivationCapture(model, ["0"], reducer) as cap:
            cap.run([x[:8], x[8:]], progress=False)
            rows = cap.results()["0"]
        if store == "slab":
            assert len(rows_store["0"].stored_batches()) == 1  # both batches in the module's slab
    assert torch.equal(rows, model[0](x).detach())
    assert bool((rows < 0).any())


def test_a_slab_holds_the_batches_in_ram_and_spilled_rows_follow_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    outputs = [torch.randn(32, 8, 1024) for _ in range(4)]  # 1 MB per batch: one slab of 4 MB
    plain = StoreRows("flatten", n_samples=128)
    with RowStore(budget_bytes=2 * 2**20, spill_dir=tmp_path) as store:  # two batches in RAM
        rows = store.reducer("m", "flatten", n_samples=128)
        for out in outputs:
            plain.update(out, None)
            rows.update(out, None)
        first, *spilled = rows.stored_batches()
        assert first.shape == (64, 8192) and len(spilled) == 2  # the slab's two batches as one block
        assert rows.ram_bytes == 2 * 2**20 and rows.disk_bytes == 2 * 2**20
        assert torch.equal(rows.result(), plain.result())


def test_a_refused_mapping_falls_back_to_ordinary_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmap

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert id_storage.anonymous_rows(64, 4096, torch.float32) is None
    with RowStore(2**30) as store:
        rows = store.reducer("m", "flatten", n_samples=64)
        out = torch.randn(32, 4096)
        rows.update(out, None)
        rows.update(out * 2, None)
        assert len(rows.stored_batches()) == 2
        assert torch.equal(rows.result(), torch.cat([out, out * 2]))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_released_rows_go_back_to_the_system() -> None:
    """The slab is returned when the rows are released (malloc'd row buffers from the heap were
    not: on real SmolLM2 the process kept 11 GB after the profile)."""

    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    with RowStore(2**30) as store:
        rows = store.reducer("m", "flatten", n_samples=256)
        before = rss()
        for _ in range(8):
            rows.update(torch.ones(32, 65536), None)  # 8 MB per batch, 64 MB in all
        grown = rss() - before
        assert grown > 48 * 2**20
        store.release("m")
        assert rss() < before + grown - 48 * 2**20


# ------------------------------------------------------------------ one forward pass
def test_one_forward_pass_whatever_the_budget(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=5, batch_size=8)
    stores = _spy_store(monkeypatch)
    for budget in (4096, 0.05):
        calls, handle = _count_forwards(model)
        estimate_ids(model, batches, ["*.fc1"], n_samples=40, max_memory_mb=budget, spill_dir=tmp_path, progress=False)
        handle.remove()
        assert calls[0] == len(batches), budget
    assert stores[-1][1] > 0  # the small budget spilled
    # and the pass stops once every module has n_samples rows
    calls, handle = _count_forwards(model)
    estimate_ids(model, batches, ["*.fc1"], n_samples=16, max_memory_mb=0.02, spill_dir=tmp_path, progress=False)
    handle.remove()
    assert calls[0] == 2


# ------------------------------------------------------------------ the automatic budget
def test_available_memory_is_memavailable() -> None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo")
    line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemAvailable:"))
    reference = int(line.split()[1]) * 1024
    assert available_memory_bytes() == pytest.approx(reference, rel=0.05)  # it moves while we read it


def test_default_budget_is_half_the_available_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(id_storage, "available_memory_bytes", lambda: 6 * 2**30)
    assert default_budget_mb() == 3072.0
    monkeypatch.setattr(id_storage, "available_memory_bytes", lambda: None)
    assert default_budget_mb() == id_storage.FALLBACK_BUDGET_MB
    # estimate_ids without max_memory_mb follows it: with little memory available the rows spill
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=2, batch_size=10)
    stores = _spy_store(monkeypatch)
    monkeypatch.setattr(id_storage, "available_memory_bytes", lambda: 16 * 2**30)
    large = estimate_ids(model, batches, ["*.fc1"], n_samples=20, spill_dir=tmp_path, progress=False)
    widest = max(x.features for x in large.layers.values())
    available = 2 * (step_bytes(20, widest) + 8 * widest * 4)  # half of it: one distance step and 8 rows
    monkeypatch.setattr(id_storage, "available_memory_bytes", lambda: available)
    small = estimate_ids(model, batches, ["*.fc1"], n_samples=20, spill_dir=tmp_path, progress=False)
    assert stores[0][1] == 0 and stores[1][1] > 0
    assert small.ids() == large.ids()


def test_an_automatic_budget_stops_taking_ram_when_memory_runs_low(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other processes growing meanwhile: RAM is refused once the available memory would fall
    below a quarter of its starting value; an explicit budget is not watched."""
    available = [8 * 2**30]
    monkeypatch.setattr(id_storage, "available_memory_bytes", lambda: available[0])
    chunk = 64 * 2**20
    watched = id_storage.MemoryBudget(4 * 2**30, watch_available=True)
    plain = id_storage.MemoryBudget(4 * 2**30)
    assert watched.take(chunk) and plain.take(chunk)
    available[0] = 2 * 2**30 + chunk // 2  # a quarter of the start is 2 GB: taking 64 MB would pass it
    assert not watched.take(chunk) and plain.take(chunk)
    assert watched.limit == watched.used == chunk  # and nothing more is taken afterwards
    available[0] = 8 * 2**30
    assert not watched.take(1)


# ------------------------------------------------------------------ the sketch
def _manifold_model(d: int = 5, width: int = 1500, n: int = 400) -> tuple[nn.Module, list[torch.Tensor]]:
    """Points on a curved d-dimensional manifold (a random Fourier-feature embedding), a layer
    that maps them into R^width."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, d, generator=g, dtype=torch.float64)
    freq = torch.randn(d, 24, generator=g, dtype=torch.float64)
    curved = torch.cat([torch.sin(t @ freq), torch.cos(t @ freq)], dim=1).float()  # (n, 48)
    layer = nn.Linear(48, width, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(width, 48, generator=g) / math.sqrt(48))
    return nn.Sequential(layer), list(curved.split(100))


def test_sketch_error_is_small_on_a_curved_manifold() -> None:
    model, batches = _manifold_model()
    exact = estimate_ids(model, batches, n_samples=400, progress=False)["0"]
    assert 4.0 < exact < 6.5
    errors = {}
    for dim in (128, 512):
        sketched = estimate_ids(model, batches, n_samples=400, sketch_dim=dim, progress=False)["0"]
        errors[dim] = abs(sketched - exact) / exact
    assert errors[512] < 0.05 and errors[128] < 0.10, errors
    # seeded: the same sketch twice
    again = estimate_ids(model, batches, n_samples=400, sketch_dim=128, progress=False)["0"]
    assert abs(again - exact) / exact == errors[128]


def test_sketch_preserves_distances_like_johnson_lindenstrauss() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 20_000, generator=g)
    y = SparseSignSketch(1024, seed=3)(x)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert float((ratio - 1).abs().max()) < 0.2  # JL: about sqrt(8 log(50) / 1024) = 0.17 at worst
    assert abs(float(ratio.pow(2).mean()) - 1) < 0.02  # unbiased squared distances
    # a wider row's first features are sketched as the narrower row's (zero padding is consistent)
    sketch = SparseSignSketch(64, seed=0)
    z = torch.randn(4, 1000, generator=g)
    padded = torch.nn.functional.pad(z, (0, 70_000))
    assert torch.allclose(sketch(z), sketch(padded), atol=1e-5)


# ------------------------------------------------------------------ bad input, model untouched
def _untouched(model: nn.Module, training: dict[str, bool]) -> None:
    assert {n: m.training for n, m in model.named_modules()} == training
    assert not any(m._forward_hooks for m in model.modules())


def test_a_budget_below_one_sample_says_the_minimum(tmp_path: Path) -> None:
    model = tiny_model("clip")
    model.train()
    training = {n: m.training for n, m in model.named_modules()}
    batches = batches_for("clip", n_batches=2, batch_size=4)
    width = max(  # the widest flatten row: fc1's (tokens x intermediate size)
        int(o.flatten(1).shape[1])
        for o in _outputs(model, batches[0], ["*.fc1"])
    )
    minimum = width * 4 / 2**20
    with pytest.raises(VLPruneError, match=rf"too small for a single sample.*the minimum is {minimum:.3g} MB"):
        estimate_ids(model, batches, ["*.fc1"], n_samples=8, max_memory_mb=minimum / 2, spill_dir=tmp_path, progress=False)
    _untouched(model, training)
    assert list(tmp_path.iterdir()) == []
    estimate_ids(model, batches, ["*.fc1"], n_samples=8, max_memory_mb=minimum * 1.01, spill_dir=tmp_path, progress=False)
    with pytest.raises(VLPruneError, match="max_memory_mb must be positive"):
        estimate_ids(model, batches, ["*.fc1"], n_samples=8, max_memory_mb=0, progress=False)


def _outputs(model: nn.Module, batch: dict, patterns: list[str]) -> list[torch.Tensor]:
    with ActivationCapture(model, patterns, lambda n: StoreRows("flatten")) as cap:
        cap.run([batch], progress=False)
        return list(cap.results().values())


def test_a_sketch_wider_than_the_data_is_refused(tmp_path: Path) -> None:
    model = tiny_model("clip")
    model.train()
    training = {n: m.training for n, m in model.named_modules()}
    batches = batches_for("clip", n_batches=2, batch_size=4)
    width = int(_outputs(model, batches[0], ["text_model.encoder.layers.0.mlp.fc1"])[0].shape[1])
    with pytest.raises(VLPruneError, match=rf"sketch_dim={width + 1} is larger than the data of module .*choose sketch_dim <= {width}"):
        estimate_ids(model, batches, ["text_model.encoder.layers.0.mlp.fc1"], n_samples=8, sketch_dim=width + 1,
                     max_memory_mb=0.01, spill_dir=tmp_path, progress=False)
    _untouched(model, training)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VLPruneError, match="sketch_dim must be a positive integer"):
        estimate_ids(model, batches, n_samples=8, sketch_dim=0, progress=False)


def test_too_little_disk_is_said_before_the_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=3, batch_size=4)
    monkeypatch.setattr(id_storage.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    model.train()
    training = {n: m.training for n, m in model.named_modules()}
    calls, handle = _count_forwards(model)
    with pytest.raises(VLPruneError, match=r"has only 0.0 GB free; pass spill_dir="):
        estimate_ids(model, batches, n_samples=12, max_memory_mb=0.05, spill_dir=tmp_path, progress=False)
    handle.remove()
    assert calls[0] == 1  # refused after the first batch, not after the whole pass
    _untouched(model, training)
    assert list(tmp_path.iterdir()) == []


def test_twonn_on_sketched_rows_equals_estimate_ids_on_them() -> None:
    """The sketch is applied in the hook; the estimate is plain TwoNN of the sketched rows."""
    model, batches = _manifold_model(width=600, n=300)
    sketch = SparseSignSketch(100, seed=7)
    rows = torch.cat([sketch(model(b).detach()) for b in batches])
    ours = estimate_ids(model, batches, n_samples=300, sketch_dim=100, sketch_seed=7, progress=False)["0"]
    assert ours == twonn(rows)
    assert np.isfinite(ours)
    logging.getLogger(__name__).info("sketched ID %.3f", ours)


def test_profiling_a_vision_tower_leaves_the_language_model_out_after_the_first_batch() -> None:
    """estimate_ids cuts each forward after the last profiled module (ActivationCapture.run
    ``cut``): a LLaVA profiled on its vision tower runs its language model for the first batch
    only, and the IDs equal those of whole forwards."""
    model = tiny_model("llava")
    batches = batches_for("llava", n_batches=4, batch_size=16)
    lm_calls = [0]
    model.model.language_model.register_forward_pre_hook(lambda *_: lm_calls.__setitem__(0, lm_calls[0] + 1))
    tower = "model.vision_tower.encoder.layers.*.mlp.fc*"
    cut = estimate_ids(model, batches, tower, n_samples=64, progress=False)
    assert lm_calls[0] == 1
    lm_calls[0] = 0
    whole = estimate_ids(model, batches, tower, n_samples=64, full_forward=True, progress=False)
    assert lm_calls[0] == 4
    assert cut.ids() == whole.ids() and len(cut.ids()) == 4


def test_a_slab_is_sized_for_the_expected_batches_and_overflows_into_own_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    slabs: list[tuple[int, ...]] = []
    real_slab = id_storage.anonymous_rows
    monkeypatch.setattr(id_storage, "anonymous_rows", lambda *a: (t := real_slab(*a), slabs.append(tuple(t.shape)))[0])
    torch.manual_seed(0)
    outputs = [torch.randn(32, 8192) for _ in range(4)] + [torch.randn(40, 8192)]  # a fifth, larger batch
    with RowStore(2**30, expected_batches=4) as store:
        rows = store.reducer("m", "flatten", n_samples=1000)
        for out in outputs:
            rows.update(out, None)
        assert slabs == [(128, 8192)]  # 4 batches of 32 rows, not n_samples = 1000
        first, extra = rows.stored_batches()
        assert first.shape == (128, 8192) and extra.shape == (40, 8192)
        assert torch.equal(rows.result(), torch.cat(outputs))


def test_a_bf16_model_keeps_its_rows_in_bf16_with_the_float32_estimates(monkeypatch: pytest.MonkeyPatch) -> None:
    """storage_dtype=None (the default) keeps a half-precision output's rows in its own dtype:
    half the memory of float32 and, bf16 -> float32 being exact, the very same IDs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4096), nn.Tanh(), nn.Linear(4096, 8192)).to(torch.bfloat16)
    batches = [torch.randn(8, 16, dtype=torch.bfloat16) * (1 + i) for i in range(4)]
    slabs: list[torch.dtype] = []
    real_slab = id_storage.anonymous_rows
    monkeypatch.setattr(id_storage, "anonymous_rows", lambda n, w, d: (slabs.append(d), real_slab(n, w, d))[1])
    monkeypatch.setattr(id_storage, "SLAB_MIN_BYTES", 0)  # a slab for every module, whatever its size
    lossless = estimate_ids(model, batches, ["0", "2"], n_samples=32, progress=False)
    assert slabs == [torch.bfloat16, torch.bfloat16]
    slabs.clear()
    wide = estimate_ids(model, batches, ["0", "2"], n_samples=32, storage_dtype=torch.float32, progress=False)
    assert slabs == [torch.float32, torch.float32]
    assert lossless.ids() == wide.ids()
    # and both are TwoNN of the rows themselves
    rows = torch.cat([model(b) for b in batches]).detach().float()
    assert lossless["2"] == pytest.approx(twonn(rows), rel=1e-9)


def test_spilled_rows_are_read_from_disk_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A module whose batches went to disk is read back once for its estimate (the search path
    read every spilled batch twice: once as blocks, once joined)."""
    model = tiny_model("clip")
    batches = batches_for("clip", n_batches=4, batch_size=8)
    module = "vision_model.encoder.layers.0.mlp.fc1"
    reads: list[int] = []
    real_read = id_storage.SpillingRows._read
    monkeypatch.setattr(id_storage.SpillingRows, "_read", lambda self, e, columns=None: (reads.append(e[0]), real_read(self, e, columns))[1])
    kw = dict(n_samples=256, representation="tokens", progress=False)  # the search path: many narrow rows
    in_ram = estimate_ids(model, batches, [module], **kw)
    assert reads == []
    spilled = estimate_ids(model, batches, [module], max_memory_mb=0.2, spill_dir=tmp_path, **kw)
    assert reads and len(reads) == len(set(reads))  # each spilled batch once
    assert spilled.ids() == in_ram.ids()
