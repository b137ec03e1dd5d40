"""Global unstructured masks: exact budget, global threshold, min_keep, masks that survive training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlprune import VLPruneError
from vlprune.plugins.unstructured import apply_masks, global_masks, make_permanent, sparsity_report, weight_scores

torch.set_num_threads(1)


def _scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.rand(8, 4, generator=g), "b.weight": torch.rand(6, 6, generator=g) * 0.1}


def test_exact_budget_and_global_threshold_by_brute_force() -> None:
    scores = _scores()
    masks = global_masks(scores, 0.6, min_keep=0)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.4 * total)
    kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
    dropped = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
    assert kept.min() >= dropped.max()
    everything = torch.cat([s.flatten() for s in scores.values()])
    assert kept.min() == everything.sort(descending=True).values[round(0.4 * total) - 1]


def test_min_keep_is_honoured_and_budget_stays_exact() -> None:
    scores = _scores()  # b's scores are all below a's: a global threshold alone would empty b
    assert int(global_masks(scores, 0.6, min_keep=0)["b.weight"].sum()) == 0
    masks = global_masks(scores, 0.6, min_keep=3)
    assert int(masks["b.weight"].sum()) == 3
    assert torch.equal(masks["b.weight"].flatten().nonzero().flatten().sort().values,
                       scores["b.weight"].flatten().topk(3).indices.sort().values)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.4 * total)
    assert int(global_masks(scores, 0.6, min_keep=0.25)["b.weight"].sum()) == 9  # a fraction of the tensor


def test_bad_input() -> None:
    with pytest.raises(VLPruneError, match="sparsity"):
        global_masks(_scores(), 1.0)
    with pytest.raises(VLPruneError, match="no scores"):
        global_masks({}, 0.5)
    with pytest.raises(VLPruneError, match="NaN"):
        global_masks({"a.weight": torch.tensor([1.0, float("nan")])}, 0.5)
    assert all(bool(m.all()) for m in global_masks(_scores(), 0.0).values())


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_masks_survive_training_and_become_permanent() -> None:
    net = _net()
    masks = global_masks(weight_scores(net), 0.5, min_keep=0)
    apply_masks(net, masks)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05)
    for _ in range(5):
        net(torch.randn(32, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for name, mask in masks.items():
        assert torch.all(net.get_submodule(name.split(".")[0]).weight[~mask] == 0)
    x = torch.randn(4, 6)
    before = net(x)
    assert make_permanent(net) == 2
    assert set(net.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(net(x), before)
    assert sparsity_report(net)["overall"] == pytest.approx(0.5, abs=1 / 144)


def test_second_apply_replaces_the_mask() -> None:
    net = _net()
    first = {"0.weight": torch.rand(16, 6) > 0.5}
    second = {"0.weight": ~first["0.weight"]}
    apply_masks(net, first)
    apply_masks(net, second)
    assert torch.equal(net[0].weight_mask.bool(), second["0.weight"])
    assert torch.equal(net[0].weight != 0, second["0.weight"] & (net[0].weight_orig != 0))


def test_bad_name_or_shape_leaves_the_model_untouched() -> None:
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for masks in ({"0.weight": torch.ones(16, 6, dtype=torch.bool), "9.weight": torch.ones(2, 2, dtype=torch.bool)},
                  {"0.weight": torch.ones(16, 6, dtype=torch.bool), "2.weight": torch.ones(2, 2, dtype=torch.bool)}):
        with pytest.raises(VLPruneError):
            apply_masks(net, masks)
        assert set(net.state_dict()) == set(state) and not net[0]._forward_pre_hooks


def test_scores_with_ids_and_taylor_needs_grad() -> None:
    net = _net()
    plain = weight_scores(net, kind="magnitude")
    weighted = weight_scores(net, kind="magnitude", ids={"0": 10.0, "2": 1.0})
    torch.testing.assert_close(weighted["0.weight"], plain["0.weight"] * 10)
    with pytest.raises(VLPruneError, match="backward"):
        weight_scores(net, kind="taylor")
    with pytest.raises(VLPruneError, match="intrinsic dimension"):
        weight_scores(net, ids={"0": 1.0})
    net(torch.randn(8, 6)).sum().backward()
    taylor = weight_scores(net, kind="taylor")
    torch.testing.assert_close(taylor["2.weight"], (net[2].weight * net[2].weight.grad).abs())


def test_tiny_llama_masked_saved_and_reloaded(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=50)
    model = LlamaForCausalLM(cfg).eval()
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    apply_masks(model, global_masks(weight_scores(model, names), 0.5))
    assert sparsity_report(model, names)["overall"] == pytest.approx(0.5, abs=1e-3)
    ids = torch.randint(0, 50, (2, 7))
    make_permanent(model)
    logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=ids).logits, logits)
