"""Layer scores, utilities, per-layer ratios and modality budgets, against hand computations."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.intrinsic_dim import IDProfile, LayerID
from vlprune.plugins.layer_budget import (
    layer_complexity,
    layer_ratios,
    layer_scores,
    layer_utility,
    modality_budgets,
    modality_ratio_dict,
)

torch.set_num_threads(1)


def _weighted_mean(ratios: dict[str, float], params: dict[str, float]) -> float:
    return sum(params[n] * r for n, r in ratios.items()) / sum(params[n] for n in ratios)


def _profile(entries: dict[str, tuple[float, str]]) -> IDProfile:
    return IDProfile(
        layers={
            n: LayerID(name=n, id=value, n_samples=100, features=16, modality=modality)
            for n, (value, modality) in entries.items()
        }
    )


# ---------------------------------------------------------------------------------------------
# layer_complexity
# ---------------------------------------------------------------------------------------------


def test_layer_complexity_counts_each_modules_parameters() -> None:
    model = nn.ModuleDict(
        {
            "a": nn.Linear(4, 3),
            "b": nn.Linear(4, 3, bias=False),
            "block": nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)),
        }
    )
    assert layer_complexity(model, ["a", "b", "block", "block.1"]) == {
        "a": 4 * 3 + 3,
        "b": 4 * 3,
        "block": (2 * 2 + 2) + (2 + 2),
        "block.1": 4,
    }
    with pytest.raises(ModelStructureError, match="nope"):
        layer_complexity(model, ["a", "nope"])


# ---------------------------------------------------------------------------------------------
# layer_scores
# ---------------------------------------------------------------------------------------------

IDS = {"a": 10.0, "b": 20.0, "c": 30.0}
COMP = {"a": 10, "b": 10, "c": 60}  # ID / Comp = 1, 2, 0.5 (mean 7/6)
UTIL = {"a": 0.1, "b": 0.2, "c": 0.3}  # mean 0.2


def test_layer_scores_raw_formula() -> None:
    scores = layer_scores(IDS, COMP, UTIL, lam=2.0, normalize=False)
    assert list(scores) == ["a", "b", "c"]
    assert scores == pytest.approx({"a": 1.0 + 0.2, "b": 2.0 + 0.4, "c": 0.5 + 0.6})
    assert layer_scores(IDS, COMP, normalize=False) == pytest.approx({"a": 1.0, "b": 2.0, "c": 0.5})


def test_layer_scores_normalized_terms_have_mean_one() -> None:
    scores = layer_scores(IDS, COMP, UTIL, lam=2.0)
    expected = {
        "a": 6 / 7 + 2 * 0.5,
        "b": 12 / 7 + 2 * 1.0,
        "c": 3 / 7 + 2 * 1.5,
    }
    assert scores == pytest.approx(expected)
    id_only = layer_scores(IDS, COMP)
    assert sum(id_only.values()) / 3 == pytest.approx(1.0)
    # with non-negative utilities both terms have mean 1: mean score = 1 + lam
    assert sum(scores.values()) / 3 == pytest.approx(1.0 + 2.0)
    # invariant to the unit of the metric (CIDEr points vs fractions)
    scaled = layer_scores(IDS, COMP, {k: 100 * v for k, v in UTIL.items()}, lam=2.0)
    assert scaled == pytest.approx(scores)


def test_layer_scores_normalize_keeps_sign_of_negative_utility() -> None:
    scores = layer_scores({"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}, {"a": -0.1, "b": 0.3}, lam=1.0)
    # mean |utility| = 0.2 -> -0.5, 1.5; ID terms 1, 1
    assert scores == pytest.approx({"a": 0.5, "b": 2.5})
    zero = layer_scores({"a": 1.0, "b": 3.0}, {"a": 1, "b": 1}, {"a": 0.0, "b": 0.0}, lam=1.0)
    assert zero == pytest.approx({"a": 0.5, "b": 1.5})


def test_layer_scores_ignores_extra_keys_and_unused_utility() -> None:
    scores = layer_scores({"a": 2.0}, {"a": 4, "z": 1}, {"a": 5.0, "z": 9.0}, lam=0.0, normalize=False)
    assert scores == {"a": 0.5}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ids={}, complexity={}), "empty"),
        (dict(ids={"a": 1.0, "b": 1.0}, complexity={"a": 1}), "complexity has no entry"),
        (dict(ids={"a": 1.0}, complexity={"a": 1}, utility={}, lam=1.0), "utility has no entry"),
        (dict(ids={"a": 1.0}, complexity={"a": 1}, lam=1.0), "needs utility"),
        (dict(ids={"a": 0.0}, complexity={"a": 1}), "positive"),
        (dict(ids={"a": -3.0}, complexity={"a": 1}), "positive"),
        (dict(ids={"a": float("nan")}, complexity={"a": 1}), "finite"),
        (dict(ids={"a": 1.0}, complexity={"a": 0}), "complexity"),
        (dict(ids={"a": 1.0}, complexity={"a": 1}, utility={"a": 1.0}, lam=-1.0), "lam"),
    ],
)
def test_layer_scores_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(VLPruneError, match=match):
        layer_scores(**kwargs)


# ---------------------------------------------------------------------------------------------
# layer_ratios
# ---------------------------------------------------------------------------------------------


def test_layer_ratios_inverse_rule_hand_computed() -> None:
    # w = mean / score = 2, 2/3; c * (2 + 2/3) / 2 = 0.4 -> c = 0.3
    ratios = layer_ratios({"a": 1.0, "b": 3.0}, {"a": 10, "b": 10}, total_ratio=0.4)
    assert ratios == pytest.approx({"a": 0.6, "b": 0.2}, abs=1e-12)


def test_layer_ratios_clipping_redistributes_to_the_others() -> None:
    # unclipped a would get 10x of b, c: 1.25 > 0.9 -> a = 0.9, (0.9 + 2x) / 3 = 0.5 -> x = 0.3
    ratios = layer_ratios({"a": 0.1, "b": 1.0, "c": 1.0}, {"a": 1, "b": 1, "c": 1}, 0.5, max_ratio=0.9)
    assert ratios == pytest.approx({"a": 0.9, "b": 0.3, "c": 0.3}, abs=1e-12)
    # with a floor: b's floor binds; inverse weights 1, 1/4, 1/2 (scores 1, 4, 2)
    ratios = layer_ratios({"a": 1.0, "b": 4.0, "c": 2.0}, {"a": 1, "b": 1, "c": 1}, 0.3, min_ratio=0.15)
    # try b at the floor: a = 2k, c = k with 2k + k + 0.15 = 0.9 -> k = 0.25: c = 0.25, b's 0.125 < 0.15
    assert ratios == pytest.approx({"a": 0.5, "b": 0.15, "c": 0.25}, abs=1e-12)


def test_layer_ratios_exp_rule_hand_computed_with_negative_scores() -> None:
    # mean 0, std 1 -> w = e, 1/e; c (e + 1/e) / 2 = 0.3
    ratios = layer_ratios({"a": -1.0, "b": 1.0}, {"a": 5, "b": 5}, 0.3, rule="exp")
    c = 0.6 / (math.e + 1 / math.e)
    assert ratios == pytest.approx({"a": c * math.e, "b": c / math.e}, abs=1e-12)


@pytest.mark.parametrize("rule", ["inverse", "exp"])
@pytest.mark.parametrize(
    "total, lo, hi, strength",
    [(0.4, 0.0, 0.9, 1.0), (0.7, 0.1, 0.8, 2.0), (0.05, 0.0, 0.95, 0.5), (0.5, 0.2, 0.6, 3.0)],
)
def test_layer_ratios_properties(rule: str, total: float, lo: float, hi: float, strength: float) -> None:
    rng = random.Random(hash((rule, total, lo, hi, strength)) % 1000)
    names = [f"layer{i}" for i in range(40)]
    scores = {n: rng.lognormvariate(0.0, 1.5) for n in names}
    params = {n: rng.choice([1_000, 50_000, 2_359_296]) for n in names}
    ratios = layer_ratios(scores, params, total, lo, hi, rule=rule, strength=strength)
    assert list(ratios) == names
    assert _weighted_mean(ratios, params) == pytest.approx(total, abs=1e-9)
    assert all(lo - 1e-12 <= r <= hi + 1e-12 for r in ratios.values())
    by_score = sorted(names, key=scores.__getitem__)
    values = [ratios[n] for n in by_score]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), "higher score got a higher ratio"
    assert values[0] > values[-1]


def test_layer_ratios_degenerate_cases() -> None:
    scores = {"a": 1.0, "b": 2.0, "c": 5.0}
    params = {"a": 3, "b": 1, "c": 7}
    assert layer_ratios(scores, params, 0.8, max_ratio=0.8) == pytest.approx({n: 0.8 for n in scores})
    assert layer_ratios(scores, params, 0.2, min_ratio=0.2) == pytest.approx({n: 0.2 for n in scores})
    assert layer_ratios(scores, params, 0.0) == {n: 0.0 for n in scores}
    assert layer_ratios(scores, params, 0.35, strength=0.0) == pytest.approx({n: 0.35 for n in scores})
    equal = {"a": 2.0, "b": 2.0, "c": 2.0}
    for rule in ("inverse", "exp"):
        assert layer_ratios(equal, params, 0.35, rule=rule) == pytest.approx({n: 0.35 for n in equal})


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (({"a": 1.0}, {"a": 1}, 0.95), {}, "cannot be reached"),
        (({"a": 1.0}, {"a": 1}, 0.05), {"min_ratio": 0.1}, "cannot be reached"),
        (({"a": 1.0}, {"a": 1}, 1.0), {"max_ratio": 1.0}, r"\[0, 1\)"),
        (({"a": 1.0}, {"a": 1}, -0.1), {}, r"\[0, 1\)"),
        (({"a": 1.0}, {"a": 1}, 0.3), {"min_ratio": 0.5, "max_ratio": 0.2}, "min_ratio"),
        (({"a": 1.0, "b": -1.0}, {"a": 1, "b": 1}, 0.3), {}, "positive scores"),
        (({"a": 1.0, "b": 0.0}, {"a": 1, "b": 1}, 0.3), {}, "positive scores"),
        (({"a": 1.0, "b": 2.0}, {"a": 1}, 0.3), {}, "params has no entry"),
        (({"a": 1.0}, {"a": 0}, 0.3), {}, "parameter count"),
        (({}, {}, 0.3), {}, "empty"),
        (({"a": 1.0}, {"a": 1}, 0.3), {"rule": "linear"}, "rule"),
        (({"a": 1.0}, {"a": 1}, 0.3), {"strength": -1.0}, "strength"),
        (({"a": float("inf")}, {"a": 1}, 0.3), {}, "finite"),
    ],
)
def test_layer_ratios_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(VLPruneError, match=match):
        layer_ratios(*args, **kwargs)


def test_scores_to_ratios_pipeline_on_a_profile() -> None:
    profile = _profile(
        {"v.fc1": (200.0, "vision"), "v.fc2": (300.0, "vision"), "t.fc1": (10.0, "language"), "t.fc2": (12.0, "language")}
    )
    comp = {n: 1000 for n in profile}
    ratios = layer_ratios(layer_scores(profile.ids(), comp), comp, 0.5)
    assert _weighted_mean(ratios, comp) == pytest.approx(0.5, abs=1e-9)
    assert min(ratios["t.fc1"], ratios["t.fc2"]) > max(ratios["v.fc1"], ratios["v.fc2"])


# ---------------------------------------------------------------------------------------------
# layer_utility
# ---------------------------------------------------------------------------------------------


class _Residual(nn.Module):
    """out = h + fc_b(h) + 0 * dead(h), h = x + fc_a(x): ``dead`` cannot change the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a = nn.Linear(4, 4)
        self.fc_b = nn.Linear(4, 4)
        self.dead = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)  # a module that is not evaluated in utility tests

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc_a(x)
        return h + self.fc_b(h) + 0.0 * self.dead(h)


