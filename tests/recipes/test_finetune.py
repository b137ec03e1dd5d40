"""The training-aware pruning loop: prune on PLATON's cubic schedule while training."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from vlprune import VLPruneError
from vlprune.adapters.torch_pruning import IDWeightedImportance, PlatonImportance, cubic_scheduler, pruning_steps
from vlprune.plugins.platon import cubic_schedule
from vlprune.recipes.finetune import GlobalUnstructuredPruning, StructuredPruning, train_loop

torch.set_num_threads(1)


class _Net(nn.Module):
    """Two residual MLP blocks ('vision' then 'language') and a head, on a learnable task."""

    def __init__(self) -> None:
        super().__init__()
        self.vis_fc1, self.vis_fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.txt_fc1, self.txt_fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = x + self.vis_fc2(torch.relu(self.vis_fc1(x)))
        x = x + self.txt_fc2(torch.relu(self.txt_fc1(x)))
        logits = self.head(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _Out(dict):
    def __getattr__(self, key: str) -> torch.Tensor:
        return self[key]


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    forward = net.forward
    net.forward = lambda *a, **k: _Out(forward(*a, **k))  # type: ignore[method-assign]
    return net


def _batches(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 8, generator=g)
    return {"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long()}


NAMES = ["vis_fc1.weight", "vis_fc2.weight", "txt_fc1.weight", "txt_fc2.weight"]
IDS = {"vis_fc1": 40.0, "vis_fc2": 30.0, "txt_fc1": 5.0, "txt_fc2": 4.0}


def test_train_loop_lowers_the_loss() -> None:
    model = _model()
    log = train_loop(model, _batches, 60, lr=1e-2, progress=False)
    assert log["loss"][-1][1] < 0.7 * log["loss"][0][1]
    assert not model.training


def test_unstructured_schedule_reaches_the_final_sparsity() -> None:
    model = _model()
    sched = dict(warmup_steps=5, initial_warmup=1.0, final_warmup=2.0, delta_t=5)
    cb = GlobalUnstructuredPruning(NAMES, "platon", 60, 0.7, min_keep=0.0, **sched)
    train_loop(model, _batches, 60, lr=1e-2, callbacks=[cb], progress=False)
    report = cb.finish(model)
    assert report["overall"] == pytest.approx(0.7, abs=0.01)
    assert cb.mask_updates >= 10  # every delta_t steps in the cubic phase, every step at the end
    # the permanent zeros are the pruned weights: no mask reparametrisation left
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())


def test_id_weighting_prunes_the_low_id_modality_harder() -> None:
    model = _model()
    cb = GlobalUnstructuredPruning(NAMES, "magnitude", 30, 0.5, ids=IDS, min_keep=0.0,
                                   warmup_steps=5, initial_warmup=1.0, final_warmup=1.0, delta_t=5)
    train_loop(model, _batches, 30, lr=1e-2, callbacks=[cb], progress=False)
    report = cb.finish(model)
    vision = (report["vis_fc1.weight"] + report["vis_fc2.weight"]) / 2
    language = (report["txt_fc1.weight"] + report["txt_fc2.weight"]) / 2
    assert language > vision


def test_modality_budgets_give_each_modality_its_sparsity() -> None:
    model = _model()
    modality_of = {"vis_fc1": "vision", "vis_fc2": "vision", "txt_fc1": "language", "txt_fc2": "language"}
    cb = GlobalUnstructuredPruning(NAMES, "taylor", 30, 0.5, modality_sparsity={"vision": 0.3, "language": 0.7},
                                   modality_of=modality_of, min_keep=0.0,
                                   warmup_steps=5, initial_warmup=1.0, final_warmup=1.0, delta_t=5)
    train_loop(model, _batches, 30, lr=1e-2, callbacks=[cb], progress=False)
    report = cb.finish(model)
    assert (report["vis_fc1.weight"] * 256 + report["vis_fc2.weight"] * 256) / 512 == pytest.approx(0.3, abs=0.01)
    assert (report["txt_fc1.weight"] + report["txt_fc2.weight"]) / 2 == pytest.approx(0.7, abs=0.01)


def test_unstructured_bad_arguments() -> None:
    with pytest.raises(VLPruneError, match="score"):
        GlobalUnstructuredPruning(NAMES, "l0", 30, 0.5)
    with pytest.raises(VLPruneError, match="intrinsic dimension"):
        GlobalUnstructuredPruning(NAMES, "magnitude", 100, 0.5, ids={"vis_fc1": 3.0})
    with pytest.raises(VLPruneError, match="warm-ups"):
        GlobalUnstructuredPruning(NAMES, "magnitude", 30, 0.5, warmup_steps=20)
    with pytest.raises(VLPruneError, match="modality_of"):
        GlobalUnstructuredPruning(NAMES, "magnitude", 100, 0.5, modality_sparsity={"vision": 0.5})


@pytest.mark.parametrize("id_weighted", [False, True])
def test_structured_platon_prunes_on_schedule_while_training(id_weighted: bool) -> None:
    model = _model()
    imp = PlatonImportance(delta_t=3)
    importance = IDWeightedImportance(imp, IDS) if id_weighted else imp
    example = {"x": torch.randn(2, 8)}
    pruner = tp.pruner.BasePruner(
        model, example, importance=importance, pruning_ratio=0.5, iterative_steps=3,
        iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True,
        ignored_layers=[model.head, model.vis_fc2, model.txt_fc2], output_transform=lambda out: out["logits"],
    )
    prune_at = pruning_steps(40, 3, warmup_steps=5, initial_warmup=1.0, final_warmup=1.0)
    widths = []
    cb = StructuredPruning(pruner, prune_at, after_prune=lambda m: widths.append(m.vis_fc1.out_features + m.txt_fc1.out_features))
    assert cb.platon is imp
    log = train_loop(model, _batches, 40, lr=1e-2, callbacks=[cb], progress=False)
    # cumulative widths follow the cubic scheduler: 64 * (1 - ratio_k)
    assert widths == [round(64 * (1 - r)) for r in cubic_scheduler(0.5, 3)[1:]]
    assert imp.platon.score("vis_fc1.weight").shape == model.vis_fc1.weight.shape
    assert torch.isfinite(torch.tensor(log["loss"][-1][1]))
    if id_weighted:  # language (ID ~4.5) loses more neurons than vision (ID ~35)
        assert model.txt_fc1.out_features < model.vis_fc1.out_features


def test_structured_needs_matching_pruning_steps() -> None:
    model = _model()
    pruner = tp.pruner.BasePruner(model, {"x": torch.randn(2, 8)}, importance=tp.importance.GroupMagnitudeImportance(),
                                  pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model.head],
                                  output_transform=lambda out: out["logits"])
    with pytest.raises(VLPruneError, match="iterative_steps"):
        StructuredPruning(pruner, [5, 10, 15])


def test_schedule_is_what_the_callback_follows() -> None:
    cb = GlobalUnstructuredPruning(NAMES, "magnitude", 100, 0.8, warmup_steps=10, initial_warmup=1.0, final_warmup=2.0)
    for step in (5, 11, 50, 90):
        expected = 1 - cubic_schedule(step, 100, 1.0, 0.2, 10, 1.0, 2.0, 10)[0]
        assert cb._sparsity(step, 0.8)[0] == pytest.approx(expected)
