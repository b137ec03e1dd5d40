"""Depth pruning on the testbed: which decoder layers to drop, per domain, with and without a heal.

For each budget k = 1 .. n-2 (first and last decoder layer protected), every ranking picks k decoder
layers of the language model, ``vlprune.remove_layers`` drops them from a copy of the model, and
VQA math / general exact match (test split) is measured before and after a short distillation heal
(``vlprune.recipes.distill.distill``, logit KL against the unpruned model, label-free).

Rankings:

* ``math`` / ``general``: domain-aware activation similarity (highest cos(input, output) of a layer
  on that domain's calibration questions goes first), top k;
* ``mixed``: 0.5 math + 0.5 general, top k;
* ``block_influence``: ShortGPT (lowest 1 - similarity on mixed calibration data), top k;
* ``angular``: Gromov et al., the run of k consecutive layers with the smallest angular distance
  between its input and output (last token);
* ``spacing``: the mixed scores, no two removed layers adjacent, gaps even;
* ``consecutive``: the mixed scores, best run of k;
* ``random``: k layers drawn uniformly (seeds 0, 1, 2; mean reported).

    python benchmarks/bench_layer_drop.py                 # the testbed llava-deep (8 layers)
    python benchmarks/bench_layer_drop.py --model llava --heal-steps 0 --n-eval 100   # quick

Writes docs/benchmarks_layer_drop.json and docs/benchmarks_layer_drop.png.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup, redraw, save  # noqa: E402

import vlprune  # noqa: E402
from vlprune.plugins import layer_similarity as ls  # noqa: E402
from vlprune.recipes.distill import distill  # noqa: E402
from vlprune.testbed import batches, evaluate, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANKINGS = ("math", "general", "mixed", "block_influence", "angular", "spacing", "consecutive", "random")


def choose(name: str, k: int, scores: dict[str, torch.Tensor], model: torch.nn.Module,
           calib: list[dict[str, torch.Tensor]], n_layers: int, seed: int = 0) -> list[int]:
    """The k layers ranking ``name`` removes."""
    mixed = 0.5 * scores["math"] + 0.5 * scores["general"]
    if name in ("math", "general"):
        return ls.select_layers(scores[name], k, strategy="rank")
    if name == "mixed":
        return ls.select_layers(mixed, k, strategy="rank")
    if name == "block_influence":
        return ls.select_layers(scores["block_influence"], k, strategy="rank", higher_is_removable=False)
    if name == "angular":
        return ls.select_run(ls.angular_distance(model, calib, n=k, progress=False), k)  # first/last protected
    if name in ("spacing", "consecutive"):
        return ls.select_layers(mixed, k, strategy=name)
    if name == "random":
        return sorted(random.Random(seed).sample(range(1, n_layers - 1), k))
    raise ValueError(name)


def vqa(model: torch.nn.Module, n: int) -> dict[str, float]:
    return evaluate(model, "vqa", n=n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-deep")
    parser.add_argument("--n-calib", type=int, default=128, help="calibration questions per domain (val split)")
    parser.add_argument("--n-eval", type=int, default=200, help="test questions per domain")
    parser.add_argument("--heal-steps", type=int, default=60)
    parser.add_argument("--heal-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rankings", nargs="*", default=list(RANKINGS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_layer_drop.json"))
    parser.add_argument("--table", action="store_true", help="print the tables of an existing --out JSON and stop")
    args = parser.parse_args(argv)
    if args.table:
        return redraw(Path(args.out), table, plot)
    quiet_cpu_setup(args.threads)

    teacher = load(args.model)
    n_layers = len(vlprune.describe_model(teacher).decoder_layers)
    calib = {d: batches(args.model, args.n_calib, 32, task=d, seed=11) for d in ("math", "general")}
    mixed_calib = calib["math"] + calib["general"]

    start = time.perf_counter()
    scores = dict(ls.domain_similarity(teacher, calib, progress=False))
    scores_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for b in mixed_calib:
            teacher(**b)
    forward_s = time.perf_counter() - start
    scores["block_influence"] = ls.block_influence(teacher, mixed_calib, progress=False)
    dense = vqa(teacher, args.n_eval)
    print(f"{args.model}: {n_layers} decoder layers; dense VQA {dense}; scores {scores_s:.2f} s vs forward {forward_s:.2f} s")
    for d in ("math", "general", "block_influence"):
        print(f"  {d:16s}", " ".join(f"{v:.4f}" for v in scores[d].tolist()))

    train = batches(args.model, max(1, args.heal_steps) * args.heal_batch, args.heal_batch, split="train", seed=5)
    rows: list[dict[str, Any]] = []
    for k in range(1, n_layers - 1):
        for name in args.rankings:
            seeds = (0, 1, 2) if name == "random" else (0,)
            for seed in seeds:
                layers = choose(name, k, scores, teacher, mixed_calib, n_layers, seed)
                student = copy.deepcopy(teacher)
                vlprune.remove_layers(student, layers)
                before = vqa(student, args.n_eval)
                row = {"k": k, "ranking": name, "seed": seed, "layers": layers,
                       "math": before["math"], "general": before["general"]}
                if args.heal_steps > 0:
                    distill(student, teacher, lambda step: train[step], args.heal_steps, lr=5e-4,
                            embed_weight=0.0, token_weight=0.0, logit_weight=1.0, progress=False)
                    healed = vqa(student, args.n_eval)
                    row.update(healed_math=healed["math"], healed_general=healed["general"])
                rows.append(row)
                print(f"k={k} {name:16s} seed={seed} layers={layers} math={row['math']:.3f} general={row['general']:.3f}"
                      + (f" healed {row['healed_math']:.3f} / {row['healed_general']:.3f}" if args.heal_steps else ""),
                      flush=True)
    result = {
        "model": args.model, "n_layers": n_layers, "dense": dense, "n_calib": args.n_calib, "n_eval": args.n_eval,
        "heal_steps": args.heal_steps, "scores": {k: v.tolist() for k, v in scores.items()},
        "scores_seconds": scores_s, "forward_seconds": forward_s, "rows": rows,
    }
    out = Path(args.out)
    save(out, result, table, plot)
    return 0


def mean_rows(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, int], float]:
    """Mean of ``key`` per (ranking, k) (random: over its seeds)."""
    acc: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if key in r:
            acc.setdefault((r["ranking"], r["k"]), []).append(r[key])
    return {kk: sum(v) / len(v) for kk, v in acc.items()}


def table(result: dict[str, Any]) -> str:
    """Markdown tables of VQA retention (pruned / dense) per ranking and budget."""
    rankings = sorted({r["ranking"] for r in result["rows"]}, key=RANKINGS.index)
    ks = sorted({r["k"] for r in result["rows"]})
    out = []
    keys = ["math", "general"] + (["healed_math", "healed_general"] if result["heal_steps"] else [])
    for key in keys:
        means = mean_rows(result["rows"], key)
        dense = result["dense"]["math" if "math" in key else "general"]
        out.append(f"{key.replace('_', ' ')} (retention, dense {dense:.3f})\n")
        out.append("| ranking | " + " | ".join(f"k={k}" for k in ks) + " |")
        out.append("|---|" + "---|" * len(ks))
        for name in rankings:
            cells = [f"{means[(name, k)] / dense:.2f}" if (name, k) in means else "" for k in ks]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("math", "math, no heal"), ("general", "general, no heal")]
    if result["heal_steps"]:
        keys += [("healed_math", "math, healed"), ("healed_general", "general, healed")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True)
    rankings = sorted({r["ranking"] for r in result["rows"]}, key=RANKINGS.index)
    for ax, (key, title) in zip(axes, keys):
        means = mean_rows(result["rows"], key)
        dense = result["dense"]["math" if "math" in key else "general"]
        for name in rankings:
            ks = sorted(k for (n, k) in means if n == name)
            ax.plot(ks, [means[(name, k)] / dense for k in ks], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("decoder layers removed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("VQA retention (pruned / dense)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"testbed {result['model']}: {result['n_layers']} decoder layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
