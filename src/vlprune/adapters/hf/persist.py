"""Save and reload pruned transformers models: :func:`save_pruned` / :func:`load_pruned`.

A pruned model's directory is self-contained: ``save_pretrained`` output (config + safetensors),
the tokenizer / processor files (given as ``processor=``, or copied from the local directory the
model was loaded from), and :data:`SHAPES_FILE`, a JSON record of every module whose parameter
shapes or simple attributes differ from a fresh model built from the saved config, and of the
weights that are tied. The model object is never pickled.

Two ways to load it:

- :func:`load_pruned` always works: it rebuilds the model from its config (nothing is downloaded),
  applies the record and loads the weights strictly.
- plain ``transformers`` (``AutoModel...from_pretrained(dir)``) works when the config describes
  every shape, i.e. the record lists no module: uniform MLP widths and head counts under each
  (sub-)config, which :func:`~vlprune.adapters.hf.sync.sync_hf_model` writes into the config. It
  cannot describe per-layer widths, or heads narrower than ``hidden_size / num_heads`` in families
  that derive ``head_dim`` from them (CLIP, ViT, ...): then ``from_pretrained`` fails with its
  size-mismatch report. transformers 5.x gives a config no hook to change that error, so
  ``config.json`` carries a ``"vlprune"`` entry saying which case it is and to load with
  ``vlprune.load_pruned`` (:data:`CONFIG_KEY`).

Example:
    >>> save_pruned(model, "pruned/", processor=processor)         # doctest: +SKIP
    >>> model = load_pruned("pruned/")                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import json
import logging
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.errors import VLPruneError

__all__ = ["save_pruned", "load_pruned", "SHAPES_FILE", "CONFIG_KEY", "PROCESSOR_FILES"]

logger = logging.getLogger(__name__)

#: name of the shape record :func:`save_pruned` writes next to the weights
SHAPES_FILE = "vlprune_shapes.json"
_FORMAT = "vlprune.shapes/1"
#: the entry :func:`save_pruned` adds to ``config.json``: how to load the directory
CONFIG_KEY = "vlprune"
#: tokenizer / processor files :func:`save_pruned` copies from the directory a model was loaded from
PROCESSOR_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece: tokenizer.model, spiece.model, sentencepiece.bpe.model
    "preprocessor_config.json",  # image processor / feature extractor
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


_SIMPLE = (bool, int, float, str, type(None))


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _is_simple(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_simple(v) for v in value)
    return isinstance(value, _SIMPLE)


def _simple_attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training" and _is_simple(v)
    }


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise VLPruneError(f"cannot import the recorded model class {path!r}: {exc}") from exc
    if not isinstance(obj, type):
        raise VLPruneError(f"the recorded model class {path!r} is not a class")
    return obj


def _build_from_config(cls: type, config: Any, **kwargs: Any) -> nn.Module:
    """A model of ``cls`` built from ``config`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, **kwargs)
        return cls(config)


def _checkpoint_keys(model: nn.Module) -> dict[str, str]:
    """checkpoint key -> model key, for the keys ``save_pretrained`` renames (transformers 5.x
    reverts its weight conversions on save, e.g. ``vit.layers`` -> ``vit.encoder.layer``)."""
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


def _tied_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    return [names for names in groups.values() if len(names) > 1]


def _main_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _source_dir(model: nn.Module) -> Path | None:
    """The local directory ``model`` was loaded from (``from_pretrained`` / :func:`load_pruned`), if any."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not name or not isinstance(name, (str, Path)):
        return None
    path = Path(name)
    return path if path.is_dir() else None


def _save_processor_files(model: nn.Module, processor: Any, directory: Path) -> list[str]:
    """Write ``processor`` and copy the tokenizer / processor files of the model's source directory
    (those the processor did not write) into ``directory``; the names written."""
    written: list[str] = []
    if processor is not None:
        with tempfile.TemporaryDirectory() as tmp:
            processor.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                target = directory / f.name
                if target.is_dir():
                    shutil.rmtree(target)
                shutil.move(str(f), str(target))
                written.append(f.name)
    source = _source_dir(model)
    if source is not None and source.resolve() != directory.resolve():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in written and any(fnmatch.fnmatch(f.name, p) for p in PROCESSOR_FILES):
                shutil.copy2(f, directory / f.name)
                written.append(f.name)
        logger.info("save_pruned: tokenizer / processor files from %s: %s", source, written or "none")
    elif source is None and processor is None:
        logger.info(
            "save_pruned: no processor= given and the model was not loaded from a local directory: "
            "the saved directory holds no tokenizer / processor"
        )
    return written


def _mark_config(directory: Path, changed: int, from_pretrained: bool) -> None:
    """Add the :data:`CONFIG_KEY` entry to the saved ``config.json``."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    if from_pretrained:
        note = (
            "pruned by vlprune; this config describes every shape, so transformers' from_pretrained "
            "loads it (and so does vlprune.load_pruned)"
        )
    else:
        note = (
            f"pruned by vlprune; {changed} module(s) have shapes this config cannot express (per-layer "
            f"widths or head sizes, listed in {SHAPES_FILE}), so transformers' from_pretrained reports "
            "size mismatches: load this directory with vlprune.load_pruned(directory)"
        )
    config[CONFIG_KEY] = {
        "format": _FORMAT,
        "shapes_file": SHAPES_FILE,
        "load_with": "vlprune.load_pruned",
        "from_pretrained": from_pretrained,
        "note": note,
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pruned(
    model: nn.Module, directory: str | Path, *, processor: Any = None, progress: bool = False
) -> Path:
    """Save a (pruned) transformers model so that :func:`load_pruned` rebuilds it exactly.

    Writes ``model.save_pretrained(directory)`` (config + safetensors) and :data:`SHAPES_FILE`:
    the model class, the transformers version, the attention implementation, dtypes, tied weights,
    and for every module whose parameter/buffer shapes or simple attributes (``in_features``,
    ``normalized_shape``, ``num_heads``, ``head_dim``, ``scale`` ...) differ from a fresh model
    built from ``model.config``: those shapes and attributes. Call
    :func:`~vlprune.adapters.hf.sync.sync_hf_model` first (it writes the sizes a config can hold).

    The directory is self-contained: ``processor`` (a processor, tokenizer or image processor:
    anything with ``save_pretrained``) is saved into it, and the tokenizer / processor files
    (:data:`PROCESSOR_FILES`) of the local directory the model was loaded from
    (``model.name_or_path``, as for the testbed checkpoints) are copied, except those ``processor``
    wrote. ``config.json`` gets a :data:`CONFIG_KEY` entry: ``"from_pretrained": true`` when the
    config describes every shape (the record lists no module, the same weights are tied and all
    parameters share one dtype), so plain ``transformers`` ``from_pretrained(directory)`` gives
    the same model; else ``false``, with a note to load it with :func:`load_pruned` (per-layer
    widths, heads narrower than the config implies: ``from_pretrained`` then fails with its
    size-mismatch report).

    Args:
        model: a ``transformers.PreTrainedModel``, pruned or not (not changed).
        directory: output directory (created if needed).
        processor: a processor / tokenizer / image processor to save alongside, or None.
        progress: show transformers' "Writing model shards" progress bar.

    Returns:
        The directory, as a ``Path``.

    Raises:
        VLPruneError: not a transformers model, a ``processor`` without ``save_pretrained``,
            modules added/removed/replaced by other types, a reshaped non-persistent buffer, or
            weights ``save_pretrained`` renames irreversibly. Nothing is written then.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> save_pruned(tiny_model("vit"), "/tmp/vit_pruned")          # doctest: +SKIP
        PosixPath('/tmp/vit_pruned')
    """
    if not hasattr(model, "save_pretrained") or not hasattr(getattr(model, "config", None), "to_dict"):
        raise VLPruneError(
            f"save_pruned needs a transformers PreTrainedModel (with save_pretrained and config), "
            f"got {type(model).__name__}"
        )
    if processor is not None and not callable(getattr(processor, "save_pretrained", None)):
        raise VLPruneError(
            f"processor= takes a processor, tokenizer or image processor with save_pretrained, got a "
            f"{type(processor).__name__}"
        )
    masked = [
        f"{name}.{key.removesuffix('_mask')}" if name else key.removesuffix("_mask")
        for name, module in model.named_modules()
        for key in module._buffers
        if key.endswith("_mask") and f"{key.removesuffix('_mask')}_orig" in module._parameters
    ]
    if masked:
        raise VLPruneError(
            f"save_pruned: {len(masked)} weight(s) still carry torch.nn.utils.prune masks (e.g. {masked[:3]}), "
            "which a config-built model cannot load; make them plain weights first: pruning.finish(model) "
            "for vlprune.recipes.finetune.GlobalUnstructuredPruning, or "
            "vlprune.plugins.unstructured.make_permanent(model)"
        )
    import transformers

    directory = Path(directory)
    cls = type(model)
    with torch.device("meta"):
        fresh = _build_from_config(cls, copy.deepcopy(model.config))
    fresh_modules = dict(fresh.named_modules())
    model_modules = dict(model.named_modules())
    extra = sorted(set(model_modules) - set(fresh_modules))
    missing = sorted(set(fresh_modules) - set(model_modules))
    if extra or missing:
        raise VLPruneError(
            f"{cls.__name__} differs from a model built from its config by more than shapes: "
            f"added {extra[:3]}, removed {missing[:3]}; update the config (e.g. num_hidden_layers) to match"
        )
    changed: dict[str, dict[str, Any]] = {}
    for name, module in model_modules.items():
        ref = fresh_modules[name]
        if type(module) is not type(ref):
            raise VLPruneError(
                f"module {name!r} is a {type(module).__name__} but a config-built {cls.__name__} has a "
                f"{type(ref).__name__} there; save_pruned records shape changes only"
            )
        entry: dict[str, Any] = {}
        params = {
            p: (None if t is None else list(t.shape))
            for p, t in module._parameters.items()
            if (t is None) != (ref._parameters.get(p) is None)
            or (t is not None and tuple(t.shape) != tuple(ref._parameters[p].shape))
        }
        if params:
            entry["params"] = params
        buffers = {}
        for b, t in module._buffers.items():
            r = ref._buffers.get(b)
            if (t is None) != (r is None) or (t is not None and tuple(t.shape) != tuple(r.shape)):
                if b in module._non_persistent_buffers_set:
                    raise VLPruneError(f"non-persistent buffer {name}.{b} changed shape; it cannot be saved")
                dtype = None if t is None else str(t.dtype).removeprefix("torch.")
                buffers[b] = None if t is None else {"shape": list(t.shape), "dtype": dtype}
        if buffers:
            entry["buffers"] = buffers
        mine, theirs = _simple_attrs(module), _simple_attrs(ref)
        attrs = {
            a: _encode(v)
            for a, v in mine.items()
            if a not in theirs or theirs[a] != v or type(theirs[a]) is not type(v)
        }
        if attrs:
            entry["attrs"] = attrs
        if entry:
            entry["class"] = type(module).__name__
            changed[name] = entry
    same_ties = {frozenset(g) for g in _tied_groups(model)} == {frozenset(g) for g in _tied_groups(fresh)}
    del fresh, fresh_modules
    keys = _checkpoint_keys(model)
    main = _main_dtype(model)
    param_dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.dtype != main}
    directory.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not progress and bar_was_on:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bar_was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()
    from_pretrained = not changed and not param_dtypes and same_ties
    record = {
        "format": _FORMAT,
        "model_class": _class_path(cls),
        "model_type": getattr(model.config, "model_type", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(main).removeprefix("torch."),
        "param_dtypes": param_dtypes,
        "tied": _tied_groups(model),
        "modules": changed,
        "checkpoint_keys": keys,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "from_pretrained": from_pretrained,
    }
    (directory / SHAPES_FILE).write_text(json.dumps(record, indent=1))
    _mark_config(directory, len(changed), from_pretrained)
    _save_processor_files(model, processor, directory)
    logger.info("save_pruned: %d module(s) differ from the config-built model -> %s", len(changed), directory)
    return directory


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

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


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / SHAPES_FILE
    if not path.is_file():
        raise VLPruneError(
            f"{directory} has no {SHAPES_FILE}, so it was not written by vlprune's save_pruned "
            "(an unpruned model loads with from_pretrained)"
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VLPruneError(f"{path} is not valid JSON ({exc}); re-save the model with save_pruned") from exc
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise VLPruneError(f"{path} has format {found!r}, expected {_FORMAT!r}; re-save with this vlprune version")
    for key in ("model_class", "modules", "tied", "checkpoint_keys", "dtype"):
        if key not in record:
            raise VLPruneError(f"{path} lacks {key!r}; the record is damaged, re-save with save_pruned")
    return record


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise VLPruneError(f"{SHAPES_FILE} names an unknown dtype {name!r}")
    return value


def load_pruned(directory: str | Path, model_class: type | None = None) -> nn.Module:
    """Load a model written by :func:`save_pruned`, with its pruned shapes, in eval mode.

    The model is built from the saved config (``model_class._from_config``; nothing is
    downloaded, the caller's RNG state is untouched), the recorded modules get parameters of the
    recorded shapes and their recorded attributes, the saved tied weights are tied (and only
    those), then every parameter and persistent buffer is loaded strictly from the safetensors.
    The model's ``name_or_path`` is ``directory``, so saving it again with :func:`save_pruned`
    carries the tokenizer / processor files along; load those with the usual
    ``AutoProcessor`` / ``AutoTokenizer.from_pretrained(directory)``.

    Args:
        directory: the directory :func:`save_pruned` wrote.
        model_class: the transformers class to build (default: the recorded one). It must be the
            recorded class or a subclass of it.

    Returns:
        The model in eval mode; its outputs equal the saved model's.

    Raises:
        VLPruneError: no or a damaged record, an incompatible ``model_class`` or config, a record
            naming modules the class does not have, or weights that do not fit.

    Example:
        >>> model = load_pruned("/tmp/vit_pruned")                    # doctest: +SKIP
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise VLPruneError(f"{directory} is not a directory written by save_pruned")
    record = _read_record(directory)
    recorded = _import_class(record["model_class"])
    if model_class is None:
        model_class = recorded
    elif not (isinstance(model_class, type) and issubclass(model_class, recorded)):
        raise VLPruneError(
            f"{directory} holds a {record['model_class']}; cannot load it as "
            f"{getattr(model_class, '__qualname__', model_class)!r} (pass that class or a subclass, or None)"
        )
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise VLPruneError(f"{model_class.__name__} is not a transformers model class (no config_class)")
    try:
        config = config_class.from_pretrained(directory)
    except Exception as exc:  # transformers raises OSError / ValueError / TypeError variously
        raise VLPruneError(f"cannot read the config in {directory}: {exc}") from exc
    if record.get("model_type") not in (None, getattr(config, "model_type", None)):
        raise VLPruneError(
            f"{SHAPES_FILE} is for model_type {record['model_type']!r} but the config is "
            f"{getattr(config, 'model_type', None)!r}; the directory mixes two saves"
        )
    import transformers

    if record.get("transformers_version") != transformers.__version__:
        logger.warning("load_pruned: saved with transformers %s, loading with %s",
                       record.get("transformers_version"), transformers.__version__)
    kwargs: dict[str, Any] = {}
    if record.get("attn_implementation"):
        kwargs["attn_implementation"] = record["attn_implementation"]
    if CONFIG_KEY in vars(config):  # save_pruned's marker: about the directory, not the model
        delattr(config, CONFIG_KEY)
    config.name_or_path = str(directory)  # a later save_pruned copies the tokenizer files from here
    main = _dtype(record["dtype"])
    model = _build_from_config(model_class, config, dtype=main, **kwargs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, entry in record["modules"].items():
            module = modules.get(name)
            if module is None:
                raise VLPruneError(f"{SHAPES_FILE} names module {name!r}, which {model_class.__name__} does not have")
            if entry.get("class") != type(module).__name__:
                raise VLPruneError(
                    f"{SHAPES_FILE} records {name!r} as a {entry.get('class')} but {model_class.__name__} "
                    f"has a {type(module).__name__} there; the record is from another model"
                )
            for pname, shape in entry.get("params", {}).items():
                old = module._parameters.get(pname)
                if shape is None:
                    module._parameters[pname] = None
                else:
                    dtype = old.dtype if old is not None else main
                    grad = old.requires_grad if old is not None else True
                    module._parameters[pname] = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=grad)
            for bname, spec in entry.get("buffers", {}).items():
                if spec is None:
                    module._buffers[bname] = None
                else:
                    module._buffers[bname] = torch.zeros(spec["shape"], dtype=_dtype(spec["dtype"]))
            for attr, value in entry.get("attrs", {}).items():
                setattr(module, attr, _decode(value))
        # ties: exactly the saved ones
        params = dict(model.named_parameters(remove_duplicate=False))
        leader = {name: name for name in params}
        for group in record["tied"]:
            unknown = [n for n in group if n not in params]
            if unknown:
                raise VLPruneError(f"{SHAPES_FILE} ties {unknown}, which {model_class.__name__} does not have")
            for n in group:
                leader[n] = group[0]
        made: dict[str, nn.Parameter] = {}
        used: set[int] = set()
        for name in params:
            lead = leader[name]
            if lead not in made:
                param = params[lead]
                if id(param) in used:  # tied in a config-built model, not in the saved one
                    param = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                made[lead] = param
                used.add(id(param))
            if params[name] is not made[lead]:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._parameters[attr] = made[lead]
        for name, dtype in record.get("param_dtypes", {}).items():
            model.get_parameter(name).data = model.get_parameter(name).data.to(_dtype(dtype))
    keys = record["checkpoint_keys"]
    state = {keys.get(k, k): v for k, v in _read_state_dict(directory).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise VLPruneError(f"the weights in {directory} do not fit the rebuilt model: {exc}") from exc
    if unexpected:
        raise VLPruneError(f"weights in {directory} that the rebuilt {model_class.__name__} lacks: {unexpected[:5]}")
    if missing:
        params = dict(model.named_parameters(remove_duplicate=False))
        loaded = {id(params[k]) for k in state if k in params}
        absent = [k for k in missing if k not in params or id(params[k]) not in loaded]
        if absent:
            raise VLPruneError(f"weights missing from {directory}: {absent[:5]}")
    n = sum(p.numel() for p in model.parameters())
    if record.get("n_parameters") not in (None, n):
        raise VLPruneError(f"rebuilt model has {n} parameters, the saved one had {record['n_parameters']}")
    logger.info("load_pruned: %s with %d parameters from %s", model_class.__name__, n, directory)
    return model.eval()
