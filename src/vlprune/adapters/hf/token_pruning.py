"""Visual-token pruning at run time for LLaVA-style transformers models (DivPrune, FastV, baselines).

:func:`prune_visual_tokens` attaches a token criterion (``plugins/token_diversity.py``) to a
multimodal model through forward hooks; no weight, config or module is changed, and detaching
removes every hook (outputs are then bit-identical to the unpruned model's).

Where tokens are dropped:

* **Input stage** (``DivPrune``, ``RandomTokens``, ``UniformTokens``): a forward pre-hook on the
  language model takes the projected image features out of ``inputs_embeds`` (the rows whose
  ``input_ids`` are the image token), selects ``M`` of the ``N`` per sample and drops the others
  before the first decoder layer. ``attention_mask`` and ``position_ids`` are cut the same way; the
  key/value cache therefore holds the kept tokens only, and on later decoding steps the attention
  mask ``generate()`` passes (still of the original length) is cut to match. Text tokens are never
  dropped.
* **Layer stage** (``FastV``): the first ``K`` decoder layers run on the full sequence; a hook on the
  attention of layer ``K-1`` reads the attention the last prompt token (the last unpadded one) gives
  to every image token (head-averaged), and from layer ``K`` on the hidden states, the 4-D attention
  mask and the rotary embeddings keep only the top image tokens. Layers ``< K`` cache the full
  sequence, layers ``>= K`` the shorter one (transformers' ``DynamicCache`` is per layer); during
  decoding the mask of layers ``>= K`` is cut to their cache. FastV needs attention weights, i.e.
  ``attn_implementation="eager"``. Without a cache (``generate(use_cache=False)``) every step is a
  new prefill, so FastV re-ranks with the newest last token; the input-stage methods select the same
  tokens at every step (their choice depends on the image features only), so cached and uncached
  greedy decoding agree.

Position ids (``positions=``): ``"original"`` (kept tokens keep their RoPE positions, as FastV does;
the default, chosen from the testbed measurement in the docs) or ``"contiguous"`` (positions are
renumbered without gaps, what the official DivPrune code ends up doing: a kept token's position is
its original one minus the number of dropped tokens before it). FastV supports ``"original"`` only.

Outputs cover the kept tokens: ``model(**batch).logits`` has ``L - dropped`` positions
(:attr:`VisualTokenPruning.last_kept` holds the kept positions of the latest prefill, to align your
labels); ``generate()`` is unaffected in shape. ``labels=`` is refused while attached.

Cost (``token_cost.py``, re-exported here): :func:`prefill_flops` is the paper's theoretical prefill
cost ``T (4 n d^2 + 2 n^2 d + 2 n d m)`` (T layers, n tokens, hidden d, MLP width m), with FastV's two
segments; :func:`measure_token_pruning` times prefill and generation with and without pruning side by
side.

Families: ``LlavaForConditionalGeneration`` (tested); any model whose multimodal core has a
``language_model`` sub-module fed with ``inputs_embeds`` and an ``image_token_id`` in its config
(LLaVA-Next, LLaVA-OneVision, Qwen2-VL style) is accepted but untested; samples in one batch must
have the same number of image tokens.

Example:
    >>> import vlprune.testbed as tb
    >>> model = tb.load("llava")                                          # doctest: +SKIP
    >>> batch = tb.example_inputs("llava")                                # doctest: +SKIP
    >>> with prune_visual_tokens(model, "divprune", keep=0.25):           # doctest: +SKIP
    ...     out = model.generate(**batch, max_new_tokens=4)
"""

from __future__ import annotations

import logging
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from vlprune.adapters.hf.token_cost import measure_token_pruning, prefill_flops
from vlprune.errors import DataError, ModelStructureError, VLPruneError

__all__ = [
    "Positions",
    "TokenMethod",
    "DivPrune",
    "FastV",
    "RandomTokens",
    "UniformTokens",
    "TOKEN_METHODS",
    "VisualTokenPruning",
    "prune_visual_tokens",
    "prefill_flops",
    "measure_token_pruning",
    "DEFAULT_POSITIONS",
]

logger = logging.getLogger(__name__)

