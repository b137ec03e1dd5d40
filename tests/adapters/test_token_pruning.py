"""Run-time visual-token pruning (adapters/hf/token_pruning.py) on the tiny LLaVA.

References are computed by hand: the language model run directly on the kept rows of
``inputs_embeds`` with masks and positions built here, and FastV's layers run one by one.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vlprune.adapters.hf.token_pruning import (
    DivPrune,
    FastV,
    RandomTokens,
    UniformTokens,
    measure_token_pruning,
    prefill_flops,
    prune_visual_tokens,
)
from vlprune.errors import DataError, ModelStructureError, VLPruneError
from vlprune.plugins.token_diversity import divprune_select, fastv_scores, uniform_select
from vlprune.testbed.tiny import example_inputs, tiny_model

PAD = 0


def _our_hooks(model: torch.nn.Module) -> list[str]:
    """Modules holding a hook of a VisualTokenPruning (transformers installs hooks of its own)."""
    from vlprune.adapters.hf.token_pruning import VisualTokenPruning

    return [
        name for name, m in model.named_modules()
        for hooks in (m._forward_pre_hooks, m._forward_hooks) for h in hooks.values()
        if isinstance(getattr(h, "__self__", None), VisualTokenPruning)
    ]


def _llava(eager: bool = False) -> torch.nn.Module:
    model = tiny_model("llava")
    if eager:
        model.set_attn_implementation("eager")
    return model


def _padded(model: torch.nn.Module, side: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows [image tokens, text of 12 - 3 i tokens] padded on ``side`` with PAD (mask 0)."""
    base = example_inputs("llava", batch_size=batch, seed=seed)
    ids, n_img = base["input_ids"], int((base["input_ids"][0] == model.config.image_token_id).sum())
    width = ids.shape[1]
    out_ids = torch.full_like(ids, PAD)
    mask = torch.zeros_like(ids)
    for i in range(batch):
        row = ids[i, : width - 3 * i]
        if side == "right":
            out_ids[i, : len(row)], mask[i, : len(row)] = row, 1
        else:
            out_ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    assert n_img == 16
    return {"input_ids": out_ids, "attention_mask": mask, "pixel_values": base["pixel_values"]}


