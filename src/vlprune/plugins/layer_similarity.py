"""Which decoder layers to drop: activation-similarity layer scores and layer-selection strategies.

Scores (one forward pass per calibration batch for all layers, streamed: hooks on the decoder
layers keep per-layer sums and counts, never the hidden states of all layers or batches; from the
second batch on each forward stops after the last decoder layer, :class:`~vlprune.plugins.capture.ForwardCut`):

* :func:`layer_similarity` — per decoder layer ``l``, the mean cosine similarity between the
  layer's input and output hidden states (Khaki et al., 2026: "domain-aware activation
  similarity"; METHODS.md section 4). A layer whose output is close to its input changes the
  representation least: **higher = more removable**. The input and output are read by hooks on the
  decoder layers themselves, not from ``output_hidden_states`` (whose last entry is after the final
  norm and would distort the last layer).
* :func:`block_influence` — ShortGPT's ``BI_l = 1 - layer_similarity(tokens="all")`` (**lower =
  more removable**).
* :func:`angular_distance` — Gromov et al.'s ``d(l, n) = arccos(cos(x^l_T, x^{l+n}_T)) / pi`` on
  the last non-padding token, for every run of ``n`` layers (**lower = more removable**);
  :func:`angular_distance_matrix` gives every ``(l, n)`` from the same single pass.
* :func:`domain_similarity` / :func:`combine_domains` / :func:`rank_layers` — one similarity
  profile per domain (``{"math": batches, "general": batches}``) and the domain-aware ranking
  (math-aware, general-aware, mixed).

Selection (:mod:`vlprune.plugins.layer_selection`, re-exported here: :func:`select_layers`,
:func:`select_run`): ``rank`` (top k), ``spacing`` (best k with no
two adjacent, gaps as even as the scores allow), ``consecutive`` (best run of k) and ``regime``
(rank at low budgets, spacing at high ones), with the first / last layers protected.

Several processes: inside a ``torch.distributed`` process group each rank's batches are its shard;
the per-layer sums and counts are all-reduced, so every rank returns what one process returns on the
union (:mod:`vlprune.plugins.distributed`; opt out with its ``local_only()``).

Choices where the paper is silent (each a parameter): token-weighted mean over all non-padding
tokens of all samples (``weighting="token"``; ``"sample"`` averages each sample's tokens first);
padding excluded (ShortGPT's official code includes it); cosine in float32 (``dtype=``) whatever the
model dtype, sums in float64; ``"mixed" = alpha * s(math) + (1 - alpha) * mean of the other
domains``; the regime switch :data:`DEFAULT_REGIME_SWITCH` (provisional, see there).

The ``hf_layers`` adapter of the registered criteria is the score function itself:
``vlprune.get_criterion("layer_similarity", adapter="hf_layers", model=m, batches=b)`` returns the
scores tensor (one value per decoder layer, in :func:`decoder_layers` order).

Example:
    >>> import vlprune.testbed
    >>> from vlprune.plugins.layer_similarity import domain_similarity, rank_layers, select_layers
    >>> model = vlprune.testbed.load("llava")
    >>> data = {d: vlprune.testbed.batches("llava", 32, 16, task=d) for d in ("math", "general")}
    >>> scores = domain_similarity(model, data, progress=False)           # {"math": (4,), "general": (4,)}
    >>> rank_layers(scores, domain="mixed", alpha=0.5)                    # doctest: +SKIP
    [2, 1, 3, 0]
    >>> select_layers(scores["math"], k=1)                                # doctest: +SKIP
    [2]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import distributed
from vlprune.plugins.capture import ForwardCut, batch_mask, call_model, first_tensor, iterate_batches, preserved_mode
from vlprune.plugins.hookspecs import CriterionSpec, hookimpl
from vlprune.plugins.layer_selection import (  # re-exported: selection lives in its own module
    DEFAULT_REGIME_SWITCH,
    Strategy,  # noqa: F401
    _check_scores,
    _order,
    select_layers,
    select_run,
)
from vlprune.plugins.structure import DECODER_STACKS, find_decoder_layers

__all__ = [
    "DEFAULT_REGIME_SWITCH",
    "decoder_layers",
    "layer_similarity",
    "block_influence",
    "angular_distance",
    "angular_distance_matrix",
    "domain_similarity",
    "combine_domains",
    "rank_layers",
    "select_layers",
    "select_run",
    "vlprune_register_criteria",
]

logger = logging.getLogger(__name__)

Tokens = Literal["all", "last"]
Weighting = Literal["token", "sample"]
LayerSelector = Sequence[int | str] | None


# -- which layers --------------------------------------------------------------------------------


def decoder_layers(model: nn.Module, layers: LayerSelector = None) -> list[str]:
    """Module paths of the decoder layers scored by this module, in forward order.

    Args:
        model: a transformers model (LLaVA family, BLIP, decoder-only LMs) or any module.
        layers: None for every decoder layer, as :func:`vlprune.plugins.structure.find_decoder_layers`
            finds them (a plugin-registered ``FamilyRule(decoder=...)``, else the elements of the
            first ``nn.ModuleList`` at ``*language_model.layers``, ``text_decoder.bert.encoder.layer``,
            ``model.layers``, ``layers``, ``model.decoder.layers``, ``transformer.h`` or
            ``gpt_neox.layers``). Or a sequence of decoder-layer indices (into that default list)
            and/or module paths.

    Returns:
        The module paths, in the order given (default: forward order).

    Raises:
        ModelStructureError: no decoder layer found (the message names the model class and what to
            pass), an index out of range, an unknown module path or a duplicate.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> decoder_layers(tiny_model("llava"))
        ['model.language_model.layers.0', 'model.language_model.layers.1']
    """
    default = find_decoder_layers(model)
    if layers is None:
        if not default:
            raise ModelStructureError(
                f"found no decoder layers in {type(model).__name__} (no known family with a decoder and no "
                f"nn.ModuleList at {', '.join(DECODER_STACKS)}); pass layers=[module paths of the "
                "decoder layers], e.g. layers=['model.layers.0', 'model.layers.1']"
            )
        return default
    if isinstance(layers, (str, int)):
        layers = [layers]
    modules = dict(model.named_modules())
    out: list[str] = []
    for sel in layers:
        if isinstance(sel, bool) or not isinstance(sel, (int, str)):
            raise ModelStructureError(f"layers= takes decoder-layer indices or module paths, got {sel!r}")
        if isinstance(sel, int):
            if not default:
                raise ModelStructureError(
                    f"layer index {sel} given, but {type(model).__name__} has no decoder layers vlprune "
                    "recognises; pass module paths instead (layers=['model.layers.0', ...])"
                )
            if not 0 <= sel < len(default):
                raise ModelStructureError(
                    f"layer index {sel} is out of range: {type(model).__name__} has {len(default)} decoder "
                    f"layers (indices 0..{len(default) - 1})"
                )
            name = default[sel]
        else:
            if sel not in modules or not sel:
                hint = ", ".join(default[:3]) or ", ".join(n for n in list(modules)[1:4])
                raise ModelStructureError(
                    f"layers= names {sel!r}, which is not a module of {type(model).__name__}; "
                    f"decoder layer paths look like: {hint}"
                )
            name = sel
        if name in out:
            raise ModelStructureError(f"layers= names decoder layer {name!r} twice; give each layer once")
        out.append(name)
    if not out:
        raise ModelStructureError("layers= is empty; give at least one decoder layer (or None for all)")
    return out


# -- the capture ---------------------------------------------------------------------------------


class _LayerPairs:
    """Hooks on decoder layers: input (pre-hook) and output (forward hook) of each layer reduced at
    once to per-layer sums of cosine similarities (``all`` / ``last`` tokens) and, for the angular
    distance, the last-token states of the current batch only."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        tokens: Tokens,
        weighting: Weighting,
        dtype: torch.dtype,
        keep_last: bool,
    ) -> None:
        self.model, self.names, self.tokens, self.weighting = model, names, tokens, weighting
        self.dtype, self.keep_last = dtype, keep_last
        n = len(names)
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.angular = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        self.samples = 0
        self._mask: torch.Tensor | None = None
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []
        # what follows the last decoder layer (final norm, head) is not needed: each forward stops
        # after that layer's output hook, while the layers run in the first forward's order
        self._cut = ForwardCut(model)

    # rows of the real tokens, in the compute dtype, and each row's sample index
    def _rows(self, i: int, x: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.names[i]
        if x.dim() != 3:
            raise ModelStructureError(
                f"decoder layer {i} ({name}) {where} has shape {tuple(x.shape)}, not (batch, tokens, hidden); "
                "pass layers= naming modules whose input and output are hidden states"
            )
        b, t, _ = x.shape
        mask = self._mask
        if mask is not None and tuple(mask.shape) != (b, t):
            if mask.shape[0] == b and bool(mask.bool().all()):
                mask = None  # no padding: every token is real, whatever the length
            else:
                raise DataError(
                    f"the batch's attention_mask has shape {tuple(mask.shape)} but decoder layer {i} ({name}) "
                    f"sees {b} samples of {t} tokens, so padding cannot be located; give batches whose "
                    "attention_mask covers every token the decoder sees (for LLaVA-style models, input_ids "
                    "with the image placeholder tokens, as the processor makes them)"
                )
        m = (
            torch.ones(b, t, dtype=torch.bool, device=x.device)
            if mask is None
            else mask.to(device=x.device, dtype=torch.bool)
        )
        if self.tokens == "last":
            pos = torch.arange(t, device=x.device).expand(b, t)
            last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values
            keep = last >= 0
            sample = torch.arange(b, device=x.device)[keep]
            rows = x.detach()[sample, last[keep]]
        else:
            sample = m.nonzero()[:, 0]
            rows = x.detach()[m]
        rows = rows.to(self.dtype, copy=True)
        if not bool(torch.isfinite(rows).all()):
            raise DataError(
                f"decoder layer {i} ({name}) has NaN or Inf hidden states in its {where}; for fp16 models "
                "overflow is a common cause: run the scoring in bfloat16 or float32 (model.float()), or check "
                "the weights and inputs"
            )
        return rows, sample

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                raise ModelStructureError(
                    f"decoder layer {i} ({self.names[i]}) was called without a hidden-states tensor (first "
                    "positional argument or hidden_states=); pass layers= naming decoder layers"
                )
            self._inputs[i] = self._rows(i, x, "input")

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            y = first_tensor(output)
            if y is None or i not in self._inputs:
                raise ModelStructureError(
                    f"decoder layer {i} ({self.names[i]}) returned no tensor; pass layers= naming decoder layers"
                )
            x_rows, sample = self._inputs.pop(i)
            y_rows, _ = self._rows(i, y, "output")
            if y_rows.shape != x_rows.shape:
                raise ModelStructureError(
                    f"decoder layer {i} ({self.names[i]}) maps {tuple(x_rows.shape)} token rows to "
                    f"{tuple(y_rows.shape)}; layer similarity needs outputs shaped like the inputs"
                )
            cos = F.cosine_similarity(x_rows, y_rows, dim=-1)
            if self.weighting == "sample":
                b = int(sample.max()) + 1 if sample.numel() else 0
                per = torch.zeros(b, dtype=torch.float64, device=cos.device).index_add_(0, sample, cos.double())
                n = torch.zeros(b, dtype=torch.float64, device=cos.device).index_add_(
                    0, sample, torch.ones_like(cos, dtype=torch.float64)
                )
                present = n > 0
                self.sums[i] += float((per[present] / n[present]).sum())
                self.counts[i] += float(present.sum())
            else:
                self.sums[i] += float(cos.sum(dtype=torch.float64))
                self.counts[i] += cos.numel()
            if self.keep_last:
                self._last[i] = x_rows
                if i == len(self.names) - 1:
                    self._last[i + 1] = y_rows
            self._cut.called(i)

        return hook

    def __enter__(self) -> _LayerPairs:
        try:
            for i, name in enumerate(self.names):
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._post(i)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._last.clear()

    def run(self, batches: list[Any], progress: bool, desc: str) -> None:
        with preserved_mode(self.model, training=False), torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                self._mask = batch_mask(batch)
                self._inputs.clear()
                self._last.clear()
                try:
                    self._cut.forward(lambda: call_model(self.model, batch))
                finally:
                    self._mask = None
                missing = [self.names[i] for i in range(len(self.names)) if i in self._inputs]
                if missing:
                    raise ModelStructureError(f"decoder layer {missing[0]} ran its input hook but not its output hook")
                if self.keep_last:
                    self._reduce_angular()

    def _reduce_angular(self) -> None:
        n = len(self.names)
        if len(self._last) != n + 1:
            ran = len(self._last)
            raise ModelStructureError(
                f"only {ran} of the {n} decoder layers ran on a batch; the angular distance needs every layer of "
                "layers= to run once per forward"
            )
        states = torch.stack([self._last[i] for i in range(n + 1)])  # (n + 1, samples, hidden)
        unit = F.normalize(states, dim=-1)
        cos = torch.einsum("isd,jsd->ijs", unit, unit).clamp(-1.0, 1.0)
        self.angular += (torch.arccos(cos.double()) / math.pi).sum(dim=-1).cpu()
        self.samples += states.shape[1]
        self._last.clear()

    def similarity(self) -> torch.Tensor:
        if bool((self.counts == 0).any()):
            i = int((self.counts == 0).nonzero()[0])
            raise DataError(
                f"decoder layer {i} ({self.names[i]}) saw no non-padding token (did it run? are all "
                "attention_mask entries 0?); give batches with real tokens"
            )
        return self.sums / self.counts


def _check_common(tokens: str, weighting: str, dtype: torch.dtype) -> None:
    if tokens not in ("all", "last"):
        raise VLPruneError(f"tokens must be 'all' (every non-padding token) or 'last' (last token), got {tokens!r}")
    if weighting not in ("token", "sample"):
        raise VLPruneError(f"weighting must be 'token' or 'sample', got {weighting!r}")
    if dtype not in (torch.float32, torch.float64):
        raise VLPruneError(f"dtype must be torch.float32 or torch.float64 (the cosine's precision), got {dtype}")


def _layer_pairs(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelector,
    tokens: Tokens,
    weighting: Weighting,
    dtype: torch.dtype,
    keep_last: bool,
    progress: bool,
    desc: str,
) -> _LayerPairs:
    config = {"layers": layers, "tokens": tokens, "weighting": weighting, "dtype": dtype, "keep_last": keep_last}
    with distributed.guard(desc, model=model, config=config) as check:  # no collective before every rank is here
        _check_common(tokens, weighting, dtype)
        names = decoder_layers(model, layers)
        data = iterate_batches(batches)
        check.count("batches", len(data))
        with _LayerPairs(model, names, tokens, weighting, dtype, keep_last) as pairs:
            pairs.run(data, progress, desc)
    if distributed.is_active():  # each rank's batches are its shard: the sums and counts add up
        total = distributed.all_reduce_sum(
            {"sums": pairs.sums, "counts": pairs.counts, "angular": pairs.angular,
             "samples": torch.tensor(float(pairs.samples), dtype=torch.float64)}
        )
        pairs.sums, pairs.counts, pairs.angular = total["sums"], total["counts"], total["angular"]
        pairs.samples = int(round(float(total["samples"])))
    logger.debug("%s: %d decoder layers over %d batches", desc, len(names), len(data))
    return pairs


# -- scores --------------------------------------------------------------------------------------


def layer_similarity(
    model: nn.Module,
    batches: Iterable[Any],
    tokens: Tokens = "all",
    layers: LayerSelector = None,
    *,
    weighting: Weighting = "token",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> torch.Tensor:
    """Mean cosine similarity between each decoder layer's input and output hidden states.

    One forward pass per batch scores every layer: a pre-hook reads the layer's input (its first
    positional argument or ``hidden_states=``), a forward hook its output (a tensor, or the first
    tensor of a tuple); the two are reduced at once to per-layer sums, so memory stays at one extra
    hidden state. Padding (``attention_mask`` of a dict batch, which for LLaVA-style models covers the
    image tokens too) is excluded.

    Args:
        model: a transformers model with decoder layers (LLaVA family, decoder-only LMs, ...); left
            as it was (hooks removed, train/eval mode restored), also when this fails.
        batches: calibration batches the model accepts (``model(**batch)`` for dicts).
        tokens: ``"all"``: every non-padding token of every sample; ``"last"``: the last
            non-padding token of each sample (right or left padding).
        layers: decoder-layer indices or module paths (see :func:`decoder_layers`); default all.
        weighting: ``"token"`` (default): the mean over all scored tokens of all samples, so a long
            sample weighs more (the literal "mean over D's samples and tokens"; a documented choice,
            the paper gives no formula); ``"sample"``: each sample's mean first, then the mean over
            samples. Identical for ``tokens="last"``.
        dtype: precision of the cosine (float32 or float64) whatever the model's dtype; sums are
            float64.
        progress: tqdm bar over batches.

    Returns:
        float64 CPU tensor of shape ``(len(layers),)``, values in [-1, 1]; higher = the layer changes
        its input less = more removable.

    Raises:
        ModelStructureError: no decoder layers (names the class; pass ``layers=``), bad ``layers=``.
        DataError: empty batches, a failed forward, NaN/Inf hidden states (names the layer index),
            an ``attention_mask`` that does not match the decoder's sequence length.
        VLPruneError: a bad ``tokens`` / ``weighting`` / ``dtype``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model, example_inputs
        >>> model = tiny_model("llava")
        >>> layer_similarity(model, [example_inputs("llava", 4)], progress=False).shape
        torch.Size([2])
    """
    pairs = _layer_pairs(model, batches, layers, tokens, weighting, dtype, False, progress, "layer similarity")
    return pairs.similarity()


def block_influence(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelector = None,
    *,
    weighting: Weighting = "token",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> torch.Tensor:
    """ShortGPT's block influence ``BI_l = 1 - E[cos(x_l, x_{l+1})]`` over all tokens.

    ``1 - layer_similarity(model, batches, tokens="all", ...)``. Differences from ShortGPT's official
    code, on purpose: padding tokens are excluded (the official code includes them), a NaN/Inf
    hidden state raises a :class:`DataError` naming the layer (the official code maps NaN to 0.5),
    and the mean is token-weighted over all tokens of all samples (the official code sums per-token
    scores; the ranking is the same for a fixed set of batches).

    Args:
        model, batches, layers, weighting, dtype, progress: as in :func:`layer_similarity`.

    Returns:
        float64 tensor ``(len(layers),)`` in [0, 2]; **lower = more removable** (ShortGPT removes
        the lowest BI).

    Raises:
        As :func:`layer_similarity`.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model, example_inputs
        >>> bi = block_influence(tiny_model("llava"), [example_inputs("llava", 4)], progress=False)
    """
    return 1.0 - layer_similarity(
        model, batches, "all", layers, weighting=weighting, dtype=dtype, progress=progress
    )


def angular_distance_matrix(
    model: nn.Module,
    batches: Iterable[Any],
    layers: LayerSelector = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> torch.Tensor:
    """Mean angular distance between the last-token states of every pair of layer boundaries.

    Boundary ``i`` (``0 <= i <= L``) is the input of layer ``i`` (``x^i``), and boundary ``L`` the output
    of the last layer (before any final norm). ``M[i, j] = mean over samples of
    arccos(cos(x^i_T, x^j_T)) / pi`` with ``T`` each sample's last non-padding token, so Gromov et
    al.'s ``d(l, n) = M[l, l + n]`` for every run length ``n`` from one pass.

    Args:
        model, batches, dtype, progress: as in :func:`layer_similarity`.
        layers: the decoder layers (default all); runs are taken over consecutive entries, so give
            consecutive layers of one stack.

    Returns:
        float64 tensor ``(L + 1, L + 1)``, symmetric, values in [0, 1], zero diagonal (up to rounding).

    Raises:
        As :func:`layer_similarity`; ModelStructureError if some layer of ``layers`` does not run.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model, example_inputs
        >>> m = angular_distance_matrix(tiny_model("llava"), [example_inputs("llava", 4)], progress=False)
        >>> m.shape
        torch.Size([3, 3])
    """
    pairs = _layer_pairs(model, batches, layers, "last", "token", dtype, True, progress, "angular distance")
    if pairs.samples == 0:
        raise DataError("no sample had a non-padding token; give batches with real tokens")
    return pairs.angular / pairs.samples


def angular_distance(
    model: nn.Module,
    batches: Iterable[Any],
    n: int = 1,
    layers: LayerSelector = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> torch.Tensor:
    """Gromov et al.'s angular distance ``d(l, n) = arccos(cos(x^l_T, x^{l+n}_T)) / pi`` per start ``l``.

    ``x^l`` is the input of layer ``l`` and ``x^{l+n}`` the input of layer ``l + n`` (the output of
    layer ``l + n - 1``, before any final norm), on each sample's last non-padding token, averaged
    over samples. Removing layers ``l .. l + n - 1`` for the smallest ``d`` is Gromov et al.'s choice
    (then heal); :func:`select_run` does that with the protection rule.

    Args:
        model, batches, layers, dtype, progress: as in :func:`angular_distance_matrix`.
        n: run length, ``1 <= n <= L``.

    Returns:
        float64 tensor of length ``L - n + 1`` (entry ``l``: the run starting at layer ``l``), values
        in [0, 1]; **lower = more removable**.

    Raises:
        VLPruneError: ``n`` out of range (after the pass; validate with ``len(decoder_layers(model))``).
        And as :func:`angular_distance_matrix`.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model, example_inputs
        >>> angular_distance(tiny_model("llava"), [example_inputs("llava", 4)], n=1, progress=False).shape
        torch.Size([2])
    """
    with distributed.guard("angular distance", model=model, config={"n": n, "layers": layers}):
        n_layers = len(decoder_layers(model, layers))
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_layers:
            raise VLPruneError(f"n (the run length) must be an integer in 1..{n_layers} (the decoder layers), got {n!r}")
    matrix = angular_distance_matrix(model, batches, layers, dtype=dtype, progress=progress)
    return torch.stack([matrix[i, i + n] for i in range(n_layers - n + 1)])


# -- domains -------------------------------------------------------------------------------------


def domain_similarity(
    model: nn.Module,
    domain_batches: Mapping[str, Iterable[Any]],
    tokens: Tokens = "all",
    layers: LayerSelector = None,
    *,
    weighting: Weighting = "token",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """:func:`layer_similarity` per domain: how strongly each layer transforms each domain's inputs.

    Args:
        model: as in :func:`layer_similarity`.
        domain_batches: domain name -> its calibration batches, e.g. ``{"math": ..., "general": ...}``.
        tokens, layers, weighting, dtype, progress: as in :func:`layer_similarity`.

    Returns:
        domain -> float64 tensor ``(len(layers),)``, in the mapping's order.

    Raises:
        DataError: no domain, or a domain with no batches (checked before any forward pass).
        And as :func:`layer_similarity`.

    Example:
        >>> import vlprune
        >>> model = vlprune.testbed.load("llava")                                      # doctest: +SKIP
        >>> data = {d: vlprune.testbed.batches("llava", 32, 16, task=d) for d in ("math", "general")}
        >>> scores = domain_similarity(model, data)                                  # doctest: +SKIP
    """
    if not isinstance(domain_batches, Mapping) or not domain_batches:
        raise DataError(
            "domain_batches must be a non-empty mapping of domain name -> batches, "
            "e.g. {'math': math_batches, 'general': general_batches}"
        )
    materialised: dict[str, list[Any]] = {}
    config = {"domains": list(domain_batches), "layers": layers, "tokens": tokens, "weighting": weighting, "dtype": dtype}
    with distributed.guard("domain similarity", model=model, config=config):
        for domain, data in domain_batches.items():
            try:
                materialised[domain] = iterate_batches(data)
            except DataError:
                raise DataError(f"domain {domain!r} has no calibration batches; give it at least one batch or drop it") from None
        _check_common(tokens, weighting, dtype)
        names = decoder_layers(model, layers)
    return {
        d: layer_similarity(model, b, tokens, names, weighting=weighting, dtype=dtype, progress=progress)
        for d, b in materialised.items()
    }


def combine_domains(
    scores: Mapping[str, torch.Tensor],
    domain: str = "mixed",
    alpha: float = 0.5,
    *,
    math_key: str = "math",
) -> torch.Tensor:
    """The similarity profile a domain-aware ranking uses, from precomputed per-domain scores.

    Args:
        scores: domain -> per-layer similarity (:func:`domain_similarity`).
        domain: a key of ``scores`` (that domain's profile: ``"math"`` = math-aware ranking,
            ``"general"`` = general-aware ...) or ``"mixed"``: ``alpha * s[math_key] + (1 - alpha) *
            mean of the other domains' s`` (the paper names a mixed ranking without its weight: a
            documented choice; with two domains it is ``alpha * math + (1 - alpha) * general``).
        alpha: weight of ``math_key`` in ``"mixed"``, in [0, 1].
        math_key: the key of the math (target) domain for ``"mixed"``.

    Returns:
        float64 tensor, one value per layer (higher = more removable for that domain).

    Raises:
        DataError: unknown domain, no ``math_key`` or no other domain for ``"mixed"``, scores of
            different lengths or with NaN.
        VLPruneError: ``alpha`` outside [0, 1].

    Example:
        >>> combine_domains({"math": torch.tensor([0.9, 0.5]), "general": torch.tensor([0.5, 0.9])}, alpha=0.75)
        tensor([0.8000, 0.6000], dtype=torch.float64)
    """
    if not isinstance(scores, Mapping) or not scores:
        raise DataError("scores must be a non-empty mapping domain -> per-layer scores (see domain_similarity)")
    checked = {d: _check_scores(s, f"scores of domain {d!r}") for d, s in scores.items()}
    lengths = {d: s.numel() for d, s in checked.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"the domains' scores have different lengths {lengths}; score every domain on the same layers")
    if domain != "mixed":
        if domain not in checked:
            raise DataError(f"unknown domain {domain!r}; choose one of {[*checked, 'mixed']}")
        return checked[domain]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise VLPruneError(f"alpha (the weight of {math_key!r} in 'mixed') must be a number in [0, 1], got {alpha!r}")
    if math_key not in checked:
        raise DataError(
            f"domain 'mixed' needs the math domain {math_key!r} among the scores' keys {list(checked)}; "
            "pass math_key= naming it"
        )
    others = [s for d, s in checked.items() if d != math_key]
    if not others:
        raise DataError(f"domain 'mixed' needs at least one domain besides {math_key!r}; got only {list(checked)}")
    return float(alpha) * checked[math_key] + (1.0 - float(alpha)) * torch.stack(others).mean(dim=0)


def rank_layers(
    model_or_scores: nn.Module | Mapping[str, torch.Tensor],
    domain_batches: Mapping[str, Iterable[Any]] | None = None,
    domain: str = "mixed",
    alpha: float = 0.5,
    *,
    math_key: str = "math",
    tokens: Tokens = "all",
    layers: LayerSelector = None,
    progress: bool = True,
) -> list[int]:
    """Decoder layers from most to least removable for ``domain`` (highest similarity first).

    Args:
        model_or_scores: a model (then ``domain_batches`` is scored with :func:`domain_similarity`)
            or precomputed scores ``{domain: tensor}`` (no forward pass).
        domain_batches: domain -> batches, with a model.
        domain, alpha, math_key: see :func:`combine_domains`.
        tokens, layers, progress: as in :func:`domain_similarity` (with a model).

    Returns:
        Every layer index (positions in :func:`decoder_layers` order), most removable first; ties go
        to the lower index. Protection of the first / last layers is :func:`select_layers`'s job.

    Raises:
        DataError: a model without ``domain_batches``; as :func:`combine_domains` and
            :func:`domain_similarity`.

    Example:
        >>> rank_layers({"math": torch.tensor([0.2, 0.9, 0.5])}, domain="math")
        [1, 2, 0]
    """
    if isinstance(model_or_scores, nn.Module):
        if domain_batches is None:
            raise DataError("rank_layers(model, ...) needs domain_batches={'math': ..., 'general': ...}")
        scores = domain_similarity(model_or_scores, domain_batches, tokens, layers, progress=progress)
    else:
        scores = model_or_scores
    profile = combine_domains(scores, domain, alpha, math_key=math_key)
    return _order(profile, higher_is_removable=True)




@hookimpl
def vlprune_register_criteria() -> list[CriterionSpec]:
    """Register ``layer_similarity``, ``block_influence`` and ``angular_distance``."""
    module = "vlprune.plugins.layer_similarity"
    return [
        CriterionSpec(
            name="layer_similarity",
            level="layer",
            needs="calibration",
            adapters={
                "hf_layers": f"{module}:layer_similarity",
                "nni": "vlprune.adapters.nni.layers:LayerSimilarityPruner",
            },
            description="cosine(input, output) of each decoder layer per domain (higher = more removable); "
            "domain-aware ranking, rank / spacing / regime selection",
            source="Khaki et al., Understanding Pruning Regimes in VLMs Through Domain-Aware Layer Selection, 2026",
        ),
        CriterionSpec(
            name="block_influence",
            level="layer",
            needs="calibration",
            adapters={"hf_layers": f"{module}:block_influence"},
            description="ShortGPT block influence 1 - cos(input, output) over all tokens (lower = more removable)",
            source="Men et al., ShortGPT, 2024",
        ),
        CriterionSpec(
            name="angular_distance",
            level="layer",
            needs="calibration",
            adapters={"hf_layers": f"{module}:angular_distance"},
            description="arccos(cos(x^l, x^(l+n)))/pi on the last token per run of n layers (lower = more removable)",
            source="Gromov et al., The Unreasonable Ineffectiveness of the Deeper Layers, 2024",
        ),
    ]
