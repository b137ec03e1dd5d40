"""IDWeightedPruner and PlatonPruner (vlprune.adapters.nni.pruners) and the config checks they share."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("nni")

import nni  # noqa: E402
import torch  # noqa: E402
from nni.compression import TorchEvaluator  # noqa: E402
from nni.compression.pruning import AGPPruner, L1NormPruner, L2NormPruner, LinearPruner, TaylorPruner  # noqa: E402
from torch import nn  # noqa: E402

from vlprune.adapters.nni.config import check_config_list, select_modules  # noqa: E402
from vlprune.adapters.nni.pruners import IDWeightedPruner, PlatonPruner  # noqa: E402
from vlprune.errors import ModelStructureError, VLPruneError  # noqa: E402
from vlprune.plugins.intrinsic_dim import IDProfile, LayerID  # noqa: E402

# -- a hand-made tiny model and a TorchEvaluator over it -----------------------------------------


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[2].weight.mul_(0.05)  # a layer of small weights: a global ranking wants to empty it
    return model


_X = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
_Y = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))


def _step(batch, model):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


class _Recorder:
    """A TorchEvaluator training_func that records, per step, ``w * grad`` before the optimizer step
    and the masks after it."""

    def __init__(self, names: list[str]):
        self.names = names
        self.sens: list[dict[str, torch.Tensor]] = []
        self.masks: list[dict[str, torch.Tensor]] = []

    def __call__(self, model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        for step in range(max_steps or 10):
            i = (step * 8) % 64
            optimizer.zero_grad()
            training_step((_X[i : i + 8], _Y[i : i + 8]), model).backward()
            wrappers = {n: dict(model.named_modules())[n]._nni_wrapper for n in self.names}
            self.sens.append({n: (w.weight * w.weight.grad).detach().clone() for n, w in wrappers.items()})
            optimizer.step()
            self.masks.append({n: w.weight_mask.detach().clone() for n, w in wrappers.items()})


def _evaluator(model: nn.Module, recorder: _Recorder, lr: float = 0.01) -> TorchEvaluator:
    return TorchEvaluator(recorder, nni.trace(torch.optim.SGD)(model.parameters(), lr=lr), _step)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, snapshot: dict, never_wrapped: bool = True) -> None:
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules()), "model left wrapped"
    if never_wrapped:  # NNI's own unwrap_model() leaves the original bound forward in module.__dict__
        assert not any("forward" in m.__dict__ for m in model.modules()), "forward left patched"
    state = model.state_dict()
    assert list(state) == list(snapshot)
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)
    assert all(isinstance(p, nn.Parameter) for p in (model[0].weight, model[2].weight))


# -- IDWeightedPruner ---------------------------------------------------------------------------


@pytest.mark.parametrize("base,nni_cls,p", [("l1", L1NormPruner, 1), ("l2", L2NormPruner, 2)])
def test_metric_is_nni_norm_metric_times_layer_id(base, nni_cls, p):
    ids = {"0": 37.5, "2": 4.0, "4": 11.0}
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    model = _mlp()
    ours = IDWeightedPruner(model, config, ids, base=base).metrics()
    reference = nni_cls(copy.deepcopy(_mlp()), config)
    nni_metrics = reference._calculate_metrics(reference._collect_data())
    for name, layer in (("0", model[0]), ("2", model[2]), ("4", model[4])):
        by_hand = layer.weight.detach().norm(p=p, dim=1, keepdim=True) * ids[name]  # rows of the Linear
        assert ours[name]["weight"].shape == by_hand.shape
        torch.testing.assert_close(ours[name]["weight"], by_hand)
        torch.testing.assert_close(ours[name]["weight"], nni_metrics[name]["weight"] * ids[name])


def test_fine_grained_metric_and_idprofile_object():
    profile = IDProfile(layers={"0": LayerID("0", 12.0, 100, 16)})
    model = _mlp()
    pruner = IDWeightedPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.25, "granularity": [1, 1]}], profile)
    torch.testing.assert_close(pruner.metrics()["0"]["weight"], model[0].weight.detach().abs() * 12.0)
    _, masks = pruner.compress()
    assert masks["0"]["weight"].shape == (16, 8) and int((masks["0"]["weight"] == 0).sum()) == 32
    # "granularity": [1] is element-wise for any layer type (a Conv2d's 4-D weight too)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 5))
    pruner = IDWeightedPruner(conv, [{"op_names": ["0", "2"], "sparse_ratio": 0.5, "granularity": [1]}], {"0": 2.0, "2": 3.0})
    torch.testing.assert_close(pruner.metrics()["0"]["weight"], conv[0].weight.detach().abs() * 2.0)
    _, masks = pruner.compress()
    assert int((masks["0"]["weight"] == 0).sum()) == 54 and int((masks["2"]["weight"] == 0).sum()) == 360


def test_per_layer_ratio_masks_equal_nni_l1_whatever_the_ids():
    """One constant per layer does not change a per-layer ranking: the masks are NNI's L1 masks."""
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    _, ours = IDWeightedPruner(_mlp(), config, {"0": 300.0, "2": 1.0, "4": 7.0}).compress()
    _, theirs = L1NormPruner(_mlp(), config).compress()
    for name in ("0", "2", "4"):
        assert torch.equal(ours[name]["weight"], theirs[name]["weight"])
        assert torch.equal(ours[name]["bias"], theirs[name]["bias"])


