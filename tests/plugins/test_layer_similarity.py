"""Layer scores (similarity, block influence, angular distance), domain ranking and layer selection."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlprune
from vlprune import DataError, ModelStructureError, VLPruneError
from vlprune.plugins import layer_similarity as ls
from vlprune.plugins.capture import call_model
from vlprune.testbed.tiny import example_inputs, tiny_model

logger = logging.getLogger(__name__)


# -- fixtures ------------------------------------------------------------------------------------


def _llama(n_layers: int = 4) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a final norm that changes directions: cosine is not scale-invariant through it
        model.model.norm.weight.uniform_(0.1, 3.0)
    return model


def _qwen2(n_layers: int = 3) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _batch(
    lengths: list[int], width: int | None = None, left: bool = False, seed: int = 0, first: int = 0
) -> dict[str, torch.Tensor]:
    """Random ids of samples ``first, first + 1, ...`` (the same for a seed, whatever the batching and
    padding), padded to ``width``."""
    width = width or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(seed * 100 + first + i))
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl], mask[i, sl] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


LENGTHS = [5, 9, 3, 7, 9, 4]


def _hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def _last_layer_io(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last decoder layer's input and output, by a hook of the test's own."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, args, kwargs, output):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).clone()
        seen["y"] = (output[0] if isinstance(output, tuple) else output).clone()

    h = model.model.layers[-1].register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h.remove()
    return seen["x"], seen["y"]


def _masked_mean_cos(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(F.cosine_similarity(a[m].double(), b[m].double(), dim=-1).mean())


# -- scores against independent computations ----------------------------------------------------


def test_similarity_matches_hidden_states_loop_and_last_layer_is_read_before_the_final_norm() -> None:
    model = _llama()
    batch = _batch(LENGTHS)
    scores = ls.layer_similarity(model, [batch], progress=False)
    assert scores.dtype == torch.float64 and scores.shape == (4,)
    hs = _hidden_states(model, batch)
    for layer in range(3):  # hidden_states[l] is layer l's input for l < L
        assert scores[layer].item() == pytest.approx(_masked_mean_cos(hs[layer], hs[layer + 1], batch["attention_mask"]), abs=1e-5)
    # the last entry of output_hidden_states is after the final norm: a different (distorted) number
    distorted = _masked_mean_cos(hs[3], hs[4], batch["attention_mask"])
    x, y = _last_layer_io(model, batch)
    direct = _masked_mean_cos(x, y, batch["attention_mask"])
    assert scores[3].item() == pytest.approx(direct, abs=1e-5)
    assert abs(scores[3].item() - distorted) > 1e-3


def test_padding_is_excluded() -> None:
    model = _llama()
    tight = ls.layer_similarity(model, [_batch(LENGTHS)], progress=False)
    padded = ls.layer_similarity(model, [_batch(LENGTHS, width=16)], progress=False)
    torch.testing.assert_close(tight, padded, atol=1e-5, rtol=0)
    unmasked = ls.layer_similarity(model, [{"input_ids": _batch(LENGTHS, width=16)["input_ids"]}], progress=False)
    assert (unmasked - tight).abs().max() > 1e-3  # padding would have changed it


@pytest.mark.parametrize("left", [False, True])
def test_last_picks_the_last_non_padding_token(left: bool) -> None:
    model = _llama()
    batch = _batch(LENGTHS, width=12, left=left)
    scores = ls.layer_similarity(model, [batch], tokens="last", progress=False)
    hs = _hidden_states(model, batch)
    pos = torch.tensor([11 if left else n - 1 for n in LENGTHS])
    rows = torch.arange(len(LENGTHS))
    for layer in range(3):
        expected = F.cosine_similarity(hs[layer][rows, pos].double(), hs[layer + 1][rows, pos].double(), dim=-1).mean()
        assert scores[layer].item() == pytest.approx(float(expected), abs=1e-5)
    x, y = _last_layer_io(model, batch)
    expected = F.cosine_similarity(x[rows, pos].double(), y[rows, pos].double(), dim=-1).mean()
    assert scores[3].item() == pytest.approx(float(expected), abs=1e-5)


def test_sample_weighting_averages_each_sample_first() -> None:
    model = _llama()
    batch = _batch(LENGTHS)
    per_sample = ls.layer_similarity(model, [batch], weighting="sample", progress=False)
    hs = _hidden_states(model, batch)
    cos = F.cosine_similarity(hs[0].double(), hs[1].double(), dim=-1)
    expected = torch.stack([cos[i, :n].mean() for i, n in enumerate(LENGTHS)]).mean()
    assert per_sample[0].item() == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_give_scores_close_to_float32(dtype: torch.dtype) -> None:
    model = _llama()
    batch = _batch(LENGTHS)
    ref = ls.layer_similarity(model, [batch], progress=False)
    half = ls.layer_similarity(model.to(dtype), [batch], progress=False)
    assert half.dtype == torch.float64
    torch.testing.assert_close(half, ref, atol=0.02, rtol=0)


def test_streaming_result_does_not_depend_on_the_batch_split() -> None:
    model = _llama()
    lengths = [5, 9, 3, 7, 9, 4, 6, 2]
    whole = ls.layer_similarity(model, [_batch(lengths)], progress=False)
    split = ls.layer_similarity(model, [_batch(lengths[:3]), _batch(lengths[3:], width=12, first=3)], progress=False)
    torch.testing.assert_close(whole, split, atol=1e-5, rtol=0)
    last_whole = ls.layer_similarity(model, [_batch(lengths)], tokens="last", progress=False)
    one_by_one = (_batch([n], first=i) for i, n in enumerate(lengths))  # a generator: consumed once
    last_split = ls.layer_similarity(model, one_by_one, tokens="last", progress=False)
    torch.testing.assert_close(last_whole, last_split, atol=1e-5, rtol=0)


def test_one_forward_per_batch_for_all_layers() -> None:
    model = _llama()
    calls = []
    h = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        ls.layer_similarity(model, [_batch(LENGTHS), _batch(LENGTHS[:2])], progress=False)
        ls.angular_distance_matrix(model, [_batch(LENGTHS)], progress=False)
    finally:
        h.remove()
    assert len(calls) == 3


def test_forwards_stop_after_the_last_decoder_layer_with_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second batch on, the final norm and the head do not run (what follows the last
    decoder layer's output hook is not needed); the scores equal those of whole forwards."""
    from vlprune.plugins import capture

    model = _llama()
    batches = [_batch(LENGTHS), _batch(LENGTHS[:2]), _batch(LENGTHS)]
    heads: list[int] = []
    h = model.lm_head.register_forward_pre_hook(lambda *_: heads.append(1))
    try:
        cut = ls.layer_similarity(model, batches, progress=False)
        cut_angular = ls.angular_distance_matrix(model, batches, progress=False)
        assert len(heads) == 2  # the first batch of each call
        monkeypatch.setattr(ls, "ForwardCut", lambda m: capture.ForwardCut(m, enabled=False))
        whole = ls.layer_similarity(model, batches, progress=False)
        whole_angular = ls.angular_distance_matrix(model, batches, progress=False)
        assert len(heads) == 2 + 6
    finally:
        h.remove()
    assert torch.equal(cut, whole) and torch.equal(cut_angular, whole_angular)


