"""Linear cross-entropy through the three routes (see ops/__init__.py): the eager Function that hands the
forward's gradients to backward, the declared custom op for traced calls, and the formulas for torch.func.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..checks import check_target_range
from ..kernels import linear as linear_kernels
from ..kernels import rows, scale_by_upstream_
from ..problems import EAGER, FUNC, LinearProblem, handover_keeps_range, make_problem, route
from .cross_entropy import SCALE_GRAD, ScaleGrad, cross_entropy, cross_entropy_formula, formula_statistics
from .declare import BackwardContext, OpFamily, Upstream, as_flat_dict
from .handover import save_for_handover, saved_inputs, take_handover
from .statistics import op_statistics, pack_statistics, packed_statistics_like, unpack_statistics

PARAMETERS = ("input", "linear_weight", "linear_bias")  # the tensors a linear loss differentiates


def linear_forward(p: LinearProblem, want: tuple[bool, bool, bool]):
    """(loss, [grad_input, grad_weight, grad_bias] with the gradients in `want` for a unit upstream
    gradient (scalar reductions only; None elsewhere) in the parameters' dtypes, the per-token
    statistics p.statistics asks for, by name)."""
    check_target_range(p.target, p.linear_weight.shape[0], p.options.ignore_index)
    targets = linear_kernels.index_targets(p)
    scalar = p.options.reduction != "none"
    with linear_kernels.no_autocast(p.input.device):
        if scalar and any(want):  # the gradients too, in the memory plan p.memory_mode chooses
            stats, gi, gw, gb = linear_kernels.gradient_pass(p, targets.block(), targets, targets.scale(), want)
        else:
            stats, gi, gw, gb = linear_kernels.linear_pass(
                linear_kernels.statistics_problem(p), targets.block(), targets
            )
    loss = targets.reduce(linear_kernels.loss_rows(p, targets, stats))
    loss = (loss.reshape(p.output_shape) if not scalar else loss).to(p.output_dtype)
    grads = [gi, cast_like(gw, p.linear_weight), cast_like(gb, p.linear_bias)] if scalar and any(want) else None
    vocab = p.linear_weight.shape[0]
    token_stats = rows.token_statistics(stats, p.statistics, targets, p.options.z_loss, p.compute_dtype, vocab)
    return loss, grads, token_stats


def linear_backward(p: LinearProblem, upstream: Tensor, want: tuple[bool, bool, bool]) -> list:
    """The gradients in `want` for the given upstream gradient, recomputing the chunks."""
    p = replace(p, statistics=())
    targets = linear_kernels.index_targets(p)
    upstream = upstream if p.options.reduction == "none" else upstream.expand(p.target.shape)
    with linear_kernels.no_autocast(p.input.device):
        _, gi, gw, gb = linear_kernels.gradient_pass(p, targets.block(), targets, targets.scale(upstream), want)
    return [gi, cast_like(gw, p.linear_weight), cast_like(gb, p.linear_bias)]


def recomputes_in_backward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether backward recomputes the chunks with the upstream gradient folded in instead of scaling
    gradients forward computed for a unit one: for reduction='none' (one upstream per token) and for fp16
    parameters (problems.handover_keeps_range)."""
    return reduction == "none" or not handover_keeps_range(dtype)


def cast_like(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype == like.dtype else t.to(like.dtype)


def wanted_grads(*params: Tensor | None) -> tuple[bool, ...]:
    """Which of the parameters autograd will want a gradient for."""
    return tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in params)


def linear_cross_entropy(
    p: LinearProblem,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, the per-token statistics p.statistics asks for, by name, flat over the rows). `input` is
    the caller's (..., H) tensor; p.input its (R, H) view."""
    how = route(input, linear_weight, linear_bias, target, weight)
    if how == FUNC:
        return linear_formula(p, p.input, linear_weight, linear_bias, p.target, weight)
    want = wanted_grads(input, linear_weight, linear_bias)
    if how == EAGER:
        if not any(want):
            loss, _, stats = linear_forward(p, want)
            return loss, stats
        if not p.statistics:
            return LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, p), {}
        loss, *values = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, p)
        return loss, dict(zip(p.statistics, values))
    recompute = recomputes_in_backward(p.options.reduction, p.input.dtype)
    call = LinearCall(
        replace(p, statistics=op_statistics(p.statistics)), (False,) * 3 if recompute else want, recompute
    )
    out = LINEAR_CROSS_ENTROPY(call)
    stats = unpack_statistics(out["packed"], out["argmax"], p.statistics, p.target, p.options.ignore_index)
    return out["loss"], stats


def linear_formula(
    p: LinearProblem,
    input2d: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    logits = linear_kernels.formula_logits(input2d, linear_weight, linear_bias, p.logits_dtype)
    problem = make_problem(logits, target, weight, p.options, p.output_dtype, p.statistics)
    loss = cross_entropy_formula(problem, logits, target, weight)
    loss = loss.reshape(p.output_shape) if p.options.reduction == "none" else loss
    return loss, formula_statistics(problem, logits, target)


# ----------------------------------------------------------------------------------------------------
# Eager: the forward's gradients handed to backward


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, problem: LinearProblem):
        want = tuple(ctx.needs_input_grad[:3])
        recompute = recomputes_in_backward(problem.options.reduction, problem.input.dtype)
        loss, grads, stats = linear_forward(problem, (False, False, False) if recompute else want)
        ctx.problem, ctx.want, ctx.input_shape = problem, want, input.shape
        save_for_handover(
            ctx, grads if grads is not None else [None, None, None], (input, linear_weight, linear_bias, target, weight)
        )
        if not stats:
            return loss
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        problem: LinearProblem = ctx.problem
        if torch.is_grad_enabled():
            return (*_linear_double_backward(ctx, grad_loss), None, None, None)
        grads = take_handover(ctx)
        if all(g is None for g in grads):
            grads = linear_backward(problem, grad_loss, ctx.want)
        else:
            for g in grads:
                if g is not None:
                    scale_by_upstream_(g.data, grad_loss, choice=problem.options.backend)
        gi, gw, gb = grads
        return gi.view(ctx.input_shape) if gi is not None else None, gw, gb, None, None, None


