"""Benchmark: the intrinsic-dimension (ID) profile of real pretrained models over depth.

Re-measures the ID-pruning paper's figure on real weights (issue 15, part 4): does real DINOv2-S
show the vision "hunchback" (ID rising then falling over its 12 layers), and is real SmolLM2-135M's
profile over its 30 layers flat and low?

Representation: the paper's (``representation="flatten"``): one sample = a module's output over the
whole token sequence, flattened; TwoNN (linear fit, 10% largest ratios discarded, as
``skdim.id.TwoNN``) through :func:`vlprune.estimate_ids` (:func:`vlprune.plugins.intrinsic_dim.estimate_ids`
for SmolLM2's decoder without its ``lm_head``). The paper averages over 1..20 random blocks; this
script uses the whole sample once (``n_blocks=None``).

* **DINOv2-S** (``vlprune.testbed.real.load("dinov2-s")``): real MNIST digits of the testbed's train
  pool (class-balanced, seeded), made RGB and resized to ``--image-size`` px (112: 8 x 8 patches +
  CLS = 65 tokens; 224, the native size, has 257 and costs 4x); modules: every layer's output
  (``encoder.layer.<l>``) and its six linears (q/k/v/o, fc1, fc2).
* **SmolLM2** (``real.load("smollm2")``): the real-tier template passages
  (:func:`vlprune.testbed.real_tasks.smollm2_texts`, math and general alternating, seeds disjoint from
  the perplexity evaluation's), each cut to its first ``--seq-len`` tokens (every passage is longer,
  so there is no padding); modules: every decoder layer's output and its seven linears
  (q/k/v/o, gate, up, down).

Output: ``docs/benchmarks_real_id_profile.json`` (every module's ID and sample count, per-layer
summaries, the hunchback / flatness statistics, wall times) and ``docs/benchmarks_real_id_profile.png``.

    .venv/bin/python benchmarks/bench_real_id_profile.py            # N = 500 per model (CPU about 5 min)
    .venv/bin/python benchmarks/bench_real_id_profile.py --quick    # N = 64, block outputs only (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODELS = ("dinov2-s", "smollm2")

#: linear types per model, in forward order inside a layer
LINEARS = {
    "dinov2-s": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"),
    "smollm2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
#: the MLP linears whose IDs weight ID-PLATON's MLP-neuron groups
MLP_LINEARS = {"dinov2-s": ("mlp.fc1", "mlp.fc2"), "smollm2": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
#: prefix of the layer list in the profiled module (SmolLM2: the LlamaModel inside the causal LM)
LAYER_PREFIX = {"dinov2-s": "encoder.layer", "smollm2": "layers"}
N_LAYERS = {"dinov2-s": 12, "smollm2": 30}


def dinov2_batches(n: int, image_size: int = 112, batch_size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` real MNIST digits (testbed train pool, class-balanced, seeded) as DINOv2 ``pixel_values`` batches."""
    from vlprune.testbed import real, real_tasks

    images = real_tasks.dinov2_digit_data("mnist", n_train=n, n_test=1, seed=seed)[0]
    proc = real.processor("dinov2-s")
    return [
        {"pixel_values": real_tasks.digit_pixel_values(images[s : s + batch_size], proc, image_size)}
        for s in range(0, n, batch_size)
    ]


