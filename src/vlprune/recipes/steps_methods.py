"""Recipe steps of the built-in method recipes other than ``id-taylor``: ID-PLATON while training,
AMP widths, domain-aware layer dropping and visual-token pruning (DivPrune), each for the framework
the recipe names.

* ``prune_id_platon`` (``torch_pruning``, ``nni``): ID-PLATON (PLATON x layer ID) on PLATON's cubic
  schedule while training; MLP neurons and whole heads (Torch-Pruning) or MLP neurons (NNI + shrink).
* ``prune_amp`` (``torch_pruning``, ``nni``): AMP entropy importance + per-MLP width search.
* ``drop_layers`` (``torch_pruning``: :func:`vlprune.remove_layers`, criterion adapter ``hf_layers``)
  and ``drop_layers_nni`` (``nni``: ``LayerSimilarityPruner`` + shrink): domain-aware decoder-layer
  ranking and removal.
* ``prune_tokens`` (``torch_pruning`` only: token criteria have no NNI route): DivPrune / FastV /
  random / uniform visual tokens at inference, evaluated with and without, FLOPs and latency.
* ``prune_id_taylor_nni`` (``nni``): the NNI variant of core's ``prune_id_taylor``
  (``IDWeightedPruner`` taylor / l1 on MLP neurons + shrink), picked by ``framework: nni``.

A step is ``fn(ctx, params) -> dict`` (:mod:`vlprune.recipes.context`); the dict is JSON-able and
holds what the report and later stages read (``params_before`` / ``params_after``, ``widths``,
``removed`` ...). Each step's parameters are a pydantic model (``extra="forbid"``). ``criterion`` /
``method`` / ``base`` parameters name registered criteria and are checked against the recipe's
framework (``vlprune.check_pairing``) when the recipe is validated, before any stage runs: by the
runner (``criterion_params``) for ``prune_id_platon``, ``prune_amp`` and ``prune_id_taylor``, and by
the parameter models themselves for ``drop_layers`` (adapter ``hf_layers``; ``nni`` for
``drop_layers_nni``) and ``prune_tokens`` (``hf_tokens``), whose ``torch_pruning`` route is the
transformers-level adapter of their criteria.

Example:
    >>> import vlprune.recipes.steps_methods as sm
    >>> sm.AMPParams(delta_e=0.02).delta_e
    0.02
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.hookspecs import StepSpec, hookimpl
from vlprune.recipes.context import Batch, RecipeContext, cycle
from vlprune.recipes.schema import StepParams
from vlprune.recipes.steps_core import PruneIDTaylorParams

__all__ = [
    "IDPlatonParams",
    "AMPParams",
    "LayerDropParams",
    "TokenPruneParams",
    "IDTaylorNNIParams",
    "prune_id_platon",
    "prune_amp",
    "drop_layers",
    "prune_tokens",
    "prune_id_taylor_nni",
    "param_count",
    "mlp_widths",
    "vlprune_register_steps",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# small shared helpers
# ---------------------------------------------------------------------------------------------


_Params = StepParams


def param_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """MLP path -> current hidden width (``up.out_features``), for every MLP vlprune recognises."""
    from vlprune.adapters.hf.families import describe

    out: dict[str, int] = {}
    for mlp in describe(model).mlps:
        up = model.get_submodule(mlp.up)
        out[mlp.name] = int(getattr(up, "out_features", 0) or up.weight.shape[0])
    return out


def _structure(model: nn.Module) -> dict[str, Any]:
    """What a report shows about the model's shape: parameters, MLP widths, heads, decoder layers."""
    from vlprune.adapters.hf.families import describe

    info = describe(model)
    return {
        "params": param_count(model),
        "widths": mlp_widths(model),
        "heads": {a.name: int(a.num_heads) for a in info.attentions},
        "decoder_layers": len(info.decoder_layers),
    }


def _profile(ctx: RecipeContext, n_samples: int) -> Any:
    """The ID profile of an earlier ``calibrate`` stage (``ctx.latest("id_profile")``), else one
    estimated here on ``n_samples`` calibration samples (written to the stage directory)."""
    import vlprune
    from vlprune.plugins.intrinsic_dim import IDProfile

    rel = ctx.latest("id_profile")
    if rel:
        return IDProfile.from_json(ctx.path(rel))
    logger.info("no calibrate stage before this one: estimating the ID profile on %d samples", n_samples)
    profile = vlprune.estimate_ids(ctx.model, ctx.data.calibration(n_samples), n_samples=n_samples, progress=ctx.progress)
    if ctx.stage_dir is not None:
        profile.to_json(ctx.stage_dir / "id_profile.json")
    return profile


