"""Remove decoder layers from a transformers model: :func:`remove_layers` (depth pruning).

Neither Torch-Pruning nor NNI removes whole layers; this module does it for the language-model
decoder layers :func:`vlprune.plugins.structure.find_decoder_layers` finds (the layers the layer
criteria score; for the built-in families the same as ``FamilyInfo.decoder_layers``):

- decoder-only language models (family ``decoder_lm``: Llama, Mistral, Qwen2, Qwen3, Gemma2, ...:
  ``model.layers``);
- the LLaVA family's language model (``model.language_model.layers``; its ``config.text_config``);
- BLIP's text decoder (``text_decoder.bert.encoder.layer``: BERT-style layers with
  cross-attention to the image; its ``config.text_config``).

What a removal changes, all planned and checked before anything is touched:

1. the decoder ``nn.ModuleList`` is refilled in place (same container object, same type; the kept
   layers are the same module objects, in their original order, renumbered ``0..k-1``);
2. per-layer index attributes in each kept layer (:data:`INDEX_ATTRS`: ``layer_idx`` of the
   attention, where the KV cache slot comes from, ``layer_idx`` / ``layer_num`` of the layer
   itself) follow the new position;
3. every config that states the decoder depth (the language model's own config and the text config
   of the configs above it; for LLaVA and BLIP that is ``config.text_config``):
   ``num_hidden_layers``, the per-layer lists (any list/tuple field whose name contains ``layer``
   and whose length is the old depth: ``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...),
   the layer-index lists of :data:`INDEX_LIST_FIELDS` (``mlp_only_layers``) and the thresholds of
   :data:`THRESHOLD_FIELDS` (``max_window_layers``: layers at or past it use the sliding window,
   so it becomes the number of kept layers below it); the result must pass the config's own
   ``validate()``;
4. model attributes derived from those lists at construction (``has_sliding_layers``).

So the KV cache transformers builds from the config has one slot per kept layer, of the kept
layer's attention type, and cached and uncached greedy ``generate()`` agree. A config-built model
of the new config has the same structure, so :func:`~vlprune.adapters.hf.persist.save_pruned` /
:func:`~vlprune.adapters.hf.persist.load_pruned` reload it exactly, and plain
``from_pretrained`` does too when no width differs from the config.

Not adjusted: list fields whose length happens to equal the depth but whose name does not contain
``layer`` (they cannot be told from token-id lists); periodic patterns (Gemma3's
``sliding_window_pattern``: its ``layer_types``, which transformers reads, is adjusted); layer-index
lists not in :data:`INDEX_LIST_FIELDS`; cross-layer KV sharing (Gemma3n). A ``layer``-named list of
another length and a ``sliding_window_pattern`` are logged as warnings. A removal that leaves no
layer of one attention type is refused where a module outside the decoder keeps per-type state
built at construction (Gemma3's rotary embedding holds frequencies per layer type); elsewhere
(Qwen2) it is fine. Encoder stacks (vision towers, BERT encoders) are not decoder layers and are
refused.

Example:
    >>> from vlprune.testbed.tiny import tiny_model
    >>> model = tiny_model("llava")                  # 2 decoder layers
    >>> report = remove_layers(model, [1])
    >>> report.kept, report.num_layers, model.config.text_config.num_hidden_layers
    ((0,), 1, 1)
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlprune.adapters.hf.undo import restore_on_failure
from vlprune.errors import ModelStructureError, VLPruneError
from vlprune.plugins.structure import find_decoder_layers, registered_decoder_pattern

__all__ = ["INDEX_ATTRS", "INDEX_LIST_FIELDS", "THRESHOLD_FIELDS", "LayerRemoval", "decoder_list", "remove_layers"]

logger = logging.getLogger(__name__)

#: integer attributes of a decoder layer (or of any module inside it) that hold its position in
#: the decoder; each keeps its offset from the position (0-based ``layer_idx``, 1-based counters)
INDEX_ATTRS: tuple[str, ...] = ("layer_idx", "layer_id", "layer_index", "layer_num", "layer_number")
#: config fields that list decoder-layer indices (Qwen2-MoE's dense layers): removed layers drop
#: out, kept ones are renumbered
INDEX_LIST_FIELDS: tuple[str, ...] = ("mlp_only_layers",)
#: config fields "layers below this index are one kind, the rest another" (Qwen2 / Qwen3
#: ``max_window_layers``, DeepSeek ``first_k_dense_replace``): the new value is the number of kept
#: layers below the old one (left alone when the old value is not below the old depth)
THRESHOLD_FIELDS: tuple[str, ...] = ("max_window_layers", "first_k_dense_replace")
#: supported families, for error messages
SUPPORTED = (
    "decoder-only language models (Llama, Mistral, Qwen2/Qwen3, Gemma2, ...: family 'decoder_lm'), "
    "the LLaVA family's language model and BLIP's text decoder"
)


@dataclass(frozen=True)
class LayerRemoval:
    """What :func:`remove_layers` did.

    Attributes:
        decoder: path of the decoder ``nn.ModuleList`` (``"model.language_model.layers"``).
        removed: original indices of the removed layers, ascending.
        kept: original indices of the kept layers, in their new order (``kept[j]`` is now layer j).
        num_layers: the decoder depth now (``len(kept)``).
        config_changes: ``{"config" / "config.text_config" / ...: {field: new value}}``.
        renumbered: ``{module path (new numbering): {attribute: new value}}``.
    """

    decoder: str
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    num_layers: int
    config_changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    renumbered: dict[str, dict[str, int]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[int]:
        """The removed indices: ``list(report)``."""
        return iter(self.removed)


# ------------------------------------------------------------------------------------------------
# finding the decoder and the configs that describe it
# ------------------------------------------------------------------------------------------------


def decoder_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer ``nn.ModuleList`` of ``model`` and its path.

    The layers are those :func:`vlprune.plugins.structure.find_decoder_layers` finds (the same
    finder the layer criteria use, so ``remove_layers`` indices are ``decoder_layers`` indices): a
    plugin-registered ``FamilyRule(decoder=...)``, else the LLaVA family's language model, BLIP's
    text decoder or a decoder-only LM's ``model.layers`` (:data:`~vlprune.plugins.structure.DECODER_STACKS`).

    Args:
        model: a transformers model with a language-model decoder (not an encoder-decoder model,
            unless a registered family rule names its decoder).

    Returns:
        ``(path, module list)``, e.g. ``("model.language_model.layers", ModuleList(...))``.

    Raises:
        ModelStructureError: ``model`` has no decoder layers vlprune knows, is an encoder-decoder
            model no rule describes, or its decoder layers are not the whole of one ``nn.ModuleList``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> decoder_list(tiny_model("llava"))[0]
        'model.language_model.layers'
    """
    if not isinstance(model, nn.Module):
        raise VLPruneError(f"remove_layers takes a transformers model (an nn.Module), got a {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    hint = (
        f"remove_layers supports {SUPPORTED}. For another model, describe its decoder with a "
        "FamilyRule(decoder='path.to.layers.*') registered through the vlprune_register_families hook"
    )
    if getattr(config, "is_encoder_decoder", False) is True and registered_decoder_pattern(model) is None:
        raise ModelStructureError(
            f"{type(model).__name__} (model_type {model_type!r}) is an encoder-decoder model, whose depth "
            f"fields remove_layers does not know; {hint}"
        )
    layers = find_decoder_layers(model)
    if not layers:
        raise ModelStructureError(
            f"{type(model).__name__} (model_type {model_type!r}) has no decoder layers vlprune knows; {hint}"
        )
    parents = sorted({p.rpartition(".")[0] for p in layers})
    if len(parents) != 1:
        raise ModelStructureError(
            f"{type(model).__name__}: the decoder layers lie in {len(parents)} lists ({parents}); remove_layers "
            "removes layers from one decoder list"
        )
    path = parents[0]
    container = model.get_submodule(path)
    expected = [f"{path}.{i}" for i in range(len(container))] if isinstance(container, nn.ModuleList) else []
    if not isinstance(container, nn.ModuleList) or layers != expected:
        raise ModelStructureError(
            f"{type(model).__name__}: the decoder layers {layers[:3]}... are not exactly the "
            f"elements of the nn.ModuleList {path!r}; remove_layers cannot renumber them"
        )
    return path, container


