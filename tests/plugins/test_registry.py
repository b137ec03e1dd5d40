"""The pluggy registry: built-ins, outside plugins (object and entry point), clear errors."""

from __future__ import annotations

import textwrap

import pytest
import torch_pruning as tp

import vlprune
from vlprune import CriterionSpec, RegistryError, hookimpl
from vlprune.plugins import registry


def test_builtin_criteria_are_listed_with_level_needs_adapters() -> None:
    specs = {s.name: s for s in vlprune.criteria()}
    assert {"id_weighted", "magnitude", "taylor", "random"} <= set(specs)
    assert specs["taylor"].needs == "gradients"
    assert specs["id_weighted"].needs == "calibration"
    assert "torch_pruning" in specs["id_weighted"].adapters


def test_get_criterion_builds_torch_pruning_objects() -> None:
    assert isinstance(vlprune.get_criterion("taylor", adapter="torch_pruning"), tp.importance.GroupTaylorImportance)
    imp = vlprune.get_criterion("magnitude", p=1)
    assert isinstance(imp, tp.importance.GroupMagnitudeImportance) and imp.p == 1
    from vlprune.adapters.torch_pruning import IDWeightedImportance

    idw = vlprune.get_criterion("id_weighted", adapter="torch_pruning", base=imp, profile={"a": 2.0})
    assert isinstance(idw, IDWeightedImportance)


def test_unknown_name_and_unsupported_pair_name_the_choices() -> None:
    with pytest.raises(RegistryError, match="registered criteria: .*id_weighted.*taylor"):
        vlprune.get_criterion("no_such_criterion")
    with pytest.raises(RegistryError, match="not supported by adapter 'nni'.*supports: torch_pruning"):
        vlprune.get_criterion("random", adapter="nni")
    with pytest.raises(RegistryError, match="not supported by adapter 'hf_tokens'.*supports: torch_pruning, nni"):
        vlprune.get_criterion("taylor", adapter="hf_tokens")
    with pytest.raises(vlprune.VLPruneError):
        vlprune.check_pairing("random", "nni")


class _OutsidePlugin:
    """A third-party plugin object with its own criterion."""

    @hookimpl
    def vlprune_register_criteria(self) -> list[CriterionSpec]:
        return [
            CriterionSpec(
                name="outside_l1",
                level="channel",
                needs="none",
                adapters={"torch_pruning": lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw)},
                description="an outside criterion",
            )
        ]


def test_outside_plugin_object_registers_and_is_usable() -> None:
    name = vlprune.register(_OutsidePlugin(), name="outside-test")
    try:
        assert "outside_l1" in {s.name for s in vlprune.criteria()}
        imp = vlprune.get_criterion("outside_l1", adapter="torch_pruning")
        assert isinstance(imp, tp.importance.GroupMagnitudeImportance) and imp.p == 1
    finally:
        vlprune.unregister(name)
    assert "outside_l1" not in {s.name for s in vlprune.criteria()}


def test_installed_entry_point_plugin_is_loaded(tmp_path, monkeypatch) -> None:
    (tmp_path / "vlp_outside_pkg.py").write_text(
        textwrap.dedent(
            '''
            from vlprune.plugins.hookspecs import CriterionSpec, hookimpl

            @hookimpl
            def vlprune_register_criteria():
                return [CriterionSpec(name="entry_point_criterion", level="layer", needs="calibration",
                                      adapters={"torch_pruning": "torch_pruning.pruner.importance:RandomImportance"})]
            '''
        )
    )
    dist = tmp_path / "vlp_outside_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vlp-outside-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vlprune]\noutside = vlp_outside_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reset()
    try:
        specs = {s.name: s for s in vlprune.criteria()}
        assert specs["entry_point_criterion"].level == "layer"
        assert isinstance(vlprune.get_criterion("entry_point_criterion"), tp.importance.RandomImportance)
    finally:
        monkeypatch.undo()
        registry.reset()
    assert "entry_point_criterion" not in {s.name for s in vlprune.criteria()}


def test_bad_plugin_is_rejected_when_registered() -> None:
    class Bad:
        @hookimpl
        def vlprune_register_criteria(self):
            return [CriterionSpec(name="bad", level="galaxy", needs="none")]  # type: ignore[arg-type]

    with pytest.raises(RegistryError, match="level"):
        vlprune.register(Bad(), name="bad-plugin")
    vlprune.unregister("bad-plugin")

    class Duplicate:
        @hookimpl
        def vlprune_register_criteria(self):
            return [CriterionSpec(name="taylor", level="channel", needs="none")]

    with pytest.raises(RegistryError, match="two plugins"):
        vlprune.register(Duplicate(), name="dup-plugin")
    vlprune.unregister("dup-plugin")
    assert vlprune.get_criterion("taylor") is not None


def test_lazy_reference_that_does_not_import_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="cannot import"):
        registry.resolve_object("vlprune.no_such_module:Thing")


def test_missing_nni_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "needs_nni_adapter.py").write_text("import nni\nclass Pruner: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "nni", None)  # what `import nni` meets without the extra
    with pytest.raises(RegistryError, match=r'pip install "vlprune\[nni\]"'):
        registry.resolve_object("needs_nni_adapter:Pruner")
