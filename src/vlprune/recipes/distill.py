"""Knowledge distillation after pruning: teacher = the unpruned model, student = the pruned one.

AMP's recovery step (METHODS.md section 3), reused by every recipe: labels are never used. The loss
is a weighted sum of

* ``MSE(student embedding, teacher embedding)`` — the final (pooled / projected) embedding;
* ``MSE(student tokens, teacher tokens)`` — the patch tokens (last hidden state);
* optionally ``T^2 * KL(softmax(teacher logits / T) || softmax(student logits / T))`` for generative
  models (``logit_weight > 0``; positions where ``attention_mask`` is 0 are left out).

What "embedding", "tokens" and "logits" are comes from ``features(model, batch)``; the default
(:func:`default_features`) knows CLIP / SigLIP / BLIP / LLaVA (``get_image_features``: pooled or
projected image features and the vision tower's last hidden state) and plain towers
(``pooler_output`` / first token and ``last_hidden_state``).

Training is :func:`vlprune.recipes.finetune.train_loop` (AdamW, warm-up + cosine, clipping, tqdm).
With ``checkpoint=<dir>`` the student, the optimizer and the step are saved every ``save_every``
steps (atomically) and a later call with the same directory resumes where it stopped.

Several processes (``torchrun``; :mod:`vlprune.plugins.distributed`): inside a process group each
rank's ``batches(step)`` is its shard of global step ``step``; the student is wrapped in
``DistributedDataParallel`` (rank 0's weights are copied to every rank when it is wrapped) and each
rank's loss is weighted by its share of the step's samples, so the averaged gradient is that of the
loss over the union of the shards even when they are uneven, and every rank ends with the same
student as one process would on the union. Only rank 0 writes the checkpoint (and reads it when
resuming; the state is broadcast). Arguments, student and teacher shapes are checked to agree on
every rank first.

Example:
    >>> from vlprune.recipes.distill import distill                              # doctest: +SKIP
    >>> log = distill(pruned, original, lambda step: {"pixel_values": images(step)}, steps=300,
    ...               lr=1e-4, checkpoint="out/distill")                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins import distributed
from vlprune.plugins.amp import image_output, pooled_embedding
from vlprune.plugins.capture import call_model, preserved_mode
from vlprune.recipes.finetune import train_loop

__all__ = ["default_features", "distill_loss", "distill"]

logger = logging.getLogger(__name__)

FeatureFn = Callable[[nn.Module, Mapping[str, Any]], dict[str, torch.Tensor]]
_STATE = "distill_state.pt"


def default_features(model: nn.Module, batch: Mapping[str, Any], logits: bool = False) -> dict[str, torch.Tensor]:
    """``{"embed": (B, D), "tokens": (B, T, D)[, "logits": (B, L, V)]}`` of a model on a batch.

    * with ``pixel_values`` and ``get_image_features`` (CLIP, SigLIP, BLIP, LLaVA): the image
      features (LLaVA: projected visual tokens, mean-pooled) and the vision tower's
      ``last_hidden_state``; with ``logits=True`` the full forward's ``logits`` as well;
    * otherwise ``model(**batch)``: ``pooler_output`` (else the first token) and ``last_hidden_state``.

    Raises:
        ModelStructureError: nothing usable in the outputs (pass ``features=`` then).
    """
    out: dict[str, torch.Tensor] = {}
    first = image_output(model, batch)
    embed = pooled_embedding(first)
    hidden = getattr(first, "last_hidden_state", None)
    if embed is not None:
        out["embed"] = embed
    if isinstance(hidden, torch.Tensor):
        out["tokens"] = hidden
    if logits:
        value = getattr(first, "logits", None)  # image features carry none: run the whole model
        if not isinstance(value, torch.Tensor):
            value = getattr(call_model(model, {k: v for k, v in batch.items() if k != "labels"}), "logits", None)
        if isinstance(value, torch.Tensor):
            out["logits"] = value
    if not out:
        raise ModelStructureError(
            f"{type(model).__name__} gives no embedding, tokens or logits to distil; pass features=lambda model, batch: {{...}}"
        )
    return out


def distill_loss(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    *,
    embed_weight: float = 1.0,
    token_weight: float = 1.0,
    logit_weight: float = 0.0,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The distillation loss terms and their weighted ``total``.

    Args:
        student / teacher: feature dicts (``embed``, ``tokens``, ``logits``); a term is used when its
            weight is > 0 and both sides have it.
        embed_weight / token_weight / logit_weight: weights of the three terms.
        temperature: softmax temperature of the logit KL.
        mask: ``(B, L)`` 1 for the logit positions to use (e.g. ``attention_mask``).

    Returns:
        ``{"embed": ..., "tokens": ..., "logits": ..., "total": ...}`` (only the terms used).

    Raises:
        VLPruneError: no term usable, or student / teacher shapes differ.
    """
    terms: dict[str, torch.Tensor] = {}
    for key, weight in (("embed", embed_weight), ("tokens", token_weight), ("logits", logit_weight)):
        if weight <= 0 or key not in student or key not in teacher:
            continue
        s, t = student[key], teacher[key].detach()
        if s.shape != t.shape:
            raise VLPruneError(
                f"student and teacher {key} differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}; distillation "
                "needs the pruned model to keep its output widths (prune hidden neurons / heads, not the residual width)"
            )
        if key == "logits":
            logp_s = F.log_softmax(s.float() / temperature, dim=-1)
            logp_t = F.log_softmax(t.float() / temperature, dim=-1)
            kl = (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1)
            if mask is not None and mask.shape == kl.shape:
                m = mask.to(kl.dtype)
                kl = (kl * m).sum() / m.sum().clamp_min(1.0)
            else:
                kl = kl.mean()
            terms[key] = kl * temperature**2
        else:
            terms[key] = F.mse_loss(s.float(), t.float())
    if not terms:
        raise VLPruneError(
            "no distillation term is usable: the weights are 0 or the features lack embed / tokens / logits"
        )
    weights = {"embed": embed_weight, "tokens": token_weight, "logits": logit_weight}
    terms["total"] = sum(weights[k] * v for k, v in terms.items())  # type: ignore[assignment]
    return terms


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Callable[[int], Mapping[str, Any]],
    steps: int,
    *,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: int = 0,
    clip_grad: float | None = 1.0,
    embed_weight: float = 1.0,
    token_weight: float = 1.0,
    logit_weight: float = 0.0,
    temperature: float = 1.0,
    features: FeatureFn | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    save_every: int = 50,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` (in place) for ``steps`` steps; labels are never used.

    Args:
        student: the pruned model (trained; left in eval mode).
        teacher: the unpruned model (frozen: eval mode, no gradients, unchanged).
        batches: ``batches(step)`` -> model inputs (``labels``, if present, are ignored).
        steps: total optimizer steps (a resumed run continues up to the same total).
        lr / weight_decay / warmup / clip_grad: AdamW with warm-up + cosine, as in ``train_loop``.
        embed_weight / token_weight / logit_weight / temperature: see :func:`distill_loss`.
        features: ``features(model, batch) -> {"embed", "tokens", "logits"}``; default
            :func:`default_features` (logits only computed when ``logit_weight > 0``).
        checkpoint: directory for ``distill_state.pt``; if it holds a state, training resumes.
        save_every: save the state every this many steps (and at the end).
        progress: tqdm bar.

    Returns:
        ``train_loop``'s log (``loss``, ``seconds``) plus ``start_step`` and ``terms`` (the last
        step's loss terms).

    Raises:
        VLPruneError: bad arguments, a checkpoint of another model, mismatched feature shapes; in a
            process group, ranks with different arguments or model shapes (on every rank).
    """
    config = {k: v for k, v in locals().items() if k not in ("student", "teacher", "batches")}
    config["teacher"] = distributed.model_fingerprint(teacher)
    with distributed.guard("distill", model=student, config=config):
        if steps < 1:
            raise VLPruneError(f"steps must be >= 1, got {steps}")
        if save_every < 1:
            raise VLPruneError(f"save_every must be >= 1, got {save_every}")
        if student is teacher:
            raise VLPruneError("student and teacher are the same object: distil a pruned copy from the original")
    feature_fn = features or (lambda m, b: default_features(m, b, logits=logit_weight > 0))
    path = Path(checkpoint) / _STATE if checkpoint is not None else None
    start, optimizer_state = 0, None
    state = torch.load(path, map_location="cpu", weights_only=False) if (
        path is not None and distributed.is_main() and path.is_file()) else None
    state = distributed.broadcast_object(state)  # rank 0 reads the checkpoint, every rank resumes from it
    if state is not None:
        try:
            student.load_state_dict(state["model"])
        except RuntimeError as err:
            raise VLPruneError(f"the distillation checkpoint {path} belongs to a model of other shapes: {err}") from err
        start, optimizer_state = int(state["step"]) + 1, state["optimizer"]
        logger.info("distillation resumes at step %d of %d from %s", start, steps, path)
    last_terms: dict[str, float] = {}
    sharded = distributed.is_active()

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            target = feature_fn(teacher, inputs)
        terms = distill_loss(
            model(inputs) if sharded else feature_fn(model, inputs), target, embed_weight=embed_weight,
            token_weight=token_weight, logit_weight=logit_weight, temperature=temperature,
            mask=inputs.get("attention_mask"),
        )
        last_terms.clear()
        last_terms.update({k: float(v.detach()) for k, v in terms.items()})
        if not sharded:
            return terms["total"]
        return _union_loss(terms["total"], _samples(inputs))

    def save(step: int, optimizer: torch.optim.Optimizer, _log: dict[str, Any]) -> None:
        if path is None or ((step + 1) % save_every and step != steps - 1) or not distributed.is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"step": step, "model": student.state_dict(), "optimizer": optimizer.state_dict()}, tmp)
        os.replace(tmp, path)

    teacher_flags = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        if start >= steps:
            log: dict[str, Any] = {"loss": [], "seconds": 0.0}
        else:
            trained: nn.Module = student
            if sharded:  # gradients averaged over the ranks; find_unused: e.g. CLIP's text tower
                trained = nn.parallel.DistributedDataParallel(_Features(student, feature_fn), find_unused_parameters=True)
            with preserved_mode(teacher, training=False):
                log = train_loop(
                    trained, batches, steps, lr=lr, weight_decay=weight_decay, warmup=warmup, clip_grad=clip_grad,
                    loss_fn=loss_fn, progress=progress, start_step=start, optimizer_state=optimizer_state,
                    after_step=save, desc="distill",
                )
    finally:
        for p, flag in zip(teacher.parameters(), teacher_flags):
            p.requires_grad_(flag)
    student.eval()
    distributed.barrier()  # rank 0's checkpoint is written before any rank goes on
    log["start_step"] = start
    log["terms"] = dict(last_terms)
    return log


class _Features(nn.Module):
    """The student seen through ``features``: what ``DistributedDataParallel`` wraps, so that its
    forward (and so the gradient averaging) runs on every step whatever method ``features`` calls."""

    def __init__(self, student: nn.Module, features: FeatureFn) -> None:
        super().__init__()
        self.student = student
        self.features = features

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.features(self.student, batch)


def _samples(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _union_loss(loss: torch.Tensor, samples: int) -> torch.Tensor:
    """This rank's loss weighted by its share of the step's samples (``n_r * world / N``), so that
    the gradient DDP averages is that of the sample-weighted mean loss over the union of the shards;
    its value is that union loss (the same on every rank)."""
    total = distributed.all_reduce_sum(torch.tensor([float(samples), float(loss.detach()) * samples], dtype=torch.float64))
    weighted = loss * (samples * distributed.world_size() / float(total[0]))
    return weighted + (float(total[1] / total[0]) - weighted.detach())
