"""The transformers half of the Torch-Pruning adapter lives in ``vlprune.adapters.hf.prune``; every
name users import from ``vlprune.adapters.torch_pruning`` still comes from there, in either import
order (no import cycle)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: the names importable from vlprune.adapters.torch_pruning before the split (public and the private
#: ones tests / benchmarks use)
NAMES = (
    "IDWeightedImportance", "PlatonImportance", "AMPEntropyImportance", "KeepHeads", "KeepNeurons", "step_pruner",
    "head_step_guard", "amp_ratio_dict", "cubic_scheduler", "pruning_steps", "group_layer_names", "check_ratio",
    "call_importance", "check_finite", "hf_pruner_kwargs", "unwrapped_parameters", "positive_dims", "prune_hf_model",
    "_output_transform", "_heads_to_remove", "_PositiveDims", "_PositiveDimsForward",
    "_DIM_ARG", "_FloorWrapper", "_lift_value", "_scope_limits", "_OUT_FNS", "_matches",
)
HF = ("KeepHeads", "KeepNeurons", "hf_pruner_kwargs", "positive_dims", "prune_hf_model", "unwrapped_parameters")


@pytest.mark.parametrize("first", ["vlprune.adapters.hf.prune", "vlprune.adapters.torch_pruning", "vlprune"])
def test_every_name_stays_importable_from_torch_pruning_whatever_is_imported_first(first: str) -> None:
    code = (
        f"import {first}\n"
        f"from vlprune.adapters.torch_pruning import {', '.join(NAMES)}\n"
        "import vlprune.adapters.torch_pruning as t, vlprune.adapters.hf.prune as h\n"
        "from vlprune.adapters.torch_pruning import *\n"
        f"assert all(getattr(t, n) is getattr(h, n) for n in {HF!r})\n"
        f"assert set({HF!r}) <= set(t.__all__) and set(h.__all__) == set({HF!r})\n"
        "assert all(n in dir(t) for n in t.__all__)\n"
        "assert vlprune.adapters.torch_pruning.prune_hf_model.__module__ == 'vlprune.adapters.hf.prune'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    import vlprune.adapters.torch_pruning as t

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        t.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from vlprune.adapters.torch_pruning import nope", {})