def _images_only(batches: Sequence[Batch]) -> list[Batch]:
    out = []
    for b in batches:
        if "pixel_values" not in b:
            raise DataError(
                f"AMP scores MLP neurons with an image objective and needs batches with 'pixel_values'; got keys "
                f"{sorted(b)}: give image data (a testbed model, or captions.jsonl with images)"
            )
        out.append({"pixel_values": b["pixel_values"]})
    return out


def _nni_masks(masks: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    return {m: {t: v.detach().clone() for t, v in tm.items() if v is not None} for m, tm in masks.items()}


def _shrink(ctx: RecipeContext, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    from vlprune.adapters.nni import shrink

    report = shrink(ctx.model, masks, ctx.data.example_inputs(), progress=ctx.progress)
    return {
        "shrink": report.summary(),
        "shrink_verified": bool(report.verified),
        "zeros_left": int(report.zeros_left),
    }


class _Trainer:
    """One AdamW training loop over ``batches`` (cycled), used as NNI's ``training_func``."""

    def __init__(self, batches: Sequence[Batch], lr: float, progress: bool, desc: str) -> None:
        self.next = cycle(batches)
        self.lr = lr
        self.step = 0
        self.losses: list[float] = []
        self.progress = progress
        self.desc = desc

    @staticmethod
    def loss(batch: Batch, model: nn.Module) -> torch.Tensor:
        return model(**batch).loss

    def training_func(self, model: nn.Module, optimizers: Any, training_step: Any, lr_schedulers: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None) -> None:
        optimizer = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        if max_steps is None:
            raise VLPruneError("the recipe drives NNI by steps (max_steps)")
        model.train()
        try:
            for _ in tqdm(range(max_steps), desc=self.desc, disable=not self.progress, leave=False):
                optimizer.zero_grad()
                loss = training_step(self.next(self.step), model)
                loss.backward()
                optimizer.step()
                self.losses.append(float(loss.detach()))
                self.step += 1
        finally:
            model.eval()

    def evaluator(self, model: nn.Module) -> Any:
        import nni
        from nni.compression import TorchEvaluator

        optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=self.lr)
        return TorchEvaluator(self.training_func, optimizer, self.loss)


def _loss_summary(losses: Sequence[float]) -> dict[str, Any]:
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "train_steps": len(losses)}


def _seed(ctx: RecipeContext) -> None:
    torch.manual_seed(ctx.seed)


# ---------------------------------------------------------------------------------------------
# ID-PLATON while training
# ---------------------------------------------------------------------------------------------


class IDPlatonParams(_Params):
    """Parameters of ``prune_id_platon``.

    Training: ``steps`` AdamW steps of ``batch_size`` training samples (with labels) at ``lr``.
    PLATON's cubic schedule: ``warmup_steps * initial_warmup`` dense steps, the cubic phase,
    ``warmup_steps * final_warmup`` steps at the final sparsity (README "PLATON and ID-PLATON").
    """

    criterion: Literal["platon"] = Field("platon", description="the score (a registered criterion): PLATON's UCB of |w * grad|")
    id_weighted: bool = Field(True, description="multiply the score by the layer's intrinsic dimension (ID-PLATON)")
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of MLP neurons removed (global ranking)")
    prune_heads: bool = Field(True, description="torch_pruning: also remove whole attention heads (>= 1 per attention)")
    head_sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of heads removed (default: sparsity, capped)")
    max_layer_sparsity: float = Field(0.9, gt=0.0, le=1.0, description="nni: most any one MLP loses")
    steps: int = Field(60, ge=2, description="training steps")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    iterative_steps: int = Field(4, ge=1, description="torch_pruning: pruning steps on the cubic schedule")
    warmup_steps: int = Field(10, ge=0, description="PLATON warm-up unit (dense steps = warmup_steps * initial_warmup)")
    initial_warmup: float = Field(1.0, ge=0.0)
    final_warmup: float = Field(1.0, ge=0.0)
    beta1: float = Field(0.85, gt=0.0, lt=1.0)
    beta2: float = Field(0.95, gt=0.0, le=1.0)
    delta_t: int = Field(5, ge=1, description="PLATON window (steps)")
    profile_samples: int = Field(128, ge=8, description="ID samples when no calibrate stage ran before")


