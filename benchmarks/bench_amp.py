"""Benchmark: AMP (entropy importance + adaptive widths) vs one-hot Taylor, magnitude and uniform
widths, before and after distillation, on the testbed CLIP and the LLaVA vision tower.

For each model and each ``--delta-e``:

1. AMP: :func:`vlprune.plugins.amp.neuron_importance` (entropy, ``tau``) on ``--calib`` training
   images, then :func:`~vlprune.plugins.amp.search_widths` on ``--held-out`` validation images;
2. the same widths with other neuron scores: **one-hot** Taylor (CLIP: the image-text contrastive
   cross-entropy of matched pairs; LLaVA: the supervised next-token cross-entropy of the training
   mix, the label-based counterpart), **magnitude** (Torch-Pruning's ``GroupMagnitudeImportance``);
3. **uniform** widths with the same total number of neurons, AMP scores;
4. each variant pruned physically by Torch-Pruning (``AMPEntropyImportance`` / magnitude with
   :func:`~vlprune.adapters.torch_pruning.amp_ratio_dict`), evaluated, distilled from the unpruned
   model for ``--distill-steps`` steps on training images (embedding + patch-token MSE, no labels:
   :func:`vlprune.recipes.distill.distill`) and evaluated again.

Parameters / MACs are those of the vision tower (``vision_model`` + ``visual_projection`` for
CLIP; ``vision_tower`` + projector for LLaVA) on one image. Latency: the pruned vs unpruned vision
tower on a batch of 64 images, both in one process, one thread, alternating rounds, medians.

    .venv/bin/python benchmarks/bench_amp.py --out docs/benchmarks_amp.json
    .venv/bin/python benchmarks/bench_amp.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import macs_and_params, quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path


def _images(split: str, n_batches: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed.data import make_scenes, pixel_values

    return [{"pixel_values": pixel_values(make_scenes(split, batch_size, seed=seed + i))} for i in range(n_batches)]  # type: ignore[arg-type]


def _clip_pairs(n_batches: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed.data import build_tokenizer, make_scenes, pixel_values

    tok = build_tokenizer()
    out = []
    for i in range(n_batches):
        scenes = make_scenes("train", batch_size, seed=seed + i)
        text = tok([s.caption() for s in scenes], padding=True, return_tensors="pt")  # type: ignore[operator]
        out.append({"pixel_values": pixel_values(scenes), "input_ids": text.input_ids, "attention_mask": text.attention_mask})
    return out


def _llava_supervised(n_batches: int, batch_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from vlprune.testbed.data import make_scenes
    from vlprune.testbed.train import llava_batch

    return [llava_batch(make_scenes("train", batch_size, seed=seed + i), random.Random(seed + i)) for i in range(n_batches)]


def _lm_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from vlprune.testbed.train import per_example_loss

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return per_example_loss(model(**inputs).logits, batch["labels"])


def _flat_embedding(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """LLaVA: the projected visual tokens of an image, flattened (see the docs for why not pooled)."""
    feats = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    return torch.stack([f.reshape(-1) for f in feats])


class _Tower(nn.Module):
    """The vision tower (+ projection) alone, for MACs and latency."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> Any:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)


def _tower_parts(name: str, model: nn.Module) -> list[nn.Module]:
    if name == "clip":
        return [model.vision_model, model.visual_projection]
    return [model.model.vision_tower, model.model.multi_modal_projector]


