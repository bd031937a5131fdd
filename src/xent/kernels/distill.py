"""The linear distillation losses' chunk loop: the student's logits (and a teacher head's) one chunk of
tokens at a time, never the whole (tokens x vocabulary) matrix.

For each chunk, a matmul fills a workspace with the student's logits (and another with the teacher's,
from its head or copied from its ready logits); the row math below turns them into each token's
divergence and, in place in the workspaces, into the gradient of the loss with respect to the student's
logits; two matmuls fold that into the gradients of the hidden states and of the head (the weight's
accumulated in fp32) before the next chunk reuses the workspaces.

The row math is plain torch ops on the workspaces, in fp32 (fp64 for fp64 inputs), the same on every
backend: in place where it can be, through one or two scratch buffers of the chunk's size where it cannot,
with no host synchronisation. Half-precision heads run half-precision GEMMs (fp32 accumulation inside,
as F.linear) whose results are copied into the fp32 workspaces.

Conventions of the row math (s = student logits / T, t = teacher logits / T; p_s, p_t their softmaxes):

    kl          sum_v p_t (log p_t - log p_s)                          d/ds = p_s - p_t
    reverse_kl  sum_v p_s (log p_s - log p_t)                          d/ds = p_s (r - L), r = log p_s - log p_t
    jsd(beta)   beta KL(p_t || m) + (1 - beta) KL(p_s || m),           d/ds = p_s (g - <p_s, g>),
                m = beta p_t + (1 - beta) p_s, 0 < beta < 1             g = (1 - beta)(log p_s - log m)
    top-k kl    sum_k q_k (log q_k - log p_s[i_k]), q = exp(logprobs)  d/ds = (sum_k q_k) p_s - sum_k q_k e_{i_k}

A term whose weight is exactly 0 (p log p with p = 0, e.g. a -inf teacher logit) counts as 0, its limit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problems import DistillProblem
from .linear import accumulate_mm_, chunk_rows


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


def distill_pass(
    p: DistillProblem,
    valid: Tensor,
    scale: Tensor | None = None,
    want: tuple[bool, bool, bool] = (False, False, False),
):
    """One pass over the tokens, chunk by chunk: each token's loss (R,), in the compute dtype, 0 on ignored
    tokens, and, when `scale` (R,) is given, the gradients in `want` (input, linear_weight, linear_bias) of
    sum_i scale_i * loss_i. The input's gradient comes back in its dtype, the weight's and bias's in fp32
    (fp64 for fp64), except a weight gradient that one chunk covers: one GEMM in the head's dtype."""
    x, w, b = p.input, p.linear_weight, p.linear_bias
    num_rows, vocab = x.shape[0], w.shape[0]
    cd, dev = p.compute_dtype, x.device
    need_grad = scale is not None and any(want)
    want_input, want_weight, want_bias = want if need_grad else (False, False, False)

    losses = torch.zeros(num_rows, dtype=cd, device=dev)
    # without classes no chunk runs: every divergence is 0 and so is every gradient
    grad_input = (torch.empty if vocab else torch.zeros)(x.shape, dtype=x.dtype, device=dev) if want_input else None
    step = rows_per_chunk(p)
    one_chunk = 0 < num_rows <= step and vocab > 0
    grad_weight = None
    if want_weight:  # one chunk: one GEMM straight into the returned gradient, no accumulator
        grad_weight = (torch.empty if one_chunk else torch.zeros)(
            w.shape, dtype=x.dtype if one_chunk else cd, device=dev
        )
    grad_bias = torch.zeros(vocab, dtype=cd, device=dev) if want_bias else None
    # d loss / d logits = coef * d divergence / d (logits / T): the 1/T of the chain rule is in the coefficient
    coefficients = torch.where(valid, scale.to(cd), 0) / p.temperature if need_grad else None

    size = min(step, num_rows) * vocab
    if not size:
        return losses, grad_input, grad_weight, grad_bias
    buffers = [torch.empty(size, dtype=cd, device=dev) for _ in range(workspaces(p))]
    # the gradient GEMMs of a half-precision head read a half copy of the fp32 gradient (never an fp32 GEMM)
    half_buf = torch.empty(size, dtype=x.dtype, device=dev) if need_grad and x.dtype != cd else None
    student = Head(w, b, p.temperature)
    teacher = Head(p.teacher_weight, p.teacher_bias, p.temperature, finite=p.divergence != "reverse_kl")

    for r0 in range(0, num_rows, step):
        r1 = min(num_rows, r0 + step)
        n = r1 - r0
        work = [buf[: n * vocab].view(n, vocab) for buf in buffers]
        counted = valid[r0:r1].unsqueeze(1)
        # Ignored tokens' hidden states never reach a GEMM (zeros instead): whatever they hold (padding can
        # hold NaN), their logits are the bias, their coefficient 0, and their gradient rows exactly 0.
        xc = torch.where(counted, x[r0:r1], 0)
        student.logits_into_(work[0], xc)
        log_p_s = torch.log_softmax(work[0], 1, out=work[1])
        free = [work[0], *work[2:]]
        coef = coefficients[r0:r1].unsqueeze(1) if need_grad else None
        if p.teacher_kind == "topk":
            rows, grad = topk_kl_rows(log_p_s, p.teacher_indices[r0:r1], p.teacher_logprobs[r0:r1], counted, coef)
        else:
            if p.teacher_kind == "head":
                teacher.logits_into_(free[1], torch.where(counted, p.teacher_input[r0:r1], 0))
            else:
                logits_copy_(free[1], p.teacher_logits[r0:r1], counted, p.temperature, p.divergence != "reverse_kl")
            log_p_t = torch.log_softmax(free[1], 1, out=free[0])
            scratch = free[1:]
            if p.divergence == "kl":
                rows, grad = kl_rows(log_p_s, log_p_t, *scratch, coef)
            elif p.divergence == "reverse_kl":
                rows, grad = reverse_kl_rows(log_p_s, log_p_t, *scratch, coef)
            else:
                rows, grad = jsd_rows(log_p_s, log_p_t, *scratch, p.beta, coef)
        losses[r0:r1] = rows.masked_fill_(~counted.squeeze(1), 0)
        if not need_grad:
            continue

        # `grad` holds d loss / d logits for the chunk: fold it into the parameters' gradients
        grad_logits = grad if half_buf is None else half_buf[: n * vocab].view(n, vocab).copy_(grad)
        if want_input:
            torch.mm(grad_logits, w, out=grad_input[r0:r1])
        if want_weight and one_chunk:
            torch.mm(grad_logits.T, xc, out=grad_weight)
        elif want_weight:
            accumulate_mm_(grad_weight, grad_logits.T, xc)
        if want_bias:
            grad_bias.add_(grad.sum(0))
    return losses, grad_input, grad_weight, grad_bias


