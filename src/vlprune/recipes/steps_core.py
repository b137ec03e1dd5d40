"""The built-in core recipe steps: ``calibrate``, ``prune_id_taylor``, ``distill``, ``evaluate``, ``save``.

Each is ``fn(ctx, params) -> dict`` (see :mod:`vlprune.recipes.context`) with a pydantic params model,
registered through the ``vlprune_register_steps`` hook like any third-party step.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from vlprune.errors import DataError, VLPruneError
from vlprune.plugins.hookspecs import StepSpec, hookimpl
from vlprune.recipes.context import RecipeContext, cycle
from vlprune.recipes.schema import StepParams

__all__ = [
    "CalibrateParams",
    "PruneIDTaylorParams",
    "DistillParams",
    "EvaluateParams",
    "SaveParams",
    "calibrate",
    "prune_id_taylor",
    "distill",
    "evaluate",
    "save",
    "model_widths",
    "default_tasks",
    "agreement",
    "vlprune_register_steps",
]

logger = logging.getLogger(__name__)


def model_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{"mlp": {mlp path: hidden width}, "heads": {attention path: heads}}`` of a transformers model
    (from :func:`vlprune.describe_model`)."""
    from vlprune.adapters.hf.families import describe

    info = describe(model)
    return {
        "mlp": {m.name: int(m.hidden) for m in info.mlps},
        "heads": {a.name: int(a.num_heads) for a in info.attentions},
    }


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------- calibrate
class CalibrateParams(StepParams):
    """``calibrate``: the per-layer intrinsic-dimension profile (:func:`vlprune.estimate_ids`)."""

    n_samples: int = Field(64, ge=8, description="calibration samples (rows per layer)")
    batch_size: int | None = Field(None, ge=1, description="samples per batch (default: the recipe's)")
    modules: list[str] | None = Field(None, description="module names / globs (default: every Linear but heads)")
    representation: Literal["flatten", "cls", "mean", "tokens"] = "flatten"
    estimator: Literal["linear", "mle"] = "linear"
    max_memory_mb: float | None = Field(
        None, gt=0, description="RAM for stored rows (default: half the available memory; the rest is spilled to disk)"
    )


def calibrate(ctx: RecipeContext, params: CalibrateParams) -> dict[str, Any]:
    """ID profile of ``ctx.model`` on calibration batches; writes ``id.json`` and ``id.png``.

    Returns:
        ``{"id_profile": <id.json, relative to out>, "id_plot": ..., "summary": per-modality stats}``.
    """
    import vlprune

    assert ctx.stage_dir is not None
    batches = ctx.data.calibration(params.n_samples, params.batch_size)
    profile = vlprune.estimate_ids(
        ctx.model, batches, modules=params.modules, n_samples=params.n_samples,
        representation=params.representation, estimator=params.estimator,
        max_memory_mb=params.max_memory_mb, progress=ctx.progress,
    )
    json_path = profile.to_json(ctx.stage_dir / "id.json")
    png_path = profile.plot(ctx.stage_dir / "id.png")
    return {"id_profile": ctx.relpath(json_path), "id_plot": ctx.relpath(png_path), "summary": profile.summary()}


# ---------------------------------------------------------------------------------- prune_id_taylor
class PruneIDTaylorParams(StepParams):
    """``prune_id_taylor``: ID-weighted importance (base: a registered criterion, Taylor by default)
    on MLP neurons and attention heads, with Torch-Pruning (:func:`prune_hf_model`)."""

    ratio: float = Field(0.3, ge=0.0, lt=1.0, description="fraction of MLP neurons removed")
    head_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of heads removed (default: ratio, capped)")
    base: str = Field("taylor", description="base criterion (registry name): taylor, magnitude, random")
    prune_heads: bool = True
    prune_mlp: bool = True
    global_pruning: bool = True
    grad_samples: int = Field(32, ge=1, description="training samples whose gradients Taylor uses")
    normalize: bool = False
    group_id: Literal["mean", "root", "max", "min"] = "mean"
    modalities: list[str] | None = Field(None, description="modalities to prune (default: all)")
    min_heads: int = Field(1, ge=1)
    min_neurons: int = Field(1, ge=1)


def _id_profile(ctx: RecipeContext) -> tuple[Any, str | None]:
    """The ID profile of the latest calibrate stage, or one estimated now with calibrate's defaults
    (then also its path, for this stage's summary)."""
    from vlprune.plugins.intrinsic_dim import IDProfile

    path = ctx.latest("id_profile")
    if path is not None:
        return IDProfile.from_json(ctx.path(path)), None
    logger.info("no calibrate stage before %s: estimating the ID profile with calibrate's defaults", ctx.stage_key)
    made = calibrate(ctx, CalibrateParams())["id_profile"]
    return IDProfile.from_json(ctx.path(made)), made