def _configs_of(model: nn.Module, path: str, depth: int) -> list[tuple[str, Any]]:
    """Configs that state the depth of the decoder at ``path``: the ``config`` of every module
    above it, or that config's text config, whose ``num_hidden_layers`` is ``depth``; with the
    name a user reads them by (``"config"``, ``"config.text_config"``, ``"model.language_model.config"``)."""
    found: dict[int, tuple[str, Any]] = {}
    parts = path.split(".")
    owners = [("", model)] + [(".".join(parts[:i]), model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts))]
    for owner_path, owner in owners:  # root first: a shared config is named from the root
        cfg = getattr(owner, "config", None)
        if cfg is None or not hasattr(cfg, "to_dict"):
            continue
        prefix = f"{owner_path}.config" if owner_path else "config"
        candidates = [(prefix, cfg)]
        get_text = getattr(cfg, "get_text_config", None)
        if callable(get_text):
            try:
                text = get_text(decoder=True)
            except TypeError:
                text = get_text()
            if text is not cfg:
                sub = next((k for k, v in vars(cfg).items() if v is text), "text_config")
                candidates.append((f"{prefix}.{sub}", text))
        for name, c in candidates:
            if isinstance(getattr(c, "num_hidden_layers", None), int) and c.num_hidden_layers == depth:
                found.setdefault(id(c), (name, c))
    return sorted(found.values(), key=lambda nc: nc[0])