def _global_config(max_ratio: float | None = 0.6) -> list[dict]:
    entry = {"op_names": ["0", "2"], "sparse_ratio": 0.5, "global_group_id": "all"}
    if max_ratio is not None:
        entry["max_sparse_ratio"] = max_ratio
    return [entry]


def test_global_group_honours_max_sparse_ratio_where_nni_overprunes():
    _, nni_masks = L1NormPruner(_mlp(), _global_config()).compress()
    nni_pruned = 1 - nni_masks["2"]["weight"].mean().item()
    assert nni_pruned > 0.6 + 1e-6, f"NNI's global group no longer over-prunes ({nni_pruned}); drop the fence?"

    ids = {"0": 1.0, "2": 1.0}
    pruner = IDWeightedPruner(_mlp(), _global_config(), ids)
    metrics = pruner.metrics()
    _, masks = pruner.compress()
    rows = {name: masks[name]["weight"][:, 0] for name in ("0", "2")}  # out_channel: whole rows
    pruned = {name: int((r == 0).sum()) for name, r in rows.items()}
    assert pruned["2"] == int(16 * 0.6)  # the small layer stops at its limit ...
    # ... and the group still prunes its share (elements: layer 0 rows hold 8, layer 2 rows 16)
    elements = pruned["0"] * 8 + pruned["2"] * 16
    assert elements <= int(0.5 * (16 * 8 + 16 * 16)) < elements + 8
    # global ranking among the layers below their limit: layer 0's pruned rows are its lowest
    m0 = metrics["0"]["weight"].flatten()
    assert set(torch.argsort(m0)[: pruned["0"]].tolist()) == set(torch.nonzero(rows["0"] == 0).flatten().tolist())
    # biases follow their rows (NNI's align rule still applies)
    assert torch.equal(masks["2"]["bias"], rows["2"])


def test_global_ranking_uses_raw_id_products_and_never_empties_a_layer():
    model = _mlp()
    # equal IDs: the small-weight layer takes the cut; a high ID on it moves the cut to layer 0
    _, equal = IDWeightedPruner(copy.deepcopy(model), _global_config(None), {"0": 1.0, "2": 1.0}).compress()
    _, weighted = IDWeightedPruner(copy.deepcopy(model), _global_config(None), {"0": 1.0, "2": 1000.0}).compress()
    kept_equal = equal["2"]["weight"][:, 0].sum().item()
    assert kept_equal >= 1  # min_kept: never emptied, although every row of layer 2 ranks lowest
    assert weighted["2"]["weight"].mean() > equal["2"]["weight"].mean()
    assert weighted["0"]["weight"].mean() < equal["0"]["weight"].mean()
    # by hand: 16 row norms x ID of each layer; each layer's top row is kept (min_kept = 1); the
    # lowest of the rest go, while they fit in the 192 elements asked for (rows of 8 / 16 elements)
    norms = [(model[0].weight.abs().sum(1) * 1.0, 8, "0"), (model[2].weight.abs().sum(1) * 1000.0, 16, "2")]
    entries = sorted(
        (v.item(), g, n, i) for vals, g, n in norms for i, v in enumerate(vals) if i != int(vals.argmax())
    )
    budget, chosen = 192, {"0": set(), "2": set()}
    for _, grain, name, row in entries:
        if budget - grain < 0:
            break
        budget -= grain
        chosen[name].add(row)
    for name in ("0", "2"):
        assert set(torch.nonzero(weighted[name]["weight"][:, 0] == 0).flatten().tolist()) == chosen[name]


