"""save_pruned / load_pruned: a self-contained directory, and plain transformers from_pretrained
where the config can describe the pruned model.

Outputs are compared exactly (``torch.equal``): loading must give back the saved model, not an
approximation of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

import vlprune
from tests.adapters.test_surgery import outputs, tp_prune
from tests.adapters.test_sync import _check_config_types
from vlprune.adapters.hf.persist import SHAPES_FILE, load_pruned, save_pruned
from vlprune.adapters.hf.sync import sync_hf_model
from vlprune.adapters.torch_pruning import prune_hf_model
from vlprune.errors import VLPruneError
from vlprune.testbed.tiny import example_inputs, tiny_model

logging.getLogger("transformers").setLevel(logging.ERROR)

CONFIG_KEY = "vlprune"  # the entry save_pruned adds to config.json (persist.CONFIG_KEY)
FAMILIES = ["clip", "vit", "dinov2", "blip", "vilt", "llava"]  # every family vlprune.testbed.tiny builds


def _marker(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())[CONFIG_KEY]


# --------------------------------------------------------------------------------------------
# uniform MLP widths: every family, vlprune's loader and plain transformers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "ratio"), [(f, 0.3) for f in FAMILIES] + [("dinov2", 0.5)])
def test_uniform_mlp_prune_sync_save_load_gives_identical_outputs(family: str, ratio: float, tmp_path) -> None:
    """Every MLP pruned to the same width: the config states it where its field's type can
    (``intermediate_size``; DINOv2's int ``mlp_ratio`` only for whole multiples of hidden_size),
    so plain ``from_pretrained`` loads the directory; vlprune's loader always does."""
    model = tiny_model(family).eval()
    prune_hf_model(model, example_inputs(family), tp.importance.MagnitudeImportance(), ratio,
                   prune_heads=False, global_pruning=False)
    _check_config_types(model.config)
    expected = outputs(model, family)
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    got = outputs(again, family)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not hasattr(again.config, CONFIG_KEY)  # the marker describes the directory, not the model
    marker = _marker(tmp_path / "m")
    assert marker["load_with"] == "vlprune.load_pruned" and marker["shapes_file"] == SHAPES_FILE
    expressible = not (family == "dinov2" and ratio == 0.3)  # 44 = 1.375 x 32 neurons: no int mlp_ratio
    assert marker["from_pretrained"] is expressible
    if expressible:
        plain = type(model).from_pretrained(tmp_path / "m").eval()
        got = outputs(plain, family)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    else:
        assert "vlprune.load_pruned" in marker["note"]
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            type(model).from_pretrained(tmp_path / "m")


def test_plain_from_pretrained_with_the_auto_class_on_uniform_gqa_heads(tmp_path) -> None:
    """Llama states head_dim in its config, so uniform head counts are expressible too."""
    from transformers import AutoModelForImageTextToText

    model = tiny_model("llava").eval()
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23])  # query heads 0 and 2
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            att = layer.self_attn
            att.q_proj.weight = torch.nn.Parameter(att.q_proj.weight[keep].clone())
            att.q_proj.out_features = 16
            att.o_proj.weight = torch.nn.Parameter(att.o_proj.weight[:, keep].clone())
            att.o_proj.in_features = 16
    sync_hf_model(model)
    save_pruned(model, tmp_path / "m")
    assert _marker(tmp_path / "m")["from_pretrained"] is True
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "m").eval()
    assert type(plain) is type(model)
    assert torch.equal(outputs(plain, "llava")["logits"], outputs(model, "llava")["logits"])


def test_per_layer_shapes_are_marked_for_load_pruned(tmp_path) -> None:
    """CLIP derives head_dim from hidden_size / num_attention_heads, so pruned heads cannot be
    written into its config: config.json says so and names the loader."""
    model = tiny_model("clip").eval()
    tp_prune(model, "clip", mode="heads")
    sync_hf_model(model, pruned="heads")
    save_pruned(model, tmp_path / "m")
    marker = _marker(tmp_path / "m")
    assert marker["from_pretrained"] is False and "vlprune.load_pruned(directory)" in marker["note"]
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    assert torch.equal(outputs(again, "clip")["logits_per_image"], outputs(model, "clip")["logits_per_image"])


# --------------------------------------------------------------------------------------------
# tokenizer / processor files
# --------------------------------------------------------------------------------------------


def test_pruned_directory_holds_the_tokenizer_of_the_checkpoint(tmp_path) -> None:
    """The testbed CLIP is loaded from a directory with tokenizer files: they come along, also
    through a load_pruned / save_pruned round, so ``pruned/`` is self-contained."""
    from transformers import AutoTokenizer

    from vlprune.testbed import checkpoint_dir, load

    model = load("clip")
    save_pruned(model, tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names and "train_log.json" not in names
    text = ["two plus three", "a digit seven"]
    want = AutoTokenizer.from_pretrained(checkpoint_dir("clip"))(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(tmp_path / "m")(text)["input_ids"] == want
    again = load_pruned(tmp_path / "m")
    save_pruned(again, tmp_path / "again")
    assert AutoTokenizer.from_pretrained(tmp_path / "again")(text)["input_ids"] == want


def test_save_pruned_saves_a_given_processor(tmp_path) -> None:
    from transformers import AutoImageProcessor, CLIPImageProcessor

    from vlprune.testbed import load

    processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    save_pruned(load("clip"), tmp_path / "m", processor=processor)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert "preprocessor_config.json" in names and "tokenizer.json" in names  # given + copied
    assert AutoImageProcessor.from_pretrained(tmp_path / "m").crop_size == {"height": 56, "width": 56}
    # a tiny model built from a config has no source directory: only what is given is saved
    save_pruned(tiny_model("vit"), tmp_path / "tiny", processor=processor)
    assert not (tmp_path / "tiny" / "tokenizer.json").exists()
    assert (tmp_path / "tiny" / "preprocessor_config.json").exists()
    with pytest.raises(VLPruneError, match="save_pretrained"):
        save_pruned(tiny_model("vit"), tmp_path / "bad", processor=object())
    assert not (tmp_path / "bad").exists()


def test_top_level_save_pruned_passes_processor(tmp_path) -> None:
    """``vlprune.save_pruned`` is the entry point the README shows."""
    from transformers import CLIPImageProcessor

    vlprune.save_pruned(tiny_model("vit"), tmp_path / "m", processor=CLIPImageProcessor())
    assert (tmp_path / "m" / "preprocessor_config.json").exists()


def test_a_model_with_prune_masks_is_refused_with_the_fix(tmp_path) -> None:
    """Unstructured masks (torch.nn.utils.prune) must be made permanent before saving; the error says how."""
    from vlprune.plugins.unstructured import apply_masks, make_permanent

    model = tiny_model("vit")
    name = "vit.layers.0.mlp.fc1.weight"
    weight = dict(model.named_parameters())[name]
    apply_masks(model, {name: torch.rand_like(weight) > 0.5})
    with pytest.raises(VLPruneError, match=r"finish\(model\).*make_permanent") as info:
        save_pruned(model, tmp_path / "masked")
    assert "vit.layers.0.mlp.fc1.weight" in str(info.value) and not (tmp_path / "masked").exists()
    make_permanent(model)
    reloaded = load_pruned(save_pruned(model, tmp_path / "plain"))
    expected, got = outputs(model, "vit"), outputs(reloaded, "vit")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