def smollm2_token_ids(n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(n, seq_len)`` token ids: template passages, math and general alternating, each cut to its
    first ``seq_len`` tokens (seeds ``seed`` and up: disjoint from the perplexity evaluation's seed 0
    when ``seed >= 1``)."""
    from vlprune.errors import DataError
    from vlprune.testbed import real, real_tasks

    tok = real.processor("smollm2")
    half = (n + 1) // 2
    texts = [t for pair in zip(real_tasks.smollm2_texts("math", half, seed=seed),
                               real_tasks.smollm2_texts("general", half, seed=seed)) for t in pair][:n]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    short = min(len(i) for i in ids)
    if short < seq_len:
        raise DataError(f"seq_len={seq_len} but the shortest passage has {short} tokens; lower seq_len")
    return torch.tensor([i[:seq_len] for i in ids], dtype=torch.long)


def smollm2_batches(n: int, seq_len: int = 32, batch_size: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """:func:`smollm2_token_ids` as ``input_ids`` batches (no padding, so no attention mask)."""
    ids = smollm2_token_ids(n, seq_len, seed)
    return [{"input_ids": ids[s : s + batch_size]} for s in range(0, n, batch_size)]


def profiled_modules(name: str, which: str, layers: Sequence[int] | None = None) -> list[str]:
    """Module paths to profile (relative to :func:`profiled_model`).

    Args:
        name: ``"dinov2-s"`` or ``"smollm2"``.
        which: ``"blocks"`` (each layer's output), ``"linears"`` (every linear of each layer),
            ``"both"`` or ``"mlp"`` (the MLP linears ID-PLATON weights).
        layers: layer indices (default: all).
    """
    if which not in ("blocks", "linears", "both", "mlp"):
        raise ValueError(f"which must be blocks, linears, both or mlp, got {which!r}")
    prefix = LAYER_PREFIX[name]
    out: list[str] = []
    for layer in (range(N_LAYERS[name]) if layers is None else layers):
        if which in ("linears", "both"):
            out += [f"{prefix}.{layer}.{x}" for x in LINEARS[name]]
        if which == "mlp":
            out += [f"{prefix}.{layer}.{x}" for x in MLP_LINEARS[name]]
        if which in ("blocks", "both"):
            out.append(f"{prefix}.{layer}")
    return out


def profiled_model(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The module whose outputs are profiled: DINOv2 itself, SmolLM2's decoder without ``lm_head``."""
    return model.model if name == "smollm2" else model


def id_profile(
    name: str,
    model: torch.nn.Module | None = None,
    *,
    n_samples: int = 500,
    which: str = "both",
    layers: Sequence[int] | None = None,
    image_size: int = 112,
    seq_len: int = 32,
    batch_size: int = 32,
    seed: int = 0,
    max_memory_mb: float = 1536.0,
    storage_dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> Any:
    """ID profile (``flatten`` TwoNN) of a real model's chosen modules.

    Args:
        name: ``"dinov2-s"`` or ``"smollm2"``.
        model: the model (default ``real.load(name)``); for SmolLM2 the ``LlamaForCausalLM``.
        n_samples: images / passages.
        which / layers: see :func:`profiled_modules`.
        image_size: DINOv2 input side (px).
        seq_len: SmolLM2 tokens per passage.
        batch_size: samples per forward pass.
        seed: data seed (SmolLM2 uses ``seed + 1``, disjoint from the evaluation passages).
        max_memory_mb / storage_dtype: :func:`vlprune.plugins.intrinsic_dim.estimate_ids`'s bound
            on stored activations (float16 storage; distances are computed in float32 / float64).
        progress: progress bars.

    Returns:
        An :class:`vlprune.plugins.intrinsic_dim.IDProfile` with module names relative to
        :func:`profiled_model` and modality ``vision`` / ``language``.
    """
    from vlprune.plugins.intrinsic_dim import estimate_ids
    from vlprune.testbed import real

    if model is None:
        model = real.load(name)
    if name == "dinov2-s":
        batches = dinov2_batches(n_samples, image_size, batch_size, seed)
        modality = "vision"
    else:
        batches = smollm2_batches(n_samples, seq_len, batch_size, seed + 1)
        modality = "language"
    return estimate_ids(
        profiled_model(name, model), batches, profiled_modules(name, which, layers), n_samples=n_samples,
        representation="flatten", modality_of=lambda _: modality, max_memory_mb=max_memory_mb,
        storage_dtype=storage_dtype, progress=progress,
    )


def depth_table(name: str, ids: dict[str, float]) -> dict[str, list[float | None]]:
    """Per-layer series: ``"block"`` (layer output) and one per linear type, plus ``"linear_mean"``."""
    prefix = re.escape(LAYER_PREFIX[name])
    series: dict[str, list[float | None]] = {"block": [None] * N_LAYERS[name]}
    for kind in LINEARS[name]:
        series[kind] = [None] * N_LAYERS[name]
    for module, value in ids.items():
        m = re.fullmatch(rf"{prefix}\.(\d+)(?:\.(.+))?", module)
        if m is None:
            continue
        series["block" if m.group(2) is None else m.group(2)][int(m.group(1))] = round(float(value), 3)
    rows = [[v for k, s in series.items() if k != "block" for v in [s[i]] if v is not None] for i in range(N_LAYERS[name])]
    series["linear_mean"] = [round(float(np.mean(r)), 3) if r else None for r in rows]
    return {k: v for k, v in series.items() if any(x is not None for x in v)}


def shape_stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Shape of an ID-over-depth curve.

    ``hunchback`` (the paper's vision shape) is True when the peak is strictly inside (not the first
    or last layer) and the curve both rises from the first layer to the peak and falls from the peak
    to the last layer by at least 20% of the peak. ``cv`` = std / mean (flatness)."""
    pts = [(i, float(v)) for i, v in enumerate(values) if v is not None]
    if len(pts) < 3:
        return {"layers": len(pts)}
    idx, vals = zip(*pts)
    arr = np.array(vals)
    peak = int(np.argmax(arr))
    rise, fall = arr[peak] - arr[0], arr[peak] - arr[-1]
    return {
        "layers": len(pts), "first": round(arr[0], 2), "peak": round(float(arr[peak]), 2), "peak_layer": idx[peak],
        "last": round(arr[-1], 2), "min": round(float(arr.min()), 2), "mean": round(float(arr.mean()), 2),
        "cv": round(float(arr.std() / arr.mean()), 3),
        "rise_frac": round(float(rise / arr[peak]), 3), "fall_frac": round(float(fall / arr[peak]), 3),
        "hunchback": bool(0 < peak < len(arr) - 1 and rise >= 0.2 * arr[peak] and fall >= 0.2 * arr[peak]),
    }


def plot(results: dict[str, Any], path: Path) -> Path:
    """Two panels (DINOv2-S, SmolLM2): ID over depth, layer outputs and each linear type."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for kind, values in res["depth"].items():
            xs = [i for i, v in enumerate(values) if v is not None]
            style = dict(lw=2.5, color="black") if kind == "block" else (
                dict(lw=2, ls="--", color="tab:red") if kind == "linear_mean" else dict(lw=1, alpha=0.7))
            ax.plot(xs, [values[i] for i in xs], marker="o", ms=3, label=kind.split(".")[-1] if "." in kind else kind, **style)
        ax.set_title(f"{name}: {res['n_samples']} samples, flatten ({res['tokens']} tokens)")
        ax.set_xlabel("layer")
        ax.set_ylabel("intrinsic dimension (TwoNN)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load, profile and summarise one model."""
    from vlprune.testbed import real

    start = time.perf_counter()
    model = real.load(name)
    profile = id_profile(
        name, model, n_samples=args.n_samples, which=args.which, image_size=args.image_size, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed, max_memory_mb=args.max_memory_mb, progress=args.progress,
    )
    ids = profile.ids()
    depth = depth_table(name, ids)
    return {
        "n_samples": min(x.n_samples for x in profile.layers.values()),
        "tokens": (args.image_size // 14) ** 2 + 1 if name == "dinov2-s" else args.seq_len,
        "modules": {n: {"id": round(x.id, 3), "n_samples": x.n_samples, "features": x.features} for n, x in profile.layers.items()},
        "depth": depth,
        "shape": {kind: shape_stats(values) for kind, values in depth.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--n-samples", type=int, default=500)
    parser.add_argument("--which", default="both", choices=("blocks", "linears", "both"))
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-memory-mb", type=float, default=1536.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="64 samples, layer outputs only")
    parser.add_argument("--out", default=None, help="JSON path (default docs/benchmarks_real_id_profile.json; --quick: none)")
    parser.add_argument("--plot", default=None, help="PNG path (default docs/benchmarks_real_id_profile.png; --quick: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_samples, args.which = 64, "blocks"
    elif args.out is None:
        args.out, args.plot = str(DOCS / "benchmarks_real_id_profile.json"), args.plot or str(DOCS / "benchmarks_real_id_profile.png")
    quiet_cpu_setup(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.models:
        results[name] = run_model(name, args)
        summary = {k: results[name]["shape"][k] for k in ("block", "linear_mean") if k in results[name]["shape"]}
        sys.stdout.write(f"{name} ({results[name]['seconds']} s): {json.dumps(summary)}\n")
        sys.stdout.flush()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "args": vars(args), "representation": "flatten", "estimator": "TwoNN linear, discard_fraction 0.1",
        "models": results, "seconds": round(time.perf_counter() - start, 1),
    }
    sys.stdout.write(f"wall time {result['seconds']} s\n")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
