"""Visual-token pruning on ``llava-real`` (real DINOv2-S tower + real SmolLM2-135M, trained projector).

The testbed finding (docs/benchmarks.md, "Visual-token pruning") was measured on a 4-layer LLaVA with
16 image tokens; here the same methods run on a 30-layer pretrained language model with 64 image
tokens per scene (112 px, DINOv2 patch 14). Quality: exact-match VQA accuracy (math / general) on the
testbed's fixed test questions (``vlprune.testbed.real_llava_eval.evaluate_llava_real``, greedy decoding)
and the forced-choice digit accuracy (``digit_choice_accuracy``: "which digit is at the <position> ?",
the highest-scored of the ten digit words; chance 0.1)
under ``vlprune.prune_visual_tokens`` keeping 6 and 16 of the 64 image tokens (9.4 and 25%; DivPrune's paper setting is 9.8%; ``--keeps``). Methods:

* ``divprune`` (input stage, positions ``original``, the library default);
* ``fastv`` with K = 2 (the paper's K; 2 of the 30 layers see every token);
* ``uniform`` (every N/M-th token) and ``random`` (seed 0; ``--random-seeds`` for more).

Every method runs on the same model loaded with ``attn_implementation="eager"`` (FastV needs the
attention weights). The unpruned model is also scored on captions (``caption_*``). The blind baseline (:func:`vlprune.testbed.real_llava_eval.chance_baseline`: the
answer most often right for each question on training scenes, no image) is reported next to the
unpruned model. FLOPs: the papers' prefill formula (``vlprune.adapters.hf.token_cost.prefill_flops``)
on the mean evaluation prompt.

    python benchmarks/bench_real_tokens.py                 # default run (n=30 per task, keep 6 and 16)
    python benchmarks/bench_real_tokens.py --quick         # smoke run (n=8, keep 8 and 32)
    python benchmarks/bench_real_tokens.py --table         # table + plot of an existing JSON

Writes docs/benchmarks_real_tokens.json and docs/benchmarks_real_tokens.png. Needs the real-weights
tier (``make real``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup, redraw, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEEPS = (6, 16)
#: (label, method, options)
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("divprune", "divprune", {}),
    ("fastv K=2", "fastv", {"layer": 2}),
    ("uniform", "uniform_tokens", {}),
    ("random", "random_tokens", {}),
)
METRICS = ("math", "general", "digit_choice")
#: what evaluate_llava_real is asked for
TASKS = ("math", "general", "digit")


def log_line(text: str) -> None:
    print(text, flush=True)


def mean_prompt_tokens(n: int) -> float:
    """Mean prompt length (64 image tokens included) of the evaluation questions."""
    from vlprune.testbed.real_llava import prompt_ids
    from vlprune.testbed.real_llava_eval import eval_questions

    lengths = [len(prompt_ids(q)) for d in ("math", "general") for q in eval_questions(d, "test", n)[1]]
    return sum(lengths) / len(lengths)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    from vlprune.adapters.hf.token_cost import prefill_flops
    from vlprune.adapters.hf.token_pruning import prune_visual_tokens
    from vlprune.testbed.real_llava import N_VISUAL_TOKENS, load_llava_real
    from vlprune.testbed.real_llava_eval import chance_baseline, evaluate_llava_real

    start = time.perf_counter()
    model = load_llava_real(attn_implementation="eager")
    model.set_attn_implementation("eager")  # FastV reads attention weights; every method runs on this model

    def quality() -> dict[str, float]:
        return evaluate_llava_real(model, n=args.n_eval, tasks=TASKS, batch_size=args.batch_size)

    n_prompt = round(mean_prompt_tokens(args.n_eval))
    t = time.perf_counter()
    dense = evaluate_llava_real(model, n=args.n_eval, tasks=(*TASKS, "caption") if args.captions else TASKS, batch_size=args.batch_size)
    log_line(f"unpruned: {dense} ({time.perf_counter() - t:.0f} s)")
    blind = chance_baseline(n=args.n_eval)
    log_line(f"blind baseline: {blind}")
    rows: list[dict[str, Any]] = []
    result = {
        "benchmark": "visual-token pruning on llava-real (DINOv2-S + SmolLM2-135M, trained projector)",
        "quick": args.quick, "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "n_eval": args.n_eval, "image_tokens": N_VISUAL_TOKENS, "prompt_tokens": n_prompt, "keeps": list(args.keeps),
        "dense": dense, "blind": blind, "rows": rows, "complete": False, "seconds": 0.0,
    }
    for kept in args.keeps:
        for label, method, opts in VARIANTS:
            if label not in args.variants:
                continue
            for seed in (range(args.random_seeds) if method == "random_tokens" else (None,)):
                kwargs = dict(opts) | ({"seed": seed} if seed is not None else {})
                t = time.perf_counter()
                with prune_visual_tokens(model, method, keep=kept, **kwargs):
                    q = quality()
                layer = int(opts.get("layer", 0))
                flops = prefill_flops(model, n_prompt, reduced_tokens=n_prompt - N_VISUAL_TOKENS + kept, from_layer=layer)
                row = {"variant": label, "method": method, "kept_image_tokens": kept, "seed": seed, **q,
                       "flops_ratio": flops / prefill_flops(model, n_prompt), "seconds": round(time.perf_counter() - t, 1)}
                rows.append(row)
                result["seconds"] = round(time.perf_counter() - start, 1)
                Path(args.out).write_text(json.dumps(result, indent=1))  # partial results survive an interruption
                log_line(f"{label:10s} keep {kept:2d}/64 seed={seed} math={q['math']:.3f} general={q['general']:.3f} digit={q['digit_choice']:.3f} "
                         f"flops={row['flops_ratio']:.2f} ({row['seconds']} s)")
    result.update(complete=True, seconds=round(time.perf_counter() - start, 1))
    return result


def means(result: dict[str, Any]) -> dict[tuple[str, int], dict[str, float]]:
    """Metrics per (variant, kept), random averaged over its seeds."""
    acc: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        acc.setdefault((r["variant"], r["kept_image_tokens"]), []).append(r)
    return {k: {m: sum(r[m] for r in v) / len(v) for m in (*METRICS, "flops_ratio")} for k, v in acc.items()}


def variants(result: dict[str, Any]) -> list[str]:
    names = [v[0] for v in VARIANTS]
    return sorted({r["variant"] for r in result["rows"]}, key=names.index)


def table(result: dict[str, Any]) -> str:
    """Markdown table: per method, FLOPs and VQA math / general at each kept count."""
    m, keeps, d, b = means(result), result["keeps"], result["dense"], result["blind"]
    ks = " / ".join(str(k) for k in keeps)
    lines = [f"llava-real, {result['n_eval']} test questions per domain; unpruned math {d['math']:.3f}, general "
             f"{d['general']:.3f}, digit choice {d['digit_choice']:.3f}; blind baseline math {b['math']:.3f}, general "
             f"{b['general']:.3f}, digit choice {b['digit_choice']:.3f}. "
             f"Columns: image tokens kept of 64 ({ks}).", "",
             f"| method | FLOPs at {ks} | VQA math | VQA general | digit choice |", "|---|---|---|---|---|"]
    for v in variants(result):
        cell = {key: " / ".join(f"{m[(v, k)][key]:.{2 if key == 'flops_ratio' else 3}f}" if (v, k) in m else "-" for k in keeps)
                for key in ("flops_ratio", *METRICS)}
        lines.append(f"| {v} | {cell['flops_ratio']} | {cell['math']} | {cell['general']} | {cell['digit_choice']} |")
    cap = {k: v for k, v in d.items() if k.startswith("caption")}
    if cap:
        lines += ["", "Unpruned captions: " + ", ".join(f"{k} {v:.3f}" for k, v in cap.items()) + "."]
    lines += ["", f"Wall time {result['seconds']:.0f} s ({result['threads']} threads)"
              + ("." if result.get("complete", True) else ", interrupted: partial rows.")]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, d, b = means(result), result["dense"], result["blind"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    titles = {"math": "VQA math (exact match)", "general": "VQA general (exact match)", "digit_choice": "digit choice (forced, of 10)"}
    for ax, metric in zip(axes, METRICS):
        for v in variants(result):
            ks = sorted(k for (name, k) in m if name == v)
            ax.plot(ks, [m[(v, k)][metric] for k in ks], marker="o", label=v)
        ax.axhline(d[metric], color="gray", ls=":", lw=1, label="unpruned (64)")
        ax.axhline(b[metric], color="black", ls="--", lw=1, label="blind baseline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["keeps"], [str(k) for k in result["keeps"]])
        ax.set_xlabel("image tokens kept (of 64)")
        ax.set_title(f"{titles[metric]}, n={result['n_eval']}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[2].legend(fontsize=7)
    fig.suptitle("llava-real (DINOv2-S + SmolLM2-135M): visual-token pruning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: n=8, keep 8 and 32, divprune and fastv")
    parser.add_argument("--captions", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the unpruned model's captions")
    parser.add_argument("--n-eval", type=int, default=30, help="test questions per VQA domain (and captions, digit choices)")
    parser.add_argument("--keeps", type=int, nargs="*", default=list(KEEPS))
    parser.add_argument("--variants", nargs="*", default=[v[0] for v in VARIANTS])
    parser.add_argument("--random-seeds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_real_tokens.json"))
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out JSON and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        return redraw(out, table, plot)
    if args.quick:
        args.n_eval, args.keeps, args.variants = 8, [8, 32], ["divprune", "fastv K=2"]
    quiet_cpu_setup(args.threads)
    result = run(args)
    save(out, result, table, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
