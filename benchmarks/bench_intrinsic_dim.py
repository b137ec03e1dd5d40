"""Benchmark: vlprune's TwoNN and estimate_ids against scikit-dimension, side by side.

1. ``vlprune.plugins.intrinsic_dim.twonn`` vs ``skdim.id.TwoNN().fit(X).dimension_`` on float32
   N x D data with a known intrinsic dimension of 10 (a 2-d swiss roll + a 2-d curved torus
   patch + 6 Gaussian directions, embedded in D dims by a random linear map plus a smooth
   nonlinear bend, plus small isotropic noise).
2. All-layer ``estimate_ids`` on tiny models (CLIP, LLaVA; ``representation="flatten"``) vs the
   naive route: forward hooks store every ``nn.Linear``'s full output for all samples (flattened
   per sample), then ``skdim.id.TwoNN`` per layer. ``estimate_ids`` is also run with a small
   ``max_memory_mb`` (bounded-memory mode: layers are profiled in groups, one pass per group).

Method. Every measurement runs in a fresh ``spawn`` subprocess. Time is the median of
``--repeats`` runs inside that process, after a small warm-up call. Peak memory is the growth of
``ru_maxrss`` over its value after imports, data / model creation and the warm-up; the data are
generated once by the parent and loaded from a ``.npy`` file, so the baseline is not inflated by
generation temporaries (``rss_baseline_gap_mb`` in the JSON checks this; ``vmhwm_peak_mb`` is a
cross-check through ``/proc/self/clear_refs`` + ``VmHWM`` where the kernel allows it). The two
routes of a comparison run back to back, so their ratio sees (nearly) the same machine load.
Timings on a shared 2-core machine are noisy: compare ratios measured in the same run.

    .venv/bin/python benchmarks/bench_intrinsic_dim.py            # full grid (~5-8 min on 2 cores)
    .venv/bin/python benchmarks/bench_intrinsic_dim.py --quick    # smaller grid (~1-2 min)
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
from typing import Any

TRUE_ID = 10
BATCH = 50


# ------------------------------------------------------------------------------------------
# memory helpers (run inside the measurement subprocess)
# ------------------------------------------------------------------------------------------


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


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Peak:
    """Baseline now; ``stop()`` gives the peak growth by ru_maxrss (and by VmHWM if resettable)."""

    def __init__(self) -> None:
        self.base_maxrss = _maxrss_mb()
        self.base_rss = _status_mb("VmRSS") or 0.0
        self.hwm_reset = _reset_hwm()

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_mb": _maxrss_mb() - self.base_maxrss,
            "rss_baseline_mb": self.base_rss,
            "rss_baseline_gap_mb": self.base_maxrss - self.base_rss,
        }
        hwm = _status_mb("VmHWM")
        if self.hwm_reset and hwm is not None:
            out["vmhwm_peak_mb"] = hwm - self.base_rss
        return out


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def make_data(n: int, d: int, seed: int = 0) -> Any:
    """float32 (n, d) points on a 10-dimensional curved manifold plus small noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, n)  # swiss roll: 2 parameters
    h = rng.uniform(0.0, 10.0, n)
    roll = np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1) / 5.0
    a = rng.uniform(0.0, 2 * np.pi, (n, 2))  # torus patch: 2 parameters
    torus = np.concatenate([np.cos(a), np.sin(a)], axis=1) * 2.0
    gauss = rng.normal(size=(n, 6))  # 6 linear directions
    z = np.concatenate([roll, torus, gauss], axis=1)  # (n, 13) coordinates of a 10-d manifold
    lin = np.linalg.qr(rng.normal(size=(d, z.shape[1])))[0].T  # random orthonormal 13-d subspace
    bend = rng.normal(size=(z.shape[1], d)) / np.sqrt(z.shape[1])
    x = z @ lin * 3.0 + 0.5 * np.tanh(z @ bend)  # linear embedding + smooth nonlinear bend
    x += 0.01 * rng.normal(size=(n, d))
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------
# measurement jobs (subprocesses)
# ------------------------------------------------------------------------------------------


