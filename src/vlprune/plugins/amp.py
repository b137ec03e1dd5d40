"""AMP (Shen et al., 2026): label-free entropy importance of MLP neurons and adaptive MLP widths.

Three pieces, each usable alone (METHODS.md section 3):

* :func:`entropy_objective` — for a batch of embeddings ``z_i`` (L2-normalised here),
  ``p_ij = softmax_j(cos(z_i, z_j) / tau)`` and ``E = -(1/B) sum_i sum_j p_ij log p_ij``: the
  entropy of the whole similarity distribution, no labels. :func:`onehot_objective` is the
  baseline it replaces (CLIP's symmetric cross-entropy of matched image-text pairs).
* :func:`neuron_importance` — first-order Taylor score of every hidden neuron ``j`` of every MLP
  (the input of the second linear: ``fc2`` / ``down_proj``; for gated MLPs the ``act(gate) * up``
  product), per sample ``|sum over tokens a_j * dE/da_j|``, averaged over all samples. One forward
  and one ``torch.autograd.grad`` per batch for all MLPs at once; parameter ``.grad`` fields are
  never touched.
* :func:`search_widths` — from the last MLP to the first, binary search (``halvings`` steps, 6 in
  the official code) of the number ``k`` of neurons kept (top-``k`` by importance) such that the
  objective on held-out batches rises by at most ``delta_e`` over the previously accepted state.
  Neurons are switched off by a mask on the second linear's input, which is exactly removing them;
  the model's weights are never changed. Evaluations of a layer re-run only the blocks from that
  layer on: the input of its block is cached once and replayed (checked against the full forward,
  with a fallback to full forwards where a model's blocks cannot be replayed).

Several processes (:mod:`vlprune.plugins.distributed`): inside a ``torch.distributed`` process
group each rank's batches are its shard and batch ``i`` of every rank together form global batch
``i`` (sizes may differ; every rank needs the same number of batches). The entropy objective is
computed over the global batch, as the paper does: the L2-normalised embeddings are all-gathered with
their gradients (``torch.distributed.nn.functional.all_gather``); each rank scores its own rows
against all of them, so the gradient reaching each activation is that of the global objective.
Importance sums and counts are all-reduced, and the width search evaluates the global objective,
so every rank returns what one process returns on the union. ``objective="onehot"`` and callable
objectives see the rank's own batch only (the sums are still all-reduced).

The neuron order used everywhere is :func:`neuron_order` (descending score, ties broken by index),
so the Torch-Pruning adapter (:class:`vlprune.adapters.torch_pruning.AMPEntropyImportance`) removes
exactly the neurons the search switched off.

Example:
    >>> import vlprune.plugins.amp as amp
    >>> from vlprune.testbed import load
    >>> from vlprune.testbed.data import make_scenes, pixel_values
    >>> clip = load("clip")
    >>> batches = [{"pixel_values": pixel_values(make_scenes("val", 64, seed=s))} for s in range(4)]
    >>> scores = amp.neuron_importance(clip, batches[:2], tau=1 / 15)   # doctest: +SKIP
    >>> widths = amp.search_widths(clip, scores, batches[2:], delta_e=1e-2, tau=1 / 15)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import distributed
from vlprune.plugins.capture import call_model, iterate_batches, model_device, preserved_mode
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl
from vlprune.plugins.structure import MLPLayout, mlp_layouts

__all__ = [
    "entropy_objective",
    "sharded_entropy_objective",
    "onehot_objective",
    "default_embedding",
    "token_set_embedding",
    "default_rule",
    "pooled_embedding",
    "image_output",
    "batch_objective",
    "find_mlps",
    "neuron_importance",
    "neuron_order",
    "neuron_ranks",
    "hidden_size",
    "evaluate_objective",
    "neuron_masks",
    "search_widths",
    "vlprune_register_criteria",
]

logger = logging.getLogger(__name__)

Objective = Literal["entropy", "onehot"]
EmbedFn = Callable[[nn.Module, Any], torch.Tensor]
ObjectiveFn = Callable[[nn.Module, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# objectives
# ----------------------------------------------------------------------------------------------
def _check_tau(tau: float) -> float:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise VLPruneError(f"tau must be a positive number (the paper uses 1/tau = 15 to 20), got {tau!r}")
    return float(tau)


def _check_embeddings(z: Any, what: str, min_rows: int = 2) -> torch.Tensor:
    """``z`` if it is a ``(batch, dim)`` float tensor of at least ``min_rows`` rows (a rank's shard
    of the global batch may hold fewer: ``min_rows=0``)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise DataError(f"{what} must be a float tensor of shape (batch, dim), got {shape}")
    if z.shape[0] < min_rows:
        raise DataError(
            f"{what} has a batch of {z.shape[0]}: the entropy of the similarity distribution is undefined "
            "over one sample; use batches of B >= 2 (the paper uses the global batch, hundreds of images)"
        )
    return z


