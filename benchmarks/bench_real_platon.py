"""Benchmark: ID-PLATON vs PLATON vs magnitude vs Taylor on real DINOv2-S and SmolLM2, structured.

The testbed found no gain from ID weighting (docs/benchmarks.md, "PLATON, ID-PLATON and baselines");
this re-measures the ID-pruning paper's claim on real pretrained weights (issue 15, part 4).

What is pruned: **MLP hidden neurons only** (DINOv2: fc1 rows + fc2 columns; SmolLM2: gate/up rows +
down columns), through Torch-Pruning ``BasePruner`` with :func:`vlprune.adapters.torch_pruning.hf_pruner_kwargs`
(``prune_heads=False``), one global ranking over all layers, on PLATON's cubic schedule
(``iterative_steps`` pruning steps while training, :class:`vlprune.recipes.finetune.StructuredPruning`).
Sparsity = fraction of all MLP neurons removed. SmolLM2's attention is GQA (9 query / 3 key-value
heads), whose heads the adapter does not prune; DINOv2's heads are left alone too, so both models
are pruned the same way.

Criteria: ``platon`` (:class:`~vlprune.adapters.torch_pruning.PlatonImportance`, beta1 0.85, beta2
0.95), ``id_platon`` (the same times the raw ID of the group's layers,
:class:`~vlprune.adapters.torch_pruning.IDWeightedImportance`, mean over fc1/fc2 or gate/up/down),
``magnitude`` (``tp.importance.GroupMagnitudeImportance``), ``taylor``
(``tp.importance.GroupTaylorImportance``, the gradient of the step's batch). Every run starts from
the unpruned model and trains on the same batches (same seed), so only the criterion differs; a
``dense`` run (same training, nothing pruned) is the reference.

Training objectives (gradient steps that PLATON and Taylor need; AdamW, warm-up + cosine):

* **DINOv2** (label-light): ``CE(probe(CLS)) + MSE(tokens) / Var(teacher tokens)``: a frozen linear
  probe (scikit-learn ``LogisticRegression`` fitted once on the unpruned model's final CLS features
  of the training digits) plus feature distillation of all output tokens to the unpruned model
  (teacher outputs computed once). The probe term makes the gradient non-zero at the unpruned
  model, where distillation alone has none. Training digits: the testbed's MNIST train pool
  (seed ``seed + 1``); evaluation: :func:`vlprune.testbed.real_tasks.dinov2_knn` (MNIST, 300 train /
  200 test from the test pool, k = 5, CLS, 112 px) k-NN and linear-probe accuracy.
  **By default the learning rate is 0**: the steps feed PLATON's and Taylor's sensitivities and the
  pruning schedule, but the weights are not updated (no recovery; :func:`gradient_steps`: only
  the MLP weights get gradients, the same gradients ``train_loop(lr=0)`` would give them).
  Measured here: AdamW on this objective with batches of 8 to 16 moves the unpruned DINOv2 away from itself (normalised loss
  0.015 -> 0.04 in 8 steps at lr 1e-6, -> 1.9 at 1e-5, -> 23 at 5e-5): at the unpruned model the
  gradient is tiny and Adam's per-coordinate normalisation turns it into full-size noisy steps,
  which DINOv2's large layer scales (up to 11) amplify.
* **SmolLM2**: next-token loss on template passages (math and general alternating,
  :func:`vlprune.testbed.real_tasks.smollm2_texts` seeds >= 1000, first ``--seq-len`` tokens); the
  token embedding (tied to ``lm_head``) is frozen. Evaluation:
  :func:`vlprune.testbed.real_tasks.smollm2_perplexity` on math and general passages (seed 0, 16
  each). The evaluation passages come from the same templates as the training passages, so training
  lowers perplexity for every run: compare criteria with each other and with ``dense``.

IDs for ``id_platon``: TwoNN on flattened outputs of the MLP linears
(:func:`bench_real_id_profile.id_profile`), read from ``--ids-json`` (the ID-profile benchmark's
output, default ``docs/benchmarks_real_id_profile.json`` when it has them) or estimated here on
``--id-samples`` samples.

    .venv/bin/python benchmarks/bench_real_platon.py                  # both models, 40% and 60%
    .venv/bin/python benchmarks/bench_real_platon.py --models smollm2 --ids-json '' --out s.json   # one model
    .venv/bin/python benchmarks/bench_real_platon.py --quick          # 2 criteria, 60%, 8 steps, small eval
    .venv/bin/python benchmarks/bench_real_platon.py --models smollm2 --one-shot-widths 0.4 --steps 4 \
        --criteria platon id_platon magnitude taylor --out w.json    # where each criterion cuts (diagnostic)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from _common import quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path
from bench_real_id_profile import DOCS, MLP_LINEARS, dinov2_batches, id_profile, smollm2_token_ids

CRITERIA = ("id_platon", "platon", "magnitude", "taylor")
MODELS = ("dinov2-s", "smollm2")


# ---------------------------------------------------------------------------------------- set-up
def mlp_neurons(model: torch.nn.Module) -> int:
    """Total MLP hidden neurons (fc1 / up_proj output features) of a transformers model."""
    from vlprune.adapters.hf.families import describe

    modules = dict(model.named_modules())
    return sum(modules[m.up].out_features for m in describe(model).mlps)


def mlp_widths(model: torch.nn.Module) -> list[int]:
    """MLP hidden width of every layer, in depth order."""
    from vlprune.adapters.hf.families import describe

    modules = dict(model.named_modules())
    return [modules[m.up].out_features for m in describe(model).mlps]


def _prefix(name: str) -> str:
    return "model." if name == "smollm2" else ""


def _ids_from_json(name: str, path: Path) -> dict[str, float] | None:
    """MLP-linear IDs of ``name`` from the ID-profile benchmark's JSON, or None if absent."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text()).get("models", {}).get(name, {}).get("modules", {})
    ids = {k: v["id"] for k, v in data.items() if k.endswith(MLP_LINEARS[name])}
    layers = 12 if name == "dinov2-s" else 30
    return ids if len(ids) == layers * len(MLP_LINEARS[name]) else None


def setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Model, IDs, training batches, loss and example input of one real model."""
    from vlprune.testbed import real

    start = time.perf_counter()
    model = real.load(name)
    ids, source = None, None
    if args.ids_json and "id_platon" in args.criteria:
        ids = _ids_from_json(name, Path(args.ids_json))
        source = args.ids_json if ids is not None else None
    if ids is None and any(c.startswith("id_") for c in args.criteria):
        profile = id_profile(name, model, n_samples=args.id_samples, which="mlp", image_size=args.image_size,
                             seq_len=min(args.seq_len, 32), seed=args.seed)
        ids = profile.ids()
        source = f"estimated here: {args.id_samples} samples, flatten"
    ids = {_prefix(name) + k: v for k, v in (ids or {}).items()}
    out = {"name": name, "model": model, "ids": ids, "id_source": source}
    out.update(_dinov2_training(model, args) if name == "dinov2-s" else _smollm2_training(model, args))
    out["neurons"] = mlp_neurons(model)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["setup_seconds"] = round(time.perf_counter() - start, 1)
    return out


def _dinov2_training(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    from vlprune.testbed import real_tasks

    n = args.steps * args.batch_size
    labels = torch.as_tensor(real_tasks.dinov2_digit_data("mnist", n_train=n, n_test=1, seed=args.seed + 1)[1])
    pixels = torch.cat([b["pixel_values"] for b in dinov2_batches(n, args.image_size, 64, args.seed + 1)])
    with torch.no_grad():
        teacher = torch.cat([model(pixel_values=pixels[s : s + 64]).last_hidden_state for s in range(0, n, 64)])
    cls = teacher[:, 0].numpy()
    mean, std = cls.mean(0), cls.std(0) + 1e-6
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((cls - mean) / std, labels.numpy())
    head = torch.nn.Linear(cls.shape[1], len(clf.classes_))
    with torch.no_grad():  # the probe on standardised features, folded into one frozen linear map
        w = torch.as_tensor(clf.coef_, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32)
        head.weight.copy_(w)
        head.bias.copy_(torch.as_tensor(clf.intercept_, dtype=torch.float32) - w @ torch.as_tensor(mean, dtype=torch.float32))
    head.requires_grad_(False)
    scale = float(teacher.var())

    def batches(step: int) -> dict[str, torch.Tensor]:
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        return {"pixel_values": pixels[sl], "teacher": teacher[sl], "labels": labels[sl]}

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(pixel_values=batch["pixel_values"]).last_hidden_state
        return F.cross_entropy(head(out[:, 0]), batch["labels"]) + F.mse_loss(out, batch["teacher"]) / scale

    return {"batches": batches, "loss_fn": loss_fn, "example": {"pixel_values": pixels[:1]}, "trainable": None}


def _smollm2_training(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    ids = smollm2_token_ids(args.steps * args.batch_size, args.seq_len, seed=1000 + args.seed)

    def batches(step: int) -> dict[str, torch.Tensor]:
        x = ids[step * args.batch_size : (step + 1) * args.batch_size]
        return {"input_ids": x, "labels": x}

    def loss_fn(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return m(**batch).loss

    return {"batches": batches, "loss_fn": loss_fn, "example": {"input_ids": ids[:1, :16]},
            "trainable": "model.embed_tokens (tied lm_head) frozen"}


# ------------------------------------------------------------------------------------- one run
def evaluate(name: str, model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """DINOv2: k-NN / linear-probe accuracy on MNIST; SmolLM2: math / general perplexity."""
    from vlprune.testbed import real_tasks

    if name == "dinov2-s":
        out = real_tasks.dinov2_knn(model, dataset="mnist", n_train=args.knn_train, n_test=args.knn_test, k=5,
                                    image_size=args.image_size, seed=args.seed)
        return {"knn": round(out["knn"], 4), "linear_probe": round(out.get("linear_probe", float("nan")), 4)}
    return {d: round(real_tasks.smollm2_perplexity(model, d, n_texts=args.ppl_texts), 3) for d in ("math", "general")}


def make_importance(criterion: str, ids: dict[str, float], delta_t: int) -> Any:
    """The Torch-Pruning importance of ``criterion`` (``id_`` prefix: times the layer ID)."""
    import torch_pruning as tp

    from vlprune.adapters.torch_pruning import IDWeightedImportance, PlatonImportance

    base_name = criterion.removeprefix("id_")
    base = {
        "platon": lambda: PlatonImportance(delta_t=delta_t),
        "magnitude": lambda: tp.importance.GroupMagnitudeImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }[base_name]()
    return IDWeightedImportance(base, ids) if criterion.startswith("id_") else base


def gradient_steps(model: torch.nn.Module, batches: Any, steps: int, loss_fn: Any, callbacks: list[Any]) -> dict[str, Any]:
    """``steps`` backward passes that feed the pruning callbacks, without weight updates (learning
    rate 0). What :func:`vlprune.recipes.finetune.train_loop` does at ``lr=0`` (the callbacks see the
    same gradients), without the optimizer: only the MLP weights, the ones the criteria read, get
    gradients, so the other parameters' gradients (and AdamW's no-op update) are not computed."""
    from vlprune.adapters.hf.families import describe

    modules = dict(model.named_modules())
    mlp = {id(p) for m in describe(model).mlps for path in (m.up, m.gate, m.down) if path for p in modules[path].parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in mlp)
    log: dict[str, Any] = {"loss": []}
    model.train()
    for step in range(steps):
        loss = loss_fn(model, batches(step))
        model.zero_grad(set_to_none=True)
        loss.backward()
        for callback in callbacks:
            callback.after_backward(step, model)
        log["loss"].append([step, round(float(loss.detach()), 5)])
    model.zero_grad(set_to_none=True)
    model.eval()
    return log


def run_one(s: dict[str, Any], criterion: str, sparsity: float, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``--steps`` steps from the unpruned model, pruning ``sparsity`` of the MLP neurons with
    ``criterion`` on the cubic schedule (``criterion="none"``: dense reference); evaluate."""
    import torch_pruning as tp

    from vlprune.adapters.hf.surgery import sync_hf_model
    from vlprune.adapters.torch_pruning import cubic_scheduler, hf_pruner_kwargs, pruning_steps
    from vlprune.recipes.finetune import StructuredPruning, train_loop

    torch.manual_seed(args.seed)
    model = copy.deepcopy(s["model"])
    if s["name"] == "smollm2":
        model.model.embed_tokens.weight.requires_grad_(False)
    start = time.perf_counter()
    callbacks = []
    if criterion != "none":
        schedule = dict(warmup_steps=args.warmup_steps, initial_warmup=args.initial_warmup, final_warmup=args.final_warmup)
        pruner = tp.pruner.BasePruner(
            model, s["example"], importance=make_importance(criterion, s["ids"], args.delta_t), pruning_ratio=sparsity,
            iterative_steps=args.iterative_steps, iterative_pruning_ratio_scheduler=cubic_scheduler, global_pruning=True,
            **hf_pruner_kwargs(model, prune_heads=False),
        )
        prune_at = pruning_steps(args.steps, args.iterative_steps, **schedule)
        callbacks.append(StructuredPruning(pruner, prune_at, after_prune=lambda m: sync_hf_model(m, pruned="heads")))
    if criterion == "none" and args.lr == 0:
        log = {"loss": [[0, None]]}  # no weight updates and nothing pruned: the unpruned model
    elif args.lr == 0:
        log = gradient_steps(model, s["batches"], args.steps, s["loss_fn"], callbacks)
    else:
        log = train_loop(model, s["batches"], args.steps, lr=args.lr, warmup=args.warmup_steps, loss_fn=s["loss_fn"],
                         callbacks=callbacks, progress=args.progress)
    train_seconds = time.perf_counter() - start
    metrics = evaluate(s["name"], model, args)
    return {
        "model": s["name"], "criterion": criterion, "sparsity": sparsity, **metrics,
        "neurons_removed": round(1 - mlp_neurons(model) / s["neurons"], 4), "mlp_widths": mlp_widths(model),
        "params_ratio": round(sum(p.numel() for p in model.parameters()) / s["params"], 4),
        "first_loss": log["loss"][0][1], "final_loss": log["loss"][-1][1],
        "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
    }


