"""Score a model on several processes: each rank its shard of the calibration data, every rank the result.

Run (CPU, gloo; on GPUs the same script uses NCCL, one GPU per rank)::

    torchrun --nproc_per_node 2 examples/distributed_profile.py

Every rank loads the testbed LLaVA and builds the same calibration batches, keeps its shard
(batches ``rank::world`` for the layer scores, rows ``rank::world`` of every image batch for AMP,
whose entropy is over the global batch), and calls the plain vlprune functions: inside the
process group they combine the ranks' statistics themselves and return the same result on every
rank as one process on all the data. Rank 0 then prints one JSON line: the layer similarity, the
AMP importance summary, the intrinsic dimension of every MLP's output (TwoNN on the rows gathered
from all ranks), whether all ranks agree bit for bit, and (unless ``--no-check``) the
largest difference from one process on the union of the shards, computed on rank 0 inside
``vlprune.plugins.distributed.local_only()``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

import vlprune.testbed
from vlprune.plugins import amp, distributed
from vlprune.plugins.intrinsic_dim import estimate_ids
from vlprune.plugins.layer_similarity import layer_similarity


def digest(value: Any) -> str:
    """Bitwise fingerprint of a tensor or a dict of tensors."""
    tensors = value.values() if isinstance(value, dict) else [value]
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def profile(model: torch.nn.Module, text_batches: list[Any], image_batches: list[Any], n_samples: int) -> dict[str, Any]:
    """The scores this script reports (the same code for every rank and for the 1-process check)."""
    ids = estimate_ids(model, text_batches, ["*.mlp.fc2", "*.mlp.down_proj"], n_samples=n_samples, representation="mean",
                       progress=False).ids()
    return {
        "layer_similarity": layer_similarity(model, text_batches, progress=False),
        "amp_importance": amp.neuron_importance(model, image_batches, tau=1 / 15, progress=False),
        "intrinsic_dim": torch.tensor(list(ids.values()), dtype=torch.float64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava", help="testbed model (vlprune.testbed.load)")
    parser.add_argument("--samples", type=int, default=40, help="calibration samples over all ranks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-check", action="store_true", help="skip the 1-process comparison on rank 0")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda" if cuda else "cpu")

    model = vlprune.testbed.load(args.model).to(device)
    text = vlprune.testbed.batches(args.model, args.samples, args.batch_size)
    images = vlprune.testbed.batches(args.model, args.samples, args.batch_size, images_only=True)
    text_shard = text[rank::world]  # uneven when the batch count does not divide
    image_shard = [{k: v[rank::world] for k, v in b.items()} for b in images]  # global batch i, split

    result = profile(model, text_shard, image_shard, args.samples)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, {k: digest(v) for k, v in result.items()})
    report: dict[str, Any] = {
        "world_size": world,
        "backend": dist.get_backend(),
        "batches_per_rank": [len(text[r::world]) for r in range(world)],
        "layer_similarity": [round(float(v), 6) for v in result["layer_similarity"]],
        "amp_mlps": len(result["amp_importance"]),
        "amp_mean_score": float(torch.cat(list(result["amp_importance"].values())).mean()),
        "intrinsic_dim": [round(float(v), 3) for v in result["intrinsic_dim"]],
        "ranks_agree": all(e == every[0] for e in every),
    }
    if rank == 0 and not args.no_check:
        with distributed.local_only():
            union = profile(model, text, images, args.samples)
        report["max_rel_diff_vs_one_process"] = max(
            float(((result[k] - union[k]).abs().max() / union[k].abs().max()))
            if k != "amp_importance"
            else max(float((result[k][n] - union[k][n]).abs().max() / union[k][n].abs().max()) for n in union[k])
            for k in union
        )
    if rank == 0:
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
