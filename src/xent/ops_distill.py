"""The linear distillation losses as torch.library custom ops, their autograd, and the eager fast path.

The same three routes as ops.py, chosen per call by ``problems.route``:

* **eager**: ``LinearDistillationFunction``, whose forward runs the chunk loop (kernels/distill.py) once
  for the loss and, for a scalar reduction, the gradients of the student's hidden states, weight and bias
  for a unit upstream gradient; backward scales them in place (``kernels.scale_by_upstream_``: nothing
  for the 1.0 of ``loss.backward()``). ``reduction='none'`` recomputes the chunks in backward with each
  token's upstream gradient. A second backward (``retain_graph=True``) recomputes; double backward
  differentiates the formula below.
* **traced** (torch.compile, torch.export, make_fx): ``xent::linear_distillation`` (loss and unit-upstream
  gradients) and ``xent::linear_distillation_backward`` ('none'), with fake implementations, wrapped in a
  ``setup_context`` autograd Function; scalar reductions scale the op's gradients with ops.py's
  ``xent::scale_grad_``.
* **torch.func** transforms: the formula, plain differentiable torch ops on the materialized logits.

The teacher is detached (validation does it): no route gives it a gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import distill as kernels
from .kernels import scale_by_upstream_
from .kernels.linear import no_autocast
from .ops import save_for_handover, saved_inputs, take_handover
from .problems import EAGER, FUNC, TRACED, route

# torch infers the custom ops' schemas from their annotations at run time; older torch releases (xent
# supports >= 2.4) know typing.Optional, not `Tensor | None`.
OptionalTensor = Optional[Tensor]  # noqa: UP045

# ----------------------------------------------------------------------------------------------------
# The kernels behind both the eager Function and the custom ops


def check_teacher_indices(p: kernels.DistillProblem) -> None:
    """IndexError naming the first top-k index outside [0, V) on a counted token (as torch.gather on CPU);
    on a GPU and while traced a device-side assert, as ops.check_target_range; skipped under torch.func."""
    if p.teacher_kind != "topk" or p.teacher_indices.numel() == 0 or route(p.teacher_indices) == FUNC:
        return
    vocab = p.linear_weight.shape[0]
    idx = p.teacher_indices
    counted = kernels.valid_rows(p).unsqueeze(1)
    bad = ((idx < 0) | (idx >= vocab)) & counted
    if idx.device.type != "cpu" or route(idx) == TRACED:
        torch._assert_async(~bad.any(), "xent: a teacher top-k index is out of bounds for the vocabulary")
        return
    if bool(bad.any()):
        first = int(idx[bad][0])
        raise IndexError(f"teacher top-k index {first} is out of bounds for a vocabulary of {vocab} entries")


def distill_forward(p: kernels.DistillProblem, want: tuple[bool, bool, bool]):
    """(loss, [grad_input, grad_weight, grad_bias]) with the gradients in `want` for a unit upstream
    gradient (scalar reductions only; None otherwise), in the parameters' dtypes."""
    check_teacher_indices(p)
    scalar = p.reduction != "none"
    with no_autocast(p.input.device):
        valid = kernels.valid_rows(p)
        scale = kernels.reduction_scale(p, valid) if scalar and any(want) else None
        losses, gi, gw, gb = kernels.distill_pass(p, valid, scale, want)
        loss = kernels.reduce(p, losses, valid)
    loss = (loss if scalar else loss.reshape(p.output_shape)).to(p.output_dtype)
    grads = [gi, _cast(gw, p.linear_weight), _cast(gb, p.linear_bias)] if scalar and any(want) else None
    return loss, grads


def distill_backward(p: kernels.DistillProblem, upstream: Tensor, want: tuple[bool, bool, bool]) -> list:
    """The gradients in `want` for the given upstream gradient (one per token for 'none'), recomputing."""
    with no_autocast(p.input.device):
        valid = kernels.valid_rows(p)
        if p.reduction == "none":
            scale = upstream.reshape(-1).to(p.compute_dtype)
        else:
            scale = kernels.reduction_scale(p, valid) * upstream.to(p.compute_dtype)
        _, gi, gw, gb = kernels.distill_pass(p, valid, scale, want)
    return [gi, _cast(gw, p.linear_weight), _cast(gb, p.linear_bias)]


def _cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype == like.dtype else t.to(like.dtype)


# ----------------------------------------------------------------------------------------------------
# Entry point (called by distill.py with a validated problem)


