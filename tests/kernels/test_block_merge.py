"""The row math that merges per-block statistics (the vocab-parallel exchange's): lse, entropy and argmax of
rows split into blocks of classes equal those of the whole rows, on masked, empty and tied blocks."""

from __future__ import annotations

import math

import pytest
import torch

from xent import reference
from xent.kernels import rows
from xent.problems import Options


def _block_stats(z: torch.Tensor, start: int, size: int) -> tuple[torch.Tensor, ...]:
    """One block's (shift, sumexp, entropy_rel, largest logit, its global column) through exp_rows_, the
    torch backend's row math, as a rank's pass fills them."""
    block = z[:, start : start + size].clone()
    n = z.shape[0]
    shift, sumexp = torch.empty(n, dtype=z.dtype), torch.empty(n, dtype=z.dtype)
    if size:
        rows.exp_rows_(block, shift, sumexp)
        entropy_rel = rows.e_log_e(block).sum(1)  # <e, z - shift>, since the block now holds e = exp(z - shift)
        best, column = z[:, start : start + size].max(1)
        column = (column + start).double()
    else:
        shift.zero_(), sumexp.zero_()
        entropy_rel = torch.zeros(n, dtype=z.dtype)
        best, column = torch.full((n,), -math.inf, dtype=z.dtype), torch.full((n,), math.inf, dtype=torch.float64)
    return shift, sumexp, entropy_rel, best, column


@pytest.mark.parametrize("sizes", [(7, 30), (1, 20, 16), (20, 0, 17), (37,)])
def test_merged_blocks_equal_whole_rows(sizes):
    gen = torch.Generator().manual_seed(sum(sizes) + len(sizes))
    c = sum(sizes)
    z = torch.randn(6, c, generator=gen, dtype=torch.float64) * 4
    z[0] = 2.0  # ties across every block: the first column wins
    z[1, : c // 2] = -math.inf  # whole blocks without mass
    z[2, c - 3 :] = -math.inf  # a padded vocabulary's end
    z[3, 0] = z[3, -1] = 50.0  # the maximum tied between the first and the last block
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    shift, sumexp, entropy_rel, best, column = (
        torch.stack(parts) for parts in zip(*(_block_stats(z, s, n) for s, n in zip(starts, sizes)))
    )
    lse = rows.merge_blocks(shift, sumexp)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-12, atol=1e-12)
    expected = reference.token_statistics(z, torch.zeros(6, dtype=torch.long), ("entropy", "argmax"))
    entropy = rows.merge_block_entropy(lse, shift, sumexp, entropy_rel)
    torch.testing.assert_close(entropy, expected["entropy"], rtol=1e-10, atol=1e-12)
    assert torch.equal(rows.merge_block_argmax(best, column), expected["argmax"])
    assert rows.merge_block_argmax(best, column)[0] == 0 and rows.merge_block_argmax(best, column)[3] == 0


def test_rows_without_any_class():
    """No block holds a class: lse -inf, entropy 0, argmax -1 (classless_stats' values)."""
    empty = torch.zeros(2, 3, dtype=torch.float64)
    lse = rows.merge_blocks(empty, empty)
    assert torch.equal(lse, torch.full((3,), -math.inf, dtype=torch.float64))
    assert torch.equal(rows.merge_block_entropy(lse, empty, empty, empty), torch.zeros(3, dtype=torch.float64))
    no_max = torch.full((2, 3), -math.inf, dtype=torch.float64)
    no_column = torch.full((2, 3), math.inf, dtype=torch.float64)
    assert torch.equal(rows.merge_block_argmax(no_max, no_column), torch.full((3,), -1))


def test_all_minus_inf_rows_sum_nothing():
    """exp_rows_ on a row of -inf logits: shift 0 and sum 0 (no NaN from exp(-inf - -inf)), as the Triton
    kernel; a row's lse is then -inf."""
    z = torch.tensor([[-math.inf, -math.inf], [0.0, -math.inf]], dtype=torch.float64)
    shift, sumexp = torch.empty(2, dtype=torch.float64), torch.empty(2, dtype=torch.float64)
    rows.exp_rows_(z, shift, sumexp)
    assert torch.equal(shift, torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert torch.equal(sumexp, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(z[0], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("offset", [0.0, -200.0])
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_gradient_with_the_global_entropy(backend_name, dtype, offset, monkeypatch):
    """The gradient of sum_i g_i logprob_i + c_i H_i, one block of classes at a time with the rows' global
    lse and entropy given (the vocab-parallel RL backward), equals the whole rows' gradient by autograd.
    offset -200: lse < -88, where exp(-lse) overflows fp32 (a block without mass must still give 0)."""
    if backend_name == "triton":
        pytest.importorskip("triton")
        if dtype == torch.float64:
            pytest.skip("the Triton kernel computes fp32/bf16/fp16 rows")
    monkeypatch.setenv("XENT_BACKEND", backend_name)
    from xent.kernels import blocks

    gen = torch.Generator().manual_seed(5)
    n, sizes = 7, (9, 0, 14)
    c = sum(sizes)
    z = (torch.randn(n, c, generator=gen, dtype=torch.float64) * 3 + offset).to(dtype)
    z[2, :9] = -math.inf  # a block without mass for one row
    target = torch.randint(0, c, (n,), generator=gen)
    target[4] = -100
    g, ce = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    full = z.double().clone().requires_grad_()
    logp = torch.log_softmax(full, 1)
    valid = target != -100
    objective = (torch.where(valid, logp.gather(1, target.clamp_min(0).unsqueeze(1)).squeeze(1), 0) * g).sum()
    entropy = -(logp.exp() * torch.where(logp.exp() > 0, logp, 0)).sum(1)
    objective = objective + (torch.where(valid, entropy, 0) * ce).sum()
    (expected,) = torch.autograd.grad(objective, full)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    per_row = torch.stack([torch.logsumexp(z.double(), 1), torch.zeros(n, dtype=torch.float64), entropy.detach()])
    opts = Options("none", -100)
    targets = rows.IndexTargets.from_options(target, None, opts, c, cd)
    start = 0
    for size in sizes:
        block = rows.ClassBlock.shard(target, valid, None, start, size)
        coefficients = blocks.token_gradient_coefficients(targets, per_row, block, g, ce, cd)
        grad = blocks.logits_gradient(z[:, start : start + size].contiguous(), block, coefficients, cd, False)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), expected[:, start : start + size], **tol)
        start += size
