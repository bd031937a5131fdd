"""Vocab-parallel cross-entropy: 2 and 3 gloo processes on 127.0.0.1, compared with single-process xent/torch.

Each test runs one scenario of tests/distributed/dist_worker.py on every rank. A scenario is a sequence of
checks; each rank records every check's outcome ("ok" or what failed) in a JSON file, and the test reports
each check that did not pass on every rank as its own failed subtest, naming the scenario, the check and
the ranks, with each rank's traceback, so one failing check does not hide the others. A watchdog kills
the ranks if they have not finished within the deadline (the process group also has a 60 s collective
timeout), so a hang fails the test instead of stalling the suite; the checks done before it still report.

`import dist_worker` finds this directory's module because pytest (its default "prepend" import mode, no
__init__.py here) puts tests/distributed on sys.path; the spawned ranks inherit that sys.path.
"""

from __future__ import annotations

import json
import time

import dist_worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

DEADLINE_S = 240

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def _spawn(world: int, sizes: list[int], scenario: str, tmp_path, subtests) -> None:
    """Run `scenario` on `world` ranks; fail a subtest for each check that did not pass on every rank, and
    the test itself if a rank hung, died, raised outside its checks or stopped early."""
    rendezvous = str(tmp_path / "rendezvous")
    ctx = mp.start_processes(
        dist_worker.run,
        args=(world, rendezvous, sizes, scenario, str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    problems = []
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                problems.append(f"ranks did not finish within {DEADLINE_S} s (hang)")
                break
    except ProcessException as crash:  # a rank died (a signal, or an exception in the worker's own code)
        problems.append(str(crash))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = {rank: _result(tmp_path, rank) for rank in range(world)}
    names = list(dict.fromkeys(name for r in results.values() if r for name in r["checks"]))
    names = [name for name in names if name != dist_worker.OUTSIDE]
    label = f"{scenario} on {world} ranks"
    for name in names:
        outcomes = {
            rank: (r["checks"].get(name, "not run on this rank") if r else "no result") for rank, r in results.items()
        }
        failed = {rank: outcome for rank, outcome in outcomes.items() if outcome != "ok"}
        if failed:
            with subtests.test(msg=name, ranks=sorted(failed)):
                pytest.fail(
                    f"{label}, check {name!r}, failed on rank(s) {sorted(failed)}:\n{_by_rank(failed)}", pytrace=False
                )
    for rank, r in results.items():
        if r is None:
            problems.append(f"rank {rank} wrote no result")
        elif dist_worker.OUTSIDE in r["checks"]:
            problems.append(f"rank {rank} raised outside its checks:\n{r['checks'][dist_worker.OUTSIDE]}")
        elif r["stopped"]:
            problems.append(f"rank {rank} stopped {r['stopped']}")
        elif not r["finished"]:
            running = [name for name, outcome in r["checks"].items() if outcome == dist_worker.RUNNING]
            problems.append(f"rank {rank} did not finish (running: {running or 'no check'})")
    if problems:
        pytest.fail(f"{label}:\n" + "\n".join(problems), pytrace=False)
    assert names, f"{label}: no check ran"


def _result(tmp_path, rank: int):
    path = tmp_path / f"rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _by_rank(outcomes: dict[int, str]) -> str:
    return "\n".join(f"--- rank {rank} ---\n{outcome}" for rank, outcome in outcomes.items())


# Uneven shards, including a rank that holds a single class, and one that holds none (3 ranks, 2 classes
# split as torch.chunk would leave the last rank empty).
LAYOUTS = {2: [7, 30], 3: [1, 20, 16], "empty rank": [20, 0, 17]}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, "empty rank"])
def test_logits_path_matches_single_process(world, tmp_path, subtests):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "logits", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, "empty rank"])
def test_linear_path_matches_single_process(world, tmp_path, subtests):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "linear", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_with_torch_tensor_parallel_colwise_lm_head(world, tmp_path, subtests):
    _spawn(world, LAYOUTS[world], "tensor_parallel", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_logits_and_heads_match_single_process(world, tmp_path, subtests):
    _spawn(world, LAYOUTS[world], "dtensor", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_layouts_torch_accepts(world, tmp_path, subtests):
    _spawn(world, LAYOUTS[world], "dtensor_layouts", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, "empty rank"])
def test_every_option_means_the_same_distributed(world, tmp_path, subtests):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "distributed_options", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.compile
def test_vocab_parallel_loss_under_torch_compile_fullgraph(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "compiled", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_distributed_data_parallel(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "ddp", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_fully_shard_fsdp2(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "fsdp", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_transformers_patch_under_fsdp2_and_tensor_parallel(tmp_path, subtests):
    pytest.importorskip("transformers")
    _spawn(2, LAYOUTS[2], "hf", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("world", [2, "empty rank"])
def test_token_logprobs_and_entropy_for_rl(world, tmp_path, subtests):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "rl", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, "empty rank"])
def test_inplace_over_a_split_vocabulary(world, tmp_path, subtests):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "inplace", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_errors_raise_on_every_rank_instead_of_hanging(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "errors", tmp_path, subtests)


def test_uninitialized_process_group_is_a_clear_error():
    import torch

    from xent.distributed import vocab_parallel_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))


def test_unknown_statistics_raise_before_any_communication():
    """A bad return_stats raises before any collective (no process group is needed to see it)."""
    from xent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    with pytest.raises(ValueError, match="return_stats"):
        vocab_parallel_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), return_stats="accuracy")
    with pytest.raises(TypeError, match="return_stats"):
        vocab_parallel_linear_cross_entropy(
            torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2]), return_stats=3
        )


@pytest.mark.distributed
@pytest.mark.slow
def test_dtensor_on_a_2d_mesh_matches_single_process(tmp_path, subtests):
    _spawn(4, [9, 9, 9, 10], "mesh2d", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_gathered_head_follows_fsdp_gradient_divide_factor(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "fsdp_divide", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_over_a_tensor_parallel_head_on_a_2d_mesh(tmp_path, subtests):
    _spawn(4, [9, 9, 9, 10], "fsdp_tp", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_global_token_count_ddp_fsdp_gradient_accumulation(tmp_path, subtests):
    _spawn(2, LAYOUTS[2], "token_count", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_components_match_torchtitans_own(tmp_path, subtests):
    pytest.importorskip("torchtitan.components.loss", reason="torchtitan is not installed")
    _spawn(2, LAYOUTS[2], "torchtitan", tmp_path, subtests)


@pytest.mark.distributed
@pytest.mark.slow
def test_torchtitan_components_on_a_2d_mesh(tmp_path, subtests):
    pytest.importorskip("torchtitan.components.loss", reason="torchtitan is not installed")
    _spawn(4, [9, 9, 9, 10], "torchtitan_2d", tmp_path, subtests)
