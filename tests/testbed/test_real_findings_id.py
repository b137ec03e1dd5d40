"""The real-weights ID findings' benchmark scripts (benchmarks/bench_real_id_profile.py,
benchmarks/bench_real_platon.py), run in tiny configurations on real DINOv2-S and SmolLM2: a profile
has one finite ID per chosen module, measured on the asked number of samples and features; a pruned
model removes the asked fraction of MLP neurons and exactly the parameters those neurons own, leaves
the unpruned model untouched, and scores finite metrics.

Skipped (reason names ``make real``) when the real-tier packages are not installed.
"""

from __future__ import annotations

import argparse
import math

import pytest

from tests.conftest import import_benchmarks
from tests.testbed.real_marks import needs_dinov2, needs_smollm2


@pytest.fixture(scope="module")
def bench():
    """The two benchmark modules, imported from benchmarks/."""
    yield from import_benchmarks("bench_real_id_profile", "bench_real_platon")


def _tiny_args(**over) -> argparse.Namespace:
    args = dict(
        steps=4, batch_size=2, lr=0.0, warmup_steps=1, initial_warmup=1.0, final_warmup=1.0, delta_t=1,
        iterative_steps=2, image_size=56, seq_len=12, knn_train=30, knn_test=20, ppl_texts=2, ids_json=None,
        id_samples=12, criteria=["id_platon"], seed=0, progress=False,
    )
    args.update(over)
    return argparse.Namespace(**args)


# ------------------------------------------------------------------------------------ no packages needed
def test_shape_stats_calls_a_hunchback_only_for_rise_then_fall(bench) -> None:
    profile, _ = bench
    hump = profile.shape_stats([10.0, 20.0, 30.0, 15.0])
    assert hump["hunchback"] and hump["peak_layer"] == 2 and hump["peak"] == 30.0
    assert hump["rise_frac"] == pytest.approx(20 / 30, abs=1e-3) and hump["fall_frac"] == pytest.approx(0.5)
    assert not profile.shape_stats([30.0, 20.0, 15.0, 10.0])["hunchback"]  # peak at the first layer
    assert not profile.shape_stats([10.0, 11.0, 10.5, 10.0])["hunchback"]  # a 9% bump is flat
    flat = profile.shape_stats([5.0, 5.0, None, 5.0])
    assert flat["layers"] == 3 and flat["cv"] == 0.0


def test_depth_table_places_each_module_at_its_layer(bench) -> None:
    profile, _ = bench
    depth = profile.depth_table("dinov2-s", {"encoder.layer.0": 10.0, "encoder.layer.0.mlp.fc1": 4.0,
                                             "encoder.layer.0.mlp.fc2": 6.0, "encoder.layer.11": 8.0})
    assert depth["block"][0] == 10.0 and depth["block"][11] == 8.0 and depth["block"][5] is None
    assert depth["mlp.fc1"][0] == 4.0 and depth["linear_mean"][0] == 5.0
    assert "attention.q_proj" not in depth  # series with no value are dropped


# -------------------------------------------------------------------------------------------- DINOv2
@needs_dinov2
def test_dinov2_profile_one_finite_id_per_chosen_module(bench) -> None:
    profile, _ = bench
    result = profile.id_profile("dinov2-s", n_samples=16, which="both", layers=[0, 11], image_size=56, batch_size=16)
    names = ["encoder.layer.0." + x for x in profile.LINEARS["dinov2-s"]] + ["encoder.layer.0"]
    names += [n.replace(".0", ".11", 1) for n in names]
    assert sorted(result.ids()) == sorted(names)
    tokens = (56 // 14) ** 2 + 1
    for name, layer in result.layers.items():
        width = 1536 if name.endswith("fc1") else 384
        assert layer.n_samples == 16 and layer.features == tokens * width, name  # flatten: tokens x width
        assert math.isfinite(layer.id) and 0 < layer.id < layer.features, name
        assert layer.modality == "vision"


@pytest.mark.slow  # a Torch-Pruning trace + 4 backward passes + a k-NN evaluation of real DINOv2-S
@needs_dinov2
def test_dinov2_pruned_run_removes_the_asked_neurons_and_their_parameters(bench) -> None:
    _, platon = bench
    args = _tiny_args()
    s = platon.setup("dinov2-s", args)
    assert len(s["ids"]) == 24 and all(k.startswith("encoder.layer.") and v > 0 for k, v in s["ids"].items())
    base = {k: v.clone() for k, v in s["model"].state_dict().items()}
    row = platon.run_one(s, "id_platon", 0.4, args)
    removed = round(row["neurons_removed"] * s["neurons"])
    assert abs(row["neurons_removed"] - 0.4) < 0.01
    # each MLP neuron owns a row of fc1 (384 weights + 1 bias) and a column of fc2 (384 weights)
    assert round(row["params_ratio"] * s["params"]) == pytest.approx(s["params"] - removed * 769, abs=s["params"] * 1e-4)
    assert len(row["mlp_widths"]) == 12 and sum(row["mlp_widths"]) == s["neurons"] - removed
    assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["linear_probe"] <= 1.0
    assert all(v.equal(s["model"].state_dict()[k]) for k, v in base.items())  # the unpruned model is untouched


# -------------------------------------------------------------------------------------------- SmolLM2
@needs_smollm2
def test_smollm2_profile_one_finite_id_per_chosen_module(bench) -> None:
    profile, _ = bench
    result = profile.id_profile("smollm2", n_samples=12, which="mlp", layers=[0, 29], seq_len=8, batch_size=12)
    assert list(result.ids()) == [f"layers.{i}.{x}" for i in (0, 29) for x in profile.MLP_LINEARS["smollm2"]]
    for name, layer in result.layers.items():
        assert layer.n_samples == 12 and layer.features == 8 * (576 if name.endswith("down_proj") else 1536), name
        assert math.isfinite(layer.id) and layer.id > 0 and layer.modality == "language"


@pytest.mark.slow  # a Torch-Pruning trace + 3 backward passes of real SmolLM2 (135M)
@needs_smollm2
def test_smollm2_pruned_run_removes_the_asked_neurons_and_their_parameters(bench) -> None:
    _, platon = bench
    args = _tiny_args(steps=3, iterative_steps=1, id_samples=10, seq_len=10)
    s = platon.setup("smollm2", args)
    assert len(s["ids"]) == 90 and all(k.startswith("model.layers.") for k in s["ids"])
    row = platon.run_one(s, "id_platon", 0.4, args)
    removed = round(row["neurons_removed"] * s["neurons"])
    assert abs(row["neurons_removed"] - 0.4) < 0.01
    # each MLP neuron owns a row of gate_proj and up_proj and a column of down_proj (576 each, no bias)
    assert round(row["params_ratio"] * s["params"]) == pytest.approx(s["params"] - removed * 3 * 576, abs=s["params"] * 1e-4)
    assert len(row["mlp_widths"]) == 30 and sum(row["mlp_widths"]) == s["neurons"] - removed
    assert all(math.isfinite(row[d]) and row[d] > 1.0 for d in ("math", "general"))
    assert platon.mlp_neurons(s["model"]) == 30 * 1536  # the unpruned model is untouched
