"""The ops layer: xent's losses as torch.library custom ops, their autograd, and the eager fast path.

A validated problem (``_validate.py``) runs one of three ways, chosen per call by ``problems.route``:

* **eager** (plain tensors): an ``autograd.Function`` whose forward asks the kernels for the loss and, when
  autograd will want it, the gradient for a unit upstream gradient. The gradient is a real saved tensor
  (``saved_tensors_hooks`` see it, so offloading tools can move it); backward scales it in place by the
  upstream gradient (``kernels.scale_by_upstream_``: nothing at all for the 1.0 of ``loss.backward()``)
  and hands it over. A second backward through the graph (``retain_graph=True``) recomputes it.
* **traced** (``torch.compile``, ``torch.export``, ``make_fx``): custom ops, opaque to the tracer, with
  fake implementations (shapes and dtypes only), wrapped in ``setup_context`` autograd Functions that
  dynamo traces. ``xent::cross_entropy`` only reads the logits; ``xent::cross_entropy_backward`` runs
  the fused pass again with the upstream gradient folded into each row's coefficients, so no gradient
  buffer lives between forward and backward and nothing saved is mutated (inductor turns an in-place
  update of a saved buffer into an extra copy of it). ``xent::linear_cross_entropy`` returns its
  unit-upstream gradients, which backward scales with the mutating ``xent::scale_grad_`` (recomputing
  would cost a matmul). Value checks run inside the ops, on real tensors, at run time.
* **torch.func** transforms (grad, vjp, jacrev, jacfwd, hessian, vmap): the formulas of
  ``xent.reference`` in the compute dtype, plain differentiable torch ops that every transform handles.
  They materialize log-softmax, as torch's own losses do under these transforms.

Every route computes the same formulas; the eager and traced routes run the very same kernels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .kernels import forward_for, rows, scale_by_upstream_
from .kernels import linear as linear_kernels
from .kernels.rows import FLOAT_STATISTICS
from .problems import EAGER, FUNC, TRACED, LinearProblem, Options, Problem, _as_3d, make_problem, route

# ----------------------------------------------------------------------------------------------------
# The kernels behind both the eager Functions and the custom ops


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """IndexError naming the first target that is neither a class nor ignore_index (as torch on CPU).

    On a GPU, and while a graph is traced, a device-side assert instead (as torch's own kernels): no
    host synchronisation and nothing data-dependent in the trace. Under a torch.func transform of the
    targets themselves (vmap over them) there is no single answer to assert on, and it is skipped.
    """
    if route(target) == FUNC:
        return
    if target.numel() == 0:
        return
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch: -100 or 300 must not wrap
    bad = ((flat >= num_classes) | (flat < 0)) & (flat != ignore_index)
    if target.device.type != "cpu" or route(target) == TRACED:
        torch._assert_async(~bad.any(), "xent: a target is out of bounds (neither a class index nor ignore_index)")
        return
    if bool(bad.any()):
        first = int(flat[bad.nonzero()[0, 0]])
        raise IndexError(
            f"Target {first} is out of bounds. (It must be a class index in [0, {num_classes - 1}] "
            f"or ignore_index={ignore_index}.)"
        )


def cross_entropy_forward(problem: Problem, need_grad: bool) -> tuple[Tensor, Tensor | None, dict]:
    """(loss, d loss / d input for a unit upstream gradient, laid out (N, C, D) contiguous, or None, the
    requested per-token statistics by name)."""
    if not problem.probabilities:
        check_target_range(problem.target, problem.num_classes, problem.options.ignore_index)
    return forward_for(problem)(problem, need_grad=need_grad)


def scale_input_grad_(grad: Tensor, upstream: Tensor, reduction: str) -> None:
    """grad (the input's shape, contiguous) *= the upstream gradient: a scalar, or for reduction='none'
    one value per row (the loss's shape: the input's without its class dimension)."""
    if reduction != "none":
        scale_by_upstream_(grad, upstream)
        return
    g = _as_3d(grad)
    n, _, d = g.shape
    if d == 1:
        scale_by_upstream_(g, upstream.reshape(n), per_row=True)
    else:  # K-dim rows are strided: one broadcast multiply (fp32 math, cast once)
        g.mul_(upstream.reshape(n, 1, d))


def op_statistics(statistics: tuple) -> tuple:
    """What the custom ops compute for `statistics`: 'correct' becomes the argmax (the op returns a fixed
    set of tensors; correct = target kept & argmax == target is formed outside it)."""
    wanted = [n for n in statistics if n != "correct"]
    if "correct" in statistics and "argmax" not in wanted:
        wanted.append("argmax")
    return tuple(wanted)


def pack_statistics(stats: dict, num_rows: int, like: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """The statistics as a custom op returns them: the float ones stacked (k, rows) in `dtype`, in the
    order asked, and the argmax (rows,) int64, or an empty tensor when not asked for."""
    floats = [t for n, t in stats.items() if n in FLOAT_STATISTICS]
    packed = torch.stack(floats) if floats else like.new_empty((0, num_rows), dtype=dtype)
    argmax = stats.get("argmax")
    return packed, argmax if argmax is not None else like.new_empty(0, dtype=torch.int64)


def packed_statistics_like(statistics: tuple, num_rows: int, like: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """pack_statistics' shapes and dtypes, for op_statistics(...) (the custom ops' fake implementations)."""
    k = sum(n in FLOAT_STATISTICS for n in statistics)
    return (
        like.new_empty((k, num_rows), dtype=dtype),
        like.new_empty(num_rows if "argmax" in statistics else 0, dtype=torch.int64),
    )


def unpack_statistics(packed: Tensor, argmax: Tensor, statistics: tuple, target: Tensor, ignore_index: int) -> dict:
    """pack_statistics undone, in the order of `statistics` (what the caller asked)."""
    floats = dict(zip([n for n in op_statistics(statistics) if n in FLOAT_STATISTICS], packed.unbind(0)))
    out = {}
    for name in statistics:
        if name == "argmax":
            out[name] = argmax
        elif name == "correct":
            flat = target.reshape(-1)
            flat = flat.long()  # uint8 targets compare as int64 (ignore_index -100 must not wrap)
            out[name] = (flat != ignore_index) & (argmax == flat)
        else:
            out[name] = floats[name]
    return out


def linear_forward(p: LinearProblem, want: tuple[bool, bool, bool]):
    """(loss, [grad_input, grad_weight, grad_bias] with the gradients in `want` for a unit upstream
    gradient (scalar reductions only; None elsewhere) in the parameters' dtypes, the per-token
    statistics p.statistics asks for, by name)."""
    check_target_range(p.target, p.linear_weight.shape[0], p.options.ignore_index)
    targets = linear_kernels.index_targets(p)
    scalar = p.options.reduction != "none"
    with linear_kernels.no_autocast(p.input.device):
        stats, gi, gw, gb = linear_kernels.linear_pass(
            p, targets.block(), targets, targets.scale() if scalar and any(want) else None, want
        )
    loss = targets.reduce(linear_kernels.loss_rows(p, targets, stats))
    loss = (loss.reshape(p.output_shape) if not scalar else loss).to(p.output_dtype)
    grads = [gi, _cast(gw, p.linear_weight), _cast(gb, p.linear_bias)] if scalar and any(want) else None
    token_stats = rows.token_statistics(stats, p.statistics, targets, p.options.z_loss, p.compute_dtype)
    return loss, grads, token_stats


def linear_backward(p: LinearProblem, upstream: Tensor, want: tuple[bool, bool, bool]) -> list:
    """The gradients in `want` for the given upstream gradient, recomputing the chunks."""
    p = replace(p, statistics=())
    targets = linear_kernels.index_targets(p)
    upstream = upstream if p.options.reduction == "none" else upstream.expand(p.target.shape)
    with linear_kernels.no_autocast(p.input.device):
        _, gi, gw, gb = linear_kernels.linear_pass(p, targets.block(), targets, targets.scale(upstream), want)
    return [gi, _cast(gw, p.linear_weight), _cast(gb, p.linear_bias)]


def _cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype == like.dtype else t.to(like.dtype)


# ----------------------------------------------------------------------------------------------------
# Entry points (called by functional.py and linear.py with validated problems)


def cross_entropy(
    problem: Problem, input: Tensor, target: Tensor, weight: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, the per-token statistics problem.statistics asks for, by name, each flat over the rows)."""
    how = route(input, target, weight)
    input_grad = torch.is_grad_enabled() and input.requires_grad
    other_grads = torch.is_grad_enabled() and (target.requires_grad or (weight is not None and weight.requires_grad))
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
    o = problem.options
    loss, packed, argmax = TracedCrossEntropy.apply(
        input,
        target,
        weight,
        o.reduction,
        o.ignore_index,
        o.label_smoothing,
        o.z_loss,
        o.softcap,
        problem.output_dtype,
        ",".join(op_statistics(problem.statistics)),
    )
    stats = unpack_statistics(packed, argmax, problem.statistics, problem.target, o.ignore_index)
    return loss, stats


def linear_cross_entropy(
    p: LinearProblem,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
) -> Tensor:
    """(loss, the per-token statistics p.statistics asks for, by name, flat over the rows). `input` is
    the caller's (..., H) tensor; p.input its (R, H) view."""
    how = route(input, linear_weight, linear_bias, target, weight)
    if how == FUNC:
        return linear_formula(p, p.input, linear_weight, linear_bias, p.target, weight)
    want = tuple(
        torch.is_grad_enabled() and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)
    )
    if how == EAGER:
        if not any(want):
            loss, _, stats = linear_forward(p, want)
            return loss, stats
        if not p.statistics:
            return LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, p), {}
        loss, *values = LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, p)
        return loss, dict(zip(p.statistics, values))
    o = p.options
    loss, _, _, _, packed, argmax = TracedLinearCrossEntropy.apply(
        p.input,
        linear_weight,
        linear_bias,
        p.target,
        weight,
        o.reduction,
        o.ignore_index,
        o.label_smoothing,
        o.z_loss,
        o.softcap,
        p.output_dtype,
        p.chunk_size,
        -1 if p.memory_budget is None else p.memory_budget,
        *want,
        ",".join(op_statistics(p.statistics)),
    )
    loss = loss.reshape(p.output_shape) if o.reduction == "none" else loss
    return loss, unpack_statistics(packed, argmax, p.statistics, p.target, o.ignore_index)


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
    ).to(problem.output_dtype)
    return loss.reshape(problem.output_shape) if o.reduction == "none" else loss


