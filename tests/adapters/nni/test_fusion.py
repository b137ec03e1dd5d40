"""vlprune's NNI pruners fused with NNI's DynamicLayerwiseDistiller (``from_compressor``), as NNI's own
pruning + distillation example does: masks applied during training, the distillation loss reaches the
optimizer, and the result shrinks to a smaller model."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("nni")

import nni  # noqa: E402
import torch  # noqa: E402
from nni.compression import TorchEvaluator  # noqa: E402
from nni.compression.distillation import DynamicLayerwiseDistiller  # noqa: E402
from nni.compression.pruning import AGPPruner, LinearPruner  # noqa: E402

from vlprune.adapters.nni.amp import AMPPruner  # noqa: E402
from vlprune.adapters.nni.pruners import IDWeightedPruner, PlatonPruner  # noqa: E402
from vlprune.adapters.nni.speedup import shrink  # noqa: E402
from vlprune.plugins.intrinsic_dim import IDProfile, LayerID  # noqa: E402
from vlprune.testbed import batches, example_inputs, load  # noqa: E402


@pytest.fixture(scope="module")
def clip_data():
    return batches("clip", n_samples=32, batch_size=8, labels=True)


def _evaluator(model, data, losses):
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        for step in range(max_steps):
            optimizers.zero_grad()
            loss = training_step(data[step % len(data)], model)
            losses.append(float(loss.detach()))
            loss.backward()
            optimizers.step()

    optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=1e-4)
    return TorchEvaluator(training_func, optimizer, lambda batch, model: model(**batch).loss)


def _fc1(model):
    return [n for n, _ in model.named_modules() if n.endswith("mlp.fc1")]


def _distill(pruner, teacher, model, steps):
    mlps = [n for n, _ in model.named_modules() if n.endswith(".mlp")]
    config = [{"op_names": mlps, "target_names": ["_output_"], "lambda": 1.0, "apply_method": "mse"}]
    distiller = DynamicLayerwiseDistiller.from_compressor(
        pruner, config, teacher, lambda batch, teacher: teacher(**batch), origin_loss_lambda=0.0
    )
    distiller.compress(max_steps=steps, max_epochs=None)
    distiller.unwrap_model()
    distiller.unwrap_teacher_model()
    return pruner.get_masks() if hasattr(pruner, "get_masks") else None


def _masked_rows(masks):
    return {name: int((m["weight"].flatten(1).sum(1) == 0).sum()) for name, m in masks.items()}


@pytest.mark.parametrize("kind", ["id_l1", "id_l1_linear", "id_taylor_agp", "platon", "amp"])
def test_pruner_fused_with_distiller_prunes_distils_and_shrinks(kind, clip_data) -> None:
    torch.manual_seed(0)
    model = load("clip")
    teacher = copy.deepcopy(model).eval()
    names = _fc1(model)
    losses: list[float] = []
    evaluator = _evaluator(model, clip_data, losses)
    config = [{"op_names": names, "sparse_ratio": 0.5, "granularity": "out_channel"}]
    profile = IDProfile(layers={n: LayerID(n, 4.0 + i, 100, 384) for i, n in enumerate(names)})
    if kind == "id_l1":
        pruner = IDWeightedPruner(model, config, profile, base="l1", evaluator=evaluator)
    elif kind == "id_l1_linear":  # the scheduler drives the masks: its last goal (the full ratio) is reached
        inner = IDWeightedPruner(model, config, profile, base="l1", evaluator=evaluator)
        pruner = LinearPruner(inner, interval_steps=2, total_times=3)
    elif kind == "id_taylor_agp":
        inner = IDWeightedPruner(model, config, profile, base="taylor", evaluator=evaluator, training_steps=2)
        pruner = AGPPruner(inner, interval_steps=2, total_times=3)
    elif kind == "platon":
        pruner = PlatonPruner(model, config, evaluator, warmup_step=1, cooldown_begin_step=5, delta_t=1)
    else:
        pruner = AMPPruner(model, batches("clip", n_samples=16, batch_size=16, images_only=True), delta_e=5e-3,
                           evaluator=evaluator, progress=False)
        expected = {n: pruner.widths[n] for n in pruner.widths}
    masks = _distill(pruner, teacher, model, steps=8)

    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # origin_loss_lambda=0: the optimizer sees the distillation loss alone, 0 while the student equals the
    # teacher (before the first masks), then positive once masks make them differ
    assert losses[0] == pytest.approx(0.0, abs=1e-9) and max(losses[1:]) > 0
    rows = _masked_rows(masks)
    if kind == "amp":
        modules = dict(model.named_modules())
        kept = {n: modules[f"{n}.fc1"].out_features - rows.get(f"{n}.fc1", 0) for n in expected}
        assert kept == expected and any(w < modules[f"{n}.fc1"].out_features for n, w in expected.items())
    else:
        assert rows and all(v == 192 for v in rows.values()), rows  # 50% of 384 in every fc1
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())
    before = sum(p.numel() for p in model.parameters())
    report = shrink(model, masks, example_inputs("clip"))
    assert report.verified and sum(p.numel() for p in model.parameters()) < before
