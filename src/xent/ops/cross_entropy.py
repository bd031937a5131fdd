"""Cross-entropy through the three routes (see ops/__init__.py): the eager Function that hands the
forward's gradient to backward, the declared custom op for traced calls, and the formulas for torch.func.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import reference
from ..checks import check_target_range
from ..kernels import forward_for, rows, scale_by_upstream_
from ..problems import EAGER, FUNC, TRACED, Problem, _as_3d, handover_keeps_range, route
from .declare import BackwardContext, OpFamily, Upstream
from .handover import save_for_handover, saved_inputs, take_handover
from .statistics import op_statistics, pack_statistics, packed_statistics_like, unpack_statistics


def cross_entropy_forward(
    problem: Problem, need_grad: bool, upstream: Tensor | None = None, grad_out: Tensor | None = None
) -> tuple[Tensor, Tensor | None, dict]:
    """(loss, d loss / d input for a unit upstream gradient, or for `upstream` (the loss's gradient) when
    given, laid out (N, C, D) contiguous (in `grad_out` when given: the logits themselves for
    inplace=True), or None, the requested per-token statistics by name)."""
    if not problem.probabilities:
        check_target_range(problem.target, problem.num_classes, problem.options.ignore_index)
    if grad_out is None:
        return forward_for(problem)(problem, need_grad=need_grad, upstream=upstream)
    return forward_for(problem)(problem, need_grad=need_grad, upstream=upstream, grad_out=grad_out)


def scale_input_grad_(grad: Tensor, upstream: Tensor, reduction: str, backend: str | None = None) -> None:
    """grad (the input's shape, contiguous) *= the upstream gradient: a scalar, or for reduction='none'
    one value per row (the loss's shape: the input's without its class dimension)."""
    if reduction != "none":
        scale_by_upstream_(grad, upstream, choice=backend)
        return
    g = _as_3d(grad)
    n, _, d = g.shape
    if d == 1:
        scale_by_upstream_(g, upstream.reshape(n), per_row=True, choice=backend)
    else:  # K-dim rows are strided: one broadcast multiply (fp32 math, cast once)
        g.mul_(upstream.reshape(n, 1, d))


def mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int, num_classes: int) -> Tensor:
    """The 'mean' reduction's denominator D of class-index targets, in float64, as the kernels divide by it:
    the number of counted targets, or their class weights' sum (torch's weighted mean)."""
    return rows.IndexTargets(
        target,
        weight,
        ignore_index=ignore_index,
        label_smoothing=0.0,
        z_loss=0.0,
        reduction="mean",
        num_classes=num_classes,
        dtype=torch.float64,
    ).denominator


def cross_entropy(
    problem: Problem, input: Tensor, target: Tensor, weight: Tensor | None, inplace: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, the per-token statistics problem.statistics asks for, by name, each flat over the rows).
    `inplace`: the eager gradient is written into the logits' storage (InplaceCrossEntropyFunction)."""
    how = route(input, target, weight)
    input_grad = torch.is_grad_enabled() and input.requires_grad
    other_grads = torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad))
    if inplace and how == EAGER and input_grad:
        check_inplace(input, other_grads)
        out = InplaceCrossEntropyFunction.apply(input, target, weight, problem)
        if not problem.statistics:
            return out, {}
        loss, *values = out
        return loss, dict(zip(problem.statistics, values))
    if how == FUNC or (how == TRACED and other_grads):
        # torch.func, or gradients for a probability target or the weights while traced: the formulas
        return cross_entropy_formula(problem, input, target, weight), formula_statistics(problem, input, target)
    if how == EAGER:
        if not (input_grad or other_grads):
            loss, _, stats = cross_entropy_forward(problem, need_grad=False)
            return loss, stats
        if not problem.statistics:
            return CrossEntropyFunction.apply(input, target, weight, problem), {}
        loss, *values = CrossEntropyFunction.apply(input, target, weight, problem)
        return loss, dict(zip(problem.statistics, values))
    out = CROSS_ENTROPY(replace(problem, statistics=op_statistics(problem.statistics)))
    o = problem.options
    return out["loss"], unpack_statistics(
        out["packed"], out["argmax"], problem.statistics, problem.target, o.ignore_index
    )


# ----------------------------------------------------------------------------------------------------
# The formulas (torch.func transforms, and the rare gradients the fused kernels do not produce)


