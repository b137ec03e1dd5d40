"""Benchmark: the vlprune NNI 3.0 pruners vs NNI's own L1 / Taylor / Movement, and the NNI route vs
the Torch-Pruning route, on the testbed LLaVA and CLIP (structured MLP-neuron pruning).

Every run starts from the shipped testbed model and gets the same ``--steps`` AdamW optimizer
steps on the same training batches in the same order (constant ``--lr``; a fresh optimizer after
``shrink``, whose parameters are new); only *where* the pruning sits in those steps differs:

* one-shot criteria (L1, ID-weighted L1, AMP, the Torch-Pruning routes): masks at step 0, then
  ``shrink`` and ``--steps`` steps of fine-tuning of the smaller model;
* Taylor / ID-weighted Taylor: ``--score-steps`` training steps collect the gradients (NNI's
  ``training_steps``; the optimizer steps them as any other), then masks, ``shrink`` and the
  remaining ``--steps - --score-steps`` steps;
* Movement / PLATON / ID-PLATON: ``--ramp-end`` training steps with masks updated on the pruner's
  own cubic schedule (dense until ``--ramp-start``, final sparsity at ``--ramp-end``), then
  ``shrink`` and the remaining ``--steps - --ramp-end`` steps.

Structure pruned: hidden neurons of every MLP (LLaVA: the 4 vision-tower MLPs and the 4 gated
decoder MLPs; CLIP: 3 text and 4 vision MLPs), scored on the rows of ``fc1`` / ``up_proj``
(NNI ``granularity="out_channel"``); ``shrink`` removes the neuron from ``fc1`` / ``gate_proj`` /
``up_proj`` and the column of ``fc2`` / ``down_proj``. Sparsity = fraction of those neurons:

* per-layer (the default NNI way): every MLP loses the same count, ``H - int(H * (1 - s))`` (the
  count Torch-Pruning removes at ratio ``s``, so both routes remove the same number);
* ``_global`` rows: one ``global_group_id`` over all MLPs with ``sparse_ratio = s`` and
  ``max_sparse_ratio = --max-layer`` (vlprune's pruners fence each layer; NNI's own L1 ignores the
  per-layer limit). NNI counts a global ``sparse_ratio`` in weights, so where rows differ in length
  (LLaVA: 96-wide vision rows, 128-wide decoder rows) the fraction of neurons removed differs from
  ``s``; Torch-Pruning's global ratio counts channels. ``fenced_*_global`` rows are
  ``IDWeightedPruner`` with every ID 1: NNI's metric under the fenced ranking without ID weighting,
  the reference that isolates the ID factor.

AMP (``AMPPruner``) scores only MLPs that reach its label-free image objective (the vision tower);
its width search picks the widths: ``delta_e`` is chosen from a grid so that the removed fraction of
the vision MLP neurons is nearest the target sparsity. ``l1_at_amp`` (NNI L1) and ``tp_amp``
(Torch-Pruning ``AMPEntropyImportance`` + ``amp_ratio_dict``) prune at the same widths.

Torch-Pruning route (``tp_`` rows): ``prune_hf_model(model, example, IDWeightedImportance(
GroupMagnitudeImportance(p=1), profile), s, prune_heads=False)``, local or global; ``tp_amp`` as
the README's AMP snippet. ``overlap`` = fraction of the kept neurons both routes keep.

Reported per run: the task metric right after ``shrink`` and after the last training step
(LLaVA: VQA math / general exact match; CLIP: retrieval i2t / t2i recall@1 and zero-shot digit),
parameters of the whole model after ``shrink`` (ratio to dense), MLP neurons kept, and the CPU
latency of the shrunk model vs the dense one (one forward on a fixed batch, one thread,
alternating rounds in the same process, ratio of the medians).

The script re-runs itself with ``PYTHONHASHSEED=0``: NNI collects a config's modules in a set and its
own global ranking depends on their order, so NNI's ``l1_global`` masks would change per process.

    nice .venv/bin/python benchmarks/bench_nni.py                 # full (writes docs/benchmarks_nni.json)
    nice .venv/bin/python benchmarks/bench_nni.py --quick         # smoke run, no JSON unless --out
    .venv/bin/python benchmarks/bench_nni.py --table              # markdown tables of the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import quiet_cpu_setup  # benchmarks/_common.py: the script folder is on sys.path
from vlprune.recipes.report import side_by_side_latency  # median per-forward ms of two models, alternating

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llava", "clip")
METHODS = (
    "dense",
    "l1", "l1_global", "taylor", "movement",
    "idw_l1", "idw_l1_global", "idw_taylor", "idw_taylor_global", "fenced_l1_global", "fenced_taylor_global",
    "platon", "platon_global", "id_platon_global",
    "tp_idw_l1", "tp_idw_l1_global", "tp_idw_l1_first",
    "amp", "l1_at_amp", "tp_amp",
)
QUICK_METHODS = ("dense", "l1", "taylor", "idw_l1_global", "platon_global", "tp_idw_l1", "amp", "tp_amp")
AMP_DELTAS = (0.0, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)

logger = logging.getLogger("bench_nni")


# ----------------------------------------------------------------------------------------------
# set-up
# ----------------------------------------------------------------------------------------------
def _loss_fn(name: str) -> Callable[[dict[str, torch.Tensor], nn.Module], torch.Tensor]:
    """NNI's ``training_step(batch, model) -> loss``."""
    if name == "clip":
        return lambda batch, model: model(**batch).loss

    from vlprune.testbed.train import per_example_loss

    def step(batch: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return per_example_loss(model(**inputs).logits, batch["labels"])

    return step


def _evaluate(name: str, model: nn.Module, n: int) -> dict[str, float]:
    from vlprune.testbed import evaluate

    out = evaluate(model, "vqa" if name != "clip" else "retrieval", n=n)
    return {k: round(float(v), 4) for k, v in out.items()}


def _setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import vlprune
    from vlprune.testbed import batches, load

    model = load(name)
    info = vlprune.describe_model(model)
    mlps = [(m.name, m.up, m.gate, m.down, m.modality) for m in info.mlps]
    calib = batches(name, args.n_calib, 32, seed=0)  # val split
    start = time.perf_counter()
    profile = vlprune.estimate_ids(model, calib, modules=[m[1] for m in mlps], n_samples=args.n_calib, progress=False)
    id_seconds = time.perf_counter() - start
    bs = args.batch_size if name != "clip" else args.clip_batch_size
    # one training sequence per seed, shared by every method of that seed
    train = {seed: batches(name, args.steps * bs, bs, split="train", labels=True, seed=1000 * seed + 5) for seed in args.seeds}
    example = batches(name, 2, 2, seed=7)[0]
    latency_batch = batches(name, args.latency_batch, args.latency_batch, seed=9)[0]
    images = batches(name, args.amp_samples, 64, images_only=True, seed=11)
    held_out = batches(name, args.amp_samples // 2, 64, images_only=True, seed=13)
    return {
        "name": name, "model": model, "mlps": mlps, "profile": profile, "ids": profile.ids(), "id_seconds": id_seconds,
        "train": train, "example": example, "latency_batch": latency_batch, "images": images, "held_out": held_out,
        "loss": _loss_fn(name), "params": _params(model),
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _widths(setup: dict[str, Any], model: nn.Module) -> dict[str, int]:
    return {mlp: model.get_submodule(up).out_features for mlp, up, _, _, _ in setup["mlps"]}


def _pruned_count(size: int, sparsity: float) -> int:
    """Neurons Torch-Pruning removes from a layer of ``size`` at ``sparsity`` (it keeps ``int(size * (1 - s))``)."""
    return size - int(size * (1.0 - sparsity))


# ----------------------------------------------------------------------------------------------
# training (identical for every method)
# ----------------------------------------------------------------------------------------------
class _Trainer:
    """The one training loop: AdamW steps over ``train[offset:]``; also NNI's ``training_func``."""

    def __init__(self, setup: dict[str, Any], lr: float, seed: int) -> None:
        self.train = setup["train"][seed]
        self.loss = setup["loss"]
        self.lr = lr
        self.offset = 0  # next batch index: every method sees the same batches in the same order
        self.losses: list[float] = []

    def training_func(self, model: nn.Module, optimizers: Any, training_step: Callable, lr_schedulers: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None) -> None:
        optimizer = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        assert max_steps is not None, "the benchmark drives NNI by steps"
        model.train()
        for _ in range(max_steps):
            batch = self.train[self.offset]
            self.offset += 1
            optimizer.zero_grad()
            loss = training_step(batch, model)
            loss.backward()
            optimizer.step()
            self.losses.append(float(loss.detach()))
        model.eval()

    def evaluator(self, model: nn.Module) -> Any:
        import nni
        from nni.compression import TorchEvaluator

        optimizer = nni.trace(torch.optim.AdamW)(model.parameters(), lr=self.lr)
        return TorchEvaluator(self.training_func, optimizer, self.loss)

    def finish(self, model: nn.Module, total: int) -> None:
        """Plain training of the shrunk model up to ``total`` steps in all."""
        remaining = total - self.offset
        if remaining > 0:
            self.training_func(model, torch.optim.AdamW(model.parameters(), lr=self.lr), self.loss, max_steps=remaining)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def _per_layer_config(setup: dict[str, Any], model: nn.Module, sparsity: float) -> list[dict[str, Any]]:
    from vlprune.adapters.nni import exact_sparse_ratio

    out = []
    for _, up, _, _, _ in setup["mlps"]:
        size = model.get_submodule(up).out_features
        out.append({"op_names": [up], "sparse_ratio": exact_sparse_ratio(size, _pruned_count(size, sparsity)),
                    "granularity": "out_channel"})
    return out


def _global_config(setup: dict[str, Any], sparsity: float, max_layer: float) -> list[dict[str, Any]]:
    return [{"op_names": [m[1] for m in setup["mlps"]], "sparse_ratio": sparsity, "granularity": "out_channel",
             "global_group_id": "mlps", "max_sparse_ratio": max_layer}]


# ----------------------------------------------------------------------------------------------
# AMP widths (delta_e nearest the target)
# ----------------------------------------------------------------------------------------------
def _amp_widths(setup: dict[str, Any], sparsity: float, args: argparse.Namespace) -> dict[str, Any]:
    from vlprune.plugins import amp

    cache = setup.setdefault("amp_cache", {})
    model = setup["model"]
    if "scores" not in cache:
        start = time.perf_counter()
        cache["scores"] = amp.neuron_importance(model, setup["images"], tau=args.tau, progress=False)
        cache["score_seconds"] = time.perf_counter() - start
        cache["searches"] = {}
    scores = cache["scores"]
    sizes = {n: amp.hidden_size(model, lay) for n, lay in amp.find_mlps(model, list(scores)).items()}
    best = None
    for delta in AMP_DELTAS:
        if delta not in cache["searches"]:
            start = time.perf_counter()
            with _quiet_warnings():
                widths = amp.search_widths(model, scores, setup["held_out"], delta, args.tau, progress=False)
            cache["searches"][delta] = (widths, time.perf_counter() - start)
        widths = cache["searches"][delta][0]
        removed = 1 - sum(widths.values()) / sum(sizes.values())
        if best is None or abs(removed - sparsity) < abs(best[2] - sparsity):
            best = (delta, widths, removed)
    assert best is not None
    return {"delta_e": best[0], "widths": best[1], "removed": best[2], "scores": scores,
            "search_seconds": cache["searches"][best[0]][1], "score_seconds": cache["score_seconds"]}


class _quiet_warnings:
    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
def _nni_prune(method: str, setup: dict[str, Any], model: nn.Module, sparsity: float, trainer: _Trainer,
               args: argparse.Namespace, amp_info: dict[str, Any] | None) -> dict[str, dict[str, torch.Tensor]]:
    """Masks of an NNI-route method (training steps it uses are taken from ``trainer``)."""
    from nni.compression.pruning import L1NormPruner, MovementPruner, TaylorPruner

    from vlprune.adapters.nni import AMPPruner, IDWeightedPruner, PlatonPruner, amp_config_list

    glob = method.endswith("_global")
    config = _global_config(setup, sparsity, args.max_layer) if glob else _per_layer_config(setup, model, sparsity)
    base = method.removesuffix("_global")
    if base == "l1":
        pruner = L1NormPruner(model, config)
        _, masks = pruner.compress()
    elif base == "taylor":
        pruner = TaylorPruner(model, config, trainer.evaluator(model), training_steps=args.score_steps)
        _, masks = pruner.compress()
    elif base == "movement":
        pruner = MovementPruner(model, config, trainer.evaluator(model), warmup_step=args.ramp_start,
                                cooldown_begin_step=args.ramp_end)
        _, masks = pruner.compress(max_steps=args.ramp_end, max_epochs=None)
    elif base in ("idw_l1", "idw_taylor", "fenced_l1", "fenced_taylor"):
        # fenced_*: every ID 1, i.e. NNI's metric under vlprune's fenced global ranking, without ID weighting
        profile = setup["profile"] if base.startswith("idw") else {m[1]: 1.0 for m in setup["mlps"]}
        if base.endswith("l1"):
            pruner = IDWeightedPruner(model, config, profile, base="l1")
        else:
            pruner = IDWeightedPruner(model, config, profile, base="taylor", evaluator=trainer.evaluator(model),
                                      training_steps=args.score_steps)
        _, masks = pruner.compress()
    elif base in ("platon", "id_platon"):
        pruner = PlatonPruner(model, config, trainer.evaluator(model), warmup_step=args.ramp_start,
                              cooldown_begin_step=args.ramp_end, delta_t=args.delta_t,
                              profile=setup["profile"] if base == "id_platon" else None)
        _, masks = pruner.compress(max_steps=args.ramp_end, max_epochs=None)
    elif base == "amp":
        assert amp_info is not None
        # AMPPruner's own search, on the scores computed once (the same search picked delta_e)
        pruner = AMPPruner(model, setup["images"], amp_info["delta_e"], tau=args.tau, held_out=setup["held_out"],
                           scores=amp_info["scores"], progress=False)
        if pruner.widths != amp_info["widths"]:
            raise RuntimeError(f"AMPPruner searched {pruner.widths}, amp.search_widths {amp_info['widths']}")
        _, masks = pruner.compress()
    elif base == "l1_at_amp":
        assert amp_info is not None
        pruner = L1NormPruner(model, amp_config_list(model, amp_info["widths"]))
        _, masks = pruner.compress()
    else:
        raise ValueError(method)
    masks = {m: {t: v.detach().clone() for t, v in tm.items() if v is not None} for m, tm in masks.items()}
    pruner.unwrap_model()
    return masks


def _tp_prune(method: str, setup: dict[str, Any], model: nn.Module, sparsity: float,
              amp_info: dict[str, Any] | None) -> None:
    import torch_pruning as tp

    from vlprune.adapters.torch_pruning import (
        AMPEntropyImportance, IDWeightedImportance, amp_ratio_dict, hf_pruner_kwargs, prune_hf_model,
    )
    from vlprune.adapters.hf.sync import sync_hf_model

    if method == "tp_amp":
        assert amp_info is not None
        pruner = tp.pruner.BasePruner(
            model, setup["example"], importance=AMPEntropyImportance(amp_info["scores"], model), pruning_ratio=0.0,
            pruning_ratio_dict=amp_ratio_dict(model, amp_info["widths"]), global_pruning=False,
            **hf_pruner_kwargs(model, prune_heads=False),
        )
        pruner.step()
        sync_hf_model(model, pruner=pruner)
        return
    if method == "tp_idw_l1_first":  # L1 of the group's first layer only, unnormalised: NNI's metric
        base = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    else:  # the README's choice: group L1 (fc1 rows + fc2 columns, gate/up/down), mean-normalised
        base = tp.importance.GroupMagnitudeImportance(p=1)
    imp = IDWeightedImportance(base, setup["profile"])
    prune_hf_model(model, setup["example"], imp, sparsity, prune_heads=False, global_pruning=method.endswith("_global"))


def _kept(setup: dict[str, Any], original: nn.Module, pruned: nn.Module) -> dict[str, list[int]]:
    """Indices (original numbering) of the neurons each MLP kept, by matching the rows of its
    first linear (exact copies: neither route changes a kept row before training)."""
    out = {}
    for mlp, up, _, _, _ in setup["mlps"]:
        rows = {bytes(r.numpy().tobytes()): i for i, r in enumerate(original.get_submodule(up).weight.detach())}
        new = pruned.get_submodule(up).weight.detach()
        out[mlp] = sorted(rows[bytes(r.numpy().tobytes())] for r in new)
    return out


def _masks_kept(setup: dict[str, Any], masks: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[int]] | None:
    """Kept neuron indices from NNI masks on the MLPs' first linears (None if a mask is not whole rows)."""
    out = {}
    for mlp, up, gate, _, _ in setup["mlps"]:
        size = setup["model"].get_submodule(up).out_features
        keep = torch.ones(size, dtype=torch.bool)
        for path in (up, gate):
            if path and path in masks and "weight" in masks[path]:
                keep &= masks[path]["weight"].bool().any(dim=1)
        out[mlp] = keep.nonzero().flatten().tolist()
    return out


def run_one(setup: dict[str, Any], method: str, sparsity: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One method at one sparsity from a fresh copy of the testbed model, training sequence ``seed``."""
    from vlprune.adapters.nni import shrink

    torch.manual_seed(seed)
    name = setup["name"]
    model = copy.deepcopy(setup["model"]).eval()
    trainer = _Trainer(setup, args.lr, seed)
    row: dict[str, Any] = {"model": name, "method": method, "sparsity": sparsity, "seed": seed}
    amp_info = None
    if method in ("amp", "l1_at_amp", "tp_amp"):
        amp_info = _amp_widths(setup, sparsity, args)
        row.update(delta_e=amp_info["delta_e"], vision_mlp_removed=round(amp_info["removed"], 4),
                   amp_widths=list(amp_info["widths"].values()),
                   amp_seconds=round(amp_info["score_seconds"] + amp_info["search_seconds"], 2))
    start = time.perf_counter()
    masks = None
    if method == "dense":
        pass
    elif method.startswith("tp_"):
        _tp_prune(method, setup, model, sparsity, amp_info)
    else:
        masks = _nni_prune(method, setup, model, sparsity, trainer, args, amp_info)
    prune_seconds = time.perf_counter() - start
    row["prune_steps"] = trainer.offset
    if masks is not None:
        row["kept"] = _masks_kept(setup, masks)
        start = time.perf_counter()
        report = shrink(model, masks, setup["example"], progress=False)
        row["shrink_seconds"] = round(time.perf_counter() - start, 2)
        row.update(verified=report.verified, zeros_left=report.zeros_left)
    elif method.startswith("tp_"):
        row["kept"] = _kept(setup, setup["model"], model)
    row["prune_seconds"] = round(prune_seconds, 2)
    widths = _widths(setup, model)
    total = sum(setup["model"].get_submodule(m[1]).out_features for m in setup["mlps"])
    # neurons switched off: from the masks (an MLP whose every neuron is masked keeps its width in zeros)
    kept = sum(len(v) for v in row["kept"].values()) if "kept" in row else sum(widths.values())
    row["neurons_removed"] = round(1 - kept / total, 4)
    row["widths"] = list(widths.values())  # physical widths after shrink
    if "kept" in row:
        row["emptied"] = [m for m, v in row["kept"].items() if not v]
    row["params_ratio"] = round(_params(model) / setup["params"], 4)
    if method != "dense":
        row["pruned"] = _evaluate(name, model, args.n_eval)
    start = time.perf_counter()
    trainer.finish(model, args.steps)
    row["train_seconds"] = round(time.perf_counter() - start, 1)
    row["steps"] = trainer.offset
    row["final_loss"] = round(statistics.mean(trainer.losses[-10:]), 4) if trainer.losses else None
    row["metric"] = _evaluate(name, model, args.n_eval)
    dense_ms, pruned_ms = side_by_side_latency(setup["model"], model, setup["latency_batch"],
                                               repeats=args.latency_rounds * args.latency_repeats)
    row.update(latency_dense_ms=round(dense_ms, 2), latency_ms=round(pruned_ms, 2),
               latency_ratio=round(pruned_ms / dense_ms, 3))
    return row


def _pack_kept(kept: dict[str, list[int]]) -> dict[str, str]:
    """Kept neuron indices as hex bit masks (bit i = neuron i kept): a compact JSON."""
    return {m: format(sum(1 << i for i in v), "x") for m, v in kept.items()}


def _unpack_kept(kept: dict[str, Any]) -> dict[str, set[int]]:
    """Inverse of :func:`_pack_kept` (lists pass through)."""
    out = {}
    for m, v in kept.items():
        if isinstance(v, str):
            bits = int(v, 16)
            out[m] = {i for i in range(bits.bit_length()) if bits >> i & 1}
        else:
            out[m] = set(v)
    return out


def _add_overlaps(rows: list[dict[str, Any]]) -> None:
    """``overlap`` of a row with its reference row: kept neurons in common / kept by the one that keeps
    more (1 = the same neurons); each Torch-Pruning row with its NNI counterpart, each ID-weighted
    row with its unweighted base."""
    pairs = {"tp_idw_l1": "idw_l1", "tp_idw_l1_first": "idw_l1", "tp_idw_l1_global": "idw_l1_global", "tp_amp": "amp",
             "idw_l1": "l1", "idw_taylor": "taylor", "idw_l1_global": "fenced_l1_global",
             "idw_taylor_global": "fenced_taylor_global", "fenced_l1_global": "l1_global",
             "id_platon_global": "platon_global", "l1_at_amp": "amp"}
    for row in rows:
        other = pairs.get(row["method"])
        if other is None or "kept" not in row:
            continue
        for ref in rows:
            if (ref["model"], ref["method"], ref["sparsity"], ref.get("seed")) == (
                row["model"], other, row["sparsity"], row.get("seed")
            ) and "kept" in ref:
                mine, theirs = _unpack_kept(row["kept"]), _unpack_kept(ref["kept"])
                both = sum(len(mine[m] & theirs[m]) for m in mine)
                kept = max(sum(len(v) for v in theirs.values()), sum(len(v) for v in mine.values()))
                row["overlap_with"] = other
                row["overlap"] = round(both / kept, 4) if kept else None
                row["same_widths"] = all(len(mine[m]) == len(theirs[m]) for m in mine)


# ----------------------------------------------------------------------------------------------
# main / tables
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all ({', '.join(METHODS)})")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.4, 0.6])
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every run, scoring steps included")
    parser.add_argument("--score-steps", type=int, default=10, help="Taylor: gradient-collecting training steps")
    parser.add_argument("--ramp-start", type=int, default=5, help="Movement / PLATON: dense steps before pruning")
    parser.add_argument("--ramp-end", type=int, default=40, help="Movement / PLATON: step of the final sparsity")
    parser.add_argument("--delta-t", type=int, default=5, help="PLATON window / mask period")
    parser.add_argument("--max-layer", type=float, default=0.9, help="max_sparse_ratio of the global groups")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW, constant")
    parser.add_argument("--batch-size", type=int, default=32, help="LLaVA training batch")
    parser.add_argument("--clip-batch-size", type=int, default=64, help="CLIP training batch (contrastive)")
    parser.add_argument("--n-calib", type=int, default=256, help="validation samples of the ID profile")
    parser.add_argument("--amp-samples", type=int, default=256, help="AMP calibration images (held-out: half)")
    parser.add_argument("--tau", type=float, default=1 / 15)
    parser.add_argument("--n-eval", type=int, default=500, help="test scenes (per VQA domain; retrieval pool)")
    parser.add_argument("--latency-batch", type=int, default=16)
    parser.add_argument("--latency-rounds", type=int, default=7)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training sequences (batches and order); default 0 1")
    parser.add_argument("--quick", action="store_true", help="both models, 60%%, 8 methods, 20 steps, 100 eval")
    parser.add_argument("--out", default=None, help="JSON to write (default: docs/benchmarks_nni.json; --quick: none)")
    parser.add_argument("--table", action="store_true", help="print the tables of an existing JSON (--out) and stop")
    args = parser.parse_args(argv)
    if argv is None and os.environ.get("PYTHONHASHSEED") != "0":
        # NNI orders a config's modules through a set, and its global ranking depends on that order
        # (see the docs): run with a fixed hash seed so every run gives the same NNI masks
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    if args.table:
        result = json.loads(Path(args.out or ROOT / "docs" / "benchmarks_nni.json").read_text())
        _add_overlaps(result["rows"])
        print(table(result))
        print(compact_table(result))
        return 0
    if args.quick:
        args.methods = args.methods or list(QUICK_METHODS)
        args.sparsities, args.steps, args.n_eval, args.n_calib, args.amp_samples = [0.6], 20, 100, 128, 128
        args.score_steps, args.ramp_start, args.ramp_end, args.delta_t = 4, 2, 12, 2
        args.seeds = args.seeds or [0]
        args.latency_rounds = 3
    elif args.out is None:
        args.out = str(ROOT / "docs" / "benchmarks_nni.json")
    args.methods = args.methods or list(METHODS)
    args.seeds = args.seeds or [0, 1]
    quiet_cpu_setup(args.threads)
    logging.getLogger("nni").setLevel(logging.ERROR)
    logging.getLogger("vlprune").setLevel(logging.ERROR)
    start_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    setups: dict[str, dict[str, Any]] = {}
    for name in args.models:
        setup = _setup(name, args)
        setups[name] = {"params": setup["params"], "id_seconds": round(setup["id_seconds"], 1),
                        "mlp_ids": {m[1]: round(setup["ids"][m[1]], 2) for m in setup["mlps"]},
                        "dense": _evaluate(name, setup["model"], args.n_eval)}
        print(f"{name}: {setup['params']:,} parameters, dense {setups[name]['dense']}, ID profile "
              f"{setup['id_seconds']:.1f} s", flush=True)
        for sparsity in args.sparsities:
            for method in args.methods:
                if method == "dense" and sparsity != args.sparsities[0]:
                    continue
                for seed in args.seeds:
                    start = time.perf_counter()
                    try:
                        with _quiet_warnings():
                            row = run_one(setup, method, 0.0 if method == "dense" else sparsity, seed, args)
                    except Exception as exc:  # a failing library: record it, go on
                        logger.exception("%s %s %.1f failed", name, method, sparsity)
                        row = {"model": name, "method": method, "sparsity": sparsity, "seed": seed,
                               "error": f"{type(exc).__name__}: {exc}"[:600]}
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    rows.append(row)
                    brief = {k: v for k, v in row.items() if k not in ("kept", "widths", "amp_widths")}
                    print(json.dumps(brief), flush=True)
        if "amp_cache" in setup:
            setups[name]["amp_searches"] = {
                str(d): {"widths": list(w.values()), "seconds": round(s, 2)} for d, (w, s) in setup["amp_cache"]["searches"].items()
            }
    _add_overlaps(rows)
    for row in rows:
        if "kept" in row:
            row["kept"] = _pack_kept(row["kept"])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"), "args": vars(args), "setups": setups, "rows": rows, "seconds": round(time.perf_counter() - start_all, 1),
    }
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return 0


def _keys(model: str) -> tuple[str, ...]:
    return ("math", "general") if model != "clip" else ("i2t_r1", "t2i_r1", "zeroshot_digit")


def _mean_metric(model: str, metrics: list[dict[str, float]]) -> dict[str, float] | None:
    metrics = [m for m in metrics if m]
    if not metrics:
        return None
    return {k: statistics.mean(m[k] for m in metrics) for k in _keys(model)}


def _fmt_metric(model: str, metric: dict[str, float] | None) -> str:
    if not metric:
        return ""
    return " / ".join(f"{metric[k]:.3f}" for k in _keys(model))


def _headline(model: str, metric: dict[str, float]) -> float:
    """Mean of the two main numbers (VQA math and general; retrieval i2t and t2i)."""
    keys = _keys(model)[:2]
    return sum(metric[k] for k in keys) / 2


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["model"], r["method"], r["sparsity"]), []).append(r)
    return out


def compact_table(result: dict[str, Any]) -> str:
    """One markdown table per model, one row per method, both sparsities side by side (means over
    the seeds; the first two metrics only): what docs/benchmarks.md shows."""
    out = []
    groups = _groups(result["rows"])
    sparsities = sorted({r["sparsity"] for r in result["rows"] if r["method"] != "dense"})
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        keys = _keys(model)[:2]
        cells_head = " | ".join(f"{s:.0%}: removed / params / latency | {s:.0%}: after shrink | {s:.0%}: trained" for s in sparsities)
        out.append(f"| method | {cells_head} |")
        out.append("|---|" + "---|---|---|" * len(sparsities))
        for method in dict.fromkeys(r["method"] for r in result["rows"] if r["model"] == model):
            cells = []
            for sparsity in sparsities if method != "dense" else [0.0]:
                rs = groups.get((model, method, sparsity), [])
                if not rs or any("error" in r for r in rs):
                    cells += ["failed" if rs else "", "", ""]
                    continue
                pruned = _mean_metric(model, [r.get("pruned") for r in rs])
                final = _mean_metric(model, [r["metric"] for r in rs])
                removed = statistics.mean(r["neurons_removed"] for r in rs)
                params = statistics.mean(r["params_ratio"] for r in rs)
                latency = statistics.median(r["latency_ratio"] for r in rs)
                cells += [
                    f"{removed:.2f} / {params:.2f}x / {latency:.2f}x",
                    " / ".join(f"{pruned[k]:.3f}" for k in keys) if pruned else "",
                    " / ".join(f"{final[k]:.3f}" for k in keys),
                ]
            if method == "dense":
                cells += [""] * (3 * len(sparsities) - 3)
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def table(result: dict[str, Any]) -> str:
    """Markdown tables (means over the seeds): per model one row per method and sparsity; then the
    Torch-Pruning vs NNI comparison."""
    out = []
    groups = _groups(result["rows"])
    steps = result["args"]["steps"]
    n_seeds = len(result["args"].get("seeds", [0]))
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        setup = result["setups"][model]
        what = "VQA math / general" if model != "clip" else "retrieval i2t / t2i / zero-shot digit"
        out.append(f"**{model}** ({setup['params']:,} parameters; unpruned {what}: {_fmt_metric(model, setup['dense'])})\n")
        out.append(f"| sparsity | method | neurons removed | params | after shrink: {what} | after {steps} steps "
                   f"(mean of {n_seeds} seeds) | seed range | latency | prune + shrink s |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for (m, method, sparsity), rs in groups.items():
            if m != model:
                continue
            failed = [r for r in rs if "error" in r]
            if failed:
                out.append(f"| {sparsity:.0%} | {method} | failed: {failed[0]['error'][:200]} | | | | | | |")
                continue
            r0 = rs[0]
            label = method + (f" (delta_e {r0['delta_e']:g}: vision MLPs {r0['vision_mlp_removed']:.2f})" if "delta_e" in r0 else "")
            final = _mean_metric(model, [r["metric"] for r in rs])
            heads = [_headline(model, r["metric"]) for r in rs]
            secs = f"{statistics.mean(r['prune_seconds'] for r in rs):.1f}"
            if "shrink_seconds" in r0:
                secs += f" + {statistics.mean(r['shrink_seconds'] for r in rs):.2f}"
            removed = statistics.mean(r["neurons_removed"] for r in rs)
            params = statistics.mean(r["params_ratio"] for r in rs)
            out.append(
                f"| {sparsity:.0%} | {label} | {removed:.2f} | {params:.2f}x | "
                f"{_fmt_metric(model, _mean_metric(model, [r.get('pruned') for r in rs]))} | {_fmt_metric(model, final)} | "
                f"{max(heads) - min(heads):.3f} | {statistics.median(r['latency_ratio'] for r in rs):.2f}x | {secs} |"
            )
        out.append("")
    tp_rows = [g for k, g in groups.items() if any("overlap" in r for r in g)]
    if tp_rows:
        out.append("**Kept neurons: Torch-Pruning route vs NNI route, ID-weighted vs unweighted, same sparsity**\n")
        out.append("| model | sparsity | row | reference row | kept neurons in common | same per-layer widths | "
                   "neurons removed row / ref | params row / ref | after shrink: row | ref | trained: row | ref |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rs in tp_rows:
            r = rs[0]
            model = r["model"]
            ref = groups[(model, r["overlap_with"], r["sparsity"])]
            out.append(
                f"| {model} | {r['sparsity']:.0%} | {r['method']} | {r['overlap_with']} | "
                f"{statistics.mean(x['overlap'] for x in rs):.3f} | {'yes' if all(x['same_widths'] for x in rs) else 'no'} | "
                f"{r['neurons_removed']:.3f} / {ref[0]['neurons_removed']:.3f} | {r['params_ratio']:.3f}x / {ref[0]['params_ratio']:.3f}x | "
                f"{_fmt_metric(model, r.get('pruned'))} | {_fmt_metric(model, ref[0].get('pruned'))} | "
                f"{_fmt_metric(model, _mean_metric(model, [x['metric'] for x in rs]))} | "
                f"{_fmt_metric(model, _mean_metric(model, [x['metric'] for x in ref]))} |"
            )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
