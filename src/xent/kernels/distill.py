"""The linear distillation losses' pass: the student's logits (and a teacher head's) one chunk of tokens
at a time, never the whole (tokens x vocabulary) matrix.

For each chunk, a matmul fills a workspace with the student's logits (and another with the teacher's,
from its head or copied from its ready logits); the backend's distillation row math (Backend.distill_rows:
the torch backend's (kernels/distill_rows.py) on every backend, whose conventions are documented there)
turns them into each token's divergence and, in place in the workspaces, into the gradient of the loss
with respect to the student's logits; two matmuls fold that into the gradients of the hidden states and
of the head (the weight's accumulated in fp32) before the next chunk reuses the workspaces.

The chunks run through the same driver (kernels/driver.py: a DistillRowPass step) and the same chunk-row
and GEMM helpers (kernels/linear.py: row_ranges, Head, HeadGradients) as linear cross-entropy. The
workspaces are in fp32 (fp64 for fp64 inputs); half-precision heads run half-precision GEMMs (fp32
accumulation inside, as F.linear) whose results are copied into them, rounded to half as F.linear rounds
them unless the problem's logits_dtype keeps them in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch import Tensor

from ..problems import DistillProblem
from . import backend_for
from .backends import Work
from .driver import DistillChunk, DistillRowPass
from .linear import (
    Head,
    HeadGradients,
    chunk_rows,
    divide_into_,
    lean_budgets,
    row_ranges,
    slab_gradients,
    takes_lean_plan,
)


def workspaces(p: DistillProblem) -> int:
    """How many (chunk x V) buffers of the compute dtype one chunk needs: the student's logits and their
    log-softmax; with a dense teacher its logits (then a scratch), and the JSD's log m."""
    return 2 if p.teacher_kind == "topk" else 3 + (p.divergence == "jsd")


def rows_per_chunk(p: DistillProblem) -> int:
    """Tokens per chunk: `memory_budget` shared by the workspaces, or each workspace sized as linear
    cross-entropy sizes its one (1/16 of the full logits, within 16 MiB..256 MiB)."""
    budget = p.memory_budget // workspaces(p) if p.memory_budget is not None else None
    return chunk_rows(p.input.shape[0], p.linear_weight.shape[0], p.compute_dtype, budget)


def valid_rows(p: DistillProblem) -> Tensor:
    """(R,) bool: the tokens that count (target != ignore_index; all of them without a target)."""
    if p.target is None:
        return torch.ones(p.input.shape[0], dtype=torch.bool, device=p.input.device)
    return p.target.long() != p.ignore_index  # uint8 compares as int64: -100 must not wrap to 156


def reduction_scale(p: DistillProblem, valid: Tensor) -> Tensor:
    """d (reduced loss) / d (each token's loss), (R,), for a scalar reduction: 1 ('sum'), 1 / the number
    of counted tokens ('mean'), 1 / the number of tokens ('batchmean'). Stays on the device."""
    num_rows = p.input.shape[0]
    ones = torch.ones(num_rows, dtype=p.compute_dtype, device=p.input.device)
    if p.reduction == "mean":
        return ones / valid.sum()  # inf when no token counts; the pass zeroes ignored rows anyway
    if p.reduction == "batchmean":
        return ones / max(num_rows, 1)
    return ones


def reduce(p: DistillProblem, losses: Tensor, valid: Tensor) -> Tensor:
    """The per-token losses (0 on ignored tokens) reduced: 'mean' of nothing is NaN (torch's 0 / 0)."""
    if p.reduction == "none":
        return losses
    total = losses.sum()
    if p.reduction == "mean":
        return total / valid.sum()
    if p.reduction == "batchmean":
        return total / losses.shape[0]  # no tokens: 0 / 0 = NaN, as F.kl_div's
    return total


