"""AMPPruner and LayerSimilarityPruner: NNI 3.0 pruners whose masks come out of NNI's own
sparse_ratio rule, checked against the vlprune criteria run independently."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

pytest.importorskip("nni")

import torch  # noqa: E402
from nni.compression.pruning.tools.sparse_gen import _ratio_mask  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import vlprune  # noqa: E402
import vlprune.plugins.amp as amp  # noqa: E402
import vlprune.testbed as tb  # noqa: E402
from vlprune.adapters.nni import (  # noqa: E402
    AMPPruner,
    LayerSimilarityPruner,
    amp_config_list,
    exact_sparse_ratio,
    layer_config_list,
)
from vlprune.errors import DataError, ModelStructureError, VLPruneError  # noqa: E402
from vlprune.plugins.layer_selection import select_layers  # noqa: E402
from vlprune.plugins.layer_similarity import combine_domains, domain_similarity  # noqa: E402
from vlprune.testbed.data import make_scenes, pixel_values  # noqa: E402
from vlprune.testbed.tiny import example_inputs, tiny_model  # noqa: E402

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _image_batches(n: int, b: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": example_inputs("clip", batch_size=b, seed=seed + i)["pixel_values"]} for i in range(n)]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [n for n, _ in model.named_parameters()],
        "training": model.training,
    }


def _assert_untouched(model: nn.Module, snap: dict[str, Any]) -> None:
    assert [n for n, _ in model.named_parameters()] == snap["params"]
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert model.training == snap["training"]
    for name, module in model.named_modules():
        assert not hasattr(module, "_nni_wrapper"), f"{name} is still wrapped by NNI"
        assert "forward" not in vars(module), f"{name}.forward is patched"


def _kept_rows(mask: torch.Tensor) -> torch.Tensor:
    """Output channels an NNI weight mask keeps (rows with any 1)."""
    return torch.nonzero(mask.reshape(mask.shape[0], -1).sum(dim=1) > 0).flatten()


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def clip_search() -> dict[str, Any]:
    """The testbed CLIP, AMP scores and widths computed with vlprune.plugins.amp directly."""
    clip = tb.load("clip")
    cal = [{"pixel_values": pixel_values(make_scenes("train", 32, seed=s))} for s in range(2)]
    val = [{"pixel_values": pixel_values(make_scenes("val", 48, seed=60 + s))} for s in range(2)]
    scores = amp.neuron_importance(clip, cal, tau=1 / 15, progress=False)
    widths = amp.search_widths(clip, scores, val, 5e-3, tau=1 / 15, progress=False)
    return {"model": clip, "cal": cal, "val": val, "scores": scores, "widths": widths}


@pytest.fixture(scope="module")
def llava_deep() -> dict[str, Any]:
    model = tb.load("llava-deep")
    data = {d: tb.batches("llava-deep", 16, 8, task=d) for d in ("math", "general")}
    scores = domain_similarity(model, data, progress=False)  # independent of the pruner
    probe = tb.batches("llava-deep", 4, 4, task="mixed", split="test")[0]
    return {"model": model, "data": data, "scores": scores, "probe": probe}


# ----------------------------------------------------------------------------------------------
# NNI's rounding
# ----------------------------------------------------------------------------------------------
def test_exact_sparse_ratio_lands_on_the_count_under_nni_rounding() -> None:
    # the naive ratio is off by one under NNI's int(n * r): the reason for the fence
    assert int(5 * (1 - 4 / 5)) == 0
    for size in range(1, 400):
        for pruned in range(size + 1):
            r = exact_sparse_ratio(size, pruned)
            assert int(size * r) == pruned, (size, pruned, r)
            assert 0.0 <= r <= 1.0 and abs(r - pruned / size) < 1e-12
    # and NNI's own ratio rule masks exactly that many channels
    g = torch.Generator().manual_seed(0)
    for size, pruned in [(5, 1), (6, 1), (10, 2), (512, 506), (3072, 1)]:
        metric = torch.randperm(size, generator=g).float().reshape(size, 1)
        mask = _ratio_mask(metric, exact_sparse_ratio(size, pruned))
        assert int((mask == 0).sum()) == pruned
        assert torch.equal(mask.flatten() == 0, metric.flatten() < pruned)  # the smallest metrics go
    with pytest.raises(VLPruneError):
        exact_sparse_ratio(4, 5)
    with pytest.raises(VLPruneError):
        exact_sparse_ratio(0, 0)


# ----------------------------------------------------------------------------------------------
# AMP
# ----------------------------------------------------------------------------------------------
def test_amp_masks_equal_the_searched_widths(clip_search: dict[str, Any]) -> None:
    clip, scores, widths = clip_search["model"], clip_search["scores"], clip_search["widths"]
    assert any(k < amp.hidden_size(clip, amp.find_mlps(clip)[n]) for n, k in widths.items())  # something to prune
    reference = copy.deepcopy(clip)
    pruner = AMPPruner(clip, clip_search["cal"], 5e-3, tau=1 / 15, held_out=clip_search["val"], progress=False)
    assert pruner.widths == widths
    for n in scores:
        torch.testing.assert_close(pruner.scores[n], scores[n])
    _, masks = pruner.compress()
    try:
        for name, k in widths.items():
            size = amp.hidden_size(reference, amp.find_mlps(reference)[name])
            fc1 = f"{name}.fc1"
            if k == size:
                assert fc1 not in masks
                continue
            weight, bias = masks[fc1]["weight"], masks[fc1]["bias"]
            kept = _kept_rows(weight)
            assert len(kept) == k and int((bias == 0).sum()) == size - k
            assert torch.equal(kept, torch.sort(amp.neuron_order(scores[name])[:k]).values)
            assert torch.equal(torch.nonzero(bias).flatten(), kept)
            # the masked neurons are the lowest-importance ones
            dropped = torch.ones(size, dtype=torch.bool)
            dropped[kept] = False
            assert float(scores[name][dropped].max()) <= float(scores[name][kept].min())
        assert set(masks) == {f"{n}.fc1" for n, k in widths.items() if k < size}
        # the NNI-masked model computes what AMP's own neuron masks compute
        x = clip_search["val"][0]["pixel_values"][:8]
        keep = {n: amp.neuron_order(scores[n])[:k] for n, k in widths.items()}
        with torch.no_grad(), amp.neuron_masks(reference, keep):
            expected = reference.get_image_features(pixel_values=x).pooler_output
        with torch.no_grad():
            got = clip.get_image_features(pixel_values=x).pooler_output
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        pruner.unwrap_model()


def test_given_config_list_is_respected() -> None:
    model = tiny_model("clip")
    scores = amp.neuron_importance(model, _image_batches(2), tau=0.1, progress=False)
    name = "vision_model.encoder.layers.1.mlp"
    config = [{"op_names": [f"{name}.fc1"], "sparse_ratio": 0.25}]
    pruner = AMPPruner(model, _image_batches(1), None, config_list=config, scores=scores, progress=False)
    assert pruner.widths is None
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert set(masks) == {f"{name}.fc1"}
    kept = _kept_rows(masks[f"{name}.fc1"]["weight"])
    assert len(kept) == 64 - 16  # NNI's int(64 * 0.25)
    assert torch.equal(kept, torch.sort(amp.neuron_order(scores[name])[:48]).values)
    # max_sparse_ratio of a user entry is NNI's to apply
    capped = [{"op_names": [f"{name}.fc1"], "sparse_ratio": 0.5, "max_sparse_ratio": 0.25}]
    pruner = AMPPruner(model, _image_batches(1), None, config_list=capped, scores=scores, progress=False)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert len(_kept_rows(masks[f"{name}.fc1"]["weight"])) == 48


def test_a_search_that_keeps_everything_gives_an_empty_config_and_no_masks() -> None:
    model = tiny_model("clip")
    snap = _snapshot(model)
    with pytest.warns(UserWarning, match="pruned nothing"):
        pruner = AMPPruner(model, _image_batches(2), 0.0, tau=0.1, rule="change", progress=False)
    assert pruner.config_list == [] and all(k == 64 for k in pruner.widths.values())
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert not masks
    torch.testing.assert_close(model.state_dict(), snap["state"])


def test_gated_mlps_mask_gate_and_up_alike_and_equal_neuron_masks() -> None:
    model = _tiny_llama()
    g = torch.Generator().manual_seed(3)
    mlps = [f"model.layers.{i}.mlp" for i in range(3)]
    scores = {n: torch.rand(48, generator=g) for n in mlps}
    scores[mlps[0]][:12] = 2.0  # the top 12 tie and the width cuts through them: broken as neuron_order breaks them
    # 48 - 17 = 31 to mask: the naive ratio 1 - 17/48 gives int(48 * r) = 30 under NNI's rounding
    assert int(48 * (1 - 17 / 48)) == 30
    widths = {mlps[0]: 5, mlps[1]: 17, mlps[2]: 48}
    config = amp_config_list(model, widths)
    assert [c["op_names"] for c in config] == [[f"{n}.gate_proj", f"{n}.up_proj"] for n in mlps[:2]]
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9), generator=g)
    pruner = AMPPruner(model, [{"input_ids": ids}], None, config_list=config, scores=scores, progress=False)
    _, masks = pruner.compress()
    try:
        for n in mlps[:2]:
            kept = torch.sort(amp.neuron_order(scores[n])[: widths[n]]).values
            assert torch.equal(_kept_rows(masks[f"{n}.gate_proj"]["weight"]), kept)
            assert torch.equal(_kept_rows(masks[f"{n}.up_proj"]["weight"]), kept)
        assert not any(k.startswith(mlps[2]) for k in masks)
        keep = {n: amp.neuron_order(scores[n])[:k] for n, k in widths.items()}
        with torch.no_grad(), amp.neuron_masks(reference, keep):
            expected = reference(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            got = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        pruner.unwrap_model()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"delta_e": -0.1}, VLPruneError, "delta_e"),
        ({"delta_e": float("nan")}, VLPruneError, "delta_e"),
        ({"delta_e": "0.1"}, VLPruneError, "delta_e"),
        ({"delta_e": None}, VLPruneError, "delta_e"),
        ({"delta_e": 0.01, "tau": 0}, VLPruneError, "tau"),
        ({"delta_e": 0.01, "rule": "fall"}, VLPruneError, "rule"),
        ({"delta_e": 0.01, "batches": []}, DataError, "empty"),
        ({"delta_e": 0.01, "held_out": []}, DataError, "held_out"),
        ({"delta_e": 0.01, "mlps": ["vision_model.nope"]}, ModelStructureError, "vision_model.nope"),
        ({"delta_e": None, "config_list": [{"op_names": ["vision_model.encoder.layers.0.self_attn.q_proj"],
                                            "sparse_ratio": 0.5}]}, ModelStructureError, "q_proj"),
        ({"delta_e": None, "config_list": [{"op_names": ["vision_model.encoder.layers.0.mlp.fc1"],
                                            "sparse_ratio": 1.0}]}, VLPruneError, "sparse_ratio"),
    ],
)
def test_amp_bad_input_raises_and_leaves_the_model(kwargs: dict[str, Any], error: type, words: str) -> None:
    model = tiny_model("clip")
    snap = _snapshot(model)
    args = {"batches": _image_batches(1), **kwargs}
    with pytest.raises(error, match=words):
        AMPPruner(model, progress=False, **args)
    _assert_untouched(model, snap)


def test_amp_pruner_is_an_nni_pruner_and_unwraps_clean() -> None:
    from nni.compression.base.compressor import Pruner

    model = tiny_model("clip")
    snap = _snapshot(model)
    scores = amp.neuron_importance(model, _image_batches(1), tau=0.1, progress=False)
    config = amp_config_list(model, {n: 10 for n in scores})
    pruner = AMPPruner(model, _image_batches(1), None, config_list=config, scores=scores, progress=False)
    assert isinstance(pruner, Pruner)
    assert hasattr(model.get_submodule("vision_model.encoder.layers.0.mlp.fc1"), "_nni_wrapper")
    pruner.compress()
    pruner.unwrap_model()
    assert [n for n, _ in model.named_parameters()] == snap["params"]
    torch.testing.assert_close(model.state_dict(), snap["state"])  # masks are not baked into the weights


# ----------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "domain", "k"),
    [("rank", "math", 2), ("spacing", "general", 3), ("consecutive", "mixed", 2), ("regime", "mixed", 1),
     ("regime", "math", 3)],
)
def test_layer_pruner_masks_the_chosen_layers_and_equals_their_removal(
    llava_deep: dict[str, Any], strategy: str, domain: str, k: int
) -> None:
    model = copy.deepcopy(llava_deep["model"])
    expected_layers = select_layers(combine_domains(llava_deep["scores"], domain), k, strategy)
    pruner = LayerSimilarityPruner(model, llava_deep["data"], k, strategy=strategy, domain=domain, progress=False)
    assert pruner.chosen == expected_layers
    for d, s in llava_deep["scores"].items():
        torch.testing.assert_close(pruner.scores[d], s)
    decoder = vlprune.describe_model(llava_deep["model"]).decoder_layers
    assert pruner.removed == [decoder[i] for i in expected_layers]
    _, masks = pruner.compress()
    try:
        expected_ops = {f"{decoder[i]}.self_attn.o_proj" for i in expected_layers}
        expected_ops |= {f"{decoder[i]}.mlp.down_proj" for i in expected_layers}
        assert set(masks) == expected_ops
        for op in expected_ops:
            assert not bool(masks[op]["weight"].any()), op
        # the masked model == the model with those layers removed (uncached forward)
        removed = copy.deepcopy(llava_deep["model"])
        vlprune.remove_layers(removed, expected_layers)
        with torch.no_grad():
            got = model(**llava_deep["probe"], use_cache=False).logits
            want = removed(**llava_deep["probe"], use_cache=False).logits
            full = llava_deep["model"](**llava_deep["probe"], use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, full, atol=1e-3)  # the mask did change the model
    finally:
        pruner.unwrap_model()


def test_layer_pruner_precomputed_scores_and_config_list(llava_deep: dict[str, Any]) -> None:
    model = copy.deepcopy(llava_deep["model"])
    pruner = LayerSimilarityPruner(model, None, 2, domain="math", scores=llava_deep["scores"], protect_first=2,
                                   protect_last=0, progress=False)
    assert pruner.chosen == select_layers(llava_deep["scores"]["math"], 2, protect_first=2, protect_last=0)
    assert pruner.config_list == layer_config_list(llava_deep["model"], pruner.removed)
    pruner.unwrap_model()


def test_layer_pruner_on_a_plain_decoder_lm() -> None:
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    data = {d: [{"input_ids": torch.randint(0, 64, (3, 7), generator=g)}] for d in ("math", "general")}
    reference = copy.deepcopy(model)
    pruner = LayerSimilarityPruner(model, data, 1, progress=False)
    assert pruner.chosen == [1]  # 3 layers, first and last protected
    pruner.compress()
    ids = torch.randint(0, 64, (2, 6), generator=g)
    vlprune.remove_layers(reference, [1])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    pruner.unwrap_model()


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        ("empty mapping", DataError, "domain_batches"),
        ("empty domain", DataError, "'math'"),
        ("too many layers", VLPruneError, "7"),
        ("zero layers", VLPruneError, "k"),
        ("unknown domain", DataError, "'code'"),
        ("unknown strategy", VLPruneError, "strategy"),
        ("bad alpha", VLPruneError, "alpha"),
        ("no decoder", ModelStructureError, "decoder"),
        ("post-norm decoder", ModelStructureError, "output.LayerNorm"),
    ],
)
def test_layer_pruner_bad_input_raises_and_leaves_the_model(
    llava_deep: dict[str, Any], case: str, error: type, words: str
) -> None:
    model = {"no decoder": tiny_model("clip"), "post-norm decoder": tiny_model("blip")}.get(case) or copy.deepcopy(
        llava_deep["model"]
    )
    data = llava_deep["data"]
    args: dict[str, Any] = {"domain_batches": data, "n_layers": 2}
    if case == "empty mapping":
        args["domain_batches"] = {}
    elif case == "empty domain":
        args["domain_batches"] = {"math": [], "general": data["general"]}
    elif case == "too many layers":
        args["n_layers"] = 7  # 8 layers, 6 unprotected
    elif case == "zero layers":
        args["n_layers"] = 0
    elif case == "unknown domain":
        args["domain"] = "code"
    elif case == "unknown strategy":
        args["strategy"] = "random"
    elif case == "bad alpha":
        args["alpha"] = 1.5
    elif case in ("no decoder", "post-norm decoder"):
        args["domain_batches"] = {"math": _image_batches(1), "general": _image_batches(1)}
    snap = _snapshot(model)
    with pytest.raises(error, match=words):
        LayerSimilarityPruner(model, progress=False, **args)
    _assert_untouched(model, snap)


def test_shrink_removes_the_masked_layers_if_available(llava_deep: dict[str, Any]) -> None:
    shrink_mod = pytest.importorskip("vlprune.adapters.nni.speedup")
    if not hasattr(shrink_mod, "shrink"):
        pytest.skip("vlprune.adapters.nni.speedup.shrink not there yet")
    model = copy.deepcopy(llava_deep["model"])
    pruner = LayerSimilarityPruner(model, llava_deep["data"], 2, strategy="spacing", progress=False)
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model(**llava_deep["probe"], use_cache=False).logits
    pruner.unwrap_model()
    shrink_mod.shrink(model, masks, llava_deep["probe"])
    assert len(vlprune.describe_model(model).decoder_layers) == 8 - 2
    with torch.no_grad():
        torch.testing.assert_close(model(**llava_deep["probe"], use_cache=False).logits, masked, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(masked.abs().sum()))


def test_from_compressor_fuses_both_pruners_under_an_nni_evaluator() -> None:
    import nni
    from nni.compression import TorchEvaluator
    from nni.compression.pruning import L1NormPruner

    model = _tiny_llama()
    g = torch.Generator().manual_seed(5)
    data = {d: [{"input_ids": torch.randint(0, 64, (3, 7), generator=g)}] for d in ("math", "general")}
    train = [{"input_ids": (ids := torch.randint(0, 64, (2, 8), generator=g)), "labels": ids} for _ in range(2)]
    steps: list[int] = []

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        for step in range(max_steps):
            optimizers.zero_grad()
            training_step(train[step % len(train)], model).backward()
            optimizers.step()
            steps.append(step)

    evaluator = TorchEvaluator(training_func, nni.trace(torch.optim.SGD)(model.parameters(), lr=1e-3),
                               lambda batch, model: model(**batch).loss)
    mlp = "model.layers.0.mlp"
    scores = {mlp: torch.rand(48, generator=g)}
    first = AMPPruner(model, data["math"], None, config_list=amp_config_list(model, {mlp: 12}), scores=scores,
                      evaluator=evaluator, progress=False)
    second = LayerSimilarityPruner.from_compressor(first, data, 1, progress=False)
    assert second.fused_compressors == [second, first]
    _, masks = second.compress(max_steps=2, max_epochs=None)
    second.unwrap_model()
    assert steps == [0, 1]
    kept = torch.sort(amp.neuron_order(scores[mlp])[:12]).values
    assert torch.equal(_kept_rows(masks[f"{mlp}.up_proj"]["weight"]), kept)
    for op in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        assert not bool(masks[op]["weight"].any())

    # a failing chained constructor leaves the first compressor's wrappers in place
    clip = tiny_model("clip")
    q = "vision_model.encoder.layers.0.self_attn.q_proj"
    l1 = L1NormPruner(clip, [{"op_names": [q], "sparse_ratio": 0.5}])
    with pytest.raises(VLPruneError, match="delta_e"):
        AMPPruner.from_compressor(l1, None, _image_batches(1), -1.0)
    assert hasattr(clip.get_submodule(q), "_nni_wrapper")
    l1.unwrap_model()