Positions = Literal["original", "contiguous"]
#: default ``positions=``: the mode that kept quality on the testbed LLaVA. VQA math / general and
#: caption CIDEr/10 on 300 test scenes each (unpruned 0.72 / 0.93 / 0.95), DivPrune keeping 2, 4, 8
#: of the 16 image tokens: original 0.18/0.33/0.27, 0.33/0.50/0.53, 0.60/0.80/0.83; contiguous
#: 0.20/0.22/0.19, 0.29/0.26/0.27, 0.40/0.34/0.34 (the uniform and random baselines show the same gap)
#: (benchmarks/bench_tokens.py, 500 scenes: the same gap at 25 / 50 %; docs/benchmarks.md, Visual-token pruning)
DEFAULT_POSITIONS: Positions = "original"


# ----------------------------------------------------------------------------------------------
# methods: thin wrappers over plugins.token_diversity
# ----------------------------------------------------------------------------------------------


def _check_keep(keep: Any) -> int | float:
    from vlprune.plugins.token_diversity import keep_count

    keep_count(keep, 10**9 if isinstance(keep, numbers.Integral) else 1000)  # validates type / range
    return keep


class TokenMethod:
    """A visual-token criterion as :func:`prune_visual_tokens` uses it.

    Subclasses set ``stage`` (``"input"``: before the first language-model layer; ``"layer"``:
    inside the decoder, FastV) and implement :meth:`select`.

    Args:
        keep: image tokens kept per sample: an int count or a ratio in (0, 1].
    """

    name: str = "token_method"
    stage: Literal["input", "layer"] = "input"

    def __init__(self, keep: int | float = 0.1) -> None:
        self.keep = _check_keep(keep)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        """Indices (B, M), ascending, of the kept image tokens among the (B, N, D) ``features``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep!r})"


class DivPrune(TokenMethod):
    """DivPrune (Alvar et al., CVPR 2025): the max-min-diverse image tokens after the projector.

    Args:
        keep: kept image tokens per sample, a count or a ratio (paper: 0.098).

    Example:
        >>> DivPrune(keep=0.1).stage
        'input'
    """

    name = "divprune"

    def __init__(self, keep: int | float = 0.098) -> None:
        super().__init__(keep)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        from vlprune.plugins.token_diversity import divprune_select

        return divprune_select(features, self.keep)


class RandomTokens(TokenMethod):
    """Random baseline: ``keep`` image tokens per sample drawn with ``seed`` (the same draw per call).

    Args:
        keep: kept image tokens per sample, a count or a ratio.
        seed: seed of the draw.
    """

    name = "random_tokens"

    def __init__(self, keep: int | float = 0.1, seed: int = 0) -> None:
        super().__init__(keep)
        self.seed = int(seed)

    def select(self, features: torch.Tensor) -> torch.Tensor:
        from vlprune.plugins.token_diversity import random_select

        b, n = features.shape[:2]
        return random_select(n, self.keep, seed=self.seed, batch=b, device=features.device)


class UniformTokens(TokenMethod):
    """Uniform-stride baseline: every ``N/M``-th image token.

    Args:
        keep: kept image tokens per sample, a count or a ratio.
    """

    name = "uniform_tokens"

    def select(self, features: torch.Tensor) -> torch.Tensor:
        from vlprune.plugins.token_diversity import uniform_select

        b, n = features.shape[:2]
        return uniform_select(n, self.keep, batch=b, device=features.device)


class FastV(TokenMethod):
    """FastV (Chen et al., 2024): image tokens ranked by the attention of the last prompt token.

    Args:
        keep: kept image tokens per sample (paper: 0.5, i.e. R = 50 % dropped).
        layer: K; ranking uses layer K-1's attention, tokens are dropped from layer K on (paper: 2).

    Example:
        >>> FastV().layer, FastV().keep
        (2, 0.5)
    """

    name = "fastv"
    stage = "layer"

    def __init__(self, keep: int | float = 0.5, layer: int = 2) -> None:
        super().__init__(keep)
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 1:
            raise VLPruneError(f"FastV layer K must be an int >= 1 (tokens are ranked at layer K-1), got {layer!r}")
        self.layer = int(layer)

    def select_from_attention(self, attention: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """Kept image positions (B, M) from the last query's attention row (B, heads, T)."""
        from vlprune.plugins.token_diversity import fastv_select

        return fastv_select(attention, image_mask, self.keep)

    def __repr__(self) -> str:
        return f"FastV(keep={self.keep!r}, layer={self.layer})"


