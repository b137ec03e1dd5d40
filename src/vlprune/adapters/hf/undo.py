"""Undo an in-place model edit that failed half-way: :class:`ModelUndo`, :func:`restore_on_failure`.

vlprune's model edits (:func:`~vlprune.adapters.hf.prune.prune_hf_model`,
:func:`~vlprune.adapters.nni.speedup.shrink`, :func:`~vlprune.adapters.hf.layers.remove_layers`)
promise that a failure leaves the model exactly as it was. They all undo with this one snapshot,
which keeps references rather than copies (no tensor is copied, so it costs a walk over the
modules, not the model's memory):

- every module's attributes (its ``__dict__``: plain attributes, ``training``, the
  ``_parameters`` / ``_buffers`` / ``_modules`` dicts, hook dicts, ...), each container attribute
  (dict / list / set, and the containers inside it) restored *in place* (the same objects with
  their old contents), so a module gets back the very child modules, ``Parameter`` objects and
  buffers it had (Torch-Pruning replaces a pruned parameter by a new one);
- every parameter's and buffer's ``.data`` (and a parameter's ``.grad`` and ``requires_grad``),
  so an edit that assigns ``param.data = ...`` (as :func:`~vlprune.adapters.nni.speedup.shrink`
  applies masks) is undone and the parameter stays the same object;
- every transformers config reachable from the modules (``config``, its sub-configs such as
  ``text_config`` / ``vision_config``, ``generation_config``): each config object keeps its
  identity and gets back its fields (container fields in place), so sub-config identity
  (``model.config.text_config is model.model.language_model.config``) survives a restore.

Not covered: in-place arithmetic on a tensor's storage (``weight.mul_(...)``, ``index_copy_``);
an edit that needs it clones the tensor first (:meth:`ModelUndo.keep_values`) or assigns a new
tensor to ``.data`` instead.

Example:
    >>> from vlprune.testbed.tiny import tiny_model
    >>> model = tiny_model("llava")
    >>> try:
    ...     with restore_on_failure(model):
    ...         model.config.text_config.num_hidden_layers = 1
    ...         del model.model.language_model.layers[1]
    ...         raise RuntimeError("failed half-way")
    ... except RuntimeError:
    ...     pass
    >>> len(model.model.language_model.layers), model.config.text_config.num_hidden_layers
    (2, 2)
    >>> model.config.text_config is model.model.language_model.config
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ModelUndo", "restore_on_failure"]

_MISSING = object()


def _contents(value: Any, seen: frozenset[int] = frozenset()) -> Any:
    """The contents of a mutable container (dict / list / set), nested containers with theirs, by
    reference; ``_MISSING`` for anything else (or a container inside itself)."""
    if not isinstance(value, (dict, list, set)) or id(value) in seen:
        return _MISSING
    inner = seen | {id(value)}
    if isinstance(value, dict):
        return [(k, v, _contents(v, inner)) for k, v in value.items()]
    if isinstance(value, list):
        return [(v, _contents(v, inner)) for v in value]
    return list(value)


def _refill(value: Any, contents: Any) -> None:
    """Put ``contents`` (from :func:`_contents`) back into the container ``value``, in place (the
    same container objects at every level)."""
    if contents is _MISSING:
        return
    if isinstance(value, dict):
        value.clear()
        for key, item, inner in contents:
            _refill(item, inner)
            value[key] = item
    elif isinstance(value, list):
        for item, inner in contents:
            _refill(item, inner)
        value[:] = [item for item, _ in contents]
    else:
        value.clear()
        value.update(contents)


class _State:
    """One object's ``__dict__``: each value by reference, container values with their contents."""

    __slots__ = ("obj", "items")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.items = [(key, value, _contents(value)) for key, value in vars(obj).items()]

    def restore(self) -> None:
        state = vars(self.obj)
        saved = {key for key, _, _ in self.items}
        for key in [k for k in state if k not in saved]:
            del state[key]
        for key, value, contents in self.items:
            _refill(value, contents)
            state[key] = value


def _config_types() -> tuple[type, ...]:
    try:
        from transformers import GenerationConfig, PretrainedConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (PretrainedConfig, GenerationConfig)


def _configs(model: nn.Module) -> list[Any]:
    """Every transformers config object a module of ``model`` holds as an attribute, and the
    configs nested in those (sub-configs), each once."""
    types = _config_types()
    if not types:
        return []
    seen: dict[int, Any] = {}
    stack = [v for m in model.modules() for v in vars(m).values() if isinstance(v, types)]
    while stack:
        cfg = stack.pop()
        if id(cfg) not in seen:
            seen[id(cfg)] = cfg
            stack.extend(v for v in vars(cfg).values() if isinstance(v, types))
    return list(seen.values())


class ModelUndo:
    """A snapshot of what vlprune's in-place model edits change, by reference; :meth:`restore`
    puts it back (see the module docstring for what is covered).

    Taking it costs a walk over the modules, parameters and configs (no tensor is copied);
    restoring can be done any number of times.

    Args:
        model: the model about to be edited.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> model = tiny_model("clip")
        >>> undo = ModelUndo(model)
        >>> weight = model.visual_projection.weight
        >>> model.visual_projection.weight = nn.Parameter(weight[:4].detach())
        >>> undo.restore()
        >>> model.visual_projection.weight is weight
        True
    """

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        self._modules = [_State(m) for m in modules]
        tensors: dict[int, torch.Tensor] = {}
        for module in modules:
            for store in (module._parameters, module._buffers):
                for tensor in store.values():
                    if isinstance(tensor, torch.Tensor):
                        tensors.setdefault(id(tensor), tensor)
        self._tensors = [
            (t, t.data, t.grad, t.requires_grad) if isinstance(t, nn.Parameter) else (t, t.data, _MISSING, _MISSING)
            for t in tensors.values()
        ]
        self._configs = [_State(cfg) for cfg in _configs(model)]
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_values(self, tensors: Iterable[torch.Tensor]) -> None:
        """Also keep a copy of these tensors' values, for an edit that changes them in place
        (``weight.mul_(...)``); :meth:`restore` copies them back.

        Args:
            tensors: the tensors (parameters, buffers) about to be edited in place.
        """
        with torch.no_grad():
            self._values.extend((t, t.detach().clone()) for t in tensors)

    def restore(self) -> None:
        """Put every module attribute, parameter, buffer and config back as it was at construction."""
        for state in self._modules:
            state.restore()
        with torch.no_grad():
            for tensor, data, grad, requires_grad in self._tensors:
                if grad is not _MISSING:
                    tensor.grad = None
                tensor.data = data
                if grad is not _MISSING:
                    tensor.requires_grad_(requires_grad)
                    tensor.grad = grad
            for tensor, values in reversed(self._values):
                tensor.data.copy_(values)
        for state in self._configs:
            state.restore()


@contextlib.contextmanager
def restore_on_failure(model: nn.Module) -> Iterator[ModelUndo]:
    """Run the block on ``model``; if it raises (anything, ``KeyboardInterrupt`` included), restore
    the model as it was (:class:`ModelUndo`) and let the error propagate.

    Args:
        model: the model the block edits in place.

    Yields:
        The :class:`ModelUndo` (for :meth:`ModelUndo.keep_values`).

    Example:
        >>> with restore_on_failure(model):          # doctest: +SKIP
        ...     pruner.step(); sync_hf_model(model, pruner=pruner)
    """
    undo = ModelUndo(model)
    try:
        yield undo
    except BaseException:
        undo.restore()
        raise