def one_shot_widths(s: dict[str, Any], criteria: list[str], sparsity: float, args: argparse.Namespace) -> dict[str, Any]:
    """Where each criterion cuts: every layer's MLP width after one global Torch-Pruning step to
    ``sparsity`` on the unpruned model, after ``args.steps`` backward passes without weight updates
    (the gradients PLATON accumulates and Taylor reads). A diagnostic of the ranking alone: no
    cubic schedule, no training, no evaluation."""
    import torch_pruning as tp

    from vlprune.adapters.torch_pruning import PlatonImportance, hf_pruner_kwargs

    out: dict[str, Any] = {"sparsity": sparsity, "steps": args.steps}
    for criterion in criteria:
        model = copy.deepcopy(s["model"])
        imp = make_importance(criterion, s["ids"], args.delta_t)
        platon = imp if isinstance(imp, PlatonImportance) else getattr(imp, "base", None)
        callbacks = [type("U", (), {"after_backward": staticmethod(lambda step, m: platon.update(m))})()] if isinstance(
            platon, PlatonImportance) else []
        if callbacks:
            gradient_steps(model, s["batches"], args.steps, s["loss_fn"], callbacks)
        if criterion.removeprefix("id_") == "taylor":  # Taylor reads the last batch's gradient
            s["loss_fn"](model, s["batches"](args.steps - 1)).backward()
        pruner = tp.pruner.BasePruner(model, s["example"], importance=imp, pruning_ratio=sparsity, global_pruning=True,
                                      **hf_pruner_kwargs(model, prune_heads=False))
        if isinstance(platon, PlatonImportance):
            platon.step(pruner)
        else:
            pruner.step()
        out[criterion] = mlp_widths(model)
        sys.stdout.write(f"one-shot {criterion} @ {sparsity:g}: {out[criterion]}\n")
        sys.stdout.flush()
    return out


