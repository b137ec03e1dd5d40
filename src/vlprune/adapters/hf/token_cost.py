"""Cost of visual-token pruning: theoretical prefill FLOPs and measured latency, pruned vs unpruned.

:func:`prefill_flops` is the FastV / DivPrune papers' prefill cost of the language model,
``T (4 n d^2 + 2 n^2 d + 2 n d m)`` (T layers, n tokens, hidden d, MLP width m), with FastV's two
segments (``K`` layers at the full length, ``T - K`` at the pruned one). :func:`measure_token_pruning`
times one prefill forward and one greedy ``generate()`` with and without
:func:`~vlprune.adapters.hf.token_pruning.prune_visual_tokens`, alternating the two in every repeat
so that both see the same machine load. Both names are re-exported by ``token_pruning``.

Example:
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008)
    >>> round(prefill_flops(cfg, 636, reduced_tokens=60 + 58) / prefill_flops(cfg, 636), 3)   # LLaVA-1.5-7B, DivPrune ~10 %
    0.181
"""

from __future__ import annotations

import inspect
import numbers
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins.capture import model_device

if TYPE_CHECKING:
    from vlprune.adapters.hf.token_pruning import Positions, TokenMethod

__all__ = ["prefill_flops", "measure_token_pruning"]


def _text_dims(model_or_config: Any) -> tuple[int, int, int]:
    cfg = getattr(model_or_config, "config", model_or_config)
    cfg = getattr(cfg, "text_config", None) or cfg
    try:
        return int(cfg.num_hidden_layers), int(cfg.hidden_size), int(cfg.intermediate_size)
    except AttributeError:
        raise ModelStructureError(
            f"{type(model_or_config).__name__} has no language-model config with num_hidden_layers, hidden_size and "
            "intermediate_size; pass the model or its (text) config"
        ) from None


