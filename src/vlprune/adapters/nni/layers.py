"""Domain-aware decoder-layer removal as an NNI 3.0 pruner.

:class:`LayerSimilarityPruner` (Khaki et al., 2026) subclasses NNI's own
:class:`nni.compression.pruning.L1NormPruner` and overrides only ``__init__``, ``_collect_data`` and
``_calculate_metrics``. Decoder layers are chosen by the domain-aware similarity ranking
(:func:`vlprune.plugins.layer_similarity.domain_similarity`,
:func:`~vlprune.plugins.layer_similarity.combine_domains`,
:func:`~vlprune.plugins.layer_selection.select_layers`) and masked as whole layers: every attention
output projection and MLP down projection of a chosen layer is fully masked (``sparse_ratio`` 1.0),
so the layer adds nothing to the residual stream and the masked model computes what the model with
those layers removed computes. :func:`vlprune.adapters.nni.speedup.shrink` then removes them.

Whole-layer masks: NNI's own schema accepts ``sparse_ratio=1.0`` (``float``) and its ratio rule
returns an all-zero mask for it. :func:`vlprune.adapters.nni.config.check_config_list`, which
guards the config lists *users* write, refuses ratios outside [0, 1); the layer pruner writes its
1.0 entries itself and does not run them through that check (a user-given ``config_list`` is not a
parameter of :class:`LayerSimilarityPruner`).

Example:
    >>> import vlprune.testbed as tb
    >>> from vlprune.adapters.nni import LayerSimilarityPruner
    >>> llava = tb.load("llava-deep")
    >>> data = {d: tb.batches("llava-deep", 32, 16, task=d) for d in ("math", "general")}
    >>> pruner = LayerSimilarityPruner(llava, data, n_layers=2, strategy="spacing")         # doctest: +SKIP
    >>> _, masks = pruner.compress(); pruner.unwrap_model()                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from nni.compression.pruning import L1NormPruner
from torch import nn

from vlprune.adapters.nni._shared import (
    _active_targets,
    _check_progress,
    _Data,
    _from_compressor,
    _init_nni,
    _shaped_metrics,
)
from vlprune.adapters.nni.config import OneShotInFusion
from vlprune.errors import DataError, ModelStructureError
from vlprune.plugins import layer_similarity as ls
from vlprune.plugins.layer_selection import select_layers
from vlprune.plugins.structure import mlp_layouts

__all__ = ["LayerSimilarityPruner", "layer_config_list"]

logger = logging.getLogger(__name__)


def _check_pre_norm(model: nn.Module, layers: Sequence[str]) -> None:
    """Masking a layer's output projections makes it an identity only in a pre-norm layer
    (``h + f(norm(h))``); BERT-style layers normalise after the residual sum (``output.LayerNorm``)."""
    for layer in layers:
        post = [n for n, _ in model.get_submodule(layer).named_modules() if n.endswith("output.LayerNorm")]
        if post:
            raise ModelStructureError(
                f"decoder layer {layer!r} of {type(model).__name__} normalises after the residual sum "
                f"(BERT-style, {layer}.{post[0]}): masking its output projections does not make it an identity, so "
                "LayerSimilarityPruner cannot mask it; choose the layers with "
                "vlprune.plugins.layer_similarity.rank_layers / select_layers and remove them with vlprune.remove_layers"
            )


def _layer_outputs(model: nn.Module, layer: str) -> list[str]:
    """Attention output projections and MLP down projections inside decoder layer ``layer``."""
    from vlprune.adapters.hf.families import describe

    prefix = layer + "."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown family: the generic description has no attentions
        try:
            attentions = [a.o for a in describe(model).attentions if a.o and a.o.startswith(prefix)]
        except ModelStructureError:
            attentions = []
    downs = [m.down for m in mlp_layouts(model) if m.down.startswith(prefix)]
    if not attentions or not downs:
        missing = " and ".join(w for w, found in (("attention output projection", attentions), ("MLP down projection", downs)) if not found)
        raise ModelStructureError(
            f"decoder layer {layer!r} of {type(model).__name__} has no {missing} vlprune recognises "
            "(o_proj / out_proj / attention.output.dense, down_proj / fc2 / output.dense), so it cannot be masked "
            "into an identity; remove it with vlprune.remove_layers instead"
        )
    modules = dict(model.named_modules())
    for path in (*attentions, *downs):
        if not isinstance(modules.get(path), nn.Linear):
            raise ModelStructureError(f"{path} in decoder layer {layer!r} is not an nn.Linear; NNI cannot mask it")
    return [*attentions, *downs]


def layer_config_list(model: nn.Module, layers: Sequence[str]) -> list[dict[str, Any]]:
    """NNI config list that masks decoder layers whole: every attention output projection and MLP
    down projection of each layer at ``sparse_ratio`` 1.0 (all output channels, bias included), so
    the layer adds nothing to the residual stream.

    Internal-style list: ``sparse_ratio`` 1.0 is accepted by NNI's schema and rule but refused by
    :func:`vlprune.adapters.nni.config.check_config_list` (for user lists, ratios are in [0, 1)).

    Args:
        model: the model.
        layers: decoder-layer module paths (``vlprune.describe_model(model).decoder_layers``).

    Returns:
        One entry per layer: ``{"op_names": [o_proj..., down_proj...], "sparse_ratio": 1.0}``.

    Raises:
        ModelStructureError: a layer without a recognisable attention output or MLP down projection.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> layer_config_list(tiny_model("llava"), ["model.language_model.layers.1"])  # doctest: +NORMALIZE_WHITESPACE
        [{'op_names': ['model.language_model.layers.1.self_attn.o_proj',
                       'model.language_model.layers.1.mlp.down_proj'], 'sparse_ratio': 1.0}]
    """
    return [{"op_names": _layer_outputs(model, layer), "sparse_ratio": 1.0} for layer in layers]


class LayerSimilarityPruner(OneShotInFusion, L1NormPruner):
    """Domain-aware decoder-layer removal (Khaki et al., 2026) as an NNI 3.0 pruner.

    At construction (before NNI wraps the model): the per-domain similarity profiles
    (:func:`vlprune.plugins.layer_similarity.domain_similarity`: mean ``cos(h_l, h_{l+1})`` of each
    decoder layer's input and output, per domain), the ranking profile of ``domain``
    (:func:`~vlprune.plugins.layer_similarity.combine_domains`: a domain's own profile, or
    ``"mixed"`` = ``alpha * math + (1 - alpha) * others``) and the ``n_layers`` layers
    :func:`~vlprune.plugins.layer_selection.select_layers` picks with ``strategy``. The config list
    (:func:`layer_config_list`) masks each chosen layer's attention output projection(s) and MLP
    down projection completely, so after ``compress()`` the layer passes its residual input through
    unchanged: the masked model's (uncached) outputs equal those of the model with the layers
    removed (:func:`vlprune.remove_layers`), which :func:`vlprune.adapters.nni.speedup.shrink` does.

    The metric of a target is the negated removability of its layer (constant over its channels;
    with ``sparse_ratio`` 1.0 every channel is masked whatever the metric).

    Args:
        model: a transformers model with decoder layers (LLaVA family, decoder-only LMs).
        domain_batches: domain -> calibration batches, e.g. ``{"math": ..., "general": ...}``
            (``vlprune.testbed.batches("llava", ..., task="math")``).
        n_layers: number of decoder layers to remove (``>= 1``, at most the unprotected layers).
        strategy: ``"rank"`` (default, the top ``n_layers``), ``"spacing"``, ``"consecutive"`` or
            ``"regime"``, as :func:`~vlprune.plugins.layer_selection.select_layers`.
        domain: the ranking: a key of ``domain_batches`` (``"math"``: math-aware ...) or ``"mixed"`` (default).
        alpha, math_key: of ``"mixed"``, as :func:`~vlprune.plugins.layer_similarity.combine_domains`.
        protect_first, protect_last: first / last layers never removed (1 and 1 by default).
        regime_switch, evenness: of the ``"regime"`` / ``"spacing"`` strategies.
        scores: precomputed ``domain_similarity`` profiles (domain -> per-layer tensor), skipping the
            forward passes (``domain_batches`` may then be None).
        tokens, layers: as :func:`~vlprune.plugins.layer_similarity.domain_similarity`.
        evaluator: an NNI evaluator, passed to NNI (not needed for one-shot ``compress()``).
        existed_wrappers: NNI wrappers to share (what ``from_compressor`` passes).
        progress: tqdm bars.

    Attributes:
        scores: domain -> per-layer similarity; ``profile``: the ranking profile used;
        chosen: indices of the removed layers (into ``layer_names``), ascending;
        layer_names: every decoder layer scored; ``removed``: paths of the chosen layers.

    Raises:
        VLPruneError: ``n_layers`` < 1 or above the unprotected layers, an unknown strategy, bad
            ``alpha`` / protection (all before any forward pass or wrapping).
        DataError: no domain, a domain without batches, an unknown ``domain``.
        ModelStructureError: a model without decoder layers, post-norm (BERT-style) decoder layers
            such as BLIP's text decoder (masking their outputs leaves a LayerNorm: no identity), or
            a chosen layer without a recognisable attention output / MLP down projection.

    Example:
        >>> import vlprune.testbed as tb
        >>> model = tb.load("llava-deep")
        >>> data = {d: tb.batches("llava-deep", 32, 16, task=d) for d in ("math", "general")}
        >>> pruner = LayerSimilarityPruner(model, data, n_layers=2, strategy="spacing", domain="math")  # doctest: +SKIP
        >>> _, masks = pruner.compress()                                                              # doctest: +SKIP
        >>> pruner.removed                                                                             # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        domain_batches: Mapping[str, Iterable[Any]] | None,
        n_layers: int,
        strategy: str = "rank",
        domain: str = "mixed",
        *,
        alpha: float = 0.5,
        math_key: str = "math",
        protect_first: int = 1,
        protect_last: int = 1,
        regime_switch: int | float | None = None,
        evenness: float = 0.05,
        scores: Mapping[str, torch.Tensor] | None = None,
        tokens: ls.Tokens = "all",
        layers: ls.LayerSelector = None,
        evaluator: Any = None,
        existed_wrappers: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        progress = _check_progress(progress)
        names = ls.decoder_layers(model, layers)
        _check_pre_norm(model, names)
        select_kw = dict(strategy=strategy, protect_first=protect_first, protect_last=protect_last,
                         regime_switch=regime_switch, evenness=evenness)
        # dry runs on placeholder scores: n_layers, strategy, protection, alpha and domain are
        # refused before any forward pass
        select_layers(torch.zeros(len(names)), n_layers, **select_kw)  # type: ignore[arg-type]
        if scores is None:
            if not isinstance(domain_batches, Mapping) or not domain_batches:
                raise DataError(
                    "domain_batches must be a non-empty mapping of domain name -> batches, e.g. "
                    "{'math': math_batches, 'general': general_batches}"
                    + ("" if domain_batches is None else f"; got {type(domain_batches).__name__}")
                )
            keys: Iterable[str] = domain_batches
        else:
            keys = scores
        ls.combine_domains({d: torch.zeros(len(names)) for d in keys}, domain, alpha, math_key=math_key)

        if scores is None:
            assert domain_batches is not None
            scores = ls.domain_similarity(model, domain_batches, tokens, names, progress=progress)
        profile = ls.combine_domains(scores, domain, alpha, math_key=math_key)
        if profile.numel() != len(names):
            raise DataError(f"scores hold {profile.numel()} values per domain; the model has {len(names)} decoder layers")
        chosen = select_layers(profile, n_layers, **select_kw)  # type: ignore[arg-type]
        self.scores: dict[str, torch.Tensor] = {d: torch.as_tensor(s).detach().double().cpu() for d, s in scores.items()}
        self.profile: torch.Tensor = profile
        self.layer_names: list[str] = list(names)
        self.chosen: list[int] = chosen
        self.removed: list[str] = [names[i] for i in chosen]
        config_list = layer_config_list(model, self.removed)
        self._removability: dict[str, float] = {
            op: float(profile[i]) for i, entry in zip(chosen, config_list) for op in entry["op_names"]
        }
        logger.info("LayerSimilarityPruner: masking decoder layers %s (%s, %s)", chosen, strategy, domain)
        _init_nni(self, model, config_list, evaluator, existed_wrappers)

    @classmethod
    def from_compressor(  # type: ignore[override]
        cls, compressor: Any, domain_batches: Mapping[str, Iterable[Any]] | None, n_layers: int, *,
        evaluator: Any = None, **kwargs: Any,
    ) -> LayerSimilarityPruner:
        """A LayerSimilarityPruner sharing ``compressor``'s wrappers and evaluator (NNI's way to
        chain compressors); the config list is built as by the constructor, whose keyword arguments
        are accepted."""
        return _from_compressor(cls, compressor, domain_batches, n_layers, evaluator=evaluator, **kwargs)

    def _collect_data(self) -> _Data:
        """Minus the removability of the layer each active target belongs to (computed at construction),
        one value for all its channels (smaller = masked first)."""
        data: _Data = {}
        for module_name, targets in _active_targets(self).items():
            if module_name not in self._removability:
                raise ModelStructureError(f"{module_name} is not an output projection of a chosen decoder layer")
            for target_name in targets:
                data.setdefault(module_name, {})[target_name] = torch.tensor([-self._removability[module_name]])
        return data

    def _calculate_metrics(self, data: _Data) -> _Data:
        """Per target, its layer's value over every channel, in the shape NNI's scaler gives it."""
        return _shaped_metrics(self, data)