def _setup() -> tuple[_Residual, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = _Residual().double()
    x = torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}


def _assert_bitwise_restored(model: nn.Module, snap: dict[str, tuple[torch.Tensor, int]]) -> None:
    for n, p in model.named_parameters():
        value, ptr = snap[n]
        assert p.data_ptr() == ptr, f"{n} was replaced, not restored in place"
        assert p.dtype == value.dtype and torch.equal(p.detach().view(torch.int64), value.view(torch.int64)), n


def test_layer_utility_measures_metric_drop_and_restores() -> None:
    model, x, y = _setup()
    snap = _snapshot(model)

    def metric(m: nn.Module) -> float:
        with torch.no_grad():
            return -float(F.mse_loss(m(x), y))

    utility = layer_utility(model, ["fc_a", "fc_b", "dead"], metric, progress=False)
    assert list(utility) == ["fc_a", "fc_b", "dead"]
    # independent: without fc_a, h = x; without fc_b, out = h; baseline metric is 0
    wb, bb = snap["fc_b.weight"][0], snap["fc_b.bias"][0]
    wa, ba = snap["fc_a.weight"][0], snap["fc_a.bias"][0]
    out_without_a = x + F.linear(x, wb, bb)
    h = x + F.linear(x, wa, ba)
    assert utility["fc_a"] == pytest.approx(float(((out_without_a - y) ** 2).mean()), rel=1e-9)
    assert utility["fc_b"] == pytest.approx(float((F.linear(h, wb, bb) ** 2).mean()), rel=1e-9)
    assert utility["fc_a"] > 0 and utility["fc_b"] > 0
    assert utility["dead"] == 0.0
    _assert_bitwise_restored(model, snap)