def formula_statistics(problem: Problem, input: Tensor, target: Tensor) -> dict[str, Tensor]:
    """problem.statistics from the formulas (reference.token_statistics), flat over the rows."""
    if not problem.statistics:
        return {}
    o = problem.options
    cd = problem.compute_dtype
    stats = reference.token_statistics(input, target, problem.statistics, o.ignore_index, o.z_loss, o.softcap, cd)
    return {name: t.detach().reshape(-1) for name, t in stats.items()}


def linear_formula(
    p: LinearProblem,
    input2d: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
) -> Tensor:
    logits = F.linear(input2d, linear_weight, linear_bias)
    problem = make_problem(logits, target, weight, p.options, p.output_dtype, p.statistics)
    loss = cross_entropy_formula(problem, logits, target, weight)
    loss = loss.reshape(p.output_shape) if p.options.reduction == "none" else loss
    return loss, formula_statistics(problem, logits, target)


# ----------------------------------------------------------------------------------------------------
# Eager: autograd Functions that hand the forward's gradient to backward


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None, problem: Problem) -> Tensor:
        # The fused gradient covers d/d(input); gradients for target or weight come from the formulas,
        # which then give all of them.
        fused = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
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
        if grad is None:
            _, grad, _ = cross_entropy_forward(replace(problem, statistics=()), need_grad=True)
            grad = grad.view(problem.input_shape)
        scale_input_grad_(grad.data, grad_loss, problem.options.reduction)
        return grad, None, None, None


