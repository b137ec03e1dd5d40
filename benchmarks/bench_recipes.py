"""Every built-in recipe at its default settings on the testbed: wall time per stage, parameters,
MACs, CPU latency and task metrics before / after, as the recipe's own report gives them.

Each run is ``vlprune.recipes.runner.run_recipe(name, model="testbed:<model>", out=<tmp>)`` with no
override except ``framework`` (``--frameworks``), so the numbers are what a user gets from
``vlprune run <name>``. Latency and metrics come from the run's ``report.json`` (latency: median of
10 alternating forward passes of the unpruned and pruned model on 2 testbed samples; metrics: 100
test scenes per task; ``divprune``: the model with and without token pruning, plus its own prefill
FLOPs and latency).

    python benchmarks/bench_recipes.py                          # defaults: every recipe, LLaVA + CLIP
    python benchmarks/bench_recipes.py --runs amp:clip divprune:llava --frameworks nni
    python benchmarks/bench_recipes.py --quick                  # tiny overrides: a 2-3 minute smoke run

Writes docs/benchmarks_recipes.json (``--out`` elsewhere; ``--quick`` writes nothing unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: recipe:model pairs measured by default (the recipe's own model first; CLIP where the method applies:
#: layer-drop needs decoder layers and divprune an LLM's visual tokens, which CLIP has not)
DEFAULT_RUNS = (
    "id-taylor:llava", "id-platon:llava", "amp:llava", "layer-drop:llava-deep", "divprune:llava",
    "id-taylor:clip", "id-platon:clip", "amp:clip",
)

#: ``--quick``: the smallest settings that still run every stage
QUICK: dict[str, dict[str, Any]] = {
    "id-taylor": {"calibrate.n_samples": 16, "prune_id_taylor.grad_samples": 8, "distill.steps": 2,
                  "distill.n_samples": 8, "evaluate.n": 10},
    "id-platon": {"calibrate.n_samples": 16, "prune_id_platon.steps": 6, "prune_id_platon.batch_size": 4,
                  "prune_id_platon.warmup_steps": 1, "prune_id_platon.delta_t": 1, "prune_id_platon.iterative_steps": 2,
                  "distill.steps": 2, "distill.n_samples": 8, "evaluate.n": 10},
    "amp": {"prune_amp.n_samples": 16, "prune_amp.held_out_samples": 16, "prune_amp.batch_size": 8,
            "prune_amp.halvings": 2, "distill.steps": 2, "distill.n_samples": 8, "evaluate.n": 10},
    "layer-drop": {"drop_layers.n_samples": 8, "distill.steps": 2, "distill.n_samples": 8, "evaluate.n": 10},
    "divprune": {"prune_tokens.n": 10, "prune_tokens.repeats": 1},
}


def _method_details(report: dict[str, Any]) -> dict[str, Any]:
    """What each method's pruning stage decided (widths, removed layers, token FLOPs)."""
    out: dict[str, Any] = {}
    for stage in report.get("stages", []):
        r = stage.get("result") or {}
        if "widths_searched" in r:
            out["amp_widths"] = list(r["widths_searched"].values())
        if "removed" in r and "layers_before" in r:
            out.update(layers_before=r["layers_before"], layers_after=r["layers_after"], removed_layers=r["removed"])
        if "tokens" in r:
            t = r["tokens"]
            out.update(
                token_flops_ratio=t.get("flops_ratio"), kept_tokens=t.get("kept_tokens"), n_tokens=t.get("n_tokens"),
                token_prefill_ratio=t.get("prefill_ratio"), token_generate_ratio=t.get("generate_ratio"),
            )
        if "pruned_at_steps" in r:
            out["pruned_at_steps"] = r["pruned_at_steps"]
        if "shrink" in r:
            out["shrink"] = r["shrink"]
    return out


