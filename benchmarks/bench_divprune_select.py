"""Benchmark: DivPrune selection speed, running minimum vs the straightforward greedy.

:func:`vlprune.plugins.token_diversity.divprune_select` keeps, for every candidate, its smallest
distance to the selected set and updates it with one row of the distance matrix per step: O(M N)
after the N x N matrix. The straightforward greedy (what the official code does) recomputes
``min over the selected set`` of the distance matrix at every step: O(M^2 N). Both are timed here
on the same features, side by side, batched over the rows the same way (the straightforward one is
vectorised over the batch too, so only the greedy loop differs), and must return the same indices.

Timed: the whole call (distance matrix + greedy + sort) for each; the distance matrix alone
(:func:`~vlprune.plugins.token_diversity.cosine_distances`, shared by both); the greedy loops alone on
a precomputed matrix (:func:`~vlprune.plugins.token_diversity.max_min_greedy` vs
:func:`straightforward_greedy`). Medians of ``--repeats`` alternating rounds after one warm-up,
``--threads`` torch threads (default 1). Features: standard normal float32. Exit status 1 if any
pair of selections differs (sorted indices, and the greedy selection order).

Configurations (N tokens, D dims, M kept, batch B):

* LLaVA-1.5 at DivPrune's ratio: N=576, D=4096, M=58, B=1 and B=8 (the distance matrix dominates);
* a long greedy: N=2304, D=64, M=1152, B=1 (the greedy dominates).

    .venv/bin/python benchmarks/bench_divprune_select.py --out docs/benchmarks_divprune_select.json
    .venv/bin/python benchmarks/bench_divprune_select.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlprune.plugins.token_diversity import cosine_distances, divprune_select, max_min_greedy

CONFIGS: list[dict[str, int]] = [
    {"n": 576, "d": 4096, "m": 58, "batch": 1},
    {"n": 576, "d": 4096, "m": 58, "batch": 8},
    {"n": 2304, "d": 64, "m": 1152, "batch": 1},
]
QUICK_CONFIGS: list[dict[str, int]] = [
    {"n": 576, "d": 1024, "m": 58, "batch": 2},
    {"n": 1152, "d": 64, "m": 576, "batch": 1},
]


def straightforward_greedy(dist: torch.Tensor, m: int) -> torch.Tensor:
    """The straightforward greedy on a (B, N, N) distance matrix: at each step, for every candidate,
    the min over the whole selected set (re-gathered from the matrix), argmax; O(M^2 N). Selection
    order, like :func:`~vlprune.plugins.token_diversity.max_min_greedy`."""
    batch, n, _ = dist.shape
    rows = torch.arange(batch)
    eye = torch.eye(n, dtype=torch.bool)
    selected = torch.empty(batch, m, dtype=torch.long)
    taken = torch.zeros(batch, n, dtype=torch.bool)
    for i in range(m):
        if i == 0:
            score = dist.masked_fill(eye, float("inf")).amin(dim=-1)  # nearest other token
        else:
            score = dist[rows.unsqueeze(1), selected[:, :i]].amin(dim=1)  # (B, i, N) -> (B, N)
        idx = score.masked_fill(taken, float("-inf")).argmax(dim=-1)
        selected[:, i] = idx
        taken[rows, idx] = True
    return selected


def straightforward_select(features: torch.Tensor, m: int) -> torch.Tensor:
    """The whole straightforward selection on (B, N, D): distances, greedy, sorted indices."""
    return straightforward_greedy(cosine_distances(features), m).sort(dim=-1).values


def _time(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(config: dict[str, int], repeats: int, seed: int) -> dict[str, Any]:
    """Time both selections and the distance matrix on one configuration."""
    n, d, m, batch = config["n"], config["d"], config["m"], config["batch"]
    features = torch.randn(batch, n, d, generator=torch.Generator().manual_seed(seed))
    fast = divprune_select(features, m)  # warm-up and the indices compared
    slow = straightforward_select(features, m)
    same = bool(torch.equal(fast, slow))
    dist = cosine_distances(features)
    same_order = bool(torch.equal(max_min_greedy(dist.clone(), m), straightforward_greedy(dist, m)))
    times: dict[str, list[float]] = {k: [] for k in ("running_min", "straightforward", "distances", "greedy_running_min", "greedy_straightforward")}
    for _ in range(repeats):
        times["distances"].append(_time(lambda: cosine_distances(features)))
        times["running_min"].append(_time(lambda: divprune_select(features, m)))
        times["straightforward"].append(_time(lambda: straightforward_select(features, m)))
        copy = dist.clone()  # max_min_greedy overwrites the diagonal
        times["greedy_running_min"].append(_time(lambda: max_min_greedy(copy, m)))
        times["greedy_straightforward"].append(_time(lambda: straightforward_greedy(dist, m)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        **config,
        "same_indices": same and same_order,
        "median_s": {k: round(v, 6) for k, v in med.items()},
        "speedup_total": round(med["straightforward"] / med["running_min"], 2),
        "speedup_greedy_only": round(med["greedy_straightforward"] / med["greedy_running_min"], 2),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, 2 repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: docs/benchmarks_divprune_select.json; none with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    repeats = 2 if args.quick else args.repeats
    results = []
    for config in configs:
        row = bench(config, repeats, args.seed)
        results.append(row)
        med = row["median_s"]
        sys.stdout.write(
            f"N={row['n']:5d} D={row['d']:5d} M={row['m']:5d} B={row['batch']}: running min {med['running_min'] * 1e3:9.2f} ms, "
            f"straightforward {med['straightforward'] * 1e3:9.2f} ms (distances {med['distances'] * 1e3:8.2f} ms; greedy alone "
            f"{med['greedy_running_min'] * 1e3:.2f} vs {med['greedy_straightforward'] * 1e3:.2f} ms) | "
            f"x{row['speedup_total']} total, x{row['speedup_greedy_only']} greedy only, same indices: {row['same_indices']}\n"
        )
    report = {
        "benchmark": "divprune_select running minimum vs straightforward greedy (median seconds)",
        "quick": args.quick,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    out = args.out if args.out is not None else (None if args.quick else Path("docs/benchmarks_divprune_select.json"))
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        sys.stdout.write(f"wrote {out}\n")
    return 0 if all(r["same_indices"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