def cross_entropy_formula(problem: Problem, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    o = problem.options
    loss = reference.cross_entropy(
        input,
        target,
        weight,
        ignore_index=o.ignore_index,
        reduction=o.reduction,
        label_smoothing=o.label_smoothing,
        z_loss=o.z_loss,
        softcap=o.softcap,
        dtype=problem.compute_dtype,
        temperature=o.temperature,
    ).to(problem.output_dtype)
    return loss.reshape(problem.output_shape) if o.reduction == "none" else loss


def formula_statistics(problem: Problem, input: Tensor, target: Tensor) -> dict[str, Tensor]:
    """problem.statistics from the formulas (reference.token_statistics), flat over the rows."""
    if not problem.statistics:
        return {}
    o = problem.options
    cd = problem.compute_dtype
    stats = reference.token_statistics(
        input, target, problem.statistics, o.ignore_index, o.z_loss, o.softcap, cd, o.temperature
    )
    return {name: t.detach().reshape(-1) for name, t in stats.items()}


# ----------------------------------------------------------------------------------------------------
# Eager: the forward's gradient handed to backward


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None, problem: Problem) -> Tensor:
        # The fused gradient covers d/d(input); gradients for target or weight come from the formulas,
        # which then give all of them. fp16 computes its gradient in backward (problems.handover_keeps_range).
        fused = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3]) and handover_keeps_range(input.dtype)
        loss, grad, stats = cross_entropy_forward(problem, need_grad=fused)
        ctx.problem = problem
        save_for_handover(ctx, [grad.view(problem.input_shape) if grad is not None else None], (input, target, weight))
        if not stats:
            return loss
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grads_of_statistics):
        problem: Problem = ctx.problem
        create_graph = torch.is_grad_enabled()
        if create_graph or any(ctx.needs_input_grad[1:3]):
            return (*_differentiate_formula(ctx, grad_loss, create_graph), None)
        (grad,) = take_handover(ctx)
        if grad is None:  # fp16, or a second backward: the fused pass again, with the upstream folded in
            _, grad, _ = cross_entropy_forward(replace(problem, statistics=()), need_grad=True, upstream=grad_loss)
            return grad.view(problem.input_shape), None, None, None
        scale_input_grad_(grad.data, grad_loss, problem.options.reduction, problem.options.backend)
        return grad, None, None, None


def check_inplace(input: Tensor, other_grads: bool) -> None:
    """What inplace=True cannot do, as torch's in-place ops refuse it."""
    if input.is_leaf:
        raise RuntimeError(
            "cross_entropy(inplace=True): a leaf Variable that requires grad is being used in an in-place "
            "operation (the logits would be overwritten by their gradient; pass logits computed from parameters)"
        )
    if other_grads:
        raise RuntimeError(
            "cross_entropy(inplace=True): gradients for the target or the class weights need the logits in "
            "backward, which inplace=True overwrites; use inplace=False"
        )


