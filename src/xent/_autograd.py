"""The autograd Function behind xent.cross_entropy.

Forward asks a backend (kernels/) for the loss and, when autograd will want it, the gradient of the loss
for a unit upstream gradient. Backward then only scales that buffer in place by the upstream gradient and
hands it over: no log-softmax is saved, no one-hot is built, and the buffer is the only O(rows x classes)
memory. Rarer requests take slower but exact routes:

* a second backward through the same graph (retain_graph=True) recomputes the buffer;
* double backward (create_graph=True) and gradients for a probability target or class weights
  differentiate `xent.reference` evaluated in the compute dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._validate import Problem
from . import kernels
from .kernels import forward_for


def cross_entropy(problem: Problem, input: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    grads_wanted = torch.is_grad_enabled() and (
        input.requires_grad or target.requires_grad or (weight is not None and weight.requires_grad))
    if not grads_wanted:
        loss, _ = forward_for(problem)(problem, need_grad=False)
        return loss
    return CrossEntropyFunction.apply(input, target, weight, problem)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None, problem: Problem) -> Tensor:
        # The fused gradient covers d/d(input); gradients for target or weight come from the slow path,
        # which then computes all of them.
        fused = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        loss, grad = forward_for(problem)(problem, need_grad=fused)
        ctx.problem = problem
        ctx.grad = grad
        ctx.save_for_backward(input, target, weight)  # unpacked (and version-checked) only off the fast path
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        problem: Problem = ctx.problem
        create_graph = torch.is_grad_enabled()
        if not create_graph and not any(ctx.needs_input_grad[1:3]):
            grad, ctx.grad = ctx.grad, None  # the buffer is handed over; a second backward recomputes it
            if grad is None:
                ctx.saved_tensors  # raises if the logits were modified in place since forward
                _, grad = forward_for(problem)(problem, need_grad=True)
            scale_by_upstream_(grad, grad_loss, problem.options.reduction)
            return grad.view(problem.input_shape), None, None, None
        return (*_differentiate_reference(ctx, grad_loss, create_graph), None)


def scale_by_upstream_(grad: Tensor, grad_loss: Tensor, reduction: str) -> None:
    """grad (N, C, D) *= the upstream gradient: one value per row for 'none', a scalar otherwise."""
    n, c, d = grad.shape
    if reduction == "none" and d != 1:
        grad.mul_(grad_loss.reshape(n, 1, d))  # K-dim rows are strided: one broadcast multiply
    else:
        kernels.scale_by_upstream_(grad, grad_loss, per_row=reduction == "none")


def _differentiate_reference(ctx, grad_loss: Tensor, create_graph: bool) -> tuple:
    problem: Problem = ctx.problem
    opts = problem.options
    saved = list(ctx.saved_tensors)
    wanted = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        if not create_graph:
            saved = [t.detach().requires_grad_(w) if t is not None else None for t, w in zip(saved, wanted)]
        input, target, weight = saved
        loss = reference.cross_entropy(
            input, target, weight, ignore_index=opts.ignore_index, reduction=opts.reduction,
            label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, softcap=opts.softcap,
            dtype=problem.compute_dtype).to(problem.output_dtype)
        if opts.reduction == "none":
            loss = loss.reshape(problem.output_shape)
        inputs = [t for t, w in zip(saved, wanted) if w]
        grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=create_graph))
    return tuple(next(grads) if w else None for w in wanted)
