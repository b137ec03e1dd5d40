"""The built-in method recipes (id-platon, amp, layer-drop, divprune; id-taylor switched to NNI) end to
end on the testbed LLaVA with tiny overrides, the framework switch, and the pairing errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("nni")

import vlprune  # noqa: E402
from vlprune.errors import RegistryError, VLPruneError  # noqa: E402
from vlprune.recipes.context import RecipeContext
from vlprune.recipes.context import TestbedData as _Testbed  # noqa: E402  (not a test class)
from vlprune.recipes.runner import run_recipe  # noqa: E402
from vlprune.testbed import evaluate, load  # noqa: E402

EVAL = {"evaluate.n": 10, "evaluate.tasks": ["vqa"]}
DISTILL = {"distill.steps": 1, "distill.n_samples": 4}
TINY: dict[str, dict[str, Any]] = {
    "id-platon": {"calibrate.n_samples": 16, "prune_id_platon.steps": 6, "prune_id_platon.batch_size": 4,
                  "prune_id_platon.warmup_steps": 1, "prune_id_platon.delta_t": 1,
                  "prune_id_platon.iterative_steps": 2, **DISTILL, **EVAL},
    "amp": {"prune_amp.n_samples": 16, "prune_amp.held_out_samples": 16, "prune_amp.batch_size": 8,
            "prune_amp.halvings": 2, **DISTILL, "distill.batch_size": 4, **EVAL},
    "layer-drop": {"drop_layers.n_samples": 8, **DISTILL, **EVAL},
    "divprune": {"prune_tokens.n": 10, "prune_tokens.tasks": ["vqa"], "prune_tokens.repeats": 1,
                 "prune_tokens.max_new_tokens": 2},
    "id-taylor": {"calibrate.n_samples": 16, "prune_id_taylor.grad_samples": 8, **DISTILL, **EVAL},
}


@pytest.fixture(autouse=True)
def _one_latency_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's side-by-side latency with one round (the tests check values, not timings)."""
    from vlprune.recipes import report

    original = report.side_by_side_latency
    monkeypatch.setattr(report, "side_by_side_latency",
                        lambda a, b, inputs, repeats=10, warmup=2: original(a, b, inputs, repeats=1, warmup=0))


@pytest.fixture(scope="module")
def llava() -> torch.nn.Module:
    return load("llava")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ctx(model: torch.nn.Module, framework: str, tmp: Path, name: str = "llava") -> RecipeContext:
    return RecipeContext(model=model, data=_Testbed(testbed=name, model=model), out=tmp, framework=framework,
                         progress=False, testbed=name, stage_dir=tmp / "stage", stage_key="01-x")


