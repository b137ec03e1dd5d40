"""PlatonImportance, ID-PLATON and the cubic schedule inside Torch-Pruning scripts."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from vlprune import VLPruneError
from vlprune.adapters.torch_pruning import (
    IDWeightedImportance,
    PlatonImportance,
    cubic_scheduler,
    hf_pruner_kwargs,
    pruning_steps,
)
from vlprune.plugins.platon import Platon, cubic_schedule

torch.set_num_threads(1)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x)


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 2, (32,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def _group(model: nn.Module) -> object:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(2, 6))
    return dg.get_pruning_group(model.fc1, tp.prune_linear_out_channels, list(range(16)))


def test_one_step_window_without_ema_equals_taylor() -> None:
    """beta1 = 0, beta2 = 1, delta_t = 1: the PLATON score is |w * grad|, so the group score
    must equal Torch-Pruning's own GroupTaylorImportance."""
    torch.manual_seed(0)
    model = _MLP()
    _backward(model, 1)
    imp = PlatonImportance(beta1=0.0, beta2=1.0, delta_t=1)
    assert imp.update(model)
    group = _group(model)
    torch.testing.assert_close(imp(group), tp.importance.GroupTaylorImportance()(group))


def test_group_score_is_row_plus_column_sum_of_platon_scores() -> None:
    torch.manual_seed(0)
    model = _MLP()
    imp = PlatonImportance(beta1=0.85, beta2=0.95, delta_t=2, normalizer=None)
    for seed in range(6):
        _backward(model, seed)
        imp.update(model)
    s1, s2 = imp.platon.score("fc1.weight"), imp.platon.score("fc2.weight")
    expected = (s1.sum(1) + s2.sum(0)) / 2  # tp's "mean" group reduction over the two layers
    torch.testing.assert_close(imp(_group(model)), expected)


def test_missing_window_raises_then_skip_mode() -> None:
    model = _MLP()
    imp = PlatonImportance(delta_t=5)
    _backward(model, 0)
    imp.update(model)
    with pytest.raises(VLPruneError, match="no PLATON score"):
        imp(_group(model))
    assert PlatonImportance(delta_t=5, missing="skip")(_group(model)) is None


def test_step_carries_state_to_the_smaller_model() -> None:
    torch.manual_seed(0)
    model = _MLP()
    imp = PlatonImportance(delta_t=1)
    for seed in range(3):
        _backward(model, seed)
        imp.update(model)
    before = imp.platon.score("fc1.weight").clone()
    order = imp(_group(model)).argsort()
    pruner = tp.pruner.BasePruner(model, torch.randn(2, 6), importance=imp, pruning_ratio=0.25, ignored_layers=[model.head, model.fc2])
    assert imp.step(pruner) == 1
    assert model.fc1.out_features == 12
    kept = sorted(order[4:].tolist())  # the 4 lowest-scored neurons went
    torch.testing.assert_close(imp.platon.score("fc1.weight"), before[kept])
    assert imp.platon.score("fc2.weight").shape == model.fc2.weight.shape
    _backward(model, 9)
    imp.update(model)  # no shape warning, state keeps going
    assert imp.platon.score("fc1.weight").shape == (12, 6)


def test_id_platon_weights_by_layer_id() -> None:
    torch.manual_seed(0)
    model = _MLP()
    platon = PlatonImportance(delta_t=1, normalizer=None)
    _backward(model, 0)
    platon.update(model)
    group = _group(model)
    idp = IDWeightedImportance(platon, {"fc1": 30.0, "fc2": 10.0})
    torch.testing.assert_close(idp(group), platon(group) * 20.0)


def test_cubic_scheduler_matches_platon_schedule_at_pruning_steps() -> None:
    ratios = cubic_scheduler(0.8, 4)
    assert ratios[0] == 0.0 and ratios[-1] == pytest.approx(0.8)
    assert ratios == pytest.approx([0.8 * (1 - (1 - k / 4) ** 3) for k in range(5)])
    steps = pruning_steps(210, 4, warmup_steps=10, initial_warmup=1, final_warmup=2)
    assert steps == [55, 100, 145, 190]  # 10 dense steps, then every 180 / 4, the last 20 steps at the final ratio
    for k, t in enumerate(steps, start=1):
        remaining, _ = cubic_schedule(t, 210, 1.0, 0.2, warmup_steps=10, initial_warmup=1, final_warmup=2)
        assert 1 - remaining == pytest.approx(ratios[k])
    with pytest.raises(VLPruneError):
        pruning_steps(100, 3, warmup_steps=50, initial_warmup=1, final_warmup=1)


def test_iterative_platon_on_a_transformers_llama() -> None:
    """The documented loop: update after backward, imp.step(pruner) on the cubic schedule."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlprune.adapters.hf.surgery import sync_hf_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=40, max_position_embeddings=16)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 40, (4, 12))
    imp = PlatonImportance(delta_t=2)
    pruner = tp.pruner.BasePruner(
        model, {"input_ids": ids[:1]}, importance=imp, pruning_ratio=0.5, iterative_steps=3,
        iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True,
        **hf_pruner_kwargs(model, prune_heads=False),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prune_at = pruning_steps(24, 3, warmup_steps=2, initial_warmup=1, final_warmup=1)
    for step in range(24):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        imp.update(model)
        if step in prune_at:
            imp.step(pruner)
            sync_hf_model(model, pruned="heads")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # parameters were replaced
        opt.step()
        opt.zero_grad()
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert sum(widths) == 64  # 50% of 2 x 64 neurons, split globally
    assert model(input_ids=ids).logits.shape == (4, 12, 40)


def test_readme_platon_loop_with_heads_on_tiny_llava() -> None:
    """The README's PLATON loop, as written: ID-PLATON under KeepHeads, MLP neurons + heads, cubic."""
    import vlprune
    from tests.conftest import batches_for
    from vlprune.adapters.torch_pruning import KeepHeads
    from vlprune.testbed.tiny import example_inputs, tiny_model

    model = tiny_model("llava")
    profile = vlprune.estimate_ids(model, batches_for("llava", 2, 8), n_samples=16, progress=False)
    platon = PlatonImportance(delta_t=1)
    kw = hf_pruner_kwargs(model)
    imp = KeepHeads(IDWeightedImportance(platon, profile), kw["num_heads"])
    example = example_inputs("llava", batch_size=2)
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.5,
                                  head_pruning_ratio=min(0.5, imp.max_ratio), iterative_steps=4,
                                  iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True, **kw)
    prune_at = pruning_steps(8, 4, warmup_steps=1, initial_warmup=1, final_warmup=1)
    batch = example_inputs("llava", batch_size=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = sum(p.numel() for p in model.parameters())
    for step in range(8):
        out = model(**batch)
        out.logits.float().logsumexp(-1).mean().backward()
        platon.update(model)
        if step in prune_at:
            platon.step(pruner)
            vlprune.sync_hf_model(model, pruned="heads")
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        optimizer.step()
        optimizer.zero_grad()
    assert sum(p.numel() for p in model.parameters()) < before
    assert all(a.num_heads >= 1 for a in vlprune.describe_model(model).attentions)
    model(**example)
