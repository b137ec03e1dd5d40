"""Torch-Pruning on decoder-only LMs with plain multi-head rotary attention (q/k/v heads pruned).

With PyTorch reporting a negative saved ``dim`` as ``2**64 + dim``, Torch-Pruning 1.6 took the
rotary ``rotate_half`` concat (over the head dimension) for a channel concat and never returned
from the first ``get_all_groups``; ``hf_pruner_kwargs`` now traces under ``positive_dims``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from vlprune.adapters.torch_pruning import hf_pruner_kwargs, positive_dims
from vlprune.errors import VLPruneError

_MAX_VALID_DIM = 100  # torch_pruning.dependency.constants.MAX_VALID_DIM


def _lm(family: str) -> nn.Module:
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    cfg = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=100, max_position_embeddings=64)
    return model_cls(cfg).eval()


def _example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))}


def test_positive_dims_same_results_real_saved_dims() -> None:
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    plain = [torch.cat((-x[..., 4:], x[..., :4]), dim=-1), x.split(4, dim=-1)[1], x.chunk(2, -1)[0],
             torch.narrow(x, -1, 1, 3), x.unbind(-2)[3], torch.cat([torch.tensor([]), x], -2)]
    with positive_dims():
        mapped = [torch.cat((-x[..., 4:], x[..., :4]), dim=-1), x.split(4, dim=-1)[1], x.chunk(2, -1)[0],
                  torch.narrow(x, -1, 1, 3), x.unbind(-2)[3], torch.cat([torch.tensor([]), x], -2)]
    for a, b in zip(plain, mapped):
        assert torch.equal(a, b)
        assert 0 <= b.grad_fn._saved_dim < 4  # the dimension Torch-Pruning compares with 1


def _assert_real_dims(model: nn.Module, kw: dict[str, object]) -> None:
    """Every cat / split / slice Torch-Pruning traces carries a real dimension (before the fix
    rotate_half's cat carried 2**64 - 1 and tp's group search never ended). Checked before any
    group is built, so the tests fail fast instead of hanging."""
    graph = tp.DependencyGraph().build_dependency(
        model, _example(), forward_fn=kw.get("forward_fn"), output_transform=kw["output_transform"],
        unwrapped_parameters=kw["unwrapped_parameters"],
    )
    dims = {n.grad_fn.name(): n.grad_fn._saved_dim for n in graph.module2node.values()
            if n.grad_fn is not None and n.grad_fn.name().startswith(("Cat", "Split", "Slice", "Unbind"))}
    assert any(name.startswith("Cat") for name in dims)  # rotate_half, the KV cache
    assert all(d < _MAX_VALID_DIM for d in dims.values()), dims


@pytest.mark.timeout(30)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rotary_mha_heads_traced_and_grouped(family: str) -> None:
    model = _lm(family)
    kw = hf_pruner_kwargs(model)
    assert kw["prune_num_heads"] and len(kw["num_heads"]) == 6  # q/k/v of both layers
    _assert_real_dims(model, kw)
    pruner = tp.pruner.BasePruner(model, _example(), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.3, head_pruning_ratio=0.3, global_pruning=True, **kw)
    assert pruner.initial_total_heads == 8
    q = model.model.layers[0].self_attn.q_proj
    group = pruner.DG.get_pruning_group(q, tp.prune_linear_out_channels, list(range(q.out_features)))
    hit = {pruner.DG._module2name.get(dep.target.module) for dep, _ in group}
    attn = "model.layers.0.self_attn"
    assert {f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj", f"{attn}.o_proj"} <= hit
    assert not any(n and n.startswith("model.layers.1.") for n in hit)  # the layers stay apart


def _kept_heads(new: torch.Tensor, old: torch.Tensor, head_dim: int) -> list[int]:
    blocks = [old[h * head_dim:(h + 1) * head_dim] for h in range(old.shape[0] // head_dim)]
    return [next(h for h, b in enumerate(blocks) if torch.equal(b, new[i:i + head_dim]))
            for i in range(0, new.shape[0], head_dim)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rotary_mha_head_pruning_equals_masked_heads(family: str) -> None:
    """Removing heads = zeroing their o_proj columns in the original (q, k, v lose the same heads)."""
    from vlprune.adapters.hf.surgery import sync_hf_model

    model = _lm(family)
    reference = copy.deepcopy(model)
    kw = hf_pruner_kwargs(model, prune_mlp=False)
    _assert_real_dims(model, kw)
    pruner = tp.pruner.BasePruner(model, _example(), importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, head_pruning_ratio=0.5, global_pruning=True, **kw)
    pruner.step()
    sync_hf_model(model, pruned="heads")
    head_dim = 8
    for new, old in zip(model.model.layers, reference.model.layers):
        kept = _kept_heads(new.self_attn.q_proj.weight, old.self_attn.q_proj.weight, head_dim)
        assert kept == _kept_heads(new.self_attn.k_proj.weight, old.self_attn.k_proj.weight, head_dim)
        assert kept == _kept_heads(new.self_attn.v_proj.weight, old.self_attn.v_proj.weight, head_dim)
        with torch.no_grad():
            for h in set(range(4)) - set(kept):
                old.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
    assert sum(layer.self_attn.q_proj.out_features for layer in model.model.layers) == 32  # 8 of 16 heads
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert model.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


def test_forward_fn_wraps_the_callers() -> None:
    model = _lm("llama")
    seen: list[int] = []

    def run(m: nn.Module, example: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(**example).logits
        seen.append(torch.cat([out, out], dim=-1).grad_fn._saved_dim)
        return out

    kw = hf_pruner_kwargs(model, forward_fn=run)
    assert kw["forward_fn"](model, _example()).shape == (1, 8, 100)
    assert seen == [2]
    with pytest.raises(VLPruneError, match="forward_fn must be callable"):
        hf_pruner_kwargs(model, forward_fn="model.forward")  # type: ignore[arg-type]
