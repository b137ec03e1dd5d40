"""Surgery on transformers models: bookkeeping after Torch-Pruning, save and reload pruned models.

After Torch-Pruning removed attention heads or MLP neurons, the linears have new shapes but the
attention modules still carry their old ``num_heads`` / ``num_attention_heads`` /
``num_key_value_groups`` / ``all_head_size``; :func:`sync_hf_model` fixes them from the weight shapes.

A stock config cannot describe per-layer widths or heads narrower than ``hidden_size /
num_heads``, so ``from_pretrained`` alone cannot reload a pruned model. :func:`save_pruned` writes
``save_pretrained`` output plus ``vlprune_shapes.json``: every module whose shape differs from a
fresh model built from the config, and every attention attribute that differs. :func:`load_pruned`
rebuilds the model from its config, applies the record and loads the weights strictly. The model
object is never pickled.

Example:
    >>> pruner.step(); vlprune.sync_hf_model(model)               # doctest: +SKIP
    >>> vlprune.save_pruned(model, "pruned/")                      # doctest: +SKIP
    >>> model = vlprune.load_pruned("pruned/")                     # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlprune.adapters.hf.families import _head_dim, find_attentions, find_mlps
from vlprune.errors import ModelStructureError, VLPruneError

__all__ = ["sync_hf_model", "save_pruned", "load_pruned", "SHAPES_FILE", "ATTENTION_ATTRS"]

logger = logging.getLogger(__name__)

SHAPES_FILE = "vlprune_shapes.json"
_FORMAT = "vlprune.shapes/1"
#: attention attributes vlprune keeps in step with the weight shapes
ATTENTION_ATTRS: tuple[str, ...] = (
    "num_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "num_key_value_groups",
    "head_dim",
    "attention_head_size",
    "all_head_size",
)


def _head_counts(model: nn.Module, module: nn.Module) -> int | None:
    for attr in ("num_heads", "num_attention_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    cfg = getattr(module, "config", None) or getattr(model, "config", None)
    value = getattr(cfg, "num_attention_heads", None)
    return value if isinstance(value, int) and value > 0 else None


def _plan_attention(
    model: nn.Module, name: str, q: nn.Linear, k: nn.Linear, fused: bool, module: nn.Module, pruned: str
) -> dict[str, int]:
    """New attention attributes for one module; raises before anything is changed."""
    head_dim = _head_dim(model, module)
    old_heads = _head_counts(model, module)
    if head_dim is None:
        raise ModelStructureError(f"attention {name}: cannot tell its head_dim (no attribute, no config)")
    q_out = q.out_features // 3 if fused else q.out_features
    k_out = q_out if fused else k.out_features
    mode = pruned
    if mode == "auto":
        if q_out % head_dim == 0:
            mode = "heads"
        elif old_heads and q_out % old_heads == 0:
            mode = "head_dim"
        else:
            raise ModelStructureError(
                f"attention {name}: {q_out} query channels fit neither whole heads of {head_dim} nor "
                f"{old_heads} heads; pass pruned='heads' or pruned='head_dim'"
            )
    if mode == "heads":
        if q_out % head_dim or k_out % head_dim:
            raise ModelStructureError(
                f"attention {name}: {q_out} query / {k_out} key channels are not whole heads of {head_dim}; "
                "prune with prune_num_heads=True, prune_head_dims=False"
            )
        heads, kv_heads = q_out // head_dim, k_out // head_dim
    elif mode == "head_dim":
        if not old_heads or q_out % old_heads:
            raise ModelStructureError(f"attention {name}: {q_out} query channels do not split into {old_heads} heads")
        heads = old_heads
        kv_old = getattr(module, "num_key_value_heads", None) or (
            old_heads // getattr(module, "num_key_value_groups", 1) if getattr(module, "num_key_value_groups", None) else old_heads
        )
        head_dim = q_out // heads
        kv_heads = k_out // head_dim if k_out % head_dim == 0 else kv_old
    else:
        raise VLPruneError(f"pruned must be 'heads', 'head_dim' or 'auto', got {pruned!r}")
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ModelStructureError(
            f"attention {name}: {heads} query heads cannot share {kv_heads} key/value heads; for GQA "
            "attention prune whole key/value groups or leave the attention out"
        )
    values = {
        "num_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_key_value_groups": heads // kv_heads,
        "head_dim": head_dim,
        "attention_head_size": head_dim,
        "all_head_size": heads * head_dim,
    }
    return {a: v for a, v in values.items() if isinstance(getattr(module, a, None), int) and getattr(module, a) != v}


def _owning_config(model: nn.Module, path: str) -> Any:
    """The config of the innermost submodule on ``path`` that has one."""
    modules = dict(model.named_modules())
    parts = path.split(".")
    for i in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:i]))
        cfg = getattr(module, "config", None) if module is not None else None
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def sync_hf_model(
    model: nn.Module, *, pruned: Literal["heads", "head_dim", "auto"] = "auto"
) -> dict[str, dict[str, int]]:
    """Bring a transformers model's bookkeeping in line with its (pruned) weight shapes.

    For every attention module: the numbers of query and key/value heads, the GQA group size and
    ``all_head_size`` follow the q/k linears' shapes. ``pruned="heads"`` keeps ``head_dim``
    (Torch-Pruning with ``prune_num_heads=True, prune_head_dims=False``); ``"head_dim"`` keeps the
    number of heads; ``"auto"`` picks ``heads`` when the query width is a whole number of heads.
    The attention scale (``scale`` / ``scaling``) is never changed: the weights were trained with
    it, and for head pruning it is the same anyway.

    MLP widths: where every MLP under one sub-config has the same new hidden width, that config's
    ``intermediate_size`` is updated; per-layer widths live in the weights (and in
    :func:`save_pruned`'s record). Head counts in the config are left alone, since a stock config
    derives ``head_dim`` from them.

    Args:
        model: the pruned model, changed in place.
        pruned: what Torch-Pruning removed in attention modules.

    Returns:
        module path (or ``"config:<path>"``) -> {attribute: new value} of what changed.

    Raises:
        ModelStructureError: shapes that no head layout explains; nothing is changed then.
    """
    modules = dict(model.named_modules())
    plan: dict[str, dict[str, int]] = {}
    for att in find_attentions(model):
        module = modules[att.name]
        changes = _plan_attention(model, att.name, modules[att.q], modules[att.k], att.fused, module, pruned)
        if changes:
            plan[att.name] = changes
    widths: dict[int, tuple[Any, set[int]]] = {}
    for mlp in find_mlps(model):
        cfg = _owning_config(model, mlp.name)
        if cfg is not None and isinstance(getattr(cfg, "intermediate_size", None), int):
            widths.setdefault(id(cfg), (cfg, set()))[1].add(mlp.hidden)
    config_changes: list[tuple[Any, int]] = []
    for cfg, sizes in widths.values():
        if len(sizes) == 1 and cfg.intermediate_size != next(iter(sizes)):
            config_changes.append((cfg, next(iter(sizes))))
    # apply only after every check passed
    for name, changes in plan.items():
        for attr, value in changes.items():
            setattr(modules[name], attr, value)
    for cfg, size in config_changes:
        key = f"config:{getattr(cfg, 'model_type', '')}"
        plan[key] = {"intermediate_size": size}
        cfg.intermediate_size = size
    if plan:
        logger.info("sync_hf_model: updated %d module(s)/config(s)", len(plan))
    return plan


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _fresh_model(cls: type, config: Any) -> nn.Module:
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return cls(config)


def _module_record(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, nn.LayerNorm):
        return {
            "type": "LayerNorm",
            "shape": list(module.normalized_shape),
            "eps": module.eps,
            "affine": module.elementwise_affine,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.Embedding):
        return {"type": "Embedding", "num": module.num_embeddings, "dim": module.embedding_dim, "padding_idx": module.padding_idx}
    return None


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}


def _build(record: dict[str, Any]) -> nn.Module:
    kind = record["type"]
    if kind == "Linear":
        return nn.Linear(record["in"], record["out"], bias=record["bias"])
    if kind == "LayerNorm":
        return nn.LayerNorm(record["shape"], eps=record["eps"], elementwise_affine=record["affine"], bias=record["bias"])
    if kind == "Embedding":
        return nn.Embedding(record["num"], record["dim"], padding_idx=record["padding_idx"])
    raise VLPruneError(f"unknown module type {kind!r} in {SHAPES_FILE}")


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def save_pruned(model: nn.Module, directory: str | Path) -> Path:
    """Save a (pruned) transformers model so that :func:`load_pruned` rebuilds it exactly.

    Args:
        model: a ``transformers.PreTrainedModel``, pruned or not.
        directory: output directory (created).

    Returns:
        The directory.

    Raises:
        VLPruneError: not a transformers model, or a changed module of a type vlprune cannot record.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise VLPruneError(f"save_pruned needs a transformers PreTrainedModel, got {type(model).__name__}")
    directory = Path(directory)
    cls = type(model)
    fresh = _fresh_model(cls, model.config)
    fresh_modules = dict(fresh.named_modules())
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ref = fresh_modules.get(name)
        if ref is None or _shapes(module) == _shapes(ref):
            continue
        record = _module_record(module)
        if record is None:
            raise VLPruneError(
                f"module {name} ({type(module).__name__}) changed shape and vlprune cannot record that type"
            )
        changed[name] = record
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        ref = fresh_modules.get(name)
        if ref is None:
            continue
        diff = {
            a: getattr(module, a)
            for a in ATTENTION_ATTRS
            if isinstance(getattr(module, a, None), int) and getattr(module, a) != getattr(ref, a, None)
        }
        if diff:
            attrs[name] = diff
    del fresh
    keys = _checkpoint_keys(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    import transformers

    record = {
        "format": _FORMAT,
        "model_class": f"{cls.__module__}:{cls.__qualname__}",
        "transformers_version": transformers.__version__,
        "modules": changed,
        "attributes": attrs,
        "checkpoint_keys": keys,
    }
    (directory / SHAPES_FILE).write_text(json.dumps(record, indent=2))
    logger.info("save_pruned: %d reshaped module(s), %d attention record(s) -> %s", len(changed), len(attrs), directory)
    return directory


def _checkpoint_keys(model: nn.Module) -> dict[str, str]:
    """checkpoint key -> model key, for the keys ``save_pretrained`` renames (transformers 5.x
    reverts its weight conversions, e.g. ``vit.layers`` -> ``vit.encoder.layer``, on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x saves model keys as they are
        return {}
    names = list(model.state_dict().keys())
    markers = {name: torch.tensor([float(i)]) for i, name in enumerate(names)}
    reverted = revert_weight_conversion(model, dict(markers))
    mapping: dict[str, str] = {}
    for saved, tensor in reverted.items():
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1:
            raise VLPruneError(
                f"{type(model).__name__}: save_pretrained merges or splits weights ({saved}); "
                "save_pruned cannot map them back"
            )
        original = names[int(tensor.item())]
        if saved != original:
            mapping[saved] = original
    return mapping


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise VLPruneError(f"{directory} holds no weights (*.safetensors or pytorch_model*.bin)")


def load_pruned(directory: str | Path, model_class: type | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`, with the pruned shapes, in eval mode.

    Args:
        directory: the directory.
        model_class: the transformers class (default: the one recorded at save time).

    Returns:
        The model; its outputs equal the saved model's.

    Raises:
        VLPruneError: no record, an incompatible record, or weights that do not fit.
    """
    directory = Path(directory)
    path = directory / SHAPES_FILE
    if not path.is_file():
        raise VLPruneError(
            f"{directory} has no {SHAPES_FILE}; it was not written by vlprune.save_pruned "
            "(an unpruned model loads with from_pretrained)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VLPruneError(f"{path} is not valid JSON: {exc}") from exc
    if record.get("format") != _FORMAT:
        raise VLPruneError(f"{path} has format {record.get('format')!r}, expected {_FORMAT!r}")
    if model_class is None:
        module_name, _, qualname = record["model_class"].partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise VLPruneError(f"cannot import the recorded model class {record['model_class']}: {exc}") from exc
        model_class = obj
    config = model_class.config_class.from_pretrained(directory)
    model = model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)
    modules = dict(model.named_modules())
    for name, rec in record.get("modules", {}).items():
        if name not in modules:
            raise VLPruneError(f"{SHAPES_FILE} names module {name!r}, which {model_class.__name__} does not have")
        _set_module(model, name, _build(rec))
    modules = dict(model.named_modules())
    for name, attrs in record.get("attributes", {}).items():
        if name not in modules:
            raise VLPruneError(f"{SHAPES_FILE} names module {name!r}, which {model_class.__name__} does not have")
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    keys = record.get("checkpoint_keys", {})
    state = {keys.get(k, k): v for k, v in _read_state_dict(directory).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise VLPruneError(f"weights in {directory} that the rebuilt model lacks: {unexpected[:5]}")
    if missing:
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
        untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
        if untied:
            raise VLPruneError(f"weights missing from {directory}: {untied[:5]}")
    return model.eval()
