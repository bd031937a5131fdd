"""Vocab-parallel cross-entropy: 2 and 3 gloo processes on 127.0.0.1, compared with single-process xent/torch.

The ranks run tests/api/dist_worker.py; each writes 'ok' or its traceback to a file. A watchdog kills them if
they have not finished within the deadline (the process group also has a 60 s collective timeout), so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

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


def _spawn(world: int, sizes: list[int], scenario: str, tmp_path) -> None:
    rendezvous = str(tmp_path / "rendezvous")
    ctx = mp.start_processes(
        dist_worker.run,
        args=(world, rendezvous, sizes, scenario, str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{scenario}: ranks did not finish within {DEADLINE_S} s (hang)")
    except ProcessException as crash:
        # A rank died (a signal or an exception outside its checks): say what each rank had reported.
        pytest.fail(f"{scenario}: {crash}\n{_outcomes(world, tmp_path)}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in range(world):
        path = tmp_path / f"rank{rank}.txt"
        assert path.exists(), f"rank {rank} wrote no result"
        outcome = path.read_text()
        assert outcome == "ok", f"rank {rank} of {world} ({scenario}):\n{outcome}"


def _outcomes(world: int, tmp_path) -> str:
    lines = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.txt"
        lines.append(f"rank {rank}: " + (path.read_text() if path.exists() else "no result written"))
    return "\n".join(lines)


# Uneven shards, including a rank that holds a single class, and one that holds none (3 ranks, 2 classes
# split as torch.chunk would leave the last rank empty).
LAYOUTS = {2: [7, 30], 3: [1, 20, 16], "empty rank": [20, 0, 17]}


@pytest.mark.parametrize("world", [2, 3, "empty rank"])
def test_logits_path_matches_single_process(world, tmp_path):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "logits", tmp_path)


@pytest.mark.parametrize("world", [2, 3, "empty rank"])
def test_linear_path_matches_single_process(world, tmp_path):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "linear", tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_with_torch_tensor_parallel_colwise_lm_head(world, tmp_path):
    _spawn(world, LAYOUTS[world], "tensor_parallel", tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_logits_and_heads_match_single_process(world, tmp_path):
    _spawn(world, LAYOUTS[world], "dtensor", tmp_path)


def test_vocab_parallel_loss_under_torch_compile_fullgraph(tmp_path):
    _spawn(2, LAYOUTS[2], "compiled", tmp_path)


def test_distributed_data_parallel(tmp_path):
    _spawn(2, LAYOUTS[2], "ddp", tmp_path)


def test_fully_shard_fsdp2(tmp_path):
    _spawn(2, LAYOUTS[2], "fsdp", tmp_path)


def test_transformers_patch_under_fsdp2_and_tensor_parallel(tmp_path):
    pytest.importorskip("transformers")
    _spawn(2, LAYOUTS[2], "hf", tmp_path)


@pytest.mark.parametrize("world", [2, "empty rank"])
def test_token_logprobs_and_entropy_for_rl(world, tmp_path):
    _spawn(len(LAYOUTS[world]), LAYOUTS[world], "rl", tmp_path)


def test_errors_raise_on_every_rank_instead_of_hanging(tmp_path):
    _spawn(2, LAYOUTS[2], "errors", tmp_path)


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