def prune_id_platon(ctx: RecipeContext, params: IDPlatonParams) -> dict[str, Any]:
    """Train ``ctx.model`` while pruning it with (ID-)PLATON on the cubic schedule.

    ``torch_pruning``: :class:`~vlprune.adapters.torch_pruning.PlatonImportance` (wrapped by
    ``IDWeightedImportance`` and ``KeepHeads``) in a ``BasePruner`` with ``cubic_scheduler``;
    ``platon.step(pruner)`` at :func:`~vlprune.adapters.torch_pruning.pruning_steps`. ``nni``:
    :class:`~vlprune.adapters.nni.PlatonPruner` on the MLPs' first linears (out-channel rows, one
    fenced global ranking, ``max_layer_sparsity`` per MLP) under a ``TorchEvaluator``, then
    :func:`~vlprune.adapters.nni.shrink`.

    Args:
        ctx: the recipe context (``ctx.model`` is pruned in place).
        params: :class:`IDPlatonParams`.

    Returns:
        ``params_before`` / ``params_after``, ``widths`` (kept MLP widths), ``heads``, the
        schedule, the training loss and the framework.

    Example:
        >>> prune_id_platon(ctx, IDPlatonParams(steps=20))     # doctest: +SKIP
    """
    _seed(ctx)
    before = _structure(ctx.model)
    profile = _profile(ctx, params.profile_samples) if params.id_weighted else None
    dense = int(round(params.warmup_steps * params.initial_warmup))
    final = int(round(params.warmup_steps * params.final_warmup))
    if dense + final >= params.steps:
        raise VLPruneError(
            f"steps={params.steps} leaves no cubic phase after {dense} dense and {final} final steps "
            "(warmup_steps * initial_warmup, warmup_steps * final_warmup): raise steps or lower warmup_steps"
        )
    train = ctx.data.training(params.steps * params.batch_size, labels=True, batch_size=params.batch_size)
    if ctx.framework == "nni":
        summary = _platon_nni(ctx, params, profile, train, dense, final)
    else:
        summary = _platon_tp(ctx, params, profile, train)
    after = _structure(ctx.model)
    return {
        "framework": ctx.framework,
        "criterion": ("id_" if params.id_weighted else "") + "platon",
        "params_before": before["params"],
        "params_after": after["params"],
        "widths_before": before["widths"],
        "widths": after["widths"],
        "heads_before": before["heads"],
        "heads": after["heads"],
        **summary,
    }


def _platon_tp(ctx: RecipeContext, params: IDPlatonParams, profile: Any, train: list[Batch]) -> dict[str, Any]:
    import torch_pruning as tp

    import vlprune
    from vlprune.adapters.torch_pruning import (
        IDWeightedImportance,
        KeepHeads,
        KeepNeurons,
        PlatonImportance,
        cubic_scheduler,
        hf_pruner_kwargs,
        pruning_steps,
    )
    from vlprune.adapters.hf.families import describe

    model = ctx.model
    platon = PlatonImportance(beta1=params.beta1, beta2=params.beta2, delta_t=params.delta_t)
    kw = hf_pruner_kwargs(model, prune_heads=params.prune_heads)
    imp: Any = IDWeightedImportance(platon, profile) if profile is not None else platon
    firsts = [p for m in describe(model).mlps for p in (m.up, m.gate) if p]
    imp = KeepNeurons(imp, [model.get_submodule(p) for p in firsts])  # no MLP is emptied (tp would skip it)
    head_ratio = 0.0
    if params.prune_heads and kw["num_heads"]:
        imp = KeepHeads(imp, kw["num_heads"])
        head_ratio = min(params.sparsity if params.head_sparsity is None else params.head_sparsity, imp.max_ratio)
    pruner = tp.pruner.BasePruner(
        model, ctx.data.example_inputs(), importance=imp, pruning_ratio=params.sparsity,
        head_pruning_ratio=head_ratio, iterative_steps=params.iterative_steps,
        iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True, **kw,
    )
    prune_at = pruning_steps(params.steps, params.iterative_steps, warmup_steps=params.warmup_steps,
                             initial_warmup=params.initial_warmup, final_warmup=params.final_warmup)
    # a pruning step needs one closed PLATON window behind it, and happens inside the loop
    prune_at = [min(max(s, params.delta_t - 1), params.steps - 1) for s in prune_at]
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr)
    losses: list[float] = []
    done: list[int] = []
    model.train()
    try:
        for step in tqdm(range(params.steps), desc="ID-PLATON" if profile is not None else "PLATON",
                         disable=not ctx.progress, leave=False):
            loss = model(**train[step]).loss
            loss.backward()
            platon.update(model)
            while len(done) < len(prune_at) and step >= prune_at[len(done)]:
                platon.step(pruner)
                vlprune.sync_hf_model(model, pruner=pruner)
                optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr)  # tp replaced the parameters
                done.append(step + 1)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    return {"pruned_at_steps": done, "head_sparsity": head_ratio, **_loss_summary(losses)}


