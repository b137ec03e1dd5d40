"""The criterion registry: a pluggy ``PluginManager`` holding built-in and installed plugins.

Built-in plugin modules register through the same ``vlprune_register_criteria`` hook as third-party
ones; installed packages are picked up from the ``vlprune`` entry-point group on first use.

Example:
    >>> import vlprune
    >>> [c.name for c in vlprune.criteria()]            # doctest: +SKIP
    ['id_weighted', 'magnitude', 'random', 'taylor']
    >>> imp = vlprune.get_criterion("taylor", adapter="torch_pruning")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import pluggy

from vlprune.errors import RegistryError
from vlprune.plugins.hookspecs import LEVELS, NEEDS, PROJECT, CriterionSpec, VLPruneHookSpecs

__all__ = [
    "ADAPTERS",
    "BUILTIN_PLUGINS",
    "plugin_manager",
    "register",
    "unregister",
    "criteria",
    "family_rules",
    "get_spec",
    "check_pairing",
    "get_criterion",
    "resolve_object",
    "reset",
]

logger = logging.getLogger(__name__)

#: modules registered as plugins before any installed extension
BUILTIN_PLUGINS: tuple[str, ...] = (
    "vlprune.plugins.id_weighted",
    "vlprune.plugins.baselines",
    "vlprune.plugins.platon",
    "vlprune.plugins.amp",
    "vlprune.plugins.layer_similarity",
    "vlprune.plugins.token_diversity",
)

#: every adapter vlprune knows, in the column order of ``vlprune list``: the framework bridges
#: (Torch-Pruning, NNI) and the transformers-level ones (decoder-layer removal, visual-token
#: pruning). A criterion declares the ones that support it in ``CriterionSpec.adapters``.
ADAPTERS: tuple[str, ...] = ("torch_pruning", "nni", "hf_layers", "hf_tokens")

#: the adapter ``get_criterion(name)`` builds when a criterion has no framework-agnostic object and
#: several adapters (what it built before NNI pruners joined)
DEFAULT_ADAPTER = "torch_pruning"

#: optional dependencies behind an adapter, and how to install them
EXTRA_HINTS: dict[str, str] = {
    "nni": '; the NNI adapter needs the nni extra: pip install "vlprune[nni]" (or pip install -e ".[nni]")',
}

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first call: built-ins, then entry points)."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(VLPruneHookSpecs)
            for path in BUILTIN_PLUGINS:
                pm.register(importlib.import_module(path), name=path)
            try:
                loaded = pm.load_setuptools_entrypoints(PROJECT)
            except Exception as exc:  # a broken third-party plugin must not break vlprune
                logger.warning("could not load vlprune entry-point plugins: %s", exc)
                loaded = 0
            if loaded:
                logger.info("loaded %d vlprune plugin(s) from entry points", loaded)
            _pm = pm
        return _pm


def reset() -> None:
    """Forget the plugin manager (the next call rebuilds it and re-reads entry points)."""
    global _pm
    with _lock:
        _pm = None


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module at run time; returns its name."""
    registered = plugin_manager().register(plugin, name=name)
    if registered is None:
        raise RegistryError(f"plugin {name or plugin!r} is already registered")
    _specs()  # validate now, so a bad plugin fails where it is registered
    return registered


def unregister(name_or_plugin: str | object) -> None:
    """Remove a plugin registered with :func:`register`."""
    pm = plugin_manager()
    if isinstance(name_or_plugin, str):
        pm.unregister(name=name_or_plugin)
    else:
        pm.unregister(plugin=name_or_plugin)


