"""One rank of tests/plugins/test_distributed.py: runs every scenario, saves what it got.

Launched twice by the test (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment);
writes ``<out>/rank<r>.pt``: scenario name -> result, or ``("error", class name, message)``.
Every reference ("one process over the union of the shards") is computed on rank 0 inside
``distributed.local_only()``, i.e. by the single-process code path.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch

torch.set_num_threads(1)
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from vlprune.plugins import amp, distributed  # noqa: E402
from vlprune.plugins import layer_similarity as ls  # noqa: E402
from vlprune.plugins.platon import Platon  # noqa: E402
from vlprune.testbed.tiny import example_inputs, tiny_model  # noqa: E402

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
results: dict[str, Any] = {}


def scenario(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - recorded for the test to assert on
            results[name] = ("error", type(err).__name__, str(err))
            if os.environ.get("VLPRUNE_TEST_TRACE"):
                traceback.print_exc()
        return fn

    return wrap


def cat_batches(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- shards: uneven sizes and (where a call allows it) uneven counts -------------------------------
LLAVA_SIZES = {0: [3, 2, 1], 1: [4, 2]}  # layer similarity: batch counts and sizes differ
llava_all = {r: [example_inputs("llava", n, seed=10 * r + i) for i, n in enumerate(s)] for r, s in LLAVA_SIZES.items()}
CLIP_SIZES = {0: [3, 4], 1: [5, 1]}  # AMP: same count (global batch i = every rank's batch i), sizes differ
clip_all = {
    r: [{"pixel_values": example_inputs("clip", n, seed=100 + 10 * r + i)["pixel_values"]} for i, n in enumerate(s)]
    for r, s in CLIP_SIZES.items()
}
clip_union = [cat_batches([clip_all[r][i] for r in range(WORLD)]) for i in range(2)]
clip_heldout = {r: [{"pixel_values": example_inputs("clip", 3 + r, seed=900 + r)["pixel_values"]}] for r in range(WORLD)}
clip_heldout_union = [cat_batches([clip_heldout[r][0] for r in range(WORLD)])]


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("VLPRUNE_TEST_PG_TIMEOUT", 60))))
    results["rank"] = (distributed.rank(), distributed.world_size(), distributed.is_active())

    @scenario("gather_rows")
    def _() -> Any:
        x = torch.full((RANK + 2, 3), float(RANK)) + torch.arange(3.0)
        empty = torch.zeros((0, 3)) if RANK == 1 else torch.ones((2, 3))
        w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))  # same on every rank
        leaf = x.clone().requires_grad_(True)
        every = distributed.gather_rows(leaf, grad=True)
        (every * w).sum().backward()  # each rank adds w . its rows' copies; grads sum over ranks
        return {"rows": distributed.gather_rows(x), "with_empty": distributed.gather_rows(empty),
                "grad": leaf.grad, "bf16": distributed.gather_rows(x.bfloat16())}

    @scenario("all_reduce_sum")
    def _() -> Any:
        return distributed.all_reduce_sum({"a": torch.full((2,), RANK + 1.0), "n": torch.tensor(RANK + 1)}), \
            distributed.all_reduce_sum(RANK + 1)

    llava = tiny_model("llava")

    @scenario("layer_similarity")
    def _() -> Any:
        out = {
            "sim": ls.layer_similarity(llava, llava_all[RANK], progress=False),
            "last": ls.layer_similarity(llava, llava_all[RANK], tokens="last", weighting="sample", progress=False),
            "angular": ls.angular_distance_matrix(llava, llava_all[RANK], progress=False),
            "bi": ls.block_influence(llava, llava_all[RANK], progress=False),
        }
        if RANK == 0:
            with distributed.local_only():
                union = llava_all[0] + llava_all[1]
                out["ref_sim"] = ls.layer_similarity(llava, union, progress=False)
                out["ref_last"] = ls.layer_similarity(llava, union, tokens="last", weighting="sample", progress=False)
                out["ref_angular"] = ls.angular_distance_matrix(llava, union, progress=False)
                out["ref_bi"] = ls.block_influence(llava, union, progress=False)
                out["local_sim"] = ls.layer_similarity(llava, llava_all[0], progress=False)
        return out

    clip = tiny_model("clip")

    @scenario("amp")
    def _() -> Any:
        scores = amp.neuron_importance(clip, clip_all[RANK], tau=1 / 15, progress=False)
        widths = amp.search_widths(clip, scores, clip_heldout[RANK], delta_e=5e-3, tau=1 / 15, progress=False)
        value = amp.evaluate_objective(clip, clip_heldout[RANK], tau=1 / 15)
        out = {"scores": scores, "widths": widths, "objective": value}
        if RANK == 0:
            with distributed.local_only():
                ref = amp.neuron_importance(clip, clip_union, tau=1 / 15, progress=False)
                out["ref_scores"] = ref
                out["ref_widths"] = amp.search_widths(clip, ref, clip_heldout_union, delta_e=5e-3, tau=1 / 15, progress=False)
                out["ref_objective"] = amp.evaluate_objective(clip, clip_heldout_union, tau=1 / 15)
                out["local_scores"] = amp.neuron_importance(clip, clip_all[0], tau=1 / 15, progress=False)
        return out

    @scenario("prune_identically")
    def _() -> Any:
        from vlprune.adapters.hf.prune import prune_hf_model
        from vlprune.adapters.torch_pruning import AMPEntropyImportance

        model = tiny_model("clip")
        scores = amp.neuron_importance(model, clip_all[RANK], tau=1 / 15, progress=False)
        before = digest(model)
        prune_hf_model(model, example_inputs("clip", 2), AMPEntropyImportance(scores, model, rank=False), 0.25,
                       prune_heads=False, modalities=("vision",))
        mine = digest(model)
        every: list[Any] = [None] * WORLD
        dist.all_gather_object(every, mine)
        out = {"digests": every, "changed": before != mine,
               "shape": tuple(model.vision_model.encoder.layers[0].mlp.fc1.weight.shape)}
        if RANK == 0:
            with distributed.local_only():
                ref = tiny_model("clip")
                ref_scores = amp.neuron_importance(ref, clip_union, tau=1 / 15, progress=False)
                prune_hf_model(ref, example_inputs("clip", 2), AMPEntropyImportance(ref_scores, ref, rank=False), 0.25,
                               prune_heads=False, modalities=("vision",))
                out["ref_digest"] = digest(ref)
        return out

    @scenario("broadcast_module")
    def _() -> Any:
        torch.manual_seed(RANK)  # different weights on each rank
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
        net[1].running_mean.fill_(RANK + 1.0)
        before = digest(net)
        distributed.broadcast_module(net, src=1)
        every: list[Any] = [None] * WORLD
        dist.all_gather_object(every, (before, digest(net)))
        wrong = nn.Linear(3, 4 + RANK)
        try:
            distributed.broadcast_module(wrong)
            refused = None
        except Exception as err:  # noqa: BLE001
            refused = (type(err).__name__, str(err))
        return {"every": every, "refused": refused, "untouched": wrong.weight.shape[0] == 4 + RANK}

    # -- Taylor / PLATON under DDP: DDP averages gradients, so per-rank scores agree -----------------
    @scenario("ddp_taylor_platon")
    def _() -> Any:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(5)
        xs = [torch.randn(4, 6, generator=g) for _ in range(4)]  # 2 steps x 2 ranks, equal shards
        ys = [torch.randn(4, 1, generator=g) for _ in range(4)]
        ddp = nn.parallel.DistributedDataParallel(net)
        platon = Platon(delta_t=1, beta1=0.5, beta2=0.5)
        taylor = []
        for step in range(2):
            i = 2 * step + RANK
            ddp.zero_grad()
            nn.functional.mse_loss(ddp(xs[i]), ys[i]).backward()
            platon.update(net)
            taylor.append({n: (p * p.grad).abs().clone() for n, p in net.named_parameters()})
        out = {"taylor": taylor, "platon": platon.scores()}
        if RANK == 0:
            with distributed.local_only():
                torch.manual_seed(0)
                ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
                ref_platon = Platon(delta_t=1, beta1=0.5, beta2=0.5)
                ref_taylor = []
                for step in range(2):
                    ref.zero_grad()
                    x, y = torch.cat(xs[2 * step : 2 * step + 2]), torch.cat(ys[2 * step : 2 * step + 2])
                    nn.functional.mse_loss(ref(x), y).backward()
                    ref_platon.update(ref)
                    ref_taylor.append({n: (p * p.grad).abs().clone() for n, p in ref.named_parameters()})
                out["ref_taylor"], out["ref_platon"] = ref_taylor, ref_platon.scores()
        return out

    @scenario("distill")
    def _() -> Any:
        from vlprune.recipes.distill import distill

        def shard(step: int, r: int) -> dict[str, torch.Tensor]:
            return {"pixel_values": example_inputs("clip", 3 - r, seed=500 + 10 * step + r)["pixel_values"]}

        teacher = tiny_model("clip")
        kwargs = dict(lr=1e-2, clip_grad=1.0, progress=False)
        checkpoint = os.path.join(sys.argv[1], "distill_ckpt")
        saves = []
        real_save = torch.save
        torch.save = lambda obj, f, *a, **k: (saves.append(str(f)), real_save(obj, f, *a, **k))[1]  # type: ignore[assignment]
        try:
            student = tiny_model("clip", seed=1)
            log = distill(student, teacher, lambda step: shard(step, RANK), 3, checkpoint=checkpoint, save_every=2, **kwargs)
            weights = {k: v.clone() for k, v in student.state_dict().items()}
            resumed = distill(student, teacher, lambda step: shard(step, RANK), 4, checkpoint=checkpoint, **kwargs)
        finally:
            torch.save = real_save  # type: ignore[assignment]
        out = {"weights": weights, "saves": saves, "loss": log["loss"], "start": resumed["start_step"],
               "digest": digest(student)}
        if RANK == 0:
            with distributed.local_only():
                ref = tiny_model("clip", seed=1)
                union = lambda step: cat_batches([shard(step, r) for r in range(WORLD)])  # noqa: E731
                out["ref_loss"] = distill(ref, teacher, union, 3, **kwargs)["loss"]
                out["ref_weights"] = {k: v.clone() for k, v in ref.state_dict().items()}
        return out

    ID_SIZES = {0: [6, 5], 1: [7]}  # uneven counts and sizes; the union holds 18 samples
    id_all = {r: [{"pixel_values": example_inputs("clip", n, seed=300 + 10 * r + i)["pixel_values"]}
                  for i, n in enumerate(s)] for r, s in ID_SIZES.items()}
    id_kwargs = dict(modules="encoder.layers.*.mlp.fc1", representation="mean", progress=False)
    vision = clip.vision_model

    @scenario("estimate_ids")
    def _() -> Any:
        from vlprune.plugins.intrinsic_dim import estimate_ids

        out = {n: estimate_ids(vision, id_all[RANK], n_samples=n, **id_kwargs).ids()
               for n in (15, 100)}  # 15: rank 0's 11 rows and rank 1's first 4 (the union's first 15)
        if RANK == 0:
            with distributed.local_only():
                union = id_all[0] + id_all[1]
                for n in (15, 100):
                    out[f"ref_{n}"] = estimate_ids(vision, union, n_samples=n,
                                                   **id_kwargs).ids()
                out["local_100"] = estimate_ids(vision, id_all[0], n_samples=100,
                                                **id_kwargs).ids()
        return out

    @scenario("id_budget_too_small_on_one_rank")
    def _() -> Any:
        from vlprune.plugins.intrinsic_dim import estimate_ids

        return estimate_ids(vision, id_all[RANK], n_samples=15, max_memory_mb=1e-5 if RANK == 1 else None,
                            **id_kwargs)

    @scenario("id_sketch_too_big")
    def _() -> Any:
        from vlprune.plugins.intrinsic_dim import estimate_ids

        return estimate_ids(vision, id_all[RANK], n_samples=15, sketch_dim=10_000,
                            **id_kwargs)

    # -- bad input: every rank must raise, nobody hangs ---------------------------------------------
    @scenario("bad_config")
    def _() -> Any:
        return amp.neuron_importance(clip, clip_all[RANK], tau=1 / 15 if RANK == 0 else 1 / 20, progress=False)

    @scenario("bad_model")
    def _() -> Any:
        model = tiny_model("llava")
        if RANK == 1:
            layer = model.get_submodule("model.language_model.layers.1.mlp.down_proj")
            layer.weight = nn.Parameter(layer.weight[:, :-1].clone())
            layer.in_features -= 1
        return ls.layer_similarity(model, llava_all[RANK], progress=False)

    @scenario("no_data")
    def _() -> Any:
        return ls.layer_similarity(llava, llava_all[RANK] if RANK == 0 else [], progress=False)

    @scenario("no_data_amp")
    def _() -> Any:
        return amp.neuron_importance(clip, clip_all[RANK] if RANK == 0 else [], tau=1 / 15, progress=False)

    @scenario("amp_unequal_batches")
    def _() -> Any:
        return amp.neuron_importance(clip, clip_all[RANK][: RANK + 1], tau=1 / 15, progress=False)

    @scenario("after_errors")  # the process group still works after the errors above
    def _() -> Any:
        return distributed.all_reduce_sum(torch.ones(1))

    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(sys.argv[1], f"rank{RANK}.pt"))


if __name__ == "__main__":
    main()
