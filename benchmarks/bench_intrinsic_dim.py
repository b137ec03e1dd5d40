"""Benchmark: vlprune's TwoNN and estimate_ids against scikit-dimension, side by side.

1. ``vlprune.plugins.intrinsic_dim.twonn`` vs ``skdim.id.TwoNN().fit(X).dimension_`` vs a plain
   float32 ``torch.cdist`` + ``topk`` (+ the same fit; the speed of light of the distance step,
   not exact) vs the previous exact vlprune kernel (float32 top-4 candidates all recomputed in
   float64, kept here as ``_previous_twonn``), on float32 N x D data with a known intrinsic
   dimension of 10 (a 2-d swiss roll + a 2-d flat torus + 6 Gaussian directions, embedded in D
   dims by a random linear map plus a smooth nonlinear bend, plus small isotropic noise), at
   N=2000/D=768 and N=5000/D=3072, each on 1 and 2 threads.
2. All-layer ``estimate_ids`` on tiny models (CLIP, LLaVA; ``representation="flatten"``) vs the
   naive route: forward hooks store every ``nn.Linear``'s full output for all samples (flattened
   per sample), then ``skdim.id.TwoNN`` per layer. ``estimate_ids`` also runs with a small
   ``max_memory_mb`` (bounded-memory mode: layers are profiled in groups). 1 thread.

Method (the machine is a shared 2-core box, so absolute timings are noisy; read the ratios):

* Time: for each comparison and thread count one fresh ``spawn`` subprocess runs every route
  once untimed (warm-up), then runs them alternately ``--repeats`` times (the route order
  rotates every round, and each timed call starts after 0.3 s of idle cores, so that no route
  inherits the previous one's still-spinning BLAS / OpenMP workers), so all see the same load; the tables give each route's median time and
  the ratio of the medians; the JSON also has every time and the median of the per-round ratios.
* Threads: ``torch.set_num_threads`` plus ``OMP/OPENBLAS/MKL/BLIS_NUM_THREADS`` set before numpy
  and torch are imported, so both libraries get the same number of threads.
* Peak memory: each route runs once in its own fresh ``spawn`` subprocess. Peak = the process's
  ``ru_maxrss`` (``resource.getrusage``) at the end minus its RSS at the baseline (after imports,
  data creation and a warm-up call on 64 rows), the kernel's high-water mark being reset at the
  baseline through ``/proc/self/clear_refs``; so it counts every allocation (torch, numpy, BLAS
  workspaces) that was resident at once. The JSON also has ``VmHWM`` as a cross-check.

    .venv/bin/python benchmarks/bench_intrinsic_dim.py            # full grid (~10-15 min on a loaded box)
    .venv/bin/python benchmarks/bench_intrinsic_dim.py --quick    # N=2000/D=768 only, CLIP only (~2 min), no JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

TRUE_ID = 10
BATCH = 50
SMALL_BUDGET_MB = 8.0


# ------------------------------------------------------------------------------------------
# helpers that run inside the measurement subprocesses
# ------------------------------------------------------------------------------------------


def _limit_threads(threads: int, torch_too: bool = True) -> None:
    """Cap every thread pool before numpy / torch / sklearn are imported in this process."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ[var] = str(threads)
    if torch_too:
        import torch

        torch.set_num_threads(threads)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class _Peak:
    """Marks the baseline; :meth:`stop` gives the growth of the peak RSS since then."""

    def __init__(self) -> None:
        self.maxrss0 = _maxrss_mb()
        self.rss0 = _status_mb("VmRSS") or 0.0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
            self.reset = True
        except OSError:
            self.reset = False

    def stop(self) -> dict[str, Any]:
        maxrss = _maxrss_mb()
        out: dict[str, Any] = {
            # with the reset, ru_maxrss restarts from the current RSS; without it, fall back to
            # the growth of ru_maxrss (an underestimate if the baseline had a transient peak)
            "peak_mb": maxrss - (self.rss0 if self.reset else self.maxrss0),
            "hwm_reset": self.reset,
            "rss_baseline_mb": self.rss0,
            "maxrss_before_baseline_mb": self.maxrss0,
        }
        hwm = _status_mb("VmHWM")
        if self.reset and hwm is not None:
            out["vmhwm_peak_mb"] = hwm - self.rss0
        return out


