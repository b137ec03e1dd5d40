"""Benchmark: TwoNN on few, wide rows (the ``flatten`` representation of real layers).

``estimate_ids`` with ``representation="flatten"`` hands the TwoNN kernel N = 8..512 rows of
D = 12k..600k values. This compares, side by side in one process (the routes alternate every
round, so all see the same load; medians and the ratio of the medians are reported):

* ``after``: :func:`vlprune.plugins.intrinsic_dim.twonn` as it is now (for these shapes the float64
  Gram path of :mod:`vlprune.plugins._neighbours`, chosen by :func:`~vlprune.plugins._neighbours.uses_gram_path`);
* ``before``: the same ``twonn`` fit on the kernel of commit ``b867e91`` (float32 / float64 row-block
  search, exact recomputation and re-check; loaded from git history with ``git show``);
* ``skdim``: ``skdim.id.TwoNN().fit(X).dimension_`` (float64, sklearn brute force).

Data: float32, rank-16 signal + 0.3 noise + a large common offset (5 N(0,1) per column + 20), the
shape of a real activation matrix; plus plain ``randn(8, 600000)``. Every route's estimate is
compared with skdim on the centred distinct rows (relative difference).

    .venv/bin/python benchmarks/bench_twonn_wide.py            # 3 rounds, writes docs/benchmarks_twonn_wide.json
    .venv/bin/python benchmarks/bench_twonn_wide.py --quick    # 1 round, the two smallest shapes, no JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "b867e91"
SHAPES = [("randn", 8, 600_000), ("lowrank+offset", 8, 600_000), ("lowrank+offset", 64, 100_000),
          ("lowrank+offset", 256, 36_864), ("lowrank+offset", 2000, 768)]


def _previous_kernel() -> Any:
    """The ``_neighbours`` module of ``BEFORE_COMMIT``, imported from a temporary file."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:src/vlprune/plugins/_neighbours.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "_neighbours_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("_neighbours_before", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _data(kind: str, n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(n, dim, generator=g)
    offset = 5.0 * torch.randn(1, dim, generator=g) + 20.0
    return torch.randn(n, 16, generator=g) @ torch.randn(16, dim, generator=g) + 0.3 * torch.randn(n, dim, generator=g) + offset


def _skdim(x: torch.Tensor) -> float:
    import skdim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(skdim.id.TwoNN().fit(x.double().numpy()).dimension_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, the two smallest shapes, no JSON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default docs/benchmarks_twonn_wide.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vlprune.plugins import intrinsic_dim
    from vlprune.plugins._neighbours import uses_gram_path

    before = _previous_kernel()
    start = time.perf_counter()
    rounds = 1 if args.quick else args.rounds
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows: list[dict[str, Any]] = []
    for kind, n, dim in shapes:
        x = _data(kind, n, dim)

        def with_kernel(kernel: Callable[..., torch.Tensor]) -> Callable[[], float]:
            def run() -> float:
                original = intrinsic_dim.knn_distances
                intrinsic_dim.knn_distances = kernel
                try:
                    return intrinsic_dim.twonn(x)
                finally:
                    intrinsic_dim.knn_distances = original
            return run

        routes = {"after": with_kernel(intrinsic_dim.knn_distances), "before": with_kernel(before.knn_distances), "skdim": lambda: _skdim(x)}
        times: dict[str, list[float]] = {name: [] for name in routes}
        ids = {name: route() for name, route in routes.items()}  # warm-up, and the estimates
        for r in range(rounds):
            names = list(routes)[r % 3 :] + list(routes)[: r % 3]
            for name in names:
                t0 = time.perf_counter()
                routes[name]()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        reference = _skdim(x - x.double().mean(0).float()) if kind != "randn" else ids["skdim"]
        row = {
            "data": kind, "N": n, "D": dim, "gram_path": uses_gram_path(n, dim), "times_s": times, "median_s": med,
            "before_over_after": med["before"] / med["after"], "skdim_over_after": med["skdim"] / med["after"],
            "id": ids, "rel_diff_vs_skdim_centred": {k: abs(v - reference) / abs(reference) for k, v in ids.items()},
        }
        rows.append(row)
        print(
            f"{kind:>15} N={n:5d} D={dim:7d} gram={row['gram_path']!s:5} after {med['after']:.3f}s before {med['before']:.3f}s "
            f"skdim {med['skdim']:.3f}s | before/after {row['before_over_after']:.2f}x skdim/after {row['skdim_over_after']:.2f}x "
            f"| ID {ids['after']:.4f} rel.diff vs skdim {row['rel_diff_vs_skdim_centred']['after']:.1e}",
            flush=True,
        )
    wall = time.perf_counter() - start
    print(f"wall time {wall:.0f} s ({args.threads} threads, {rounds} rounds)")
    if not args.quick or args.out:
        out = args.out or ROOT / "docs" / "benchmarks_twonn_wide.json"
        out.write_text(json.dumps({"threads": args.threads, "rounds": rounds, "wall_s": wall, "before_commit": BEFORE_COMMIT, "torch": torch.__version__, "rows": rows}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
