"""vlprune: vision-language pruning criteria as plugins for Torch-Pruning, NNI and transformers."""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from vlprune.errors import VLPruneError

__all__ = ["__version__", "VLPruneError"]