# The memory plans of a pass that computes the head's gradients (DistillProblem.memory_mode), as linear
# cross-entropy's (kernels/linear.py, MEMORY_MODES): "fast" folds every chunk of tokens into an fp32
# accumulator of the weight's gradient (V x H x 4 bytes for a half-precision head whose tokens take more
# than one chunk); "lean" runs that pass for the input's gradient and each row's (lse_s, lse_t, aux), then
# vocabulary slabs whose gradient (kernels/distill_rows.slab_gradient) one GEMM over all the tokens folds
# into the slab's rows of the weight's gradient; "auto" is "lean" where "fast" keeps the accumulator, on
# the CPU.


def lean_plan(p: DistillProblem, want: tuple[bool, bool, bool]) -> bool:
    """Whether a pass computing the gradients in `want` takes the lean plan (see above)."""
    return takes_lean_plan(p.memory_mode, want, p.input, p.linear_weight, lambda: rows_per_chunk(p))


def statistics_problem(p: DistillProblem) -> DistillProblem:
    """The problem a pass without gradients runs: under the lean plan's budget wherever a gradient pass
    over this head would take that plan (as kernels/linear.statistics_problem)."""
    if p.memory_budget is not None or not lean_plan(p, (False, True, False)):
        return p
    return replace(p, memory_budget=lean_budgets(p.input, p.linear_weight.shape[0], None)[0])


def gradient_pass(p: DistillProblem, valid: Tensor, scale: Tensor, want: tuple[bool, bool, bool]):
    """distill_pass with the gradients in `want`, in the plan lean_plan chooses: (losses, grad input, grad
    weight, grad bias), under the lean plan the weight's in its own dtype (fp32 accumulation inside)."""
    if not lean_plan(p, want):
        return distill_pass(p, valid, scale, want)
    # budgets of all of one chunk's workspaces together (kernels/linear.lean_budgets)
    row_budget, budget = lean_budgets(p.input, p.linear_weight.shape[0], p.memory_budget)
    lean = replace(p, memory_budget=budget)
    row_stats = torch.zeros((p.input.shape[0], 3), dtype=p.compute_dtype, device=p.input.device)
    losses, gi, _, _ = distill_pass(
        replace(p, memory_budget=row_budget), valid, scale, (want[0], False, False), row_stats=row_stats
    )
    w, b = p.linear_weight, p.linear_bias

    def slab_pass(v0: int, v1: int, want_slab: tuple[bool, bool, bool]):
        part = replace(lean, linear_weight=w[v0:v1], linear_bias=b[v0:v1] if b is not None else None)
        if p.teacher_kind == "head":
            bias = p.teacher_bias[v0:v1] if p.teacher_bias is not None else None
            part = replace(part, teacher_weight=p.teacher_weight[v0:v1], teacher_bias=bias)
        elif p.teacher_kind == "logits":
            part = replace(part, teacher_logits=p.teacher_logits[:, v0:v1])
        _, _, gw_s, gb_s = distill_pass(part, valid, scale, want_slab, row_stats=row_stats, class_start=v0)
        return gw_s, gb_s

    return (losses, gi, *slab_gradients(w, b, want, budget, p.compute_dtype, slab_pass))