#: method names :func:`prune_visual_tokens` accepts (the registry's criterion names)
TOKEN_METHODS: dict[str, type[TokenMethod]] = {
    "divprune": DivPrune,
    "fastv": FastV,
    "random_tokens": RandomTokens,
    "random": RandomTokens,
    "uniform_tokens": UniformTokens,
    "uniform": UniformTokens,
}


def _make_method(method: str | TokenMethod, keep: int | float | None, kwargs: dict[str, Any]) -> TokenMethod:
    if isinstance(method, TokenMethod):
        if keep is not None or kwargs:
            raise VLPruneError(
                f"method={method!r} is already built; pass keep= and other options to its constructor, not to "
                "prune_visual_tokens"
            )
        return method
    if not isinstance(method, str) or method not in TOKEN_METHODS:
        raise VLPruneError(
            f"unknown visual-token method {method!r}; choose one of {sorted(set(TOKEN_METHODS))} or pass a "
            "TokenMethod (e.g. vlprune.get_criterion('divprune', adapter='hf_tokens', keep=0.1))"
        )
    cls = TOKEN_METHODS[method]
    if keep is not None:
        kwargs = {**kwargs, "keep": keep}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise VLPruneError(f"bad options for method {method!r}: {err}") from None


# ----------------------------------------------------------------------------------------------
# finding the model's parts
# ----------------------------------------------------------------------------------------------


@dataclass
class _Parts:
    core: nn.Module  # the multimodal model whose forward sees input_ids and calls language_model
    lm: nn.Module  # the text decoder (LlamaModel, ...)
    layers: nn.ModuleList
    image_token_id: int
    text_config: Any


def _find_parts(model: nn.Module) -> _Parts:
    candidates = [model] + [m for _, m in model.named_modules()]
    for core in candidates:
        lm = getattr(core, "language_model", None)
        cfg = getattr(core, "config", None)
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        if isinstance(lm, nn.Module) and token is not None:
            layers = getattr(lm, "layers", None)
            if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
                inner = getattr(lm, "model", None)
                layers = getattr(inner, "layers", None)
                if isinstance(layers, nn.ModuleList):
                    lm = inner
            if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
                continue
            return _Parts(core, lm, layers, int(token), getattr(lm, "config", None))
    raise ModelStructureError(
        f"{type(model).__name__} has no known place for visual tokens: prune_visual_tokens needs a multimodal model "
        "with a `language_model` sub-module fed with inputs_embeds and an image_token_id in its config "
        "(LlavaForConditionalGeneration and LLaVA-style models)"
    )


def _attn_impl(parts: _Parts) -> str | None:
    cfg = parts.text_config
    return getattr(cfg, "_attn_implementation", None)


# ----------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------


@dataclass
class _Session:
    """What a pruned prefill leaves for the decoding steps that reuse its cache."""

    orig_len: int  # prefill length before pruning
    keep_idx: torch.Tensor  # (B, L') kept positions of the prefill, ascending
    dropped_before_end: int  # tokens dropped in every row (positions after the image shift by this)

    @property
    def kept_len(self) -> int:
        return int(self.keep_idx.shape[1])


@dataclass
class _Prefill:
    """One forward in progress that carries image tokens."""

    image_mask: torch.Tensor  # (B, L) bool
    attention_2d: torch.Tensor  # (B, L) long
    cache: Any
    keep_idx: torch.Tensor | None = None  # FastV: set at layer K-1
    cut: dict[str, Any] = field(default_factory=dict)  # FastV: per-forward cut kwargs


