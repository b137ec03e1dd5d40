"""``make demo``: profile a model's intrinsic dimension, prune it 40% with ID-weighted Taylor
importance through Torch-Pruning, check it still runs, save and reload it.

Until the trained testbed models exist (Step 2), the model is a tiny LLaVA built from a config
with random weights: the ID numbers show the mechanics, not a finding.

    python -m vlprune.testbed.demo --out out/demo
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch_pruning as tp

import vlprune
from vlprune.adapters.torch_pruning import IDWeightedImportance, prune_hf_model
from vlprune.testbed.tiny import example_inputs, tiny_model

logger = logging.getLogger("vlprune.demo")


def _count(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> tuple[float, float]:
    """MACs and parameters by Torch-Pruning's counter (its chatter on stdout silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return tp.utils.count_ops_and_params(model, example)


def _latency_pair(
    a: torch.nn.Module, b: torch.nn.Module, batch: dict[str, torch.Tensor], rounds: int = 7, repeats: int = 10
) -> tuple[float, float]:
    """Median per-call CPU latency of two models, measured in alternating rounds."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        a(**batch), b(**batch)
        for _ in range(rounds):
            for model, sink in ((a, times[0]), (b, times[1])):
                start = time.perf_counter()
                for _ in range(repeats):
                    model(**batch)
                sink.append((time.perf_counter() - start) / repeats)
    return statistics.median(times[0]), statistics.median(times[1])


def run(out: Path, family: str = "llava", ratio: float = 0.4, n_samples: int = 256, seed: int = 0) -> dict[str, float]:
    """Run the demo; returns the before/after numbers."""
    write = sys.stdout.write
    model = tiny_model(family, seed=seed)
    calib = [example_inputs(family, batch_size=16, seed=seed + 1 + i) for i in range(n_samples // 16)]
    write(f"model: tiny {family} from a config ({sum(p.numel() for p in model.parameters()):,} parameters)\n\n")

    profile = vlprune.estimate_ids(model, calib, n_samples=n_samples, progress=False)
    profile.to_json(out / "id.json")
    profile.plot(out / "id.png", title=f"ID profile, tiny {family} (random weights)")
    write("intrinsic dimension per modality (TwoNN, flatten representation)\n")
    write(f"  {'modality':9s} {'layers':>6s} {'mean':>7s} {'min':>7s} {'max':>7s}\n")
    for modality, s in profile.summary().items():
        write(f"  {modality:9s} {int(s['layers']):6d} {s['mean']:7.1f} {s['min']:7.1f} {s['max']:7.1f}\n")
    write(f"  plot: {out / 'id.png'}\n\n")

    example = example_inputs(family, batch_size=2, seed=seed)
    base_macs, base_params = _count(model, example)
    reference = example_inputs(family, batch_size=4, seed=seed + 999)
    original = copy.deepcopy(model)

    # gradients for the Taylor base: the language-modelling loss on the calibration batches
    model.zero_grad()
    for batch in calib[:4]:
        labels = batch["input_ids"].clone()
        model(**batch, labels=labels).loss.backward()
    imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile)
    prune_hf_model(model, example, imp, pruning_ratio=ratio)
    model.zero_grad(set_to_none=True)

    macs, params = _count(model, example)
    before_latency, after_latency = _latency_pair(original, model, reference)
    del original
    with torch.no_grad():
        logits = model(**reference).logits
    saved = vlprune.save_pruned(model, out / "pruned")
    reloaded = vlprune.load_pruned(saved)
    with torch.no_grad():
        same = torch.equal(reloaded(**reference).logits, logits)

    rows = [
        ("parameters", f"{base_params:,.0f}", f"{params:,.0f}", params / base_params),
        ("MACs", f"{base_macs:,.0f}", f"{macs:,.0f}", macs / base_macs),
        ("CPU latency (s, side by side)", f"{before_latency:.4f}", f"{after_latency:.4f}", after_latency / before_latency),
    ]
    write(f"pruned {ratio:.0%} with ID-weighted Taylor importance (Torch-Pruning, global ranking)\n")
    write(f"  {'':29s} {'before':>12s} {'after':>12s} {'ratio':>7s}\n")
    for name, a, b, r in rows:
        write(f"  {name:29s} {a:>12s} {b:>12s} {r:7.3f}\n")
    write(f"\nsaved to {saved}; reloaded outputs identical: {same}\n")
    if not same:
        raise vlprune.VLPruneError("the reloaded pruned model does not reproduce the pruned model's outputs")
    return {"params_ratio": params / base_params, "macs_ratio": macs / base_macs, "latency_ratio": after_latency / before_latency}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--family", default="llava", choices=["llava", "clip"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*(Unwrapped parameters|No positional inputs).*")
    run(Path(args.out), args.family, args.ratio, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