class Head:
    """A linear head whose chunk logits come out divided by the temperature, as F.linear computes them.

    fp32/fp64 heads divide the chunk's hidden states and the bias instead of the logits ((h W^T + b) / T =
    (h / T) W^T + b / T: O(rows x H) work, not O(rows x V)); half-precision heads run their GEMM in their
    dtype and divide while copying into the fp32 workspace. With `finite`, a -inf bias entry (a masked-out
    token) is clamped to the dtype's most negative finite value divided by T: its probability stays
    exactly 0, and its log-probability finite, so 0 * log 0 terms vanish without a mask."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, temperature: float, finite: bool = False):
        self.weight, self.temperature = weight, temperature
        if bias is not None and finite:
            bias = bias.clamp(min=torch.finfo(bias.dtype).min * min(1.0, temperature))
        self.raw_bias = bias  # for a GEMM in another dtype than the workspace's, which divides its output
        if bias is not None and temperature != 1.0 and bias.dtype in (torch.float32, torch.float64):
            bias = bias / temperature
        self.bias = bias

    def logits_into_(self, out: Tensor, x: Tensor) -> None:
        t, w, b = self.temperature, self.weight, self.bias
        if x.dtype != out.dtype:  # another dtype (half precision): the GEMM in it, the division on the copy
            divide_into_(out, F.linear(x, w, self.raw_bias), t)
            return
        x = x / t if t != 1.0 else x
        if b is None:
            torch.mm(x, w.T, out=out)
        else:
            torch.addmm(b, x, w.T, out=out)


def logits_copy_(out: Tensor, logits: Tensor, counted: Tensor, temperature: float, finite: bool) -> None:
    """A chunk of the teacher's ready logits, divided by T, into the workspace (never the caller's tensor:
    the math is in place): ignored tokens' rows zeroed (whatever they hold), and with `finite` -inf
    clamped to the most negative finite value (its probability stays exactly 0, see Head)."""
    divide_into_(out, logits, temperature)
    out.masked_fill_(~counted, 0)
    if finite:
        out.clamp_(min=torch.finfo(out.dtype).min)


def divide_into_(out: Tensor, logits: Tensor, temperature: float) -> None:
    """out = logits / temperature, computed in out's dtype (a half-precision division would round again)."""
    if temperature == 1.0:
        out.copy_(logits)
    elif logits.dtype == out.dtype:
        torch.div(logits, temperature, out=out)
    else:
        out.copy_(logits).div_(temperature)