def make_data(n: int, d: int, seed: int = 0) -> Any:
    """float32 (n, d) points on a 10-dimensional curved manifold plus small noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, n)  # swiss roll: 2 parameters
    h = rng.uniform(0.0, 10.0, n)
    roll = np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1) / 5.0
    a = rng.uniform(0.0, 2 * np.pi, (n, 2))  # flat torus: 2 parameters
    torus = np.concatenate([np.cos(a), np.sin(a)], axis=1) * 2.0
    gauss = rng.normal(size=(n, 6))  # 6 linear directions
    z = np.concatenate([roll, torus, gauss], axis=1)  # (n, 13) coordinates of a 10-d manifold
    lin = np.linalg.qr(rng.normal(size=(d, z.shape[1])))[0].T  # random orthonormal 13-d subspace
    bend = rng.normal(size=(z.shape[1], d)) / np.sqrt(z.shape[1])
    x = z @ lin * 3.0 + 0.5 * np.tanh(z @ bend)  # linear embedding + smooth nonlinear bend
    x += 0.01 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def _quiet() -> None:
    import logging

    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------
# jobs (each runs in a fresh spawn subprocess and puts one dict on the queue)
# ------------------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import numpy
    import skdim
    import sklearn
    import torch

    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    return {
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "sklearn": sklearn.__version__,
            "skdim": getattr(skdim, "__version__", "?"),
    }


def _previous_twonn(x: Any, method: str = "linear") -> float:
    """The exact TwoNN of vlprune 0.x before the GEMM-speed kernel (kept for comparison): float32
    top-4 candidates on centred data, all four recomputed in float64 with ``torch.cdist``."""
    import torch

    from vlprune.plugins.intrinsic_dim import _fit

    n, dim = x.shape
    budget = 8 * 1024 * 1024
    rows = max(1, budget // dim)
    mean = x.sum(dim=0, dtype=torch.float64) / n
    x32 = torch.empty(x.shape, dtype=torch.float32)
    for s in range(0, n, rows):
        x32[s : s + rows] = (x[s : s + rows].double() - mean).float()
    sq = torch.cat([x32[i : i + rows].double().pow(2).sum(dim=1) for i in range(0, n, rows)]).float()
    m, chunk, refine = 4, max(1, min(n, budget // n)), max(1, (budget // 8) // (4 * dim))
    out = torch.empty(n, 2, dtype=torch.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        d2 = sq[start:stop, None] + sq[None, :] - 2.0 * (x32[start:stop] @ x32.T)
        r = torch.arange(stop - start)
        d2[r, r + start] = float("inf")
        cand = torch.topk(d2, m, dim=1, largest=False).indices
        del d2
        for r0 in range(start, stop, refine):
            r1 = min(stop, r0 + refine)
            exact = torch.cdist(
                x[r0:r1, None, :].double(), x[cand[r0 - start : r1 - start]].double(),
                compute_mode="donot_use_mm_for_euclid_dist",
            )[:, 0, :]
            out[r0:r1] = torch.sort(exact, dim=1).values[:, :2]
    return _fit(out[:, 1] / out[:, 0], 0.1, method)  # type: ignore[arg-type]


def _plain_twonn(x: Any, method: str = "linear") -> float:
    """Plain float32 ``cdist`` + ``topk`` and the same fit: no centring, no exactness pass."""
    import torch

    from vlprune.plugins.intrinsic_dim import _fit

    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    r = torch.topk(d, 2, dim=1, largest=False).values.double()
    return _fit(r[:, 1] / r[:, 0], 0.1, method)  # type: ignore[arg-type]


TWONN_ROUTES = ("skdim", "vlprune", "float32 cdist+topk", "previous vlprune")


def _twonn_runner(which: str, x: Any) -> Callable[..., float]:
    if which == "skdim":
        import skdim

        return lambda method="linear", n=None: skdim.id.TwoNN(method=method).fit(x if n is None else x[:n]).dimension_
    import torch

    from vlprune.plugins.intrinsic_dim import twonn

    xt = torch.from_numpy(x)
    fn = {"vlprune": lambda a, m: twonn(a, method=m), "float32 cdist+topk": _plain_twonn, "previous vlprune": _previous_twonn}[which]
    return lambda method="linear", n=None: fn(xt if n is None else xt[:n], method)


#: idle seconds before each timed route (see :func:`_twonn_time_job`)
QUIET_GAP_S = 0.3


def _twonn_time_job(n: int, d: int, path: str, repeats: int, threads: int, queue: Any) -> None:
    """Makes the data (saved to ``path`` for the memory jobs), then times the routes alternately."""
    _limit_threads(threads)
    _quiet()
    import numpy as np

    x = make_data(n, d)
    np.save(path, x)
    runs = {w: _twonn_runner(w, x) for w in TWONN_ROUTES}
    for run in runs.values():
        run()  # warm-up round (lazy init, first-touch page faults), not timed
    times: dict[str, list[float]] = {w: [] for w in runs}
    order = list(runs)
    for i in range(repeats):
        for w in order[i % len(order) :] + order[: i % len(order)]:  # rotate who goes first
            # quiet cores: the previous route's BLAS / OpenMP workers spin for a while after their
            # last call (OpenBLAS's for ~0.1 s), and on 2 cores a spinning worker halves the next
            # route's speed: without this gap a route's time depended on which one ran before it
            time.sleep(QUIET_GAP_S)
            start = time.perf_counter()
            runs[w]()
            times[w].append(time.perf_counter() - start)
    ids = {w: {m: float(run(m)) for m in ("linear", "mle")} for w, run in runs.items()}
    queue.put({"times": times, "ids": ids, "environment": _environment()})


def _twonn_mem_job(which: str, path: str, threads: int, queue: Any) -> None:
    _limit_threads(threads, torch_too=which != "skdim")
    _quiet()
    import numpy as np

    x = np.load(path)
    run = _twonn_runner(which, x)
    run(n=64)
    peak = _Peak()
    run()
    queue.put(peak.stop())


def _model_batches(family: str, n_samples: int) -> tuple[Any, list[dict[str, Any]], list[str]]:
    from torch import nn

    from vlprune.testbed.tiny import example_inputs, tiny_model

    model = tiny_model(family).eval()
    n_batches = -(-n_samples // BATCH)
    batches = [example_inputs(family, batch_size=BATCH, seed=1000 + i) for i in range(n_batches)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return model, batches, names


def _naive_profile(model: Any, batches: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """Hooks keep every Linear's full output for all samples, then skdim TwoNN per layer."""
    import numpy as np
    import skdim
    import torch

    store: dict[str, list[Any]] = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: store[n].append(o.detach().float().flatten(1).clone()))
        for n in names
    ]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    ids = {}
    for n in names:
        x = torch.cat(store.pop(n)).numpy()
        # skdim drops *every* copy of a duplicated point, vlprune keeps one copy (some layers of
        # the tiny CLIP have duplicate rows): give skdim the distinct rows so both estimate the
        # same point set; np.unique is part of the timed route (it is cheap at this size)
        x = np.unique(x, axis=0)
        ids[n] = float(skdim.id.TwoNN().fit(x).dimension_)
    return ids