def _config_plan(name: str, cfg: Any, kept: list[int], depth: int) -> dict[str, Any]:
    """The new values of ``cfg``'s depth fields for keeping ``kept`` of ``depth`` layers."""
    new_index = {old: new for new, old in enumerate(kept)}
    values: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for attr, value in vars(cfg).items():
        if attr.startswith("_") or attr == "num_hidden_layers":
            continue
        if attr in INDEX_LIST_FIELDS and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            values[attr] = type(value)(new_index[v] for v in value if v in new_index)
            continue
        if attr in THRESHOLD_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < depth:
                values[attr] = sum(1 for k in kept if k < value)
            continue
        if isinstance(value, (list, tuple)) and "layer" in attr.lower():
            if len(value) == depth:
                values[attr] = type(value)(value[k] for k in kept)
            else:
                logger.warning(
                    "remove_layers: %s.%s (%d entries for %d layers) is not a per-layer list vlprune knows; "
                    "left as it is, check that it still fits %d layers",
                    name, attr, len(value), depth, len(kept),
                )
        elif attr == "sliding_window_pattern" and isinstance(value, int):
            logger.warning(
                "remove_layers: %s.sliding_window_pattern=%d is a period, not a per-layer list; left as it is "
                "(transformers reads layer_types, which is adjusted)", name, value,
            )
    return values


def _check_config(name: str, cfg: Any, values: dict[str, Any]) -> None:
    """Try ``values`` on a copy of ``cfg`` (field validators on assignment, then ``validate()``)."""
    def run(vals: dict[str, Any]) -> None:
        trial = copy.deepcopy(cfg)
        for attr, value in vals.items():
            setattr(trial, attr, value)
        if callable(getattr(trial, "validate", None)):
            trial.validate()

    try:
        run({})
    except Exception:  # the config fails its own checks already: not ours to judge
        return
    try:
        run(values)
    except Exception as exc:  # StrictDataclass*Error, ValueError, ... from the config's own code
        why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ModelStructureError(
            f"remove_layers: {name} does not accept the new depth {values} ({type(exc).__name__}: {why}); a per-layer field "
            "vlprune does not know may need the same change: adjust it by hand or report the model type"
        ) from exc


# ------------------------------------------------------------------------------------------------
# reading the user's layer list
# ------------------------------------------------------------------------------------------------


def _as_index(item: Any, path: str, depth: int) -> int:
    if isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point() and item.dtype != torch.bool:
        item = int(item.item())
    if isinstance(item, str):
        prefix = path + "."
        rest = item[len(prefix):] if item.startswith(prefix) else None
        if rest is None or not rest.isdigit():
            raise VLPruneError(
                f"remove_layers: {item!r} is not a decoder layer of this model; name layers by index "
                f"(0..{depth - 1}) or by path, e.g. {prefix}0 ... {prefix}{depth - 1} "
                "(vlprune.describe_model(model).decoder_layers)"
            )
        item = int(rest)
    elif isinstance(item, bool) or not isinstance(item, numbers.Integral):
        raise VLPruneError(
            f"remove_layers: layers holds {item!r} (a {type(item).__name__}); give decoder-layer indices as ints "
            f"(0..{depth - 1}) or layer paths like {path}.0"
        )
    index = int(item)
    if not 0 <= index < depth:
        raise VLPruneError(
            f"remove_layers: layer index {index} is out of range; {path} has {depth} layers, indexed "
            f"0..{depth - 1} (negative indices are not accepted: the last layer is {depth - 1})"
        )
    return index