def prune_id_taylor(ctx: RecipeContext, params: PruneIDTaylorParams) -> dict[str, Any]:
    """Prune ``ctx.model`` in place (the model is left unchanged if pruning fails).

    Returns:
        ``{"params_before", "params_after", "widths": model_widths(...), "changed": sync's report}``.
    """
    from vlprune.adapters.torch_pruning import IDWeightedImportance, prune_hf_model
    from vlprune.plugins.capture import preserved_mode
    from vlprune.plugins.registry import get_criterion, get_spec

    profile, made = _id_profile(ctx)
    base = get_criterion(params.base, adapter="torch_pruning")
    imp = IDWeightedImportance(base, profile, normalize=params.normalize, group_id=params.group_id)
    model = ctx.model
    before = _n_params(model)
    needs_grad = get_spec(params.base).needs in ("gradients", "training")
    try:
        if needs_grad:
            model.zero_grad(set_to_none=True)
            batches = ctx.data.training(params.grad_samples, labels=True)
            with preserved_mode(model, training=False):
                for batch in batches:
                    loss = getattr(model(**batch), "loss", None)
                    if loss is None:
                        raise DataError(
                            f"base {params.base!r} needs a loss, and {type(model).__name__}(**batch) gives none; "
                            "give batches with labels or use base=magnitude"
                        )
                    (loss / len(batches)).backward()
        changed = prune_hf_model(
            model, ctx.data.example_inputs(), imp, params.ratio, head_pruning_ratio=params.head_ratio,
            global_pruning=params.global_pruning, prune_heads=params.prune_heads, prune_mlp=params.prune_mlp,
            modalities=tuple(params.modalities) if params.modalities else None,
            min_heads=params.min_heads, min_neurons=params.min_neurons,
        )
    finally:
        model.zero_grad(set_to_none=True)
    after = _n_params(model)
    logger.info("prune_id_taylor: %d -> %d parameters (%.1f%%)", before, after, 100.0 * after / before)
    out = {"params_before": before, "params_after": after, "widths": model_widths(model), "changed": changed}
    if made is not None:
        out["id_profile"] = made
    return out


# ------------------------------------------------------------------------------------------ distill
class DistillParams(StepParams):
    """``distill``: knowledge distillation from the unpruned teacher (:func:`vlprune.recipes.distill.distill`)."""

    steps: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    n_samples: int = Field(256, ge=1, description="training samples cycled through")
    batch_size: int | None = Field(None, ge=1)
    warmup: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    clip_grad: float | None = 1.0
    embed_weight: float = Field(1.0, ge=0)
    token_weight: float = Field(1.0, ge=0)
    logit_weight: float = Field(1.0, ge=0, description="logit KL weight (generative models)")
    temperature: float = Field(1.0, gt=0)
    save_every: int = Field(10, ge=1, description="checkpoint every this many steps (resume point)")


def distill(ctx: RecipeContext, params: DistillParams) -> dict[str, Any]:
    """Distil ``ctx.teacher`` into ``ctx.model`` (in place), checkpointing under
    ``<stage_dir>/ckpt`` so that a killed run resumes mid-training.

    Returns:
        ``{"first_loss", "last_loss", "start_step", "terms", "seconds"}``.
    """
    from vlprune.recipes.distill import distill as run_distill

    assert ctx.stage_dir is not None
    batches = ctx.data.training(params.n_samples, labels=False, batch_size=params.batch_size)
    log = run_distill(
        ctx.model, ctx.teacher, cycle(batches), params.steps, lr=params.lr, weight_decay=params.weight_decay,
        warmup=params.warmup, clip_grad=params.clip_grad, embed_weight=params.embed_weight,
        token_weight=params.token_weight, logit_weight=params.logit_weight, temperature=params.temperature,
        checkpoint=ctx.stage_dir / "ckpt", save_every=params.save_every, progress=ctx.progress,
    )
    losses = [float(v) for _, v in log.get("loss", [])]
    return {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "start_step": int(log.get("start_step", 0)),
        "terms": log.get("terms", {}),
        "seconds": float(log.get("seconds", 0.0)),
    }


# ----------------------------------------------------------------------------------------- evaluate
class EvaluateParams(StepParams):
    """``evaluate``: testbed tasks (teacher = before, model = after), or teacher-student agreement on
    user data."""

    tasks: list[Literal["retrieval", "vqa", "caption"]] | None = Field(
        None, description="testbed tasks (default: the model's: retrieval for CLIP, vqa + caption for LLaVA)"
    )
    n: int = Field(100, ge=1, description="testbed scenes per task")
    split: Literal["val", "test"] = "test"
    teacher: bool = Field(True, description="also evaluate the unpruned model (the 'before' column)")
    agreement_samples: int = Field(64, ge=1, description="user data: held-out samples for the agreement")


