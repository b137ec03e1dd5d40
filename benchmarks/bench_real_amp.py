"""Benchmark: AMP (entropy importance + adaptive MLP widths) on real DINOv2 ViT-S/14, before and
after a short distillation, against uniform widths with the same MLP parameter count.

The AMP paper prunes CLIP / EVA / DINOv2-family ViTs; here the real DINOv2-S weights
(:func:`vlprune.testbed.real.load` ``("dinov2-s")``, 12 layers, MLP 384 -> 1536 -> 384) stand in.
Everything runs at ``--image-size`` (default 84 px = 6x6 patches; DINOv2 interpolates its position
grid) to fit 2 shared CPU cores.

Data (no labels are used by AMP or the distillation):

* calibration (importance) and held-out (width search) images: real handwritten MNIST digits of
  the testbed's train pool (:func:`vlprune.testbed.real_tasks.dinov2_digit_data`, seed 1), disjoint
  slices; distillation images: another draw from that pool (seed 2);
* evaluation: k-NN (k = 5, cosine, CLS token) and linear-probe accuracy on scikit-learn's
  ``load_digits`` (:func:`~vlprune.testbed.real_tasks.dinov2_knn`, another dataset altogether).

For each ``--delta-e``:

1. :func:`vlprune.plugins.amp.neuron_importance` (entropy of the CLS-similarity softmax, ``tau``)
   once, then :func:`~vlprune.plugins.amp.search_widths` (rule ``"rise"``, 6 halvings);
2. **amp**: the searched widths, **uniform**: the same total number of hidden neurons spread evenly
   (so the same MLP parameter count: every DINOv2-S MLP neuron carries 2 x 384 + 1 parameters),
   both ranked by the AMP scores and pruned physically by Torch-Pruning
   (:class:`~vlprune.adapters.torch_pruning.AMPEntropyImportance`, widths checked exactly);
3. k-NN / linear probe before and after ``--distill-steps`` steps of
   :func:`vlprune.recipes.distill.distill` from the unpruned model (AMP's recipe: MSE of the CLS
   embedding + MSE of the patch tokens; AdamW, warm-up + cosine).

    .venv/bin/python benchmarks/bench_real_amp.py            # full run (see docs for the time)
    .venv/bin/python benchmarks/bench_real_amp.py --quick    # one delta_e, 10 distillation steps

Writes docs/benchmarks_real_amp.json and docs/benchmarks_real_amp.png (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup, redraw, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: parameters per hidden neuron of a DINOv2-S MLP: a row of fc1 (384 + bias) and a column of fc2
PARAMS_PER_NEURON = 2 * 384 + 1


def digit_pixels(images: np.ndarray, image_size: int) -> torch.Tensor:
    """Grayscale digits ``(n, h, w)`` in [0, 1] -> DINOv2 ``pixel_values`` at ``image_size``."""
    from PIL import Image

    from vlprune.testbed import real

    pils = [Image.fromarray((np.clip(im, 0, 1) * 255).astype(np.uint8), mode="L").convert("RGB") for im in images]
    size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
    return real.processor("dinov2-s")(images=pils, return_tensors="pt", size=size[0], crop_size=size[1])["pixel_values"]


def image_batches(n_calib: int, n_held: int, n_distill: int, batch_size: int, image_size: int,
                  seed: int = 1) -> tuple[list[dict[str, torch.Tensor]], ...]:
    """Calibration, held-out and distillation batches of real MNIST digits (disjoint slices of one
    seeded class-balanced draw from the testbed's train pool; labels dropped)."""
    from vlprune.testbed.real_tasks import dinov2_digit_data

    counts = [n_calib * batch_size, n_held * batch_size, n_distill * batch_size]
    images, _, _, _ = dinov2_digit_data("mnist", n_train=sum(counts), n_test=1, seed=seed)
    images = images[np.random.default_rng(seed).permutation(len(images))]  # mix the classes in every batch
    px = digit_pixels(images, image_size)
    out, start = [], 0
    for count in counts:
        part = px[start : start + count]
        out.append([{"pixel_values": part[i : i + batch_size]} for i in range(0, count, batch_size)])
        start += count
    return tuple(out)


def mlp_params(model: nn.Module) -> int:
    """Parameters of every MLP (``fc1`` + ``fc2``, weights and biases)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".mlp.fc" in n)


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """MLP module name -> hidden neurons (``fc1.out_features``)."""
    return {f"encoder.layer.{i}.mlp": int(layer.mlp.fc1.out_features) for i, layer in enumerate(model.encoder.layer)}


def uniform_widths(widths: dict[str, int]) -> dict[str, int]:
    """The same total number of neurons spread as evenly as possible (earlier layers get the rest)."""
    total, names = sum(widths.values()), list(widths)
    return {n: total // len(names) + (1 if i < total % len(names) else 0) for i, n in enumerate(names)}


def prune_to_widths(model: nn.Module, scores: dict[str, torch.Tensor], widths: dict[str, int],
                    example: torch.Tensor) -> nn.Module:
    """Prune ``model`` in place to ``widths`` with Torch-Pruning, neurons ranked by the AMP
    ``scores`` (exactly the ones the search switched off); widths checked."""
    import torch_pruning as tp

    import vlprune
    from vlprune.adapters.torch_pruning import AMPEntropyImportance, amp_ratio_dict, hf_pruner_kwargs

    tp.pruner.BasePruner(
        model, {"pixel_values": example}, importance=AMPEntropyImportance(scores, model), pruning_ratio=0.0,
        pruning_ratio_dict=amp_ratio_dict(model, widths), global_pruning=False,
        **hf_pruner_kwargs(model, prune_heads=False),
    ).step()
    vlprune.sync_hf_model(model)
    got = mlp_widths(model)
    if got != {n: widths.get(n, w) for n, w in got.items()}:
        raise AssertionError(f"pruned widths {got} differ from the asked {widths}")
    return model


class Evaluator:
    """k-NN (k = 5, cosine) and linear-probe accuracy on scikit-learn digits, as
    :func:`~vlprune.testbed.real_tasks.dinov2_knn` computes them (same split, features, probe), plus
    **feature fidelity**: the mean cosine between a model's CLS features and the unpruned model's on
    the same images (1 = unchanged; the digit accuracies are coarse: see the docs)."""

    def __init__(self, dense: nn.Module, n_train: int, n_test: int, image_size: int) -> None:
        from vlprune.testbed.real_tasks import dinov2_digit_data

        x_tr, self.y_tr, x_te, self.y_te = dinov2_digit_data("digits", n_train, n_test, seed=0)
        self.images = np.concatenate([x_tr, x_te])
        self.n_train, self.image_size = n_train, image_size
        self.reference = self.features(dense)

    def features(self, model: nn.Module) -> torch.Tensor:
        from vlprune.testbed.real_tasks import dinov2_features

        return dinov2_features(model, self.images, "cls", batch_size=100, image_size=self.image_size)

    def __call__(self, model: nn.Module, feats: torch.Tensor | None = None) -> dict[str, float]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from vlprune.testbed.real_tasks import knn_accuracy

        feats = self.features(model) if feats is None else feats
        f_tr, f_te = feats[: self.n_train], feats[self.n_train :]
        out = {"knn": knn_accuracy(f_tr, torch.from_numpy(self.y_tr), f_te, torch.from_numpy(self.y_te), k=5)}
        scaler = StandardScaler().fit(f_tr.numpy())
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(f_tr.numpy()), self.y_tr)
        out["linear_probe"] = float((probe.predict(scaler.transform(f_te.numpy())) == self.y_te).mean())
        out["feature_cos"] = float(torch.nn.functional.cosine_similarity(feats, self.reference, dim=1).mean())
        return {k: round(v, 4) for k, v in out.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vlprune.plugins.amp as amp
    from vlprune.recipes.distill import distill
    from vlprune.testbed import real

    start_all = time.perf_counter()
    base = real.load("dinov2-s")
    calib, held_out, _ = image_batches(args.calib, args.held_out, 0, args.batch_size, args.image_size)
    _, _, train = image_batches(0, 0, args.distill_batches, args.distill_batch_size, args.image_size, seed=2)
    example = held_out[0]["pixel_values"][:2]
    dense_mlp = mlp_params(base)
    dense_params = sum(p.numel() for p in base.parameters())
    start = time.perf_counter()
    scores = amp.neuron_importance(base, calib, tau=args.tau, progress=False)
    importance_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate = Evaluator(base, args.n_train, args.n_test, args.image_size)
    dense = evaluate(base, evaluate.reference)
    eval_s = time.perf_counter() - start
    objective = amp.evaluate_objective(base, held_out, tau=args.tau)
    print(f"dinov2-s dense {dense}; held-out objective {objective:.4f} (max log B = {math.log(args.batch_size):.4f}); "
          f"importance {importance_s:.1f} s, one evaluation {eval_s:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for delta in args.delta_e:
        start = time.perf_counter()
        log: list[dict[str, Any]] = []
        widths = amp.search_widths(base, scores, held_out, delta, tau=args.tau, rule=args.rule, halvings=args.halvings,
                                   progress=False, log=log)
        search_s = time.perf_counter() - start
        for variant, w in (("amp", widths), ("uniform", uniform_widths(widths))):
            model = prune_to_widths(copy.deepcopy(base), scores, w, example)
            row: dict[str, Any] = {
                "delta_e": delta, "variant": variant, "widths": list(mlp_widths(model).values()),
                "mlp_params": mlp_params(model), "mlp_removed": round(1 - mlp_params(model) / dense_mlp, 4),
                "params_ratio": round(sum(p.numel() for p in model.parameters()) / dense_params, 4),
                "search_seconds": round(search_s, 1), "search_evaluations": len(log),
                "objective": round(amp.evaluate_objective(model, held_out, tau=args.tau), 5),
                "before": evaluate(model),
            }
            if args.distill_steps:
                out = distill(model, base, lambda step: train[step % len(train)], args.distill_steps,
                              lr=args.distill_lr, warmup=max(1, args.distill_steps // 10), progress=False)
                row["distill_seconds"] = round(out["seconds"], 1)
                row["after"] = evaluate(model)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
    return {
        "model": "dinov2-s (real DINOv2 ViT-S/14 weights)", "image_size": args.image_size, "tau": args.tau,
        "dense": {**dense, "mlp_params": dense_mlp, "params": dense_params, "objective": round(objective, 5)},
        "rows": rows, "importance_seconds": round(importance_s, 1), "evaluation_seconds": round(eval_s, 1),
        "seconds": round(time.perf_counter() - start_all, 1),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args),
    }


def _metrics(m: dict[str, float]) -> str:
    return " / ".join(f"{m[k]:.3f}" if k in m else "-" for k in ("knn", "linear_probe", "feature_cos"))


def table(result: dict[str, Any]) -> str:
    """Markdown table of the rows."""
    after = any("after" in r for r in result["rows"])
    out = ["| delta_e | variant | widths (layers 0-11 of 1536) | MLP removed | params | k-NN / probe / feature cos before | "
           + ("k-NN / probe / feature cos after |" if after else ""),
           "|---|---|---|---|---|---|" + ("---|" if after else "")]
    for r in result["rows"]:
        cells = [f"{r['delta_e']:g}", r["variant"], "/".join(map(str, r["widths"])), f"{r['mlp_removed']:.2f}",
                 f"{r['params_ratio']:.2f}x", _metrics(r["before"])]
        if after:
            cells.append(_metrics(r["after"]) if "after" in r else "")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = result["rows"], result["dense"]
    metrics = [("knn", "k-NN accuracy (digits)"), ("linear_probe", "linear-probe accuracy (digits)"),
               ("feature_cos", "cosine to the unpruned CLS features")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {("amp", "before"): ("C0", "--", "o"), ("amp", "after"): ("C0", "-", "o"),
              ("uniform", "before"): ("C1", "--", "s"), ("uniform", "after"): ("C1", "-", "s")}
    for ax, (metric, title) in zip(axes, metrics):
        for (variant, when), (color, ls, marker) in styles.items():
            pts = sorted((r["mlp_removed"], r[when][metric]) for r in rows if r["variant"] == variant and when in r
                         and metric in r[when])
            if pts:
                ax.plot(*zip(*pts), color=color, ls=ls, marker=marker, label=f"{variant} widths, {when} distillation")
        if metric in dense:
            ax.axhline(dense[metric], color="k", lw=0.8, ls=":", label="unpruned")
        ax.set_xlabel("fraction of MLP parameters removed")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    steps = result["args"]["distill_steps"]
    fig.suptitle(f"AMP on real DINOv2-S ({result['image_size']} px), {steps} distillation steps; "
                 f"{result['seconds']:.0f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta-e", nargs="+", type=float, default=[1e-2, 3e-2, 1e-1])
    parser.add_argument("--tau", type=float, default=1 / 15)
    parser.add_argument("--rule", choices=["rise", "change"], default="rise")
    parser.add_argument("--halvings", type=int, default=6, help="binary-search steps per layer (official: 6)")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (AMP's B)")
    parser.add_argument("--calib", type=int, default=4, help="calibration batches (importance)")
    parser.add_argument("--held-out", type=int, default=1, help="held-out batches (width search)")
    parser.add_argument("--distill-batches", type=int, default=4, help="distinct distillation batches (cycled)")
    parser.add_argument("--distill-batch-size", type=int, default=16)
    parser.add_argument("--distill-steps", type=int, default=10)
    parser.add_argument("--distill-lr", type=float, default=2e-5)
    parser.add_argument("--n-train", type=int, default=300, help="k-NN / probe training digits")
    parser.add_argument("--n-test", type=int, default=200, help="k-NN / probe test digits")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: the cores are shared)")
    parser.add_argument("--quick", action="store_true", help="one delta_e, 2 + 1 batches, 10 distillation steps")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_real_amp.json"))
    parser.add_argument("--table", action="store_true", help="print the table / redraw the plot of --out and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        return redraw(out, table, plot)
    if args.quick:
        args.delta_e, args.calib, args.held_out, args.distill_batches, args.distill_steps = [3e-2], 2, 1, 2, 3
        args.n_train, args.n_test, args.halvings = 200, 100, 4
    quiet_cpu_setup(args.threads)
    torch.manual_seed(0)
    result = run(args)
    save(out, result, table, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