class InplaceCrossEntropyFunction(torch.autograd.Function):
    """inplace=True: the gradient goes into the logits' storage, so the loss holds no buffer of its own (0
    extra memory beyond the logits; the default holds one logits-sized gradient).

    Forward writes the unit-upstream gradient over the logits (bf16/fp32/fp64); fp16, whose gradient is
    computed with the upstream folded in (problems.handover_keeps_range), keeps them until backward writes
    it there. Either way forward bumps the logits' version counter: an op that saved the logits for its own
    backward (a softcap's tanh, a second loss) then raises autograd's "modified by an inplace operation"
    error instead of reading gradients as logits. The logits are consumed: after forward (fp16: after
    backward) they hold the gradient. One backward only (retain_graph cannot recompute), no create_graph."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None, problem: Problem):
        contiguous = input.is_contiguous()
        ctx.problem, ctx.input, ctx.used = problem, input, False
        ctx.recompute = not handover_keeps_range(input.dtype)
        if ctx.recompute:
            loss, _, stats = cross_entropy_forward(problem, need_grad=False)
        else:
            out = problem.logits if contiguous else None  # the logits' own (N, C, D) view
            loss, grad, stats = cross_entropy_forward(problem, need_grad=True, grad_out=out)
            if not contiguous:  # a strided view: computed apart, then copied over it
                input.copy_(grad.view(problem.input_shape))
        torch.autograd.graph.increment_version(input)
        if not stats:
            return loss
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_grads_of_statistics):
        if torch.is_grad_enabled():
            raise RuntimeError("cross_entropy(inplace=True) does not support double backward (create_graph=True)")
        if ctx.used:
            raise RuntimeError(
                "cross_entropy(inplace=True): backward ran twice, but the logits were overwritten by their "
                "gradient the first time (retain_graph=True needs inplace=False)"
            )
        ctx.used = True
        problem, input = ctx.problem, ctx.input
        if ctx.recompute:  # fp16: the fused pass with the upstream folded in, written over the logits
            out = problem.logits if input.is_contiguous() else None
            _, grad, _ = cross_entropy_forward(replace(problem, statistics=()), True, upstream=grad_loss, grad_out=out)
            if out is None:
                input.copy_(grad.view(problem.input_shape))
        elif input.is_contiguous():
            scale_input_grad_(input.data, grad_loss, problem.options.reduction, problem.options.backend)
        else:  # a strided view of the logits: one broadcast multiply (fp32 math where the upstream is fp32)
            up = grad_loss if problem.options.reduction != "none" else grad_loss.unsqueeze(min(1, input.dim() - 1))
            input.data.copy_(input.data * up)
        ctx.input = None
        return input.detach(), None, None, None


def _differentiate_formula(ctx, grad_loss: Tensor, create_graph: bool) -> tuple:
    problem: Problem = ctx.problem
    saved = list(saved_inputs(ctx))
    wanted = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        if not create_graph:
            saved = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(saved, wanted)]
        input, target, weight = saved
        loss = cross_entropy_formula(problem, input, target, weight)
        inputs = [t for t, w in zip(saved, wanted) if w]
        grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=create_graph))
    return tuple(next(grads) if w else None for w in wanted)


# ----------------------------------------------------------------------------------------------------
# Traced: xent::cross_entropy, declared from the Problem's fields
#
# Forward only reads the logits; backward (xent::cross_entropy_backward) runs the fused pass again with the
# upstream gradient folded into each row's coefficients. That costs one more read of the logits than the
# eager route, but needs no gradient buffer between forward and backward and no in-place update of a saved
# tensor (which compiled graphs turn into an extra copy of the whole buffer). Value checks run inside the
# ops, on real tensors, at run time.


def _forward(p: Problem) -> tuple:
    """The loss (one read of the logits) and the per-token statistics p.statistics names (op_statistics'
    names), packed."""
    loss, _, stats = cross_entropy_forward(p, need_grad=False)
    loss = loss.clone() if aliases(loss, p.logits, p.target, p.weight) else loss
    return (loss, *pack_statistics(stats, p.num_rows, p.logits, p.compute_dtype))


def _forward_fake(p: Problem) -> tuple:
    shape = () if p.options.reduction != "none" else p.output_shape
    stats = packed_statistics_like(p.statistics, p.num_rows, p.logits, p.compute_dtype)
    return (p.logits.new_empty(shape, dtype=p.output_dtype), *stats)


def _backward(p: Problem, extra: Upstream, want: dict) -> dict:
    """d loss / d logits for the loss's gradient: the fused pass again, with the upstream folded into
    each row's coefficients (one read of the logits, one write of the gradient)."""
    p = replace(p, statistics=())
    _, grad, _ = forward_for(p)(p, need_grad=True, upstream=extra.upstream)
    return {"logits": grad.view(p.logits.shape)}


def _save(p: Problem, outputs: dict) -> dict:
    return {"logits": p.logits, "target": p.target, "weight": p.weight}


def _traced_backward(ctx: BackwardContext) -> dict:
    return ctx.backward_op(Upstream(ctx.grads["loss"]))


CROSS_ENTROPY = OpFamily(
    "cross_entropy",
    Problem,
    ("loss", "packed", "argmax"),
    _forward,
    _forward_fake,
    differentiable=("logits",),
    backward_args=Upstream,
    backward_impl=_backward,
    save=_save,
    backward=_traced_backward,
)


@dataclass(frozen=True)
class ScaleGrad:
    grad: Tensor  # written in place
    upstream: Tensor
    reduction: str
    backend: str | None = None


SCALE_GRAD = OpFamily(
    "scale_grad_",
    ScaleGrad,
    (),
    lambda a: scale_input_grad_(a.grad, a.upstream, a.reduction, a.backend),
    lambda a: None,
    mutates=("grad",),
)
"""grad *= upstream in place (one value per row for 'none'); nothing at all for a unit upstream. The
traced routes that return their unit-upstream gradients from forward scale them with it in backward."""


def aliases(out: Tensor, *inputs: Tensor | None) -> bool:
    """A custom op's output may not share storage with an input (a degenerate loss can be a view)."""
    return any(
        t is not None
        and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        and out.untyped_storage().nbytes() > 0
        for t in inputs
    )
