"""Benchmark: the ID profile of a real model at its real size, against one plain forward pass.

Issue 16 part 2: ``estimate_ids`` with its defaults on real SmolLM2-135M-Instruct
(``vlprune.testbed.real.load("smollm2")``, 30 decoder layers, the 210 linears the top-level
``vlprune.estimate_ids`` profiles by default: q/k/v/o, gate/up/down), ``representation="flatten"``
(one row = a module's whole 64-token output: 12 288 to 98 304 values, 40 MB per sample for all
210), 256 samples of 64 tokens (the real tier's template passages,
:func:`vlprune.testbed.real_tasks.smollm2_texts`, math and general alternating, no padding) in
batches of 32.

Measured side by side in one process (timings are ratios to the plain forward pass measured in
the same run, before and after, since the machine is shared):

* ``forward``: ``model(**batch)`` over the same batches, eval mode, no gradients (the median of
  the runs before and after the profiles);
* ``profile_auto``: ``estimate_ids`` with its defaults (budget: half the available memory);
* ``profile_spill``: the same with ``max_memory_mb=2048`` (the old default; the rows past it go to
  disk); the IDs must equal ``profile_auto``'s exactly;
* ``sketch_<k>``: ``sketch_dim=k``; its per-layer relative error against the exact profile.

Each phase's wall time and peak resident memory (sampled every 20 ms from /proc/self/status) are
recorded, and the bytes spilled to disk. Output: ``docs/benchmarks_id_scale.json``.

    .venv/bin/python benchmarks/bench_id_scale.py            # 256 x 64 tokens, 210 linears
    .venv/bin/python benchmarks/bench_id_scale.py --quick    # 64 samples, first 6 layers (42 linears)
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path

logger = logging.getLogger("bench_id_scale")

DOCS = Path(__file__).resolve().parent.parent / "docs"


class PeakRSS:
    """Peak resident set size of this process while the context is open (sampled)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn``; its result, wall seconds, peak RSS and peak RSS above the start (GB)."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, {"seconds": seconds, "peak_rss_gb": mem.peak / 2**30, "peak_rss_increase_gb": (mem.peak - mem.start) / 2**30}


def fresh_memory_rates(gb: int) -> list[float]:
    """Fill ``gb`` GB of new anonymous memory, 1 GB at a time, and give it back; the GB/s of each
    GB (first touch: page faults and zeroing). On a virtual machine whose host backs guest memory
    on demand the first few GB are fast (pages the guest used recently) and the rest several times
    slower; afterwards those pages are fast for a while (``--warm-gb``)."""
    from vlprune.plugins.id_storage import anonymous_rows

    values = anonymous_rows(gb, 2**28, torch.float32)  # new memory of its own, like the profile's slabs
    if values is None:
        raise SystemExit("this system refuses anonymous memory mappings; leave out --warm-gb")
    rates = []
    for i in range(gb):
        t0 = time.perf_counter()
        values[i].fill_(1.0)
        rates.append(1.0 / (time.perf_counter() - t0))
    return rates  # the mapping goes back with the last view of it