def test_taylor_base_with_torch_evaluator_on_testbed_llava():
    from vlprune.testbed import batches
    from vlprune.testbed.tiny import tiny_model

    model = tiny_model("llava")
    data = batches("tiny-llava", n_samples=8, batch_size=4, labels=True)
    names = [n for n, _ in model.named_modules() if n.endswith("mlp.down_proj")]
    ids = {name: 10.0 + 5 * i for i, name in enumerate(names)}
    seen: dict[str, torch.Tensor] = {}

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        modules = dict(model.named_modules())
        for step in range(max_steps):
            optimizers.zero_grad()
            training_step(data[step % len(data)], model).backward()
            for name in names:  # NNI's Taylor: (w * grad)^2 summed over the steps
                w = modules[name]._nni_wrapper.weight
                seen[name] = seen.get(name, 0) + (w * w.grad).detach().pow(2)
            optimizers.step()

    evaluator = TorchEvaluator(
        training_func, nni.trace(torch.optim.Adam)(model.parameters(), lr=1e-3), lambda batch, model: model(**batch).loss
    )
    config = [{"op_names": names, "sparse_ratio": 0.25, "global_group_id": 0, "max_sparse_ratio": 0.5}]
    pruner = IDWeightedPruner(model, config, ids, base="taylor", evaluator=evaluator, training_steps=3)
    assert isinstance(pruner, TaylorPruner)
    captured: dict = {}
    original = pruner._generate_sparsity

    def spy(metrics):
        captured.update({k: {t: v.clone() for t, v in d.items()} for k, d in metrics.items()})
        return original(metrics)

    pruner._generate_sparsity = spy
    _, masks = pruner.compress()
    for name in names:
        by_hand = (seen[name] / 3).sum(dim=1, keepdim=True) * ids[name]
        torch.testing.assert_close(captured[name]["weight"], by_hand, rtol=1e-5, atol=1e-12)
        pruned = 1 - masks[name]["weight"][:, 0].mean().item()
        assert pruned <= 0.5 + 1e-6
    total = sum(masks[n]["weight"].numel() for n in names)
    zeros = sum(int((masks[n]["weight"] == 0).sum()) for n in names)
    assert abs(zeros / total - 0.25) < 0.05
    pruner.unwrap_model()
    assert isinstance(model.get_submodule(names[0]).weight, nn.Parameter)


@pytest.mark.parametrize("scheduler", [AGPPruner, LinearPruner])
def test_inside_nni_scheduled_pruning(scheduler):
    model = _mlp()
    recorder = _Recorder(["0", "2"])
    inner = IDWeightedPruner(model, _global_config(0.6), {"0": 1.0, "2": 1.0}, evaluator=_evaluator(model, recorder))
    outer = scheduler(inner, interval_steps=2, total_times=3)
    _, masks = outer.compress(max_steps=6, max_epochs=None)
    layer2 = [1 - m["2"][:, 0].mean().item() for m in recorder.masks]
    assert layer2 == sorted(layer2) and layer2[0] < layer2[-1]  # sparsity rises on the schedule
    assert 1 - masks["2"]["weight"][:, 0].mean().item() <= 0.6 + 1e-6  # the fence holds inside NNI's scheduler
    zeros = int((masks["0"]["weight"] == 0).sum() + (masks["2"]["weight"] == 0).sum())
    assert abs(zeros / (16 * 8 + 16 * 16) - 0.5) < 0.05  # final sparsity reached


# -- PlatonPruner -------------------------------------------------------------------------------


def _platon_by_hand(sens: list[dict[str, torch.Tensor]], beta1: float, beta2: float, delta_t: int) -> dict:
    ibar: dict[str, torch.Tensor] = {}
    ubar: dict[str, torch.Tensor] = {}
    for start in range(0, len(sens) - len(sens) % delta_t, delta_t):
        for name in sens[0]:
            current = sum(s[name].abs() for s in sens[start : start + delta_t]) / delta_t
            ibar[name] = beta1 * ibar.get(name, 0) + (1 - beta1) * current
            ubar[name] = beta2 * ubar.get(name, 0) + (1 - beta2) * (current - ibar[name]).abs()
    return {name: ibar[name] * ubar[name] for name in ibar}