def save_for_handover(ctx, grads: list, inputs: tuple) -> None:
    """Keep forward's gradients for backward, as saved tensors (hooks see them), and the inputs. Every
    xent autograd Function that computes its gradient in forward hands it over through these three.

    The inputs are kept as references with their versions, not as saved tensors: the first backward
    does not read them, so (as with torch, which saves log-softmax) modifying the logits in place after
    forward must not fail it; only the paths that do read them (a second backward, the formulas) check.
    """
    ctx.save_for_backward(*grads)
    ctx.inputs = inputs
    ctx.versions = tuple(t._version if t is not None else None for t in inputs)
    ctx.handed_over = False


def saved_inputs(ctx) -> tuple:
    """The inputs kept by save_for_handover, after autograd's check that none was modified in place since forward."""
    for t, version in zip(ctx.inputs, ctx.versions):
        if t is not None and t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                f"expected version {version} instead (an input of an xent loss, read again by "
                f"this backward)"
            )
    return ctx.inputs


def take_handover(ctx) -> list:
    """Forward's gradients, for backward to scale in place and hand over; None for each when a previous
    backward (retain_graph=True) already took them (the inputs are checked then, since the caller
    recomputes from them), or forward computed none.

    Backward scales the buffers through `.data`, which leaves the saved tensors' versions alone: the
    second backward can still unpack them, and sees `handed_over`."""
    grads = list(ctx.saved_tensors)
    if ctx.handed_over:
        saved_inputs(ctx)
        return [None] * len(grads)
    ctx.handed_over = True
    if all(g is None for g in grads):
        saved_inputs(ctx)
    return grads


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


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, problem: LinearProblem):
        want = tuple(ctx.needs_input_grad[:3])
        loss, grads, stats = linear_forward(problem, want)
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
                    scale_by_upstream_(g.data, grad_loss)
        gi, gw, gb = grads
        return gi.view(ctx.input_shape) if gi is not None else None, gw, gb, None, None, None