def _linear_double_backward(ctx, grad_loss) -> tuple:
    """create_graph=True: differentiate cross_entropy(linear(...)) with autograd. This materializes the
    logits, which double backward needs anyway; the cross-entropy part is xent's own (differentiable
    through the formulas)."""
    p: LinearProblem = ctx.problem
    input, w_lin, b_lin, target, weight = saved_inputs(ctx)
    logits = linear_kernels.formula_logits(input, w_lin, b_lin, p.logits_dtype).reshape(-1, w_lin.shape[0])
    problem = make_problem(logits, target.reshape(-1), weight, p.options, p.output_dtype)
    loss, _ = cross_entropy(problem, logits, problem.target.reshape(-1), weight)
    loss = loss.reshape(p.output_shape) if p.options.reduction == "none" else loss
    inputs = [t for t, w in zip((input, w_lin, b_lin), ctx.needs_input_grad[:3]) if w]
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
    return tuple(next(grads) if w else None for w in ctx.needs_input_grad[:3])


# ----------------------------------------------------------------------------------------------------
# Traced: xent::linear_cross_entropy, declared from the LinearProblem's fields
#
# Scalar reductions return their unit-upstream gradients from forward, and backward scales them in place
# with xent::scale_grad_ (recomputing would cost a matmul); 'none' saves the inputs and backward recomputes
# the chunks with each row's upstream gradient (xent::linear_cross_entropy_backward).


@dataclass(frozen=True)
class LinearCall:
    problem: LinearProblem
    forward_grads: tuple[bool, ...]  # input, linear_weight, linear_bias: the unit-upstream gradients forward returns
    recompute: bool = False  # backward recomputes with the upstream (recomputes_in_backward): forward returns none


def _forward(call: LinearCall) -> tuple:
    """Loss and, for scalar reductions, the wanted gradients for a unit upstream gradient (empty tensors
    for the others), then the per-token statistics, packed."""
    p = call.problem
    loss, grads, stats = linear_forward(p, call.forward_grads)
    grads = grads or [None, None, None]
    packed = pack_statistics(stats, p.input.shape[0], p.input, p.compute_dtype)
    return (loss, *(g if g is not None else p.input.new_empty(0) for g in grads), *packed)


def _forward_fake(call: LinearCall) -> tuple:
    p = call.problem
    scalar = p.options.reduction != "none"
    loss = p.input.new_empty(() if scalar else p.output_shape, dtype=p.output_dtype)
    params = (p.input, p.linear_weight, p.linear_bias)
    grads = (
        t.new_empty(t.shape) if scalar and wanted and t is not None else p.input.new_empty(0)
        for t, wanted in zip(params, call.forward_grads)
    )
    return (loss, *grads, *packed_statistics_like(p.statistics, p.input.shape[0], p.input, p.compute_dtype))


def _backward(call: LinearCall, extra: Upstream, want: dict) -> dict:
    """The wanted gradients for the upstream gradient (per row for reduction='none'), recomputing the chunks."""
    grads = linear_backward(call.problem, extra.upstream, tuple(want[n] for n in PARAMETERS))
    return dict(zip(PARAMETERS, grads))


def save_inputs_or_grads(args, outputs: dict, recompute: bool) -> dict:
    """What the traced backward of a loss over a linear head needs: when it recomputes (recomputes_in_backward)
    the inputs, else forward's unit-upstream gradients."""
    if recompute:
        return {n: v for n, v in as_flat_dict(args).items() if isinstance(v, Tensor)}
    return {f"grad_{n}": outputs[f"grad_{n}"] for n in PARAMETERS}


def scale_or_recompute(ctx: BackwardContext, recompute: bool, reduction: str, backend: str | None) -> dict:
    """The traced backward of a loss over a linear head: recomputing through the family's backward op, or
    scaling forward's saved unit-upstream gradients in place by the upstream gradient."""
    if recompute:
        return ctx.backward_op(Upstream(ctx.grads["loss"]))
    grads = {n: ctx.saved[f"grad_{n}"] for n in PARAMETERS if ctx.want[n]}
    for g in grads.values():
        SCALE_GRAD(ScaleGrad(g, ctx.grads["loss"], reduction, backend))
    return grads


LINEAR_CROSS_ENTROPY = OpFamily(
    "linear_cross_entropy",
    LinearCall,
    ("loss", "grad_input", "grad_linear_weight", "grad_linear_bias", "packed", "argmax"),
    _forward,
    _forward_fake,
    differentiable=PARAMETERS,
    backward_args=Upstream,
    backward_impl=_backward,
    save=lambda call, out: save_inputs_or_grads(call, out, call.recompute),
    backward=lambda ctx: scale_or_recompute(
        ctx, ctx.args.recompute, ctx.args.problem.options.reduction, ctx.args.problem.options.backend
    ),
)
