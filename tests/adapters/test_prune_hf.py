"""Torch-Pruning scripts on tiny transformers models: prune_hf_model, sync, forward, save/reload, failure safety."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from tests.conftest import batches_for
from vlprune import ModelStructureError, VLPruneError
from vlprune.adapters.hf import prune as hf_prune
from vlprune.adapters.hf.families import describe
from vlprune.adapters.torch_pruning import IDWeightedImportance, hf_pruner_kwargs, prune_hf_model
from vlprune.testbed.tiny import example_inputs, tiny_model


def _main_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    torch.manual_seed(0)  # ViLT samples image patches even in eval mode
    with torch.no_grad():
        out = model(**inputs)
    for key in ("logits", "logits_per_image", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise AssertionError("no output tensor")


def _loss(family: str, model: nn.Module, batch: dict) -> torch.Tensor:
    if family == "clip":
        return model(**batch, return_loss=True).loss
    if family in ("llava", "blip"):
        return model(**batch, labels=batch["input_ids"]).loss
    return model(**batch)[0].pow(2).mean()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["clip", "llava", "vit", "dinov2", "vilt", "blip"])
def test_torch_pruning_script_with_id_weighted_taylor(family: str, tmp_path) -> None:
    """The user's tp script: profile, importance, BasePruner, step, sync, save, reload."""
    model = tiny_model(family)
    calib = batches_for(family, n_batches=3, batch_size=8)
    profile = vlprune.estimate_ids(model, calib, n_samples=24, progress=False)
    model.zero_grad()
    for batch in calib:
        _loss(family, model, batch).backward()
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)
    example = example_inputs(family, batch_size=2)
    before = _params(model)
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.4, global_pruning=True,
                                  **hf_pruner_kwargs(model))
    pruner.step()
    vlprune.sync_hf_model(model)
    info = describe(model)
    assert sum(m.hidden for m in info.mlps) < 0.75 * len(info.mlps) * 64  # ~40% of MLP neurons gone
    assert _params(model) < before
    probe = example_inputs(family, batch_size=3, seed=7)
    expected = _main_output(model, probe)
    assert torch.isfinite(expected).all()
    vlprune.save_pruned(model, tmp_path / "pruned")
    again = vlprune.load_pruned(tmp_path / "pruned")
    assert _params(again) == _params(model)
    assert torch.equal(_main_output(again, probe), expected)


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Indices of ``original`` rows that survive in ``pruned`` (matched by value)."""
    return [int(torch.nonzero((original == row).all(dim=1)).flatten()[0]) for row in pruned]


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_pruned_model_equals_masked_original(family: str) -> None:
    """Independent check of head/neuron bookkeeping and attention scale: removing heads and
    neurons must equal zeroing their contributions in the unpruned model."""
    model = tiny_model(family)
    original = copy.deepcopy(model)
    example = example_inputs(family, batch_size=2)
    prune_hf_model(model, example, tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5, head_pruning_ratio=0.5)
    pruned_mods, orig_mods = dict(model.named_modules()), dict(original.named_modules())
    info = describe(original)
    with torch.no_grad():
        for att in info.attentions:
            kept = _kept_rows(pruned_mods[att.q].weight, orig_mods[att.q].weight)
            assert len(kept) == pruned_mods[att.q].out_features < orig_mods[att.q].out_features
            mask = torch.zeros(orig_mods[att.o].in_features, dtype=torch.bool)
            mask[kept] = True
            orig_mods[att.o].weight[:, ~mask] = 0
        for mlp in info.mlps:
            kept = _kept_rows(pruned_mods[mlp.up].weight, orig_mods[mlp.up].weight)
            mask = torch.zeros(orig_mods[mlp.down].in_features, dtype=torch.bool)
            mask[kept] = True
            orig_mods[mlp.down].weight[:, ~mask] = 0
    probe = example_inputs(family, batch_size=3, seed=5)
    torch.testing.assert_close(_main_output(model, probe), _main_output(original, probe), rtol=1e-4, atol=1e-5)
    assert all(a.num_heads == 2 for a in describe(model).attentions)


def test_llava_gqa_attention_is_left_whole_and_mlps_pruned() -> None:
    model = tiny_model("llava")
    prune_hf_model(model, example_inputs("llava"), tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
    info = describe(model)
    lm = [a for a in info.attentions if a.modality == "language"]
    assert all((a.num_heads, a.num_kv_heads) == (4, 2) for a in lm)
    assert sum(m.hidden for m in info.mlps) == 4 * 64 // 2  # global ranking: 50% of all MLP neurons
    assert all(a.num_heads == 2 for a in info.attentions if a.modality == "vision")


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_failed_prune_leaves_model_and_config_unchanged(monkeypatch) -> None:
    model = tiny_model("clip")
    before, config = _state(model), model.config.to_dict()
    params_before = {n: p for n, p in model.named_parameters()}
    shapes_before = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def boom(*args, **kwargs):
        raise ModelStructureError("injected failure after the prune")

    monkeypatch.setattr(hf_prune, "sync_hf_model", boom)
    with pytest.raises(ModelStructureError, match="injected"):
        prune_hf_model(model, example_inputs("clip"), tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)} == shapes_before
    assert model.config.to_dict() == config
    assert all(a.num_heads == 4 for a in describe(model).attentions)
    _main_output(model, example_inputs("clip"))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_rejected_before_anything_changes(ratio: float) -> None:
    model = tiny_model("vit")
    before = _state(model)
    with pytest.raises(VLPruneError, match=r"\[0, 1\)"):
        prune_hf_model(model, example_inputs("vit"), tp.importance.GroupMagnitudeImportance(), pruning_ratio=ratio)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_nothing_to_prune_is_a_clear_error() -> None:
    model = tiny_model("vit")
    with pytest.raises(ModelStructureError, match="nothing to prune"):
        hf_pruner_kwargs(model, modalities=("language",))


class _LowFirstLayer(tp.importance.Importance):
    """Magnitude, but every channel of the first attention scores lowest: global head ranking
    would take all of its heads."""

    def __init__(self, first: torch.nn.Module) -> None:
        self.base, self.first = tp.importance.GroupMagnitudeImportance(), first

    def __call__(self, group: object) -> torch.Tensor | None:
        imp = self.base(group)
        if imp is not None and any(dep.target.module is self.first for dep, _ in group):  # type: ignore[attr-defined]
            return torch.rand(len(imp)) * 1e-6
        return imp


def test_keep_heads_prevents_emptying_an_attention() -> None:
    from vlprune.adapters.hf.families import describe
    from vlprune.adapters.torch_pruning import KeepHeads

    def build() -> tuple[torch.nn.Module, dict[str, object], list[object]]:
        model = tiny_model("vit")
        atts = [a for a in describe(model).attentions if not a.fused and a.num_heads > 1]
        return model, hf_pruner_kwargs(model, prune_mlp=False), atts

    example = example_inputs("vit", batch_size=2)
    model, kw, atts = build()
    heads = atts[0].num_heads
    first_q = model.get_submodule(atts[0].q)
    ratio = heads / sum(a.num_heads for a in atts)  # exactly the first layer's share
    bare = tp.pruner.BasePruner(model, example, importance=_LowFirstLayer(first_q), pruning_ratio=ratio,
                                head_pruning_ratio=ratio, global_pruning=True, iterative_steps=2, **kw)
    bare.step()
    bare.step()
    # the failure the wrapper exists for: tp drops every head of the first attention from its head
    # bookkeeping, then refuses to empty the layer, so head count and width disagree (a later
    # step divides by the zero head count)
    assert bare.num_heads[first_q] <= 0 < first_q.out_features

    model, kw, atts = build()
    first_q = model.get_submodule(atts[0].q)
    guarded = KeepHeads(_LowFirstLayer(first_q), kw["num_heads"])
    pruner = tp.pruner.BasePruner(model, example, importance=guarded, pruning_ratio=ratio,
                                  head_pruning_ratio=ratio, global_pruning=True, iterative_steps=2, **kw)
    head_dim = atts[0].head_dim
    for _ in range(2):
        pruner.step()
        assert first_q.out_features == head_dim * pruner.num_heads[first_q] >= head_dim
    assert first_q.out_features == head_dim  # one head left in the first attention
    total_left = sum(model.get_submodule(a.q).out_features // head_dim for a in atts)
    assert total_left == sum(a.num_heads for a in atts) - heads  # the head budget is still met
    vlprune.sync_hf_model(model, pruned="heads")
    model(**example)


def test_keep_heads_bad_input() -> None:
    from vlprune.adapters.torch_pruning import KeepHeads

    with pytest.raises(VLPruneError, match="min_heads"):
        KeepHeads(tp.importance.GroupMagnitudeImportance(), {}, min_heads=0)
    with pytest.raises(VLPruneError, match="heads"):
        KeepHeads(tp.importance.GroupMagnitudeImportance(), {torch.nn.Linear(4, 6): 4})


def test_prune_hf_model_min_heads() -> None:
    model = tiny_model("vit")
    atts = [a for a in describe(model).attentions if not a.fused and a.num_heads > 1]
    first_q = model.get_submodule(atts[0].q)
    ratio = atts[0].num_heads / sum(a.num_heads for a in atts)
    prune_hf_model(model, example_inputs("vit", batch_size=2), _LowFirstLayer(first_q), ratio,
                   prune_mlp=False, min_heads=2)
    assert first_q.out_features == 2 * atts[0].head_dim
    model(**example_inputs("vit", batch_size=2))


def test_min_heads_beyond_the_feasible_ratio_is_refused() -> None:
    from vlprune.adapters.torch_pruning import KeepHeads

    model = tiny_model("vit")
    kw = hf_pruner_kwargs(model, prune_mlp=False)
    atts = [a for a in describe(model).attentions if not a.fused and a.num_heads > 1]
    imp = KeepHeads(tp.importance.GroupMagnitudeImportance(), kw["num_heads"])
    total = sum(a.num_heads for a in atts)
    assert imp.max_ratio == pytest.approx(1 - len(atts) / total)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(VLPruneError, match="cannot keep 1 head"):
        prune_hf_model(model, example_inputs("vit", batch_size=2), tp.importance.GroupMagnitudeImportance(),
                       0.9, prune_mlp=False, min_heads=1)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _iterative_vit_pruner(imp: object) -> tuple[torch.nn.Module, object]:
    from vlprune.adapters.torch_pruning import cubic_scheduler

    model = tiny_model("vit")
    pruner = tp.pruner.BasePruner(model, example_inputs("vit", batch_size=2), importance=imp, pruning_ratio=0.5,
                                  head_pruning_ratio=0.5, iterative_steps=4,
                                  iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True,
                                  **hf_pruner_kwargs(model))
    return model, pruner


def test_step_pruner_survives_a_step_that_removes_no_head() -> None:
    from vlprune.adapters.torch_pruning import _heads_to_remove, step_pruner

    # 8 heads, cubic schedule to 50%: the steps remove 3, 1, 0 and 0 heads
    model, pruner = _iterative_vit_pruner(tp.importance.GroupMagnitudeImportance())
    removed = []
    with pytest.raises(UnboundLocalError, match="head_thres"):
        for _ in range(4):
            removed.append(_heads_to_remove(pruner))
            pruner.step()  # plain Torch-Pruning 1.6
    assert removed[-1] == 0

    model, pruner = _iterative_vit_pruner(tp.importance.GroupMagnitudeImportance())
    atts = [a for a in describe(model).attentions if a.num_heads > 1]
    head_dim = atts[0].head_dim
    for _ in range(4):
        step_pruner(pruner)
    heads = sum(model.get_submodule(a.q).out_features // head_dim for a in atts)
    assert heads == 4 and pruner.prune_num_heads  # the 50% head budget, flag restored
    vlprune.sync_hf_model(model, pruned="heads")
    model(**example_inputs("vit", batch_size=2))


def test_platon_step_survives_a_step_that_removes_no_head() -> None:
    from vlprune.adapters.torch_pruning import PlatonImportance

    imp = PlatonImportance(delta_t=1)
    model, pruner = _iterative_vit_pruner(imp)
    batch = example_inputs("vit", batch_size=4)
    for _ in range(4):
        model.zero_grad()
        model(**batch).logits.sum().backward()
        imp.update(model)
        imp.step(pruner)
    vlprune.sync_hf_model(model, pruned="heads")
    model(**batch)


@pytest.mark.parametrize("family", ["llava", "vit", "dinov2", "blip"])
def test_hf_pruner_kwargs_declare_unwrapped_parameters_without_changing_the_prune(family: str) -> None:
    """Torch-Pruning's "Unwrapped parameters" warning is replaced by an explicit list that prunes
    exactly what tp's own default would."""
    import warnings

    import vlprune
    from vlprune.testbed.tiny import example_inputs, tiny_model

    example = example_inputs(family)
    outputs = []
    for declare in (True, False):
        model = tiny_model(family)
        kw = hf_pruner_kwargs(model)
        if not declare:
            del kw["unwrapped_parameters"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = tp.pruner.BasePruner(model, example, importance=tp.importance.MagnitudeImportance(),
                                          pruning_ratio=0.3, head_pruning_ratio=0.3, global_pruning=True, **kw)
        assert any("Unwrapped parameters" in str(w.message) for w in caught) is not declare
        pruner.step()
        vlprune.sync_hf_model(model, pruner=pruner)
        with torch.no_grad():
            out = model(**example)
        first = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        outputs.append((sum(p.numel() for p in model.parameters()), first))
    assert outputs[0][0] == outputs[1][0] and torch.equal(outputs[0][1], outputs[1][1])