def test_block_influence_is_one_minus_similarity() -> None:
    model = _llama()
    batches = [_batch(LENGTHS)]
    torch.testing.assert_close(
        ls.block_influence(model, batches, progress=False), 1 - ls.layer_similarity(model, batches, progress=False)
    )


def test_angular_distance_against_a_hand_computation() -> None:
    model = _llama()
    batch = _batch(LENGTHS, width=12)
    hs = _hidden_states(model, batch)
    x_last, y_last = _last_layer_io(model, batch)
    states = [*hs[:4], y_last]  # inputs of layers 0..3, then the last layer's output (not the normed one)
    assert torch.equal(states[3], x_last)
    rows, pos = torch.arange(len(LENGTHS)), torch.tensor(LENGTHS) - 1

    def d(l: int, n: int) -> float:
        c = F.cosine_similarity(states[l][rows, pos].double(), states[l + n][rows, pos].double(), dim=-1)
        return float((torch.arccos(c.clamp(-1, 1)) / math.pi).mean())

    for n in (1, 2, 4):
        got = ls.angular_distance(model, [batch], n=n, progress=False)
        assert got.shape == (4 - n + 1,)
        assert got.tolist() == pytest.approx([d(l, n) for l in range(4 - n + 1)], abs=1e-5)
    matrix = ls.angular_distance_matrix(model, [batch], progress=False)
    torch.testing.assert_close(matrix, matrix.T)
    assert matrix.diagonal().abs().max() < 1e-3
    with pytest.raises(VLPruneError, match="1..4"):
        ls.angular_distance(model, [batch], n=5, progress=False)


