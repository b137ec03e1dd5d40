"""The report of a recipe run: ``DIR/report.json``, ``DIR/report.md`` and PNG plots.

Sections: parameters, MACs (``torch_pruning.utils.count_ops_and_params``: the modules Torch-Pruning
counts, Linear / Conv / Embedding ..., on the data's example batch), CPU latency of the unpruned and
the pruned model measured side by side (alternating forwards, median), metrics before / after (the
last evaluate stage), time per stage, the recipe as run with every default filled in. Plots: the ID
profile (if a stage computed one), kept MLP widths and heads per layer, metrics before / after.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlprune.recipes.context import RecipeContext
from vlprune.recipes.schema import ResolvedRecipe

__all__ = ["measure_model", "side_by_side_latency", "build_report", "render_markdown"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def measure_model(model: nn.Module, example_inputs: dict[str, Any]) -> dict[str, float]:
    """``{"params": ..., "macs": ...}`` of ``model`` (MACs on ``example_inputs``, as Torch-Pruning
    counts them; None if counting fails)."""
    import torch_pruning as tp

    params = sum(p.numel() for p in model.parameters())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # tp prints batch-size guesses
            macs, _ = tp.utils.count_ops_and_params(model, example_inputs=dict(example_inputs))
        macs_value: float | None = float(macs)
    except Exception as exc:  # counting is a report nicety; never fail a finished run for it
        logger.warning("MACs could not be counted: %s", exc)
        macs_value = None
    return {"params": int(params), "macs": macs_value}  # type: ignore[dict-item]


@torch.no_grad()
def side_by_side_latency(
    a: nn.Module, b: nn.Module, inputs: dict[str, Any], repeats: int = 10, warmup: int = 2
) -> tuple[float, float]:
    """Median CPU forward time in milliseconds of ``a`` and ``b`` on ``inputs``, alternating
    ``a, b, a, b, ...`` so that both see the same machine load."""
    from vlprune.plugins.capture import preserved_mode

    times: tuple[list[float], list[float]] = ([], [])
    with preserved_mode(a, training=False), preserved_mode(b, training=False):
        for i in range(warmup + repeats):
            for j, m in enumerate((a, b) if i % 2 == 0 else (b, a)):
                t0 = time.perf_counter()
                m(**inputs)
                dt = (time.perf_counter() - t0) * 1000.0
                if i >= warmup:
                    times[j if i % 2 == 0 else 1 - j].append(dt)
    return statistics.median(times[0]), statistics.median(times[1])


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def _plot_widths(teacher: nn.Module, student: nn.Module, path: Path) -> Path | None:
    from vlprune.recipes.steps_core import model_widths

    try:
        wt, ws = model_widths(teacher), model_widths(student)
    except Exception as exc:
        logger.warning("widths plot skipped: %s", exc)
        return None
    if not wt["mlp"] and not wt["heads"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, kind, label in ((axes[0], "mlp", "MLP hidden width"), (axes[1], "heads", "attention heads")):
        names = list(wt[kind])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [wt[kind][n] for n in names], width=0.4, label="before", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], [ws[kind].get(n, 0) for n in names], width=0.4, label="after", color="#1f77b4")
        ax.set_xticks(list(x))
        ax.set_xticklabels([_short(n) for n in names], rotation=70, fontsize=7)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("kept widths per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("model", "encoder", "layers", "layer", "mlp", "self_attn", "attention")]
    return ".".join(parts[-3:])


def _plot_metrics(metrics: dict[str, dict[str, float]], path: Path) -> Path | None:
    names = sorted(set(metrics.get("before", {})) | set(metrics.get("after", {})))
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [metrics.get("before", {}).get(n, 0.0) for n in names], width=0.4, label="before", color="#bbbbbb")
    ax.bar([i + 0.2 for i in x], [metrics.get("after", {}).get(n, 0.0) for n in names], width=0.4, label="after", color="#1f77b4")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05 * max([1.0, *metrics.get("before", {}).values(), *metrics.get("after", {}).values()]))
    ax.set_title("metrics before / after")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "M":
        return f"{v / 1e6:.2f} M"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md`` from the report dict."""
    s = report["size"]
    lines = [
        f"# Recipe {report['recipe']['name']}",
        "",
        report["recipe"].get("description", ""),
        "",
        f"- model: `{report['model']}`",
        f"- data: `{report['data']}`",
        f"- framework: `{report['recipe']['framework']}`, seed {report['recipe']['seed']}",
        f"- total time: {report['seconds_total']:.1f} s",
        "",
        "## Size and speed",
        "",
        "| | before | after | after / before |",
        "|---|---|---|---|",
        f"| parameters | {_fmt(s['params_before'], 'int')} | {_fmt(s['params_after'], 'int')} | {_fmt(s['params_ratio'])} |",
        f"| MACs | {_fmt(s['macs_before'], 'M')} | {_fmt(s['macs_after'], 'M')} | {_fmt(s['macs_ratio'])} |",
        f"| CPU latency (ms, median, side by side) | {_fmt(s['latency_ms_before'])} | {_fmt(s['latency_ms_after'])} | {_fmt(s['latency_ratio'])} |",
        "",
        "## Metrics",
        "",
    ]
    m = report.get("metrics") or {}
    names = sorted(set(m.get("before", {})) | set(m.get("after", {})))
    if names:
        kind = report.get("metrics_kind") or ""
        if kind == "agreement":
            lines += ["Teacher-student agreement on held-out user data (before = the unpruned model with itself).", ""]
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(m.get('before', {}).get(n))} | {_fmt(m.get('after', {}).get(n))} |" for n in names]
    else:
        lines.append("No evaluate stage ran.")
    lines += ["", "## Stages", "", "| stage | runs | seconds |", "|---|---|---|"]
    lines += [f"| {st['key']} | {st['runs']} | {st['seconds']:.1f} |" for st in report["stages"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({path})" for name, path in report["plots"].items()]
    lines += ["", "## Recipe as run", "", "```json", json.dumps(report["recipe"], indent=2), "```", ""]
    return "\n".join(lines)


def build_report(
    ctx: RecipeContext, resolved: ResolvedRecipe, manifest: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Measure, plot and write ``report.json`` / ``report.md`` into ``ctx.out``.

    Returns:
        ``(report dict, paths)`` with paths ``out``, ``report_json``, ``report_md`` and each plot.
    """
    out = ctx.out
    example = ctx.data.example_inputs()
    teacher, student = ctx.teacher, ctx.model
    before = measure_model(teacher, example)
    after = measure_model(student, example)
    settings = resolved.spec.report
    lat_before, lat_after = side_by_side_latency(
        teacher, student, example, repeats=settings.latency_repeats, warmup=settings.latency_warmup
    )
    metrics: dict[str, dict[str, float]] = {}
    metrics_kind = None
    for _, result in ctx.iter_results():
        if isinstance(result.get("metrics"), dict):
            metrics, metrics_kind = result["metrics"], result.get("kind")
    paths: dict[str, Path] = {"out": out}
    plots: dict[str, str] = {}
    id_json = ctx.latest("id_profile")
    if id_json is not None:
        from vlprune.plugins.intrinsic_dim import IDProfile

        try:
            p = IDProfile.from_json(ctx.path(id_json)).plot(out / "id_profile.png")
            plots["id_profile"] = p.name
        except Exception as exc:
            logger.warning("ID profile plot skipped: %s", exc)
    w = _plot_widths(teacher, student, out / "widths.png")
    if w is not None:
        plots["widths"] = w.name
    mp = _plot_metrics(metrics, out / "metrics.png")
    if mp is not None:
        plots["metrics"] = mp.name
    for name, rel in plots.items():
        paths[f"plot_{name}"] = out / rel
    stages = [
        {
            "key": st.key, "step": st.step, "runs": st.spec.name,
            "seconds": float(ctx.timings.get(st.key, 0.0)), "result": ctx.results.get(st.key, {}),
        }
        for st in resolved.stages
    ]
    report = {
        "recipe": resolved.to_dict(),
        "model": manifest.get("model"),
        "data": manifest.get("data"),
        "testbed": ctx.testbed,
        "size": {
            "params_before": before["params"], "params_after": after["params"],
            "params_ratio": _ratio(after["params"], before["params"]),
            "macs_before": before["macs"], "macs_after": after["macs"],
            "macs_ratio": _ratio(after["macs"], before["macs"]),
            "latency_ms_before": lat_before, "latency_ms_after": lat_after,
            "latency_ratio": _ratio(lat_after, lat_before),
            "latency_inputs": {k: list(v.shape) for k, v in example.items() if isinstance(v, torch.Tensor)},
        },
        "metrics": metrics,
        "metrics_kind": metrics_kind,
        "stages": stages,
        "seconds_total": float(sum(s["seconds"] for s in stages)),
        "plots": plots,
    }
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("report.md", render_markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)
    paths["report_json"] = out / "report.json"
    paths["report_md"] = out / "report.md"
    return report, paths