def linear_distillation(
    p: kernels.DistillProblem, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> Tensor:
    """`input` is the caller's (..., H) tensor; p.input its (R, H) view."""
    how = route(input, linear_weight, linear_bias, *p.teacher_tensors, p.target)
    if how == FUNC:
        return distill_formula(p, p.input, linear_weight, linear_bias)
    want = tuple(
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)
    )
    if how == EAGER:
        if not any(want):
            return distill_forward(p, want)[0]
        return LinearDistillationFunction.apply(input, linear_weight, linear_bias, p)
    loss, *_ = TracedLinearDistillation.apply(
        p.input, linear_weight, linear_bias, *p.teacher_tensors, p.target, *_scalar_args(p), *want
    )
    return loss.reshape(p.output_shape) if p.reduction == "none" else loss


def _scalar_args(p: kernels.DistillProblem) -> tuple:
    return (
        p.teacher_kind,
        p.divergence,
        p.beta,
        p.temperature,
        p.ignore_index,
        p.reduction,
        p.output_dtype,
        -1 if p.memory_budget is None else p.memory_budget,
    )


def problem_from_args(
    input,
    linear_weight,
    linear_bias,
    teacher_input,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    teacher_indices,
    teacher_logprobs,
    target,
    teacher_kind,
    divergence,
    beta,
    temperature,
    ignore_index,
    reduction,
    output_dtype,
    memory_budget,
) -> kernels.DistillProblem:
    """The problem of the custom ops' flat arguments (already validated by the caller that traced them)."""
    return kernels.DistillProblem(
        input,
        linear_weight,
        linear_bias,
        teacher_kind,
        teacher_input,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        teacher_indices,
        teacher_logprobs,
        target,
        divergence,
        beta,
        temperature,
        ignore_index,
        reduction,
        (input.shape[0],),
        output_dtype,
        None if memory_budget < 0 else memory_budget,
    )


# ----------------------------------------------------------------------------------------------------
# The formula (torch.func transforms and double backward): the logits materialized, fp32/fp64 math


def distill_formula(p: kernels.DistillProblem, input2d: Tensor, linear_weight: Tensor, linear_bias) -> Tensor:
    cd = p.compute_dtype
    valid = kernels.valid_rows(p)
    log_p_s = torch.log_softmax(F.linear(input2d, linear_weight, linear_bias).to(cd) / p.temperature, -1)
    if p.teacher_kind == "topk":
        indices = torch.where(valid.unsqueeze(1), p.teacher_indices, 0)
        log_q = p.teacher_logprobs.to(cd)
        q = torch.where(valid.unsqueeze(1), log_q.exp(), 0)
        rows = _xlog(q, log_q - log_p_s.gather(1, indices)).sum(1)
    else:
        if p.teacher_kind == "head":
            teacher = F.linear(p.teacher_input, p.teacher_weight, p.teacher_bias)
        else:
            teacher = p.teacher_logits
        log_p_t = torch.log_softmax(teacher.to(cd) / p.temperature, -1)
        if p.divergence == "kl":
            rows = _xlog(log_p_t.exp(), log_p_t - log_p_s).sum(1)
        elif p.divergence == "reverse_kl":
            rows = _xlog(log_p_s.exp(), log_p_s - log_p_t).sum(1)
        else:
            b = p.beta
            log_mix = torch.logaddexp(log_p_s + math.log1p(-b), log_p_t + math.log(b))
            rows = b * _xlog(log_p_t.exp(), log_p_t - log_mix).sum(1)
            rows = rows + (1 - b) * _xlog(log_p_s.exp(), log_p_s - log_mix).sum(1)
    losses = torch.where(valid, rows, 0)
    loss = kernels.reduce(p, losses, valid)
    loss = loss.reshape(p.output_shape) if p.reduction == "none" else loss
    return loss.to(p.output_dtype)


def _xlog(weight: Tensor, log_ratio: Tensor) -> Tensor:
    """weight * log_ratio, 0 where the weight is 0 (the limit of p log p)."""
    return torch.where(weight == 0, 0, weight * log_ratio)


# ----------------------------------------------------------------------------------------------------
# Eager


class LinearDistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, problem: kernels.DistillProblem):
        want = tuple(ctx.needs_input_grad[:3])
        loss, grads = distill_forward(problem, want)
        ctx.problem, ctx.want, ctx.input_shape = problem, want, input.shape
        save_for_handover(ctx, grads if grads is not None else [None, None, None], (input, linear_weight, linear_bias))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            return (*_double_backward(ctx, grad_loss), None)
        grads = take_handover(ctx)
        if all(g is None for g in grads):
            grads = distill_backward(ctx.problem, grad_loss, ctx.want)
        else:
            for g in grads:
                if g is not None:
                    scale_by_upstream_(g.data, grad_loss)
        gi, gw, gb = grads
        return gi.view(ctx.input_shape) if gi is not None else None, gw, gb, None


def _double_backward(ctx, grad_loss) -> tuple:
    """create_graph=True: differentiate the formula (materializes the logits, which double backward needs)."""
    p: kernels.DistillProblem = ctx.problem
    input, w_lin, b_lin = saved_inputs(ctx)
    loss = distill_formula(p, input.reshape(p.input.shape), w_lin, b_lin)
    wanted = ctx.needs_input_grad[:3]
    inputs = [t for t, w in zip((input, w_lin, b_lin), wanted) if w]
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
    return tuple(next(grads) if w else None for w in wanted)


