"""Recipe files and overrides: validation before any work, messages naming the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlprune.errors import RegistryError, VLPruneError
from vlprune.plugins.hookspecs import StepSpec, hookimpl
from vlprune.plugins.registry import check_pairing, register, unregister
from vlprune.recipes.schema import (
    StepParams,
    builtin_recipes,
    kwargs_overrides,
    parse_set,
    resolve_recipe,
)
from vlprune.recipes.steps import get_step, resolve_step, steps
from vlprune.recipes.steps_core import DistillParams

CORE_STEPS = {"calibrate", "prune_id_taylor", "distill", "evaluate", "save"}


def _yaml_stages(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["stages"]


def test_builtin_id_taylor_resolves_with_every_default_filled():
    r = resolve_recipe("id-taylor")
    d = r.to_dict()
    assert [s["step"] for s in d["stages"]] == ["calibrate", "prune_id_taylor", "distill", "evaluate", "save"]
    # what the YAML sets wins, every other key is the step model's default
    written = {s["step"]: s.get("params", {}) for s in _yaml_stages(builtin_recipes()["id-taylor"])}
    distill = d["stages"][2]["params"]
    for key, field in DistillParams.model_fields.items():
        assert distill[key] == written["distill"].get(key, field.default)
    assert d["framework"] == "torch_pruning"


def test_overrides_python_forms_and_shell_form_agree():
    a = resolve_recipe("id-taylor", parse_set(["distill.steps=7", "framework=torch_pruning", "2.ratio=0.5", "seed=3"]))
    b = resolve_recipe("id-taylor", kwargs_overrides({"distill": {"steps": 7}, "prune_id_taylor__ratio": 0.5, "seed": 3}))
    assert a.to_dict() == b.to_dict()
    assert a.stage("distill").params.steps == 7 and a.stage("prune_id_taylor").params.ratio == 0.5
    assert a.spec.seed == 3


def test_parse_set_reads_yaml_values():
    assert parse_set(["a.b=3", "a.c=0.5", "a.d=[x, y]", "a.e=true", "a.f=text"]) == {
        "a.b": 3, "a.c": 0.5, "a.d": ["x", "y"], "a.e": True, "a.f": "text"
    }
    with pytest.raises(VLPruneError, match="key.sub=value"):
        parse_set(["distill.steps"])


def test_unknown_recipe_lists_the_builtins():
    with pytest.raises(VLPruneError) as err:
        resolve_recipe("id-tailor")
    assert "id-tailor" in str(err.value)
    for name in builtin_recipes():
        assert name in str(err.value)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages:\n  - step: calibrate\n    params: {n_samples: 8\n  - step: save\n")
    with pytest.raises(VLPruneError, match=r"YAML syntax error at line (5|4)"):
        resolve_recipe(str(path))
    with pytest.raises(VLPruneError, match="does not exist"):
        resolve_recipe(str(tmp_path / "missing.yaml"))


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(VLPruneError) as err:
        resolve_recipe("id-taylor", {"distill.stepz": 3})
    msg = str(err.value)
    assert "'distill.stepz'" in msg
    for key in DistillParams.model_fields:
        assert key in msg
    with pytest.raises(VLPruneError, match="'colour'"):
        resolve_recipe("id-taylor", {"colour": "red"})
    with pytest.raises(VLPruneError, match="no stage runs step 'distil'.*calibrate, prune_id_taylor, distill"):
        resolve_recipe("id-taylor", {"distil.steps": 3})


def test_wrong_type_or_value_names_the_key():
    with pytest.raises(VLPruneError, match=r"distill\.steps: .*integer.*'abc'"):
        resolve_recipe("id-taylor", {"distill.steps": "abc"})
    with pytest.raises(VLPruneError, match=r"prune_id_taylor\.ratio: .*less than 1"):
        resolve_recipe("id-taylor", {"prune_id_taylor.ratio": 1.5})
    with pytest.raises(VLPruneError, match=r"framework: .*'torch_pruning' or 'nni'"):
        resolve_recipe("id-taylor", {"framework": "tensorflow"})


def test_a_criterion_the_framework_does_not_support_gives_the_registrys_pairing_error():
    with pytest.raises(RegistryError) as expected:
        check_pairing("random", "nni")
    with pytest.raises(RegistryError) as err:
        resolve_recipe("id-taylor", {"framework": "nni", "prune_id_taylor.base": "random"})
    assert str(expected.value) in str(err.value)
    assert "prune_id_taylor.base" in str(err.value)
    with pytest.raises(RegistryError, match="unknown criterion 'tailor'"):
        resolve_recipe("id-taylor", {"prune_id_taylor.base": "tailor"})


def test_core_steps_are_registered_and_unknown_steps_are_listed():
    assert CORE_STEPS <= set(steps())
    with pytest.raises(RegistryError, match="unknown recipe step 'prune_magic'.*distill"):
        resolve_recipe({"name": "x", "stages": [{"step": "prune_magic"}]})
    with pytest.raises(VLPruneError, match="stages"):
        resolve_recipe({"name": "x", "stages": []})


def test_a_repeated_step_is_addressed_by_stage_number():
    recipe = {"name": "twice", "stages": [{"step": "distill"}, {"step": "distill", "params": {"steps": 5}}]}
    with pytest.raises(VLPruneError, match="stages 1, 2; address one by number, e.g. 1.steps"):
        resolve_recipe(recipe, {"distill.steps": 3})
    r = resolve_recipe(recipe, {"1.steps": 3})
    assert [s.params.steps for s in r.stages] == [3, 5]
    assert [s.key for s in r.stages] == ["01-distill", "02-distill"]


class _Scale(StepParams):
    factor: float = 1.0


class _Plugin:
    """A third party's steps: a step, and an nni variant of another."""

    @hookimpl
    def vlprune_register_steps(self):
        return [
            StepSpec("scale_test", lambda ctx, p: {"factor": p.factor}, _Scale, frameworks=("torch_pruning",)),
            StepSpec("scale_test_nni", lambda ctx, p: {"factor": -p.factor}, _Scale, frameworks=("nni",)),
        ]