def _embeds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """inputs_embeds with the projected image features in the image rows (as LLaVA builds them)."""
    core = model.model
    emb = core.get_input_embeddings()(batch["input_ids"])
    feats = torch.cat(list(core.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
    image = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
    return emb.masked_scatter(image, feats.to(emb.dtype))


def _kept_positions(batch: dict[str, torch.Tensor], image_token: int, chosen: torch.Tensor) -> torch.Tensor:
    """(B, L') positions: every non-image position plus the chosen image tokens (indices among the images)."""
    rows = []
    for i, ids in enumerate(batch["input_ids"]):
        img = (ids == image_token).nonzero().flatten()
        keep = set((ids != image_token).nonzero().flatten().tolist()) | set(img[chosen[i]].tolist())
        rows.append(sorted(keep))
    return torch.tensor(rows)


def _reference_logits(model, batch, keep_idx, positions: str) -> torch.Tensor:
    """The language model run by hand on the kept rows."""
    emb = _embeds(model, batch)
    b, length = batch["input_ids"].shape
    rows = torch.arange(b).unsqueeze(1)
    kept_emb = emb[rows, keep_idx]
    mask = batch["attention_mask"][rows, keep_idx]
    if positions == "original":
        pos = keep_idx.clone()  # model(**batch) without position_ids: positions 0..L-1
    else:
        pos = torch.arange(keep_idx.shape[1]).unsqueeze(0).expand(b, -1)
    hidden = model.model.language_model(inputs_embeds=kept_emb, attention_mask=mask, position_ids=pos, use_cache=False)
    return model.lm_head(hidden.last_hidden_state)


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_divprune_forward_equals_language_model_on_kept_rows(positions: str, side: str) -> None:
    model = _llava()
    batch = _padded(model, side)
    token = model.config.image_token_id
    emb = _embeds(model, batch)
    img_rows = torch.stack([emb[i, batch["input_ids"][i] == token] for i in range(3)])
    chosen = divprune_select(img_rows, 0.25)  # 4 of 16
    keep_idx = _kept_positions(batch, token, chosen)
    expected = _reference_logits(model, batch, keep_idx, positions)
    with prune_visual_tokens(model, "divprune", keep=0.25, positions=positions) as pruner:
        got = model(**batch).logits
    assert torch.equal(pruner.last_kept, keep_idx)
    assert got.shape == (3, batch["input_ids"].shape[1] - 12, model.config.text_config.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_tokens_never_dropped_and_image_count_is_keep() -> None:
    model = _llava()
    batch = _padded(model, "left")
    token = model.config.image_token_id
    for method, keep, m in (("divprune", 3, 3), ("uniform_tokens", 0.5, 8), ("random_tokens", 0.1, 2)):
        with prune_visual_tokens(model, method, keep=keep) as pruner:
            model(**batch)
        for i, kept in enumerate(pruner.last_kept):
            ids = batch["input_ids"][i]
            text = set((ids != token).nonzero().flatten().tolist())
            assert text <= set(kept.tolist())
            assert int((ids[kept] == token).sum()) == m
            assert kept.tolist() == sorted(kept.tolist())


@torch.no_grad()
def test_uniform_tokens_keeps_the_stride_positions() -> None:
    model = _llava()
    batch = example_inputs("llava", batch_size=2)
    with prune_visual_tokens(model, UniformTokens(keep=4)) as pruner:
        model(**batch)
    # image tokens sit at positions 0..15 in the tiny batch
    assert pruner.last_kept[:, :4].tolist() == [uniform_select(16, 4).tolist()] * 2


@torch.no_grad()
@pytest.mark.parametrize("positions", ["original", "contiguous"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_greedy_generate_equals_uncached(positions: str, side: str) -> None:
    model = _llava()
    batch = _padded(model, side)
    args = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with prune_visual_tokens(model, "divprune", keep=0.25, positions=positions):
        cached = model.generate(**batch, **args)
        uncached = model.generate(**batch, use_cache=False, **args)
    assert torch.equal(cached, uncached)
    full = model.generate(**batch, **args)
    assert not torch.equal(cached, full)  # pruning changed something (the tiny model is sensitive)


@torch.no_grad()
def test_cached_decoding_equals_manual_greedy_on_pruned_sequence() -> None:
    """Left padding, original positions: generate() == greedy loop of the LM on the kept rows."""
    model = _llava()
    batch = _padded(model, "left")
    token = model.config.image_token_id
    emb = _embeds(model, batch)
    chosen = divprune_select(torch.stack([emb[i, batch["input_ids"][i] == token] for i in range(3)]), 0.25)
    keep_idx = _kept_positions(batch, token, chosen)
    rows = torch.arange(3).unsqueeze(1)
    seq = emb[rows, keep_idx]
    mask = batch["attention_mask"][rows, keep_idx]
    full_pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # generate()'s positions
    pos = full_pos[rows, keep_idx]
    tokens = []
    for _ in range(5):
        out = model.model.language_model(inputs_embeds=seq, attention_mask=mask, position_ids=pos, use_cache=False)
        nxt = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        tokens.append(nxt)
        seq = torch.cat([seq, model.model.get_input_embeddings()(nxt)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + 1], dim=1)
    expected = torch.stack(tokens, dim=1)
    with prune_visual_tokens(model, "divprune", keep=0.25, positions="original"):
        got = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got[:, batch["input_ids"].shape[1] :], expected)


@torch.no_grad()
def test_detach_restores_outputs_bit_exactly_and_weights_are_unchanged() -> None:
    model = _llava()
    batch = _padded(model, "right")
    before = model(**batch).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = prune_visual_tokens(model, "divprune", keep=0.1)
    assert pruner.attached
    pruned = model(**batch).logits
    model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    pruner.detach()
    assert not pruner.attached and not hasattr(model, "_vlprune_token_pruning")
    assert pruned.shape[1] < before.shape[1]
    assert torch.equal(model(**batch).logits, before)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    # re-attach works, and gives the same result
    with pruner:
        assert torch.equal(model(**batch).logits, pruned)
    assert torch.equal(model(**batch).logits, before)


@torch.no_grad()
def test_context_manager_detaches_on_exception() -> None:
    model = _llava()
    batch = example_inputs("llava")
    before = model(**batch).logits
    with pytest.raises(RuntimeError, match="boom"):
        with prune_visual_tokens(model, "divprune", keep=0.25):
            assert model(**batch).logits.shape[1] < before.shape[1]
            raise RuntimeError("boom")
    assert torch.equal(model(**batch).logits, before)
    assert not hasattr(model, "_vlprune_token_pruning")


@torch.no_grad()
def test_text_only_input_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    model = _llava()
    batch = example_inputs("llava")
    text = {"input_ids": batch["input_ids"][:, 16:], "attention_mask": batch["attention_mask"][:, 16:]}
    before = model(**text).logits
    with caplog.at_level(logging.DEBUG, logger="vlprune.adapters.hf.token_pruning"):
        with prune_visual_tokens(model, "divprune", keep=0.25) as pruner:
            got = model(**text).logits
            gen = model.generate(**text, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, before)
    assert pruner.last_kept is None
    assert torch.equal(gen, model.generate(**text, max_new_tokens=3, do_sample=False, pad_token_id=PAD))
    assert "no image tokens" in caplog.text


def test_model_without_visual_tokens_is_refused_naming_the_class() -> None:
    model = tiny_model("clip")
    with pytest.raises(ModelStructureError, match="CLIPModel"):
        prune_visual_tokens(model, "divprune")
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_fastv_bad_layer_and_attention_implementation_are_refused() -> None:
    model = _llava()  # sdpa
    with pytest.raises(VLPruneError, match='attn_implementation="eager"'):
        prune_visual_tokens(model, "fastv", keep=0.5, layer=1)
    eager = _llava(eager=True)
    with pytest.raises(VLPruneError, match="beyond the language model's 2 layers"):
        prune_visual_tokens(eager, "fastv", keep=0.5, layer=2)
    with pytest.raises(VLPruneError, match="original"):
        prune_visual_tokens(eager, "fastv", layer=1, positions="contiguous")
    for m in (model, eager):
        assert not any(x._forward_pre_hooks or x._forward_hooks for x in m.modules())
        assert not hasattr(m, "_vlprune_token_pruning")


def test_bad_options_are_refused() -> None:
    model = _llava()
    with pytest.raises(VLPruneError, match="unknown visual-token method 'divprun'"):
        prune_visual_tokens(model, "divprun")
    with pytest.raises(VLPruneError):
        prune_visual_tokens(model, "divprune", keep=1.5)
    with pytest.raises(VLPruneError, match="positions"):
        prune_visual_tokens(model, "divprune", positions="shifted")  # type: ignore[arg-type]
    with pytest.raises(VLPruneError, match="already built"):
        prune_visual_tokens(model, DivPrune(keep=0.1), keep=0.2)
    assert not any(x._forward_pre_hooks or x._forward_hooks for x in model.modules())
    with prune_visual_tokens(model, "divprune"):
        with pytest.raises(VLPruneError, match="already attached"):
            prune_visual_tokens(model, "uniform_tokens")


@torch.no_grad()
def test_unequal_image_counts_and_labels_are_refused_and_leave_the_model_working() -> None:
    model = _llava()
    batch = example_inputs("llava")
    token = model.config.image_token_id
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 16] = token  # row 0: 17 image tokens, row 1: 15 (32 in all: LLaVA itself accepts it)
    bad["input_ids"][1, 0] = 5
    with prune_visual_tokens(model, "divprune", keep=0.25) as pruner:
        ok = model(**batch).logits
        kept = pruner.last_kept
        with pytest.raises(DataError, match=r"different numbers of image tokens \(\[17, 15\]\)"):
            model(**bad)
        with pytest.raises(VLPruneError, match="labels"):
            model(**batch, labels=batch["input_ids"])
        assert torch.equal(pruner.last_kept, kept)
        assert torch.equal(model(**batch).logits, ok)
    model(**bad)  # the unpruned model runs it


def test_registry_builds_the_methods_for_hf_tokens() -> None:
    import vlprune

    m = vlprune.get_criterion("divprune", adapter="hf_tokens", keep=0.1)
    assert isinstance(m, DivPrune) and m.keep == 0.1
    assert isinstance(vlprune.get_criterion("fastv", adapter="hf_tokens"), FastV)
    assert isinstance(vlprune.get_criterion("random_tokens", adapter="hf_tokens", keep=3), RandomTokens)
    assert isinstance(vlprune.get_criterion("uniform_tokens", adapter="hf_tokens", keep=3), UniformTokens)
    model = _llava()
    batch = example_inputs("llava")
    with torch.no_grad(), prune_visual_tokens(model, m) as pruner:
        model(**batch)
    assert pruner.last_kept.shape == (2, 12 + 2)


# -- FastV ------------------------------------------------------------------------------------


def _eager_mask(mask2d: torch.Tensor, keep_q: torch.Tensor, keep_k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K) additive causal + padding mask over the given positions."""
    allowed = (keep_k[:, None, :] <= keep_q[:, :, None]) & mask2d.gather(1, keep_k).bool()[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_fastv_forward_equals_layers_run_by_hand(side: str) -> None:
    model = _llava(eager=True)
    batch = _padded(model, side)
    lm, token, k = model.model.language_model, model.config.image_token_id, 1
    emb = _embeds(model, batch)
    b, length = batch["input_ids"].shape
    am = batch["attention_mask"]
    full = torch.arange(length).unsqueeze(0).expand(b, -1)
    hidden = emb
    cos_sin = lm.rotary_emb(hidden, position_ids=full)
    mask = _eager_mask(am, full, full, emb.dtype)
    for layer in lm.layers[:k - 1]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin)
    # layer K-1 by hand, keeping its attention probabilities
    attn_probs = []
    handle = lm.layers[k - 1].self_attn.register_forward_hook(lambda mod, a, out: attn_probs.append(out[1]))
    hidden = lm.layers[k - 1](hidden, attention_mask=mask, position_embeddings=cos_sin)
    handle.remove()
    last = torch.tensor([int(r.nonzero().max()) for r in am])  # last unpadded token
    scores = fastv_scores(attn_probs[0][torch.arange(b), :, last, :])
    image = batch["input_ids"] == token
    keep_idx = []
    for i in range(b):
        img = image[i].nonzero().flatten()
        top = img[scores[i, img].sort(descending=True, stable=True).indices[:8]]
        keep_idx.append(sorted(set((~image[i]).nonzero().flatten().tolist()) | set(top.tolist())))
    keep_idx = torch.tensor(keep_idx)
    rows = torch.arange(b).unsqueeze(1)
    hidden = hidden[rows, keep_idx]
    cos_sin = lm.rotary_emb(hidden, position_ids=keep_idx)
    mask = _eager_mask(am, keep_idx, keep_idx, emb.dtype)
    for layer in lm.layers[k:]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin)
    expected = model.lm_head(lm.norm(hidden))

    with prune_visual_tokens(model, "fastv", keep=0.5, layer=k) as pruner:
        got = model(**batch).logits
    assert torch.equal(pruner.last_kept, keep_idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_fastv_generate_first_token_and_decode_step(side: str) -> None:
    """FastV's cached decoding: layers >= K attend to the kept image tokens only (checked by hand)."""
    model = _llava(eager=True)
    batch = _padded(model, side)
    with prune_visual_tokens(model, "fastv", keep=0.5, layer=1) as pruner:
        out = model(**batch, use_cache=True)
        kept = pruner.last_kept
        cache = out.cache
        assert [cache.layers[i].keys.shape[2] for i in range(2)] == [batch["input_ids"].shape[1], kept.shape[1]]
        gen = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    last = torch.tensor([int(r.nonzero().max()) for r in batch["attention_mask"]])
    row_of_last = [int((kept[i] == last[i]).nonzero()) for i in range(3)]
    first = out.logits[torch.arange(3), row_of_last].argmax(-1)
    if side == "left":
        assert torch.equal(gen[:, batch["input_ids"].shape[1]], first)
    # decode step == an uncached run of the extended prompt with the same kept image tokens
    nxt = gen[:, batch["input_ids"].shape[1]]
    n = batch["input_ids"].shape[1]
    ext = {
        "input_ids": torch.cat([batch["input_ids"], nxt[:, None]], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1),
        "pixel_values": batch["pixel_values"],
    }
    image = batch["input_ids"] == model.config.image_token_id
    fixed = torch.stack([row[image[i, row]] for i, row in enumerate(kept)])  # kept image positions

    class FixedFastV(FastV):
        def select_from_attention(self, attention, image_mask):
            return fixed

    with prune_visual_tokens(model, "fastv", keep=0.5, layer=1):
        out = model(**batch, use_cache=True)
        step = model(input_ids=nxt[:, None], attention_mask=ext["attention_mask"], cache=out.cache,
                     position_ids=torch.full((3, 1), n)).logits[:, -1]
    with prune_visual_tokens(model, FixedFastV(keep=0.5, layer=1)):
        expected = model(**ext, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


# -- cost ---------------------------------------------------------------------------------------


def test_prefill_flops_formula_and_fastv_segments() -> None:
    model = _llava()
    t, d, m = 2, 32, 64
    f = lambda n: 4 * n * d * d + 2 * n * n * d + 2 * n * d * m  # noqa: E731
    assert prefill_flops(model, 28) == t * f(28)
    assert prefill_flops(model.config, 28, reduced_tokens=14) == t * f(14)
    assert prefill_flops(model.config.text_config, 28, reduced_tokens=14, from_layer=1) == f(28) + f(14)
    with pytest.raises(VLPruneError, match="from_layer=3"):
        prefill_flops(model, 28, reduced_tokens=14, from_layer=3)
    with pytest.raises(ModelStructureError):
        prefill_flops(object(), 28)


def test_measure_token_pruning_reports_side_by_side() -> None:
    model = _llava()
    batch = example_inputs("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = measure_token_pruning(model, batch, "divprune", keep=0.25, max_new_tokens=2, repeats=1, warmup=0)
    assert stats["n_tokens"] == 28 and stats["kept_tokens"] == 16
    assert stats["flops_ratio"] == pytest.approx(prefill_flops(model, 16) / prefill_flops(model, 28))
    assert all(stats[k] > 0 for k in ("prefill_s_full", "prefill_s_pruned", "generate_s_full", "generate_s_pruned"))
    assert stats["prefill_ratio"] == pytest.approx(stats["prefill_s_pruned"] / stats["prefill_s_full"])
    assert stats["generate_ratio"] == pytest.approx(stats["generate_s_pruned"] / stats["generate_s_full"])
    assert not hasattr(model, "_vlprune_token_pruning") and not _our_hooks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_measure_token_pruning_fastv_counts_its_two_segments() -> None:
    model = _llava(eager=True)
    batch = example_inputs("llava")
    stats = measure_token_pruning(model, batch, "fastv", keep=0.5, layer=1, max_new_tokens=1, repeats=1, warmup=0)
    assert stats["kept_tokens"] == 12 + 8
    assert stats["flops_pruned"] == prefill_flops(model, 28, reduced_tokens=20, from_layer=1)


def test_measure_token_pruning_refuses_bad_options_and_leaves_no_hooks() -> None:
    model = _llava()
    batch = example_inputs("llava")
    with pytest.raises(VLPruneError, match="repeats"):
        measure_token_pruning(model, batch, repeats=0)
    with pytest.raises(VLPruneError, match='attn_implementation="eager"'):
        measure_token_pruning(model, batch, "fastv", keep=0.5, layer=1)
    assert not _our_hooks(model)


def test_cost_functions_live_in_token_cost_and_are_re_exported() -> None:
    from vlprune.adapters.hf import token_cost, token_pruning

    assert token_pruning.prefill_flops is token_cost.prefill_flops
    assert token_pruning.measure_token_pruning is token_cost.measure_token_pruning


# -- other LLaVA-style families -------------------------------------------------------------------


def _tiny_llava_next():
    import transformers as T

    cfg = T.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
        image_token_index=99, image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = T.LlavaNextForConditionalGeneration(cfg).eval()
    pix, sizes = torch.randn(2, 2, 3, 32, 32), torch.tensor([[32, 32]] * 2)  # base image + one tile
    n_img = model.model.get_image_features(pixel_values=pix, image_sizes=sizes).pooler_output[0].shape[0]
    ids = torch.cat([torch.full((2, n_img), 99), torch.randint(3, 90, (2, 6))], 1)
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix, image_sizes=sizes), n_img


def _tiny_qwen2_vl():
    import transformers as T

    cfg = T.Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=99, video_token_id=98, vision_start_token_id=97, vision_end_token_id=96,
    )
    model = T.Qwen2VLForConditionalGeneration(cfg).eval()
    n_img = 16  # an 8 x 8 patch grid merged 2 x 2
    ids = torch.cat([torch.full((2, 1), 97), torch.full((2, n_img), 99), torch.full((2, 1), 96),
                     torch.randint(3, 90, (2, 6))], 1)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2 * 64, 24),
                 image_grid_thw=torch.tensor([[1, 8, 8]] * 2), mm_token_type_ids=(ids == 99).long())
    return model, batch, n_img


@torch.no_grad()
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_llava_next_and_qwen2_vl(family: str) -> None:
    model, batch, n_img = _tiny_llava_next() if family == "llava_next" else _tiny_qwen2_vl()
    before = model(**batch).logits
    args = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with prune_visual_tokens(model, "divprune", keep=0.25) as pruner:
        logits = model(**batch).logits
        assert pruner.last_kept.shape == (2, logits.shape[1])
        cached = model.generate(**batch, **args)
        uncached = model.generate(**batch, use_cache=False, **args)
    assert logits.shape[1] == batch["input_ids"].shape[1] - (n_img - round(0.25 * n_img))
    assert torch.equal(cached, uncached)
    assert torch.equal(model(**batch).logits, before)
    if family == "qwen2_vl":  # multimodal RoPE: positions are kept as they are
        with prune_visual_tokens(model, "divprune", keep=0.25, positions="contiguous"):
            with pytest.raises(VLPruneError, match="multimodal"):
                model(**batch)