def distill_pass(
    p: DistillProblem,
    valid: Tensor,
    scale: Tensor | None = None,
    want: tuple[bool, bool, bool] = (False, False, False),
    row_stats: Tensor | None = None,
    class_start: int | None = None,
):
    """One pass over the tokens, chunk by chunk: each token's loss (R,), in the compute dtype, 0 on ignored
    tokens, and, when `scale` (R,) is given, the gradients in `want` (input, linear_weight, linear_bias) of
    sum_i scale_i * loss_i. The input's gradient comes back in its dtype, the weight's and bias's in fp32
    (fp64 for fp64), except a weight gradient that one chunk covers: one GEMM in the head's dtype.

    The lean plan's two kinds of pass (gradient_pass): with `row_stats` (R, 3) a whole-row pass also fills
    them; with `class_start` too, `p`'s heads hold a slab of the classes from there, and the pass reads them
    and computes the gradients only (its losses are not computed)."""
    x, w, b = p.input, p.linear_weight, p.linear_bias
    num_rows, vocab = x.shape[0], w.shape[0]
    cd, dev = p.compute_dtype, x.device
    need_grad = scale is not None and any(want)
    want = want if need_grad else (False, False, False)

    losses = torch.zeros(num_rows, dtype=cd, device=dev)
    step = rows_per_chunk(p)
    grads = HeadGradients(x, w, want, cd, one_chunk=0 < num_rows <= step and vocab > 0)
    size = min(step, num_rows) * vocab
    if not size:  # without rows or classes no chunk runs: every divergence is 0 and so is every gradient
        return (losses, *grads.result())

    # Triton, e.g., does not do the distillation row math: the torch backend's runs, Triton or not installed
    backend = backend_for(dev, cd, p.backend, work=Work.DISTILL_ROWS)
    # d loss / d logits = coef * d divergence / d (logits / T): the 1/T of the chain rule is in the coefficient
    coefficients = torch.where(valid, scale.to(cd), 0) / p.temperature if need_grad else None
    dense_teacher = p.teacher_kind != "topk"
    buffers = [torch.empty(size, dtype=cd, device=dev) for _ in range(workspaces(p))]
    # the gradient GEMMs of a half-precision head read a half copy of the fp32 gradient (never an fp32 GEMM)
    half_buf = torch.empty(size, dtype=x.dtype, device=dev) if need_grad and x.dtype != cd else None
    fp32_logits = p.logits_dtype is not None
    student = Head(w, b, p.temperature, fp32_logits=fp32_logits)
    teacher = Head(
        p.teacher_weight, p.teacher_bias, p.temperature, finite=p.divergence != "reverse_kl", fp32_logits=fp32_logits
    )

    def load(work: tuple[Tensor, ...], x_rows: Tensor, counted: Tensor, r0: int, r1: int) -> None:
        """The chunk's student logits / T into work[0] and a dense teacher's into work[2]."""
        student.logits_into_(work[0], x_rows)
        if p.teacher_kind == "head":
            teacher.logits_into_(work[2], torch.where(counted, p.teacher_input[r0:r1], 0))
        elif p.teacher_kind == "logits":
            logits_copy_(work[2], p.teacher_logits[r0:r1], counted, p.temperature, p.divergence != "reverse_kl")

    def chunks():
        for r0, r1 in row_ranges(num_rows, step):
            n = r1 - r0
            work = tuple(buf[: n * vocab].view(n, vocab) for buf in buffers)
            counted = valid[r0:r1].unsqueeze(1)
            # Ignored tokens' hidden states never reach a GEMM (zeros instead): whatever they hold (padding
            # can hold NaN), their logits are the bias, their coefficient 0, and their gradient rows exactly 0.
            xc = torch.where(counted, x[r0:r1], 0)
            chunk = DistillChunk(r0, r1, work, functools.partial(load, work, xc, counted, r0, r1), counted)
            yield chunk
            if need_grad:  # chunk.gradient holds d loss / d logits for the chunk: fold it into the parameters'
                grad = chunk.gradient
                grad_logits = grad if half_buf is None else half_buf[: n * vocab].view(n, vocab).copy_(grad)
                grads.fold_(r0, r1, xc, grad_logits, grad)

    DistillRowPass(
        backend,
        p.divergence,
        p.beta,
        dense_teacher,
        losses,
        coefficients,
        teacher_indices=None if dense_teacher else p.teacher_indices,
        teacher_logprobs=None if dense_teacher else p.teacher_logprobs,
        row_stats=row_stats,
        class_start=class_start,
    ).run(chunks())
    return (losses, *grads.result())


def logits_copy_(out: Tensor, logits: Tensor, counted: Tensor, temperature: float, finite: bool) -> None:
    """A chunk of the teacher's ready logits, divided by T, into the workspace (never the caller's tensor:
    the math is in place): ignored tokens' rows zeroed (whatever they hold), and with `finite` -inf
    clamped to the most negative finite value (its probability stays exactly 0, see Head)."""
    divide_into_(out, logits, temperature)
    out.masked_fill_(~counted, 0)
    if finite:
        out.clamp_(min=torch.finfo(out.dtype).min)
