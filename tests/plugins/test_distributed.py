"""Several processes: 2 gloo ranks on CPU give what 1 process gives on the union of their shards.

One launch of ``tests/plugins/_distributed_worker.py`` on 2 ranks runs every scenario (uneven
shards, Taylor / PLATON under DDP, pruning on every rank, and the bad inputs); the tests read what
each rank saved. A second launch runs the README's ``torchrun --nproc_per_node 2`` command on
``examples/distributed_profile.py``. Each launch has a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from vlprune.plugins import distributed
from vlprune.testbed.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_distributed_worker.py")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_env(world: int = 2) -> dict[str, str]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def launch(out: Path, world: int = 2) -> list[dict[str, Any]]:
    """Run the worker on ``world`` ranks; fail (never block) on a hang or a crash."""
    env = run_env(world)
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {world} ranks did not finish within {TIMEOUT} s (a collective hung?)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(tmp_path_factory.mktemp("dist"))


def ok(result: Any) -> Any:
    assert not (isinstance(result, tuple) and result and result[0] == "error"), f"raised: {result}"
    return result


def close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            close(a[k], b[k], rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y, rtol, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    else:
        assert a == pytest.approx(b, rel=rtol, abs=atol)


# -- helpers ----------------------------------------------------------------------------------------


def test_single_process_is_untouched() -> None:
    x = torch.randn(3, 2)
    assert not distributed.is_active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.gather_rows(x) is x and distributed.all_reduce_sum(x) is x
    with distributed.guard("x", config={"f": lambda: 0}) as g:
        g.count("batches", 0)  # no process group: nothing to compare, no error


def test_ranks_see_the_group(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [(0, 2, True), (1, 2, True)]


def test_gather_rows_uneven_and_with_grad(ranks: list[dict[str, Any]]) -> None:
    expected = torch.cat([torch.full((n + 2, 3), float(n)) + torch.arange(3.0) for n in range(2)])
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for r, res in enumerate(ranks):
        got = ok(res["gather_rows"])
        torch.testing.assert_close(got["rows"], expected, rtol=0, atol=0)
        torch.testing.assert_close(got["with_empty"], torch.ones(2, 3), rtol=0, atol=0)
        assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"].float(), expected.bfloat16().float())
        # d/dx_r of sum_ranks sum(gather(x) * w): every rank's loss reaches x_r once
        offset = 0 if r == 0 else 2
        torch.testing.assert_close(got["grad"], 2 * w[offset : offset + r + 2])


def test_all_reduce_sum(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        sums, number = ok(res["all_reduce_sum"])
        torch.testing.assert_close(sums["a"], torch.full((2,), 3.0))
        assert sums["n"].dtype == torch.int64 and int(sums["n"]) == 3 and number == 3
    assert ok(ranks[0]["after_errors"]).item() == 2.0


# -- criteria: 2 ranks == 1 process on the union --------------------------------------------------


def test_layer_similarity_matches_one_process_on_the_union(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["layer_similarity"]), ok(ranks[1]["layer_similarity"])
    for key in ("sim", "last", "angular", "bi"):
        close(r0[key], r0["ref_" + key], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0)
    assert not torch.allclose(r0["local_sim"], r0["ref_sim"], rtol=1e-6, atol=0), "the shards must matter"


def test_amp_importance_search_and_objective_match_the_union(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["amp"]), ok(ranks[1]["amp"])
    close(r0["scores"], r0["ref_scores"], rtol=1e-4, atol=1e-7)
    close(r1["scores"], r0["scores"], rtol=0, atol=0)
    assert r0["widths"] == r0["ref_widths"] == r1["widths"]
    assert r0["objective"] == pytest.approx(r0["ref_objective"], rel=1e-6) and r1["objective"] == r0["objective"]
    local = r0["local_scores"]
    assert any(not torch.allclose(local[n], r0["ref_scores"][n], rtol=1e-3) for n in local), "the shards must matter"


def test_every_rank_prunes_identically(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["prune_identically"]), ok(ranks[1]["prune_identically"])
    assert r0["changed"] and r0["shape"][0] < 64
    assert r0["digests"][0] == r0["digests"][1] == r1["digests"][0]
    assert r0["digests"][0] == r0["ref_digest"]


def test_taylor_and_platon_under_ddp_agree_with_the_union(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["ddp_taylor_platon"]), ok(ranks[1]["ddp_taylor_platon"])
    close(r0["taylor"], r0["ref_taylor"], rtol=1e-5, atol=1e-7)
    close(r0["platon"], r0["ref_platon"], rtol=1e-5, atol=1e-9)
    close(r1["taylor"], r0["taylor"], rtol=0, atol=0)
    close(r1["platon"], r0["platon"], rtol=0, atol=0)


# -- bad input: a VLPruneError on every rank, no hang ----------------------------------------------


def error_of(res: Any) -> tuple[str, str]:
    assert isinstance(res, tuple) and res[0] == "error", f"no error raised: {type(res)}"
    return res[1], res[2]


def test_different_config_raises_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        cls, msg = error_of(res["bad_config"])
        assert cls == "VLPruneError" and "'tau'" in msg and "rank 1" in msg


def test_different_model_shapes_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        cls, msg = error_of(res["bad_model"])
        assert cls == "VLPruneError" and "layers.1.mlp.down_proj.weight" in msg and "(32, 63)" in msg


@pytest.mark.parametrize("case", ["no_data", "no_data_amp"])
def test_a_rank_with_no_data_raises_on_every_rank(ranks: list[dict[str, Any]], case: str) -> None:
    for res in ranks:
        cls, msg = error_of(res[case])
        assert cls == "DataError" and "empty" in msg
    assert "rank(s) 1" in error_of(ranks[0][case])[1]


def test_amp_needs_equal_batch_counts(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        cls, msg = error_of(res["amp_unequal_batches"])
        assert cls == "DataError" and "[1, 2]" in msg


def test_distill_under_ddp_matches_the_union_and_only_rank_0_writes(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["distill"]), ok(ranks[1]["distill"])
    # uneven shards (3 + 2 samples per step). Attention key biases are left out: softmax is invariant
    # to them, their true gradient is 0 and AdamW turns its rounding noise into full-size steps
    keys = [k for k in r0["weights"] if not k.endswith("k_proj.bias")]
    assert len(keys) > 50
    close({k: r0["weights"][k] for k in keys}, {k: r0["ref_weights"][k] for k in keys}, rtol=1e-4, atol=1e-6)
    moved = tiny_model("clip", seed=1).state_dict()
    assert not torch.allclose(moved["vision_model.encoder.layers.0.mlp.fc1.weight"],
                              r0["weights"]["vision_model.encoder.layers.0.mlp.fc1.weight"])
    close(r1["weights"], r0["weights"], rtol=0, atol=0)
    assert [v for _, v in r0["loss"]] == pytest.approx([v for _, v in r0["ref_loss"]], rel=1e-5)
    assert r0["saves"] and not r1["saves"], "only rank 0 writes the checkpoint"
    assert r0["start"] == r1["start"] == 3 and r0["digest"] == r1["digest"]  # both resumed from rank 0's file


# -- the README's command --------------------------------------------------------------------------

README_COMMAND = ["torchrun", "--nproc_per_node", "2", "examples/distributed_profile.py"]


def test_readme_torchrun_command_runs_the_example() -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to this Python")
    env = run_env()  # a free port, given the way torchrun reads its options from the environment
    env["PET_MASTER_PORT"] = env.pop("MASTER_PORT")
    env.pop("WORLD_SIZE")
    try:
        done = subprocess.run([str(torchrun), *README_COMMAND[1:]], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(README_COMMAND)} did not finish within {TIMEOUT} s")
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and report["batches_per_rank"] == [3, 2]  # uneven shards
    assert report["ranks_agree"] is True
    assert report["max_rel_diff_vs_one_process"] < 1e-5
    assert len(report["layer_similarity"]) == 4 and report["amp_mlps"] > 0 and len(report["intrinsic_dim"]) == 8


def test_estimate_ids_gathers_rows_and_matches_the_union(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = ok(ranks[0]["estimate_ids"]), ok(ranks[1]["estimate_ids"])
    for n in (15, 100):  # 15: the union's first 15 rows (rank 0's 11, rank 1's first 4); 100: all 18
        close(r0[n], r0[f"ref_{n}"], rtol=1e-9, atol=0)
        assert r1[n] == r0[n]
    assert r0["local_100"] != r0["ref_100"], "the shards must matter"


@pytest.mark.parametrize("case", ["id_budget_too_small_on_one_rank", "id_sketch_too_big"])
def test_estimate_ids_bad_input_raises_on_every_rank(ranks: list[dict[str, Any]], case: str) -> None:
    for res in ranks:
        cls, msg = error_of(res[case])
        assert cls in ("VLPruneError", "DataError")
    assert "max_memory_mb" in error_of(ranks[0]["id_budget_too_small_on_one_rank"])[1]
    assert "sketch" in error_of(ranks[1]["id_sketch_too_big"])[1]


def test_broadcast_module_copies_rank_src_and_refuses_other_shapes(ranks: list[dict[str, Any]]) -> None:
    for res in ranks:
        got = ok(res["broadcast_module"])
        (before0, after0), (before1, after1) = got["every"]
        assert before0 != before1 and after0 == after1 == before1  # rank 1's weights (bf16, buffers too)
        cls, msg = got["refused"]
        assert cls == "VLPruneError" and "bias: ((4,)" in msg and "((5,)" in msg and got["untouched"]