def _cpu_seconds() -> float:
    """CPU seconds (user + system, every thread) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


#: step name -> CPU seconds of its last call (filled by the wrapper :func:`_timed_steps` installs)
_STEP_CPU: dict[str, float] = {}


def _timed_steps() -> None:
    """Record each step's CPU time: wall time on a shared machine measures the other jobs too, CPU
    time divided by the threads is what an idle machine with that many cores would take (about)."""
    from vlprune.recipes import steps

    original = steps.step_fn
    if getattr(original, "_bench_timed", False):
        return

    def step_fn(spec: Any) -> Any:
        fn = original(spec)

        def timed(ctx: Any, params: Any) -> Any:
            start = _cpu_seconds()
            try:
                return fn(ctx, params)
            finally:
                _STEP_CPU[ctx.stage_key] = _cpu_seconds() - start

        return timed

    step_fn._bench_timed = True  # type: ignore[attr-defined]
    steps.step_fn = step_fn


def run_one(recipe: str, model: str, framework: str | None, quick: bool, keep: Path | None) -> dict[str, Any]:
    """One recipe run; the row for the JSON (``error`` set if it failed)."""
    from vlprune.recipes.runner import run_recipe

    _timed_steps()
    _STEP_CPU.clear()
    cpu_start = _cpu_seconds()

    overrides: dict[str, Any] = dict(QUICK.get(recipe, {})) if quick else {}
    if framework is not None:
        overrides["framework"] = framework
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{recipe}-"))
    out = (keep / f"{recipe}-{model}-{framework or 'default'}") if keep else tmp / "run"
    if keep and out.exists():
        shutil.rmtree(out)
    row: dict[str, Any] = {"recipe": recipe, "model": model, "framework": framework or "(recipe default)",
                           "overrides": overrides}
    start = time.perf_counter()
    try:
        result = run_recipe(recipe, model=f"testbed:{model}", out=out, progress=False, overrides=overrides)
    except Exception as exc:  # a benchmark records a failed run and goes on
        row["error"] = f"{type(exc).__name__}: {exc}"
        row["traceback"] = traceback.format_exc(limit=8)
        row["wall_s"] = round(time.perf_counter() - start, 1)
        row["cpu_s"] = round(_cpu_seconds() - cpu_start, 1)
        return row
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    row["wall_s"] = round(time.perf_counter() - start, 1)
    row["cpu_s"] = round(_cpu_seconds() - cpu_start, 1)
    row["stages_cpu_s"] = {k: round(v, 1) for k, v in _STEP_CPU.items()}
    report = result.report
    row["framework"] = result.recipe.get("framework")
    row["stages"] = {s["key"]: round(float(s["seconds"]), 1) for s in report.get("stages", [])}
    row["stage_runs"] = {s["key"]: s.get("runs") for s in report.get("stages", [])}
    row["size"] = report.get("size")
    row["metrics"] = report.get("metrics")
    row["metrics_kind"] = report.get("metrics_kind")
    row.update(_method_details(report))
    return row


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows (for docs/benchmarks.md)."""
    lines = [
        "| recipe | model | framework | wall s (CPU s / threads) | stages: CPU s / threads | params | MACs | latency ms | metrics before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['model']} | {r['framework']} | {r['wall_s']} | FAILED: {r['error'][:80]} | | | | |")
            continue
        size = r.get("size") or {}
        t = r.get("threads", 1)
        cpu = r.get("stages_cpu_s", {})
        stages = ", ".join(f"{k.split('-', 1)[1]} {cpu.get(k, 0.0) / t:.0f}" for k in r["stages"])
        m = r.get("metrics") or {}
        names = sorted(set(m.get("before", {})) | set(m.get("after", {})))
        metrics = "; ".join(f"{n} {_fmt(m.get('before', {}).get(n))} -> {_fmt(m.get('after', {}).get(n))}" for n in names)
        params = f"{size.get('params_before', 0) / 1e6:.2f}M -> {size.get('params_after', 0) / 1e6:.2f}M ({_fmt(size.get('params_ratio'), 2)}x)"
        macs = f"{_fmt(size.get('macs_ratio'), 2)}x"
        lat = f"{_fmt(size.get('latency_ms_before'), 0)} -> {_fmt(size.get('latency_ms_after'), 0)}"
        if r.get("token_flops_ratio") is not None:
            macs += f" (LM prefill FLOPs {_fmt(r['token_flops_ratio'], 2)}x)"
            lat += f" (prefill {_fmt(r.get('token_prefill_ratio'), 2)}x)"
        lines.append(f"| {r['recipe']} | {r['model']} | {r['framework']} | {r['wall_s']} ({r['cpu_s'] / t:.0f}) | {stages} | {params} | {macs} | {lat} | {metrics} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="recipe:testbed-model pairs")
    parser.add_argument("--frameworks", nargs="+", default=[None], help="framework overrides (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core claim)")
    parser.add_argument("--quick", action="store_true", help="tiny overrides (smoke run)")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run directory under this folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default docs/benchmarks_recipes.json)")
    args = parser.parse_args(argv)
    quiet_cpu_setup(args.threads)
    out = args.out or (None if args.quick else ROOT / "docs" / "benchmarks_recipes.json")
    rows: list[dict[str, Any]] = []
    header = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {args.threads}",
        "load_average_start": list(os.getloadavg()),
        "quick": args.quick,
    }
    for spec in args.runs:
        recipe, _, model = spec.partition(":")
        for fw in args.frameworks:
            fw = None if fw in (None, "default") else fw
            print(f"running {recipe} on {model or 'llava'} ({fw or 'recipe default'})", file=sys.stderr, flush=True)
            row = run_one(recipe, model or "llava", fw, args.quick, args.keep)
            row["load_average_after"] = list(os.getloadavg())
            row["threads"] = args.threads
            rows.append(row)
            print(f"  {row['wall_s']} s{'  FAILED: ' + row['error'] if 'error' in row else ''}", file=sys.stderr, flush=True)
            if out is not None:  # written after every run: a long benchmark keeps what it measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({**header, "rows": rows}, indent=1, default=str))
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