def _count(name: str, model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    tower = _Tower(model)
    macs, _ = macs_and_params(tower, {"pixel_values": example})
    params = sum(p.numel() for part in _tower_parts(name, model) for p in part.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if (".mlp.fc" in n) and ("vision" in n))
    return {"tower_params": float(params), "tower_macs": float(macs), "mlp_params": float(mlp),
            "model_params": float(sum(p.numel() for p in model.parameters()))}


def _evaluate(name: str, model: nn.Module, n: int) -> dict[str, float]:
    from vlprune.testbed import evaluate

    if name == "clip":
        out = evaluate(model, "retrieval", n=n)
    else:
        out = evaluate(model, "vqa", n=n)
        out.update({k: v for k, v in evaluate(model, "caption", n=n).items() if k == "cider"})
    return {k: round(float(v), 4) for k, v in out.items()}


def _prune(model: nn.Module, importance: Any, widths: dict[str, int], example: dict[str, torch.Tensor]) -> nn.Module:
    import torch_pruning as tp

    import vlprune
    from vlprune.adapters.torch_pruning import amp_ratio_dict, hf_pruner_kwargs

    tp.pruner.BasePruner(
        model, example, importance=importance, pruning_ratio=0.0, pruning_ratio_dict=amp_ratio_dict(model, widths),
        global_pruning=False, **hf_pruner_kwargs(model, prune_heads=False),
    ).step()
    vlprune.sync_hf_model(model)
    got = {n: int(model.get_submodule(n).fc1.out_features) for n in widths}
    assert got == widths, (got, widths)
    return model


def _latency(base: nn.Module, pruned: nn.Module, images: torch.Tensor, rounds: int) -> dict[str, float]:
    towers = {"unpruned": _Tower(base).eval(), "pruned": _Tower(pruned).eval()}
    times: dict[str, list[float]] = {k: [] for k in towers}
    with torch.inference_mode():
        for tower in towers.values():
            tower(images)
        for _ in range(rounds):
            for key, tower in towers.items():
                start = time.perf_counter()
                tower(images)
                times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"unpruned_ms": round(1e3 * med["unpruned"], 2), "pruned_ms": round(1e3 * med["pruned"], 2),
            "ratio": round(med["pruned"] / med["unpruned"], 3)}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch_pruning as tp

    import vlprune.plugins.amp as amp
    from vlprune.adapters.torch_pruning import AMPEntropyImportance
    from vlprune.recipes.distill import distill
    from vlprune.testbed import load

    base = load(name)
    tau = args.tau
    embed = None if name == "clip" else _flat_embedding
    calib = _images("train", args.calib, args.batch_size, seed=10_000)
    held_out = _images("val", args.held_out, args.batch_size, seed=20_000)
    example_px = held_out[0]["pixel_values"][:2]
    if name == "clip":
        example = {"pixel_values": example_px, "input_ids": torch.ones(2, 5, dtype=torch.long)}
    else:
        example = {k: v[:2] for k, v in _llava_supervised(1, 2, seed=1)[0].items() if k != "labels"}
    result: dict[str, Any] = {"model": name, "tau": tau, "embedding": "default" if embed is None else "flattened projected tokens"}
    start = time.perf_counter()
    scores = {"amp": amp.neuron_importance(base, calib, tau=tau, embed=embed, progress=False)}
    result["importance_seconds"] = round(time.perf_counter() - start, 2)
    if name == "clip":
        onehot_batches = _clip_pairs(args.calib, args.batch_size, seed=10_000)
        scores["onehot"] = amp.neuron_importance(base, onehot_batches, tau=tau, objective="onehot", progress=False)
    else:
        sup = _llava_supervised(args.calib, args.batch_size // 2, seed=10_000)
        scores["onehot"] = amp.neuron_importance(base, sup, mlps=list(scores["amp"]), objective=_lm_objective, progress=False)
    dense = _count(name, base, example_px[:1])
    result["dense"] = {**dense, **_evaluate(name, base, args.n_eval)}
    sys.stdout.write(f"{name} dense: {json.dumps(result['dense'])}\n")
    result["runs"] = []

    def batches(step: int) -> dict[str, torch.Tensor]:
        return _images("train", 1, args.batch_size, seed=30_000 + step)[0]

    for delta in args.delta_e:
        start = time.perf_counter()
        widths = amp.search_widths(base, scores["amp"], held_out, delta, tau=tau, embed=embed, rule=args.rule,
                                   progress=False)
        search_seconds = time.perf_counter() - start
        total = sum(widths.values())
        names = list(widths)
        uniform = {n: total // len(names) + (1 if i < total % len(names) else 0) for i, n in enumerate(names)}
        variants = {
            "amp": (lambda m: AMPEntropyImportance(scores["amp"], m), widths),
            "onehot": (lambda m: AMPEntropyImportance(scores["onehot"], m), widths),
            "magnitude": (lambda m: tp.importance.GroupMagnitudeImportance(), widths),
            "uniform": (lambda m: AMPEntropyImportance(scores["amp"], m), uniform),
        }
        for variant, (make_imp, w) in variants.items():
            model = copy.deepcopy(base)
            _prune(model, make_imp(model), w, example)
            counts = _count(name, model, example_px[:1])
            row: dict[str, Any] = {
                "delta_e": delta, "rule": args.rule, "variant": variant, "widths": dict(zip([n.split(".layers.")[-1] for n in w], w.values())),
                "search_seconds": round(search_seconds, 1),
                **{f"{k}_ratio": round(counts[k] / dense[k], 4) for k in ("tower_params", "tower_macs", "model_params")},
                "mlp_removed": round(1 - counts["mlp_params"] / dense["mlp_params"], 4),
                "before": _evaluate(name, model, args.n_eval),
            }
            if args.distill_steps:
                log = distill(model, base, batches, args.distill_steps, lr=args.distill_lr, warmup=10, progress=False)
                row["distill_seconds"] = log["seconds"]
                row["after"] = _evaluate(name, model, args.n_eval)
            if variant == "amp":
                row["latency"] = _latency(base, model, held_out[0]["pixel_values"], args.latency_rounds)
            result["runs"].append(row)
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["clip", "llava"])
    parser.add_argument("--delta-e", nargs="+", type=float, default=None,
                        help="objective increase allowed per layer (default: clip 1e-3 1e-2 3e-2 1e-1, llava 0 1e-3 1e-2)")
    parser.add_argument("--tau", type=float, default=1 / 15)
    parser.add_argument("--rule", choices=["rise", "change"], default="rise",
                        help="width acceptance: objective rise <= delta_e (official) or |change| <= delta_e")
    parser.add_argument("--calib", type=int, default=8, help="calibration batches for the importance")
    parser.add_argument("--held-out", type=int, default=4, help="held-out batches for the width search")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-lr", type=float, default=5e-4)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--latency-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.calib, args.held_out, args.distill_steps, args.n_eval = ["clip"], 2, 2, 20, 100
        args.latency_rounds = 3
    quiet_cpu_setup(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    defaults = {"clip": [1e-3, 1e-2, 3e-2, 1e-1], "llava": [0.0, 1e-3, 1e-2]}
    results = []
    for name in args.models:
        model_args = copy.copy(args)
        model_args.delta_e = args.delta_e if args.delta_e is not None else defaults[name]
        results.append(run_model(name, model_args))
    out = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args), "results": results, "seconds": round(time.perf_counter() - start, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
