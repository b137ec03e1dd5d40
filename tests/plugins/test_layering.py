"""DESIGN's one-way rule: plugins import nothing from adapters or recipes (checked statically,
imports inside functions included), so a criterion stays framework- and family-agnostic."""

from __future__ import annotations

import ast
from pathlib import Path

import vlprune.plugins

FORBIDDEN = ("vlprune.adapters", "vlprune.recipes")
PLUGINS = Path(vlprune.plugins.__file__).parent


def _imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """Every module an ``import`` / ``from ... import`` statement (anywhere, nested in functions or
    branches too) or a literal ``importlib.import_module("...")`` / ``__import__("...")`` names."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def _violations(source: str, package: str = "vlprune.plugins") -> list[str]:
    return [
        f"{line}: {module}"
        for line, module in sorted(_imported_modules(source, package))
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN)
    ]


def test_the_checker_sees_imports_inside_functions_relative_and_dynamic_ones() -> None:
    source = (
        "import torch\n"
        "def f():\n"
        "    if True:\n"
        "        from vlprune.adapters.hf.families import describe\n"
        "class C:\n"
        "    def g(self):\n"
        "        import vlprune.recipes.distill\n"
        "from ..adapters import torch_pruning\n"
        "from .. import recipes\n"
        "import importlib\n"
        "importlib.import_module('vlprune.adapters.hf.layers')\n"
        "from vlprune.plugins.structure import join\n"
        "from vlprune.adaptersx import y\n"
    )
    assert _violations(source) == [
        "4: vlprune.adapters.hf.families", "4: vlprune.adapters.hf.families.describe",
        "7: vlprune.recipes.distill", "8: vlprune.adapters", "8: vlprune.adapters.torch_pruning",
        "9: vlprune.recipes", "11: vlprune.adapters.hf.layers",
    ]


def test_no_plugin_module_imports_adapters_or_recipes() -> None:
    files = sorted(PLUGINS.rglob("*.py"))
    assert len(files) >= 10 and PLUGINS / "layer_similarity.py" in files
    bad = {
        str(f.relative_to(PLUGINS)): v
        for f in files
        if (v := _violations(f.read_text(encoding="utf-8")))
    }
    assert bad == {}, f"plugins must not import vlprune.adapters / vlprune.recipes (DESIGN, one direction): {bad}"
