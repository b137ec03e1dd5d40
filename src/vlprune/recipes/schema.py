"""Recipe files and overrides, validated with pydantic before any work.

A recipe (YAML file, built-in name or dict)::

    name: id-taylor
    description: ID profile, ID-weighted Taylor on MLP neurons + heads, distillation
    framework: torch_pruning          # or nni (steps pick their framework variant)
    seed: 0
    model: testbed:llava              # default --model (optional)
    data: testbed:llava               # default --data (optional)
    batch_size: 8
    report: {latency_repeats: 10}     # optional
    stages:
      - step: calibrate
        params: {n_samples: 64}
      - step: distill
        params: {steps: 100, lr: 1.0e-4}

Overrides address keys with dots: ``framework=nni``, ``seed=1``, ``report.latency_repeats=3``, ``distill.steps=20`` (the stage
running step ``distill``; ``3.steps=20`` addresses the third stage, needed when a step appears
twice). From the shell, ``--set distill.steps=20`` (the value is read as YAML: ``20`` is an int,
``[a, b]`` a list); from Python, ``run_recipe(..., distill={"steps": 20})`` or ``distill__steps=20``.

Example:
    >>> from vlprune.recipes.schema import resolve_recipe
    >>> r = resolve_recipe("id-taylor", {"distill.steps": 3})
    >>> r.stage("distill").params.steps
    3
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlprune.errors import RegistryError, VLPruneError
from vlprune.plugins.hookspecs import StepSpec

__all__ = [
    "BUILTIN_DIR",
    "FRAMEWORKS",
    "StepParams",
    "StageSpec",
    "ReportSpec",
    "RecipeSpec",
    "ResolvedStage",
    "ResolvedRecipe",
    "builtin_recipes",
    "load_recipe_source",
    "parse_set",
    "kwargs_overrides",
    "apply_overrides",
    "resolve_recipe",
]

BUILTIN_DIR = Path(__file__).parent / "builtin"
FRAMEWORKS: tuple[str, ...] = ("torch_pruning", "nni")


class StepParams(BaseModel):
    """Base class of step parameter models: unknown keys are errors, values are validated on
    assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageSpec(BaseModel):
    """One stage: the step it runs and the step's parameters (validated against the step's model)."""

    model_config = ConfigDict(extra="forbid")
    step: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _empty_params(cls, value: Any) -> Any:
        return {} if value is None else value  # ``params:`` with nothing under it


class ReportSpec(BaseModel):
    """The report's measurement settings (recipe key ``report``)."""

    model_config = ConfigDict(extra="forbid")
    latency_repeats: int = Field(10, ge=1, description="side-by-side forward pairs timed")
    latency_warmup: int = Field(2, ge=0)


class RecipeSpec(BaseModel):
    """A recipe file's top level."""

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    framework: Literal["torch_pruning", "nni"] = "torch_pruning"
    seed: int = 0
    model: str | None = None
    data: str | None = None
    batch_size: int = Field(8, ge=1)
    report: ReportSpec = Field(default_factory=ReportSpec)
    stages: list[StageSpec] = Field(min_length=1)


@dataclass
class ResolvedStage:
    """A validated stage: ``key`` (``"NN-<step>"``), the stage's ``step`` name, the ``spec`` that runs
    (the step or its framework variant) and its ``params`` (the step's pydantic model, defaults filled)."""

    index: int
    step: str
    spec: StepSpec
    params: BaseModel

    @property
    def key(self) -> str:
        return f"{self.index:02d}-{self.step}"


