"""The linear distillation losses as torch.library custom ops, their autograd, and the eager fast path.

The same three routes as the other losses (ops/__init__.py), chosen per call by ``problems.route``:

* **eager**: ``LinearDistillationFunction``, whose forward runs the chunk loop (kernels/distill.py) once
  for the loss and, for a scalar reduction, the gradients of the student's hidden states, weight and bias
  for a unit upstream gradient; backward scales them in place (``kernels.scale_by_upstream_``: nothing
  for the 1.0 of ``loss.backward()``). ``reduction='none'`` recomputes the chunks in backward with each
  token's upstream gradient. A second backward (``retain_graph=True``) recomputes; double backward
  differentiates the formula below.
* **traced** (torch.compile, torch.export, make_fx): ``xent::linear_distillation`` (loss and unit-upstream
  gradients) and ``xent::linear_distillation_backward`` ('none'), declared once (ops/declare.py); scalar
  reductions scale the op's gradients with ``xent::scale_grad_``.
* **torch.func** transforms: the formula, plain differentiable torch ops on the materialized logits.

The teacher is detached (validation does it): no route gives it a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import distill as kernels
from ..kernels import scale_by_upstream_
from ..kernels.linear import formula_logits, no_autocast
from ..problems import EAGER, FUNC, TRACED, DistillProblem, route
from .declare import OpFamily, Upstream
from .handover import save_for_handover, saved_inputs, take_handover
from .linear import (
    PARAMETERS,
    cast_like,
    recomputes_in_backward,
    save_inputs_or_grads,
    scale_or_recompute,
    wanted_grads,
)

# ----------------------------------------------------------------------------------------------------
# The kernels behind both the eager Function and the custom ops


def check_teacher_indices(p: DistillProblem) -> None:
    """IndexError naming the first top-k index outside [0, V) on a counted token (as torch.gather on CPU);
    on a GPU and while traced a device-side assert, as checks.check_target_range; skipped under torch.func."""
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


def distill_forward(p: DistillProblem, want: tuple[bool, bool, bool]):
    """(loss, [grad_input, grad_weight, grad_bias]) with the gradients in `want` for a unit upstream
    gradient (scalar reductions only; None otherwise), in the parameters' dtypes."""
    check_teacher_indices(p)
    scalar = p.reduction != "none"
    with no_autocast(p.input.device):
        valid = kernels.valid_rows(p)
        scale = kernels.reduction_scale(p, valid) if scalar and any(want) else None
        losses, gi, gw, gb = (
            kernels.gradient_pass(p, valid, scale, want)
            if scale is not None
            else kernels.distill_pass(kernels.statistics_problem(p), valid)
        )
        loss = kernels.reduce(p, losses, valid)
    loss = (loss if scalar else loss.reshape(p.output_shape)).to(p.output_dtype)
    grads = [gi, cast_like(gw, p.linear_weight), cast_like(gb, p.linear_bias)] if scalar and any(want) else None
    return loss, grads


def distill_backward(p: DistillProblem, upstream: Tensor, want: tuple[bool, bool, bool]) -> list:
    """The gradients in `want` for the given upstream gradient (one per token for 'none'), recomputing."""
    with no_autocast(p.input.device):
        valid = kernels.valid_rows(p)
        if p.reduction == "none":
            scale = upstream.reshape(-1).to(p.compute_dtype)
        else:
            scale = kernels.reduction_scale(p, valid) * upstream.to(p.compute_dtype)
        _, gi, gw, gb = kernels.gradient_pass(p, valid, scale, want)
    return [gi, cast_like(gw, p.linear_weight), cast_like(gb, p.linear_bias)]


# ----------------------------------------------------------------------------------------------------
# Entry point (called by distill.py with a validated problem)