def _twonn_job(which: str, path: str, repeats: int, queue: Any) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(2)
    x = np.load(path)
    if which == "vlprune":
        from vlprune.plugins.intrinsic_dim import twonn

        xt = torch.from_numpy(x)

        def run(method: str = "linear", data: Any = xt) -> float:
            return twonn(data, method=method)

    else:
        import skdim

        def run(method: str = "linear", data: Any = x) -> float:
            return skdim.id.TwoNN(method=method).fit(data).dimension_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(data=(xt if which == "vlprune" else x)[:64])  # warm-up: lazy init of BLAS / thread pools
        peak = _Peak()
        times, value = [], float("nan")
        for _ in range(repeats):
            start = time.perf_counter()
            value = float(run())
            times.append(time.perf_counter() - start)
        mem = peak.stop()
        value_mle = float(run("mle"))  # correctness only, after the memory reading
    queue.put({"time": statistics.median(times), "times": times, **mem, "id": value, "id_mle": value_mle})


def _model_batches(family: str, n_samples: int) -> tuple[Any, list[dict[str, Any]]]:
    from vlprune.testbed.tiny import example_inputs, tiny_model

    model = tiny_model(family)
    n_batches = -(-n_samples // BATCH)
    return model, [example_inputs(family, batch_size=BATCH, seed=1000 + i) for i in range(n_batches)]


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
        # skdim drops *every* copy of a duplicated point, vlprune keeps one copy: give skdim
        # distinct rows so both estimate on the same point set (np.unique is timed; it is cheap here)
        x = np.unique(x, axis=0)
        ids[n] = float(skdim.id.TwoNN().fit(x).dimension_)
    return ids


def _profile_job(which: str, family: str, n_samples: int, budget_mb: float, repeats: int, queue: Any) -> None:
    import logging

    import torch
    from torch import nn

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    model, batches = _model_batches(family, n_samples)
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    if which == "vlprune":
        from vlprune.plugins.intrinsic_dim import estimate_ids

        def run() -> dict[str, float]:
            profile = estimate_ids(model, batches, names, n_samples=n_samples, max_memory_mb=budget_mb, progress=False)
            return profile.ids()

    else:

        def run() -> dict[str, float]:
            return _naive_profile(model, batches, names)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            model(**batches[0])  # warm-up
        peak = _Peak()
        times, ids = [], {}
        for _ in range(repeats):
            forwards[0] = 0
            start = time.perf_counter()
            ids = run()
            times.append(time.perf_counter() - start)
        mem = peak.stop()
    queue.put(
        {
            "time": statistics.median(times),
            "times": times,
            **mem,
            "ids": ids,
            "layers": len(names),
            "forward_calls": forwards[0],
        }
    )


def _run(target: Any, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    try:
        result = queue.get(timeout=600)
    finally:
        proc.join(timeout=60)
    if proc.exitcode not in (0, None):
        raise RuntimeError(f"measurement subprocess failed with exit code {proc.exitcode}")
    return result


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import numpy
    import sklearn
    import skdim
    import torch

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "sklearn": sklearn.__version__,
        "skdim": getattr(skdim, "__version__", "?"),
    }


def _ratio(a: float, b: float, floor: float = 0.0) -> float:
    return a / max(b, floor) if max(b, floor) > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grid (~1-2 min)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--small-budget-mb", type=float, default=8.0, help="max_memory_mb of the bounded run")
    parser.add_argument("--out", default="docs/benchmarks_intrinsic_dim.json", help="raw numbers (JSON)")
    args = parser.parse_args(argv)
    ns = (1000, 2000) if args.quick else (1000, 2000, 5000)
    ds = (768,) if args.quick else (768, 3072)
    n_samples = 500 if args.quick else 1000
    families = ("clip", "llava")
    w = sys.stdout.write
    began = time.perf_counter()
    out: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_intrinsic_dim.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": _environment(),
        "repeats": args.repeats,
        "true_id": TRUE_ID,
        "twonn": [],
        "profile": [],
    }

    w(f"### twonn vs skdim.id.TwoNN (float32, 10-d curved manifold in D dims, median of {args.repeats})\n\n")
    w(
        "| N | D | skdim s | vlprune s | time skdim/vlprune | skdim peak MB | vlprune peak MB | "
        "mem skdim/vlprune | ID skdim | ID vlprune | rel. diff | rel. diff (mle) |\n"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="bench_id_") as tmp:
        import numpy as np

        for n in ns:
            for d in ds:
                path = str(Path(tmp) / f"x_{n}_{d}.npy")
                np.save(path, make_data(n, d))
                ref = _run(_twonn_job, "skdim", path, args.repeats)
                ours = _run(_twonn_job, "vlprune", path, args.repeats)
                os.remove(path)
                rel = abs(ours["id"] - ref["id"]) / abs(ref["id"])
                rel_mle = abs(ours["id_mle"] - ref["id_mle"]) / abs(ref["id_mle"])
                out["twonn"].append(
                    {"N": n, "D": d, "skdim": ref, "vlprune": ours, "rel_diff": rel, "rel_diff_mle": rel_mle}
                )
                w(
                    f"| {n} | {d} | {ref['time']:.3f} | {ours['time']:.3f} | {_ratio(ref['time'], ours['time']):.2f} | "
                    f"{ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} | {_ratio(ref['peak_mb'], ours['peak_mb'], 1.0):.2f} | "
                    f"{ref['id']:.3f} | {ours['id']:.3f} | {rel:.1e} | {rel_mle:.1e} |\n"
                )
                sys.stdout.flush()

    budgets = (("estimate_ids (default 2048 MB budget)", 2048.0), (f"estimate_ids ({args.small_budget_mb:g} MB budget)", args.small_budget_mb))
    w(
        f"\n### all-layer ID profile, tiny models, {n_samples} samples (batches of {BATCH}), "
        f"flatten representation, median of {args.repeats}\n\n"
    )
    w(
        "| model | Linear layers | route | forward calls | time s | peak MB | time naive/route | "
        "mem naive/route | max rel. diff of layer IDs |\n"
    )
    w("|---|---|---|---|---|---|---|---|---|\n")
    sys.stdout.flush()
    for family in families:
        naive = _run(_profile_job, "naive", family, n_samples, 0.0, args.repeats)
        rows = []
        for label, budget in budgets:
            ours = _run(_profile_job, "vlprune", family, n_samples, budget, args.repeats)
            diffs = {k: abs(ours["ids"][k] - v) / abs(v) for k, v in naive["ids"].items()}
            worst = max(diffs, key=diffs.__getitem__)
            rows.append((label, budget, ours, diffs[worst], worst))
        for label, budget, ours, diff, worst in rows:
            out["profile"].append(
                {
                    "model": family,
                    "route": label,
                    "budget_mb": budget,
                    "naive": naive,
                    "vlprune": ours,
                    "max_rel_diff": diff,
                    "worst_layer": worst,
                }
            )
            w(
                f"| {family} | {ours['layers']} | {label} | {ours['forward_calls']} | {ours['time']:.2f} | "
                f"{ours['peak_mb']:.0f} | {_ratio(naive['time'], ours['time']):.2f} | "
                f"{_ratio(naive['peak_mb'], ours['peak_mb'], 1.0):.2f} | {diff:.1e} |\n"
            )
        w(
            f"| {family} | {naive['layers']} | naive: hooks store all outputs + skdim per layer | "
            f"{naive['forward_calls']} | {naive['time']:.2f} | {naive['peak_mb']:.0f} | 1.00 | 1.00 | - |\n"
        )
        sys.stdout.flush()

    # the per-layer IDs of the naive route are kept once per model; the routes' own are dropped
    for row in out["profile"]:
        row["layer_ids_skdim"] = row["naive"].get("ids")
        row["vlprune"].pop("ids", None)
    for row in out["profile"]:
        row["naive"].pop("ids", None)
    out["wall_s"] = time.perf_counter() - began
    gaps = [
        (r["N"], r["D"], k, r[k]["rss_baseline_gap_mb"]) for r in out["twonn"] for k in ("skdim", "vlprune") if r[k]["rss_baseline_gap_mb"] > 20
    ]
    if gaps:
        w(f"\nwarning: baseline peak RSS above current RSS by > 20 MB (peak growth understated): {gaps}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    w(f"\nraw numbers: {args.out}; wall time {out['wall_s']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
