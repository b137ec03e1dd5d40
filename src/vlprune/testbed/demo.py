"""``make demo``: profile a model's intrinsic dimension, prune it 40% with ID-weighted Taylor
importance through Torch-Pruning, check it still runs, save and reload it.

The default model is the testbed LLaVA (trained by the project on real-digit scenes; VQA and
captions are evaluated before and after). ``--model tiny-llava`` uses a tiny random LLaVA.

    python -m vlprune.testbed.demo --out out/demo
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp

import vlprune
from vlprune.adapters.torch_pruning import IDWeightedImportance, prune_hf_model
from vlprune.recipes.report import side_by_side_latency
from vlprune.testbed.tiny import example_inputs, tiny_model

logger = logging.getLogger("vlprune.demo")


def _count(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> tuple[float, float]:
    """MACs and parameters by Torch-Pruning's counter (its chatter on stdout silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return tp.utils.count_ops_and_params(model, example)


@dataclass
class _Setup:
    model: torch.nn.Module
    title: str
    calib: list[dict[str, torch.Tensor]]  # forward batches for the ID profile (no labels)
    grad: list[dict[str, torch.Tensor]]  # batches with labels for the Taylor gradients
    example: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    quality: Callable[[torch.nn.Module], dict[str, float]] | None


def _setup(model_name: str, n_samples: int, seed: int) -> _Setup:
    if model_name == "testbed":
        from vlprune.testbed import batches, evaluate, load
        from vlprune.testbed import example_inputs as testbed_example

        model = load("llava")
        calib = batches("llava", n_samples=n_samples, batch_size=32, seed=seed)  # val-split scenes
        grad = batches("llava", n_samples=4 * 32, batch_size=32, labels=True, seed=seed)
        example = testbed_example("llava", seed=seed)
        reference = {k: v[:4] for k, v in calib[-1].items()}

        def quality(m: torch.nn.Module) -> dict[str, float]:
            scores = evaluate(m, "vqa", n=100)
            scores.update(evaluate(m, "caption", n=100))
            return scores

        return _Setup(model, "testbed LLaVA (trained on real-digit scenes)", calib, grad, example, reference, quality)
    family = model_name.removeprefix("tiny-")
    model = tiny_model(family, seed=seed)
    calib = [example_inputs(family, batch_size=16, seed=seed + 1 + i) for i in range(n_samples // 16)]
    grad = [dict(b, labels=b["input_ids"].clone()) for b in calib[:4]]
    return _Setup(
        model, f"tiny {family} from a config (random weights)", calib, grad,
        example_inputs(family, batch_size=2, seed=seed), example_inputs(family, batch_size=4, seed=seed + 999), None,
    )


def run(out: Path, model_name: str = "testbed", ratio: float = 0.4, n_samples: int = 256, seed: int = 0) -> dict[str, float]:
    """Run the demo; returns the before/after numbers."""
    write = sys.stdout.write
    setup = _setup(model_name, n_samples, seed)
    model = setup.model
    write(f"model: {setup.title}, {sum(p.numel() for p in model.parameters()):,} parameters\n\n")

    profile = vlprune.estimate_ids(model, setup.calib, n_samples=n_samples, progress=False)
    profile.to_json(out / "id.json")
    profile.plot(out / "id.png", title=f"ID profile, {setup.title}")
    write("intrinsic dimension per modality (TwoNN, flatten representation)\n")
    write(f"  {'modality':9s} {'layers':>6s} {'mean':>7s} {'min':>7s} {'max':>7s}\n")
    for modality, s in profile.summary().items():
        write(f"  {modality:9s} {int(s['layers']):6d} {s['mean']:7.1f} {s['min']:7.1f} {s['max']:7.1f}\n")
    write(f"  plot: {out / 'id.png'}\n\n")

    base_macs, base_params = _count(model, setup.example)
    original = copy.deepcopy(model)
    before_quality = setup.quality(model) if setup.quality else {}

    # gradients for the Taylor base: the language-modelling loss on calibration batches
    model.zero_grad()
    for batch in setup.grad:
        model(**batch).loss.backward()
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)
    prune_hf_model(model, setup.example, imp, pruning_ratio=ratio)
    model.zero_grad(set_to_none=True)

    macs, params = _count(model, setup.example)
    before_ms, after_ms = side_by_side_latency(original, model, setup.reference, repeats=70)
    before_latency, after_latency = before_ms / 1000.0, after_ms / 1000.0
    del original
    after_quality = setup.quality(model) if setup.quality else {}
    with torch.no_grad():
        logits = model(**setup.reference).logits
    saved = vlprune.save_pruned(model, out / "pruned")
    reloaded = vlprune.load_pruned(saved)
    with torch.no_grad():
        same = torch.equal(reloaded(**setup.reference).logits, logits)

    rows = [
        ("parameters", f"{base_params:,.0f}", f"{params:,.0f}", f"{params / base_params:7.3f}"),
        ("MACs", f"{base_macs:,.0f}", f"{macs:,.0f}", f"{macs / base_macs:7.3f}"),
        ("CPU latency (s, side by side)", f"{before_latency:.4f}", f"{after_latency:.4f}", f"{after_latency / before_latency:7.3f}"),
    ]
    for key, value in before_quality.items():
        label = {"math": "VQA math (exact match)", "general": "VQA general (exact match)"}.get(key, f"caption {key}")
        rows.append((label, f"{value:.3f}", f"{after_quality[key]:.3f}", f"{after_quality[key] - value:+7.3f}"))
    write(f"pruned {ratio:.0%} of MLP neurons and attention heads with ID-weighted Taylor importance\n")
    write("(Torch-Pruning, global ranking, no fine-tuning)\n")
    write(f"  {'':29s} {'before':>12s} {'after':>12s} {'change':>7s}\n")
    for name, a, b, r in rows:
        write(f"  {name:29s} {a:>12s} {b:>12s} {r:>7s}\n")
    write(f"\nsaved to {saved}; reloaded outputs identical: {same}\n")
    if not same:
        raise vlprune.VLPruneError("the reloaded pruned model does not reproduce the pruned model's outputs")
    numbers = {"params_ratio": params / base_params, "macs_ratio": macs / base_macs, "latency_ratio": after_latency / before_latency}
    numbers.update({f"before_{k}": v for k, v in before_quality.items()})
    numbers.update({f"after_{k}": v for k, v in after_quality.items()})
    return numbers


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--model", default="testbed", choices=["testbed", "tiny-llava"],
                        help="the trained testbed LLaVA (default) or a tiny random LLaVA built from a config")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*(Unwrapped parameters|No positional inputs).*")
    run(Path(args.out), args.model, args.ratio, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