def test_layer_utility_zeroes_the_layer_during_its_evaluation() -> None:
    model, _, _ = _setup()
    seen: list[tuple[float, float]] = []

    def metric(m: _Residual) -> float:
        seen.append(
            (
                float(m.fc_a.weight.detach().abs().sum() + m.fc_a.bias.detach().abs().sum()),
                float(m.fc_b.weight.detach().abs().sum()),
            )
        )
        return 1.0

    utility = layer_utility(model, ["fc_a"], metric, progress=True)
    assert utility == {"fc_a": 0.0}
    assert seen[0][0] > 0 and seen[1][0] == 0.0 and seen[1][1] == seen[0][1]


def test_layer_utility_restores_bitwise_when_metric_raises() -> None:
    model, _, _ = _setup()
    snap = _snapshot(model)
    calls = []

    def metric(m: nn.Module) -> float:
        calls.append(1)
        if len(calls) == 3:  # baseline, fc_a, then fails while fc_b is zeroed
            raise RuntimeError("evaluation crashed")
        return 0.5

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        layer_utility(model, ["fc_a", "fc_b", "dead"], metric, progress=False)
    _assert_bitwise_restored(model, snap)


def test_layer_utility_non_finite_metric_restores_and_raises() -> None:
    model, _, _ = _setup()
    snap = _snapshot(model)
    values = iter([1.0, float("nan")])
    with pytest.raises(DataError, match="fc_b"):
        layer_utility(model, ["fc_b"], lambda m: next(values), progress=False)
    _assert_bitwise_restored(model, snap)