def _read_layers(layers: Any, path: str, depth: int) -> list[int]:
    if isinstance(layers, torch.Tensor):
        if layers.ndim > 1 or layers.is_floating_point() or layers.dtype == torch.bool:
            raise VLPruneError(
                f"remove_layers: layers is a {layers.dtype} tensor of shape {tuple(layers.shape)}; give a 1-D "
                "integer tensor or a list of decoder-layer indices"
            )
        layers = layers.reshape(-1).tolist()
    elif isinstance(layers, (str, numbers.Integral)) and not isinstance(layers, bool):
        layers = [layers]
    elif isinstance(layers, (dict, set, frozenset)) or not isinstance(layers, Iterable):
        raise VLPruneError(
            f"remove_layers: layers must be a list of decoder-layer indices (ints) or layer paths, got a "
            f"{type(layers).__name__}"
        )
    indices = [_as_index(item, path, depth) for item in layers]
    duplicates = sorted(i for i, n in Counter(indices).items() if n > 1)
    if duplicates:
        raise VLPruneError(
            f"remove_layers: layer(s) {duplicates} are listed more than once; list each layer to remove once"
        )
    return sorted(indices)


def _check_protection(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise VLPruneError(f"remove_layers: {name} must be an int >= 0 (layers kept at that end), got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# the operation
# ------------------------------------------------------------------------------------------------


def _index_changes(layer: nn.Module, old: int, new: int, prefix: str) -> list[tuple[nn.Module, str, str, int, int]]:
    """(module, path, attribute, old value, new value) for the index attributes inside ``layer``."""
    out = []
    for sub_name, module in layer.named_modules():
        for attr in INDEX_ATTRS:
            value = module.__dict__.get(attr)
            if value is None or isinstance(value, bool) or not isinstance(value, int):
                continue
            if value - old not in (0, 1):  # not this layer's position (0- or 1-based)
                logger.warning(
                    "remove_layers: %s.%s = %d does not follow layer %d's position; left as it is",
                    f"{prefix}.{sub_name}".rstrip("."), attr, value, old,
                )
                continue
            if old != new:
                out.append((module, f"{prefix}.{sub_name}".rstrip("."), attr, value, value - old + new))
    return out


def _refuse_lost_layer_type(model: nn.Module, path: str, old: list[str], new: list[str], remove: list[int]) -> None:
    """Refuse a removal that drops every layer of one attention type when a module outside the
    decoder keeps per-type state built at construction (Gemma3's rotary embedding: one set of
    frequencies per layer type), which a model built from the new config would not have."""
    lost = sorted(set(old) - set(new))
    stale = [
        f"{name}.{attr}"
        for name, module in model.named_modules()
        if name != path and not name.startswith(path + ".")
        for attr in ("layer_types", "unique_layer_types")
        if isinstance(module.__dict__.get(attr), (list, tuple, set, frozenset)) and set(module.__dict__[attr]) == set(old)
    ]
    if stale:
        raise ModelStructureError(
            f"remove_layers: removing {remove} leaves no {' / '.join(lost)} layer, but {stale} keep(s) per-type "
            f"state (e.g. rotary frequencies) built for {sorted(set(old))}; keep at least one layer of each "
            "type (layer_types) or build the model anew from the new config"
        )


def remove_layers(
    model: nn.Module,
    layers: Iterable[int | str] | int | str | torch.Tensor,
    *,
    protect_first: int = 0,
    protect_last: int = 0,
) -> LayerRemoval:
    """Remove decoder layers from a transformers model, in place.

    The decoder list is refilled with the kept layers (same ``nn.ModuleList`` object, same layer
    objects), their ``layer_idx`` (and other :data:`INDEX_ATTRS`) renumbered, and the configs that
    state the depth updated: ``num_hidden_layers``, per-layer lists (``layer_types``, ...), layer
    index lists and thresholds (``max_window_layers``); see the module docstring for the list and
    for what is not adjusted. The model then equals a model built from the new config and loaded
    with the kept layers' weights: cached and uncached ``generate()`` agree, and
    :func:`~vlprune.adapters.hf.persist.save_pruned` / ``load_pruned`` reload it exactly.

    Width pruning (Torch-Pruning, NNI) may come before or after. After width pruning with
    per-layer widths, call :func:`~vlprune.adapters.hf.sync.sync_hf_model` again after removing
    layers: if the kept layers now share one width the config can state it, and plain
    ``from_pretrained`` loads the saved model.

    Everything is checked and planned before the model is touched; if anything fails (a bad
    argument, a config that refuses the new depth, an error while applying), the model, its
    modules and its configs are as they were.

    Args:
        model: a transformers model with a decoder vlprune knows (:data:`SUPPORTED`).
        layers: the decoder layers to remove: indices ``0..n-1`` into the decoder list (ints, numpy
            ints, a 1-D integer tensor, or one int) or layer paths as in
            ``vlprune.describe_model(model).decoder_layers`` (``"model.language_model.layers.2"``).
            Empty: nothing is removed.
        protect_first: this many first layers may not be removed (0: no rule).
        protect_last: this many last layers may not be removed (0: no rule).

    Returns:
        A :class:`LayerRemoval` (iterating it gives the removed indices).

    Raises:
        ModelStructureError: no decoder layers found (names the model class and the supported
            families), no config stating the depth, a config refusing the new values, or every
            layer of one attention type removed where a module keeps per-type state (Gemma3).
        VLPruneError: wrong types, an index out of range, duplicates, every layer listed, a
            protected layer listed; or a failure while applying (the model is restored first).

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> model = tiny_model("llava")
        >>> remove_layers(model, ["model.language_model.layers.0"]).kept
        (1,)
        >>> model.model.language_model.layers[0].self_attn.layer_idx
        0
    """
    path, container = decoder_list(model)
    depth = len(container)
    first = _check_protection("protect_first", protect_first)
    last = _check_protection("protect_last", protect_last)
    remove = _read_layers(layers, path, depth)
    protected = sorted({i for i in remove if i < first or i >= depth - last})
    if protected:
        removable = f"removable are {first}..{depth - last - 1}" if first < depth - last else "no layer is removable"
        raise VLPruneError(
            f"remove_layers: layer(s) {protected} are protected (protect_first={first}, protect_last={last} of "
            f"{depth} layers: {removable}); choose other layers or lower the protection"
        )
    if len(remove) == depth:
        raise VLPruneError(
            f"remove_layers: removing all {depth} layers of {path} leaves no decoder; keep at least one layer"
        )
    kept = [i for i in range(depth) if i not in set(remove)]
    if not remove:
        logger.info("remove_layers: no layer listed; %s keeps its %d layers", path, depth)
        return LayerRemoval(path, (), tuple(kept), depth)
    configs = _configs_of(model, path, depth)
    if not configs:
        raise ModelStructureError(
            f"{type(model).__name__}: no config above {path} states num_hidden_layers={depth}, so the new depth "
            "cannot be recorded; set the config's num_hidden_layers to the decoder's length first"
        )
    # plan (nothing changes the model before "apply")
    config_plan = [(name, cfg, _config_plan(name, cfg, kept, depth)) for name, cfg in configs]
    for name, cfg, values in config_plan:
        _check_config(name, cfg, values)
    layer_objs = [container[i] for i in range(depth)]
    index_plan = [
        change for new, old in enumerate(kept) for change in _index_changes(layer_objs[old], old, new, f"{path}.{new}")
    ]
    new_types = next((v["layer_types"] for _, _, v in config_plan if "layer_types" in v), None)
    old_types = next((getattr(c, "layer_types", None) for _, c, v in config_plan if "layer_types" in v), None)
    if new_types is not None and old_types is not None and set(new_types) != set(old_types):
        _refuse_lost_layer_type(model, path, list(old_types), list(new_types), remove)
    derived: list[tuple[nn.Module, str, Any, Any]] = []
    if new_types is not None:
        parts = path.split(".")
        for i in range(len(parts)):
            owner = model.get_submodule(".".join(parts[:i])) if i else model
            if isinstance(owner.__dict__.get("has_sliding_layers"), bool):
                derived.append((owner, "has_sliding_layers", owner.has_sliding_layers, "sliding_attention" in new_types))
    # apply, restoring everything on failure
    try:
        with restore_on_failure(model):
            container._modules.clear()
            for new, old in enumerate(kept):
                container._modules[str(new)] = layer_objs[old]
            for module, _, attr, _, value in index_plan:
                setattr(module, attr, value)
            for owner, attr, _, value in derived:
                setattr(owner, attr, value)
            for _, cfg, values in config_plan:
                for attr, value in values.items():
                    setattr(cfg, attr, value)
    except VLPruneError:
        raise
    except Exception as exc:
        raise VLPruneError(
            f"remove_layers failed while applying the removal of {remove} ({type(exc).__name__}: {exc}); "
            "the model was restored as it was"
        ) from exc
    renumbered: dict[str, dict[str, int]] = {}
    for _, where, attr, _, value in index_plan:
        renumbered.setdefault(where, {})[attr] = value
    report = LayerRemoval(
        decoder=path,
        removed=tuple(remove),
        kept=tuple(kept),
        num_layers=len(kept),
        config_changes={name: dict(values) for name, _, values in config_plan},
        renumbered=renumbered,
    )
    logger.info("remove_layers: %s: removed %s, %d of %d layers kept", path, list(remove), len(kept), depth)
    return report
