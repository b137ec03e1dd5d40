"""The recipe step registry: steps registered through the ``vlprune_register_steps`` hook.

Built-in steps live in plugin modules (:data:`BUILTIN_STEP_PLUGINS`) registered into the same pluggy
``PluginManager`` as the criteria (:func:`vlprune.plugins.registry.plugin_manager`); a third party
adds steps exactly as it adds criteria: a module with an ``@hookimpl def vlprune_register_steps()``
returning :class:`~vlprune.plugins.hookspecs.StepSpec` objects, in the ``vlprune`` entry-point group
(or ``vlprune.plugins.registry.register(module)`` at run time).

Framework variants: a stage names one step (``prune_id_taylor``); when that step does not list the
recipe's ``framework``, the step registered as ``<step>_<framework>`` (``prune_id_taylor_nni``) runs
instead, if there is one, so a recipe switches framework with one key.

Example:
    >>> from vlprune.recipes.steps import steps
    >>> "distill" in steps()
    True
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from pydantic import BaseModel

from vlprune.errors import RegistryError
from vlprune.plugins.hookspecs import StepSpec
from vlprune.plugins.registry import plugin_manager, resolve_object

__all__ = ["BUILTIN_STEP_PLUGINS", "steps", "get_step", "resolve_step", "step_params_model", "step_fn"]

logger = logging.getLogger(__name__)

#: modules holding the built-in steps (a missing optional one is skipped)
BUILTIN_STEP_PLUGINS: tuple[str, ...] = (
    "vlprune.recipes.steps_core",
    "vlprune.recipes.steps_methods",
)


def _ensure_builtins() -> None:
    pm = plugin_manager()
    for path in BUILTIN_STEP_PLUGINS:
        if pm.get_plugin(path) is not None:
            continue
        if importlib.util.find_spec(path) is None:
            logger.debug("built-in step module %s is not available", path)
            continue
        pm.register(importlib.import_module(path), name=path)


def steps() -> dict[str, StepSpec]:
    """Every registered step, by name (sorted).

    Raises:
        RegistryError: a plugin returned something other than ``StepSpec`` objects, or two plugins
            register the same step name.
    """
    _ensure_builtins()
    out: dict[str, StepSpec] = {}
    for batch in plugin_manager().hook.vlprune_register_steps():
        for spec in batch or ():
            if not isinstance(spec, StepSpec):
                raise RegistryError(f"a plugin returned {spec!r}; vlprune_register_steps must return StepSpec objects")
            if spec.name in out:
                raise RegistryError(f"two plugins register a recipe step named {spec.name!r}")
            out[spec.name] = spec
    return dict(sorted(out.items()))


def get_step(name: str) -> StepSpec:
    """The step registered as ``name``; a :class:`RegistryError` lists the registered steps."""
    all_steps = steps()
    if name not in all_steps:
        raise RegistryError(f"unknown recipe step {name!r}; registered steps: {', '.join(all_steps) or 'none'}")
    return all_steps[name]


def resolve_step(name: str, framework: str) -> StepSpec:
    """The step that runs for stage step ``name`` under ``framework`` (``name`` itself, or its
    ``<name>_<framework>`` variant).

    Raises:
        RegistryError: unknown step, or neither it nor a variant supports ``framework``.
    """
    spec = get_step(name)
    if framework in spec.frameworks:
        return spec
    variant = steps().get(f"{name}_{framework}")
    if variant is not None and framework in variant.frameworks:
        return variant
    raise RegistryError(
        f"recipe step {name!r} does not support framework {framework!r} (it supports: "
        f"{', '.join(spec.frameworks)}) and no step {name + '_' + framework!r} is registered; "
        f"set framework to one of {', '.join(spec.frameworks)}"
    )


def step_params_model(spec: StepSpec) -> type[BaseModel]:
    """The step's pydantic params class (imported if given lazily)."""
    cls: Any = resolve_object(spec.params) if isinstance(spec.params, str) else spec.params
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise RegistryError(f"recipe step {spec.name!r}: params must be a pydantic BaseModel class, got {cls!r}")
    return cls


def step_fn(spec: StepSpec) -> Any:
    """The step's function (imported if given lazily)."""
    return resolve_object(spec.fn)
