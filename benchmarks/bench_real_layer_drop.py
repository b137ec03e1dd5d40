"""Benchmark: which of SmolLM2-135M's 30 decoder layers to drop, per domain (real weights).

Step 6's domain-aware layer ranking re-measured on a real pretrained LM (the testbed's 8-layer
``llava-deep`` could not separate math-aware from general-aware ranking: both picked the same
layers). For each budget ``k`` (default 2, 4, 6, 9, 12, 14; first and last layer protected, so 28
removable), every ranking picks ``k`` layers, :func:`vlprune.remove_layers` drops them from a copy
of the model, and the copy is scored without any heal:

* perplexity on **math** and **general** text (:func:`vlprune.testbed.real_tasks.smollm2_texts`,
  template passages of this project, evaluation seed 0; calibration uses other passages, seed 1);
* with ``--exact-match``: greedy exact match on 25 arithmetic and 25 factual chat prompts
  (:func:`~vlprune.testbed.real_tasks.smollm2_exact_match`).

Rankings (scores from one pass per domain over the calibration passages,
:mod:`vlprune.plugins.layer_similarity`):

* ``math`` / ``general``: domain-aware activation similarity, top k of that domain's
  cos(input, output) (Khaki et al., most faithful reading, METHODS.md section 4);
* ``mixed``: 0.5 math + 0.5 general, top k (``rank``);
* ``block_influence``: ShortGPT, the k lowest ``1 - cos`` over all tokens of both domains;
* ``angular``: Gromov et al., the run of k consecutive layers with the smallest last-token angular
  distance between its input and output (one pass, :func:`~vlprune.plugins.layer_similarity.angular_distance_matrix`);
* ``spacing``: the mixed scores, no two removed layers adjacent, gaps even
  (``select_layers(strategy="spacing")``);
* ``random``: k layers drawn uniformly from the removable ones (seed 0), a floor.

``regime`` (``select_layers(strategy="regime")``, rank up to ``DEFAULT_REGIME_SWITCH`` = 1/3 of the
removable layers, spacing above) is ``mixed`` at ``k <= 9`` and ``spacing`` above; the JSON states
which budget each of rank / spacing wins. Configurations choosing the same layer set are evaluated
once.

    .venv/bin/python benchmarks/bench_real_layer_drop.py            # full run (see docs for the time)
    .venv/bin/python benchmarks/bench_real_layer_drop.py --quick    # 4 budgets, fewer texts, no exact match

Writes docs/benchmarks_real_layer_drop.json and docs/benchmarks_real_layer_drop.png (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup, redraw, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANKINGS = ("math", "general", "mixed", "block_influence", "angular", "spacing", "random")
DOMAINS = ("math", "general")


def calibration_batches(tokenizer: Any, n_texts: int, batch_size: int, seed: int = 1) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per domain, tokenised template passages (right-padded, with ``attention_mask``)."""
    from vlprune.testbed.real_tasks import smollm2_texts

    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for domain in DOMAINS:
        texts = smollm2_texts(domain, n_texts, seed=seed)  # type: ignore[arg-type]
        out[domain] = [
            dict(tokenizer(texts[s : s + batch_size], return_tensors="pt", padding=True, add_special_tokens=False))
            for s in range(0, len(texts), batch_size)
        ]
    return out