def _platon_nni(ctx: RecipeContext, params: IDPlatonParams, profile: Any, train: list[Batch],
                dense: int, final: int) -> dict[str, Any]:
    from vlprune.adapters.hf.families import describe
    from vlprune.adapters.nni import PlatonPruner

    model = ctx.model
    ups = [m.up for m in describe(model).mlps]
    if not ups:
        raise ModelStructureError(f"{type(model).__name__} has no MLP vlprune recognises; nothing for PLATON to prune")
    config = [{"op_names": ups, "sparse_ratio": params.sparsity, "granularity": "out_channel",
               "global_group_id": "mlps", "max_sparse_ratio": params.max_layer_sparsity}]
    trainer = _Trainer(train, params.lr, ctx.progress, "ID-PLATON (nni)" if profile is not None else "PLATON (nni)")
    cooldown = params.steps - final
    pruner = PlatonPruner(model, config, trainer.evaluator(model), warmup_step=dense, cooldown_begin_step=cooldown,
                          beta1=params.beta1, beta2=params.beta2, delta_t=params.delta_t,
                          profile=profile)
    try:
        _, masks = pruner.compress(max_steps=params.steps, max_epochs=None)
        masks = _nni_masks(masks)
    finally:
        pruner.unwrap_model()
    return {"warmup_step": dense, "cooldown_begin_step": cooldown, **_shrink(ctx, masks),
            **_loss_summary(trainer.losses)}


# ---------------------------------------------------------------------------------------------
# AMP: entropy importance + width search
# ---------------------------------------------------------------------------------------------


class AMPParams(_Params):
    """Parameters of ``prune_amp`` (README "AMP"; :mod:`vlprune.plugins.amp`)."""

    criterion: Literal["amp_entropy"] = Field("amp_entropy", description="AMP's label-free entropy Taylor importance")
    delta_e: float = Field(1e-2, ge=0.0, description="largest accepted objective change per MLP in the width search")
    tau: float = Field(1 / 15, gt=0.0, description="softmax temperature of the objective (the paper: 1/15 to 1/20)")
    rule: Literal["rise", "change"] | None = Field(None, description="search rule (None: per model, amp.default_rule)")
    n_samples: int = Field(256, ge=2, description="training images scored for the importance")
    held_out_samples: int = Field(128, ge=2, description="calibration images the search evaluates")
    batch_size: int = Field(64, ge=2, description="images per batch (the objective is over a batch)")
    halvings: int = Field(6, ge=1, description="binary-search steps per MLP")
    min_keep: int = Field(1, ge=1, description="neurons every MLP keeps at least")


