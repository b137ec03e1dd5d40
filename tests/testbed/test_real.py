"""vlprune.testbed.real: the registry of real-weight models dispatches to loaders that exist."""

from __future__ import annotations

import importlib

import pytest

from vlprune.errors import RegistryError
from vlprune.testbed import real


def test_every_entry_names_functions_that_exist() -> None:
    for name, (module, load_fn, proc_fn) in real.REAL_MODELS.items():
        mod = importlib.import_module(module)  # importing a loader module needs none of the weight packages
        assert callable(getattr(mod, load_fn)) and callable(getattr(mod, proc_fn)), name


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(RegistryError, match="dinov2-s.*minilm.*smollm2"):
        real.load("llama-70b")
    with pytest.raises(RegistryError, match="unknown real model"):
        real.processor("nope")