# ----------------------------------------------------------------------------------------------------
# Traced: the custom ops, their fake implementations and autograd


@torch.library.custom_op("xent::linear_distillation", mutates_args=())
def _distill_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: OptionalTensor,
    teacher_input: OptionalTensor,
    teacher_weight: OptionalTensor,
    teacher_bias: OptionalTensor,
    teacher_logits: OptionalTensor,
    teacher_indices: OptionalTensor,
    teacher_logprobs: OptionalTensor,
    target: OptionalTensor,
    teacher_kind: str,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    output_dtype: torch.dtype,
    memory_budget: int,
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss over (R, H) rows and, for scalar reductions, the wanted gradients for a unit upstream gradient
    (empty tensors for the others)."""
    p = problem_from_args(
        input,
        linear_weight,
        linear_bias,
        teacher_input,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        teacher_indices,
        teacher_logprobs,
        target,
        teacher_kind,
        divergence,
        beta,
        temperature,
        ignore_index,
        reduction,
        output_dtype,
        memory_budget,
    )
    loss, grads = distill_forward(p, (want_input, want_weight, want_bias))
    return (loss, *(g if g is not None else input.new_empty(0) for g in grads or [None, None, None]))


@_distill_op.register_fake
def _(input, linear_weight, linear_bias, *rest):
    reduction, output_dtype = rest[12], rest[13]
    want = rest[15:18]
    scalar = reduction != "none"
    loss = input.new_empty(() if scalar else (input.shape[0],), dtype=output_dtype)

    def grad_like(t, wanted):
        return t.new_empty(t.shape) if scalar and wanted and t is not None else input.new_empty(0)

    return loss, *(grad_like(t, wanted) for t, wanted in zip((input, linear_weight, linear_bias), want))


@torch.library.custom_op("xent::linear_distillation_backward", mutates_args=())
def _distill_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: OptionalTensor,
    teacher_input: OptionalTensor,
    teacher_weight: OptionalTensor,
    teacher_bias: OptionalTensor,
    teacher_logits: OptionalTensor,
    teacher_indices: OptionalTensor,
    teacher_logprobs: OptionalTensor,
    target: OptionalTensor,
    upstream: Tensor,
    teacher_kind: str,
    divergence: str,
    beta: float,
    temperature: float,
    ignore_index: int,
    reduction: str,
    output_dtype: torch.dtype,
    memory_budget: int,
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The wanted gradients for the given upstream gradient (per token for 'none'), recomputing the
    chunks (empty tensors for the others)."""
    p = problem_from_args(
        input,
        linear_weight,
        linear_bias,
        teacher_input,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        teacher_indices,
        teacher_logprobs,
        target,
        teacher_kind,
        divergence,
        beta,
        temperature,
        ignore_index,
        reduction,
        output_dtype,
        memory_budget,
    )
    grads = distill_backward(p, upstream, (want_input, want_weight, want_bias))
    return tuple(g if g is not None else input.new_empty(0) for g in grads)


@_distill_backward_op.register_fake
def _(input, linear_weight, linear_bias, *rest):
    want = rest[16:19]

    def grad_like(t, wanted):
        return t.new_empty(t.shape) if wanted and t is not None else input.new_empty(0)

    return tuple(grad_like(t, wanted) for t, wanted in zip((input, linear_weight, linear_bias), want))


class TracedLinearDistillation(torch.autograd.Function):
    """Autograd for xent::linear_distillation while traced: scalar reductions save the op's unit-upstream
    gradients and scale them in place; 'none' saves the inputs and recomputes in backward."""

    @staticmethod
    def forward(*args):
        return torch.ops.xent.linear_distillation(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.args = inputs[10:18]  # teacher_kind .. memory_budget
        ctx.want = tuple(inputs[18:21])
        ctx.mark_non_differentiable(*output[1:])
        if ctx.args[5] == "none":
            ctx.save_for_backward(*inputs[:10])
        else:
            ctx.save_for_backward(*output[1:])

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_buffers):
        if ctx.args[5] == "none":
            gi, gw, gb = torch.ops.xent.linear_distillation_backward(
                *ctx.saved_tensors, grad_loss, *ctx.args, *ctx.want
            )
        else:
            gi, gw, gb = ctx.saved_tensors
            for g, wanted in zip((gi, gw, gb), ctx.want):
                if wanted:
                    torch.ops.xent.scale_grad_(g, grad_loss, ctx.args[5])
        grads = [g if wanted else None for g, wanted in zip((gi, gw, gb), ctx.want)]
        return (*grads, *([None] * 18))
