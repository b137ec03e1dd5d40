"""Training-aware pruning: a small fine-tuning loop that prunes on a schedule while it trains.

:func:`train_loop` runs AdamW (warm-up + cosine learning rate, gradient clipping) on
``batches(step)`` and calls its callbacks after every backward pass. Two callbacks implement the
two settings of the ID paper's experiments:

* :class:`GlobalUnstructuredPruning`: weight masks by one global threshold over all chosen linear
  weights of every modality, on PLATON's cubic schedule; the score is PLATON, magnitude, Taylor or
  random, each optionally multiplied by its layer's intrinsic dimension (ID-PLATON etc.). Optional
  per-modality sparsities (asymmetric budgets) replace the single global threshold by one
  threshold per modality.
* :class:`StructuredPruning`: a Torch-Pruning ``BasePruner`` (MLP neurons and attention heads of a
  transformers model) stepped at :func:`~vlprune.adapters.torch_pruning.pruning_steps` with the
  cubic ratio scheduler; any tp importance (``PlatonImportance``, ``IDWeightedImportance`` ...).

Both are used the same way; the loop prunes while training and keeps training (fine-tuning) after
the final ratio is reached (``final_warmup``).

Example:
    >>> from vlprune.recipes.finetune import GlobalUnstructuredPruning, train_loop   # doctest: +SKIP
    >>> cb = GlobalUnstructuredPruning(names, "platon", total_steps=150, final_sparsity=0.6,
    ...                                ids=profile.ids(), warmup_steps=10)            # doctest: +SKIP
    >>> train_loop(model, batches, steps=150, lr=2e-4, callbacks=[cb])               # doctest: +SKIP
    >>> cb.finish(model)                                                             # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import VLPruneError
from vlprune.plugins.platon import Platon, cubic_schedule

__all__ = ["Callback", "cosine_lr", "train_loop", "GlobalUnstructuredPruning", "StructuredPruning", "SCORES"]

logger = logging.getLogger(__name__)

#: weight-level scores of :class:`GlobalUnstructuredPruning`
SCORES: tuple[str, ...] = ("platon", "magnitude", "taylor", "random")


class Callback(Protocol):
    """Called by :func:`train_loop` after each ``loss.backward()``, before the optimizer step."""

    def after_backward(self, step: int, model: nn.Module) -> bool:
        """Return True when the model's parameters were replaced (the optimizer is rebuilt)."""
        ...


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up over ``warmup`` steps to ``peak``, then
    cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(
    model: nn.Module,
    batches: Callable[[int], Mapping[str, torch.Tensor]],
    steps: int,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int = 0,
    clip_grad: float | None = 1.0,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    log_every: int = 10,
    start_step: int = 0,
    optimizer_state: Mapping[str, Any] | None = None,
    after_step: Callable[[int, torch.optim.Optimizer, dict[str, Any]], None] | None = None,
    desc: str = "fine-tune",
) -> dict[str, Any]:
    """Fine-tune ``model`` for ``steps`` steps, calling ``callbacks`` after every backward.

    Args:
        model: any ``nn.Module`` (trained in place; left in eval mode).
        batches: ``batches(step)`` -> the keyword inputs of one step.
        steps: number of optimizer steps.
        lr / weight_decay / warmup: AdamW with linear warm-up and cosine decay to 0.
        clip_grad: max gradient norm (None: no clipping).
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss; default ``model(**batch).loss``.
        callbacks: objects with ``after_backward(step, model) -> bool``; when one returns True
            (parameters replaced, e.g. structured pruning) the optimizer is rebuilt.
        progress: show a tqdm bar.
        log_every: record the loss every this many steps.
        start_step: resume at this step (the schedule continues from there).
        optimizer_state: an AdamW ``state_dict()`` to resume from.
        after_step: ``after_step(step, optimizer, log)`` after each optimizer step (checkpoints).
        desc: progress-bar label.

    Returns:
        ``{"loss": [[step, loss], ...], "seconds": wall time}``.
    """
    if steps < 1:
        raise VLPruneError(f"steps must be >= 1, got {steps}")
    if not 0 <= start_step <= steps:
        raise VLPruneError(f"start_step must be in [0, {steps}], got {start_step}")

    def make_optimizer() -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise VLPruneError("the model has no trainable parameters")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    optimizer = make_optimizer()
    if optimizer_state is not None:
        optimizer.load_state_dict(dict(optimizer_state))
    log: dict[str, Any] = {"loss": []}
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(start_step, steps), desc=desc, disable=not progress, leave=False,
                     initial=start_step, total=steps):
        batch = batches(step)
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        if loss is None or not torch.is_tensor(loss) or loss.dim() != 0:
            raise VLPruneError("the loss must be a scalar tensor (pass loss_fn, or batches with labels)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        replaced = False
        for callback in callbacks:
            replaced = bool(callback.after_backward(step, model)) or replaced
        if replaced:
            optimizer = make_optimizer()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, warmup, lr)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            value = float(loss.detach())
            log["loss"].append([step, round(value, 5)])
            logger.debug("step %d loss %.4f", step, value)
        if after_step is not None:
            after_step(step, optimizer, log)
    model.eval()
    log["seconds"] = round(time.perf_counter() - start, 2)
    return log