@dataclass
class ResolvedRecipe:
    """A validated recipe: the top level (``spec``) and its stages, every default filled in."""

    spec: RecipeSpec
    stages: list[ResolvedStage]
    origin: str = ""

    def stage(self, step: str) -> ResolvedStage:
        """The first stage running ``step``."""
        for s in self.stages:
            if s.step == step:
                return s
        raise KeyError(step)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as run, every default filled in (JSON-able)."""
        top = self.spec.model_dump(mode="json", exclude={"stages"})
        top["stages"] = [
            {"step": s.step, **({"runs": s.spec.name} if s.spec.name != s.step else {}), "params": s.params.model_dump(mode="json")}
            for s in self.stages
        ]
        return top


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name -> YAML path (``recipes/builtin/*.yaml``)."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise VLPruneError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise VLPruneError(f"recipe {path}: YAML syntax error{where}: {problem}; fix the file") from exc


def load_recipe_source(recipe: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The raw recipe dict and where it came from.

    Args:
        recipe: a built-in name (``vlprune recipes``), a YAML path, or a dict.

    Raises:
        VLPruneError: unknown name (the built-ins are listed), unreadable file, YAML syntax error
            (with the line number), a file whose top level is not a mapping.
    """
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe)), "<dict>"
    text = str(recipe)
    builtins = builtin_recipes()
    if text in builtins:
        path, origin = builtins[text], f"built-in {text}"
    elif text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path, origin = Path(text), text
        if not path.is_file():
            raise VLPruneError(f"recipe file {text} does not exist; give a YAML path or a built-in: {', '.join(builtins)}")
    else:
        raise VLPruneError(
            f"unknown recipe {text!r}; built-in recipes: {', '.join(builtins) or 'none'} (or give a YAML file path)"
        )
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise VLPruneError(f"recipe {origin}: the top level must be a mapping with name, framework, stages; got {type(raw).__name__}")
    return raw, origin


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["distill.steps=20", "framework=nni"]`` -> ``{"distill.steps": 20, "framework": "nni"}``
    (values read as YAML scalars / lists).

    Raises:
        VLPruneError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise VLPruneError(f"--set {item!r}: expected key.sub=value, e.g. --set distill.steps=20")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def kwargs_overrides(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Python keyword overrides as dotted keys: ``distill={"steps": 3}`` and ``distill__steps=3``
    both give ``{"distill.steps": 3}``; ``framework="nni"`` stays as it is."""
    out: dict[str, Any] = {}
    top = set(RecipeSpec.model_fields) - {"stages"}
    for key, value in kwargs.items():
        dotted = key.replace("__", ".")
        if isinstance(value, Mapping) and dotted not in top:
            for sub, v in value.items():
                out[f"{dotted}.{sub}"] = v
        else:
            out[dotted] = value
    return out


def _stage_names(raw: dict[str, Any]) -> list[str]:
    stages = raw.get("stages")
    if not isinstance(stages, list):
        return []
    return [str(s.get("step")) if isinstance(s, dict) else "?" for s in stages]


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with the dotted ``overrides`` set (see the module doc).

    Raises:
        VLPruneError: a key naming neither a top-level key nor a stage (the choices are listed),
            or a step that appears in several stages (address it by stage number).
    """
    out = copy.deepcopy(raw)
    top = [k for k in RecipeSpec.model_fields if k != "stages"]
    names = _stage_names(out)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head in top:
            if not rest:
                out[head] = value
                continue
            node = out.setdefault(head, {})
            if not isinstance(node, dict):
                node = out[head] = {}
            parts = rest.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
            continue
        if not rest:
            raise VLPruneError(
                f"override {key!r}: not a recipe key; top-level keys: {', '.join(top)}; stage keys look like "
                f"<step>.<param>, steps of this recipe: {', '.join(names)}"
            )
        if head.isdigit():
            idx = int(head) - 1
            if not 0 <= idx < len(names):
                raise VLPruneError(f"override {key!r}: this recipe has stages 1..{len(names)} ({', '.join(names)})")
        else:
            hits = [i for i, n in enumerate(names) if n == head]
            if not hits:
                raise VLPruneError(
                    f"override {key!r}: no stage runs step {head!r}; steps of this recipe: {', '.join(names)} "
                    f"(top-level keys: {', '.join(top)})"
                )
            if len(hits) > 1:
                raise VLPruneError(
                    f"override {key!r}: step {head!r} runs in stages {', '.join(str(h + 1) for h in hits)}; "
                    f"address one by number, e.g. {hits[0] + 1}.{rest}"
                )
            idx = hits[0]
        stage = out["stages"][idx]
        if not isinstance(stage, dict):
            raise VLPruneError(f"override {key!r}: stage {idx + 1} is not a mapping (step: ..., params: ...)")
        params = stage.get("params")
        if params is None:
            stage["params"] = params = {}
        elif not isinstance(params, dict):
            raise VLPruneError(f"override {key!r}: stage {idx + 1}'s params is not a mapping")
        node = params
        parts = rest.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


def _allowed(model: type[BaseModel]) -> str:
    parts = []
    for name, f in model.model_fields.items():
        default = f.get_default(call_default_factory=True)
        parts.append(f"{name}={default!r}" if not f.is_required() else f"{name} (required)")
    return ", ".join(parts)


def _format_errors(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        key = f"{where}.{loc}" if where and loc else (where or loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} (allowed: {_allowed(model)})")
        elif e["type"] == "missing":
            lines.append(f"missing key {key!r} (keys: {_allowed(model)})")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _default(model: type[BaseModel], name: str) -> Any:
    field = model.model_fields.get(name)
    return None if field is None or field.is_required() else field.get_default(call_default_factory=True)


def resolve_recipe(
    recipe: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> ResolvedRecipe:
    """Load, override and validate a recipe; every stage's parameters are checked against its step's
    pydantic model and every criterion parameter against the recipe's framework.

    Args:
        recipe: a built-in name, a YAML path or a dict.
        overrides: dotted keys -> values (:func:`parse_set`, :func:`kwargs_overrides`).

    Returns:
        The :class:`ResolvedRecipe` (defaults filled in).

    Raises:
        VLPruneError: unknown recipe, YAML error, unknown key or wrong type (naming the key and the
            allowed keys / values).
        RegistryError: unknown step, a step without the recipe's framework, a criterion the
            framework does not support (the registry's pairing error).
    """
    from vlprune.plugins.registry import check_pairing
    from vlprune.recipes.steps import get_step, resolve_step, step_params_model

    raw, origin = load_recipe_source(recipe)
    raw = apply_overrides(raw, overrides or {})
    try:
        spec = RecipeSpec.model_validate(raw)
    except ValidationError as exc:
        raise VLPruneError(f"recipe {origin}: {_format_errors(exc, '', RecipeSpec)}") from None
    stages: list[ResolvedStage] = []
    for i, stage in enumerate(spec.stages, start=1):
        try:
            named = get_step(stage.step)
        except RegistryError as exc:
            raise RegistryError(f"recipe {origin}, stage {i}: {exc}") from None
        for name in named.criterion_params:  # the pairing error first: it names the criterion
            value = stage.params.get(name, _default(step_params_model(named), name))
            if isinstance(value, str):
                try:
                    check_pairing(value, spec.framework)
                except RegistryError as exc:
                    raise RegistryError(f"recipe {origin}, {stage.step}.{name}: {exc}") from None
        try:
            run = resolve_step(stage.step, spec.framework)
        except RegistryError as exc:
            raise RegistryError(f"recipe {origin}, stage {i}: {exc}") from None
        model = step_params_model(run)
        try:
            params = model.model_validate(stage.params)
        except ValidationError as exc:
            raise VLPruneError(f"recipe {origin}: {_format_errors(exc, stage.step, model)}") from None
        stages.append(ResolvedStage(i, stage.step, run, params))
    return ResolvedRecipe(spec, stages, origin)
