"""estimate_ids on first use: too few samples are said (or refused), a generic model is profiled
in every prunable layer, and the default profile of every supported family covers every group
Torch-Pruning may prune (issue 10, points 4c, 4d, 8)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune
from tests.conftest import batches_for
from vlprune import DataError
from vlprune.adapters.hf.families import default_id_modules, describe
from vlprune.adapters.torch_pruning import IDWeightedImportance, _output_transform, hf_pruner_kwargs, prune_hf_model
from vlprune.plugins.intrinsic_dim import MIN_SAMPLES, estimate_ids, prunable_modules
from vlprune.testbed.tiny import TINY_FAMILIES, example_inputs, tiny_model


# ------------------------------------------------------------------ 4c: fewer samples than asked
def test_fewer_samples_than_asked_warn_with_the_count_and_the_fix(caplog) -> None:
    model = tiny_model("clip")
    batches = [example_inputs("clip", batch_size=5, seed=s) for s in range(2)]  # 10 samples
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match=r"n_samples=2000.*only 10 samples") as rec:
        profile = estimate_ids(model, batches, ["*.fc1"], n_samples=2000, progress=False)
    message = str(rec[0].message)
    assert "pass more calibration batches" in message and "lower n_samples" in message
    assert any("only 10 samples" in r.getMessage() for r in caplog.records)
    assert all(layer.n_samples == 10 for layer in profile.layers.values())


def test_as_many_samples_as_asked_say_nothing() -> None:
    model = tiny_model("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_ids(model, batches_for("clip", 2, 8), ["*.fc1"], n_samples=16, progress=False)


def test_too_few_samples_for_twonn_are_refused() -> None:
    model = tiny_model("clip")
    batches = [example_inputs("clip", batch_size=MIN_SAMPLES - 2)]
    with pytest.raises(DataError, match=rf"only {MIN_SAMPLES - 2} sample\(s\) reached it.*at least {MIN_SAMPLES}.*more calibration batches"):
        estimate_ids(model, batches, ["*.fc1"], n_samples=2000, progress=False)
    with pytest.raises(DataError, match="raise n_samples"):
        estimate_ids(model, batches_for("clip", 1, 8), ["*.fc1"], n_samples=5, progress=False)


# ------------------------------------------------------------------ 4d: generic models
class _CNN(nn.Module):
    """A torchvision-style network built by hand: conv stages, pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _generic_models() -> dict[str, tuple[nn.Module, list[torch.Tensor], list[str]]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    return {
        "mlp": (mlp, [torch.randn(40, 16) for _ in range(2)], ["0", "2", "4"]),
        "cnn": (_CNN(), [torch.randn(40, 3, 12, 12) for _ in range(2)], ["features.0", "features.2", "fc"]),
        "conv_only": (nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3)), [torch.randn(40, 2, 16) for _ in range(2)],
                      ["0", "2"]),
    }


@pytest.mark.filterwarnings("ignore:unknown model family")
@pytest.mark.parametrize("kind", ["mlp", "cnn", "conv_only"])
def test_generic_models_are_profiled_in_every_prunable_layer(kind: str) -> None:
    model, batches, expected = _generic_models()[kind]
    assert prunable_modules(model) == expected
    assert default_id_modules(model) == expected
    profile = estimate_ids(model, batches, n_samples=80, progress=False)  # plugin default
    assert list(profile.layers) == expected
    assert all(layer.modality == "unknown" and layer.id > 0 for layer in profile.layers.values())


@pytest.mark.filterwarnings("ignore:unknown model family")
def test_top_level_estimate_ids_profiles_every_layer_of_a_cnn() -> None:
    model, batches, expected = _generic_models()["cnn"]
    profile = vlprune.estimate_ids(model, batches, n_samples=80, progress=False)
    assert list(profile.layers) == expected
    assert all(layer.modality == "unknown" for layer in profile.layers.values())


def test_a_model_without_prunable_layers_names_modules() -> None:
    with pytest.raises(vlprune.ModelStructureError, match=r"modules="):
        prunable_modules(nn.Sequential(nn.ReLU(), nn.Identity()))


