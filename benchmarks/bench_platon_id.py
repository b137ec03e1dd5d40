"""Benchmark: ID-PLATON vs PLATON vs ID-magnitude vs magnitude vs Taylor vs random on the testbed
LLaVA, unstructured and structured, at several sparsities, with the same training budget.

Every run starts from the trained testbed LLaVA (``vlprune.testbed.load("llava")``) and trains
``--steps`` AdamW steps on the same batches (caption + math VQA + general VQA, per-example loss),
pruning on PLATON's cubic schedule while it trains (dense for ``initial_warmup * warmup_steps``,
cubic phase, then ``final_warmup * warmup_steps`` steps of fine-tuning at the final sparsity):

* **unstructured**: one global threshold over every ``nn.Linear`` weight of the vision tower,
  projector and language decoder (not ``lm_head``), each tensor keeping >= 1% of its weights
  (:class:`vlprune.recipes.finetune.GlobalUnstructuredPruning`); sparsity = fraction of those weights
  removed;
* **structured**: Torch-Pruning ``BasePruner`` on MLP neurons and (non-GQA) attention heads, 4
  iterative steps on the cubic scheduler, global ranking
  (:class:`vlprune.recipes.finetune.StructuredPruning`); sparsity = tp's pruning ratio of those
  groups (the parameter ratio is reported too). Attention heads are not pruned: Torch-Pruning
  1.6's global head ranking can remove every head of a 4-head layer at these ratios.

ID variants multiply scores by the layer's intrinsic dimension (TwoNN on 256 validation scenes,
flattened layer outputs). A ``dense`` run (same training, no pruning) is the reference.

``--budgets`` adds the modality-budget comparison at ``--budget-sparsity`` (PLATON score):
one global threshold vs the same sparsity in every modality (uniform) vs ID-derived asymmetric
budgets (``vlprune.plugins.layer_budget.modality_budgets``, rule ``inverse_id``).

    .venv/bin/python benchmarks/bench_platon_id.py --out docs/benchmarks_platon_id.json
    .venv/bin/python benchmarks/bench_platon_id.py --quick        # 2 criteria, 1 sparsity, 40 steps
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import macs_and_params, quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path

CRITERIA = ("id_platon", "platon", "id_magnitude", "magnitude", "taylor", "random")


def _setup(seed: int) -> dict[str, Any]:
    import vlprune
    from vlprune.adapters.hf.families import describe
    from vlprune.testbed import load
    from vlprune.testbed.data import make_scenes
    from vlprune.testbed.train import llava_batch

    model = load("llava")
    calib = [
        {k: v for k, v in llava_batch(make_scenes("val", 32, seed=seed + i), random.Random(seed + i)).items() if k != "labels"}
        for i in range(8)
    ]
    profile = vlprune.estimate_ids(model, calib, n_samples=256, progress=False)
    info = describe(model)
    linears = [n for n in info.linear_modality if n not in info.heads]
    return {
        "model": model,
        "profile": profile,
        "ids": profile.ids(),
        "modality_of": {n: info.linear_modality[n] for n in linears},
        "names": [f"{n}.weight" for n in linears],
        "example": {k: v[:2] for k, v in calib[0].items()},
    }


def _batches(seed: int, batch_size: int):
    from vlprune.testbed.data import make_scenes
    from vlprune.testbed.train import llava_batch

    def batch(step: int) -> dict[str, torch.Tensor]:
        return llava_batch(make_scenes("train", batch_size, seed=seed * 7919 + 900_000 + step), random.Random(seed + step))

    return batch


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from vlprune.testbed.train import per_example_loss

    inputs = dict(batch)
    labels = inputs.pop("labels")
    return per_example_loss(model(**inputs).logits, labels)


def _evaluate(model: torch.nn.Module, n: int) -> dict[str, float]:
    from vlprune.testbed import evaluate

    out = evaluate(model, "vqa", n=n)
    out.update(evaluate(model, "caption", n=n))
    return {k: round(v, 4) for k, v in out.items()}


def _schedule(args: argparse.Namespace) -> dict[str, Any]:
    return dict(warmup_steps=args.warmup_steps, initial_warmup=args.initial_warmup, final_warmup=args.final_warmup)


def run_one(setup: dict[str, Any], mode: str, criterion: str, sparsity: float, args: argparse.Namespace,
            modality_sparsity: dict[str, float] | None = None,
            modality_of: dict[str, str] | None = None) -> dict[str, Any]:
    """One pruning run from a fresh copy of the testbed model."""
    import torch_pruning as tp

    from vlprune.adapters.hf.surgery import sync_hf_model
    from vlprune.adapters.torch_pruning import (
        IDWeightedImportance, KeepHeads, PlatonImportance, cubic_scheduler, pruning_steps,
    )
    from vlprune.recipes.finetune import GlobalUnstructuredPruning, StructuredPruning, train_loop

    model = copy.deepcopy(setup["model"])
    base_macs, base_params = macs_and_params(model, setup["example"])
    use_id = criterion.startswith("id_")
    score = criterion.removeprefix("id_")
    callbacks: list[Any] = []
    unstructured = None
    if mode == "unstructured" and (sparsity > 0 or modality_sparsity):
        unstructured = GlobalUnstructuredPruning(
            setup["names"], score, args.steps, sparsity, ids=setup["ids"] if use_id else None,
            modality_sparsity=modality_sparsity, modality_of=(modality_of or setup["modality_of"]) if modality_sparsity else None,
            delta_t=args.delta_t, seed=args.seed, **_schedule(args),
        )
        callbacks.append(unstructured)
    elif mode == "structured" and sparsity > 0:
        base = {
            "platon": lambda: PlatonImportance(delta_t=args.delta_t),
            "magnitude": lambda: tp.importance.GroupMagnitudeImportance(),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "random": lambda: tp.importance.RandomImportance(),
        }[score]()
        imp = IDWeightedImportance(base, setup["ids"]) if use_id else base
        kwargs = _hf_kwargs(model, args.heads)
        head_ratio = sparsity
        if args.heads:
            imp = KeepHeads(imp, kwargs["num_heads"])  # every attention keeps >= 1 head
            head_ratio = min(sparsity, imp.max_ratio)  # 4-head layers: at most 75% of the heads
        ratio_dict = None
        if modality_sparsity:
            from vlprune.plugins.layer_budget import modality_ratio_dict

            ratio_dict = modality_ratio_dict(model, setup["profile"], modality_sparsity)
        pruner = tp.pruner.BasePruner(
            model, setup["example"], importance=imp, pruning_ratio=sparsity, head_pruning_ratio=head_ratio,
            pruning_ratio_dict=ratio_dict, iterative_steps=args.iterative_steps,
            iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True, **kwargs,
        )
        prune_at = pruning_steps(args.steps, args.iterative_steps, **_schedule(args))
        callbacks.append(StructuredPruning(pruner, prune_at, after_prune=lambda m: sync_hf_model(m, pruned="heads")))
    start = time.perf_counter()
    log = train_loop(
        model, _batches(args.seed, args.batch_size), args.steps, lr=args.lr, warmup=args.warmup_steps,
        loss_fn=_loss, callbacks=callbacks, progress=False,
    )
    report = unstructured.finish(model) if unstructured is not None else {}
    metrics = _evaluate(model, args.n_eval)
    macs, params = macs_and_params(model, setup["example"])
    row = {
        "mode": mode + ("+heads" if mode == "structured" and args.heads else ""), "criterion": criterion,
        "sparsity": sparsity, **metrics,
        "params_ratio": round(params / base_params, 4), "macs_ratio": round(macs / base_macs, 4),
        "weight_sparsity": round(report.get("overall", 0.0), 4), "final_loss": log["loss"][-1][1],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if modality_sparsity and modality_of is None:
        row["modality_sparsity"] = {k: round(v, 4) for k, v in modality_sparsity.items()}
        if report:
            row["modality_weight_sparsity"] = _modality_sparsity(model, setup)
    return row


def _hf_kwargs(model: torch.nn.Module, heads: bool) -> dict[str, Any]:
    from vlprune.adapters.torch_pruning import hf_pruner_kwargs

    # MLP neurons; with --heads also whole heads of the (non-GQA) vision attentions
    return hf_pruner_kwargs(model, prune_heads=heads)


def _modality_sparsity(model: torch.nn.Module, setup: dict[str, Any]) -> dict[str, float]:
    modules = dict(model.named_modules())
    zeros: dict[str, list[int]] = {}
    for name in setup["names"]:
        module = name.removesuffix(".weight")
        w = modules[module].weight
        z = zeros.setdefault(setup["modality_of"][module], [0, 0])
        z[0] += int((w == 0).sum())
        z[1] += w.numel()
    return {m: round(a / b, 4) for m, (a, b) in zeros.items()}


def _layer_score_rows(setup: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-layer sparsities from Score_l = ID_l / Comp_l + lam * Utility_l (utility = drop of the
    mean validation VQA accuracy when the layer is zeroed), as one group per layer."""
    from vlprune.plugins.layer_budget import layer_complexity, layer_ratios, layer_scores, layer_utility
    from vlprune.testbed import evaluate

    model = setup["model"]
    layers = [n.removesuffix(".weight") for n in setup["names"]]

    def metric(m: torch.nn.Module) -> float:
        scores = evaluate(m, "vqa", split="val", n=100)
        return (scores["math"] + scores["general"]) / 2

    start = time.perf_counter()
    utility = layer_utility(model, layers, metric, progress=False)
    seconds = time.perf_counter() - start
    complexity = layer_complexity(model, layers)
    rows = []
    for lam in (0.0, args.lam):
        scores = layer_scores({n: setup["ids"][n] for n in layers}, complexity, utility if lam else None, lam=lam)
        ratios = layer_ratios(scores, complexity, args.budget_sparsity, max_ratio=0.95)
        row = run_one(setup, "unstructured", "platon", args.budget_sparsity, args,
                      modality_sparsity=ratios, modality_of={n: n for n in layers})
        row.pop("modality_sparsity", None)
        row.pop("modality_weight_sparsity", None)
        row["budget_rule"] = f"layer_score(lam={lam:g})"
        row["layer_ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        row["utility"] = {k: round(v, 4) for k, v in utility.items()}
        row["utility_seconds"] = round(seconds, 1)
        rows.append(row)
        sys.stdout.write(json.dumps({k: v for k, v in row.items() if k not in ("layer_ratios", "utility")}) + "\n")
        sys.stdout.flush()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["unstructured", "structured"])
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.4, 0.6, 0.8])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--initial-warmup", type=float, default=2.0)
    parser.add_argument("--final-warmup", type=float, default=5.0)
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--iterative-steps", type=int, default=4)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--budgets", action="store_true", help="add the modality-budget comparison")
    parser.add_argument("--budget-sparsity", type=float, default=0.6)
    parser.add_argument("--budget-modes", nargs="+", default=["unstructured"])
    parser.add_argument("--layer-score", action="store_true",
                        help="add per-layer budgets from Score = ID/Comp + lam * Utility (utility on val VQA)")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--single-modality", action="store_true",
                        help="add runs that prune one modality only (vision / fusion / language) at --budget-sparsity")
    parser.add_argument("--heads", action="store_true",
                        help="structured: also prune whole heads (non-GQA: the vision tower) under KeepHeads "
                             "(>= 1 head per attention, head ratio capped at KeepHeads.max_ratio)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense (unpruned, same training) reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.criteria, args.sparsities, args.steps, args.n_eval = ["id_platon", "magnitude"], [0.6], 40, 100
        args.warmup_steps, args.initial_warmup, args.final_warmup, args.delta_t = 4, 1.0, 2.0, 4
    quiet_cpu_setup(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    setup = _setup(args.seed)
    summary = setup["profile"].summary()
    sys.stdout.write("ID per modality: " + ", ".join(f"{m} {s['mean']:.1f}" for m, s in summary.items()) + "\n")
    rows: list[dict[str, Any]] = []
    if not args.no_dense:
        rows.append(run_one(setup, "dense", "none", 0.0, args))
        sys.stdout.write(json.dumps(rows[-1]) + "\n")
    for mode in args.modes:
        for sparsity in args.sparsities:
            for criterion in args.criteria:
                rows.append(run_one(setup, mode, criterion, sparsity, args))
                sys.stdout.write(json.dumps(rows[-1]) + "\n")
                sys.stdout.flush()
    if args.budgets:
        from vlprune.plugins.layer_budget import modality_budgets

        params = {n.removesuffix(".weight"): dict(setup["model"].named_parameters())[n].numel() for n in setup["names"]}
        for rule in ("uniform", "inverse_id"):
            budgets = modality_budgets(setup["profile"], args.budget_sparsity, params=params, rule=rule)
            for mode in args.budget_modes:
                row = run_one(setup, mode, "platon", args.budget_sparsity, args, modality_sparsity=budgets)
                row["budget_rule"] = rule
                rows.append(row)
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
    if args.single_modality:
        present = sorted(set(setup["modality_of"].values()))
        for only in present:
            budgets = {m: (args.budget_sparsity if m == only else 0.0) for m in present}
            for mode in args.budget_modes:
                row = run_one(setup, mode, "platon", args.budget_sparsity, args, modality_sparsity=budgets)
                row["budget_rule"] = f"only_{only}"
                rows.append(row)
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
    if args.layer_score:
        rows.extend(_layer_score_rows(setup, args))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args), "id_summary": summary, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