# ------------------------------------------------------------------------------------- report
def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and sparsity: the best criterion and ID-PLATON minus PLATON (positive = ID helps)."""
    out: dict[str, Any] = {}
    for row in rows:
        if row["criterion"] == "none":
            continue
        key = f"{row['model']}@{row['sparsity']:g}"
        metric = row.get("knn")
        better_high = metric is not None
        if metric is None:
            metric = (np.log(row["math"]) + np.log(row["general"])) / 2  # mean log-perplexity
        out.setdefault(key, {})[row["criterion"]] = float(metric)
    summary = {}
    for key, scores in out.items():
        high = key.startswith("dinov2")
        best = (max if high else min)(scores, key=scores.get)
        entry: dict[str, Any] = {"best": best, "metric": "knn" if high else "mean log-perplexity (math, general)"}
        if "id_platon" in scores and "platon" in scores:
            diff = scores["id_platon"] - scores["platon"]
            entry["id_platon_minus_platon"] = round(diff if high else -diff, 4)  # > 0: ID weighting helped
        summary[key] = entry
    return summary


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per sparsity and criterion: DINOv2 k-NN accuracy, SmolLM2 perplexity (log scale,
    math and general); the dense reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("dinov2-s", "knn", "k-NN accuracy (MNIST)", False), ("smollm2", "math", "math perplexity", True),
              ("smollm2", "general", "general perplexity", True)]
    panels = [x for x in panels if any(r["model"] == x[0] for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (model, metric, label, log) in zip(axes[0], panels):
        mine = [r for r in rows if r["model"] == model]
        criteria = [c for c in dict.fromkeys(r["criterion"] for r in mine) if c != "none"]
        sparsities = sorted({r["sparsity"] for r in mine if r["criterion"] != "none"})
        width = 0.8 / max(len(criteria), 1)
        for i, crit in enumerate(criteria):
            vals = [next((r[metric] for r in mine if r["criterion"] == crit and r["sparsity"] == sp), np.nan) for sp in sparsities]
            ax.bar(np.arange(len(sparsities)) + (i - (len(criteria) - 1) / 2) * width, vals, width, label=crit)
        for r in mine:
            if r["criterion"] == "none":
                ax.axhline(r[metric], ls="--", color="black", lw=1, label="dense")
        ax.set_xticks(range(len(sparsities)), [f"{sp:.0%} of MLP neurons" for sp in sparsities])
        ax.set_title(f"{model}: {label}")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: DINOv2 24, SmolLM2 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: DINOv2 8 images, SmolLM2 4 passages")
    parser.add_argument("--lr", type=float, default=None, help="default: DINOv2 0 (no weight updates, see above), SmolLM2 3e-5")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--initial-warmup", type=float, default=1.0)
    parser.add_argument("--final-warmup", type=float, default=2.0)
    parser.add_argument("--delta-t", type=int, default=2)
    parser.add_argument("--iterative-steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--knn-train", type=int, default=300)
    parser.add_argument("--knn-test", type=int, default=200)
    parser.add_argument("--ppl-texts", type=int, default=16)
    parser.add_argument("--ids-json", default=str(DOCS / "benchmarks_real_id_profile.json"))
    parser.add_argument("--id-samples", type=int, default=256)
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--one-shot-widths", type=float, default=None, metavar="SPARSITY",
                        help="only the diagnostic: per-layer MLP widths after one global pruning step (no runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", default=None, help="PNG path (default docs/benchmarks_real_platon.png; --quick: none)")
    parser.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot from a result JSON")
    parser.add_argument("--out", default=None, help="JSON path (default docs/benchmarks_real_platon.json; --quick: none)")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text())["rows"], Path(args.plot or DOCS / "benchmarks_real_platon.png"))
        return 0
    if args.quick:
        args.criteria, args.sparsities, args.knn_train, args.knn_test, args.ppl_texts = ["id_platon", "magnitude"], [0.6], 200, 100, 8
        args.steps = args.steps or 8
        args.warmup_steps, args.final_warmup, args.delta_t, args.iterative_steps = 2, 1.0, 2, 2
    elif args.out is None:
        args.out = str(DOCS / "benchmarks_real_platon.json")
        args.plot = args.plot or str(DOCS / "benchmarks_real_platon.png")
    quiet_cpu_setup(args.threads)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for name in args.models:
        margs = argparse.Namespace(**vars(args))
        margs.steps = args.steps or (24 if name == "dinov2-s" else 16)
        margs.batch_size = args.batch_size or (8 if name == "dinov2-s" else 4)
        margs.lr = args.lr if args.lr is not None else (0.0 if name == "dinov2-s" else 3e-5)
        s = setup(name, margs)
        settings[name] = {"steps": margs.steps, "batch_size": margs.batch_size, "lr": margs.lr, "id_source": s["id_source"],
                          "trainable": s["trainable"], "setup_seconds": s["setup_seconds"],
                          "ids": {k: round(v, 3) for k, v in s["ids"].items()}}
        sys.stdout.write(f"{name}: set-up {s['setup_seconds']} s, IDs from {s['id_source']}\n")
        if args.one_shot_widths is not None:
            settings[name]["one_shot_widths"] = one_shot_widths(s, args.criteria, args.one_shot_widths, margs)
            continue
        runs = ([] if args.no_dense else [("none", 0.0)]) + [(c, sp) for sp in args.sparsities for c in args.criteria]
        for criterion, sparsity in runs:
            rows.append(run_one(s, criterion, sparsity, margs))
            sys.stdout.write(json.dumps(rows[-1]) + "\n")
            sys.stdout.flush()
        del s
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args), "settings": settings, "rows": rows, "verdict": verdict(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    sys.stdout.write(json.dumps(result["verdict"]) + f"\nwall time {result['seconds']} s\n")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot and rows:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