# ----------------------------------------------------------------------------------------------------
# The row math. Each takes the chunk's log-softmaxes (overwritten), scratch buffers of their shape and,
# for the gradient, `coef` (rows x 1: the reduction's scale times the upstream gradient over T, 0 on
# ignored rows). Returns (the rows' divergences, coef * d divergence / d s in one of the buffers, or None).


def kl_rows(log_p_s: Tensor, log_p_t: Tensor, scratch: Tensor, coef: Tensor | None):
    """KL(p_t || p_s) per row."""
    p_t = torch.exp(log_p_t, out=scratch)
    # 0 where p_t = 0, its limit (a -inf student logit there would make it 0 * inf)
    rows = log_p_t.sub_(log_p_s).mul_(p_t).masked_fill_(p_t == 0, 0).sum(1)
    if coef is None:
        return rows, None
    return rows, log_p_s.exp_().sub_(p_t).mul_(coef)


def reverse_kl_rows(log_p_s: Tensor, log_p_t: Tensor, scratch: Tensor, coef: Tensor | None):
    """KL(p_s || p_t) per row (infinite where the teacher has no mass and the student has some)."""
    p_s = torch.exp(log_p_s, out=scratch)
    student_none = p_s == 0  # those terms are 0, their limit (-inf logits on both sides: 0 * NaN)
    log_ratio = torch.sub(log_p_s, log_p_t, out=log_p_t)
    rows = torch.mul(log_ratio, p_s, out=log_p_s).masked_fill_(student_none, 0).sum(1)
    if coef is None:
        return rows, None
    return rows, log_ratio.sub_(rows.unsqueeze(1)).mul_(p_s).mul_(coef).masked_fill_(student_none, 0)


def jsd_rows(log_p_s: Tensor, log_p_t: Tensor, scratch: Tensor, log_mix: Tensor, beta: float, coef: Tensor | None):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, per row (0 < beta < 1)."""
    # log_mix = log m - log(1 - beta) = logaddexp(log p_s, log p_t + log(beta / (1 - beta))): the constant
    # log(1 - beta) is added to the sums instead (sum p log m = sum p log_mix + log(1 - beta), sum p = 1)
    # and cancels from the gradient. Finite wherever log p_s is, so no 0 * inf.
    offset = math.log1p(-beta)
    torch.add(log_p_t, math.log(beta) - offset, out=log_mix)
    torch.logaddexp(log_p_s, log_mix, out=log_mix)

    # terms of weight 0 are 0, their limit (-inf logits on both sides make log p - log m NaN there)
    p_t = torch.exp(log_p_t, out=scratch)
    teacher_kl = log_p_t.sub_(log_mix).mul_(p_t).masked_fill_(p_t == 0, 0).sum(1) - offset
    p_s = torch.exp(log_p_s, out=scratch)
    student_none = p_s == 0
    log_ratio = log_p_s.sub_(log_mix)  # log p_s - log m + log(1 - beta)
    student_kl_shifted = torch.mul(log_ratio, p_s, out=log_p_t).masked_fill_(student_none, 0).sum(1)
    rows = beta * teacher_kl + (1 - beta) * (student_kl_shifted - offset)
    if coef is None:
        return rows, None
    # d/ds = (1 - beta) p_s (log p_s - log m - KL(p_s || m)): the shifts cancel
    grad = log_ratio.sub_(student_kl_shifted.unsqueeze(1)).mul_(p_s).mul_((1 - beta) * coef)
    return rows, grad.masked_fill_(student_none, 0)


def topk_kl_rows(log_p_s: Tensor, indices: Tensor, logprobs: Tensor, counted: Tensor, coef: Tensor | None):
    """sum_k q_k (log q_k - log p_s[i_k]) per row over the teacher's given support, q = exp(logprobs) as
    given (not renormalised). Ignored rows' indices and log-probabilities are not read."""
    indices = torch.where(counted, indices, 0)
    logprobs = logprobs.to(log_p_s.dtype)
    q = torch.where(counted, logprobs.exp(), 0)
    terms = q * (logprobs - log_p_s.gather(1, indices))
    rows = terms.masked_fill_(q == 0, 0).sum(1)  # -inf log-probabilities (padding) add nothing
    if coef is None:
        return rows, None
    grad = log_p_s.exp_().mul_(q.sum(1, keepdim=True) * coef)
    return rows, grad.scatter_add_(1, indices, q.mul_(-coef))