def default_tasks(testbed: str) -> list[str]:
    """The testbed tasks of testbed model ``testbed``."""
    if testbed == "clip":
        return ["retrieval"]
    if testbed == "blip":
        return ["caption"]
    return ["vqa", "caption"]


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Teacher-student agreement on ``batches``: ``top1_agreement`` (fraction of positions,
    ``attention_mask`` 1, where the arg-max logits agree) for models with logits, and
    ``embed_cosine`` (mean cosine of the image embeddings) where :func:`default_features` gives them.
    """
    from vlprune.plugins.capture import preserved_mode
    from vlprune.recipes.distill import default_features

    agree = total = 0.0
    cos: list[float] = []
    with preserved_mode(student, training=False), preserved_mode(teacher, training=False):
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "return_loss")}
            fs = default_features(student, inputs, logits=True)
            ft = default_features(teacher, inputs, logits=True)
            if "logits" in fs and "logits" in ft and fs["logits"].shape == ft["logits"].shape:
                same = (fs["logits"].argmax(-1) == ft["logits"].argmax(-1)).float()
                mask = inputs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.shape == same.shape:
                    agree += float((same * mask).sum())
                    total += float(mask.sum())
                else:
                    agree += float(same.sum())
                    total += same.numel()
            if "embed" in fs and "embed" in ft and fs["embed"].shape == ft["embed"].shape:
                cos.append(float(torch.nn.functional.cosine_similarity(fs["embed"].float(), ft["embed"].float(), dim=-1).mean()))
    out: dict[str, float] = {}
    if total:
        out["top1_agreement"] = agree / total
    if cos:
        out["embed_cosine"] = sum(cos) / len(cos)
    if not out:
        raise VLPruneError("teacher-student agreement: the model gives neither logits nor embeddings to compare")
    return out


def evaluate(ctx: RecipeContext, params: EvaluateParams) -> dict[str, Any]:
    """Metrics before (teacher) and after (``ctx.model``).

    Returns:
        ``{"metrics": {"before": {name: value}, "after": {...}}, "kind": "testbed" | "agreement"}``;
        testbed metric names are ``<task>/<metric>`` (``vqa/math``, ``retrieval/i2t_r1``).
    """
    from vlprune.testbed import evaluate as tb_evaluate

    if ctx.testbed is not None:
        tasks = list(params.tasks or default_tasks(ctx.testbed))
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        for task in tasks:
            kw = {"n": params.n}
            for name, value in tb_evaluate(ctx.model, task, params.split, **kw).items():
                after[f"{task}/{name}"] = float(value)
            if params.teacher:
                for name, value in tb_evaluate(ctx.teacher, task, params.split, **kw).items():
                    before[f"{task}/{name}"] = float(value)
        return {"kind": "testbed", "tasks": tasks, "metrics": {"before": before, "after": after}}
    batches = ctx.data.evaluation(params.agreement_samples)
    after = agreement(ctx.model, ctx.teacher, batches)
    before = {k: 1.0 for k in after} if params.teacher else {}
    return {"kind": "agreement", "metrics": {"before": before, "after": after}}


# --------------------------------------------------------------------------------------------- save
class SaveParams(StepParams):
    """``save``: :func:`vlprune.save_pruned` with the processor / tokenizer."""

    dir: str = Field("model", description="directory, relative to the run directory (or absolute)")


def save(ctx: RecipeContext, params: SaveParams) -> dict[str, Any]:
    """Save ``ctx.model`` (and ``ctx.processor``) to ``params.dir``; returns ``{"model_dir": ...}``."""
    import vlprune

    path = ctx.path(params.dir)
    if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise VLPruneError(f"save: {path} holds files that are not a saved model; choose another save.dir")
    vlprune.save_pruned(ctx.model, path, processor=ctx.processor)
    return {"model_dir": ctx.relpath(path)}


@hookimpl
def vlprune_register_steps() -> list[StepSpec]:
    """Register the core steps."""
    return [
        StepSpec("calibrate", calibrate, CalibrateParams, "per-layer ID profile (id.json, id.png)", changes_model=False),
        StepSpec(
            "prune_id_taylor", prune_id_taylor, PruneIDTaylorParams,
            "ID-weighted importance (base: taylor) on MLP neurons + heads, Torch-Pruning",
            frameworks=("torch_pruning",), criterion_params=("base",),
        ),
        StepSpec("distill", distill, DistillParams, "distillation from the unpruned model (resumable)"),
        StepSpec("evaluate", evaluate, EvaluateParams, "testbed metrics or teacher-student agreement, before/after", changes_model=False),
        StepSpec("save", save, SaveParams, "vlprune.save_pruned with the processor / tokenizer", changes_model=False),
    ]