@pytest.mark.parametrize("granularity", [None, "out_channel"])
def test_platon_scores_equal_hand_computed_ucb(granularity):
    model = _mlp()
    recorder = _Recorder(["0", "2"])
    entry = {"op_names": ["0", "2"], "sparse_ratio": 0.5}
    if granularity:
        entry["granularity"] = granularity
    pruner = PlatonPruner(model, [entry], _evaluator(model, recorder), warmup_step=4, cooldown_begin_step=12,
                          beta1=0.8, beta2=0.9, delta_t=3)
    pruner.compress(max_steps=13, max_epochs=None)
    expected = _platon_by_hand(recorder.sens, 0.8, 0.9, 3)
    metrics = pruner.metrics()
    for name in ("0", "2"):
        score = expected[name]
        if granularity == "out_channel":
            score = score.sum(dim=1, keepdim=True)
        torch.testing.assert_close(metrics[name]["weight"], score, rtol=1e-5, atol=1e-12)
        final = recorder.masks[-1][name]
        assert int((final == 0).sum()) == final.numel() // 2  # final sparsity reached after cooldown
        if granularity == "out_channel":
            assert torch.equal(final, final[:, :1].expand_as(final))  # whole rows


def test_platon_sparsity_follows_the_cubic_schedule():
    model = _mlp()
    recorder = _Recorder(["0"])
    warmup, cooldown, delta_t, final = 3, 15, 2, 0.75
    pruner = PlatonPruner(model, [{"op_names": ["0"], "sparse_ratio": final}], _evaluator(model, recorder),
                          warmup_step=warmup, cooldown_begin_step=cooldown, delta_t=delta_t)
    pruner.compress(max_steps=18, max_epochs=None)
    n = 16 * 8
    sparsity = [int((m["0"] == 0).sum()) for m in recorder.masks]
    target = 0
    for step, zeros in enumerate(sparsity, start=1):
        if step <= warmup:
            target = 0
        elif step > cooldown:
            target = int(n * final)
        elif step % delta_t == 0:  # masks move only every delta_t steps in the cubic phase
            fraction = 1 - (1 - (step - warmup) / (cooldown - warmup)) ** 3
            target = int(n * final * fraction)
        assert zeros == target, (step, zeros, target)
    assert sparsity[cooldown - 1] < int(n * final) or cooldown % delta_t == 0
    assert sparsity[-1] == int(n * final)


def test_id_platon_multiplies_scores_by_layer_id():
    ids = {"0": 3.0, "2": 50.0}
    runs = {}
    for label, profile in (("plain", None), ("id", ids)):
        model = _mlp()
        recorder = _Recorder(["0", "2"])
        pruner = PlatonPruner(model, [{"op_names": ["0", "2"], "sparse_ratio": 0.5, "global_group_id": "g"}],
                              _evaluator(model, recorder), warmup_step=2, cooldown_begin_step=6, delta_t=2, profile=profile)
        _, masks = pruner.compress(max_steps=8, max_epochs=None)
        runs[label] = (pruner.metrics(), masks)
    for name in ("0", "2"):
        torch.testing.assert_close(runs["id"][0][name]["weight"], runs["plain"][0][name]["weight"] * ids[name])
    # under PLATON's global threshold the high-ID layer keeps more
    assert runs["id"][1]["2"]["weight"].mean() > runs["plain"][1]["2"]["weight"].mean()


# -- bad input: a VLPruneError that says what to do, and the model untouched ---------------------