@pytest.mark.parametrize(
    "layers, kwargs, error, match",
    [
        (["fc_a", "nope"], {}, ModelStructureError, "nope"),
        (["fc_a"], {"mode": "identity"}, VLPruneError, "mode"),
        ([], {}, VLPruneError, "empty"),
        (["fc_a", "fc_a"], {}, VLPruneError, "more than once"),
        ([""], {}, VLPruneError, "no parameters"),  # the root of a model with only buffers
    ],
)
def test_layer_utility_errors_leave_model_untouched(layers: list, kwargs: dict, error: type, match: str) -> None:
    model, _, _ = _setup()
    if layers == [""]:
        model = nn.Sequential(nn.ReLU())
    snap = _snapshot(model)
    calls = []
    with pytest.raises(error, match=match):
        layer_utility(model, layers, lambda m: calls.append(1) or 0.0, progress=False, **kwargs)
    assert calls == [], "the metric ran although the input was invalid"
    _assert_bitwise_restored(model, snap)


# ---------------------------------------------------------------------------------------------
# modality_budgets / modality_ratio_dict
# ---------------------------------------------------------------------------------------------

ENTRIES = {
    "vision.0": (100.0, "vision"),
    "vision.1": (300.0, "vision"),
    "vision.2": (200.0, "vision"),  # mean 200
    "fusion.0": (70.0, "fusion"),
    "fusion.1": (80.0, "fusion"),  # mean 75
    "text.0": (10.0, "language"),
    "text.1": (20.0, "language"),
    "text.2": (30.0, "language"),  # mean 20
}


def test_modality_budgets_inverse_id_hand_computed() -> None:
    budgets = modality_budgets(_profile(ENTRIES), 0.3)
    assert list(budgets) == ["vision", "fusion", "language"]
    # ratio_m = c / mean_ID_m; equal layer weights: (3c/200 + 2c/75 + 3c/20) / 8 = 0.3
    c = 0.3 * 8 / (3 / 200 + 2 / 75 + 3 / 20)
    assert budgets == pytest.approx({"vision": c / 200, "fusion": c / 75, "language": c / 20}, abs=1e-12)
    assert budgets["language"] > budgets["fusion"] > budgets["vision"]
    # the mapping form gives the same
    assert modality_budgets(ENTRIES, 0.3) == pytest.approx(budgets, abs=1e-12)


