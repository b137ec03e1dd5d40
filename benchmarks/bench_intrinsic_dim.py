"""Benchmark: vlprune's TwoNN and estimate_ids against scikit-dimension, side by side.

1. ``vlprune.twonn`` vs ``skdim.id.TwoNN`` on N x D data with a known low intrinsic dimension.
2. All-layer ``estimate_ids`` on a tiny model vs the naive route (hooks store every layer's full
   outputs, then ``skdim.id.TwoNN`` per layer), plus ``estimate_ids`` under a small memory budget.

Each measurement runs in a fresh subprocess; time is the median of ``--repeats`` runs, peak
memory is the growth of the process's peak RSS over its baseline (after imports and data). Timings
on a shared 2-core machine are noisy: compare the ratios, measured in the same run.

    python benchmarks/bench_intrinsic_dim.py            # full grid (~5-10 min on 2 cores)
    python benchmarks/bench_intrinsic_dim.py --quick    # smaller grid (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _data(n: int, d: int, seed: int = 0) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 3 * np.pi, size=(n, 4))
    manifold = np.concatenate([np.sin(t), np.cos(t), t * np.cos(t), rng.normal(size=(n, 6))], axis=1)  # ~10-d
    return (manifold @ rng.normal(size=(manifold.shape[1], d)) + 0.01 * rng.normal(size=(n, d)) + 5.0).astype(np.float32)


def _twonn_job(which: str, n: int, d: int, repeats: int, queue: Any) -> None:
    import torch

    torch.set_num_threads(2)
    x = _data(n, d)
    if which == "vlprune":
        from vlprune.plugins.intrinsic_dim import twonn

        xt = torch.from_numpy(x)
        run = lambda: twonn(xt)  # noqa: E731
    else:
        import skdim

        run = lambda: skdim.id.TwoNN().fit(x).dimension_  # noqa: E731
    base = _rss_mb()
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(run())
        times.append(time.perf_counter() - start)
    queue.put({"time": statistics.median(times), "peak_mb": _rss_mb() - base, "id": value})


def _model_batches(family: str, n_samples: int) -> tuple[Any, list[dict[str, Any]]]:
    from vlprune.testbed.tiny import example_inputs, tiny_model

    model = tiny_model(family)
    batches = [example_inputs(family, batch_size=50, seed=1000 + i) for i in range(n_samples // 50)]
    return model, batches


def _profile_job(which: str, family: str, n_samples: int, budget_mb: float, queue: Any) -> None:
    import logging

    import torch
    from torch import nn

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    model, batches = _model_batches(family, n_samples)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    base = _rss_mb()
    start = time.perf_counter()
    if which == "vlprune":
        from vlprune.plugins.intrinsic_dim import estimate_ids

        profile = estimate_ids(model, batches, names, n_samples=n_samples, max_memory_mb=budget_mb, progress=False)
        ids = profile.ids()
    else:
        import numpy as np
        import skdim

        store: dict[str, list[Any]] = {n: [] for n in names}
        modules = dict(model.named_modules())
        handles = [
            modules[n].register_forward_hook(lambda _m, _i, o, n=n: store[n].append(o.detach().flatten(1).clone()))
            for n in names
        ]
        with torch.no_grad():
            for b in batches:
                model(**b)
        for h in handles:
            h.remove()
        ids = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in names:
                x = np.unique(torch.cat(store.pop(n)).numpy(), axis=0)
                ids[n] = float(skdim.id.TwoNN().fit(x).dimension_)
    queue.put({"time": time.perf_counter() - start, "peak_mb": _rss_mb() - base, "ids": ids})


def _run(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks_intrinsic_dim.json")
    args = parser.parse_args(argv)
    ns = (1000, 2000) if args.quick else (1000, 2000, 5000)
    ds = (768,) if args.quick else (768, 3072)
    repeats = 1 if args.quick else args.repeats
    out: dict[str, Any] = {"twonn": [], "profile": []}
    w = sys.stdout.write

    w("### twonn vs skdim.id.TwoNN (float32 input, ~10-d manifold in D dims)\n\n")
    w("| N | D | skdim s | vlprune s | time ratio skdim/vlprune | skdim peak MB | vlprune peak MB | memory ratio skdim/vlprune | ID skdim | ID vlprune | rel. diff |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|\n")
    for n in ns:
        for d in ds:
            ref = _run(_twonn_job, "skdim", n, d, repeats)
            ours = _run(_twonn_job, "vlprune", n, d, repeats)
            rel = abs(ours["id"] - ref["id"]) / abs(ref["id"])
            row = {"N": n, "D": d, "skdim": ref, "vlprune": ours, "rel_diff": rel}
            out["twonn"].append(row)
            w(
                f"| {n} | {d} | {ref['time']:.3f} | {ours['time']:.3f} | {ref['time'] / ours['time']:.2f} | "
                f"{ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} | {ref['peak_mb'] / max(ours['peak_mb'], 1):.2f} | "
                f"{ref['id']:.3f} | {ours['id']:.3f} | {rel:.1e} |\n"
            )
            sys.stdout.flush()

    n_samples = 500 if args.quick else 1000
    w(f"\n### all-layer profile, tiny models, {n_samples} samples, flatten representation\n\n")
    w("| model | route | time s | peak MB | time ratio naive/route | memory ratio naive/route | max rel. diff of layer IDs |\n")
    w("|---|---|---|---|---|---|---|\n")
    for family in ("clip", "llava"):
        naive = _run(_profile_job, "naive", family, n_samples, 0.0)
        for label, budget in (("estimate_ids (2 GB budget)", 2048.0), ("estimate_ids (8 MB budget)", 8.0)):
            ours = _run(_profile_job, "vlprune", family, n_samples, budget)
            diff = max(abs(ours["ids"][k] - v) / abs(v) for k, v in naive["ids"].items())
            out["profile"].append({"model": family, "route": label, "naive": naive, "vlprune": ours, "max_rel_diff": diff})
            w(
                f"| {family} | {label} | {ours['time']:.2f} | {ours['peak_mb']:.0f} | "
                f"{naive['time'] / ours['time']:.2f} | {naive['peak_mb'] / max(ours['peak_mb'], 1):.2f} | {diff:.1e} |\n"
            )
        w(f"| {family} | naive: hooks + stored outputs + skdim per layer | {naive['time']:.2f} | {naive['peak_mb']:.0f} | 1.00 | 1.00 | 0 |\n")
        sys.stdout.flush()
    for row in out["profile"]:
        row["naive"].pop("ids", None)
        row["vlprune"].pop("ids", None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    w(f"\nraw numbers: {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