def layer_scores(model: torch.nn.Module, calib: dict[str, list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Per-layer scores of every ranking: ``math`` / ``general`` similarity, ``block_influence`` and
    the angular-distance matrix (``angular_matrix``, boundaries x boundaries)."""
    from vlprune.plugins import layer_similarity as ls

    scores = dict(ls.domain_similarity(model, calib, progress=False))
    # ShortGPT's BI over both domains' tokens is 1 - the token-weighted mean of the two domains'
    # similarities: derived here instead of a third pass (the test checks it equals ls.block_influence)
    tokens = {d: float(sum(b["attention_mask"].sum() for b in calib[d])) for d in DOMAINS}
    scores["block_influence"] = 1 - sum(tokens[d] * scores[d] for d in DOMAINS) / sum(tokens.values())
    scores["angular_matrix"] = ls.angular_distance_matrix(model, calib["math"] + calib["general"], progress=False)
    return scores


def choose(name: str, k: int, scores: dict[str, torch.Tensor], n_layers: int, seed: int = 0) -> list[int]:
    """The ``k`` layers ranking ``name`` removes (first and last layer protected)."""
    from vlprune.plugins import layer_similarity as ls

    mixed = ls.combine_domains({d: scores[d] for d in DOMAINS}, "mixed", alpha=0.5)
    if name in DOMAINS:
        return ls.select_layers(scores[name], k, strategy="rank")
    if name == "mixed":
        return ls.select_layers(mixed, k, strategy="rank")
    if name == "block_influence":
        return ls.select_layers(scores["block_influence"], k, strategy="rank", higher_is_removable=False)
    if name == "angular":
        matrix = scores["angular_matrix"]
        runs = torch.stack([matrix[i, i + k] for i in range(n_layers - k + 1)])
        return ls.select_run(runs, k)
    if name in ("spacing", "regime"):  # refused (VLPruneError) where no spread-out set can be searched
        return ls.select_layers(mixed, k, strategy=name)
    if name == "random":
        return sorted(random.Random(seed).sample(range(1, n_layers - 1), k))
    raise ValueError(f"unknown ranking {name!r}")


def evaluate(model: torch.nn.Module, tokenizer: Any, n_texts: int, exact_match: bool,
             perplexity: bool = True) -> dict[str, float]:
    """Perplexity on math / general passages (eval seed 0) and / or greedy exact match on the
    arithmetic and factual prompts."""
    from vlprune.testbed import real_tasks as rt

    out: dict[str, float] = {}
    if perplexity:
        for d in DOMAINS:
            out[f"ppl_{d}"] = rt.smollm2_perplexity(model, d, n_texts=n_texts, seed=0, tokenizer=tokenizer)  # type: ignore[arg-type]
    if exact_match:
        for kind in ("arithmetic", "factual"):
            out[f"em_{kind}"] = rt.smollm2_exact_match(model, kind, tokenizer=tokenizer)  # type: ignore[arg-type]
    return {k: round(float(v), 4) for k, v in out.items()}


def pruned_copy(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy of ``model`` with decoder ``layers`` removed (:func:`vlprune.remove_layers`)."""
    import vlprune

    student = copy.deepcopy(model)
    vlprune.remove_layers(student, layers)
    return student


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vlprune.errors import VLPruneError
    from vlprune.plugins.layer_selection import DEFAULT_REGIME_SWITCH
    from vlprune.testbed import real
    from vlprune.testbed import real_tasks as rt

    start_all = time.perf_counter()
    model, tok = real.load("smollm2"), real.processor("smollm2")
    n_layers = len(model.model.layers)
    calib = calibration_batches(tok, args.n_calib, args.calib_batch)
    start = time.perf_counter()
    scores = layer_scores(model, calib)
    scores_s = time.perf_counter() - start
    start = time.perf_counter()
    dense = evaluate(model, tok, args.n_eval, args.exact_match)
    dense_s = time.perf_counter() - start
    shuffled = {d: round(rt.smollm2_perplexity(model, d, n_texts=args.n_eval, seed=0, tokenizer=tok,  # type: ignore[arg-type]
                                               shuffle_tokens=True), 2) for d in DOMAINS}
    print(f"smollm2: {n_layers} layers; dense {dense}; shuffled-token ppl {shuffled}; scores {scores_s:.1f} s, "
          f"one evaluation {dense_s:.1f} s", flush=True)
    for d in (*DOMAINS, "block_influence"):
        print(f"  {d:16s}", " ".join(f"{v:.3f}" for v in scores[d].tolist()), flush=True)

    cache: dict[tuple[int, ...], dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for k in args.budgets:
        for name in args.rankings:
            try:
                layers = choose(name, k, scores, n_layers)
            except VLPruneError as err:  # spacing beyond k = 14 of 28: too many candidate sets
                rows.append({"k": k, "ranking": name, "refused": str(err)})
                print(f"k={k} {name}: refused ({err})", flush=True)
                continue
            key = tuple(layers)
            em = args.exact_match and k in args.em_budgets and name in args.em_rankings
            fresh, em = key not in cache, em and "em_arithmetic" not in cache.get(key, {})
            if fresh or em:
                student = pruned_copy(model, layers)
                assert len(student.model.layers) == n_layers - k
                cache.setdefault(key, {}).update(evaluate(student, tok, args.n_eval, em, perplexity=fresh))
                del student
            row = {"k": k, "ranking": name, "layers": layers, **cache[key]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    m = n_layers - 2
    return {
        "model": "smollm2 (SmolLM2-135M-Instruct, real weights)", "n_layers": n_layers, "removable": m,
        "dense": dense, "shuffled_token_ppl": shuffled,
        "n_calib": args.n_calib, "n_eval": args.n_eval, "exact_match": args.exact_match,
        "scores": {k: v.tolist() for k, v in scores.items() if k != "angular_matrix"},
        "angular_single": [float(scores["angular_matrix"][i, i + 1]) for i in range(n_layers)],
        "overlap": overlap(rows), "regime": regime_summary(rows, dense, m, DEFAULT_REGIME_SWITCH),
        "rows": rows, "scores_seconds": round(scores_s, 1), "evaluation_seconds": round(dense_s, 1),
        "distinct_evaluations": len(cache), "seconds": round(time.perf_counter() - start_all, 1),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args),
    }


def _scored(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "refused" not in r]


def retention(row: dict[str, Any], dense: dict[str, float], key: str) -> float:
    """Perplexity retention ``dense / pruned`` (1 = unchanged); exact match ``pruned / dense``."""
    if key.startswith("ppl_"):
        return dense[key] / row[key]
    return row[key] / dense[key] if dense[key] else float("nan")


def overlap(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per budget, how many layers math-aware and general-aware ranking share (and each with BI)."""
    by = {(r["ranking"], r["k"]): set(r["layers"]) for r in _scored(rows)}
    out: dict[str, dict[str, int]] = {}
    for k in sorted({r["k"] for r in rows}):
        pairs = {"math&general": ("math", "general"), "math&block_influence": ("math", "block_influence"),
                 "general&block_influence": ("general", "block_influence")}
        out[str(k)] = {name: len(by[(a, k)] & by[(b, k)]) for name, (a, b) in pairs.items()
                       if (a, k) in by and (b, k) in by}
    return out


def regime_summary(rows: list[dict[str, Any]], dense: dict[str, float], m: int, switch: float) -> dict[str, Any]:
    """Per budget: summed math + general perplexity retention of ``rank`` (mixed) vs ``spacing``,
    the winner, and what ``strategy="regime"`` with the default switch would pick."""
    by = {(r["ranking"], r["k"]): r for r in _scored(rows)}
    per_k = {}
    for k in sorted({r["k"] for r in rows}):
        if ("mixed", k) not in by or ("spacing", k) not in by:
            continue
        rank = sum(retention(by[("mixed", k)], dense, f"ppl_{d}") for d in DOMAINS)
        space = sum(retention(by[("spacing", k)], dense, f"ppl_{d}") for d in DOMAINS)
        per_k[str(k)] = {"rank": round(rank, 4), "spacing": round(space, 4),
                         "winner": "rank" if rank >= space else "spacing",
                         "regime_default_picks": "rank" if k <= math.floor(switch * m) else "spacing"}
    return {"switch_fraction": switch, "switch_k": math.floor(switch * m), "per_k": per_k}


def table(result: dict[str, Any]) -> str:
    """Markdown tables: perplexity (and exact match) per ranking and budget."""
    rows = _scored(result["rows"])
    rankings = [r for r in (*RANKINGS, "regime") if any(x["ranking"] == r for x in rows)]
    ks = sorted({r["k"] for r in rows})
    by = {(r["ranking"], r["k"]): r for r in rows}
    keys = ["ppl_math", "ppl_general"] + (["em_arithmetic", "em_factual"] if result["exact_match"] else [])
    out = []
    for key in keys:
        out.append(f"{key} (dense {result['dense'][key]})\n")
        out.append("| ranking | " + " | ".join(f"k={k}" for k in ks) + " |")
        out.append("|---|" + "---|" * len(ks))
        for name in rankings:
            cells = [f"{by[(name, k)][key]:.4g}" if key in by.get((name, k), {}) else "" for k in ks]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("| k | " + " | ".join(rankings) + " |")
    out.append("|---|" + "---|" * len(rankings))
    for k in ks:
        out.append(f"| {k} | " + " | ".join(" ".join(map(str, by[(n, k)]["layers"])) if (n, k) in by else "refused"
                                             for n in rankings) + " |")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, dense = _scored(result["rows"]), result["dense"]
    keys = [("ppl_math", "math perplexity"), ("ppl_general", "general perplexity")]
    if result["exact_match"]:
        keys += [("em_arithmetic", "arithmetic exact match"), ("em_factual", "factual exact match")]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.9 * (len(keys) + 1), 3.6))
    rankings = [r for r in (*RANKINGS, "regime") if any(x["ranking"] == r for x in rows)]
    by = {(r["ranking"], r["k"]): r for r in rows}
    for ax, (key, title) in zip(axes, keys):
        for name in rankings:
            ks = sorted(k for (n, k) in by if n == name and key in by[(n, k)])
            if ks:
                ax.plot(ks, [by[(name, k)][key] for k in ks], marker="o", ms=3, label=name)
        ax.axhline(dense[key], color="k", lw=0.8, ls="--")
        if key.startswith("ppl_"):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decoder layers removed (of 30)")
        ax.grid(alpha=0.3)
    ax = axes[-1]  # the math-vs-general question: log ppl increase on math minus on general
    for name in rankings:
        ks = sorted(k for (n, k) in by if n == name)
        gap = [math.log(by[(name, k)]["ppl_math"] / dense["ppl_math"]) - math.log(by[(name, k)]["ppl_general"] / dense["ppl_general"])
               for k in ks]
        ax.plot(ks, gap, marker="o", ms=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title("log-ppl rise: math minus general\n(< 0: math kept better)", fontsize=9)
    ax.set_xlabel("decoder layers removed (of 30)")
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M (real weights): drop k decoder layers, no heal; {result['seconds']:.0f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=int, default=[2, 4, 6, 9, 12, 14])
    parser.add_argument("--rankings", nargs="+", default=list(RANKINGS), choices=[*RANKINGS, "regime"])
    parser.add_argument("--n-calib", type=int, default=16, help="calibration passages per domain (seed 1)")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--n-eval", type=int, default=8, help="evaluation passages per domain (seed 0)")
    parser.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=True,
                        help="also greedy exact match on 25 arithmetic + 25 factual prompts (dense, --em-budgets x --em-rankings)")
    parser.add_argument("--em-budgets", nargs="*", type=int, default=[2, 4])
    parser.add_argument("--em-rankings", nargs="*", default=["math", "general"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: the cores are shared)")
    parser.add_argument("--quick", action="store_true", help="budgets 2 6 9 14, 6 + 6 passages, no exact match")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_real_layer_drop.json"))
    parser.add_argument("--table", action="store_true", help="print the tables / redraw the plot of --out and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        return redraw(out, table, plot)
    if args.quick:
        args.budgets, args.n_calib, args.n_eval, args.exact_match = [2, 6, 9, 14], 6, 6, False
    quiet_cpu_setup(args.threads)
    torch.manual_seed(0)
    result = run(args)
    save(out, result, table, plot)
    print(json.dumps(result["regime"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
