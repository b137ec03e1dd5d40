"""Benchmark: how the data-driven criteria scale with model size and calibration samples.

Randomly initialised models with real shapes, built from transformers configs (no download):

* ``clip-vit-b16``: CLIP ViT-B/16 vision tower (224 px, 197 tokens, 12 layers x 768, MLP 3072);
* ``clip-vit-l14``: CLIP ViT-L/14 vision tower (224 px, 257 tokens, 24 layers x 1024, MLP 4096);
* ``llava-1b``: LLaVA with a ViT-L/14-336 tower (577 tokens, 576 visual tokens after the CLS is
  dropped) and a TinyLlama-1.1B-shaped language model (22 layers x 2048, MLP 5632, 32 query / 4 kv
  heads, vocabulary 32064), 16 text tokens per sample.

Every model runs in bfloat16 (the dtype users prune 7B models in; on this CPU bf16 matmuls use AMX
and are ~6x faster than float32). The driver builds each model once (seeded, on one thread, never
run) and forks one child process per measurement, so every measurement starts from the same
pristine model (copy-on-write) and no allocation or allocator state carries over. Each child

1. builds the batches (seeded), runs one 1-sample warm-up forward;
2. times a plain ``model(**batch)`` over the batches (no gradient) and records its peak memory;
3. times the criterion over the same batches and records its peak memory.

The ratios (criterion / forward) are therefore from the same process, a few seconds apart.

Peak memory: the child's resident set. Before each of steps 2 and 3 the kernel's high-water mark is
reset to the current RSS (``echo 5 > /proc/self/clear_refs``) and read back (``VmHWM`` in
``/proc/self/status``) when the step ends; ``peak_mb`` is that high-water mark (model, batches,
libraries included), ``extra_mb`` = peak minus the RSS just before the step. Where ``clear_refs``
is unavailable the child's lifetime ``ru_maxrss`` is reported instead (the JSON says which).

Criteria (all through vlprune's public functions, at their defaults unless stated):

* ``id_profile``: ``vlprune.estimate_ids(model, batches, n_samples=<samples>)`` (every default module,
  flatten representation, the default memory budget);
* ``taylor_idw_step``: gradients of a label-free loss over the batches (AMP's entropy objective on the
  pooled image embedding; for LLaVA, which is not measured by default: the LM loss on the text
  tokens), then one Torch-Pruning step with
  ``IDWeightedImportance(GroupTaylorImportance(), profile)`` through ``prune_hf_model`` (ratio 0.3);
  the profile is the one ``id_profile`` measured (precomputed: not timed; where that row is not
  measured in the same run, a ``representation="mean"`` profile of the same modules, also untimed);
* ``amp_importance``: ``vlprune.plugins.amp.neuron_importance`` (forward + backward per batch);
* ``amp_width_search``: ``vlprune.plugins.amp.search_widths`` over ``--search-mlps`` (default 4)
  evenly spaced vision MLPs with ``halvings=--halvings`` (default 1), on seeded random neuron scores
  (the search's cost does not depend on the score values); docs/scaling.md derives a full search's
  cost from these rows (about 110 forwards for 24 MLPs at the default 6 halvings);
* ``layer_similarity``: ``vlprune.plugins.layer_similarity.layer_similarity`` over every encoder /
  decoder layer;
* ``divprune``: vision towers: the forward plus ``divprune_select`` of 9.8% of the patch tokens of the
  last hidden state (``selection_s`` alone is reported too); LLaVA: the forward with
  ``vlprune.prune_visual_tokens(model, "divprune")`` attached (fewer tokens reach the LM).

Torch-Pruning step overhead (``tp_step``): on each vision tower, gradients and PLATON state are
computed once; one ``BasePruner`` (``hf_pruner_kwargs``, ratio 0.3, global) is built once; then, in
alternating rounds, its importance is swapped between ``GroupTaylorImportance()`` (tp alone),
``IDWeightedImportance(GroupTaylorImportance(), profile)`` (IDs precomputed), ``PlatonImportance``
and ``AMPEntropyImportance`` (scores precomputed), and one step is run in interactive mode
(importances, ranking and index selection; the groups are not applied, so every round sees the same
model). Per round: the step's time and the time inside the importance's ``__call__``; ratios to
Taylor are medians of per-round ratios.

    .venv/bin/python benchmarks/bench_scaling.py                 # full: docs/benchmarks_scaling.json, docs/benchmarks_scaling.md
    .venv/bin/python benchmarks/bench_scaling.py --merge --criteria id_profile   # re-measure some rows only
    .venv/bin/python benchmarks/bench_scaling.py --quick         # tiny shapes, a smoke run (writes nothing)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# ---------------------------------------------------------------------------------------------
# models: real shapes (and tiny ones with the same structure for --quick and the test)
# ---------------------------------------------------------------------------------------------

VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14)
VIT_L14_336 = dict(VIT_L14, image_size=336)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32064)

MODELS: dict[str, dict[str, Any]] = {
    "clip-vit-b16": {"kind": "vision", "vision": VIT_B16, "batch_size": 8},
    "clip-vit-l14": {"kind": "vision", "vision": VIT_L14, "batch_size": 8},
    "llava-1b": {"kind": "llava", "vision": VIT_L14_336, "text": LLAMA_1B, "text_tokens": 16, "batch_size": 4},
}
QUICK_MODELS: dict[str, dict[str, Any]] = {
    "tiny-vit-a": {"kind": "vision", "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8), "batch_size": 4},
    "tiny-vit-b": {"kind": "vision", "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=48, patch_size=8), "batch_size": 4},
    "tiny-llava": {
        "kind": "llava",
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
        "text_tokens": 8,
        "batch_size": 4,
    },
}
VISION_CRITERIA = ["id_profile", "taylor_idw_step", "amp_importance", "amp_width_search", "layer_similarity", "divprune"]
LLAVA_CRITERIA = ["id_profile", "taylor_idw_step", "amp_importance", "layer_similarity", "divprune"]
# sample counts per model (``default``) and per criterion where they differ: TwoNN needs >= 8 samples
# (the ID profile, and the profile the Taylor step weights by); a LLaVA-1B sample costs ~20 s of
# forward on the shared 2-core machine, so LLaVA runs 2 / 4 (ID: 8 / 16, Taylor: 8)
SAMPLES: dict[str, dict[str, list[int]]] = {
    "clip-vit-b16": {"default": [8, 16]},
    "clip-vit-l14": {"default": [8, 16]},
    "llava-1b": {"default": [2, 4], "id_profile": [8, 16], "taylor_idw_step": [8]},
}
QUICK_SAMPLES: dict[str, dict[str, list[int]]] = {
    "tiny-vit-a": {"default": [8, 16]},
    "tiny-vit-b": {"default": [8, 16]},
    "tiny-llava": {"default": [4, 8], "id_profile": [8], "taylor_idw_step": [8]},
}


def model_spec(name: str) -> dict[str, Any]:
    """The spec of a full-size or quick model by name."""
    spec = MODELS.get(name) or QUICK_MODELS.get(name)
    if spec is None:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS) + sorted(QUICK_MODELS)}")
    return spec


def build_model(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A seeded, randomly initialised model of ``name``'s shapes in ``dtype``, in eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

    spec = model_spec(name)
    torch.manual_seed(seed)
    if spec["kind"] == "vision":
        return CLIPVisionModel._from_config(CLIPVisionConfig(**spec["vision"]), dtype=dtype).eval()
    text = dict(spec["text"])
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **spec["vision"]),
        text_config=dict(model_type="llama", max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, **text),
        image_token_index=text["vocab_size"] - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()


def make_batches(name: str, n_samples: int, dtype: torch.dtype, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Seeded random batches of ``n_samples`` samples for model ``name`` (the last batch may be smaller)."""
    spec = model_spec(name)
    vision = spec["vision"]
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for start in range(0, n_samples, spec["batch_size"]):
        bs = min(spec["batch_size"], n_samples - start)
        pixels = torch.randn(bs, 3, vision["image_size"], vision["image_size"], generator=g).to(dtype)
        if spec["kind"] == "vision":
            out.append({"pixel_values": pixels})
            continue
        vocab = spec["text"]["vocab_size"]
        n_img = (vision["image_size"] // vision["patch_size"]) ** 2
        text = torch.randint(3, vocab - 1, (bs, spec["text_tokens"]), generator=g)
        ids = torch.cat([torch.full((bs, n_img), vocab - 1), text], dim=1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels})
    return out


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# peak memory of one step of a process
# ---------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of the process inside a ``with`` block (MB).

    ``method`` is ``"VmHWM after clear_refs"`` (the high-water mark reset on entry: exact for the
    block) or, where the reset is unavailable, ``"ru_maxrss"`` (the process's lifetime peak)."""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss"
        self.baseline_mb = (_status_kb("VmRSS") or 0) / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kb("VmHWM") if self.method != "ru_maxrss" else None
        if hwm is None:
            self.method = "ru_maxrss"
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        self.peak_mb = hwm / 1024
        self.extra_mb = max(self.peak_mb - self.baseline_mb, 0.0)


# ---------------------------------------------------------------------------------------------
# the criteria: setup (not timed) -> run (timed)
# ---------------------------------------------------------------------------------------------


def _encoder_layers(model: nn.Module) -> list[str]:
    """Module paths of a vision tower's encoder layers (LLaVA: None -> the decoder's default)."""
    for name, module in model.named_modules():
        if name.endswith("encoder.layers") and isinstance(module, nn.ModuleList):
            return [f"{name}.{i}" for i in range(len(module))]
    raise RuntimeError("no encoder.layers in the model")


def _vision_mlps(model: nn.Module) -> list[str]:
    import vlprune

    return [m.name for m in vlprune.describe_model(model).mlps if m.modality == "vision"]


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The label-free loss whose gradients Taylor reads: AMP's entropy objective (vision towers) or
    the LM loss on the text tokens (LLaVA)."""
    if kind == "vision":
        from vlprune.plugins import amp

        return amp.batch_objective("entropy")(model, batch)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_index, -100)
    return model(**batch, labels=labels).loss


def _profile(model: nn.Module, batches: list[Any], profile_path: str | None) -> Any:
    """The precomputed ID profile of a Torch-Pruning step: the one ``id_profile`` wrote for these
    samples, else (not timed) a ``representation="mean"`` profile of the same modules (a cheap
    distance step; the step's cost does not depend on the ID values)."""
    import vlprune
    from vlprune.plugins.intrinsic_dim import IDProfile

    if profile_path and Path(profile_path).is_file():
        return IDProfile.from_json(profile_path)
    n = sum(_batch_size(b) for b in batches)
    return vlprune.estimate_ids(model, batches, n_samples=n, representation="mean", progress=False)


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["pixel_values"].shape[0])


def _one(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in batch.items()}


def setup_criterion(criterion: str, model: nn.Module, batches: list[Any], job: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Untimed preparation of ``criterion``; returns the timed call (which returns extra facts)."""
    import vlprune
    from vlprune.plugins import amp
    from vlprune.plugins.layer_similarity import layer_similarity
    from vlprune.plugins.token_diversity import DIVPRUNE_KEEP, divprune_select

    kind = model_spec(job["model"])["kind"]
    n = job["samples"]
    if criterion == "id_profile":

        def run() -> dict[str, Any]:
            profile = vlprune.estimate_ids(model, batches, n_samples=n, progress=False)
            if job.get("profile_out"):
                profile.to_json(job["profile_out"])
            return {"modules": len(profile)}

        return run
    if criterion == "taylor_idw_step":
        import torch_pruning as tp

        from vlprune.adapters.hf.prune import prune_hf_model
        from vlprune.adapters.torch_pruning import IDWeightedImportance

        profile = _profile(model, batches, job.get("profile_in"))

        def run() -> dict[str, Any]:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                for batch in batches:
                    _loss(model, batch, kind).backward()
            before = n_params(model)
            imp = IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile, missing="skip")
            prune_hf_model(model, _one(batches[0]), imp, 0.3)
            return {"params_removed": before - n_params(model)}

        return run
    if criterion == "amp_importance":
        mlps = _vision_mlps(model)

        def run() -> dict[str, Any]:
            scores = amp.neuron_importance(model, batches, mlps, progress=False)
            return {"mlps": len(scores)}

        return run
    if criterion == "amp_width_search":
        every = _vision_mlps(model)
        k = min(int(job.get("search_mlps", 4)), len(every))
        chosen = [every[round(i * (len(every) - 1) / max(k - 1, 1))] for i in range(k)]  # evenly spaced
        layouts = amp.find_mlps(model, chosen)
        g = torch.Generator().manual_seed(0)
        scores = {name: torch.rand(amp.hidden_size(model, layout), generator=g) for name, layout in layouts.items()}
        halvings = int(job.get("halvings", 1))

        def run() -> dict[str, Any]:
            import warnings

            log: list[dict[str, Any]] = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # degenerate widths on random weights: not what is measured
                amp.search_widths(model, scores, batches, delta_e=1e-2, halvings=halvings, progress=False, log=log)
            return {"mlps": len(scores), "mlps_total": len(every), "halvings": halvings, "evaluations": len(log)}

        return run
    if criterion == "layer_similarity":
        layers = _encoder_layers(model) if kind == "vision" else None

        def run() -> dict[str, Any]:
            sims = layer_similarity(model, batches, layers=layers, progress=False)
            return {"layers": int(sims.numel())}

        return run
    if criterion == "divprune":
        if kind == "vision":

            def run() -> dict[str, Any]:
                selection = 0.0
                with torch.no_grad():
                    for batch in batches:
                        tokens = model(**batch).last_hidden_state[:, 1:]
                        start = time.perf_counter()
                        divprune_select(tokens, DIVPRUNE_KEEP)
                        selection += time.perf_counter() - start
                return {"selection_s": round(selection, 4), "tokens": int(tokens.shape[1])}

            return run

        def run() -> dict[str, Any]:
            with torch.no_grad(), vlprune.prune_visual_tokens(model, "divprune"):
                for batch in batches:
                    model(**batch)
            return {}

        return run
    raise KeyError(f"unknown criterion {criterion!r}")


def forward_all(model: nn.Module, batches: list[Any]) -> None:
    """The plain forward every criterion is compared with."""
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def measure(job: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """One measurement, in this process: plain forward, then the criterion, over the same batches.

    Args:
        job: ``model`` (a name of :data:`MODELS` / :data:`QUICK_MODELS`), ``criterion``, ``samples``,
            ``dtype`` (``"bfloat16"`` / ``"float32"``), optional ``threads``, ``halvings``,
            ``search_mlps``, ``profile_in`` / ``profile_out`` (ID profile JSON paths).
        model: the model (changed by some criteria: pass a copy, or run in a child); None to build it.

    Returns:
        The job plus ``forward_s``, ``criterion_s``, ``x_forward`` (their ratio), ``forward_peak_mb``,
        ``peak_mb``, ``x_forward_memory`` (ratio of peaks), ``forward_extra_mb``, ``extra_mb``,
        ``memory_method``, ``params`` and the criterion's own facts under ``info``.
    """
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    dtype = DTYPES[job.get("dtype", "bfloat16")]
    model = build_model(job["model"], dtype) if model is None else model
    batches = make_batches(job["model"], job["samples"], dtype)
    with torch.no_grad():
        model(**_one(batches[0]))  # warm-up
    run = setup_criterion(job["criterion"], model, batches, job)
    with PeakMemory() as fwd_mem:
        start = time.perf_counter()
        forward_all(model, batches)
        forward_s = time.perf_counter() - start
    with PeakMemory() as mem:
        start = time.perf_counter()
        info = run()
        criterion_s = time.perf_counter() - start
    return {
        **{k: v for k, v in job.items() if k not in ("profile_in", "profile_out")},
        "params": n_params(model) if job["criterion"] != "taylor_idw_step" else info.get("params_removed", 0) + n_params(model),
        "forward_s": round(forward_s, 6),
        "criterion_s": round(criterion_s, 6),
        "x_forward": round(criterion_s / forward_s, 3),
        "forward_peak_mb": round(fwd_mem.peak_mb, 1),
        "peak_mb": round(mem.peak_mb, 1),
        "x_forward_memory": round(mem.peak_mb / fwd_mem.peak_mb, 3),
        "forward_extra_mb": round(fwd_mem.extra_mb, 1),
        "extra_mb": round(mem.extra_mb, 1),
        "memory_method": mem.method,
        "info": info,
    }


# ---------------------------------------------------------------------------------------------
# the Torch-Pruning step: each vlprune importance next to GroupTaylorImportance alone
# ---------------------------------------------------------------------------------------------


class _Timed:
    """An importance wrapper adding up the time spent inside ``__call__``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.total = 0.0

    def __call__(self, group: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner(group)
        finally:
            self.total += time.perf_counter() - start


def measure_step_overhead(job: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """One Torch-Pruning step per importance, alternating, on one model (in this process).

    Args:
        job: ``model``, ``samples`` (for the gradients), ``rounds``, ``dtype``, optional ``threads``
            and ``profile_in``.

    Returns:
        The job plus per-importance median ``step_s`` / ``importance_s`` and their median per-round
        ratios to ``GroupTaylorImportance`` (``x_taylor_step`` / ``x_taylor_importance``).
    """
    import torch_pruning as tp

    from vlprune.adapters.hf.prune import hf_pruner_kwargs
    from vlprune.adapters.torch_pruning import AMPEntropyImportance, IDWeightedImportance, PlatonImportance
    from vlprune.plugins import amp
    from vlprune.plugins.platon import Platon

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    dtype = DTYPES[job.get("dtype", "bfloat16")]
    model = build_model(job["model"], dtype) if model is None else model
    batches = make_batches(job["model"], job["samples"], dtype)
    kind = model_spec(job["model"])["kind"]
    profile = _profile(model, batches, job.get("profile_in"))
    platon = PlatonImportance(Platon(delta_t=1))
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in batches:
            _loss(model, batch, kind).backward()
            platon.update(model)
    g = torch.Generator().manual_seed(0)
    layouts = amp.find_mlps(model, _vision_mlps(model))
    amp_scores = {name: torch.rand(amp.hidden_size(model, layout), generator=g) for name, layout in layouts.items()}
    importances = {
        "GroupTaylorImportance (tp)": tp.importance.GroupTaylorImportance(),
        "IDWeightedImportance(Taylor)": IDWeightedImportance(tp.importance.GroupTaylorImportance(), profile, missing="skip"),
        "PlatonImportance": platon,
        "AMPEntropyImportance": AMPEntropyImportance(amp_scores, model),
    }
    pruner = tp.pruner.BasePruner(
        model, _one(batches[0]), importance=importances["GroupTaylorImportance (tp)"], pruning_ratio=0.3,
        global_pruning=True, **hf_pruner_kwargs(model),
    )
    names = list(importances)
    step_s: dict[str, list[float]] = {k: [] for k in names}
    imp_s: dict[str, list[float]] = {k: [] for k in names}
    groups: dict[str, int] = {}
    for r in range(int(job.get("rounds", 5)) + 1):  # round 0: warm-up, not counted
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            timed = _Timed(importances[name])
            pruner.importance = timed
            pruner.current_step = 0
            start = time.perf_counter()
            selected = list(pruner.step(interactive=True))
            elapsed = time.perf_counter() - start
            groups[name] = len(selected)
            if r:
                step_s[name].append(elapsed)
                imp_s[name].append(timed.total)
    base = names[0]
    rows = []
    for name in names:
        rows.append({
            "importance": name,
            "step_s": round(statistics.median(step_s[name]), 4),
            "importance_s": round(statistics.median(imp_s[name]), 4),
            "x_taylor_step": round(statistics.median(a / b for a, b in zip(step_s[name], step_s[base])), 3),
            "x_taylor_importance": round(statistics.median(a / b for a, b in zip(imp_s[name], imp_s[base])), 3),
            "groups_selected": groups[name],
        })
    return {**{k: v for k, v in job.items() if k != "profile_in"}, "rows": rows}


# ---------------------------------------------------------------------------------------------
# the driver: one forked child process per measurement
# ---------------------------------------------------------------------------------------------


def _child(job: dict[str, Any], model: nn.Module, conn: Any) -> None:
    try:
        torch.set_num_threads(int(job.get("threads") or 1))
        result = measure_step_overhead(job, model) if job["criterion"] == "tp_step" else measure(job, model)
        conn.send(result)
    except BaseException as exc:  # noqa: BLE001 (reported to the parent)
        import traceback

        conn.send({**job, "error": "".join(traceback.format_exception(exc))[-1500:]})
    finally:
        conn.close()


def run_child(job: dict[str, Any], model: nn.Module, timeout: float) -> dict[str, Any]:
    """Run ``job`` in a child forked from this process (which holds ``model``, built and never run):
    the child starts from the pristine model (copy-on-write) and nothing it allocates outlives it."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=_child, args=(job, model, send))
    proc.start()
    send.close()
    result: dict[str, Any] | None = None
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            result = None
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    wall = round(time.perf_counter() - start, 1)
    if result is None:
        result = {**job, "error": f"no result (exit code {proc.exitcode}; timeout {timeout:.0f} s)"}
    return {**{k: v for k, v in result.items() if k not in ("profile_in", "profile_out")}, "child_wall_s": wall}


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:100] if lines else "?"


def table(report: dict[str, Any]) -> str:
    """The markdown section: the scaling table, the tp-step overhead table and the wall time."""
    lines = [
        "### Scaling: data-driven criteria vs a plain forward (random weights, real shapes)",
        "",
        "`benchmarks/bench_scaling.py` (method in its docstring): each row is one child process forked from the "
        "driver, which times a plain forward over the batches and then the criterion over the same batches; "
        f"{report.get('dtype', 'bfloat16')}, {report.get('threads', '?')} threads per child. *x forward* = criterion "
        "seconds / forward seconds of the same child; *peak MB* = the child's peak RSS during the criterion "
        "(the high-water mark reset before it via /proc/self/clear_refs); *x forward memory* = that peak / the "
        "forward's peak; *extra MB* = peak minus the RSS just before the criterion (the forward's in brackets). "
        "The reading and the LLaVA-1.5-7B extrapolation: docs/scaling.md.",
        "",
        "| criterion | model | samples | seconds | x forward | peak MB | x forward memory | extra MB (forward's) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {c: i for i, c in enumerate(VISION_CRITERIA)}
    models = list(report["models"])
    rows = sorted(report["results"], key=lambda r: (order.get(r["criterion"], 99), models.index(r["model"]) if r["model"] in models else 99, r["samples"]))
    for r in rows:
        if "error" in r:
            what = r["error"] if r["error"].startswith("not measured") else f"error: {_last_line(r['error'])}"
            lines.append(f"| {r['criterion']} | {r['model']} | {r['samples']} | {what} | | | | |")
            continue
        lines.append(
            f"| {r['criterion']} | {r['model']} | {r['samples']} | {_fmt(r['criterion_s'])} | {r['x_forward']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['x_forward_memory']:.2f} | {r['extra_mb']:.0f} ({r['forward_extra_mb']:.0f}) |"
        )
    lines += [
        "",
        "One Torch-Pruning step (interactive: importances, ranking, selection), importances alternated; "
        "ratios are medians of per-round ratios to `GroupTaylorImportance` alone:",
        "",
        "| model | importance | step s | x Taylor (step) | importance s | x Taylor (importance) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for o in report["tp_step"]:
        if "error" in o:
            lines.append(f"| {o['model']} | error: {_last_line(o['error'])} | | | | |")
            continue
        for row in o["rows"]:
            lines.append(
                f"| {o['model']} | {row['importance']} | {_fmt(row['step_s'])} | {row['x_taylor_step']:.3f} | "
                f"{_fmt(row['importance_s'])} | {row['x_taylor_importance']:.3f} |"
            )
    wall = sum(report.get("wall_s_runs", [])) or report.get("wall_s", 0.0)
    lines += ["", "Runs (rows carry the index of the run that measured them; the later runs re-measured or added rows with `--merge`):", ""]
    for i, run in enumerate(report.get("runs", [])):
        dirty = f", uncommitted src: {', '.join(run['uncommitted_src'])}" if run.get("uncommitted_src") else ""
        lines.append(
            f"{i}. {run.get('started', '?')}, git {run.get('git', '?')}{dirty}: `.venv/bin/python benchmarks/bench_scaling.py "
            f"{' '.join(run.get('argv', []))}` ({run.get('wall_s', 0):.0f} s, load average at start "
            f"{(run.get('load_average_at_start') or [0])[0]:.1f})"
        )
    lines += ["", f"Total wall time of the measurement runs: {wall:.0f} s ({wall / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def _merge(old: list[dict[str, Any]], new: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Replace the row of ``old`` with the same ``keys`` by ``new`` (or append it)."""
    for i, row in enumerate(old):
        if all(row.get(k) == new.get(k) for k in keys):
            old[i] = new
            return
    old.append(new)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(ROOT), check=False).stdout.strip()
    except OSError:
        return "?"


def jobs_for(name: str, spec: dict[str, Any], samples: dict[str, Any], criteria: list[str] | None) -> list[tuple[str, int]]:
    """(criterion, samples) pairs measured for model ``name``: every criterion of its kind at each of
    its sample counts; ``id_profile`` / ``taylor_idw_step`` only at counts of at least 8 (TwoNN's minimum)."""
    crits = VISION_CRITERIA if spec["kind"] == "vision" else LLAVA_CRITERIA
    out = []
    for crit in crits:
        if criteria and crit not in criteria:
            continue
        counts = samples[name].get(crit, samples[name]["default"])
        out += [(crit, n) for n in counts]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; writes nothing unless --out)")
    parser.add_argument("--models", nargs="*", default=None, help="subset of the models")
    parser.add_argument("--criteria", nargs="*", default=None, help="subset of the criteria (tp_step: the step comparison)")
    parser.add_argument("--samples", nargs="*", type=int, default=None, help="only these sample counts")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per child")
    parser.add_argument("--halvings", type=int, default=1, help="AMP width-search halvings")
    parser.add_argument("--search-mlps", type=int, default=4, help="AMP width search over this many evenly spaced MLPs")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the tp-step comparison")
    parser.add_argument("--step-samples", type=int, default=8, help="samples for the tp-step gradients")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--merge", action="store_true", help="update the rows of an existing JSON instead of starting anew")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default docs/benchmarks_scaling.json; none with --quick)")
    parser.add_argument("--md", type=Path, default=None, help="markdown table (default docs/benchmarks_scaling.md)")
    args = parser.parse_args(argv)

    from _common import quiet_cpu_setup  # noqa: PLC0415 (sibling module)

    quiet_cpu_setup(1)  # the driver builds models on one thread; each child sets --threads
    import logging

    logging.getLogger("vlprune.plugins.amp").setLevel(logging.ERROR)  # degenerate widths on random weights
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    models = MODELS if not args.quick else QUICK_MODELS
    samples = SAMPLES if not args.quick else QUICK_SAMPLES
    names = args.models or list(models)
    profiles = Path(os.environ.get("TMPDIR", "/tmp")) / ("bench_scaling_profiles" + ("_quick" if args.quick else ""))
    profiles.mkdir(parents=True, exist_ok=True)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs/benchmarks_scaling.json")
    md = args.md if args.md is not None else (None if args.quick else ROOT / "docs/benchmarks_scaling.md")
    report: dict[str, Any] = {
        "benchmark": "data-driven criteria vs a plain forward over the same batches; random weights, real shapes",
        "quick": args.quick,
        "dtype": args.dtype,
        "threads": args.threads,
        "memory": "per measurement: a child forked from the driver; peak RSS of the child during the step "
                  "(VmHWM after resetting it with /proc/self/clear_refs); extra = peak - RSS before the step",
        "models": {},
        "results": [],
        "tp_step": [],
        "runs": [],
    }
    if args.merge and out is not None and out.is_file():
        report = json.loads(out.read_text())
    run_info = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": _git("rev-parse", "--short", "HEAD"),
                "uncommitted_src": _git("diff", "--name-only", "HEAD", "--", "src").split(), "argv": sys.argv[1:],
                "torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    report["runs"].append(run_info)

    def save() -> None:
        run_info["wall_s"] = round(time.perf_counter() - t0, 1)
        report["wall_s_runs"] = [r.get("wall_s", 0.0) for r in report["runs"]]
        if out is not None:
            out.write_text(json.dumps(report, indent=2) + "\n")
        if md is not None:
            md.write_text(table(report))

    status = 0
    for name in names:
        spec = models[name]
        todo = [(c, n) for c, n in jobs_for(name, spec, samples, args.criteria) if not args.samples or n in args.samples]
        step = spec["kind"] == "vision" and (not args.criteria or "tp_step" in args.criteria)
        if not todo and not step:
            continue
        start = time.perf_counter()
        model = build_model(name, DTYPES[args.dtype])
        report["models"][name] = {**spec, "params": n_params(model), "build_s": round(time.perf_counter() - start, 1)}
        for crit, n in todo:
            profile = str(profiles / f"profile_{name}_{n}.json")
            job = {"model": name, "criterion": crit, "samples": n, "dtype": args.dtype, "threads": args.threads,
                   "halvings": args.halvings, "search_mlps": args.search_mlps, "profile_in": profile, "profile_out": profile,
                   "run": len(report["runs"]) - 1}
            row = run_child(job, model, args.timeout)
            _merge(report["results"], row, ("model", "criterion", "samples"))
            if "error" in row:
                status = 1
                sys.stdout.write(f"{name} n={n} {crit}: ERROR {_last_line(row['error'])}\n")
            else:
                sys.stdout.write(
                    f"{name} n={n} {crit}: {row['criterion_s']:.2f} s (x{row['x_forward']:.2f} forward {row['forward_s']:.2f} s), "
                    f"peak {row['peak_mb']:.0f} MB (x{row['x_forward_memory']:.2f}), extra {row['extra_mb']:.0f} MB "
                    f"(forward {row['forward_extra_mb']:.0f}) {row['info']} [child {row['child_wall_s']} s]\n"
                )
            sys.stdout.flush()
            save()
        if step:
            n = args.step_samples
            job = {"model": name, "criterion": "tp_step", "samples": n, "dtype": args.dtype, "threads": args.threads,
                   "rounds": args.rounds if not args.quick else 2, "profile_in": str(profiles / f"profile_{name}_{n}.json"),
                   "run": len(report["runs"]) - 1}
            row = run_child(job, model, args.timeout)
            _merge(report["tp_step"], row, ("model",))
            for r in row.get("rows", []):
                sys.stdout.write(f"{name} tp step {r['importance']}: {r['step_s']:.3f} s x{r['x_taylor_step']:.3f} "
                                 f"(importance {r['importance_s']:.3f} s x{r['x_taylor_importance']:.3f})\n")
            if "error" in row:
                status = 1
                sys.stdout.write(f"{name} tp step: ERROR {_last_line(row['error'])}\n")
            sys.stdout.flush()
            save()
        del model
        gc.collect()
    save()
    sys.stdout.write(f"wall time {run_info['wall_s']:.0f} s" + (f"; wrote {out}" if out else "") + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
