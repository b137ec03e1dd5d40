"""Visual-token pruning: quality on the testbed LLaVA, theoretical prefill FLOPs, measured latency.

Quality: the testbed LLaVA (16 image tokens per scene, 4 decoder layers, eager attention) is
evaluated with ``vlprune.testbed.evaluate(model, "vqa" | "caption", n=...)`` under
``vlprune.prune_visual_tokens`` at keep ratios 5 / 10 / 25 / 50 / 100 %, i.e. 1 / 2 / 4 / 8 / 16 of
the 16 image tokens (``round(ratio * 16)``, at least 1). Methods:

* ``divprune`` (positions ``original``, the default) and ``divprune`` with ``contiguous`` positions;
* ``fastv`` with K = 2 (the paper's K; here half of the 4 layers see every token) and K = 1;
* ``uniform`` (every N/M-th token) and ``random`` (seeds 0, 1, 2; mean reported).

At 100 % only ``divprune`` and ``fastv`` (K = 2) are run, as a check that keeping every token gives
the unpruned numbers; the table fills the 100 % column of the others with the unpruned numbers.

FLOPs: the papers' prefill formula ``T (4 n d^2 + 2 n^2 d + 2 n d m)`` of the language model
(``vlprune.adapters.hf.token_cost.prefill_flops``; FastV: K layers at n, T - K at the pruned count)
for the testbed LLaVA (n = 16 image tokens + the mean VQA prompt text) and for a LLaVA-1.5-7B shape
(576 image + 60 text tokens, d = 4096, m = 11008, T = 32; formula only, no model).

Latency: ``measure_token_pruning`` (prefill = time to the first token, end-to-end = greedy
``generate`` of 16 tokens; unpruned and pruned alternate in every repeat, best of ``--repeats``) on a
randomly initialised LLaVA with 576 image tokens (CLIP tower 336 px / patch 14, 2 layers x 256;
Llama decoder 8 layers x 512, MLP 1376, vocabulary 4096), batch 1, 576 image + 60 text tokens.

    nice python benchmarks/bench_tokens.py               # full run (26 min on 2 cores shared with 3 other jobs)
    python benchmarks/bench_tokens.py --quick            # smoke run (n=40, fewer settings)
    python benchmarks/bench_tokens.py --table            # tables + plot of an existing JSON

Writes docs/benchmarks_tokens.json and docs/benchmarks_tokens.png.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import quiet_cpu_setup, redraw, save  # noqa: E402

from vlprune.adapters.hf.token_cost import measure_token_pruning, prefill_flops  # noqa: E402
from vlprune.adapters.hf.token_pruning import prune_visual_tokens  # noqa: E402
from vlprune.plugins.token_diversity import keep_count  # noqa: E402
from vlprune.testbed import evaluate, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.05, 0.1, 0.25, 0.5, 1.0)
#: (label, method, options); the label names a row of the tables
VARIANTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("divprune", "divprune", {"positions": "original"}),
    ("divprune contiguous", "divprune", {"positions": "contiguous"}),
    ("fastv K=2", "fastv", {"layer": 2}),
    ("fastv K=1", "fastv", {"layer": 1}),
    ("uniform", "uniform_tokens", {}),
    ("random", "random_tokens", {}),
)
RANDOM_SEEDS = (0, 1, 2)
LLAVA15_7B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008, "image_tokens": 576, "text_tokens": 60}
N_IMAGE = 16


# ----------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------


def quality(model: torch.nn.Module, n: int) -> dict[str, float]:
    vqa = evaluate(model, "vqa", n=n)
    cap = evaluate(model, "caption", n=n)
    return {"math": vqa["math"], "general": vqa["general"], "cider": cap["cider"], "bleu4": cap["bleu4"]}


def testbed_prompt_tokens(n: int = 200) -> float:
    """Mean prompt length (image tokens included) of the testbed VQA questions the evaluation asks."""
    from vlprune.testbed.data import make_scenes, vqa
    from vlprune.testbed.train import lm_example

    lengths = []
    for offset, domain in enumerate(("math", "general")):
        rng = random.Random(offset)
        for scene in make_scenes("test", n, seed=offset):
            q, _ = vqa(scene, domain, rng)  # type: ignore[arg-type]
            lengths.append(len(lm_example(f"question {q}", None)[0]))
    return sum(lengths) / len(lengths)


def run_quality(model: torch.nn.Module, args: argparse.Namespace, n_prompt: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    dense = quality(model, args.n_eval)
    logging_line(f"unpruned: {dense}")
    rows: list[dict[str, Any]] = []
    ratios = args.ratios
    for ratio in ratios:
        kept = keep_count(ratio, N_IMAGE)
        for label, method, opts in VARIANTS:
            if label not in args.variants:
                continue
            if ratio == 1.0 and label not in ("divprune", "fastv K=2"):
                continue
            seeds = RANDOM_SEEDS[: args.random_seeds] if method == "random_tokens" else (None,)
            for seed in seeds:
                kwargs = dict(opts)
                if seed is not None:
                    kwargs["seed"] = seed
                start = time.perf_counter()
                with prune_visual_tokens(model, method, keep=ratio, **kwargs):
                    q = quality(model, args.n_eval)
                layer = int(opts.get("layer", 0))
                flops = prefill_flops(model, n_prompt, reduced_tokens=n_prompt - N_IMAGE + kept, from_layer=layer)
                row = {"variant": label, "method": method, "ratio": ratio, "kept_image_tokens": kept, "seed": seed,
                       **q, "flops_ratio": flops / prefill_flops(model, n_prompt),
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                logging_line(f"{label:20s} keep {ratio:>4} ({kept:2d}/16) seed={seed} math={q['math']:.3f} "
                             f"general={q['general']:.3f} cider={q['cider']:.3f} flops={row['flops_ratio']:.2f} ({row['seconds']} s)")
    return dense, rows


def logging_line(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def flops_tables(model_cfg: Any, n_prompt: int) -> dict[str, Any]:
    from transformers import LlamaConfig

    big = LlamaConfig(num_hidden_layers=LLAVA15_7B["num_hidden_layers"], hidden_size=LLAVA15_7B["hidden_size"],
                      intermediate_size=LLAVA15_7B["intermediate_size"], num_attention_heads=32)
    out: dict[str, Any] = {}
    for name, cfg, n_img, n_all, ks in (
        ("testbed_llava", model_cfg, N_IMAGE, n_prompt, (1, 2)),
        ("llava15_7b_shape", big, LLAVA15_7B["image_tokens"], LLAVA15_7B["image_tokens"] + LLAVA15_7B["text_tokens"], (2,)),
    ):
        full = prefill_flops(cfg, n_all)
        rows = []
        for ratio in RATIOS:
            kept = keep_count(ratio, n_img)
            reduced = n_all - n_img + kept
            row = {"ratio": ratio, "kept_image_tokens": kept, "divprune": prefill_flops(cfg, n_all, reduced_tokens=reduced) / full}
            for k in ks:
                row[f"fastv K={k}"] = prefill_flops(cfg, n_all, reduced_tokens=reduced, from_layer=k) / full
            rows.append(row)
        t = getattr(cfg, "text_config", None) or cfg
        out[name] = {"n_tokens": n_all, "image_tokens": n_img, "layers": t.num_hidden_layers, "hidden": t.hidden_size,
                     "mlp": t.intermediate_size, "flops_full": full, "rows": rows}
    return out


# ----------------------------------------------------------------------------------------------
# latency
# ----------------------------------------------------------------------------------------------


def latency_model(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random LLaVA with 576 image tokens (336 px / 14) and its batch-1 prompt (576 image + 60 text)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vocab = 4096
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                           num_attention_heads=4, image_size=336, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=vocab - 1, vision_feature_layer=-1, vision_feature_select_strategy="default",
        image_seq_length=576, projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab - 2, (1, 60), generator=gen)
    ids = torch.cat([text[:, :5], torch.full((1, 576), vocab - 1), text[:, 5:]], dim=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}
    return model, batch


LATENCY_SETTINGS: tuple[tuple[str, str, float, dict[str, Any]], ...] = (
    ("divprune", "divprune", 0.1, {}),
    ("divprune", "divprune", 0.25, {}),
    ("divprune", "divprune", 0.5, {}),
    ("uniform", "uniform_tokens", 0.1, {}),
    ("fastv K=2", "fastv", 0.1, {"layer": 2}),
    ("fastv K=2", "fastv", 0.5, {"layer": 2}),
)


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    model, batch = latency_model()
    rows = []
    settings = LATENCY_SETTINGS[:2] + LATENCY_SETTINGS[4:5] if args.quick else LATENCY_SETTINGS
    for label, method, ratio, opts in settings:
        attn = "eager" if method == "fastv" else "sdpa"
        model.set_attn_implementation(attn)
        stats = measure_token_pruning(model, batch, method, keep=ratio, max_new_tokens=args.new_tokens,
                                      repeats=args.repeats, warmup=1, **opts)
        row = {"variant": label, "ratio": ratio, "attn": attn, **{k: round(v, 5) for k, v in stats.items()}}
        rows.append(row)
        logging_line(f"latency {label:10s} keep {ratio}: prefill {stats['prefill_s_full']:.3f} -> {stats['prefill_s_pruned']:.3f} s "
                     f"({stats['prefill_ratio']:.2f}x), generate {stats['generate_s_full']:.3f} -> "
                     f"{stats['generate_s_pruned']:.3f} s ({stats['generate_ratio']:.2f}x), flops {stats['flops_ratio']:.2f}")
    t = model.config.text_config
    return {"model": {"image_tokens": 576, "text_tokens": 60, "layers": t.num_hidden_layers, "hidden": t.hidden_size,
                      "mlp": t.intermediate_size, "vocab": t.vocab_size, "vision": "CLIP 336px/14, 2 x 256"},
            "batch": 1, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}


# ----------------------------------------------------------------------------------------------
# main, tables, plot
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: n=40, ratios 10/50 %%, fewer settings")
    parser.add_argument("--n-eval", type=int, default=500, help="test scenes per VQA domain and for captions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="latency: timed rounds (best kept)")
    parser.add_argument("--new-tokens", type=int, default=16, help="latency: generated tokens")
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=[v[0] for v in VARIANTS])
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_tokens.json"))
    parser.add_argument("--table", action="store_true", help="print the tables of an existing --out JSON and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table:
        return redraw(out, table, plot)
    args.ratios = RATIOS
    if args.quick:
        args.n_eval, args.ratios, args.repeats, args.random_seeds = 40, (0.1, 0.5, 1.0), 1, 1
    quiet_cpu_setup(args.threads)
    start = time.perf_counter()

    model = load("llava")
    model.set_attn_implementation("eager")  # FastV needs attention weights; every method runs on the same model
    n_prompt = round(testbed_prompt_tokens())
    dense, rows = run_quality(model, args, n_prompt)
    flops = flops_tables(model.config, n_prompt)
    latency = None if args.skip_latency else run_latency(args)
    import transformers

    result = {
        "benchmark": "visual-token pruning: testbed LLaVA quality, prefill FLOPs, latency",
        "quick": args.quick, "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "n_eval": args.n_eval, "image_tokens": N_IMAGE, "prompt_tokens": n_prompt,
        "ratios": list(args.ratios), "kept": {str(r): keep_count(r, N_IMAGE) for r in args.ratios},
        "dense": dense, "rows": rows, "flops": flops, "latency": latency,
        "seconds": round(time.perf_counter() - start, 1),
    }
    save(out, result, table, plot)
    return 0


def means(result: dict[str, Any]) -> dict[tuple[str, float], dict[str, float]]:
    """Metrics per (variant, ratio), random averaged over its seeds; ratio 1.0 = unpruned where not run."""
    acc: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        acc.setdefault((r["variant"], r["ratio"]), []).append(r)
    out = {k: {m: sum(r[m] for r in v) / len(v) for m in ("math", "general", "cider", "bleu4", "flops_ratio")}
           for k, v in acc.items()}
    variants = {r["variant"] for r in result["rows"]}
    if 1.0 in result["ratios"]:
        for v in variants:
            out.setdefault((v, 1.0), {**result["dense"], "flops_ratio": 1.0})
    return out


def variant_order(result: dict[str, Any]) -> list[str]:
    names = [v[0] for v in VARIANTS]
    return sorted({r["variant"] for r in result["rows"]}, key=names.index)


def table(result: dict[str, Any]) -> str:
    """Markdown tables: quality per metric, FLOPs, latency."""
    m = means(result)
    ratios = result["ratios"]
    kept = result["kept"]
    d = result["dense"]
    lines = [f"Testbed LLaVA, {result['n_eval']} test scenes per task; unpruned math {d['math']:.3f}, general "
             f"{d['general']:.3f}, CIDEr/10 {d['cider']:.3f}. Columns: keep ratio (image tokens kept of 16).", ""]
    head = "| method | " + " | ".join(f"{int(r * 100)}% ({kept[str(r)]})" for r in ratios) + " |"
    for metric, title in (("math", "VQA math"), ("general", "VQA general"), ("cider", "caption CIDEr/10")):
        lines += [f"{title}:", "", head, "|---|" + "---|" * len(ratios)]
        for v in variant_order(result):
            cells = [f"{m[(v, r)][metric]:.3f}" if (v, r) in m else "" for r in ratios]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Theoretical prefill FLOPs of the language model on the testbed prompt (pruned / unpruned):", "",
              head, "|---|" + "---|" * len(ratios)]
    for v in variant_order(result):
        lines.append(f"| {v} | " + " | ".join(f"{m[(v, r)]['flops_ratio']:.2f}" if (v, r) in m else "" for r in ratios) + " |")
    lines.append("")
    for name, f in result["flops"].items():
        cols = [k for k in f["rows"][0] if k not in ("ratio", "kept_image_tokens")]
        lines += [f"FLOPs formula, {name}: n = {f['n_tokens']} ({f['image_tokens']} image), T = {f['layers']}, "
                  f"d = {f['hidden']}, m = {f['mlp']}; unpruned {f['flops_full'] / 1e12:.3g} TFLOPs "
                  "(pruned / unpruned):", "",
                  "| keep | image tokens | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for row in f["rows"]:
            lines.append(f"| {int(row['ratio'] * 100)}% | {row['kept_image_tokens']} | "
                         + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
        lines.append("")
    lat = result.get("latency")
    if lat:
        mm = lat["model"]
        lines += [f"Latency, random LLaVA ({mm['image_tokens']} image + {mm['text_tokens']} text tokens, {mm['layers']} "
                  f"layers x {mm['hidden']}, {mm['vision']}), batch {lat['batch']}, best of {lat['repeats']}, "
                  f"generate = {lat['new_tokens']} new tokens:", "",
                  "| method | keep | attention | FLOPs ratio | prefill s (full -> pruned) | prefill ratio | "
                  "generate s (full -> pruned) | generate ratio |", "|---|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            lines.append(f"| {r['variant']} | {int(r['ratio'] * 100)}% | {r['attn']} | {r['flops_ratio']:.2f} | "
                         f"{r['prefill_s_full']:.3f} -> {r['prefill_s_pruned']:.3f} | {r['prefill_ratio']:.2f} | "
                         f"{r['generate_s_full']:.3f} -> {r['generate_s_pruned']:.3f} | {r['generate_ratio']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = means(result)
    d = result["dense"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (metric, title) in zip(axes, (("math", "VQA math"), ("general", "VQA general"), ("cider", "caption CIDEr/10"))):
        for v in variant_order(result):
            rs = sorted(r for (name, r) in m if name == v)
            ax.plot([result["kept"][str(r)] for r in rs], [m[(v, r)][metric] for r in rs], marker="o", label=v)
        ax.axhline(d[metric], color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ticks = sorted({result["kept"][str(r)] for r in result["ratios"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("image tokens kept (of 16)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[3]
    for v in variant_order(result):
        pts = sorted((m[(name, r)]["flops_ratio"], sum(m[(name, r)][k] / d[k] for k in ("math", "general", "cider")) / 3)
                     for (name, r) in m if name == v)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
    ax.set_xlabel("theoretical prefill FLOPs (pruned / unpruned)")
    ax.set_title("mean retention vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    axes[0].set_ylabel("score")
    fig.suptitle("testbed LLaVA: visual-token pruning (DivPrune, FastV, baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