def test_id_platon_prunes_while_training_and_saves(tmp_path: Path, llava: torch.nn.Module) -> None:
    state = _state(llava)
    r = run_recipe("id-platon", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["id-platon"])
    stage = r.stages["02-prune_id_platon"]
    assert stage["criterion"] == "id_platon" and stage["framework"] == "torch_pruning"
    assert stage["params_after"] < stage["params_before"] == _n_params(llava)
    assert sum(stage["widths"].values()) < sum(stage["widths_before"].values())
    assert any(stage["heads"][a] < n for a, n in stage["heads_before"].items())  # heads went too
    assert min(stage["heads"].values()) >= 1 and min(stage["widths"].values()) >= 1  # nothing emptied
    assert len(stage["pruned_at_steps"]) == 2  # the two iterative steps of the cubic schedule
    assert _n_params(r.model) == stage["params_after"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["size"]["params_after"] == stage["params_after"] < report["size"]["params_before"]
    assert set(report["metrics"]["before"]) == set(report["metrics"]["after"]) == {"vqa/math", "vqa/general"}
    assert (tmp_path / "run" / "report.md").is_file()
    reloaded = vlprune.load_pruned(r.paths["model_dir"])
    assert _n_params(reloaded) == stage["params_after"]
    assert _same(llava, state)  # the user's model is the teacher, untouched


def test_amp_same_neurons_with_either_framework(tmp_path: Path, llava: torch.nn.Module) -> None:
    from vlprune.recipes.steps_methods import AMPParams, prune_amp

    params = AMPParams(n_samples=16, held_out_samples=16, batch_size=8, halvings=2)
    tp_model, nni_model = copy.deepcopy(llava), copy.deepcopy(llava)
    tp_res = prune_amp(_ctx(tp_model, "torch_pruning", tmp_path / "tp"), params)
    nni_res = prune_amp(_ctx(nni_model, "nni", tmp_path / "nni"), params)
    assert tp_res["widths_searched"] == nni_res["widths_searched"]
    assert tp_res["widths"] == nni_res["widths"] and nni_res["shrink_verified"]
    searched = tp_res["widths_searched"]
    assert searched and all("vision_tower" in n for n in searched)  # the MLPs reaching the image objective
    assert sum(searched.values()) < sum(tp_res["widths_before"][n] for n in searched)
    for n, w in tp_res["widths"].items():  # language MLPs keep their width
        assert w == (searched[n] if n in searched else tp_res["widths_before"][n])
    batch = vlprune.testbed.example_inputs("llava")
    with torch.no_grad():
        torch.testing.assert_close(tp_model(**batch).logits, nni_model(**batch).logits, atol=1e-4, rtol=1e-4)


def test_amp_recipe_with_nni(tmp_path: Path, llava: torch.nn.Module) -> None:
    r = run_recipe("amp", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["amp"], framework="nni")
    assert r.recipe["framework"] == "nni"
    stage = r.stages["01-prune_amp"]
    assert stage["framework"] == "nni" and stage["shrink_verified"]
    assert r.report["size"]["params_after"] == stage["params_after"] < stage["params_before"]
    assert "vqa/math" in r.metrics["after"]


def test_layer_drop_removes_layers_and_frameworks_agree(tmp_path: Path, llava: torch.nn.Module) -> None:
    r = run_recipe("layer-drop", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["layer-drop"])
    stage = r.stages["01-drop_layers"]
    assert stage["layers_before"] == 4 and stage["layers_after"] == 3  # 0.25 of 4 decoder layers
    assert len(stage["removed"]) == 1 and stage["removed"][0] not in (0, 3)  # first / last protected
    assert set(stage["scores"]) == {"math", "general"}
    reloaded = vlprune.load_pruned(r.paths["model_dir"])
    assert reloaded.config.text_config.num_hidden_layers == 3
    assert "vqa/general" in r.metrics["after"]
    # the nni variant (LayerSimilarityPruner + shrink) removes the same layer from the same scores
    from vlprune.recipes.steps_methods import LayerDropNNIParams, drop_layers

    nni_model = copy.deepcopy(llava)
    res = drop_layers(_ctx(nni_model, "nni", tmp_path / "nni"), LayerDropNNIParams(n_samples=8))
    assert res["removed"] == stage["removed"] and res["shrink_verified"]
    assert res["params_after"] == stage["params_after"]


def test_divprune_evaluates_with_fewer_tokens(tmp_path: Path, llava: torch.nn.Module) -> None:
    state = _state(llava)
    r = run_recipe("divprune", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["divprune"])
    stage = r.stages["01-prune_tokens"]
    tokens = stage["tokens"]
    assert tokens["kept_tokens"] < tokens["n_tokens"] and tokens["flops_ratio"] < 1
    # "before" is the model without token pruning: the testbed's own evaluation of it
    assert r.metrics["before"] == {f"vqa/{k}": v for k, v in evaluate(llava, "vqa", n=10).items()}
    assert set(r.metrics["after"]) == set(r.metrics["before"])
    assert r.report["size"]["params_ratio"] == 1.0  # weights untouched
    config = json.loads((tmp_path / "run" / stage["token_config"]).read_text())
    assert config["method"] == "divprune" and config["keep"] == 0.5
    with vlprune.prune_visual_tokens(llava, **config):  # the saved config re-applies
        assert {f"vqa/{k}": v for k, v in evaluate(llava, "vqa", n=10).items()} == r.metrics["after"]
    assert _same(llava, state)


def test_id_taylor_switches_to_nni(tmp_path: Path, llava: torch.nn.Module) -> None:
    r = run_recipe("id-taylor", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["id-taylor"],
                   framework="nni")
    runs = {s["key"]: s["runs"] for s in r.report["stages"]}
    assert runs["02-prune_id_taylor"] == "prune_id_taylor_nni"
    stage = r.stages["02-prune_id_taylor"]
    assert stage["shrink_verified"] and stage["params_after"] < stage["params_before"]
    assert _n_params(r.model) == stage["params_after"]


@pytest.mark.parametrize(
    ("recipe", "overrides", "match"),
    [
        ("layer-drop", {"framework": "nni", "drop_layers.criterion": "block_influence"},
         "criterion 'block_influence' is not supported by adapter 'nni'"),
        ("id-taylor", {"framework": "nni", "prune_id_taylor.base": "random"},
         "criterion 'random' is not supported by adapter 'nni'"),
        ("divprune", {"prune_tokens.method": "taylor"}, "criterion 'taylor' is not supported by adapter 'hf_tokens'"),
    ],
)
def test_unsupported_criterion_fails_before_work(tmp_path: Path, recipe: str, overrides: dict[str, Any],
                                                 match: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(RegistryError, match=match):
        run_recipe(recipe, model="testbed:llava", out=out, progress=False, overrides=overrides)
    assert not out.exists()


def test_bad_method_params_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(VLPruneError, match=r"prune_id_platon.sparsity"):
        run_recipe("id-platon", model="testbed:llava", out=tmp_path / "a", progress=False,
                   overrides={"prune_id_platon.sparsity": 1.5})
    with pytest.raises(VLPruneError, match=r"unknown key 'prune_amp.delta'"):
        run_recipe("amp", model="testbed:llava", out=tmp_path / "b", progress=False, overrides={"prune_amp.delta": 0.1})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_id_platon_resumes_after_a_crash_mid_training(tmp_path: Path, llava: torch.nn.Module,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies inside the PLATON training loop resumes (the stage starts over from the model
    the earlier stages left) and ends with the weights of an uninterrupted run."""
    from vlprune.adapters.torch_pruning import PlatonImportance

    whole = run_recipe("id-platon", model=llava, out=tmp_path / "whole", progress=False, overrides=TINY["id-platon"])
    original = PlatonImportance.update
    calls = {"n": 0}

    def dying_update(self: PlatonImportance, model: torch.nn.Module) -> bool:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed mid-training")
        return original(self, model)

    monkeypatch.setattr(PlatonImportance, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        run_recipe("id-platon", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["id-platon"])
    assert (tmp_path / "run" / "stages" / "01-calibrate" / "result.json").is_file()
    assert not (tmp_path / "run" / "stages" / "02-prune_id_platon" / "result.json").exists()
    resumed = run_recipe("id-platon", model=llava, out=tmp_path / "run", progress=False, overrides=TINY["id-platon"],
                         resume=True)
    assert calls["n"] > 4  # the stage ran again
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