def _linear_double_backward(ctx, grad_loss) -> tuple:
    """create_graph=True: differentiate cross_entropy(linear(...)) with autograd. This materializes the
    logits, which double backward needs anyway; the cross-entropy part is xent's own (differentiable
    through the formulas)."""
    p: LinearProblem = ctx.problem
    input, w_lin, b_lin, target, weight = saved_inputs(ctx)
    logits = F.linear(input, w_lin, b_lin).reshape(-1, w_lin.shape[0])
    problem = make_problem(logits, target.reshape(-1), weight, p.options, p.output_dtype)
    loss, _ = cross_entropy(problem, logits, problem.target.reshape(-1), weight)
    loss = loss.reshape(p.output_shape) if p.options.reduction == "none" else loss
    inputs = [t for t, w in zip((input, w_lin, b_lin), ctx.needs_input_grad[:3]) if w]
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
    return tuple(next(grads) if w else None for w in ctx.needs_input_grad[:3])


# ----------------------------------------------------------------------------------------------------
# Traced: the custom ops, their fake implementations and autograd


@torch.library.custom_op("xent::cross_entropy", mutates_args=())
def _cross_entropy_op(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    output_dtype: torch.dtype,
    statistics: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss (one read of the logits) and the per-token statistics named in `statistics` (comma
    separated; op_statistics' names), packed by pack_statistics."""
    problem = _problem(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype)
    problem = replace(problem, statistics=_names(statistics))
    loss, _, stats = cross_entropy_forward(problem, need_grad=False)
    loss = loss.clone() if _aliases(loss, input, target, weight) else loss
    return (loss, *pack_statistics(stats, problem.num_rows, input, problem.compute_dtype))


@_cross_entropy_op.register_fake
def _(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype, statistics):
    problem = _problem(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype)
    out_shape = () if reduction != "none" else problem.output_shape
    stats = packed_statistics_like(_names(statistics), problem.num_rows, input, problem.compute_dtype)
    return (input.new_empty(out_shape, dtype=output_dtype), *stats)


def _names(statistics: str) -> tuple:
    return tuple(n for n in statistics.split(",") if n)


@torch.library.custom_op("xent::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    upstream: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    output_dtype: torch.dtype,
) -> Tensor:
    """d loss / d input for the loss's gradient `upstream`: the fused pass again, with the upstream folded
    into each row's coefficients (one read of the logits, one write of the gradient)."""
    problem = _problem(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype)
    _, grad, _ = forward_for(problem)(problem, need_grad=True, upstream=upstream)
    return grad.view(input.shape)


@_cross_entropy_backward_op.register_fake
def _(upstream, input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype):
    return input.new_empty(input.shape)


def _problem(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, output_dtype):
    return make_problem(
        input, target, weight, Options(reduction, ignore_index, label_smoothing, z_loss, softcap), output_dtype
    )


class TracedCrossEntropy(torch.autograd.Function):
    """Autograd for xent::cross_entropy while traced. Forward only reads the logits; backward runs the
    fused pass with the upstream gradient folded in. This costs one more read of the logits than the
    eager path, but needs no gradient buffer between forward and backward and no in-place update of a
    saved tensor (which compiled graphs turn into an extra copy of the whole buffer)."""

    @staticmethod
    def forward(input, target, weight, *options):
        return torch.ops.xent.cross_entropy(input, target, weight, *options)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.options = inputs[3:9]  # reduction .. output_dtype (not the statistics)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*inputs[:3])

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_statistics):
        input, target, weight = ctx.saved_tensors
        grad = torch.ops.xent.cross_entropy_backward(grad_loss, input, target, weight, *ctx.options)
        return grad, None, None, None, None, None, None, None, None, None


@torch.library.custom_op("xent::scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, upstream: Tensor, reduction: str) -> None:
    """grad *= upstream in place (one value per row for 'none'); nothing at all for a unit upstream."""
    scale_input_grad_(grad, upstream, reduction)


@_scale_grad_op.register_fake
def _(grad, upstream, reduction):
    return None


@torch.library.custom_op("xent::linear_cross_entropy", mutates_args=())
def _linear_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    output_dtype: torch.dtype,
    chunk_size: int,
    memory_budget: int,
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
    statistics: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss of (R, H) rows and, for scalar reductions, the wanted gradients for a unit upstream gradient
    (empty tensors for the others), then the per-token statistics named in `statistics`, packed."""
    p = linear_problem_from_args(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        output_dtype,
        chunk_size,
        memory_budget,
    )
    p = replace(p, statistics=_names(statistics))
    loss, grads, stats = linear_forward(p, (want_input, want_weight, want_bias))
    grads = grads or [None, None, None]
    packed = pack_statistics(stats, input.shape[0], input, p.compute_dtype)
    return (loss, *(g if g is not None else input.new_empty(0) for g in grads), *packed)


@_linear_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    output_dtype,
    chunk_size,
    memory_budget,
    want_input,
    want_weight,
    want_bias,
    statistics,
):
    scalar = reduction != "none"
    loss = input.new_empty(() if scalar else (input.shape[0],), dtype=output_dtype)

    def grad_like(t, wanted):
        return t.new_empty(t.shape) if scalar and wanted and t is not None else input.new_empty(0)

    cd = torch.float64 if linear_weight.dtype == torch.float64 else torch.float32
    return (
        loss,
        grad_like(input, want_input),
        grad_like(linear_weight, want_weight),
        grad_like(linear_bias, want_bias),
        *packed_statistics_like(_names(statistics), input.shape[0], input, cd),
    )


def linear_problem_from_args(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    output_dtype,
    chunk_size,
    memory_budget,
) -> LinearProblem:
    return LinearProblem(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        Options(reduction, ignore_index, label_smoothing, z_loss, softcap),
        (input.shape[0],),
        output_dtype,
        chunk_size,
        None if memory_budget < 0 else memory_budget,
    )


class TracedLinearCrossEntropy(torch.autograd.Function):
    """Autograd for xent::linear_cross_entropy while traced: scalar reductions save the op's
    unit-upstream gradients and scale them in place; 'none' saves the inputs and recomputes."""

    @staticmethod
    def forward(*args):
        return torch.ops.xent.linear_cross_entropy(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.args = inputs[5:13]  # reduction .. memory_budget
        ctx.want = tuple(inputs[13:16])  # (not the statistics, inputs[16])
        ctx.mark_non_differentiable(*output[1:])
        if ctx.args[0] == "none":  # backward recomputes the chunks with each row's upstream gradient
            ctx.save_for_backward(*inputs[:5])
        else:
            ctx.save_for_backward(*output[1:4])

    @staticmethod
    def backward(ctx, grad_loss, *_grads_of_buffers):
        if ctx.args[0] == "none":
            gi, gw, gb = torch.ops.xent.linear_cross_entropy_backward(
                *ctx.saved_tensors, grad_loss, *ctx.args, *ctx.want
            )
        else:
            gi, gw, gb = ctx.saved_tensors
            for g, wanted in zip((gi, gw, gb), ctx.want):
                if wanted:
                    torch.ops.xent.scale_grad_(g, grad_loss, ctx.args[0])
        grads = [g if wanted else None for g, wanted in zip((gi, gw, gb), ctx.want)]
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None, None, None)


@torch.library.custom_op("xent::linear_cross_entropy_backward", mutates_args=())
def _linear_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    upstream: Tensor,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    output_dtype: torch.dtype,
    chunk_size: int,
    memory_budget: int,
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """reduction='none': the wanted gradients for per-row upstream gradients (empty tensors for others)."""
    p = linear_problem_from_args(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        output_dtype,
        chunk_size,
        memory_budget,
    )
    grads = linear_backward(p, upstream, (want_input, want_weight, want_bias))
    return tuple(g if g is not None else input.new_empty(0) for g in grads)


@_linear_backward_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    upstream,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    output_dtype,
    chunk_size,
    memory_budget,
    want_input,
    want_weight,
    want_bias,
):
    return _grads_like(input, linear_weight, linear_bias, (want_input, want_weight, want_bias))


def _grads_like(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, want: tuple) -> tuple:
    """The fake gradients of a linear backward op: each wanted one shaped as its parameter, else empty."""
    params = (input, linear_weight, linear_bias)
    return tuple(t.new_empty(t.shape) if w and t is not None else input.new_empty(0) for t, w in zip(params, want))


def _aliases(out: Tensor, *inputs: Tensor | None) -> bool:
    """A custom op's output may not share storage with an input (a degenerate loss can be a view)."""
    return any(
        t is not None
        and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
        and out.untyped_storage().nbytes() > 0
        for t in inputs
    )
