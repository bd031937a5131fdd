"""One rank's block of the classes through the chunk driver: the vocab-parallel losses' local passes.

A block pass runs this rank's logits (rows x its classes) through the row kernel, chunk by chunk, for the
block's statistics (before the exchange) or, given the rows' global coefficients (after it), for this
block's gradient. The linear path's block pass is kernels/linear.py's, over this rank's rows of the head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..problems import LinearProblem, divides
from . import backend_for, rows
from .driver import Chunk, RowPass
from .portable import CHUNK_ELEMENTS


def logits_gradient(
    x: Tensor,
    block: rows.ClassBlock,
    coefficients: rows.ChunkCoefficients,
    cd,
    smoothing: bool,
    backend: str | None = None,
    softcap: float | None = None,
    temperature: float | Tensor = 1.0,
    out: Tensor | None = None,
):
    """This rank's (rows, C_local) gradient, in x's dtype: one pass of the row kernel over the block with the
    rows' global coefficients (their statistics are recomputed as scratch; the entropy term's needs e log e).
    `out` (contiguous, x's shape and dtype) receives it: x itself for inplace=True."""
    num_rows, local_size = x.shape
    grad = out if out is not None else torch.empty((num_rows, local_size), dtype=x.dtype, device=x.device)
    entropy = coefficients.entropy is not None
    scratch = rows.RowStats.empty(num_rows, target=False, dense=False, dtype=cd, device=x.device, entropy=entropy)
    block_pass(
        x, scratch, block, cd, smoothing, grad, coefficients, backend=backend, softcap=softcap, temperature=temperature
    )
    return grad


def block_pass(
    x: Tensor,
    stats: rows.RowStats,
    block: rows.ClassBlock,
    cd: torch.dtype,
    smoothing: bool,
    grad: Tensor | None = None,
    coefficients: rows.ChunkCoefficients | None = None,
    backend: str | None = None,
    softcap: float | None = None,
    temperature: float | Tensor = 1.0,
) -> None:
    """Chunks of this rank's logits through the row kernel: statistics, and with `grad` the gradient, of
    the logits after `softcap` and divided by `temperature`."""
    num_rows, size = x.shape
    if not num_rows or not size:
        rows.classless_stats(stats)
        return
    backend = backend_for(x.device, cd, backend)
    step = max(1, CHUNK_ELEMENTS // size)
    direct = x.dtype == cd and x.stride(1) == 1 and softcap is None and not divides(temperature)  # read in place
    in_grad = grad is not None and grad.dtype == cd
    scratch = None if in_grad else torch.empty(min(step, num_rows) * size, dtype=cd, device=x.device)

    def chunks():
        for r0 in range(0, num_rows, step):
            r1 = min(num_rows, r0 + step)
            ws = grad[r0:r1] if in_grad else scratch[: (r1 - r0) * size].view(r1 - r0, size)
            yield Chunk(r0, r1, ws, lambda ws=ws, r0=r0, r1=r1: ws.copy_(x[r0:r1]), source=x[r0:r1] if direct else None)
            if grad is not None and not in_grad:
                grad[r0:r1].copy_(ws)

    chain_buf = None
    if softcap is not None and coefficients is not None and backend.softcap_chain_scratch:
        chain_buf = torch.empty(min(step, num_rows) * size, dtype=cd, device=x.device)
    RowPass.over_block(
        backend,
        stats,
        block,
        smoothing,
        softcap=softcap,
        temperature=temperature,
        coefficients=coefficients,
        chain_buf=chain_buf,
        # not over the logits themselves (inplace=True): a chunk redone with the shift would reread them
        unshifted=x.device.type == "cpu" and (grad is None or grad.data_ptr() != x.data_ptr()),
    ).run(chunks())


def linear_logit_at(p: LinearProblem, column: Tensor) -> Tensor:
    """Each row's logit at `column` of this rank's head (its largest, for the argmax across blocks): one
    dot product per row in the compute dtype, rounded to the input's dtype as F.linear rounds the logits
    the pass compared (so that ties in bf16 logits stay ties). A dot product can still round differently
    from the GEMM's blocked sum: blocks whose maxima differ by less than that may resolve either way
    (docs/limitations.md). Rows go in chunks, so that the gathered head rows stay within CHUNK_ELEMENTS."""
    if not p.linear_weight.shape[0]:
        return torch.full(column.shape, -math.inf, dtype=p.compute_dtype, device=column.device)
    cd, index = p.compute_dtype, column.clamp_min(0)
    out = torch.empty(column.shape, dtype=cd, device=column.device)
    step = max(1, CHUNK_ELEMENTS // max(1, p.input.shape[1]))
    for r0 in range(0, column.shape[0], step):
        rows_at = index[r0 : r0 + step]
        logit = torch.linalg.vecdot(p.input[r0 : r0 + step].to(cd), p.linear_weight.index_select(0, rows_at).to(cd))
        if p.linear_bias is not None:
            logit = logit + p.linear_bias.index_select(0, rows_at).to(cd)
        out[r0 : r0 + step] = logit.to(p.input.dtype)
    return out


def token_gradient_coefficients(targets: rows.IndexTargets, per_row, block, grad_logprobs, grad_entropy, cd):
    """The row kernel's coefficients for d(sum_i g_i logprob_i + c_i H_i)/dz: the cross-entropy's with
    scale -g (logprob = -loss), plus the entropy term with the rows' global lse and H. Ignored rows: 0,
    whatever their upstream gradients (inf or NaN included)."""
    entropy = None
    if grad_entropy is not None:
        entropy = torch.where(targets.valid, grad_entropy.reshape(-1).to(cd), 0)
    entropy_value = per_row[2].to(cd) if entropy is not None else None
    scale = targets.scale(grad_logprobs.neg())
    return targets.coefficients(scale, per_row[0], block, entropy, entropy_value)