def entropy_objective(embeddings: torch.Tensor, tau: float = 0.05, targets: torch.Tensor | None = None) -> torch.Tensor:
    """AMP's label-free objective: mean row entropy of ``softmax(cos-similarity / tau)``.

    Args:
        embeddings: ``(B, D)`` embeddings (any scale; L2-normalised here), ``B >= 2``.
        tau: softmax temperature (the paper: ``1 / tau`` = 15 to 20).
        targets: ``(M, D)`` embeddings to compare against (e.g. the text embeddings of a batch);
            default: ``embeddings`` themselves (image-only, the official ``only_image`` setting,
            diagonal included).

    Returns:
        Scalar tensor ``E = -(1/B) sum_i sum_j p_ij log p_ij`` (float32 or wider), differentiable.

    Example:
        >>> z = torch.eye(3)                       # orthogonal: each row puts most mass on itself
        >>> round(float(entropy_objective(z, tau=1.0)), 4)
        0.8824
    """
    tau = _check_tau(tau)
    z = _check_embeddings(embeddings, "embeddings")
    z = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=-1)
    t = z if targets is None else F.normalize(_check_embeddings(targets, "targets").to(z.dtype), dim=-1)
    logp = torch.log_softmax(z @ t.T / tau, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def sharded_entropy_objective(embeddings: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """:func:`entropy_objective` over the global batch: this rank's ``(B_r, D)`` embeddings with those
    of every rank (equal to :func:`entropy_objective` outside a process group).

    Each rank's rows are compared with the all-gathered rows of every rank (gradients flow back
    through the gather); the returned value is the global ``E`` on every rank, and its gradient is
    that of this rank's share ``-(1/B) sum_{i in rank} sum_j p_ij log p_ij``, so that the gradients
    all ranks send back through the gather add up to ``dE/dz``. Every rank must call it together.

    Args:
        embeddings: this rank's ``(B_r, D)`` embeddings (``B_r`` may differ per rank, even be 1).
        tau: softmax temperature.

    Returns:
        Scalar tensor: the global batch's objective.

    Raises:
        DataError: not a ``(B_r, D)`` float tensor; a global batch of fewer than 2 samples.
    """
    if not distributed.is_active():
        return entropy_objective(embeddings, tau)
    tau = _check_tau(tau)
    z = _check_embeddings(embeddings, "embeddings", min_rows=0)  # the global batch is checked below
    z = F.normalize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z, dim=-1)
    every = distributed.gather_rows(z, grad=torch.is_grad_enabled() and z.requires_grad)
    if every.shape[0] < 2:
        raise DataError(
            f"the global batch has {every.shape[0]} sample(s) over all ranks: the entropy of the similarity "
            "distribution needs B >= 2"
        )
    logp = torch.log_softmax(z @ every.T / tau, dim=-1)
    share = -(logp.exp() * logp).sum() / every.shape[0]
    total = distributed.all_reduce_sum(share.detach())
    return share + (total - share.detach())


def onehot_objective(image_embeds: torch.Tensor, text_embeds: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """The one-hot baseline: CLIP's symmetric cross-entropy, image ``i`` matched to text ``i``.

    Args:
        image_embeds: ``(B, D)`` image embeddings.
        text_embeds: ``(B, D)`` text embeddings of the same pairs.
        tau: temperature (``logit_scale = 1 / tau``).

    Returns:
        Scalar tensor ``(CE(img -> txt) + CE(txt -> img)) / 2``.
    """
    tau = _check_tau(tau)
    img = F.normalize(_check_embeddings(image_embeds, "image_embeds").float(), dim=-1)
    txt = F.normalize(_check_embeddings(text_embeds, "text_embeds").float(), dim=-1)
    if img.shape != txt.shape:
        raise DataError(f"image and text embeddings must pair up, got {tuple(img.shape)} and {tuple(txt.shape)}")
    logits = img @ txt.T / tau
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def pooled_embedding(out: Any) -> torch.Tensor | None:
    """One ``(B, D)`` embedding from a model output: a tensor, ``image_embeds``, ``pooler_output``
    (a list of per-image token sets is mean-pooled), else the first token of ``last_hidden_state``."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 2 else (out.mean(dim=1) if out.dim() == 3 else None)
    for key in ("image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return pooled_embedding(value)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return torch.stack([v.reshape(-1, v.shape[-1]).mean(dim=0) for v in value])
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return hidden[:, 0]
    return None


def image_output(model: nn.Module, batch: Any) -> Any:
    """``model.get_image_features(pixel_values=...)`` when the model has it and the batch holds
    ``pixel_values`` (CLIP, SigLIP, BLIP, LLaVA: the image side only), else ``model(**batch)``."""
    if isinstance(batch, Mapping) and "pixel_values" in batch and hasattr(model, "get_image_features"):
        device = model_device(model)
        return model.get_image_features(pixel_values=batch["pixel_values"].to(device))
    return call_model(model, batch)


def _takes_images(model: nn.Module) -> bool:
    """The model reads images: ``get_image_features`` or a ``pixel_values`` argument."""
    if hasattr(model, "get_image_features"):
        return True
    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_image_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping) and "pixel_values" not in batch and _takes_images(model):
        raise DataError(
            f"AMP's default embedding needs image batches with 'pixel_values' ({type(model).__name__} embeds images); "
            f"got keys {sorted(map(str, batch))}; add the images, or pass embed=lambda model, batch: <(B, D) tensor> "
            "for other inputs"
        )


def token_set_embedding(out: Any) -> torch.Tensor | None:
    """Per-image sets of visual tokens (LLaVA-like ``get_image_features``: a list of ``(T, D)``
    projected tokens per image), each flattened to one row; None for any other output.

    Mean-pooled, such tokens are nearly identical across images (testbed LLaVA: E = 3.54 of at
    most log 64 = 4.16), and AMP's search then accepts the minimum width everywhere (see
    docs/benchmarks.md); flattened, images stay apart."""
    value = getattr(out, "pooler_output", None)
    if value is None and isinstance(out, Mapping):
        value = out.get("pooler_output")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.dim() >= 2 for v in value):
        if len({v.numel() for v in value}) == 1:
            return torch.stack([v.reshape(-1) for v in value])
    return None


def default_embedding(model: nn.Module, batch: Any) -> torch.Tensor:
    """The image embedding AMP's objective is computed on.

    * a model with ``get_image_features`` and a batch with ``pixel_values`` (CLIP, SigLIP, BLIP,
      LLaVA): the image features (LLaVA: the projected visual tokens of each image, flattened,
      :func:`token_set_embedding`; mean-pooled they barely differ between images);
    * otherwise ``model(**batch)``: ``image_embeds``, else ``pooler_output``, else the first token of
      ``last_hidden_state`` (ViT / DINOv2 / a bare vision tower); a model with a task head and
      nothing of these (``ViTForImageClassification``) is read through its ``base_model``.

    Raises:
        DataError: a model that embeds images given a batch without ``pixel_values``.
        ModelStructureError: the model gives no ``(B, D)`` embedding; pass ``embed=`` then.
    """
    _check_image_batch(model, batch)
    out = image_output(model, batch)
    z = token_set_embedding(out)
    if z is None:
        z = pooled_embedding(out)
    base = getattr(model, "base_model", model)
    if z is None and isinstance(base, nn.Module) and base is not model:  # task heads: use the backbone
        inputs = {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, Mapping) else batch
        z = pooled_embedding(call_model(base, inputs))
    if z is None:
        raise ModelStructureError(
            f"{type(model).__name__} outputs no embedding AMP's objective can use (no image features, "
            "image_embeds, pooler_output or last_hidden_state); pass embed=lambda model, batch: <(B, D) tensor>"
        )
    return z


def batch_objective(
    objective: Objective | ObjectiveFn = "entropy",
    tau: float = 0.05,
    embed: EmbedFn | None = None,
) -> ObjectiveFn:
    """The per-batch objective ``f(model, batch) -> scalar`` used by importance and search.

    Args:
        objective: ``"entropy"`` (AMP), ``"onehot"`` (image-text cross-entropy; the batch must hold
            ``pixel_values`` and ``input_ids`` of matching pairs and the model
            ``get_text_features``; text features are computed without gradient, as in the official
            code, so only the image tower is scored), or a callable ``f(model, batch)``.
        tau: temperature.
        embed: ``embed(model, batch) -> (B, D)``; default :func:`default_embedding`.
    """
    if callable(objective):
        return objective
    tau = _check_tau(tau)
    embed_fn = embed or default_embedding
    if objective == "entropy":  # over the global batch inside a process group
        return lambda model, batch: sharded_entropy_objective(embed_fn(model, batch), tau)
    if objective == "onehot":

        def onehot(model: nn.Module, batch: Any) -> torch.Tensor:
            if not (isinstance(batch, Mapping) and "input_ids" in batch and hasattr(model, "get_text_features")):
                raise DataError(
                    "objective='onehot' needs image-text pairs: batches with pixel_values and input_ids, "
                    "and a model with get_text_features (CLIP-like)"
                )
            device = model_device(model)
            with torch.no_grad():
                text = model.get_text_features(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device) if "attention_mask" in batch else None,
                )
            return onehot_objective(embed_fn(model, batch), pooled_embedding(text), tau)  # type: ignore[arg-type]

        return onehot
    raise VLPruneError(f"objective must be 'entropy', 'onehot' or a callable, got {objective!r}")


# ----------------------------------------------------------------------------------------------
# MLPs and their hidden activations
# ----------------------------------------------------------------------------------------------
def find_mlps(model: nn.Module, mlps: Iterable[str] | None = None) -> dict[str, MLPLayout]:
    """The MLPs to score: all recognisable ones (``fc1/fc2``, ``gate/up/down_proj``,
    ``intermediate/output.dense``), or the named subset.

    Raises:
        ModelStructureError: no MLP found, or a named MLP does not exist.
    """
    found = {m.name: m for m in mlp_layouts(model)}
    if not found:
        raise ModelStructureError(
            f"{type(model).__name__} has no recognisable MLP (fc1/fc2, up_proj/down_proj[/gate_proj] or "
            "intermediate.dense/output.dense linears); AMP scores MLP hidden neurons only"
        )
    if mlps is None:
        return found
    names = [mlps] if isinstance(mlps, str) else list(mlps)
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelStructureError(
            f"not MLPs of {type(model).__name__}: {missing[:3]}; MLPs are e.g. {list(found)[:3]}"
        )
    return {n: found[n] for n in names}


def hidden_size(model: nn.Module, layout: MLPLayout) -> int:
    """Number of hidden neurons of an MLP (its second linear's ``in_features``)."""
    down = model.get_submodule(layout.down)
    return int(down.in_features)  # type: ignore[arg-type]


@contextlib.contextmanager
def _activations_require_grad(model: nn.Module, layouts: Iterable[MLPLayout]) -> Iterator[None]:
    """Make each MLP's hidden activation part of the autograd graph (its first linear's weight
    requires grad), restoring ``requires_grad`` afterwards. ``.grad`` fields are never written:
    gradients are taken with ``torch.autograd.grad`` on the activations only."""
    changed: list[nn.Parameter] = []
    for layout in layouts:
        for path in (layout.up, layout.gate):
            if path:
                w = model.get_submodule(path).weight  # type: ignore[union-attr]
                if not w.requires_grad:
                    w.requires_grad_(True)
                    changed.append(w)  # type: ignore[arg-type]
    try:
        yield
    finally:
        for w in changed:
            w.requires_grad_(False)


def _add_scores(
    sums: dict[str, torch.Tensor], acts: list[tuple[str, torch.Tensor]], grads: Sequence[torch.Tensor | None]
) -> int:
    """Add one batch's ``sum_samples |sum_positions a * dE/da|`` per hidden neuron to ``sums``
    (by MLP name, on the CPU); returns the batch size (0 when no activation got a gradient)."""
    batch_size = 0
    for (name, a), g in zip(acts, grads):
        if g is None:
            continue
        prod = (a.detach() * g).float()
        per_sample = (prod.sum(dim=tuple(range(1, prod.dim() - 1))) if prod.dim() > 2 else prod).abs()
        batch_size = per_sample.shape[0]
        s = per_sample.sum(dim=0).cpu()
        sums[name] = sums[name] + s if name in sums else s
    return batch_size


def neuron_importance(
    model: nn.Module,
    batches: Iterable[Any],
    mlps: Iterable[str] | None = None,
    tau: float = 0.05,
    *,
    objective: Objective | ObjectiveFn = "entropy",
    embed: EmbedFn | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every hidden neuron of every MLP, from one pass.

    For MLP hidden activation ``a`` (the second linear's input) of shape ``(B, T, H)`` (or
    ``(B, H)``): ``score_j = mean over samples of |sum over tokens a_j * dE/da_j|``, with ``E`` the
    objective of the sample's batch.

    Args:
        model: any model whose MLPs :func:`find_mlps` recognises (CLIP / ViT / BLIP vision
            ``fc1/fc2``, Llama-style gated ``gate/up/down_proj``); left unchanged (mode restored, no
            ``.grad`` written, ``requires_grad`` restored).
        batches: calibration batches (each ``B >= 2``), e.g. ``{"pixel_values": ...}``.
        mlps: MLP module names to score; default every MLP that contributes to the objective
            (for an image objective: the vision tower's MLPs; the others are dropped with a log line).
        tau: temperature of the objective.
        objective: ``"entropy"`` (AMP, default), ``"onehot"`` (baseline) or ``f(model, batch)``.
        embed: ``embed(model, batch) -> (B, D)`` for the objectives; default :func:`default_embedding`.
        progress: tqdm bar over batches.

    Returns:
        MLP module name -> float32 CPU tensor of one score per hidden neuron, in model order.

    Raises:
        ModelStructureError: no MLP, unknown names, or no MLP reaches the objective.
        DataError: empty batches, a batch of one sample, a non-finite objective; in a process
            group: a rank with no batches, ranks with different numbers of batches.
        VLPruneError: in a process group, ranks with different arguments or model shapes (on every rank).
    """
    config = {"mlps": mlps, "tau": tau, "objective": objective, "embed": embed}
    with distributed.guard("AMP neuron_importance", model=model, config=config) as check:
        layouts = find_mlps(model, mlps)
        data = iterate_batches(batches)
        check.count("batches", len(data), equal=True)
        fn = batch_objective(objective, tau, embed)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    captured: dict[str, list[torch.Tensor]] = {}

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                captured.setdefault(name, []).append(args[0])

        return hook

    handles = []
    try:
        with preserved_mode(model, training=False), _activations_require_grad(model, layouts.values()):
            for name, layout in layouts.items():
                handles.append(model.get_submodule(layout.down).register_forward_pre_hook(pre_hook(name)))
            for batch in tqdm(data, desc="AMP importance", disable=not progress, leave=False):
                captured.clear()
                with torch.enable_grad():
                    value = fn(model, batch)
                    if not isinstance(value, torch.Tensor) or value.dim() != 0:
                        raise DataError("the objective must return a scalar tensor")
                    if not torch.isfinite(value):
                        raise DataError(f"the objective is not finite ({float(value)}) on a calibration batch")
                    names = [n for n in layouts if n in captured]
                    acts = [a for n in names for a in captured[n]]
                    if not acts:
                        raise ModelStructureError(
                            "no MLP of the model reaches the objective (their hidden activations get no gradient); "
                            "check embed= / objective= or the mlps= names"
                        )
                    grads = torch.autograd.grad(value, acts, allow_unused=True)
                count += _add_scores(sums, [(n, a) for n in names for a in captured[n]], grads)
                # free this batch's activations and gradients before the next forward: kept, they
                # doubled the hidden activations held at the next batch's peak
                del value, acts, grads
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    if distributed.is_active():  # every rank's samples: per-neuron sums and the sample count add up
        total = distributed.all_reduce_sum({**sums, " count": torch.tensor(float(count), dtype=torch.float64)})
        count = int(round(float(total.pop(" count"))))
        sums = total
    dropped = [n for n in layouts if n not in sums]
    if dropped:
        logger.info("AMP: %d MLP(s) do not reach the objective and are not scored, e.g. %s", len(dropped), dropped[0])
    if not sums:
        raise ModelStructureError("no MLP of the model reaches the objective; check embed= / objective=")
    return {n: sums[n] / max(count, 1) for n in layouts if n in sums}


def neuron_order(scores: torch.Tensor) -> torch.Tensor:
    """Neuron indices from most to least important: descending score, ties by ascending index.

    The search keeps ``neuron_order(s)[:k]``; the Torch-Pruning adapter ranks with the same order.
    """
    s = scores.detach().float().cpu()
    return torch.argsort(-s, stable=True)


def neuron_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each neuron's rank in :func:`neuron_order` as a score: ``H - 1`` for the most important,
    0 for the least; distinct even where scores tie, so "remove the lowest ``H - k``" removes
    exactly the neurons outside ``neuron_order(scores)[:k]``."""
    order = neuron_order(scores)
    ranks = torch.empty(len(order), dtype=torch.float32)
    ranks[order] = torch.arange(len(order) - 1, -1, -1, dtype=torch.float32)
    return ranks


# ----------------------------------------------------------------------------------------------
# masks and evaluation
# ----------------------------------------------------------------------------------------------
class _Masks:
    """Forward pre-hooks on the second linears that multiply their input by a 0/1 neuron mask."""

    def __init__(self, model: nn.Module, layouts: Mapping[str, MLPLayout]) -> None:
        self.model = model
        self.layouts = layouts
        self.masks: dict[str, torch.Tensor | None] = {n: None for n in layouts}
        self.handles: list[Any] = []

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> Any:
            mask = self.masks[name]
            if mask is None or not args:
                return None
            return (args[0] * mask,) + tuple(args[1:])

        return hook

    def __enter__(self) -> _Masks:
        for name, layout in self.layouts.items():
            self.handles.append(self.model.get_submodule(layout.down).register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def keep(self, name: str, idxs: torch.Tensor | None, size: int) -> None:
        """Keep only hidden neurons ``idxs`` of MLP ``name`` (None: all); the mask is made once, on
        the second linear's device and dtype, so the hook only multiplies."""
        if idxs is None:
            self.masks[name] = None
            return
        weight = self.model.get_submodule(self.layouts[name].down).weight
        mask = torch.zeros(size, device=weight.device, dtype=weight.dtype)
        mask[idxs.to(weight.device)] = 1.0
        self.masks[name] = mask


@contextlib.contextmanager
def neuron_masks(model: nn.Module, keep: Mapping[str, torch.Tensor | Sequence[int]]) -> Iterator[nn.Module]:
    """Run ``model`` with only the given hidden neurons of each MLP switched on (hooks, no weight
    change; removed on exit). Equivalent to physically removing the other neurons.

    Args:
        model: the model.
        keep: MLP module name -> indices of the hidden neurons kept.

    Example:
        >>> with neuron_masks(model, {"vision_model.encoder.layers.3.mlp": [0, 5, 7]}):  # doctest: +SKIP
        ...     out = model(**batch)
    """
    layouts = find_mlps(model, list(keep))
    masks = _Masks(model, layouts)
    for name, idxs in keep.items():
        masks.keep(name, torch.as_tensor(idxs, dtype=torch.long), hidden_size(model, layouts[name]))
    with masks:
        yield model


def evaluate_objective(
    model: nn.Module,
    batches: Iterable[Any],
    tau: float = 0.05,
    *,
    objective: Objective | ObjectiveFn = "entropy",
    embed: EmbedFn | None = None,
) -> float:
    """Mean of the per-batch objective over ``batches`` (no gradient, eval mode); in a process group,
    of the global batches (every rank the same number of batches)."""
    with distributed.guard("AMP evaluate_objective", model=model, config={"tau": tau, "objective": objective}) as check:
        data = iterate_batches(batches)
        check.count("batches", len(data), equal=True)
        fn = batch_objective(objective, tau, embed)
    with preserved_mode(model, training=False), torch.no_grad():
        return _mean_objective(model, data, fn)


def _mean_objective(model: nn.Module, data: Sequence[Any], fn: ObjectiveFn, before: Callable[[int], None] | None = None) -> float:
    total = 0.0
    for i, batch in enumerate(data):
        if before is not None:
            before(i)
        value = float(fn(model, batch))
        if not math.isfinite(value):
            raise DataError(f"the objective is not finite ({value}) on held-out batch {i}")
        total += value
    return total / len(data)


# ----------------------------------------------------------------------------------------------
# block replay: evaluate from one block on
# ----------------------------------------------------------------------------------------------
def _enclosing_block(model: nn.Module, mlp_name: str) -> tuple[nn.ModuleList, int] | None:
    """The innermost ``nn.ModuleList`` element that contains ``mlp_name``: (list, index)."""
    parts = mlp_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end].isdigit():
            parent = model.get_submodule(".".join(parts[:end]))
            if isinstance(parent, nn.ModuleList):
                return parent, int(parts[end])
    return None


class _Replay(nn.Module):
    """Stands in for blocks ``0..i-1`` of a list: returns the cached output of block ``i-1`` for
    the current held-out batch, whatever it is given."""

    def __init__(self, cache: list[Any], cursor: list[int]) -> None:
        super().__init__()
        self.cache = cache
        self.cursor = cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        return self.cache[self.cursor[0]]


class _BlockReplay:
    """Record block ``i-1``'s outputs over the held-out batches, then swap blocks ``0..i-1`` for
    :class:`_Replay` while layer ``i`` is searched."""

    def __init__(self, blocks: nn.ModuleList, index: int) -> None:
        self.blocks = blocks
        self.index = index
        self.cache: list[Any] = []
        self.cursor = [0]
        self.saved: list[nn.Module] = []

    def record(self, model: nn.Module, data: Sequence[Any], fn: ObjectiveFn) -> None:
        """One full pass over ``data`` keeping block ``i-1``'s output of every batch."""

        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            self.cache.append(_detach(output))

        handle = self.blocks[self.index - 1].register_forward_hook(hook)
        try:
            _mean_objective(model, data, fn)
        finally:
            handle.remove()
        if len(self.cache) != len(data):
            raise _ReplayUnusable(f"block ran {len(self.cache)} times over {len(data)} batches")

    def __enter__(self) -> _BlockReplay:
        replay = _Replay(self.cache, self.cursor)
        self.saved = [self.blocks[j] for j in range(self.index)]
        for j in range(self.index):
            self.blocks[j] = replay
        return self

    def __exit__(self, *exc: object) -> None:
        for j, block in enumerate(self.saved):
            self.blocks[j] = block
        self.saved = []

    def set_batch(self, i: int) -> None:
        self.cursor[0] = i


class _ReplayUnusable(Exception):
    pass


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# width search
# ----------------------------------------------------------------------------------------------
def search_widths(
    model: nn.Module,
    importance: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    delta_e: float,
    tau: float = 0.05,
    *,
    objective: Objective | ObjectiveFn = "entropy",
    embed: EmbedFn | None = None,
    halvings: int = 6,
    min_keep: int = 1,
    rule: Literal["rise", "change"] | None = None,
    reuse_blocks: bool = True,
    progress: bool = True,
    log: list[dict[str, Any]] | None = None,
) -> dict[str, int]:
    """AMP's adaptive widths: per MLP, from the last to the first, the fewest top-``k`` neurons
    keeping the held-out objective within ``delta_e`` of the previously accepted state.

    Binary search as in the official code: ``lo, hi = 0, H``; ``halvings`` times ``k = (lo+hi)//2``
    (at least ``min_keep``); accept (``hi = k``) if ``E(k) - E_prev <= delta_e``, else ``lo = k``.
    The smallest accepted ``k`` is kept (``H`` if none) and its objective becomes ``E_prev`` for
    the next MLP (the increase is per layer, relative to the state after the previous layer).

    Args:
        model: the model; its weights are never changed (masks are hooks, removed on exit).
        importance: MLP module name -> one score per hidden neuron (:func:`neuron_importance`).
        batches: held-out batches (each ``B >= 2``), evaluated with no gradient.
        delta_e: largest accepted objective increase per layer (``>= 0``; the paper: 2e-4 to 1e-1).
        tau, objective, embed: the objective, as in :func:`neuron_importance`.
        halvings: binary-search steps per layer (6: resolution ``H / 64``).
        min_keep: fewest neurons an MLP keeps (>= 1: Torch-Pruning cannot empty a layer).
        rule: ``"rise"`` (official): accept when ``E(k) - E_prev <= delta_e``, so any fall of the
            objective is accepted; ``"change"``: accept when ``|E(k) - E_prev| <= delta_e`` (the
            variant left commented out in the official code), which also refuses widths that make
            the objective fall by more than ``delta_e``: with an objective that falls when late
            layers are cut, ``"rise"`` empties them. None (default): :func:`default_rule`,
            ``"change"`` for LLaVA-like models on the default embedding, else ``"rise"``.
        reuse_blocks: evaluate from the searched layer's block on, replaying the cached input of
            that block (checked against the full forward; falls back to full forwards if the check
            fails); False: always full forwards.
        progress: tqdm bar over the evaluations.
        log: if a list is given, one dict per evaluation is appended (``mlp``, ``kept``,
            ``objective``, ``accepted``).

    Returns:
        MLP module name -> number of hidden neurons kept, for every MLP in ``importance``. A
        degenerate result (every MLP at the smallest width the search can reach, or none pruned)
        comes with a ``UserWarning`` and a log warning naming the fix (``rule=``, ``delta_e=``, ``embed=``).

    Raises:
        VLPruneError: ``delta_e < 0`` or not finite, ``halvings < 1``, bad ``min_keep``.
        ModelStructureError: a name that is not an MLP, or scores of the wrong length.
        DataError: empty held-out batches, a batch of one sample.
    """
    config = {"importance": importance, "delta_e": delta_e, "tau": tau, "objective": objective, "embed": embed,
              "halvings": halvings, "min_keep": min_keep, "rule": rule, "reuse_blocks": reuse_blocks}
    with distributed.guard("AMP search_widths", model=model, config=config) as check:
        if not (isinstance(delta_e, (int, float)) and math.isfinite(delta_e) and delta_e >= 0):
            raise VLPruneError(f"delta_e must be a finite number >= 0 (largest objective increase per layer), got {delta_e!r}")
        if not (isinstance(halvings, int) and halvings >= 1):
            raise VLPruneError(f"halvings must be an integer >= 1, got {halvings!r}")
        if not (isinstance(min_keep, int) and min_keep >= 1):
            raise VLPruneError(f"min_keep must be an integer >= 1, got {min_keep!r}")
        if rule not in ("rise", "change", None):
            raise VLPruneError(f"rule must be 'rise', 'change' or None (per model), got {rule!r}")
        if not importance:
            raise VLPruneError("importance is empty: compute it with neuron_importance(model, batches) first")
        layouts = find_mlps(model, list(importance))
        sizes = {n: hidden_size(model, layouts[n]) for n in layouts}
        for n, s in importance.items():
            if s.dim() != 1 or s.numel() != sizes[n]:
                raise ModelStructureError(f"importance of {n} has {tuple(s.shape)} scores, the MLP has {sizes[n]} neurons")
        data = iterate_batches(batches)
        check.count("batches", len(data), equal=True)
        fn = batch_objective(objective, tau, embed)
    if rule is None:
        rule = default_rule(model, data[0], objective, embed)
        logger.info("AMP: search rule %r", rule)
    order = [layout.name for layout in mlp_layouts(model) if layout.name in layouts][::-1]
    widths = {n: sizes[n] for n in order}
    bar = tqdm(total=len(order) * halvings, desc="AMP width search", disable=not progress, leave=False)
    masks = _Masks(model, layouts)
    try:
        with preserved_mode(model, training=False), torch.no_grad(), masks:
            prev = _mean_objective(model, data, fn)
            logger.info("AMP: held-out objective of the unpruned model %.6f", prev)
            for name in order:
                ranked = neuron_order(importance[name])
                size = sizes[name]
                replay = _replay_for(model, name, data, fn, prev, reuse_blocks)

                def evaluate(k: int, name: str = name, ranked: torch.Tensor = ranked, size: int = size,
                             replay: _BlockReplay | None = replay) -> float:
                    masks.keep(name, None if k >= size else ranked[:k], size)
                    if replay is None:
                        return _mean_objective(model, data, fn)
                    with replay:
                        return _mean_objective(model, data, fn, before=replay.set_batch)

                lo, hi, best, best_value = 0, size, size, prev
                for _ in range(halvings):
                    k = max((lo + hi) // 2, min_keep)
                    value = evaluate(k)
                    accepted = (value - prev if rule == "rise" else abs(value - prev)) <= delta_e
                    if log is not None:
                        log.append({"mlp": name, "kept": k, "objective": value, "accepted": accepted})
                    if accepted:
                        hi, best, best_value = k, k, value
                    else:
                        lo = k
                    bar.update(1)
                masks.keep(name, None if best >= size else ranked[:best], size)
                widths[name] = best
                prev = best_value
                logger.info("AMP: %s keeps %d / %d neurons (objective %.6f)", name, best, size, prev)
    finally:
        bar.close()
    _warn_degenerate(widths, sizes, halvings, min_keep, delta_e, rule, embed)
    return {n: widths[n] for n in layouts}


def default_rule(
    model: nn.Module, batch: Any, objective: Objective | ObjectiveFn = "entropy", embed: EmbedFn | None = None
) -> Literal["rise", "change"]:
    """The search rule :func:`search_widths` uses when none is given.

    ``"change"`` when the objective is built-in, ``embed`` is the default and the model's image
    features are per-image token sets (LLaVA-like: :func:`token_set_embedding`): that embedding
    was never trained contrastively, cutting late MLPs makes its entropy *fall*, and ``"rise"``
    then cuts every MLP to the minimum (testbed LLaVA: VQA 0.717 / 0.930 -> 0.280 / 0.397).
    Otherwise ``"rise"`` (the official rule).
    """
    if callable(objective) or embed is not None:
        return "rise"
    if not (isinstance(batch, Mapping) and "pixel_values" in batch and hasattr(model, "get_image_features")):
        return "rise"
    with preserved_mode(model, training=False), torch.no_grad():
        return "change" if token_set_embedding(image_output(model, batch)) is not None else "rise"


def _smallest_width(size: int, halvings: int, min_keep: int) -> int:
    """The width the binary search ends at when it accepts every step."""
    lo, hi = 0, size
    for _ in range(halvings):
        hi = max((lo + hi) // 2, min_keep)
    return min(hi, size)


def _warn_degenerate(widths: Mapping[str, int], sizes: Mapping[str, int], halvings: int, min_keep: int,
                     delta_e: float, rule: str, embed: EmbedFn | None) -> None:
    if not widths:
        return
    floor = {n: _smallest_width(sizes[n], halvings, min_keep) for n in widths}
    message = None
    if all(widths[n] <= floor[n] < sizes[n] for n in widths):
        message = (
            f"AMP search_widths cut every one of the {len(widths)} searched MLPs to the smallest width it can reach "
            f"({sorted(set(widths.values()))}): the held-out objective never "
            f"{'rose' if rule == 'rise' else 'moved'} by more than delta_e={delta_e:g} (rule={rule!r}), so it does not "
            "guard the model here (e.g. it falls when late layers are cut, or the embedding barely differs between "
            "images). Use " + ("rule='change', " if rule == "rise" else "") + "a smaller delta_e, or an embed= that "
            "separates the images (e.g. amp.token_set_embedding for LLaVA-like models)"
        )
    elif all(widths[n] >= sizes[n] for n in widths):
        message = (
            f"AMP search_widths pruned nothing: every narrower width moved the held-out objective by more than "
            f"delta_e={delta_e:g} (rule={rule!r}); raise delta_e (the paper: 2e-4 to 1e-1)"
            + (", or use rule='rise'" if rule == "change" else "")
        )
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)


def _replay_for(model: nn.Module, name: str, data: Sequence[Any], fn: ObjectiveFn, prev: float, enabled: bool) -> _BlockReplay | None:
    """A checked replay of the blocks before MLP ``name``'s block, or None (full forwards)."""
    if not enabled:
        return None
    found = _enclosing_block(model, name)
    if found is None or found[1] == 0:
        return None
    replay = _BlockReplay(*found)
    try:
        replay.record(model, data, fn)
        with replay:
            check = _mean_objective(model, data, fn, before=replay.set_batch)
    except Exception as err:  # noqa: BLE001 - a block that cannot be stood in for: full forwards
        logger.debug("AMP: no block replay for %s (%s: %s)", name, type(err).__name__, err)
        return None
    if not math.isclose(check, prev, rel_tol=1e-4, abs_tol=1e-6):
        logger.debug("AMP: block replay of %s gives %.8f, the full forward %.8f: full forwards", name, check, prev)
        return None
    return replay


@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register ``amp_entropy``."""
    return [
        CriterionSpec(
            name="amp_entropy",
            level="neuron",
            needs="gradients",
            adapters={
                "torch_pruning": "vlprune.adapters.torch_pruning:AMPEntropyImportance",
                "nni": "vlprune.adapters.nni.amp:AMPPruner",
            },
            description="label-free entropy Taylor importance of MLP hidden neurons; widths by binary search",
            source="Shen et al., Adaptive MLP Pruning for Large Vision Transformers, 2026",
            factory="vlprune.plugins.amp:neuron_importance",
        )
    ]
