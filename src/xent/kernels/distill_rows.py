"""The distillation row math, the torch backend's (kernels/distill.py drives it chunk by chunk).

Plain torch ops on the chunk's workspaces, in fp32 (fp64 for fp64 inputs): in place where it can be,
through one or two scratch buffers of the chunk's size where it cannot, with no host synchronisation.
Conventions (s = student logits / T, t = teacher logits / T; p_s, p_t their softmaxes):

    kl          sum_v p_t (log p_t - log p_s)                          d/ds = p_s - p_t
    reverse_kl  sum_v p_s (log p_s - log p_t)                          d/ds = p_s (r - L), r = log p_s - log p_t
    jsd(beta)   beta KL(p_t || m) + (1 - beta) KL(p_s || m),           d/ds = p_s (g - <p_s, g>),
                m = beta p_t + (1 - beta) p_s, 0 < beta < 1             g = (1 - beta)(log p_s - log m)
    top-k kl    sum_k q_k (log q_k - log p_s[i_k]), q = exp(logprobs)  d/ds = (sum_k q_k) p_s - sum_k q_k e_{i_k}

A term whose weight is exactly 0 (p log p with p = 0, e.g. a -inf teacher logit) counts as 0, its limit; in
the reverse KL a weight is 0 only where the student's logit is -inf (a finite logit whose probability
underflows still has mass, so a teacher without mass there makes the divergence +inf).
Each *_rows function takes the chunk's log-softmaxes (overwritten), scratch buffers of their shape and,
for the gradient, `coef` (rows x 1: the reduction's scale times the upstream gradient over T, 0 on
ignored rows). Returns (the rows' divergences, coef * d divergence / d s in one of the buffers, or None).

The lean plan (kernels/distill.py) splits that in two: a whole-row pass also records each row's
(lse of s, lse of t, aux) in `row_stats` (aux: the reverse KL's divergence L, the JSD's shifted KL(p_s || m)
below, else 0), and then `slab_gradient` computes coef * d/ds on a slab of the classes from them alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def torch_distill_rows(
    divergence: str,
    beta: float,
    student: Tensor,
    teacher: Tensor | None,
    scratch: tuple[Tensor, ...],
    counted: Tensor,
    coef: Tensor | None,
    teacher_indices: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    row_stats: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One chunk of a distillation pass (backends.DistillStep's fields): `student` (and a dense `teacher`)
    hold logits / T; every (rows x V) buffer may be overwritten. Without a teacher: the top-k KL over
    `teacher_indices` with `teacher_logprobs`. `row_stats` (rows, 3), when given, receives the rows'
    (lse_s, lse_t, aux) for slab_gradient."""
    if row_stats is not None:
        row_stats.zero_()
        torch.logsumexp(student, 1, out=row_stats[:, 0])
        if teacher is not None:
            torch.logsumexp(teacher, 1, out=row_stats[:, 1])
    log_p_s = torch.log_softmax(student, 1, out=scratch[0])
    if teacher is None:
        return topk_kl_rows(log_p_s, teacher_indices, teacher_logprobs, counted, coef)
    log_p_t = torch.log_softmax(teacher, 1, out=student)  # the student's logits are no longer needed
    free = (teacher, *scratch[1:])  # nor the teacher's
    if divergence == "kl":
        return kl_rows(log_p_s, log_p_t, *free[:1], coef)
    if divergence == "reverse_kl":
        rows, grad = reverse_kl_rows(log_p_s, log_p_t, *free[:1], coef)
        if row_stats is not None:
            row_stats[:, 2] = rows
        return rows, grad
    aux = row_stats[:, 2] if row_stats is not None else None
    return jsd_rows(log_p_s, log_p_t, *free[:2], beta, coef, aux)