def _specs() -> dict[str, CriterionSpec]:
    out: dict[str, CriterionSpec] = {}
    for batch in plugin_manager().hook.vlprune_register_criteria():
        for spec in batch or ():
            if not isinstance(spec, CriterionSpec):
                raise RegistryError(f"a plugin returned {spec!r}; vlprune_register_criteria must return CriterionSpec objects")
            if spec.level not in LEVELS:
                raise RegistryError(f"criterion {spec.name!r}: level {spec.level!r} is not one of {LEVELS}")
            if spec.needs not in NEEDS:
                raise RegistryError(f"criterion {spec.name!r}: needs {spec.needs!r} is not one of {NEEDS}")
            if spec.name in out:
                raise RegistryError(f"two plugins register a criterion named {spec.name!r}")
            out[spec.name] = spec
    return dict(sorted(out.items()))


def family_rules() -> list[Any]:
    """Model-family rules registered by plugins (``vlprune_register_families``), in registration
    order; the built-in rules are not included (``vlprune.adapters.hf.families.BUILTIN_RULES``)."""
    out: list[Any] = []
    for batch in reversed(plugin_manager().hook.vlprune_register_families()):  # pluggy calls last-registered first
        for rule in batch or ():
            if not (callable(getattr(rule, "matches", None)) and hasattr(rule, "modalities") and hasattr(rule, "name")):
                raise RegistryError(
                    f"a plugin returned {rule!r}; vlprune_register_families must return FamilyRule objects"
                )
            out.append(rule)
    return out


def criteria() -> list[CriterionSpec]:
    """Every registered criterion, sorted by name."""
    return list(_specs().values())


def get_spec(name: str) -> CriterionSpec:
    """The spec of criterion ``name``; a :class:`RegistryError` names the choices if unknown."""
    specs = _specs()
    if name not in specs:
        raise RegistryError(f"unknown criterion {name!r}; registered criteria: {', '.join(specs) or 'none'}")
    return specs[name]


def check_pairing(name: str, adapter: str) -> CriterionSpec:
    """Fail early, with the supported choices, if ``adapter`` does not support criterion ``name``."""
    spec = get_spec(name)
    if adapter not in spec.adapters:
        supported = ", ".join(spec.adapters) or "none"
        users = [s.name for s in criteria() if adapter in s.adapters]
        raise RegistryError(
            f"criterion {name!r} is not supported by adapter {adapter!r} (it supports: {supported}); "
            f"criteria adapter {adapter!r} supports: {', '.join(users) or 'none'}"
        )
    return spec


def resolve_object(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """Import a lazy ``"module.path:Attribute"`` reference (callables are returned as they are)."""
    if callable(target):
        return target
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except ModuleNotFoundError as exc:
        hint = EXTRA_HINTS.get((exc.name or "").split(".")[0], "")
        raise RegistryError(f"cannot import {target!r}: {exc}{hint}") from exc
    except (ImportError, AttributeError) as exc:
        raise RegistryError(f"cannot import {target!r}: {exc}") from exc
    return obj


def get_criterion(name: str, adapter: str | None = None, **params: Any) -> Any:
    """Build criterion ``name`` for ``adapter`` with ``params``.

    Args:
        name: registered criterion name (see :func:`criteria`).
        adapter: ``"torch_pruning"``, ``"nni"``, ... or None for the framework-agnostic object
            (or, if the criterion has none, its only adapter, else ``"torch_pruning"``).
        **params: passed to the criterion's constructor.

    Returns:
        The constructed criterion (e.g. a ``tp.importance.Importance`` for ``torch_pruning``).

    Raises:
        RegistryError: unknown name, or an unsupported (criterion, adapter) pair.
    """
    spec = get_spec(name)
    if adapter is None:
        if spec.factory is not None:
            return resolve_object(spec.factory)(**params)
        if len(spec.adapters) == 1:
            adapter = next(iter(spec.adapters))
        elif DEFAULT_ADAPTER in spec.adapters:
            adapter = DEFAULT_ADAPTER
        else:
            raise RegistryError(
                f"criterion {name!r} needs an adapter: one of {', '.join(spec.adapters)}"
            )
    check_pairing(name, adapter)
    return resolve_object(spec.adapters[adapter])(**params)