def smollm2_batches(n: int, seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``n`` template passages (math and general alternating), each cut to ``seq_len`` tokens."""
    from vlprune.testbed import real, real_tasks

    tok = real.processor("smollm2")
    half = (n + 1) // 2
    texts = [t for pair in zip(real_tasks.smollm2_texts("math", half, sentences=8, seed=1),
                               real_tasks.smollm2_texts("general", half, sentences=8, seed=1)) for t in pair][:n]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if min(len(i) for i in ids) < seq_len:
        raise SystemExit(f"a passage is shorter than {seq_len} tokens; lower --seq-len")
    ids_t = torch.tensor([i[:seq_len] for i in ids], dtype=torch.long)
    return [{"input_ids": ids_t[s : s + batch_size]} for s in range(0, n, batch_size)]


def spied_estimate(**kwargs: Any) -> tuple[Any, dict[str, float]]:
    """``estimate_ids(**kwargs)``, its forward-call count and bytes spilled to disk."""
    from vlprune.plugins import id_storage
    from vlprune.plugins.intrinsic_dim import estimate_ids

    written: list[int] = []
    close = id_storage.RowStore.close

    def spy(self: id_storage.RowStore) -> None:
        written.append(self.written_bytes)
        close(self)

    model = kwargs["model"]
    calls = [0]
    handle = model.register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))
    id_storage.RowStore.close = spy  # type: ignore[method-assign]
    try:
        profile, stats = timed(lambda: estimate_ids(**kwargs))
    finally:
        id_storage.RowStore.close = close  # type: ignore[method-assign]
        handle.remove()
    stats.update(forward_calls=calls[0], spilled_gb=(written[0] if written else 0) / 2**30)
    return profile, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 samples, the first 6 layers' linears")
    parser.add_argument("--n-samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sketch-dims", type=int, nargs="*", default=None)
    parser.add_argument("--skip-spill-run", action="store_true", help="leave out the max_memory_mb=2048 run")
    parser.add_argument("--warm-gb", type=int, default=0,
                        help="right before the profile, first touch and give back this many GB of memory "
                             "(diagnostic: see fresh_memory_rates)")
    parser.add_argument("--out", type=Path, default=DOCS / "benchmarks_id_scale.json")
    args = parser.parse_args(argv)
    quiet_cpu_setup(args.threads)
    logging.getLogger("vlprune").setLevel(logging.INFO)
    logging.getLogger("vlprune.plugins.intrinsic_dim").addHandler(logging.StreamHandler(sys.stdout))
    wall0 = time.perf_counter()

    from vlprune.adapters.hf.families import default_id_modules
    from vlprune.plugins.id_storage import available_memory_bytes, default_budget_mb
    from vlprune.testbed import real

    n = args.n_samples or (64 if args.quick else 256)
    sketch_dims = args.sketch_dims if args.sketch_dims is not None else ([256, 1024] if args.quick else [256, 1024, 4096])
    model = real.load("smollm2").eval()
    batches = smollm2_batches(n, args.seq_len, args.batch_size)
    modules = default_id_modules(model)
    if args.quick:
        modules = [m for m in modules if int(m.split(".")[2]) < 6]
    common = dict(model=model, batches=batches, modules=modules, n_samples=n, progress=False)

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            model(**b)

    with torch.no_grad():
        model(**batches[0])  # warm-up (allocator, kernels)
    runs: dict[str, Any] = {}
    _, before = timed(forward)
    available_gb = (available_memory_bytes() or 0) / 2**30
    budget_mb = default_budget_mb()
    print(f"forward: {before['seconds']:.1f} s; available memory {available_gb:.1f} GB -> default budget {budget_mb:.0f} MB", flush=True)
    warm_rates = fresh_memory_rates(args.warm_gb) if args.warm_gb > 0 else []  # right before the profile
    if warm_rates:
        print("first touch, GB/s per GB: " + " ".join(f"{r:.1f}" for r in warm_rates), flush=True)
    exact, runs["profile_auto"] = spied_estimate(**common)
    print(f"profile_auto: {runs['profile_auto']}", flush=True)
    spill = None
    if not args.skip_spill_run:
        spill, runs["profile_spill"] = spied_estimate(**common, max_memory_mb=2048)
        print(f"profile_spill: {runs['profile_spill']}", flush=True)
    _, after = timed(forward)
    forward_s = statistics.median([before["seconds"], after["seconds"]])
    runs["forward"] = {"seconds": forward_s, "seconds_before": before["seconds"], "seconds_after": after["seconds"],
                       "peak_rss_gb": max(before["peak_rss_gb"], after["peak_rss_gb"])}
    for key in ("profile_auto", "profile_spill"):
        if key in runs:
            runs[key]["ratio_to_forward"] = runs[key]["seconds"] / forward_s
    sketches: dict[str, Any] = {}
    runs["warm_gb"] = {"gb": args.warm_gb, "first_touch_gb_per_s": warm_rates}
    summary(args, n, modules, batches, available_gb, budget_mb, runs, spill, exact, sketches, wall0)
    for k in sketch_dims:
        sketched, stats = spied_estimate(**common, sketch_dim=k)
        rel = sorted(abs(sketched[m] - exact[m]) / exact[m] for m in modules)
        stats.update(
            median_rel_error=statistics.median(rel),
            p90_rel_error=rel[int(0.9 * (len(rel) - 1))],
            max_rel_error=rel[-1],
            mean_signed_rel_error=statistics.mean((sketched[m] - exact[m]) / exact[m] for m in modules),
            ratio_to_forward=stats["seconds"] / forward_s,
        )
        sketches[str(k)] = stats
        print(f"sketch {k}: {stats}", flush=True)
        summary(args, n, modules, batches, available_gb, budget_mb, runs, spill, exact, sketches, wall0)
    result = summary(args, n, modules, batches, available_gb, budget_mb, runs, spill, exact, sketches, wall0)
    print(json.dumps({k: v for k, v in result.items() if k != "ids_exact"}, indent=2))
    return 0


def summary(args: argparse.Namespace, n: int, modules: list[str], batches: list[Any], available_gb: float,
            budget_mb: float, runs: dict[str, Any], spill: Any, exact: Any, sketches: dict[str, Any],
            wall0: float) -> dict[str, Any]:
    """The JSON record (written to ``args.out`` after every phase, so a cut run keeps what it measured)."""
    widths = [exact.layers[m].features for m in modules]
    result = {
        "benchmark": "bench_id_scale",
        "command": "python benchmarks/bench_id_scale.py" + (" --quick" if args.quick else "")
        + (f" --warm-gb {args.warm_gb}" if args.warm_gb else ""),
        "model": "SmolLM2-135M-Instruct (vlprune.testbed.real.load('smollm2'))",
        "modules": len(modules),
        "n_samples": n,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "representation": "flatten",
        "row_widths": {"min": min(widths), "max": max(widths), "sum": sum(widths)},
        "rows_gb_float32": n * sum(widths) * 4 / 2**30,
        "available_memory_gb_at_start": available_gb,
        "default_budget_mb": budget_mb,
        "runs": runs,
        "spill_equals_in_memory": spill.ids() == exact.ids() if spill is not None else None,
        "sketch": sketches,
        "ids_exact": exact.ids(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads (shared machine)",
        "wall_seconds": time.perf_counter() - wall0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(main())