def prefill_flops(
    model_or_config: Any,
    n_tokens: int,
    *,
    reduced_tokens: int | None = None,
    from_layer: int = 0,
) -> float:
    """Theoretical prefill FLOPs of the language model, ``T (4 n d^2 + 2 n^2 d + 2 n d m)`` (FastV / DivPrune papers).

    ``T`` layers, ``n`` tokens, hidden size ``d``, MLP width ``m``. With ``reduced_tokens`` the layers
    from ``from_layer`` on run on ``reduced_tokens`` tokens: ``from_layer=0`` is input-stage pruning
    (DivPrune), ``from_layer=K`` is FastV (``K`` layers at ``n``, ``T-K`` at the reduced count). The
    formula is the papers' (multi-head attention, two-matrix MLP); it ignores GQA, gated MLPs, the
    vision tower and the LM head, so use it for ratios.

    Args:
        model_or_config: a multimodal model / its config (the text config is used) or a text config.
        n_tokens: prompt length before pruning.
        reduced_tokens: prompt length after pruning (None: no pruning).
        from_layer: first layer that sees ``reduced_tokens``.

    Returns:
        FLOPs (float).

    Raises:
        ModelStructureError: no text config with ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``.
        VLPruneError: a negative / non-int count, or ``from_layer`` beyond the layers.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=16, num_attention_heads=2)
        >>> prefill_flops(cfg, 10)              # 2 * (4*10*64 + 2*100*8 + 2*10*8*16)
        13440.0
        >>> prefill_flops(cfg, 10, reduced_tokens=5, from_layer=1)     # FastV: layer 0 at 10, layer 1 at 5
        9680.0
    """
    t, d, m = _text_dims(model_or_config)
    for name, v in (("n_tokens", n_tokens), ("reduced_tokens", reduced_tokens), ("from_layer", from_layer)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
            raise VLPruneError(f"{name} must be an int >= 0, got {v!r}")
    if from_layer > t:
        raise VLPruneError(f"from_layer={from_layer} is beyond the language model's {t} layers")

    def per_layer(n: int) -> float:
        return float(4 * n * d * d + 2 * n * n * d + 2 * n * d * m)

    if reduced_tokens is None:
        return t * per_layer(n_tokens)
    return from_layer * per_layer(n_tokens) + (t - from_layer) * per_layer(reduced_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_token_pruning(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    method: str | TokenMethod = "divprune",
    keep: int | float | None = None,
    *,
    positions: Positions | None = None,
    max_new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    **method_kwargs: Any,
) -> dict[str, float]:
    """Theoretical prefill FLOPs and measured latency, unpruned and pruned, side by side.

    Prefill = one ``model(**batch, use_cache=True)`` forward, with ``logits_to_keep=1`` where the
    model takes it (as ``generate()``'s first step: the time to the first token); end-to-end =
    ``model.generate(**batch, max_new_tokens=..., do_sample=False)``. Both include the vision tower. Every repeat times the
    unpruned and the pruned model back to back (the pruning is attached and detached around its
    runs), so a change of machine load hits both; each time is the best of ``repeats`` after
    ``warmup`` untimed rounds (CUDA synchronised).

    Args:
        model: the model (eval mode; left as it was).
        batch: inputs with ``input_ids`` (image tokens), ``pixel_values``, optional ``attention_mask``.
        method, keep, positions, method_kwargs: as in :func:`~vlprune.adapters.hf.token_pruning.prune_visual_tokens`.
        max_new_tokens: generated tokens for the end-to-end time (a fixed count: ``min_new_tokens`` too).
        repeats: timed rounds (best kept).
        warmup: untimed rounds first.

    Returns:
        ``n_tokens``, ``kept_tokens``, ``flops_full``, ``flops_pruned``, ``flops_ratio``,
        ``prefill_s_full``, ``prefill_s_pruned``, ``prefill_ratio`` (pruned / full),
        ``generate_s_full``, ``generate_s_pruned``, ``generate_ratio``.

    Raises:
        VLPruneError: ``repeats`` < 1 or ``warmup`` < 0, or what :func:`prune_visual_tokens` refuses.

    Example:
        >>> from vlprune.testbed.tiny import example_inputs, tiny_model
        >>> stats = measure_token_pruning(tiny_model("llava"), example_inputs("llava"), keep=0.25,
        ...                               max_new_tokens=2, repeats=1, warmup=0)
        >>> stats["flops_ratio"] < 1
        True
    """
    from vlprune.adapters.hf.token_pruning import DEFAULT_POSITIONS, FastV, VisualTokenPruning, _make_method

    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise VLPruneError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise VLPruneError(f"warmup must be an int >= 0, got {warmup!r}")
    pruner = VisualTokenPruning(model, _make_method(method, keep, method_kwargs), positions or DEFAULT_POSITIONS)
    device = model_device(model)
    n = int(batch["input_ids"].shape[1])
    gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if getattr(getattr(model, "generation_config", None), "pad_token_id", None) is None:
        gen["pad_token_id"] = 0

    extra: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1

    def prefill() -> None:
        model(**batch, **extra)

    def generate() -> None:
        model.generate(**batch, **gen)

    best = {k: float("inf") for k in ("prefill_s_full", "prefill_s_pruned", "generate_s_full", "generate_s_pruned")}
    for r in range(warmup + repeats):
        times = {"prefill_s_full": _once(prefill, device), "generate_s_full": _once(generate, device)}
        with pruner:
            times["prefill_s_pruned"] = _once(prefill, device)
            times["generate_s_pruned"] = _once(generate, device)
        if r >= warmup:
            best = {k: min(v, times[k]) for k, v in best.items()}
    with pruner:
        prefill()
    assert pruner.last_kept is not None
    kept = int(pruner.last_kept.shape[1])
    start = pruner.method.layer if isinstance(pruner.method, FastV) else 0
    out: dict[str, float] = {"n_tokens": float(n), "kept_tokens": float(kept), **best}
    out["prefill_ratio"] = out["prefill_s_pruned"] / out["prefill_s_full"]
    out["generate_ratio"] = out["generate_s_pruned"] / out["generate_s_full"]
    out["flops_full"] = prefill_flops(model, n)
    out["flops_pruned"] = prefill_flops(model, n, reduced_tokens=kept, from_layer=start)
    out["flops_ratio"] = out["flops_pruned"] / out["flops_full"]
    return out
