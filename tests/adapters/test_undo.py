"""A failed model edit leaves the model exactly as it was: prune_hf_model, shrink and remove_layers
all undo through vlprune.adapters.hf.undo (module objects, parameter objects and values, configs
with their sub-config identity)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

import vlprune.adapters.hf.layers as layers_mod
import vlprune.adapters.hf.prune as hf_prune
import vlprune.adapters.hf.sync as sync_mod
from vlprune.adapters.hf.layers import remove_layers
from vlprune.adapters.hf.prune import prune_hf_model
from vlprune.adapters.hf.undo import ModelUndo, restore_on_failure
from vlprune.adapters.nni.speedup import head_masks, shrink
from vlprune.errors import VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model


class Injected(RuntimeError):
    pass


def _identities(model: nn.Module) -> list[bool]:
    """The config objects LLaVA's modules share with the top config's sub-configs."""
    return [
        model.config.text_config is model.model.language_model.config,
        model.config.vision_config is model.model.vision_tower.config,
        model.config is model.model.config,
    ]


def _record(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {n: p for n, p in model.named_parameters()},
        "modules": [(n, m) for n, m in model.named_modules()],
        "attrs": {n: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
                  for n, m in model.named_modules()},
        "config": copy.deepcopy(model.config.to_dict()),
        "text_config": copy.deepcopy(model.model.language_model.config.to_dict()),
        "config_objects": (model.config, model.config.text_config, model.config.vision_config),
        "identities": _identities(model),
    }


def _assert_as_before(model: nn.Module, before: dict[str, Any]) -> None:
    after = model.state_dict()
    assert after.keys() == before["state"].keys()
    assert all(torch.equal(after[k], v) for k, v in before["state"].items())
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    assert all(params[n] is p for n, p in before["params"].items())
    modules = list(model.named_modules())
    assert [n for n, _ in modules] == [n for n, _ in before["modules"]]
    assert all(m is m0 for (_, m), (_, m0) in zip(modules, before["modules"]))
    assert {n: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
            for n, m in model.named_modules()} == before["attrs"]
    assert (model.config, model.config.text_config, model.config.vision_config) == before["config_objects"]
    assert all(x is y for x, y in zip((model.config, model.config.text_config, model.config.vision_config),
                                      before["config_objects"]))
    assert _identities(model) == before["identities"] == [True, True, True]
    assert model.config.to_dict() == before["config"]
    assert model.model.language_model.config.to_dict() == before["text_config"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_a_failed_prune_hf_model_restores_parameters_and_config_identity(monkeypatch) -> None:
    model = tiny_model("llava")
    before = _record(model)
    seen: dict[str, int] = {}

    def failing_sync(m: nn.Module, **kwargs: Any) -> None:
        seen["params"] = _params(m)  # the prune did happen before the failure
        m.config.text_config.intermediate_size = 1  # and a config change, on the shared sub-config
        raise Injected("sync failed")

    monkeypatch.setattr(hf_prune, "sync_hf_model", failing_sync)
    with pytest.raises(Injected):
        prune_hf_model(model, example_inputs("llava"), tp.importance.GroupMagnitudeImportance(), 0.5)
    assert seen["params"] < sum(v.numel() for v in before["params"].values())
    _assert_as_before(model, before)
    monkeypatch.undo()
    prune_hf_model(model, example_inputs("llava"), tp.importance.GroupMagnitudeImportance(), 0.5)  # still prunable
    assert _params(model) == seen["params"]
    assert model.config.text_config is model.model.language_model.config
    widths = {layer.mlp.up_proj.out_features for layer in model.model.language_model.layers}
    built = before["text_config"]["intermediate_size"]
    assert model.config.text_config.intermediate_size == (widths.pop() if len(widths) == 1 else built)
    with torch.no_grad():
        assert torch.isfinite(model(**example_inputs("llava")).logits).all()


def test_a_failed_shrink_restores_parameters_and_config_identity(monkeypatch) -> None:
    model = tiny_model("llava")
    masks = head_masks(model, {"model.language_model.layers.0.self_attn": [2, 3]})
    up = model.model.language_model.layers[1].mlp.up_proj
    keep = torch.ones(up.out_features, dtype=torch.bool)
    keep[: up.out_features // 2] = False
    masks["model.language_model.layers.1.mlp.up_proj"] = {"weight": keep[:, None].expand_as(up.weight).float()}
    before = _record(model)
    seen: dict[str, int] = {}
    real_sync = sync_mod.sync_hf_model

    def failing_sync(m: nn.Module, **kwargs: Any) -> Any:
        real_sync(m, **kwargs)  # heads and configs are synced, then it fails
        seen["params"] = _params(m)
        seen["heads"] = m.config.text_config.num_attention_heads
        raise Injected("sync failed")

    monkeypatch.setattr(sync_mod, "sync_hf_model", failing_sync)
    with pytest.raises(VLPruneError, match="Injected: sync failed"):
        shrink(model, masks, example_inputs("llava"), progress=False)
    assert seen["params"] < sum(v.numel() for v in before["params"].values())
    _assert_as_before(model, before)
    monkeypatch.undo()
    report = shrink(model, masks, example_inputs("llava"), progress=False)
    assert report.verified and report.params_after == seen["params"]


def test_a_failed_remove_layers_restores_modules_and_config_identity(monkeypatch) -> None:
    model = tiny_model("llava")
    before = _record(model)
    real_setattr, target = setattr, model.config.text_config
    seen: dict[str, int] = {}

    def failing_setattr(obj: Any, name: str, value: Any) -> None:
        if obj is target and name == "num_hidden_layers":
            seen["layers"] = len(model.model.language_model.layers)  # the list was already refilled
            raise Injected("config refused")
        real_setattr(obj, name, value)

    monkeypatch.setattr(layers_mod, "setattr", failing_setattr, raising=False)
    with pytest.raises(VLPruneError, match="config refused.*restored"):
        remove_layers(model, [0])
    assert seen["layers"] == 1
    _assert_as_before(model, before)
    assert [layer.self_attn.layer_idx for layer in model.model.language_model.layers] == [0, 1]


def test_module_undo_restores_containers_in_place_hooks_grads_and_nested_config_fields() -> None:
    model = tiny_model("llava")
    cfg = model.config.text_config
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "extra": [1, 2]}
    rope, extra = cfg.rope_parameters, cfg.rope_parameters["extra"]
    cfg.layer_specs = [{"window": 4}]
    spec = cfg.layer_specs[0]
    lin = model.model.language_model.layers[0].mlp.up_proj
    lin.weight.grad = torch.ones_like(lin.weight)
    grad, weight, data = lin.weight.grad, lin.weight, lin.weight.data
    hooks, modules_dict = lin._forward_hooks, model.model.language_model.layers._modules
    values = lin.weight.detach().clone()

    undo = ModelUndo(model)
    undo.keep_values([lin.weight])
    handle = lin.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        lin.weight.mul_(0)  # in place: covered by keep_values
    lin.weight.data = torch.zeros(3, 3)
    lin.weight.grad = None
    lin.weight.requires_grad_(False)
    lin.new_attr = 1
    extra.append(3)
    rope["rope_theta"] = 1.0
    spec["window"] = 8
    cfg.num_hidden_layers = 7
    cfg.new_field = "x"
    del model.model.language_model.layers[1]
    undo.restore()

    assert lin.weight is weight and lin.weight.data.data_ptr() == data.data_ptr()
    assert torch.equal(lin.weight, values) and lin.weight.grad is grad and lin.weight.requires_grad
    assert lin._forward_hooks is hooks and handle.id not in hooks and not hasattr(lin, "new_attr")
    assert model.model.language_model.layers._modules is modules_dict and len(model.model.language_model.layers) == 2
    assert cfg.rope_parameters is rope and rope["extra"] is extra and extra == [1, 2] and rope["rope_theta"] == 10000.0
    assert cfg.layer_specs[0] is spec and spec == {"window": 4}
    assert cfg.num_hidden_layers == 2 and not hasattr(cfg, "new_field")
    assert model.config.text_config is cfg is model.model.language_model.config


def test_restore_on_failure_restores_on_any_exception_and_keeps_success() -> None:
    model = tiny_model("clip")
    weight = model.visual_projection.weight
    with pytest.raises(KeyboardInterrupt):
        with restore_on_failure(model):
            model.visual_projection.weight = nn.Parameter(weight[:4].detach())
            raise KeyboardInterrupt
    assert model.visual_projection.weight is weight
    with restore_on_failure(model):
        model.config.projection_dim = 3
    assert model.config.projection_dim == 3  # no failure: the edit stays


def test_the_snapshot_copies_no_tensor() -> None:
    """Cheap: the undo keeps references (the parameters' storages), not copies."""
    model = tiny_model("llava")
    undo = ModelUndo(model)
    ptrs = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    kept = [t for entry in undo._tensors for t in entry[1:2]]
    assert kept and {t.data_ptr() for t in kept} <= ptrs
    assert all(isinstance(m, nn.Module) for m in (s.obj for s in undo._modules))