class GlobalUnstructuredPruning:
    """Unstructured pruning on PLATON's cubic schedule with one global threshold (per modality
    when ``modality_sparsity`` is given).

    Args:
        names: weight names to prune (e.g. ``"model.language_model.layers.0.mlp.up_proj.weight"``).
        score: ``"platon"``, ``"magnitude"``, ``"taylor"`` or ``"random"``.
        total_steps: training steps of the loop.
        final_sparsity: fraction of the chosen weights removed at the end, in [0, 1).
        ids: module name -> intrinsic dimension; when given, scores are multiplied by their
            layer's raw ID (ID-PLATON, ID-magnitude ...).
        modality_sparsity: optional ``{modality: sparsity}`` with ``modality_of`` (module name ->
            modality): one threshold per modality instead of one global threshold.
        modality_of: module name -> modality, required with ``modality_sparsity``.
        warmup_steps / initial_warmup / final_warmup / delta_t: the cubic schedule
            (:func:`vlprune.plugins.platon.cubic_schedule`); masks update every ``delta_t`` steps
            during the cubic phase and every step at the final sparsity.
        beta1 / beta2: PLATON's EMA factors.
        min_keep: weights every tensor keeps (count, or fraction of the tensor).
        seed: seed of the ``"random"`` score.
    """

    def __init__(
        self,
        names: Sequence[str],
        score: str,
        total_steps: int,
        final_sparsity: float,
        *,
        ids: Mapping[str, float] | None = None,
        modality_sparsity: Mapping[str, float] | None = None,
        modality_of: Mapping[str, str] | None = None,
        warmup_steps: int = 10,
        initial_warmup: float = 1.0,
        final_warmup: float = 5.0,
        delta_t: int = 10,
        beta1: float = 0.85,
        beta2: float = 0.95,
        min_keep: int | float = 0.01,
        seed: int = 0,
    ) -> None:
        if score not in SCORES:
            raise VLPruneError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
        if not names:
            raise VLPruneError("no weights to prune: pass the names of the weights (e.g. every decoder Linear's .weight)")
        if not 0.0 <= final_sparsity < 1.0:
            raise VLPruneError(f"final_sparsity must be in [0, 1), got {final_sparsity!r}")
        cubic_schedule(0, total_steps, 1.0, 1.0 - final_sparsity, warmup_steps, initial_warmup, final_warmup, delta_t)
        self.names = [n if n.endswith(".weight") else f"{n}.weight" for n in names]
        self.score = score
        self.ids = dict(ids) if ids is not None else None
        if self.ids is not None:
            missing = [n for n in self.names if n.removesuffix(".weight") not in self.ids]
            if missing:
                raise VLPruneError(f"no intrinsic dimension for {len(missing)} pruned layer(s), e.g. {missing[:3]}")
        self.groups: dict[str, tuple[list[str], float]] = {"all": (self.names, final_sparsity)}
        if modality_sparsity is not None:
            if modality_of is None:
                raise VLPruneError("modality_sparsity needs modality_of (module name -> modality)")
            groups: dict[str, list[str]] = {}
            for name in self.names:
                modality = modality_of.get(name.removesuffix(".weight"))
                if modality not in modality_sparsity:
                    raise VLPruneError(f"no sparsity for the modality {modality!r} of {name!r}; budgets: {dict(modality_sparsity)}")
                groups.setdefault(modality, []).append(name)
            for modality, value in modality_sparsity.items():
                if not 0.0 <= value < 1.0:
                    raise VLPruneError(f"sparsity of {modality!r} must be in [0, 1), got {value!r}")
            self.groups = {m: (ns, float(modality_sparsity[m])) for m, ns in groups.items()}
        self.schedule = dict(
            total_steps=total_steps, initial_ratio=1.0, warmup_steps=warmup_steps,
            initial_warmup=initial_warmup, final_warmup=final_warmup, delta_t=delta_t,
        )
        self.final_sparsity = final_sparsity
        self.min_keep = min_keep
        self.generator = torch.Generator().manual_seed(seed)
        wanted = set(self.names)
        self.platon = (
            Platon(beta1=beta1, beta2=beta2, delta_t=delta_t, include=lambda n: n in wanted) if score == "platon" else None
        )
        self.mask_updates = 0

    def _sparsity(self, step: int, final: float) -> tuple[float, bool]:
        remaining, update = cubic_schedule(step, final_ratio=1.0 - final, **self.schedule)  # type: ignore[arg-type]
        return 1.0 - remaining, update

    def _scores(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        from vlprune.plugins.unstructured import weight_scores

        if self.platon is None:
            kwargs: dict[str, Any] = {"generator": self.generator} if self.score == "random" else {}
            return weight_scores(model, names, kind=self.score, ids=self.ids, **kwargs)
        from vlprune.plugins.id_weighted import id_weight

        scores = self.platon.scores(names)
        if self.ids is not None:
            scores = {n: id_weight(s, self.ids[n.removesuffix(".weight")]) for n, s in scores.items()}
        return scores

    @torch.no_grad()
    def after_backward(self, step: int, model: nn.Module) -> bool:
        """Update PLATON; on a mask step, recompute and apply the masks."""
        from vlprune.plugins.unstructured import apply_masks, global_masks

        if self.platon is not None:
            self.platon.update(model.named_parameters())
        _, update = self._sparsity(step, self.final_sparsity)
        if not update:
            return False
        if self.platon is not None and not all(n in self.platon.ibar for n in self.names):
            logger.info("step %d: PLATON has no score yet (first window open); masks unchanged", step)
            return False
        masks: dict[str, torch.Tensor] = {}
        for names, final in self.groups.values():
            sparsity, _ = self._sparsity(step, final)
            if sparsity <= 0.0:
                continue
            masks.update(global_masks(self._scores(model, names), sparsity, min_keep=self.min_keep))
        if masks:
            apply_masks(model, masks)
            self.mask_updates += 1
        return False

    def finish(self, model: nn.Module) -> dict[str, float]:
        """Make the masks permanent (plain weights with zeros); returns the sparsity report."""
        from vlprune.plugins.unstructured import make_permanent, sparsity_report

        make_permanent(model)
        return sparsity_report(model, self.names)


class StructuredPruning:
    """Torch-Pruning's ``BasePruner`` stepped on PLATON's cubic schedule during training.

    Args:
        pruner: a ``tp.pruner.BasePruner`` built with ``iterative_steps`` and
            ``iterative_pruning_ratio_scheduler=cubic_scheduler``.
        prune_at: the training steps at which to step it (:func:`pruning_steps`).
        after_prune: called with the model after each pruning step (e.g.
            ``lambda m: sync_hf_model(m, pruned="heads")`` for transformers models).
    """

    def __init__(self, pruner: Any, prune_at: Sequence[int], after_prune: Callable[[nn.Module], Any] | None = None) -> None:
        from vlprune.adapters.torch_pruning import PlatonImportance

        if len(prune_at) != pruner.iterative_steps:
            raise VLPruneError(f"{len(prune_at)} pruning steps for a pruner with iterative_steps={pruner.iterative_steps}")
        self.pruner = pruner
        self.prune_at = set(int(s) for s in prune_at)
        self.after_prune = after_prune
        imp = pruner.importance
        while not isinstance(imp, PlatonImportance) and hasattr(imp, "base"):
            imp = imp.base  # IDWeightedImportance(PlatonImportance(...)) and similar wrappers
        self.platon = imp if isinstance(imp, PlatonImportance) else None

    def after_backward(self, step: int, model: nn.Module) -> bool:
        """Update PLATON; on a pruning step, prune (the optimizer is then rebuilt)."""
        if self.platon is not None:
            self.platon.update(model)
        if step not in self.prune_at:
            return False
        if self.platon is not None:
            self.platon.step(self.pruner)
        else:
            from vlprune.adapters.torch_pruning import step_pruner

            step_pruner(self.pruner)  # tp's iterative head pruning fails on a step that removes no head
        if self.after_prune is not None:
            self.after_prune(model)
        return True