def _profile_runner(route: str, model: Any, batches: list[dict[str, Any]], names: list[str], n_samples: int) -> Callable[[], dict[str, float]]:
    if route == "naive":
        return lambda: _naive_profile(model, batches, names)
    from vlprune.plugins.intrinsic_dim import estimate_ids

    budget = 2048.0 if route == "default" else SMALL_BUDGET_MB
    return lambda: estimate_ids(model, batches, names, n_samples=n_samples, max_memory_mb=budget, progress=False).ids()


ROUTES = ("naive", "default", "small")


def _count_forwards(model: Any) -> list[int]:
    counter = [0]
    model.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def _profile_time_job(family: str, n_samples: int, repeats: int, threads: int, queue: Any) -> None:
    _limit_threads(threads)
    _quiet()
    import torch

    model, batches, names = _model_batches(family, n_samples)
    forwards = _count_forwards(model)
    runs = {r: _profile_runner(r, model, batches, names, n_samples) for r in ROUTES}
    for run in runs.values():
        run()  # warm-up round, not timed
    times: dict[str, list[float]] = {r: [] for r in ROUTES}
    calls: dict[str, int] = {}
    ids: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for r, run in runs.items():
            forwards[0] = 0
            start = time.perf_counter()
            ids[r] = run()
            times[r].append(time.perf_counter() - start)
            calls[r] = forwards[0]
    queue.put({"times": times, "forward_calls": calls, "ids": ids, "layers": len(names)})


def _profile_mem_job(route: str, family: str, n_samples: int, threads: int, queue: Any) -> None:
    _limit_threads(threads)
    _quiet()
    import torch

    model, batches, names = _model_batches(family, n_samples)
    run = _profile_runner(route, model, batches, names, n_samples)
    with torch.no_grad():
        model(**batches[0])  # warm-up
    peak = _Peak()
    run()
    queue.put(peak.stop())