def _bad_cases():
    ids = {"0": 5.0, "2": 5.0, "4": 5.0}
    ok = [{"op_names": ["0", "2"], "sparse_ratio": 0.5}]

    def ev(model):
        return _evaluator(model, _Recorder(["0"]))

    return [
        ("selects nothing", lambda m: IDWeightedPruner(m, [{"op_names_re": ["vision.*"], "sparse_ratio": 0.5}], ids),
         ModelStructureError, "selects no module"),
        ("unknown op name", lambda m: IDWeightedPruner(m, [{"op_names": ["fc9"], "sparse_ratio": 0.5}], ids),
         ModelStructureError, "'fc9'"),
        ("type NNI cannot prune", lambda m: IDWeightedPruner(m, [{"op_types": ["ReLU"], "sparse_ratio": 0.5}], ids),
         ModelStructureError, "which NNI cannot prune"),
        ("sparse_ratio 1", lambda m: IDWeightedPruner(m, [{"op_names": ["0"], "sparse_ratio": 1.0}], ids),
         VLPruneError, "outside [0, 1)"),
        ("sparse_ratio < 0", lambda m: PlatonPruner(m, [{"op_names": ["0"], "sparse_ratio": -0.2}], ev(m), 1, 5),
         VLPruneError, "outside [0, 1)"),
        ("empty config", lambda m: IDWeightedPruner(m, [], ids), VLPruneError, "config_list is empty"),
        ("cooldown <= warmup", lambda m: PlatonPruner(m, ok, ev(m), warmup_step=5, cooldown_begin_step=5),
         VLPruneError, "cooldown_begin_step (5) must be after warmup_step (5)"),
        ("platon without evaluator", lambda m: PlatonPruner(m, ok, None, 1, 5), VLPruneError, "needs an NNI evaluator"),
        ("profile lacks a layer", lambda m: IDWeightedPruner(m, ok, {"0": 5.0}), ModelStructureError, "no ID for 1 module"),
        ("id-platon profile lacks a layer", lambda m: PlatonPruner(m, ok, ev(m), 1, 5, profile={"2": 4.0}),
         ModelStructureError, "['0']"),
        ("taylor without evaluator", lambda m: IDWeightedPruner(m, ok, ids, base="taylor", training_steps=2),
         VLPruneError, "needs an NNI evaluator"),
        ("taylor without steps", lambda m: IDWeightedPruner(m, ok, ids, base="taylor", evaluator=ev(m)),
         VLPruneError, "needs training_steps"),
        ("unknown base", lambda m: IDWeightedPruner(m, ok, ids, base="fisher"), VLPruneError, "'l1', 'l2' or 'taylor'"),
        ("non-positive ID", lambda m: IDWeightedPruner(m, ok, {"0": 0.0, "2": 1.0}), VLPruneError, "positive"),
        ("group ratios differ", lambda m: IDWeightedPruner(
            m, [{"op_names": ["0"], "sparse_ratio": 0.5, "global_group_id": 1},
                {"op_names": ["2"], "sparse_ratio": 0.3, "global_group_id": 1}], ids), VLPruneError, "same sparse_ratio"),
    ]


@pytest.mark.parametrize("label,make,error,words", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_and_leaves_model_untouched(label, make, error, words):
    model = _mlp()
    snapshot = _snapshot(model)
    with pytest.raises(error) as info:
        make(model)
    assert words in str(info.value)
    _assert_untouched(model, snapshot)


def test_platon_compress_too_short_raises_before_training():
    model = _mlp()
    snapshot = _snapshot(model)
    pruner = PlatonPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.5}], _evaluator(model, _Recorder(["0"])), 2, 10)
    with pytest.raises(VLPruneError, match="before cooldown_begin_step 10"):
        pruner.compress(max_steps=5, max_epochs=None)
    pruner.unwrap_model()
    _assert_untouched(model, snapshot, never_wrapped=False)
    reference = _mlp()
    torch.testing.assert_close(model(_X), reference(_X), rtol=0, atol=0)


def test_check_config_list_accepts_valid_and_select_modules_matches_nni():
    model = _mlp()
    config = [{"op_types": ["Linear"], "exclude_op_names": ["4"], "sparse_ratio": 0.5}]
    check_config_list(model, config)
    assert sorted(select_modules(model, config)) == ["0", "2"]
    with pytest.raises(VLPruneError, match="float"):
        check_config_list(model, [{"op_types": ["Linear"], "sparse_ratio": 0}])