def linear_distillation(p: DistillProblem, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> Tensor:
    """`input` is the caller's (..., H) tensor; p.input its (R, H) view."""
    how = route(input, linear_weight, linear_bias, *p.teacher_tensors, p.target)
    if how == FUNC:
        return distill_formula(p, p.input, linear_weight, linear_bias)
    want = wanted_grads(input, linear_weight, linear_bias)
    if how == EAGER:
        if not any(want):
            return distill_forward(p, want)[0]
        return LinearDistillationFunction.apply(input, linear_weight, linear_bias, p)
    recompute = recomputes_in_backward(p.reduction, p.input.dtype)
    return LINEAR_DISTILLATION(DistillCall(p, (False,) * 3 if recompute else want, recompute))["loss"]


# ----------------------------------------------------------------------------------------------------
# The formula (torch.func transforms and double backward): the logits materialized, fp32/fp64 math


def distill_formula(p: DistillProblem, input2d: Tensor, linear_weight: Tensor, linear_bias) -> Tensor:
    cd = p.compute_dtype
    valid = kernels.valid_rows(p)
    student = formula_logits(input2d, linear_weight, linear_bias, p.logits_dtype)
    log_p_s = torch.log_softmax(student.to(cd) / p.temperature, -1)
    if p.teacher_kind == "topk":
        indices = torch.where(valid.unsqueeze(1), p.teacher_indices, 0)
        log_q = p.teacher_logprobs.to(cd)
        q = torch.where(valid.unsqueeze(1), log_q.exp(), 0)
        rows = _xlog(q, log_q - log_p_s.gather(1, indices)).sum(1)
    else:
        if p.teacher_kind == "head":
            teacher = formula_logits(p.teacher_input, p.teacher_weight, p.teacher_bias, p.logits_dtype)
        else:
            teacher = p.teacher_logits
        log_p_t = torch.log_softmax(teacher.to(cd) / p.temperature, -1)
        if p.divergence == "kl":
            rows = _xlog(log_p_t.exp(), log_p_t - log_p_s).sum(1)
        elif p.divergence == "reverse_kl":  # a finite student logit has mass, even if exp() underflows
            log_ratio = log_p_s - log_p_t
            terms = torch.where(torch.isposinf(log_ratio), math.inf, log_p_s.exp() * log_ratio)
            rows = torch.where(log_p_s == -math.inf, 0, terms).sum(1)
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
    def forward(ctx, input, linear_weight, linear_bias, problem: DistillProblem):
        want = tuple(ctx.needs_input_grad[:3])
        recompute = recomputes_in_backward(problem.reduction, problem.input.dtype)
        loss, grads = distill_forward(problem, (False, False, False) if recompute else want)
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
                    scale_by_upstream_(g.data, grad_loss, choice=ctx.problem.backend)
        gi, gw, gb = grads
        return gi.view(ctx.input_shape) if gi is not None else None, gw, gb, None


def _double_backward(ctx, grad_loss) -> tuple:
    """create_graph=True: differentiate the formula (materializes the logits, which double backward needs)."""
    p: DistillProblem = ctx.problem
    input, w_lin, b_lin = saved_inputs(ctx)
    loss = distill_formula(p, input.reshape(p.input.shape), w_lin, b_lin)
    wanted = ctx.needs_input_grad[:3]
    inputs = [t for t, w in zip((input, w_lin, b_lin), wanted) if w]
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
    return tuple(next(grads) if w else None for w in wanted)


# ----------------------------------------------------------------------------------------------------
# Traced: xent::linear_distillation, declared from the DistillProblem's fields; backward as linear
# cross-entropy's (scalar reductions scale forward's unit-upstream gradients, 'none' recomputes)


@dataclass(frozen=True)
class DistillCall:
    problem: DistillProblem
    forward_grads: tuple[bool, ...]  # input, linear_weight, linear_bias: the unit-upstream gradients forward returns
    recompute: bool = False  # backward recomputes the chunks with the upstream (ops.linear.recomputes_in_backward)


def _forward(call: DistillCall) -> tuple:
    """Loss over (R, H) rows and, for scalar reductions, the wanted gradients for a unit upstream gradient
    (empty tensors for the others)."""
    p = call.problem
    loss, grads = distill_forward(p, call.forward_grads)
    return (loss, *(g if g is not None else p.input.new_empty(0) for g in grads or [None, None, None]))


def _forward_fake(call: DistillCall) -> tuple:
    p = call.problem
    scalar = p.reduction != "none"
    loss = p.input.new_empty(() if scalar else p.output_shape, dtype=p.output_dtype)
    params = (p.input, p.linear_weight, p.linear_bias)
    return loss, *(
        t.new_empty(t.shape) if scalar and wanted and t is not None else p.input.new_empty(0)
        for t, wanted in zip(params, call.forward_grads)
    )


def _backward(call: DistillCall, extra: Upstream, want: dict) -> dict:
    """The wanted gradients for the upstream gradient (per token for 'none'), recomputing the chunks."""
    return dict(zip(PARAMETERS, distill_backward(call.problem, extra.upstream, tuple(want[n] for n in PARAMETERS))))


LINEAR_DISTILLATION = OpFamily(
    "linear_distillation",
    DistillCall,
    ("loss", "grad_input", "grad_linear_weight", "grad_linear_bias"),
    _forward,
    _forward_fake,
    differentiable=PARAMETERS,
    backward_args=Upstream,
    backward_impl=_backward,
    save=lambda call, out: save_inputs_or_grads(call, out, call.recompute),
    backward=lambda ctx: scale_or_recompute(
        ctx, ctx.args.recompute, ctx.args.problem.reduction, ctx.args.problem.backend
    ),
)
