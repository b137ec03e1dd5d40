"""Hook specifications of the ``vlprune`` pluggy project, and what a criterion declares.

Built-in criteria are registered through these hooks exactly as a third-party package's are.
A third party writes a module (or object) with ``@hookimpl``-decorated functions and exposes it
in the ``vlprune`` entry-point group of its ``pyproject.toml``::

    [project.entry-points.vlprune]
    my_criterion = "my_package.vlprune_plugin"

Example plugin module:
    >>> from vlprune.plugins.hookspecs import CriterionSpec, hookimpl
    >>> @hookimpl
    ... def vlprune_register_criteria():
    ...     return [CriterionSpec(name="l1_rows", level="channel", needs="none",
    ...                           adapters={"torch_pruning": "my_package.tp:L1Rows"})]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pluggy

__all__ = ["PROJECT", "hookspec", "hookimpl", "CriterionSpec", "StepSpec", "VLPruneHookSpecs", "LEVELS", "NEEDS"]

PROJECT = "vlprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Level = Literal["weight", "channel", "neuron", "layer", "token"]
Needs = Literal["none", "calibration", "gradients", "training"]
LEVELS: tuple[str, ...] = ("weight", "channel", "neuron", "layer", "token")
NEEDS: tuple[str, ...] = ("none", "calibration", "gradients", "training")


@dataclass(frozen=True)
class CriterionSpec:
    """What a registered criterion declares.

    Attributes:
        name: registry name (``get_criterion(name)``), lower case, unique.
        level: what it scores: ``weight``, ``channel``, ``neuron``, ``layer`` or ``token``.
        needs: the data it needs: ``none``, ``calibration`` (forward batches), ``gradients``
            (backward passes) or ``training`` (updates during training steps).
        adapters: adapter name (one of ``vlprune.plugins.registry.ADAPTERS``: ``torch_pruning``,
            ``nni``, ``hf_layers``, ``hf_tokens``; or a third party's own) -> the object that adapter uses: a callable taking the criterion's parameters, or a lazy
            ``"module.path:Attribute"`` string imported on first use.
        description: one line for ``vlprune list``.
        source: the paper or library it comes from.
        factory: optional framework-agnostic object (the plugin-level criterion), used when no
            adapter is asked for.
    """

    name: str
    level: Level
    needs: Needs
    adapters: Mapping[str, str | Callable[..., Any]] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    factory: str | Callable[..., Any] | None = None


@dataclass(frozen=True)
class StepSpec:
    """What a registered recipe step declares.

    A step is ``fn(ctx: vlprune.recipes.context.RecipeContext, params) -> dict``: it may replace or
    train ``ctx.model`` and returns a JSON-able summary (see :mod:`vlprune.recipes.context`).

    Attributes:
        name: the name recipes use (``- step: <name>``), lower case with ``_``, unique.
        fn: the function, or a lazy ``"module.path:function"`` string.
        params: a pydantic model class (``extra="forbid"``) of the step's parameters, or a lazy
            ``"module.path:Class"`` string; recipes and ``--set`` overrides are validated against it
            before any stage runs.
        description: one line for ``vlprune run --help``.
        frameworks: the recipe ``framework`` values the step works with.
        changes_model: whether the step changes the model (the runner then saves it with the stage,
            so a resumed run reloads it).
        criterion_params: names of parameters whose value is a registered criterion name: the runner
            checks each against the recipe's framework (``check_pairing``) before any work.
    """

    name: str
    fn: str | Callable[..., Any]
    params: Any
    description: str = ""
    frameworks: tuple[str, ...] = ("torch_pruning", "nni")
    changes_model: bool = True
    criterion_params: tuple[str, ...] = ()


class VLPruneHookSpecs:
    """The hooks a vlprune plugin may implement."""

    @hookspec
    def vlprune_register_criteria(self) -> list[CriterionSpec]:  # type: ignore[empty-body]
        """Return the criteria this plugin provides."""

    @hookspec
    def vlprune_register_families(self) -> list[Any]:  # type: ignore[empty-body]
        """Return model-family rules (``vlprune.adapters.hf.families.FamilyRule``) this plugin
        provides; :func:`~vlprune.adapters.hf.families.describe` tries them before the built-in
        rules, so a plugin can also refine a built-in family."""

    @hookspec
    def vlprune_register_steps(self) -> list[StepSpec]:  # type: ignore[empty-body]
        """Return the recipe steps (:class:`StepSpec`) this plugin provides."""