def test_known_families_keep_their_head_exclusion() -> None:
    model = tiny_model("clip")
    names = default_id_modules(model)
    assert "visual_projection" not in names and "text_projection" not in names
    assert "vision_model.encoder.layers.0.mlp.fc1" in names and "vision_model.encoder.layers.0.self_attn.q_proj" in names


# ------------------------------------------------------------------ 8: coverage of what tp prunes
_V = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_T = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
          max_position_embeddings=64)


def _siglip(kind: str) -> tuple[nn.Module, object]:
    import transformers as T

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    if kind == "siglip":
        model = T.SiglipModel(T.SiglipConfig(text_config=dict(_T, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                                             vision_config=_V)).eval()
    else:
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**_V)).eval()

    def make(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}
        if kind == "siglip":
            out["input_ids"] = torch.randint(3, 99, (n, 12), generator=g)
        return out

    return model, make


def _family(name: str) -> tuple[nn.Module, object]:
    if name.startswith("siglip"):
        return _siglip(name)
    return tiny_model(name), (lambda n, seed=0, f=name: example_inputs(f, batch_size=n, seed=seed))


def _loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    for key in ("logits", "logits_per_image", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value.float().pow(2).mean()
    raise AssertionError("no output")


FAMILIES = [*TINY_FAMILIES, "siglip", "siglip_vision"]


@pytest.mark.parametrize("name", FAMILIES)
def test_default_profile_covers_every_group_tp_may_prune(name: str) -> None:
    model, make = _family(name)
    calib = [make(8, seed=s) for s in range(3)]
    profile = vlprune.estimate_ids(model, calib, n_samples=24, progress=False)
    kw = hf_pruner_kwargs(model)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=make(2), forward_fn=lambda m, x: m(**x),
                                               output_transform=_output_transform)
    roots = [dg._module2name[g[0].dep.target.module]
             for g in dg.get_all_groups(ignored_layers=kw["ignored_layers"], root_module_types=kw["root_module_types"])]
    assert roots and not [r for r in roots if r not in profile], name
    info = describe(model)
    assert {m.up for m in info.mlps} <= set(profile)
    model.zero_grad()
    for batch in calib:
        _loss(model, batch).backward()
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)
    before = sum(p.numel() for p in model.parameters())
    prune_hf_model(model, make(2), imp, 0.4)
    assert sum(p.numel() for p in model.parameters()) < before
    model(**make(3, seed=9))


@pytest.mark.parametrize("kind", ["siglip", "siglip_vision"])
def test_plain_tp_script_on_siglip_finds_an_id_for_the_pooling_head_mlp(kind: str) -> None:
    """A Torch-Pruning script without hf_pruner_kwargs may prune the attention-pooling head's MLP
    (head.mlp.fc1/fc2); the default profile covers it, so IDWeightedImportance does not stop."""
    model, make = _siglip(kind)
    profile = vlprune.estimate_ids(model, [make(8, seed=s) for s in range(3)], n_samples=24, progress=False)
    prefix = "vision_model." if kind == "siglip" else ""
    assert {f"{prefix}head.mlp.fc1", f"{prefix}head.mlp.fc2"} <= set(profile)
    fc1 = model.get_submodule(f"{prefix}head.mlp.fc1")
    imp = IDWeightedImportance(tp.importance.MagnitudeImportance(), profile)
    pruner = tp.pruner.BasePruner(model, make(2), importance=imp, pruning_ratio=0.4, global_pruning=True,
                                  output_transform=_output_transform)
    head_groups = [g for g in pruner.DG.get_all_groups(root_module_types=[nn.Linear]) if g[0].dep.target.module is fc1]
    if kind == "siglip":  # (SiglipVisionModel's traced output, last_hidden_state, does not reach its head)
        assert head_groups and imp(head_groups[0]) is not None
    before = sum(p.numel() for p in model.parameters())
    pruner.step()
    assert sum(p.numel() for p in model.parameters()) < before