def slab_gradient(
    divergence: str,
    beta: float,
    student: Tensor,
    teacher: Tensor | None,
    scratch: tuple[Tensor, ...],
    coef: Tensor,
    row_stats: Tensor,
    class_start: int,
    counted: Tensor,
    teacher_indices: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
) -> Tensor:
    """coef * d divergence / d s on a slab of the classes (columns class_start.. of the vocabulary) from
    the rows' whole-vocabulary `row_stats` (torch_distill_rows'): the same expressions as the *_rows
    functions below, with log p = logits - lse. `student`, `teacher` and `scratch` hold (rows, slab)
    buffers, overwritten; the gradient comes back in one of them."""
    log_p_s = student.sub_(row_stats[:, 0:1])
    if teacher is None:  # top-k: (sum_k q_k) p_s minus the q_k of the slab's own classes
        local = teacher_indices - class_start
        inside = counted & (local >= 0) & (local < student.shape[1])
        q = torch.where(inside, teacher_logprobs.to(student.dtype).exp(), 0)
        total = torch.where(counted, teacher_logprobs.to(student.dtype).exp(), 0).sum(1, keepdim=True)
        grad = log_p_s.exp_().mul_(total * coef)
        return grad.scatter_add_(1, torch.where(inside, local, 0), q.mul_(-coef))
    log_p_t = teacher.sub_(row_stats[:, 1:2])
    if divergence == "kl":
        p_t = torch.exp(log_p_t, out=scratch[0])
        return log_p_s.exp_().sub_(p_t).mul_(coef)
    if divergence == "reverse_kl":
        p_s = torch.exp(log_p_s, out=scratch[0])
        student_none = log_p_s == -math.inf
        log_ratio = torch.sub(log_p_s, log_p_t, out=log_p_t)
        return log_ratio.sub_(row_stats[:, 2:3]).mul_(p_s).mul_(coef).masked_fill_(student_none, 0)
    offset = math.log1p(-beta)
    log_mix = torch.add(log_p_t, math.log(beta) - offset, out=scratch[1])
    torch.logaddexp(log_p_s, log_mix, out=log_mix)
    p_s = torch.exp(log_p_s, out=scratch[0])
    student_none = p_s == 0
    log_ratio = log_p_s.sub_(log_mix)
    grad = log_ratio.sub_(row_stats[:, 2:3]).mul_(p_s).mul_((1 - beta) * coef)
    return grad.masked_fill_(student_none, 0)


def kl_rows(log_p_s: Tensor, log_p_t: Tensor, scratch: Tensor, coef: Tensor | None):
    """KL(p_t || p_s) per row."""
    p_t = torch.exp(log_p_t, out=scratch)
    # 0 where p_t = 0, its limit (a -inf student logit there would make it 0 * inf)
    rows = log_p_t.sub_(log_p_s).mul_(p_t).masked_fill_(p_t == 0, 0).sum(1)
    if coef is None:
        return rows, None
    return rows, log_p_s.exp_().sub_(p_t).mul_(coef)


def reverse_kl_rows(log_p_s: Tensor, log_p_t: Tensor, scratch: Tensor, coef: Tensor | None):
    """KL(p_s || p_t) per row: infinite where the teacher has no mass (log p_t = -inf) and the student has
    some. Some means a finite student logit (log p_s > -inf), even where p_s underflows to 0 in fp32: the
    term p_s (log p_s - log p_t) is then +inf, not 0 * inf. Only a student logit of -inf adds nothing."""
    p_s = torch.exp(log_p_s, out=scratch)
    student_none = log_p_s == -math.inf  # those terms are 0, their limit (-inf logits on both sides: 0 * NaN)
    log_ratio = torch.sub(log_p_s, log_p_t, out=log_p_t)
    forbidden = torch.isposinf(log_ratio)  # the teacher has no mass where the student has some
    terms = torch.mul(log_ratio, p_s, out=log_p_s).masked_fill_(forbidden, math.inf)
    rows = terms.masked_fill_(student_none, 0).sum(1)
    if coef is None:
        return rows, None
    return rows, log_ratio.sub_(rows.unsqueeze(1)).mul_(p_s).mul_(coef).masked_fill_(student_none, 0)


def jsd_rows(
    log_p_s: Tensor,
    log_p_t: Tensor,
    scratch: Tensor,
    log_mix: Tensor,
    beta: float,
    coef: Tensor | None,
    aux: Tensor | None = None,
):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s, per row (0 < beta < 1).
    `aux` (rows,), when given, receives the shifted KL(p_s || m) the gradient subtracts (slab_gradient)."""
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
    if aux is not None:
        aux.copy_(student_kl_shifted)
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
