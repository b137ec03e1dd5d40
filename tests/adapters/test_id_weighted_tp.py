"""IDWeightedImportance inside plain Torch-Pruning scripts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from vlprune import ModelStructureError, VLPruneError
from vlprune.adapters.torch_pruning import IDWeightedImportance, group_layer_names


class _TwoMLPs(nn.Module):
    """Two residual MLP blocks: a 'vision' one and a 'language' one."""

    def __init__(self) -> None:
        super().__init__()
        self.vis_fc1, self.vis_fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.txt_fc1, self.txt_fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.vis_fc2(torch.relu(self.vis_fc1(x)))
        x = x + self.txt_fc2(torch.relu(self.txt_fc1(x)))
        return self.head(x)


IDS = {"vis_fc1": 40.0, "vis_fc2": 20.0, "txt_fc1": 6.0, "txt_fc2": 4.0}


def _groups(model: nn.Module) -> dict[str, object]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 8))
    return {
        name: dg.get_pruning_group(getattr(model, name), tp.prune_linear_out_channels, list(range(32)))
        for name in ("vis_fc1", "txt_fc1")
    }


def test_scores_are_base_times_mean_layer_id() -> None:
    model = _TwoMLPs()
    base = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    imp = IDWeightedImportance(base, IDS)
    for root, group in _groups(model).items():
        assert group_layer_names(group) == [root, root.replace("fc1", "fc2")]
        expected_id = (IDS[root] + IDS[root.replace("fc1", "fc2")]) / 2
        # independent base score: squared L2 norm of the fc1 row and of the fc2 column, averaged (tp's mean reduction)
        fc1, fc2 = getattr(model, root), getattr(model, root.replace("fc1", "fc2"))
        manual = ((fc1.weight**2).sum(1) + (fc2.weight**2).sum(0)) / 2
        torch.testing.assert_close(imp(group), manual * expected_id, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode,factor", [("root", 40.0), ("max", 40.0), ("min", 20.0)])
def test_group_id_modes(mode: str, factor: float) -> None:
    model = _TwoMLPs()
    base = tp.importance.GroupMagnitudeImportance()
    group = _groups(model)["vis_fc1"]
    torch.testing.assert_close(IDWeightedImportance(base, IDS, group_id=mode)(group), base(group) * factor)  # type: ignore[arg-type]


def test_normalize_keeps_ranking_and_base_scale() -> None:
    model = _TwoMLPs()
    base = tp.importance.GroupMagnitudeImportance()
    group = _groups(model)["txt_fc1"]
    raw = IDWeightedImportance(base, IDS)(group)
    norm = IDWeightedImportance(base, IDS, normalize=True)(group)
    torch.testing.assert_close(norm, raw / (sum(IDS.values()) / 4))
    assert torch.equal(torch.argsort(raw), torch.argsort(norm))


def test_global_pruning_cuts_low_id_layers_harder() -> None:
    torch.manual_seed(0)
    model = _TwoMLPs()
    with torch.no_grad():  # equal base scores everywhere, so only the ID decides
        for fc in (model.vis_fc1, model.txt_fc1):
            fc.weight.copy_(model.vis_fc1.weight)
            fc.bias.copy_(model.vis_fc1.bias)
        model.txt_fc2.weight.copy_(model.vis_fc2.weight)
    imp = IDWeightedImportance(tp.importance.GroupMagnitudeImportance(), IDS)
    pruner = tp.pruner.BasePruner(
        model, torch.randn(2, 8), importance=imp, pruning_ratio=0.4, global_pruning=True,
        ignored_layers=[model.head, model.vis_fc2, model.txt_fc2],
    )
    pruner.step()
    assert model.txt_fc1.out_features < model.vis_fc1.out_features
    assert model(torch.randn(3, 8)).shape == (3, 3)


def test_missing_id_raises_and_leaves_model_unchanged() -> None:
    model = _TwoMLPs()
    before = copy.deepcopy(model.state_dict())
    imp = IDWeightedImportance(tp.importance.GroupMagnitudeImportance(), {"vis_fc1": 30.0, "vis_fc2": 10.0})
    for global_pruning in (True, False):
        pruner = tp.pruner.BasePruner(model, torch.randn(2, 8), importance=imp, pruning_ratio=0.4,
                                      global_pruning=global_pruning, ignored_layers=[model.head])
        with pytest.raises(ModelStructureError, match="no intrinsic dimension.*txt_fc1"):
            pruner.step()
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)
    skipping = IDWeightedImportance(tp.importance.GroupMagnitudeImportance(), {"vis_fc1": 30.0}, missing="skip")
    tp.pruner.BasePruner(model, torch.randn(2, 8), importance=skipping, pruning_ratio=0.5,
                         ignored_layers=[model.head]).step()
    assert model.txt_fc1.out_features == 32 and model.vis_fc1.out_features == 16


def test_constructor_rejects_bad_input() -> None:
    base = tp.importance.GroupMagnitudeImportance()
    with pytest.raises(VLPruneError, match="empty"):
        IDWeightedImportance(base, {})
    with pytest.raises(VLPruneError, match="positive"):
        IDWeightedImportance(base, {"a": -1.0})
    with pytest.raises(VLPruneError, match="group_id"):
        IDWeightedImportance(base, IDS, group_id="median")  # type: ignore[arg-type]
    with pytest.raises(VLPruneError, match="base"):
        IDWeightedImportance(object(), IDS)  # type: ignore[arg-type]


def test_registry_builds_the_same_importance() -> None:
    imp = vlprune.get_criterion("id_weighted", adapter="torch_pruning", base=tp.importance.GroupMagnitudeImportance(), profile=IDS)
    group = _groups(_TwoMLPs())["vis_fc1"]
    assert imp(group).shape == (32,)