def test_modality_budgets_parameter_weighted_and_strength() -> None:
    params = {n: (4 if n.startswith("vision") else 1) * 1000 for n in ENTRIES}
    for strength in (0.5, 1.0, 2.0):
        budgets = modality_budgets(_profile(ENTRIES), 0.15, params=params, strength=strength)
        per_layer = {n: budgets[m] for n, (_, m) in ENTRIES.items()}
        assert _weighted_mean(per_layer, params) == pytest.approx(0.15, abs=1e-9)
        # ratio proportional to (1 / mean ID) ** strength while nothing is clipped
        assert budgets["language"] / budgets["vision"] == pytest.approx((200 / 20) ** strength)
        assert budgets["language"] < 0.9


def test_modality_budgets_clip_at_max_ratio() -> None:
    budgets = modality_budgets(_profile(ENTRIES), 0.5, max_ratio=0.8)
    # unclipped language would be > 0.8; it is clipped and vision/fusion (c / 200, c / 75) take the rest:
    # (3 * 0.8 + 3c/200 + 2c/75) / 8 = 0.5
    c = (0.5 * 8 - 3 * 0.8) / (3 / 200 + 2 / 75)
    assert budgets == pytest.approx({"vision": c / 200, "fusion": c / 75, "language": 0.8}, abs=1e-12)


def test_modality_budgets_uniform_and_zero_strength() -> None:
    assert modality_budgets(_profile(ENTRIES), 0.3, rule="uniform") == {
        "vision": 0.3,
        "fusion": 0.3,
        "language": 0.3,
    }
    assert modality_budgets(_profile(ENTRIES), 0.3, strength=0.0) == pytest.approx(
        {"vision": 0.3, "fusion": 0.3, "language": 0.3}
    )


@pytest.mark.parametrize(
    "profile, kwargs, match",
    [
        (ENTRIES, {"total_ratio": 0.95}, "max_ratio"),
        (ENTRIES, {"total_ratio": 1.0, "max_ratio": 1.0}, r"\[0, 1\)"),
        (ENTRIES, {"total_ratio": 0.3, "rule": "by_depth"}, "rule"),
        (ENTRIES, {"total_ratio": 0.3, "strength": -1.0}, "strength"),
        (ENTRIES, {"total_ratio": 0.3, "params": {"vision.0": 10}}, "params has no entry"),
        ({}, {"total_ratio": 0.3}, "empty"),
        ({"a": (0.0, "vision")}, {"total_ratio": 0.3}, "positive"),
        ({"a": 5.0}, {"total_ratio": 0.3}, "modality"),
        ([1, 2], {"total_ratio": 0.3}, "IDProfile"),
    ],
)
def test_modality_budgets_errors(profile: object, kwargs: dict, match: str) -> None:
    with pytest.raises(VLPruneError, match=match):
        modality_budgets(profile, **kwargs)


def _two_tower() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "vision": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
            "text": nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)),
        }
    )


def test_modality_ratio_dict_maps_modules_to_their_modality() -> None:
    model = _two_tower()
    profile = _profile({"vision.0": (200.0, "vision"), "text.0": (20.0, "language")})
    budgets = modality_budgets(profile, 0.4, params=layer_complexity(model, list(profile)))
    ratio_dict = modality_ratio_dict(model, profile, budgets)
    assert ratio_dict == {model["vision"][0]: budgets["vision"], model["text"][0]: budgets["language"]}
    assert all(isinstance(k, nn.Module) for k in ratio_dict)


def test_modality_ratio_dict_drives_torch_pruning() -> None:
    tp = pytest.importorskip("torch_pruning")

    class TwoTower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.towers = _two_tower()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.towers["vision"](x) + self.towers["text"](x)

    model = TwoTower()
    profile = _profile({"towers.vision.0": (200.0, "vision"), "towers.text.0": (20.0, "language")})
    budgets = {"vision": 0.25, "language": 0.75}
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(2, 8),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.0,
        pruning_ratio_dict=modality_ratio_dict(model, profile, budgets),
        ignored_layers=[model.towers["vision"][2], model.towers["text"][2]],
    )
    pruner.step()
    assert model.towers["vision"][0].out_features == 12
    assert model.towers["text"][0].out_features == 4


def test_modality_ratio_dict_errors() -> None:
    model = _two_tower()
    profile = _profile({"vision.0": (200.0, "vision"), "text.0": (20.0, "language")})
    with pytest.raises(ModelStructureError, match="vision.9"):
        modality_ratio_dict(model, _profile({"vision.9": (1.0, "vision")}), {"vision": 0.1})
    with pytest.raises(VLPruneError, match="language"):
        modality_ratio_dict(model, profile, {"vision": 0.1})
    with pytest.raises(VLPruneError, match=r"\[0, 1\]"):
        modality_ratio_dict(model, profile, {"vision": 0.1, "language": 1.5})
