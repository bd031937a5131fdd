"""Portable cross-entropy: the row kernel (rows.py) driven over cache-sized chunks with plain torch ops.

Runs on any device torch runs on. For each chunk of rows the logits are read once (row max, then
exp(z - max) written straight into the gradient buffer), the loss comes from the log-sum-exp, and the
gradient is finished in place while the chunk is still in cache. Nothing of size (rows, classes) is
allocated except the gradient itself; without a gradient only one chunk-sized scratch buffer is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..problems import Problem, divides
from . import rows
from .backends import TORCH
from .driver import Chunk, RowPass

# Logits per chunk: 2^20 fp32 values (4 MiB) keep a chunk and its few row vectors inside the L2 caches
# of a typical CPU while making the per-chunk Python overhead negligible (benchmarks/RESULTS.md).
CHUNK_ELEMENTS = 1 << 20


def chunk_blocks(n: int, c: int, d: int, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """(n0, n1, d0, d1) blocks of the (N, C, D) layout, about `budget` logits each, in row order."""
    if d == 1 or c * d <= budget:
        step = max(1, budget // max(1, c * d))
        for n0 in range(0, n, step):
            yield n0, min(n, n0 + step), 0, d
    else:
        step = max(1, budget // max(1, c))
        for n0 in range(n):
            for d0 in range(0, d, step):
                yield n0, n0 + 1, d0, min(d, d0 + step)


def cross_entropy_forward(
    problem: Problem,
    need_grad: bool,
    upstream: Tensor | None = None,
    entropy_upstream: Tensor | None = None,
    grad_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """The loss as the caller asked for it, d(loss)/d(input) for a unit upstream gradient, or for
    `upstream` (the loss's gradient: a scalar, or one per row for reduction='none') when given, and the
    per-token statistics the problem asks for (rows.token_statistics; an empty dict when none).
    `entropy_upstream` (one value per row) adds the gradient of sum_i entropy_upstream_i * H_i, H_i the
    row's entropy (class-index targets).

    The gradient (input dtype, laid out (N, C, D) contiguous) is what backward scales in place. `grad_out`
    ((N, C, D) contiguous, the input's dtype) receives it instead of a new buffer; it may be the logits
    themselves (inplace=True): each chunk's logits are read before its gradient is written.
    """
    x = problem.logits
    n, c, d = x.shape
    num_rows = n * d
    opts = problem.options
    eps, cap = opts.label_smoothing, opts.softcap
    cd = problem.compute_dtype
    dev = x.device
    budget = CHUNK_ELEMENTS
    grad = None
    if need_grad:
        grad = grad_out if grad_out is not None else torch.empty((n, c, d), dtype=x.dtype, device=dev)
    weight = problem.weight.to(cd) if problem.weight is not None else None

    # The loss terms (rows.py): a * (lse - z_y) + b * <u, lse - z> + z_loss * lse^2 per row.
    if problem.probabilities:
        targets = None
        # torch divides by numel / C, which is 0 / 0 = nan when there are no classes
        denominator = torch.full((), float(num_rows) if c else float("nan"), dtype=cd, device=dev)  # no H2D copy
        scale = torch.full(
            (num_rows,), 1.0 / max(num_rows, 1) if opts.reduction == "mean" else 1.0, dtype=cd, device=dev
        )
        if upstream is not None:
            scale = scale * upstream.reshape(-1).to(cd)
        terms = rows.RowTerms(a=None, b=1.0, z_loss=opts.z_loss)
        dense_mass = torch.empty(num_rows, dtype=cd, device=dev)  # U = sum_c u_c, per row
    else:
        targets = rows.IndexTargets.from_options(problem.target, problem.weight, opts, c, cd)
        denominator, scale, terms, dense_mass = (
            targets.denominator,
            targets.scale(upstream),
            targets.terms,
            targets.dense_mass,
        )

    block_of_classes = targets.block() if targets is not None else None
    entropy = entropy_upstream.reshape(-1).to(cd) if entropy_upstream is not None else None
    stats = rows.RowStats.for_statistics(
        num_rows,
        problem.statistics,
        target=targets is not None,
        dense=bool(terms.b),
        dtype=cd,
        device=dev,
        entropy_gradient=entropy is not None,
    )
    coefficients = rows.ChunkCoefficients(terms, scale, dense_mass, entropy=entropy) if need_grad else None
    # exp(z) without the max shift saves two passes, but deciding per chunk needs a host sync: CPU only.
    # Not when the gradient goes into a given buffer (the logits themselves, inplace=True): a chunk redone
    # with the shift would reread logits that the first try overwrote.
    unshifted = dev.type == "cpu" and grad_out is None

    if num_rows and c:
        # the pass reads the caller's logits in place (the cap and the temperature work in the workspace)
        direct = d == 1 and x.dtype == cd and cap is None and not divides(problem.temperature)
        in_grad = d == 1 and grad is not None and grad.dtype == cd  # the workspace is the gradient itself
        chunk = max(1, min(budget, num_rows * c) // c) * c

        def scratch(wanted: bool) -> Tensor | None:
            return torch.empty(chunk, dtype=cd, device=dev) if wanted else None

        work_buf = scratch(not in_grad)
        probs_buf = scratch(problem.probabilities)

        def chunks():
            for n0, n1, d0, d1 in chunk_blocks(n, c, d, budget):
                r0, r1 = n0 * d + d0, (n1 - 1) * d + d1
                r = r1 - r0
                block = x[n0:n1, :, d0:d1]
                ws = grad[n0:n1, :, 0] if in_grad else work_buf[: r * c].view(r, c)
                dense = None
                if problem.probabilities:  # u = w * ((1 - eps) P + eps / C), row by row
                    dense = probs_buf[: r * c].view(r, c)
                    _copy_rows(dense, problem.target[n0:n1, :, d0:d1])
                    if eps > 0:
                        dense.mul_(1.0 - eps).add_(eps / c)
                    if weight is not None:
                        dense.mul_(weight)
                    torch.sum(dense, 1, out=dense_mass[r0:r1])
                yield Chunk(
                    r0,
                    r1,
                    ws,
                    lambda ws=ws, block=block: _copy_rows(ws, block),
                    source=block[:, :, 0] if direct else None,
                    dense=dense,
                )
                if grad is not None and not in_grad:
                    _copy_rows_back(grad[n0:n1, :, d0:d1], ws)

        RowPass(
            TORCH,
            stats,
            target_index=block_of_classes.index if targets is not None else None,
            dense=weight if terms.b else None,
            dense_is_ones=bool(terms.b) and weight is None,
            softcap=cap,
            temperature=problem.temperature,
            coefficients=coefficients,
            chain_buf=scratch(cap is not None and need_grad),
            unshifted=unshifted,
        ).run(chunks())

    # The loss of every row at once, from the per-row statistics of the pass (float64: see log_sum_exp).
    if c == 0:  # no classes: every row is ignored (index targets) or sums over nothing (probabilities)
        loss_rows = rows.classless_losses(num_rows, eps if targets is not None else 0.0, cd, dev)
        stats = rows.classless_stats(stats)
    elif targets is not None:
        loss_rows = targets.block_losses(stats)
    else:
        lse = stats.lse()
        loss_rows = terms.loss(lse, None, rows.dense_cross_entropy(lse, stats.shift, dense_mass, stats.dense_rel))

    token_stats = rows.token_statistics(stats, problem.statistics, targets, opts.z_loss, cd, c)
    return rows.finish_loss(problem, loss_rows, denominator), grad, token_stats


def _copy_rows(workspace: Tensor, block: Tensor) -> None:
    """workspace (r, C) <- a (n, C, d) block of the (N, C, D) layout, rows in (n, d) order, cast."""
    n, c, d = block.shape
    if d == 1:
        workspace.copy_(block[:, :, 0])
    else:
        workspace.view(n, d, c).copy_(block.permute(0, 2, 1))


def _copy_rows_back(block: Tensor, workspace: Tensor) -> None:
    n, c, d = block.shape
    block.copy_(workspace.view(n, d, c).permute(0, 2, 1))