def _run(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        result = queue.get(timeout=900)
    finally:
        proc.join(timeout=60)
    if proc.exitcode not in (0, None):
        raise RuntimeError(f"measurement subprocess {target.__name__}{args} failed with exit code {proc.exitcode}")
    return result


# ------------------------------------------------------------------------------------------
# main (keeps the parent light: no numpy / torch here)
# ------------------------------------------------------------------------------------------


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def _mem_ratio(a: float, b: float) -> float:
    return a / max(b, 1.0)  # 1 MB floor: below that the reading is page-granular noise


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=2000/D=768 only, tiny CLIP only (~2 min), no JSON")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 5, quick 3)")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="thread counts for the TwoNN comparison (default 1 2)"
    )
    parser.add_argument("--profile-threads", type=int, default=1, help="threads for the all-layer profile comparison")
    parser.add_argument(
        "--out",
        default=None,
        help="raw numbers (JSON); default docs/benchmarks_intrinsic_dim.json for the full grid, none with --quick "
        "(so a quick run never overwrites the published numbers)",
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = ((2000, 768),) if args.quick else ((2000, 768), (5000, 3072))
    n_samples = 500 if args.quick else 1000
    families = ("clip",) if args.quick else ("clip", "llava")
    w = sys.stdout.write
    began = time.perf_counter()
    out: dict[str, Any] = {
        "command": " ".join([".venv/bin/python benchmarks/bench_intrinsic_dim.py", *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads,
        "profile_threads": args.profile_threads,
        "repeats": repeats,
        "true_id": TRUE_ID,
        "memory_method": "peak RSS growth over a baseline taken after imports, data and a warm-up call "
        "(ru_maxrss with the high-water mark reset via /proc/self/clear_refs), one fresh spawn process per route",
        "loadavg_start": _loadavg(),
        "twonn": [],
        "profile": [],
    }
    short = {"skdim": "skdim", "vlprune": "vlprune", "float32 cdist+topk": "f32 cdist", "previous vlprune": "prev."}
    with tempfile.TemporaryDirectory(prefix="bench_id_") as tmp:
        for n, d in sizes:
            for threads in args.threads:
                path = str(Path(tmp) / f"x_{n}_{d}_{threads}.npy")
                timing = _run(_twonn_time_job, n, d, path, repeats, threads)
                if "environment" not in out:
                    env = out["environment"] = timing["environment"]
                    w(
                        f"machine: {env['cpu']}, {env['cpu_count']} CPU cores, CUDA {env['cuda']}; torch {env['torch']}, "
                        f"sklearn {env['sklearn']}, skdim {env['skdim']}; load avg {out['loadavg_start']}\n\n"
                    )
                    w(
                        "### twonn vs skdim.id.TwoNN vs plain float32 cdist+topk vs the previous exact kernel "
                        f"(float32 input, ID-10 curved manifold in D dims, {repeats} alternating rounds, medians)\n\n"
                    )
                    w(
                        "| N | D | threads | "
                        + " | ".join(f"{short[r]} s" for r in TWONN_ROUTES)
                        + " | skdim/vlprune time | f32 cdist/vlprune time | "
                        + " | ".join(f"{short[r]} peak MB" for r in TWONN_ROUTES)
                        + " | ID vlprune | rel. diff vs skdim (linear, mle) | vs prev. | f32 cdist vs skdim |\n"
                    )
                    w("|" + "---|" * (7 + 2 * len(TWONN_ROUTES) + 2) + "\n")
                mem = {wh: _run(_twonn_mem_job, wh, path, threads) for wh in TWONN_ROUTES}
                os.remove(path)
                t, ids = timing["times"], timing["ids"]

                def rel(a: str, b: str) -> dict[str, float]:
                    return {m: abs(ids[a][m] - ids[b][m]) / abs(ids[b][m]) for m in ("linear", "mle")}

                med = {k: statistics.median(v) for k, v in t.items()}
                row = {
                    "N": n,
                    "D": d,
                    "threads": threads,
                    "time_s": med,
                    "times_s": t,
                    "time_ratio_skdim_over_vlprune": med["skdim"] / med["vlprune"],
                    "time_ratio_median_of_rounds": _median_ratio(t["skdim"], t["vlprune"]),
                    "time_ratio_plain_over_vlprune": med["float32 cdist+topk"] / med["vlprune"],
                    "time_ratio_previous_over_vlprune": med["previous vlprune"] / med["vlprune"],
                    "memory": mem,
                    "memory_ratio_skdim_over_vlprune": _mem_ratio(mem["skdim"]["peak_mb"], mem["vlprune"]["peak_mb"]),
                    "ids": ids,
                    "rel_diff": rel("vlprune", "skdim"),
                    "rel_diff_vs_previous": rel("vlprune", "previous vlprune"),
                    "rel_diff_plain_vs_skdim": rel("float32 cdist+topk", "skdim"),
                }
                out["twonn"].append(row)
                w(
                    f"| {n} | {d} | {threads} | "
                    + " | ".join(f"{med[r]:.3f}" for r in TWONN_ROUTES)
                    + f" | {row['time_ratio_skdim_over_vlprune']:.2f} | {row['time_ratio_plain_over_vlprune']:.2f} | "
                    + " | ".join(f"{mem[r]['peak_mb']:.0f}" for r in TWONN_ROUTES)
                    + f" | {ids['vlprune']['linear']:.4f} | {row['rel_diff']['linear']:.1e}, {row['rel_diff']['mle']:.1e}"
                    + f" | {max(row['rel_diff_vs_previous'].values()):.1e} | {max(row['rel_diff_plain_vs_skdim'].values()):.1e} |\n"
                )
                sys.stdout.flush()

    labels = {
        "default": "estimate_ids, default budget (2048 MB)",
        "small": f"estimate_ids, {SMALL_BUDGET_MB:g} MB budget",
        "naive": "naive: hooks keep all outputs + skdim per layer",
    }
    w(
        f"\n### all-layer ID profile, tiny models, {n_samples} samples (batches of {BATCH}), "
        f"flatten representation, {repeats} alternating rounds, {args.profile_threads} thread(s)\n\n"
    )
    w(
        "| model | Linear layers | route | forward calls | time s | peak MB | time naive/route | "
        "mem naive/route | max rel. diff of layer IDs vs naive |\n"
    )
    w("|---|---|---|---|---|---|---|---|---|\n")
    sys.stdout.flush()
    for family in families:
        timing = _run(_profile_time_job, family, n_samples, repeats, args.profile_threads)
        mem = {r: _run(_profile_mem_job, r, family, n_samples, args.profile_threads) for r in ROUTES}
        t, ids = timing["times"], timing["ids"]
        for r in ROUTES:
            diffs = {k: abs(ids[r][k] - v) / abs(v) for k, v in ids["naive"].items()}
            worst = max(diffs, key=diffs.__getitem__)
            row = {
                "model": family,
                "route": r,
                "label": labels[r],
                "layers": timing["layers"],
                "forward_calls": timing["forward_calls"][r],
                "time_s": statistics.median(t[r]),
                "times_s": t[r],
                "time_ratio_naive_over_route": statistics.median(t["naive"]) / statistics.median(t[r]),
                "time_ratio_median_of_rounds": _median_ratio(t["naive"], t[r]),
                "memory": mem[r],
                "memory_ratio_naive_over_route": _mem_ratio(mem["naive"]["peak_mb"], mem[r]["peak_mb"]),
                "max_rel_diff_vs_naive": diffs[worst],
                "worst_layer": worst,
                "layer_ids": ids[r],
            }
            out["profile"].append(row)
            w(
                f"| {family} | {row['layers']} | {row['label']} | {row['forward_calls']} | {row['time_s']:.2f} | "
                f"{mem[r]['peak_mb']:.0f} | {row['time_ratio_naive_over_route']:.2f} | "
                f"{row['memory_ratio_naive_over_route']:.2f} | "
                f"{'-' if r == 'naive' else format(diffs[worst], '.1e')} |\n"
            )
        sys.stdout.flush()

    out["loadavg_end"] = _loadavg()
    out["wall_s"] = time.perf_counter() - began
    bad = [(r["N"], r["D"], r["rel_diff"]) for r in out["twonn"] if max(r["rel_diff"].values()) > 1e-6]
    bad += [(r["model"], r["route"], r["max_rel_diff_vs_naive"]) for r in out["profile"] if r["max_rel_diff_vs_naive"] > 1e-3]
    if bad:
        w(f"\nWARNING: estimates differ from scikit-dimension by more than 1e-6 (twonn) / 1e-3 (profiles) relative: {bad}\n")
    out_path = args.out or (None if args.quick else "docs/benchmarks_intrinsic_dim.json")
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(out, indent=2) + "\n")
    w(f"\nraw numbers: {out_path or '(not written; --out PATH)'}; load avg at the end {out['loadavg_end']}; ")
    w(f"wall time {out['wall_s']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