def test_third_party_steps_and_framework_variants():
    plugin = _Plugin()
    register(plugin, name="test-steps")
    try:
        assert get_step("scale_test").params is _Scale
        assert resolve_step("scale_test", "nni").name == "scale_test_nni"
        r = resolve_recipe({"name": "t", "framework": "nni", "stages": [{"step": "scale_test", "params": {"factor": 2}}]})
        assert r.stages[0].spec.name == "scale_test_nni" and r.to_dict()["stages"][0]["runs"] == "scale_test_nni"
        with pytest.raises(VLPruneError, match="'scale_test.bogus'.*factor=1.0"):
            resolve_recipe({"name": "t", "stages": [{"step": "scale_test", "params": {"bogus": 1}}]})
    finally:
        unregister("test-steps")
    assert "scale_test" not in steps()
    with pytest.raises(RegistryError, match="does not support framework 'nni'"):
        _only_tp()


def _only_tp():
    class P:
        @hookimpl
        def vlprune_register_steps(self):
            return [StepSpec("tp_only_test", lambda c, p: {}, _Scale, frameworks=("torch_pruning",))]

    register(P(), name="tp-only")
    try:
        resolve_step("tp_only_test", "nni")
    finally:
        unregister("tp-only")


def test_empty_params_and_overrides_into_them():
    r = resolve_recipe({"name": "e", "stages": [{"step": "distill", "params": None}]}, {"distill.steps": 4})
    assert r.stage("distill").params.steps == 4
    with pytest.raises(VLPruneError, match="params is not a mapping"):
        resolve_recipe({"name": "e", "stages": [{"step": "distill", "params": [1]}]}, {"distill.steps": 4})


def test_report_settings_are_recipe_keys():
    r = resolve_recipe("id-taylor", {"report.latency_repeats": 3})
    assert r.spec.report.latency_repeats == 3 and r.to_dict()["report"] == {"latency_repeats": 3, "latency_warmup": 2}
    with pytest.raises(VLPruneError, match="unknown key 'report.repeats'"):
        resolve_recipe("id-taylor", {"report.repeats": 3})
