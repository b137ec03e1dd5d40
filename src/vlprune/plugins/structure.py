"""Model structure read off module names alone, shared by criteria and adapters.

Framework-agnostic (no Torch-Pruning, NNI or model-family knowledge): where the two (optionally
gated) linears of every MLP are, so that neuron-level criteria (:mod:`vlprune.plugins.amp`) find
the hidden activations of a model without importing an adapter, and where the language-model
decoder layers are (:func:`find_decoder_layers`), for the layer criteria
(:mod:`vlprune.plugins.layer_similarity`) and layer removal (:mod:`vlprune.adapters.hf.layers`).
:mod:`vlprune.adapters.hf.families` builds its richer description (modalities, head counts) on top
of these.

Example:
    >>> from vlprune.testbed.tiny import tiny_model
    >>> [m.down for m in mlp_layouts(tiny_model("clip"))][:1]
    ['text_model.encoder.layers.0.mlp.fc2']
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

__all__ = [
    "DECODER_STACKS", "MLPLayout", "find_decoder_layers", "join", "linear_child", "mlp_layouts",
    "registered_decoder_pattern",
]

#: globs of the ``nn.ModuleList`` paths that hold decoder layers, tried in this order: the LLaVA
#: family's language model (``model.language_model.layers``, older ``language_model.model.layers``),
#: BLIP's text decoder, decoder-only LMs (Llama / Mistral / Qwen / Gemma ``model.layers``, a bare
#: ``layers``, OPT ``model.decoder.layers``, GPT-2 ``transformer.h``, GPT-NeoX ``gpt_neox.layers``)
DECODER_STACKS: tuple[str, ...] = (
    "*language_model.layers",
    "language_model.model.layers",
    "text_decoder.bert.encoder.layer",
    "model.layers",
    "layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
)


def join(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` when ``prefix`` is the root (``""``)."""
    return f"{prefix}.{name}" if prefix else name


def linear_child(module: nn.Module, name: str) -> nn.Linear | None:
    """The direct child ``name`` of ``module`` if it is an ``nn.Linear``, else ``None``."""
    child = module._modules.get(name)
    return child if isinstance(child, nn.Linear) else None


@dataclass(frozen=True)
class MLPLayout:
    """Where one MLP's linears are.

    Attributes:
        name: path of the module that contains the MLP.
        up: path of the first linear (``fc1`` / ``up_proj`` / ``intermediate.dense``).
        down: path of the second linear (``fc2`` / ``down_proj`` / ``output.dense``).
        gate: path of the gate linear of a gated MLP, else ``None``.
    """

    name: str
    up: str
    down: str
    gate: str | None = None


def mlp_layouts(model: nn.Module) -> list[MLPLayout]:
    """Where the two (optionally gated) linears of every MLP are, from names alone.

    Args:
        model: any ``nn.Module``.

    Returns:
        One :class:`MLPLayout` per MLP, in module order.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> mlp_layouts(tiny_model("llava"))[-1].gate
        'model.language_model.layers.1.mlp.gate_proj'
    """
    found: list[MLPLayout] = []
    for name, module in model.named_modules():
        if linear_child(module, "fc1") is not None and linear_child(module, "fc2") is not None:
            found.append(MLPLayout(name, join(name, "fc1"), join(name, "fc2")))
        elif linear_child(module, "up_proj") is not None and linear_child(module, "down_proj") is not None:
            gate = join(name, "gate_proj") if linear_child(module, "gate_proj") is not None else None
            found.append(MLPLayout(name, join(name, "up_proj"), join(name, "down_proj"), gate))
        else:
            inter, out = module._modules.get("intermediate"), module._modules.get("output")
            if inter is not None and out is not None:
                up, down = linear_child(inter, "dense"), linear_child(out, "dense")
                if up is not None and down is not None:
                    found.append(MLPLayout(name, join(name, "intermediate.dense"), join(name, "output.dense")))
    return found


def registered_decoder_pattern(model: nn.Module) -> str | None:
    """The decoder glob of the first family rule registered through the ``vlprune_register_families``
    hook that matches ``model`` and names a decoder (``FamilyRule(decoder=...)``), else ``None``.

    Args:
        model: any ``nn.Module``.

    Returns:
        A glob on full module paths (``"dec.layers.*"``) or ``None``.

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> registered_decoder_pattern(tiny_model("llava")) is None   # no plugin registers one
        True
    """
    from vlprune.plugins.registry import family_rules  # lazy: the registry loads the built-in plugins

    for rule in family_rules():
        pattern = getattr(rule, "decoder", "")
        if pattern and rule.matches(model):
            return str(pattern)
    return None


def find_decoder_layers(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Module paths of the language-model decoder layers of ``model``, in forward order.

    Read off module names: with ``pattern`` (or the decoder glob of a family rule a plugin
    registered for this model, :func:`registered_decoder_pattern`), the elements of
    ``nn.ModuleList`` s whose path matches it (outermost matches only, so per-layer lists such as
    MoE experts inside a matched layer are not layers); otherwise the elements of the first
    non-empty ``nn.ModuleList`` whose path matches one of :data:`DECODER_STACKS`, tried in order.

    Args:
        model: any ``nn.Module`` (a transformers LLaVA-family model, BLIP, a decoder-only LM, ...).
        pattern: glob on full module paths of the decoder layers, as ``FamilyRule.decoder``
            (``"model.layers.*"``); ``None`` for the lookup above.

    Returns:
        The paths (``["model.language_model.layers.0", ...]``); empty when none is found (encoder-only
        models such as CLIP or ViT, whose stacks are not decoders).

    Example:
        >>> from vlprune.testbed.tiny import tiny_model
        >>> find_decoder_layers(tiny_model("llava"))
        ['model.language_model.layers.0', 'model.language_model.layers.1']
        >>> find_decoder_layers(tiny_model("clip"))
        []
    """
    if pattern is None:
        pattern = registered_decoder_pattern(model)
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    if pattern:
        found: list[str] = []
        for name, module in lists:
            for i in range(len(module)):
                path = join(name, str(i))
                if fnmatch.fnmatchcase(path, pattern) and not any(path.startswith(f + ".") for f in found):
                    found.append(path)
        return found
    for stack in DECODER_STACKS:
        for name, module in lists:
            if len(module) > 0 and fnmatch.fnmatchcase(name, stack):
                return [join(name, str(i)) for i in range(len(module))]
    return []
