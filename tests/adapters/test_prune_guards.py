"""No silent no-ops in Torch-Pruning runs: NaN scores, missing gradients, nothing pruned, and a
removed fraction that grows with the ratio (issue 10, points 4a, 4b, 4e)."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from tests.conftest import batches_for
from vlprune import DataError, VLPruneError
from vlprune.adapters.hf.families import describe
from vlprune.adapters.torch_pruning import (
    AMPEntropyImportance,
    IDWeightedImportance,
    KeepHeads,
    KeepNeurons,
    PlatonImportance,
    hf_pruner_kwargs,
    prune_hf_model,
)
from vlprune.testbed.tiny import example_inputs, tiny_model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def clip_profile() -> vlprune.IDProfile:
    return vlprune.estimate_ids(tiny_model("clip"), batches_for("clip", 3, 8), n_samples=24, progress=False)


def _nan_grads(model: nn.Module) -> None:
    batch = example_inputs("clip", batch_size=8)
    batch["pixel_values"][0, 0, 0, 0] = float("nan")  # one NaN pixel
    model.zero_grad()
    model(**batch, return_loss=True).loss.backward()


def test_nan_loss_makes_taylor_pruning_raise_and_leaves_model(clip_profile) -> None:
    model = tiny_model("clip")
    _nan_grads(model)
    before = _state(model)
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), clip_profile)
    with pytest.raises(DataError, match=r"rooted at \S+\.(fc1|q_proj|k_proj|v_proj) are NaN or inf.*check the batch"):
        prune_hf_model(model, example_inputs("clip"), imp, 0.4)
    assert _unchanged(model, before)


def test_nan_scores_raise_inside_a_plain_tp_pruner(clip_profile) -> None:
    model = tiny_model("clip")
    _nan_grads(model)
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), clip_profile)
    pruner = tp.pruner.BasePruner(model, example_inputs("clip"), importance=imp, pruning_ratio=0.4,
                                  global_pruning=True, **hf_pruner_kwargs(model))
    with pytest.raises(DataError, match="IDWeightedImportance.*NaN"):
        pruner.step()


def test_keep_heads_keep_neurons_and_platon_reject_nan_scores() -> None:
    model = tiny_model("clip")
    _nan_grads(model)
    kw = hf_pruner_kwargs(model)
    example = example_inputs("clip")
    ups = [model.get_submodule(m.up) for m in describe(model).mlps]
    for imp in (KeepHeads(tp.importance.GroupTaylorImportance(), kw["num_heads"]),
                KeepNeurons(tp.importance.GroupTaylorImportance(), ups)):
        pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.4, global_pruning=True, **kw)
        with pytest.raises(DataError, match=f"{type(imp).__name__}.*NaN or inf"):
            pruner.step()
    platon = PlatonImportance(delta_t=1)
    platon.update(model)
    pruner = tp.pruner.BasePruner(model, example, importance=platon, pruning_ratio=0.4, global_pruning=True, **kw)
    with pytest.raises(DataError, match="PlatonImportance.*NaN or inf"):
        pruner.step()


def test_amp_importance_rejects_nan_scores() -> None:
    model = tiny_model("vit")
    mlp = describe(model).mlps[0]
    scores = {mlp.name: torch.full((mlp.hidden,), float("nan"))}
    with pytest.raises(DataError, match="AMP scores.*NaN"):
        AMPEntropyImportance(scores, model)


def test_forgotten_backward_is_a_vlprune_error(clip_profile) -> None:
    model = tiny_model("clip")
    before = _state(model)
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), clip_profile)
    with pytest.raises(VLPruneError, match=r"no gradients on .*call loss\.backward\(\) before pruner\.step\(\)") as info:
        prune_hf_model(model, example_inputs("clip"), imp, 0.4)
    assert isinstance(info.value.__cause__, (AttributeError, TypeError))
    assert _unchanged(model, before)
    pruner = tp.pruner.BasePruner(model, example_inputs("clip"), importance=imp, pruning_ratio=0.4,
                                  global_pruning=True, **hf_pruner_kwargs(model))
    with pytest.raises(VLPruneError, match=r"loss\.backward\(\)"):
        pruner.step()


class _SkipAll(tp.importance.Importance):
    def __call__(self, group: object) -> None:
        return None


def test_nothing_pruned_at_a_positive_ratio_is_an_error() -> None:
    model = tiny_model("vit")
    before = _state(model)
    with pytest.raises(VLPruneError, match="nothing was pruned although pruning_ratio=0.4"):
        prune_hf_model(model, example_inputs("vit"), _SkipAll(), 0.4)
    assert _unchanged(model, before)
    prune_hf_model(model, example_inputs("vit"), _SkipAll(), 0.0)  # nothing asked, nothing done: fine


@pytest.mark.parametrize("family", ["vit", "llava"])
@pytest.mark.parametrize("global_pruning", [True, False])
def test_removed_fraction_grows_with_the_ratio(family: str, global_pruning: bool) -> None:
    """Torch-Pruning skips a layer it would empty, so without floors 0.99 removed less than 0.9
    (tiny LLaVA: 16% vs 36% of the parameters). Every ratio now removes at least as much as a
    lower one, or is refused with the largest ratio that works."""
    removed: list[tuple[float, float]] = []
    refused: list[float] = []
    for ratio in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        model = tiny_model(family)
        total = _params(model)
        try:
            prune_hf_model(model, example_inputs(family), tp.importance.GroupMagnitudeImportance(), ratio,
                           global_pruning=global_pruning)
        except VLPruneError as err:
            assert "at most" in str(err) and "lower pruning_ratio" in str(err)
            refused.append(ratio)
            continue
        assert not refused, f"{ratio} honoured after {refused} was refused"
        removed.append((ratio, 1 - _params(model) / total))
        assert all(m.hidden >= 1 for m in describe(model).mlps)
        assert all(a.num_heads >= 1 for a in describe(model).attentions)
        model(**example_inputs(family))
    fractions = [f for _, f in removed]
    assert fractions == sorted(fractions), removed
    assert removed[-1][0] >= 0.9 and fractions[-1] > 0.45, removed


def test_head_floor_caps_the_default_head_ratio_and_refuses_an_explicit_one() -> None:
    model = tiny_model("vit")
    prune_hf_model(model, example_inputs("vit"), tp.importance.GroupMagnitudeImportance(), 0.9)
    assert [a.num_heads for a in describe(model).attentions] == [1, 1]
    model = tiny_model("vit")
    before = _state(model)
    with pytest.raises(VLPruneError, match="cannot keep 1 head.*at most 0.750"):
        prune_hf_model(model, example_inputs("vit"), tp.importance.GroupMagnitudeImportance(), 0.5,
                       head_pruning_ratio=0.9)
    assert _unchanged(model, before)
    with pytest.raises(VLPruneError, match="min_neurons"):
        prune_hf_model(model, example_inputs("vit"), tp.importance.GroupMagnitudeImportance(), 0.5, min_neurons=0)