def _dropped_before(keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, L') number of dropped positions before each kept position."""
    ranks = torch.arange(keep_idx.shape[1], device=keep_idx.device).unsqueeze(0)
    return keep_idx - ranks


class VisualTokenPruning:
    """Handle of visual-token pruning attached to a model (context manager; attach / detach).

    Build it with :func:`prune_visual_tokens`. While attached, every ``model(**batch)`` and
    ``model.generate(**batch)`` whose inputs carry image tokens runs with ``method``'s kept tokens.

    Attributes:
        model: the model.
        method: the :class:`TokenMethod`.
        positions: ``"original"`` or ``"contiguous"``.
        last_kept: (B, L') kept positions of the latest pruned prefill (None before the first).
    """

    def __init__(self, model: nn.Module, method: TokenMethod, positions: Positions) -> None:
        self.model = model
        self.method = method
        self.positions: Positions = positions
        self.parts = _find_parts(model)
        self.last_kept: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._sessions: dict[int, tuple[weakref.ref, _Session]] = {}
        self._pending: tuple[torch.Tensor | None, bool] | None = None
        self._current: _Prefill | None = None
        self._check()

    # -- checks --------------------------------------------------------------------------------

    def _check(self) -> None:
        if self.positions not in ("original", "contiguous"):
            raise VLPruneError(f"positions must be 'original' or 'contiguous', got {self.positions!r}")
        if isinstance(self.method, FastV):
            n_layers = len(self.parts.layers)
            if self.method.layer >= n_layers:
                raise VLPruneError(
                    f"FastV layer K={self.method.layer} is beyond the language model's {n_layers} layers "
                    f"(tokens are dropped from layer K on); choose 1 <= K <= {n_layers - 1}"
                )
            impl = _attn_impl(self.parts)
            if impl != "eager":
                raise VLPruneError(
                    f"FastV ranks tokens by attention weights, which attn_implementation={impl!r} does not return; "
                    "load the model with attn_implementation=\"eager\" (or call model.set_attn_implementation(\"eager\"))"
                )
            if self.positions != "original":
                raise VLPruneError(
                    "FastV keeps the original RoPE positions of the kept tokens; positions='contiguous' is for the "
                    "input-stage methods (divprune, random_tokens, uniform_tokens)"
                )

    # -- attach / detach -----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> "VisualTokenPruning":
        """Install the hooks (idempotent). Returns self.

        Raises:
            VLPruneError: another visual-token pruning is attached to this model.
        """
        if self.attached:
            return self
        other = getattr(self.model, "_vlprune_token_pruning", None)
        if other is not None and other is not self:
            raise VLPruneError(
                "visual-token pruning is already attached to this model; detach it first (pruner.detach()) "
                "before attaching another"
            )
        p = self.parts
        handles = []
        try:
            handles.append(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            handles.append(p.core.register_forward_pre_hook(self._core_pre, with_kwargs=True))
            handles.append(p.core.register_forward_hook(self._core_post, always_call=True))
            handles.append(p.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            handles.append(p.lm.register_forward_hook(self._lm_post, always_call=True))
            if isinstance(self.method, FastV):
                k = self.method.layer
                attn = getattr(p.layers[k - 1], "self_attn", None)
                if attn is None:
                    raise ModelStructureError(
                        f"FastV needs the attention module of decoder layer {k - 1} (`self_attn`); "
                        f"{type(p.layers[k - 1]).__name__} has none"
                    )
                handles.append(attn.register_forward_hook(self._attn_post))
                for layer in p.layers[k:]:
                    handles.append(layer.register_forward_pre_hook(self._layer_pre, with_kwargs=True))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        self.model._vlprune_token_pruning = self  # type: ignore[assignment]
        logger.debug("attached %r to %s (positions=%s)", self.method, type(self.model).__name__, self.positions)
        return self

    def detach(self) -> None:
        """Remove every hook; the model then behaves exactly as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sessions.clear()
        self._pending = None
        self._current = None
        if getattr(self.model, "_vlprune_token_pruning", None) is self:
            del self.model._vlprune_token_pruning
        logger.debug("detached %r", self.method)

    def __enter__(self) -> "VisualTokenPruning":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"VisualTokenPruning({self.method!r}, positions={self.positions!r}, {state})"

    # -- sessions ------------------------------------------------------------------------------

    def _session(self, cache: Any) -> _Session | None:
        if cache is None:
            return None
        entry = self._sessions.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        return entry[1]

    def _remember(self, cache: Any, session: _Session) -> None:
        for key in [k for k, (ref, _) in self._sessions.items() if ref() is None]:
            del self._sessions[key]
        if cache is not None:
            self._sessions[id(cache)] = (weakref.ref(cache), session)

    # -- hooks ---------------------------------------------------------------------------------

    def _top_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("labels") is not None:
            raise VLPruneError(
                "labels= is not supported while visual tokens are pruned (the logits cover the kept tokens only); "
                "compute the loss yourself on out.logits with labels cut by pruner.last_kept, or detach first"
            )

    def _core_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        has_images = kwargs.get("pixel_values") is not None or bool(kwargs.get("mm_encoder_outputs"))
        image_mask = None
        if has_images and input_ids is not None:
            image_mask = input_ids == self.parts.image_token_id
        elif has_images and kwargs.get("inputs_embeds") is not None:
            emb = kwargs["inputs_embeds"]
            token = torch.full((), self.parts.image_token_id, dtype=torch.long, device=emb.device)
            image_mask = (emb == module.get_input_embeddings()(token)).all(-1)
        # without pixel values, image-token ids are plain text to the model (LLaVA embeds them as such)
        self._pending = (image_mask, has_images)

    def _core_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._pending = None

    def _lm_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._current = None

    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        pending, self._pending = self._pending, None
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            return None  # called directly with input_ids: nothing to know image positions by
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        image_mask = pending[0] if pending is not None else None
        if image_mask is not None and image_mask.shape != emb.shape[:2]:
            image_mask = None
        if image_mask is not None and bool(image_mask.any()):
            return self._prefill(module, args, kwargs, emb, image_mask.to(emb.device), cache)
        session = self._session(cache)
        if session is not None and cache.get_seq_length() > 0:
            return self._decode(args, kwargs, emb, cache, session)
        if pending is not None and self._session(cache) is None:
            logger.debug("no image tokens in this batch: visual-token pruning passes it through unchanged")
        return None

    # prefill ----------------------------------------------------------------------------------

    def _prefill(self, lm: nn.Module, args: tuple, kwargs: dict, emb: torch.Tensor, image_mask: torch.Tensor, cache: Any):
        b, length, d = emb.shape
        if cache is not None and cache.get_seq_length() > 0:
            raise VLPruneError(
                "image tokens arrived after the cache was filled; visual-token pruning prunes the prompt's image "
                "tokens in the first forward of a cache (start generation from the full prompt)"
            )
        counts = image_mask.sum(1)
        if bool((counts != counts[0]).any()):
            raise DataError(
                f"samples in this batch have different numbers of image tokens ({counts.tolist()}); visual-token "
                "pruning needs the same count in every sample (batch samples with equal image counts together)"
            )
        am = kwargs.get("attention_mask")
        if am is None:
            am = torch.ones(b, length, dtype=torch.long, device=emb.device)
        elif not isinstance(am, torch.Tensor) or am.dim() != 2 or am.shape != (b, length):
            got = tuple(am.shape) if isinstance(am, torch.Tensor) else type(am).__name__
            raise DataError(
                f"visual-token pruning needs a 2-D attention_mask (batch, seq) = {(b, length)} or none, got {got}"
            )
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(lm.config, "use_cache", False))
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=lm.config)
        kwargs = dict(kwargs)
        if cache is not None:
            kwargs["cache"] = cache
            kwargs.pop("past_key_values", None)

        if self.method.stage == "layer":
            kwargs["attention_mask"] = am  # never None: keeps transformers' packed-sequence detection off
            self._current = _Prefill(image_mask=image_mask, attention_2d=am, cache=cache)
            return args, kwargs

        n = int(counts[0])
        img_pos = image_mask.nonzero()[:, 1].view(b, n)
        feats = emb.gather(1, img_pos.unsqueeze(-1).expand(b, n, d))
        with torch.no_grad():
            sel = self.method.select(feats.detach()).to(emb.device)
        kept_img = img_pos.gather(1, sel)
        keep_mask = ~image_mask
        keep_mask.scatter_(1, kept_img, True)
        m = sel.shape[1]
        keep_idx = keep_mask.nonzero()[:, 1].view(b, length - n + m)

        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(length, device=emb.device).unsqueeze(0).expand(b, length)
        pos = self._cut_positions(pos, keep_idx, b)
        kwargs["inputs_embeds"] = emb.gather(1, keep_idx.unsqueeze(-1).expand(b, keep_idx.shape[1], d))
        kwargs["attention_mask"] = am.gather(1, keep_idx)
        kwargs["position_ids"] = pos
        self.last_kept = keep_idx
        self._remember(cache, _Session(orig_len=length, keep_idx=keep_idx, dropped_before_end=n - m))
        logger.debug("%s kept %d of %d image tokens per sample (%d -> %d positions)", self.method.name, m, n, length, keep_idx.shape[1])
        return args, kwargs

    def _cut_positions(self, pos: torch.Tensor, keep_idx: torch.Tensor, b: int) -> torch.Tensor:
        if pos.dim() == 2:
            pos = pos.expand(b, -1)
            cut = pos.gather(1, keep_idx)
            if self.positions == "contiguous":
                cut = cut - _dropped_before(keep_idx)
            return cut
        # multimodal RoPE (e.g. (3, B, L)): gather along the last dim
        if self.positions == "contiguous":
            raise VLPruneError(
                f"positions='contiguous' needs 2-D position ids; this model passes {tuple(pos.shape)} (multimodal "
                "RoPE): use positions='original'"
            )
        pos = pos.expand(*pos.shape[:-2], b, pos.shape[-1])
        index = keep_idx.expand(*pos.shape[:-2], *keep_idx.shape)
        return pos.gather(-1, index)

    # decode -----------------------------------------------------------------------------------

    def _decode(self, args: tuple, kwargs: dict, emb: torch.Tensor, cache: Any, session: _Session):
        if self.method.stage == "layer":
            return None  # FastV: layer 0's cache is full length; the layer hooks cut the rest
        b, q = emb.shape[:2]
        past = cache.get_seq_length()
        extra = past - session.kept_len + q  # positions after the prefill, the current ones included
        full, short = session.orig_len + extra, session.kept_len + extra
        kwargs = dict(kwargs)
        am = kwargs.get("attention_mask")
        if am is None:
            am = torch.ones(b, short, dtype=torch.long, device=emb.device)
        elif isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == full:
            keep = session.keep_idx.to(am.device).expand(am.shape[0], -1)
            am = torch.cat([am.gather(1, keep), am[:, session.orig_len :]], dim=1)
        elif not (isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == short):
            got = tuple(am.shape) if isinstance(am, torch.Tensor) else type(am).__name__
            raise DataError(
                f"attention_mask of shape {got} does not fit this pruned cache: expected (batch, {full}) (the "
                f"unpruned length) or (batch, {short}) (the pruned length)"
            )
        pos = kwargs.get("position_ids")
        if pos is None:
            start = session.orig_len + past - session.kept_len
            pos = (torch.arange(q, device=emb.device) + start).unsqueeze(0).expand(b, q)
        if self.positions == "contiguous":
            pos = pos - session.dropped_before_end
        kwargs["attention_mask"] = am
        kwargs["position_ids"] = pos
        return args, kwargs

    # FastV ------------------------------------------------------------------------------------

    def _attn_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        cur = self._current
        if cur is None or cur.keep_idx is not None:
            return
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise VLPruneError(
                "FastV got no attention weights from layer "
                f"{self.method.layer - 1}; load the model with attn_implementation=\"eager\""  # type: ignore[attr-defined]
            )
        b, _, length, _ = weights.shape
        am = cur.attention_2d.to(weights.device)
        # the last prompt token of each row: the last unpadded position
        last = (am.long() * torch.arange(1, length + 1, device=am.device)).argmax(dim=1)
        row = weights[torch.arange(b, device=weights.device), :, last, :]  # (B, heads, T)
        image = cur.image_mask
        counts = image.sum(1)
        with torch.no_grad():
            kept_img = self.method.select_from_attention(row.detach(), image)  # type: ignore[attr-defined]
        keep_mask = ~image
        keep_mask.scatter_(1, kept_img, True)
        keep_idx = keep_mask.nonzero()[:, 1].view(b, -1)
        cur.keep_idx = keep_idx
        self.last_kept = keep_idx
        self._remember(cur.cache, _Session(orig_len=length, keep_idx=keep_idx, dropped_before_end=int(counts[0]) - kept_img.shape[1]))
        logger.debug("FastV kept %d of %d image tokens per sample from layer %d on", kept_img.shape[1], int(counts[0]), self.method.layer)  # type: ignore[attr-defined]

    def _layer_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cur = self._current
        if cur is not None and cur.keep_idx is not None:
            return self._fastv_prefill_cut(args, kwargs, cur)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        session = self._session(cache)
        if session is None:
            return None
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise DataError(
                "FastV decoding needs the 4-D attention mask of eager attention; got "
                f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else tuple(mask.shape)}"
            )
        full = mask.shape[-1]
        keep = session.keep_idx.to(mask.device)
        tail = torch.arange(session.orig_len, full, device=mask.device).unsqueeze(0).expand(keep.shape[0], -1)
        cols = torch.cat([keep, tail], dim=1)  # (B, L' + extra)
        mask = mask.expand(cols.shape[0], *mask.shape[1:])
        index = cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask.gather(3, index)
        return args, kwargs

    def _fastv_prefill_cut(self, args: tuple, kwargs: dict, cur: _Prefill) -> tuple[tuple, dict]:
        keep = cur.keep_idx
        assert keep is not None
        b, kept = keep.shape
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != kept:  # layer K: the full sequence arrives
            hidden = hidden.gather(1, keep.unsqueeze(-1).expand(b, kept, hidden.shape[-1]))
        if not cur.cut:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                mask = mask.expand(b, *mask.shape[1:])
                rows = keep[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
                mask = mask.gather(2, rows)
                cols = keep[:, None, None, :].expand(-1, mask.shape[1], kept, -1)
                mask = mask.gather(3, cols)
            elif mask is not None:
                raise DataError(f"FastV needs the 4-D eager attention mask, got {type(mask).__name__}")
            cut: dict[str, Any] = {"attention_mask": mask}
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                cos, sin = pe
                idx = keep.unsqueeze(-1).expand(b, kept, cos.shape[-1])
                cut["position_embeddings"] = (cos.expand(b, *cos.shape[1:]).gather(1, idx), sin.expand(b, *sin.shape[1:]).gather(1, idx))
            pos = kwargs.get("position_ids")
            if pos is not None and pos.dim() == 2:
                cut["position_ids"] = pos.expand(b, -1).gather(1, keep)
            cur.cut = cut
        kwargs.update(cur.cut)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


def prune_visual_tokens(
    model: nn.Module,
    method: str | TokenMethod = "divprune",
    keep: int | float | None = None,
    *,
    positions: Positions | None = None,
    **method_kwargs: Any,
) -> VisualTokenPruning:
    """Prune the visual tokens of a LLaVA-style model at run time (attached now; detach to undo).

    Args:
        model: e.g. ``LlavaForConditionalGeneration``.
        method: ``"divprune"`` (default), ``"fastv"``, ``"random_tokens"``, ``"uniform_tokens"``, or a
            :class:`TokenMethod` (``vlprune.get_criterion("divprune", adapter="hf_tokens", keep=0.1)``).
        keep: image tokens kept per sample, a count or a ratio in (0, 1] (default: the method's paper
            value, DivPrune 0.098, FastV 0.5).
        positions: ``"original"`` (kept tokens keep their RoPE positions) or ``"contiguous"``
            (renumbered without gaps); default :data:`DEFAULT_POSITIONS`.
        **method_kwargs: method options (FastV ``layer=K``; ``seed`` for random).

    Returns:
        The attached :class:`VisualTokenPruning`: use it as a context manager (detaches on exit, also
        on exceptions) or call ``.detach()``.

    Raises:
        ModelStructureError: a model without a known place for visual tokens.
        VLPruneError: an unknown method / bad keep / FastV K beyond the layers or without eager attention.
        Nothing is attached when any of these is raised.

    Example:
        >>> from vlprune.testbed.tiny import example_inputs, tiny_model
        >>> model, batch = tiny_model("llava"), example_inputs("llava")    # 16 image + 12 text tokens
        >>> with prune_visual_tokens(model, "divprune", keep=0.25) as pruner:   # keeps 4 of 16
        ...     logits = model(**batch).logits
        >>> logits.shape[1], pruner.attached
        (16, False)
    """
    m = _make_method(method, keep, method_kwargs)
    return VisualTokenPruning(model, m, positions or DEFAULT_POSITIONS).attach()