def test_from_compressor_chains_idweighted_then_platon():
    model = _mlp()
    recorder = _Recorder(["0", "2"])
    first = IDWeightedPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.25}], {"0": 2.0},
                             evaluator=_evaluator(model, recorder))
    first.first_step_gen = True  # NNI's norm pruners only prune inside a fusion when told to
    second = PlatonPruner.from_compressor(first, [{"op_names": ["2"], "sparse_ratio": 0.5}], warmup_step=2,
                                          cooldown_begin_step=6, delta_t=2)
    assert isinstance(second, PlatonPruner) and second.evaluator is first.evaluator
    _, masks = second.compress(max_steps=8, max_epochs=None)
    assert int((masks["0"]["weight"][:, 0] == 0).sum()) == 4  # the ID-weighted L1 rows
    assert int((masks["2"]["weight"] == 0).sum()) == 128  # PLATON's weights
    again = IDWeightedPruner.from_compressor(second, [{"op_names": ["4"], "sparse_ratio": 0.5}], {"4": 3.0})
    assert isinstance(again, L1NormPruner.__mro__[1]) and again.base == "l1"


# -- transformers' Trainer through NNI's TransformersEvaluator ----------------------------------


def _traced_trainer(model, max_steps: int, out):
    from transformers import Trainer, TrainingArguments

    from vlprune.testbed import batches

    samples = [{k: v[i] for k, v in b.items()} for b in batches("tiny-llava", 16, 4, labels=True) for i in range(4)]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, report_to=[],
        logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=1e-3)
    return nni.trace(Trainer)(model=model, args=args, train_dataset=samples, optimizers=(optimizer, None))


def test_nni_transformers_evaluator_fails_on_transformers_5_and_the_patched_one_works(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.TrainingArguments needs accelerate>=1.1.0")
    from nni.compression import TransformersEvaluator

    from vlprune.adapters.nni.evaluators import PatchedTransformersEvaluator
    from vlprune.testbed.tiny import tiny_model

    model = tiny_model("llava")
    names = [n for n, _ in model.named_modules() if n.endswith("mlp.down_proj")]
    config = [{"op_names": names, "sparse_ratio": 0.5}]
    broken = PlatonPruner(model, config, TransformersEvaluator(_traced_trainer(model, 6, tmp_path)), warmup_step=1,
                          cooldown_begin_step=4, delta_t=1)
    with pytest.raises(AssertionError):  # NNI takes transformers 5's Trainer.deepspeed (None) for the optimizer
        broken.compress(max_steps=6, max_epochs=None)
    broken.evaluator.unbind_model()
    broken.unwrap_model()

    model = tiny_model("llava")
    pruner = PlatonPruner(model, config, PatchedTransformersEvaluator(_traced_trainer(model, 6, tmp_path)), warmup_step=1,
                          cooldown_begin_step=4, delta_t=1)
    _, masks = pruner.compress(max_steps=6, max_epochs=None)
    assert pruner.platon.calls == 6
    assert all(int((masks[n]["weight"] == 0).sum()) == masks[n]["weight"].numel() // 2 for n in names)

    model = tiny_model("llava")
    ids = {n: 5.0 for n in names}
    pruner = IDWeightedPruner(model, config, ids, base="taylor",
                              evaluator=PatchedTransformersEvaluator(_traced_trainer(model, 3, tmp_path)), training_steps=3)
    _, masks = pruner.compress()
    assert all(masks[n]["weight"][:, 0].mean() == 0.5 for n in names)
    untraced = _traced_trainer(model, 3, tmp_path)
    untraced.optimizer = None  # as a Trainer built without optimizers=
    with pytest.raises(VLPruneError, match="nni.trace'd optimizer"):
        PatchedTransformersEvaluator(untraced)


def test_model_wrapped_by_another_pruner_is_refused_without_harm():
    model = _mlp()
    first = L1NormPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.5}])
    with pytest.raises(ModelStructureError, match="already wrapped by another NNI compressor"):
        IDWeightedPruner(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], {"0": 1.0, "2": 1.0, "4": 1.0})
    assert model[0]._nni_wrapper is first._module_wrappers["0"]  # the first pruner still owns its wrapper
    assert not hasattr(model[2], "_nni_wrapper")


def test_refused_from_compressor_leaves_the_first_pruner_wrapped():
    model = _mlp()
    first = L1NormPruner(model, [{"op_names": ["0"], "sparse_ratio": 0.5}])
    with pytest.raises(ModelStructureError, match="no ID"):
        IDWeightedPruner.from_compressor(first, [{"op_names": ["2"], "sparse_ratio": 0.5}], {"4": 1.0})
    assert first._is_wrapped and model[0]._nni_wrapper is first._module_wrappers["0"]
    assert not hasattr(model[2], "_nni_wrapper")
    _, masks = first.compress()
    assert masks["0"]["weight"].mean() == 0.5