def prune_amp(ctx: RecipeContext, params: AMPParams) -> dict[str, Any]:
    """AMP on ``ctx.model``: neuron importance of every MLP reaching the image objective, the
    per-MLP width search, then the neurons removed.

    ``torch_pruning``: :class:`~vlprune.adapters.torch_pruning.AMPEntropyImportance` with
    :func:`~vlprune.adapters.torch_pruning.amp_ratio_dict` in one local ``BasePruner`` step;
    ``nni``: :class:`~vlprune.adapters.nni.AMPPruner` masks, then :func:`~vlprune.adapters.nni.shrink`.
    Both remove exactly the searched neurons. If pruning fails the model is left as it was.

    Args:
        ctx: the recipe context (``ctx.model`` is pruned in place).
        params: :class:`AMPParams`.

    Returns:
        ``widths_searched`` (MLP -> kept neurons), ``widths`` / ``widths_before`` (every MLP),
        ``params_before`` / ``params_after``, ``search`` (number of evaluations), the rule used.

    Example:
        >>> prune_amp(ctx, AMPParams(delta_e=1e-2))     # doctest: +SKIP
    """
    from vlprune.plugins import amp

    _seed(ctx)
    model = ctx.model
    before = _structure(model)
    images = _images_only(ctx.data.training(params.n_samples, labels=False, batch_size=params.batch_size))
    held = _images_only(ctx.data.calibration(params.held_out_samples, batch_size=params.batch_size))
    rule = params.rule or amp.default_rule(model, held[0])
    log: list[dict[str, Any]] = []
    if ctx.framework == "nni":
        from vlprune.adapters.nni import AMPPruner

        pruner = AMPPruner(model, images, params.delta_e, tau=params.tau, rule=rule, held_out=held,
                           halvings=params.halvings, min_keep=params.min_keep, progress=ctx.progress)
        widths = dict(pruner.widths or {})
        log = pruner.search_log
        try:
            _, masks = pruner.compress()
            masks = _nni_masks(masks)
        finally:
            pruner.unwrap_model()
        extra = _shrink(ctx, masks) if masks else {"shrink": "nothing masked"}
    else:
        import torch_pruning as tp

        import vlprune
        from vlprune.adapters.hf.undo import restore_on_failure
        from vlprune.adapters.torch_pruning import AMPEntropyImportance, amp_ratio_dict, hf_pruner_kwargs

        scores = amp.neuron_importance(model, images, tau=params.tau, progress=ctx.progress)
        widths = amp.search_widths(model, scores, held, params.delta_e, params.tau, halvings=params.halvings,
                                   min_keep=params.min_keep, rule=rule, progress=ctx.progress, log=log)
        ratios = amp_ratio_dict(model, widths)
        if ratios:
            with restore_on_failure(model):
                pruner = tp.pruner.BasePruner(
                    model, ctx.data.example_inputs(), importance=AMPEntropyImportance(scores, model),
                    pruning_ratio=0.0, pruning_ratio_dict=ratios, global_pruning=False,
                    **hf_pruner_kwargs(model, prune_heads=False),
                )
                pruner.step()
                vlprune.sync_hf_model(model, pruner=pruner)
        extra = {}
    after = _structure(model)
    wrong = {n: (after["widths"].get(n), k) for n, k in widths.items() if after["widths"].get(n) != k}
    if wrong:
        raise VLPruneError(f"AMP: the pruned widths differ from the searched ones ({wrong}); please report this")
    return {
        "framework": ctx.framework,
        "criterion": params.criterion,
        "rule": rule,
        "delta_e": params.delta_e,
        "widths_searched": widths,
        "params_before": before["params"],
        "params_after": after["params"],
        "widths_before": before["widths"],
        "widths": after["widths"],
        "search_evaluations": len(log),
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# layer dropping
# ---------------------------------------------------------------------------------------------

class LayerDropParams(_Params):
    """Parameters of ``drop_layers`` (README "Depth"): which decoder layers go and how they are ranked.

    Framework ``torch_pruning`` removes the layers with :func:`vlprune.remove_layers` (the
    transformers-level route: the criteria's ``hf_layers`` adapter, which combines with Torch-Pruning
    width pruning); ``nni`` masks them with :class:`~vlprune.adapters.nni.LayerSimilarityPruner` and
    shrinks. The criterion is checked against that adapter (``vlprune.check_pairing``) when the
    recipe is validated.
    """

    criterion: Literal["layer_similarity", "block_influence", "angular_distance"] = Field(
        "layer_similarity", validate_default=True,
        description="domain-aware similarity (Khaki et al.), ShortGPT block influence, or Gromov's angular distance",
    )
    n_layers: int | float = Field(0.25, gt=0, description="layers removed: a count, or a fraction (< 1) of the decoder layers")
    strategy: Literal["rank", "spacing", "consecutive", "regime"] = Field("regime", description="select_layers strategy")
    domain: str = Field("mixed", description="ranking domain: one of domains, or mixed (alpha * math + (1 - alpha) * rest)")
    domains: list[str] = Field(["math", "general"], min_length=1, description="calibration domains (testbed LLaVA tasks)")
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    n_samples: int = Field(64, ge=1, description="calibration samples per domain")
    batch_size: int | None = Field(None, ge=1)
    tokens: Literal["all", "last"] = "all"
    protect_first: int = Field(1, ge=0)
    protect_last: int = Field(1, ge=0)

    @field_validator("criterion")
    @classmethod
    def _pairing(cls, value: str) -> str:
        from vlprune.plugins.registry import check_pairing

        check_pairing(value, cls.framework_adapter)
        return value

    framework_adapter: ClassVar[str] = "hf_layers"


class LayerDropNNIParams(LayerDropParams):
    """``drop_layers`` under ``framework: nni`` (the criterion must have the ``nni`` adapter)."""

    framework_adapter: ClassVar[str] = "nni"


def _n_drop(n_layers: int | float, total: int) -> int:
    if isinstance(n_layers, float) and n_layers < 1:
        return max(1, int(round(n_layers * total)))
    if isinstance(n_layers, float) and not n_layers.is_integer():
        raise VLPruneError(f"n_layers must be a count or a fraction below 1, got {n_layers}")
    return int(n_layers)


def drop_layers(ctx: RecipeContext, params: LayerDropParams) -> dict[str, Any]:
    """Rank ``ctx.model``'s decoder layers and remove ``n_layers`` of them.

    Testbed LLaVA data gives one calibration set per ``domains`` entry (the paper's math vs
    general); user data has no domains and is one domain named ``data`` (``domain`` then ranks by
    it). ``layer_similarity`` uses ``domain`` / ``alpha`` / ``strategy``; ``block_influence`` ranks
    on all the calibration data; ``angular_distance`` removes the best run of consecutive layers.

    Args:
        ctx: the recipe context (``ctx.model`` loses layers in place).
        params: :class:`LayerDropParams`.

    Returns:
        ``layers_before`` / ``layers_after``, ``removed`` (indices), the per-domain ``scores``,
        ``params_before`` / ``params_after``.

    Example:
        >>> drop_layers(ctx, LayerDropParams(n_layers=2, strategy="spacing"))     # doctest: +SKIP
    """
    import vlprune
    from vlprune.plugins import layer_similarity as ls
    from vlprune.plugins.layer_selection import select_layers, select_run

    model = ctx.model
    names = ls.decoder_layers(model)
    before = _structure(model)
    k = _n_drop(params.n_layers, len(names))
    select_kw = dict(protect_first=params.protect_first, protect_last=params.protect_last)
    domain = params.domain
    if ctx.testbed is not None:
        data = {d: ctx.data.domain(d, params.n_samples, params.batch_size) for d in params.domains}
    else:
        logger.info("drop_layers: user data has no domains; ranking on it as one domain 'data'")
        data = {"data": ctx.data.calibration(params.n_samples, params.batch_size)}
        domain = "data"
    if params.criterion == "layer_similarity" and domain not in data and domain != "mixed":
        raise DataError(f"drop_layers.domain {domain!r} is none of the calibration domains {list(data)} (or 'mixed')")
    if domain == "mixed" and "math" not in data:
        raise DataError(f"drop_layers.domain 'mixed' needs a 'math' domain among drop_layers.domains (got {list(data)})")
    scores: dict[str, list[float]] = {}
    if ctx.framework == "nni":
        from vlprune.adapters.nni import LayerSimilarityPruner

        pruner = LayerSimilarityPruner(model, data, k, params.strategy, domain, alpha=params.alpha,
                                       tokens=params.tokens, progress=ctx.progress, **select_kw)
        removed = list(pruner.chosen)
        scores = {d: [float(x) for x in s] for d, s in pruner.scores.items()}
        try:
            _, masks = pruner.compress()
            masks = _nni_masks(masks)
        finally:
            pruner.unwrap_model()
        extra = _shrink(ctx, masks)
    else:
        every = [b for batches in data.values() for b in batches]
        if params.criterion == "layer_similarity":
            per_domain = ls.domain_similarity(model, data, params.tokens, progress=ctx.progress)
            scores = {d: [float(x) for x in s] for d, s in per_domain.items()}
            profile = ls.combine_domains(per_domain, domain, params.alpha)
            removed = select_layers(profile, k, params.strategy, **select_kw)
        elif params.criterion == "block_influence":
            bi = ls.block_influence(model, every, progress=ctx.progress)
            scores = {"block_influence": [float(x) for x in bi]}
            removed = select_layers(bi, k, params.strategy, higher_is_removable=False, **select_kw)
        else:
            dist = ls.angular_distance(model, every, n=k, progress=ctx.progress)
            scores = {"angular_distance": [float(x) for x in dist]}
            removed = select_run(dist, k, **select_kw)
        vlprune.remove_layers(model, list(removed), **select_kw)
        extra = {}
    after = _structure(model)
    return {
        "framework": ctx.framework,
        "criterion": params.criterion,
        "domain": domain,
        "strategy": params.strategy,
        "layers_before": len(names),
        "layers_after": after["decoder_layers"],
        "removed": [int(i) for i in removed],
        "removed_names": [names[i] for i in removed],
        "scores": scores,
        "params_before": before["params"],
        "params_after": after["params"],
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# visual tokens at inference (DivPrune, FastV, ...)
# ---------------------------------------------------------------------------------------------


class TokenPruneParams(_Params):
    """Parameters of ``prune_tokens`` (README "Visual tokens").

    DivPrune's paper keeps 0.098 of LLaVA-1.5's 576 tokens; the testbed LLaVA has 16 visual
    tokens per image, where 0.098 would keep 2, so the recipe's default keeps half.
    """

    method: str = Field("divprune", validate_default=True,
                        description="token criterion (registry name, hf_tokens adapter): divprune, fastv, random_tokens, uniform_tokens")
    keep: float | int = Field(0.5, gt=0, description="kept visual tokens: a ratio in (0, 1] or a count")
    positions: Literal["original", "contiguous"] = "original"
    layer: int | None = Field(None, ge=1, description="fastv: the layer K tokens are dropped from")
    tasks: list[Literal["vqa", "caption"]] | None = Field(None, description="testbed tasks (default vqa + caption)")
    n: int = Field(100, ge=1, description="testbed scenes per task")
    split: Literal["val", "test"] = "test"
    agreement_samples: int = Field(64, ge=1, description="user data: held-out samples for the agreement")
    repeats: int = Field(3, ge=1, description="timed rounds of the latency measurement (best kept)")
    max_new_tokens: int = Field(8, ge=1, description="generated tokens of the end-to-end latency")

    @field_validator("method")
    @classmethod
    def _pairing(cls, value: str) -> str:
        from vlprune.plugins.registry import check_pairing

        check_pairing(value, "hf_tokens")
        return value


def _token_kwargs(params: TokenPruneParams) -> dict[str, Any]:
    kw: dict[str, Any] = {"method": params.method, "keep": params.keep, "positions": params.positions}
    if params.layer is not None:
        kw["layer"] = params.layer
    return kw


def prune_tokens(ctx: RecipeContext, params: TokenPruneParams) -> dict[str, Any]:
    """Evaluate ``ctx.model`` with its visual tokens pruned at inference, against itself unpruned.

    The weights never change, so nothing needs saving: the step writes ``token_pruning.json``
    (``vlprune.prune_visual_tokens(model, **json.load(f))`` re-applies it) and the metrics. On the
    testbed, the task metrics without (``before``) and with (``after``) token pruning; on user data,
    the teacher-student agreement of the pruned-token model with the unpruned one. Also the
    language model's prefill FLOPs and the measured prefill / generate latency, unpruned and pruned
    side by side (:func:`vlprune.adapters.hf.token_cost.measure_token_pruning`).

    Args:
        ctx: the recipe context (``ctx.model`` is left as it was).
        params: :class:`TokenPruneParams`.

    Returns:
        ``{"kind", "metrics": {"before", "after"}, "tokens": FLOPs / latency, "token_config": path}``.

    Example:
        >>> prune_tokens(ctx, TokenPruneParams(keep=0.25))      # doctest: +SKIP
    """
    import json

    import vlprune
    from vlprune.adapters.hf.token_cost import measure_token_pruning
    from vlprune.recipes.steps_core import agreement
    from vlprune.testbed import evaluate as tb_evaluate

    assert ctx.stage_dir is not None
    model = ctx.model
    kw = _token_kwargs(params)
    if params.method == "fastv" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # FastV reads attention weights
    # attach once first: a model the method cannot handle fails here, before any evaluation
    vlprune.prune_visual_tokens(model, **kw).detach()
    if ctx.testbed is not None:
        tasks = list(params.tasks or ["vqa", "caption"])
        before: dict[str, float] = {}
        after: dict[str, float] = {}
        for task in tasks:
            for name, value in tb_evaluate(model, task, params.split, n=params.n).items():
                before[f"{task}/{name}"] = float(value)
            with vlprune.prune_visual_tokens(model, **kw):
                for name, value in tb_evaluate(model, task, params.split, n=params.n).items():
                    after[f"{task}/{name}"] = float(value)
        result: dict[str, Any] = {"kind": "testbed", "tasks": tasks, "metrics": {"before": before, "after": after}}
    else:
        batches = ctx.data.evaluation(params.agreement_samples)
        with vlprune.prune_visual_tokens(model, **kw):
            after = agreement(model, ctx.teacher, batches)
        result = {"kind": "agreement", "metrics": {"before": {k: 1.0 for k in after}, "after": after}}
    batch = {k: v for k, v in ctx.data.example_inputs().items() if k not in ("labels", "return_loss")}
    stats = measure_token_pruning(model, batch, params.method, params.keep, positions=params.positions,
                                  max_new_tokens=params.max_new_tokens, repeats=params.repeats,
                                  **({"layer": params.layer} if params.layer is not None else {}))
    config = ctx.stage_dir / "token_pruning.json"
    config.write_text(json.dumps(kw, indent=2))
    return {**result, "framework": ctx.framework, "method": params.method, "keep": params.keep,
            "tokens": {k: float(v) for k, v in stats.items()}, "token_config": ctx.relpath(config)}


# ---------------------------------------------------------------------------------------------
# ID-weighted Taylor / L1 with NNI (the nni variant of core's prune_id_taylor)
# ---------------------------------------------------------------------------------------------


class IDTaylorNNIParams(PruneIDTaylorParams):
    """``prune_id_taylor`` under ``framework: nni``: the same keys as the Torch-Pruning step, plus
    ``max_layer_ratio`` and ``lr``. NNI prunes MLP neurons (rows of the first linears, one fenced
    global ranking when ``global_pruning``, every MLP keeping at least one neuron); ``prune_heads``,
    ``head_ratio``, ``normalize``, ``group_id``, ``min_heads`` and ``min_neurons`` are Torch-Pruning's
    and not applied here (heads: logged)."""

    max_layer_ratio: float = Field(0.9, gt=0.0, le=1.0, description="most any one MLP loses under the global ranking")
    lr: float = Field(0.0, ge=0.0, description="lr of the NNI loop collecting Taylor gradients (0: weights unchanged, as with torch_pruning)")

    @field_validator("base")
    @classmethod
    def _nni_base(cls, value: str) -> str:
        if value not in ("taylor", "magnitude"):
            raise ValueError(f"with framework nni the base is NNI's metric: 'taylor' or 'magnitude' (L1), got {value!r}")
        return value


def prune_id_taylor_nni(ctx: RecipeContext, params: IDTaylorNNIParams) -> dict[str, Any]:
    """ID-weighted Taylor (or L1) on MLP neurons as NNI masks (:class:`~vlprune.adapters.nni.IDWeightedPruner`),
    made a smaller model by :func:`~vlprune.adapters.nni.shrink`.

    Args:
        ctx: the recipe context (``ctx.model`` is pruned in place).
        params: :class:`IDTaylorNNIParams`.

    Returns:
        ``params_before`` / ``params_after``, ``widths`` (core's ``model_widths`` form), shrink's summary.

    Example:
        >>> prune_id_taylor_nni(ctx, IDTaylorNNIParams(ratio=0.3))      # doctest: +SKIP
    """
    from vlprune.adapters.hf.families import describe
    from vlprune.adapters.nni import IDWeightedPruner
    from vlprune.recipes.steps_core import model_widths

    _seed(ctx)
    model = ctx.model
    if not params.prune_mlp:
        raise VLPruneError("prune_id_taylor with framework nni prunes MLP neurons: prune_mlp must stay true")
    if params.prune_heads:
        logger.info("prune_id_taylor (nni): heads are not pruned with NNI here, only MLP neurons")
    mlps = [m for m in describe(model).mlps if not params.modalities or m.modality in params.modalities]
    if not mlps:
        raise ModelStructureError(f"no MLP of {type(model).__name__} in modalities {params.modalities}")
    ups = [m.up for m in mlps]
    profile = _profile(ctx, 64)
    config: dict[str, Any] = {"op_names": ups, "sparse_ratio": params.ratio, "granularity": "out_channel"}
    if params.global_pruning:
        config.update(global_group_id="mlps", max_sparse_ratio=params.max_layer_ratio)
    before = param_count(model)
    if params.base == "taylor":
        batch_size = ctx.data.batch_size
        train = ctx.data.training(params.grad_samples, labels=True, batch_size=batch_size)
        trainer = _Trainer(train, params.lr, ctx.progress, "Taylor gradients (nni)")
        pruner = IDWeightedPruner(model, [config], profile, base="taylor",
                                  evaluator=trainer.evaluator(model), training_steps=len(train))
    else:
        pruner = IDWeightedPruner(model, [config], profile, base="l1")
    try:
        _, masks = pruner.compress()
        masks = _nni_masks(masks)
    finally:
        pruner.unwrap_model()
        model.zero_grad(set_to_none=True)
    extra = _shrink(ctx, masks)
    return {"framework": "nni", "params_before": before, "params_after": param_count(model),
            "widths": model_widths(model), **extra}


@hookimpl
def vlprune_register_steps() -> list[StepSpec]:
    """Register the method steps."""
    return [
        StepSpec("prune_id_platon", prune_id_platon, IDPlatonParams,
                 "ID-PLATON while training, cubic schedule (MLP neurons + heads; nni: MLP neurons + shrink)",
                 frameworks=("torch_pruning", "nni"), criterion_params=("criterion",)),
        StepSpec("prune_amp", prune_amp, AMPParams, "AMP entropy importance + per-MLP width search",
                 frameworks=("torch_pruning", "nni"), criterion_params=("criterion",)),
        StepSpec("drop_layers", drop_layers, LayerDropParams,
                 "domain-aware decoder-layer ranking + removal (vlprune.remove_layers)", frameworks=("torch_pruning",)),
        StepSpec("drop_layers_nni", drop_layers, LayerDropNNIParams,
                 "drop_layers with NNI's LayerSimilarityPruner + shrink", frameworks=("nni",)),
        StepSpec("prune_tokens", prune_tokens, TokenPruneParams,
                 "visual-token pruning at inference, evaluated before/after with FLOPs and latency",
                 frameworks=("torch_pruning",), changes_model=False),
        StepSpec("prune_id_taylor_nni", prune_id_taylor_nni, IDTaylorNNIParams,
                 "prune_id_taylor with NNI's IDWeightedPruner (taylor / l1) + shrink", frameworks=("nni",)),
    ]