def test_qwen2_and_the_registry_adapter() -> None:
    model = _qwen2()
    assert ls.decoder_layers(model) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    batches = [_batch(LENGTHS)]
    scores = vlprune.get_criterion("layer_similarity", adapter="hf_layers", model=model, batches=batches, progress=False)
    torch.testing.assert_close(scores, ls.layer_similarity(model, batches, progress=False))
    bi = vlprune.get_criterion("block_influence", adapter="hf_layers", model=model, batches=batches, progress=False)
    torch.testing.assert_close(bi, 1 - scores)
    ad = vlprune.get_criterion("angular_distance", adapter="hf_layers", model=model, batches=batches, n=2, progress=False)
    assert ad.shape == (2,)


def test_criteria_are_registered_as_layer_criteria() -> None:
    specs = {s.name: s for s in vlprune.criteria()}
    for name in ("layer_similarity", "block_influence", "angular_distance"):
        assert specs[name].level == "layer" and specs[name].needs == "calibration"
        assert set(specs[name].adapters) == ({"hf_layers", "nni"} if name == "layer_similarity" else {"hf_layers"})


def test_vlprune_list_shows_them(capsys) -> None:
    from vlprune.recipes.cli import main

    assert main(["list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    for name in ("layer_similarity", "block_influence", "angular_distance"):
        assert rows[name][1:3] == ["layer", "calibration"] and rows[name][5] == "yes"


class _Block(nn.Module):
    """An older-style layer: called with hidden_states=, returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return (hidden_states + self.fc(hidden_states), None)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(hidden_states=h, attention_mask=attention_mask)[0]
        return h


def test_plain_stack_fallback_kwarg_inputs_and_tuple_outputs() -> None:
    model = _Toy()
    ids = torch.randint(0, 10, (3, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    scores = ls.layer_similarity(model, [batch], progress=False)
    h = model.embed(ids)
    expected = []
    with torch.no_grad():
        for layer in model.layers:
            out = layer(h)[0]
            expected.append(float(F.cosine_similarity(h, out, dim=-1).double().mean()))
            h = out
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert ls.layer_similarity(model, [batch], layers=[2, "layers.0"], progress=False).tolist() == pytest.approx(
        [expected[2], expected[0]], abs=1e-6
    )


def test_tiny_llava_mask_covers_the_image_tokens() -> None:
    model = tiny_model("llava")
    batch = example_inputs("llava", batch_size=3)
    batch["attention_mask"][1, -4:] = 0
    scores = ls.layer_similarity(model, [batch], progress=False)
    assert scores.shape == (2,) and bool(((scores > -1) & (scores <= 1)).all())
    short = dict(batch, attention_mask=batch["attention_mask"][:, 2:])
    with pytest.raises(DataError, match="attention_mask has shape"):
        ls.layer_similarity(model, [short], progress=False)


# -- bad input -----------------------------------------------------------------------------------


def test_nan_hidden_states_name_the_layer_and_leave_the_model_as_it_was() -> None:
    model = _llama()
    model.train()
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"decoder layer 2 \(model.layers.2\) has NaN or Inf hidden states in its output"):
        ls.layer_similarity(model, [_batch(LENGTHS)], progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_model_without_decoder_layers_is_a_clear_error() -> None:
    model = tiny_model("clip")
    with pytest.raises(ModelStructureError, match="found no decoder layers in CLIPModel.*pass layers="):
        ls.layer_similarity(model, [example_inputs("clip", 2)], progress=False)
    with pytest.raises(ModelStructureError, match="found no decoder layers in Sequential"):
        ls.decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_bad_layers_tokens_and_batches() -> None:
    model = _llama()
    batches = [_batch(LENGTHS)]
    with pytest.raises(ModelStructureError, match="index 4 is out of range.*0..3"):
        ls.layer_similarity(model, batches, layers=[4], progress=False)
    with pytest.raises(ModelStructureError, match="twice"):
        ls.layer_similarity(model, batches, layers=[1, "model.layers.1"], progress=False)
    with pytest.raises(ModelStructureError, match="not a module of LlamaForCausalLM"):
        ls.layer_similarity(model, batches, layers=["model.layer.1"], progress=False)
    with pytest.raises(VLPruneError, match="tokens must be"):
        ls.layer_similarity(model, batches, tokens="first", progress=False)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="empty"):
        ls.layer_similarity(model, [], progress=False)
    with pytest.raises(DataError, match="domain 'general' has no calibration batches"):
        ls.domain_similarity(model, {"math": batches, "general": []}, progress=False)


# -- domains and ranking -------------------------------------------------------------------------


def test_domain_similarity_and_rank_layers() -> None:
    model = _llama()
    data = {"math": [_batch(LENGTHS, seed=1)], "general": [_batch(LENGTHS[:3], seed=2)]}
    scores = ls.domain_similarity(model, data, progress=False)
    torch.testing.assert_close(scores["math"], ls.layer_similarity(model, data["math"], progress=False))
    mixed = 0.7 * scores["math"] + 0.3 * scores["general"]
    assert ls.rank_layers(model, data, domain="mixed", alpha=0.7, progress=False) == torch.argsort(
        mixed, descending=True, stable=True
    ).tolist()
    assert ls.rank_layers(scores, domain="general") == torch.argsort(scores["general"], descending=True, stable=True).tolist()


def test_combine_domains_hand_cases_and_errors() -> None:
    s = {"math": torch.tensor([0.9, 0.1, 0.5]), "general": torch.tensor([0.1, 0.9, 0.5]), "ocr": torch.tensor([0.3, 0.3, 0.9])}
    assert ls.combine_domains(s, "mixed", alpha=0.5).tolist() == pytest.approx([0.55, 0.35, 0.6])
    assert ls.rank_layers(s, domain="math") == [0, 2, 1]
    assert ls.rank_layers(s, domain="mixed", alpha=1.0) == [0, 2, 1]
    assert ls.rank_layers({"maths": s["math"], "general": s["general"]}, domain="mixed", math_key="maths", alpha=0.0) == [1, 2, 0]
    with pytest.raises(DataError, match="unknown domain 'code'"):
        ls.combine_domains(s, "code")
    with pytest.raises(DataError, match="needs the math domain 'math'"):
        ls.combine_domains({"general": s["general"], "ocr": s["ocr"]}, "mixed")
    with pytest.raises(DataError, match="besides 'math'"):
        ls.combine_domains({"math": s["math"]}, "mixed")
    with pytest.raises(VLPruneError, match="alpha"):
        ls.combine_domains(s, "mixed", alpha=1.5)
    with pytest.raises(DataError, match="different lengths"):
        ls.combine_domains({"math": s["math"], "general": torch.ones(2)}, "mixed")
    with pytest.raises(DataError, match="needs domain_batches"):
        ls.rank_layers(_llama(), None)


# -- selection -----------------------------------------------------------------------------------

S = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.2, 0.3])  # layer 0 and 5 protected by default


def test_select_rank_and_protection() -> None:
    assert ls.select_layers(S, 2) == [1, 2]
    assert ls.select_layers(S, 4) == [1, 2, 3, 4]
    assert ls.select_layers(S, 2, protect_first=2) == [2, 3]
    assert ls.select_layers(S, 1, protect_first=0, protect_last=0, higher_is_removable=False) == [0]
    assert ls.select_layers(torch.tensor([1.0, 0.5, 0.5, 0.5, 1.0]), 2) == [1, 2]  # ties: lower index


def test_select_spacing() -> None:
    assert ls.select_layers(S, 2, "spacing") == [1, 3]
    assert ls.select_layers(S, 2, "spacing", evenness=0.0) == [1, 3]
    flat = torch.full((13,), 0.5)  # equal scores: evenly spaced in layers 1..11 (two kept between, and at the ends)
    assert ls.select_layers(flat, 3, "spacing") == [3, 6, 9]
    assert ls.select_layers(flat, 6, "spacing") == [1, 3, 5, 7, 9, 11]
    # scores win over evenness when they differ enough; evenness breaks near-ties
    near_tie = torch.tensor([0.0, 1.0, 0.0, 0.99, 0.0, 0.0, 0.0, 0.98, 0.0])
    assert ls.select_layers(near_tie, 2, "spacing") == [3, 7]  # gaps 2, 3, 0 instead of 0, 1, 4
    assert ls.select_layers(near_tie, 2, "spacing", evenness=0.0) == [1, 3]
    clear = torch.tensor([0.0, 1.0, 0.0, 0.99, 0.0, 0.0, 0.0, 0.2, 0.0])
    assert ls.select_layers(clear, 2, "spacing") == [1, 3]
    # exhaustive check of the DP without the evenness term
    g = torch.Generator().manual_seed(0)
    import itertools

    for _ in range(20):
        r = torch.rand(9, generator=g, dtype=torch.float64)
        for k in (1, 2, 3, 4):
            best = max(
                (c for c in itertools.combinations(range(1, 8), k) if all(b - a > 1 for a, b in zip(c, c[1:]))),
                key=lambda c: float(r[list(c)].sum()),
            )
            assert ls.select_layers(r, k, "spacing", evenness=0.0) == list(best)
    # past (m + 1) // 2 adjacency is unavoidable: runs as short as possible, against brute force
    assert ls.select_layers(torch.zeros(8), 4, "spacing") == [1, 2, 4, 5]  # runs of 2 at most; ties: lower index
    for _ in range(10):
        r = torch.rand(9, generator=g, dtype=torch.float64)
        for k in (5, 6):
            def longest(c):
                run = top = 1
                for a, b in zip(c, c[1:]):
                    run = run + 1 if b == a + 1 else 1
                    top = max(top, run)
                return top
            shortest = min(longest(c) for c in itertools.combinations(range(1, 8), k))
            best = max((c for c in itertools.combinations(range(1, 8), k) if longest(c) == shortest),
                       key=lambda c: float(r[list(c)].sum()))
            assert ls.select_layers(r, k, "spacing", evenness=0.0) == list(best)


def test_select_consecutive_and_run() -> None:
    assert ls.select_layers(S, 2, "consecutive") == [1, 2]
    assert ls.select_layers(S, 3, "consecutive", higher_is_removable=False) == [2, 3, 4]
    # angular distance of runs of 2 over 6 layers: starts 0..4; start 0 and start 4 touch protected layers
    assert ls.select_run(torch.tensor([0.0, 0.5, 0.2, 0.3, 0.0]), k=2) == [2, 3]
    assert ls.select_run(torch.tensor([0.0, 0.5, 0.2, 0.3, 0.0]), k=2, protect_first=0, protect_last=0) == [0, 1]
    with pytest.raises(VLPruneError, match="at most 2"):
        ls.select_run(torch.tensor([0.1, 0.2]), k=3)


def test_select_regime() -> None:
    flat = torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.0])  # 7 removable layers
    # default switch: floor(7 / 3) = 2 -> rank for k <= 2, spacing above (runs as short as possible past 4)
    assert ls.select_layers(flat, 1, "regime") == [1]
    assert ls.select_layers(flat, 2, "regime") == ls.select_layers(flat, 2, "rank") == [1, 2]
    assert ls.select_layers(flat, 3, "regime") == ls.select_layers(flat, 3, "spacing") != ls.select_layers(flat, 3, "rank")
    assert ls.select_layers(flat, 2, "regime", regime_switch=2) == [1, 2]
    assert ls.select_layers(flat, 3, "regime", regime_switch=0.5) == [1, 2, 3]
    assert ls.select_layers(flat, 5, "regime") == ls.select_layers(flat, 5, "spacing") != ls.select_layers(flat, 5, "rank")
    assert ls.DEFAULT_REGIME_SWITCH == pytest.approx(1 / 3)
    # the sweep's 6 removable layers: rank at k = 1, 2, spacing from 3
    six = torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    assert ls.select_layers(six, 2, "regime") == [1, 2] and ls.select_layers(six, 3, "regime") == ls.select_layers(six, 3, "spacing")


def test_regime_warns_when_it_switches_to_spacing(caplog: pytest.LogCaptureFixture) -> None:
    """Spacing collapsed on real SmolLM2 without a heal: the switch says so and names the fixes."""
    six = torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0])
    with caplog.at_level(logging.WARNING, logger="vlprune.plugins.layer_selection"):
        ls.select_layers(six, 2, "regime")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="vlprune.plugins.layer_selection"):
        ls.select_layers(six, 3, "regime")
    assert any("chose 'spacing'" in r.message and "strategy='rank'" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, VLPruneError, "k .* must be an integer >= 1"),
        ({"k": 5}, VLPruneError, "cannot remove 5 of 6 layers .* at most 4 are removable"),
        ({"k": 2, "protect_first": 3, "protect_last": 2}, VLPruneError, "at most 1 are removable"),
        ({"k": 1, "strategy": "best"}, VLPruneError, "unknown strategy 'best'"),
        ({"k": 1, "protect_first": -1}, VLPruneError, "protect_first"),
        ({"k": 1, "strategy": "regime", "regime_switch": -1}, VLPruneError, "regime_switch"),
        ({"k": 1, "scores": [0.1, float("nan"), 0.2]}, DataError, r"NaN or Inf at layer\(s\) \[1\]"),
        ({"k": 1, "scores": torch.ones(2, 2)}, DataError, "1-D"),
    ],
)
def test_select_layers_bad_input(kwargs: dict, error: type, match: str) -> None:
    scores = kwargs.pop("scores", S)
    with pytest.raises(error, match=match):
        ls.select_layers(scores, **kwargs)


# -- the testbed LLaVA ---------------------------------------------------------------------------


def test_testbed_llava_math_vs_general() -> None:
    import vlprune.testbed as tb

    model = tb.load("llava")
    data = {d: tb.batches("llava", 16, 8, task=d, seed=0) for d in ("math", "general")}
    t0 = time.perf_counter()
    scores = ls.domain_similarity(model, data, progress=False)
    t_scores = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in (*data["math"], *data["general"]):
            call_model(model, b)
    t_forward = time.perf_counter() - t0
    logger.info("testbed llava: scores %.3fs, plain forward %.3fs (ratio %.2f); %s", t_scores, t_forward,
                t_scores / t_forward, {d: s.tolist() for d, s in scores.items()})
    for s in scores.values():
        assert s.shape == (4,) and bool(((s > -1) & (s <= 1)).all())
    assert (scores["math"] - scores["general"]).abs().max() > 1e-3
    assert sorted(ls.rank_layers(scores, domain="mixed")) == [0, 1, 2, 3]
