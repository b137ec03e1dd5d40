"""Every vlprune NNI pruner is reachable by name: vlprune.get_criterion(name, adapter="nni", ...)."""

from __future__ import annotations

import pytest

pytest.importorskip("nni")

import torch  # noqa: E402
from nni.compression.pruning import L1NormPruner  # noqa: E402
from torch import nn  # noqa: E402

import vlprune  # noqa: E402
from vlprune.adapters.nni import AMPPruner, IDWeightedPruner, LayerSimilarityPruner, PlatonPruner  # noqa: E402
from vlprune.testbed import batches, load  # noqa: E402


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_nni_column_lists_the_four_pruners_and_nni_baselines() -> None:
    nni_names = {spec.name for spec in vlprune.criteria() if "nni" in spec.adapters}
    assert {"id_weighted", "platon", "amp_entropy", "layer_similarity", "magnitude", "taylor"} <= nni_names


def test_get_criterion_builds_nni_pruners_by_name() -> None:
    model = _mlp()
    config = [{"op_names": ["0"], "sparse_ratio": 0.5}]
    pruner = vlprune.get_criterion("id_weighted", adapter="nni", model=model, config_list=config, profile={"0": 3.0})
    assert isinstance(pruner, IDWeightedPruner)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert int((masks["0"]["weight"][:, 0] == 0).sum()) == 8
    magnitude = vlprune.get_criterion("magnitude", adapter="nni", model=model, config_list=config)
    assert isinstance(magnitude, L1NormPruner)
    magnitude.unwrap_model()
    assert PlatonPruner is vlprune.plugins.registry.resolve_object(vlprune.plugins.registry.get_spec("platon").adapters["nni"])


def test_get_criterion_builds_amp_and_layer_pruners() -> None:
    clip = load("clip")
    amp = vlprune.get_criterion("amp_entropy", adapter="nni", model=clip,
                                batches=batches("clip", n_samples=16, batch_size=16, images_only=True), delta_e=5e-3,
                                progress=False)
    assert isinstance(amp, AMPPruner) and amp.widths
    amp.unwrap_model()
    llava = load("llava-deep")
    data = {d: batches("llava-deep", n_samples=8, batch_size=8, task=d) for d in ("math", "general")}
    layers = vlprune.get_criterion("layer_similarity", adapter="nni", model=llava, domain_batches=data, n_layers=2,
                                   progress=False)
    assert isinstance(layers, LayerSimilarityPruner) and len(layers.chosen) == 2
    layers.unwrap_model()
