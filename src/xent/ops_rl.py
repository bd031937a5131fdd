"""The ops layer for RL token log-probabilities and entropies (xent.rl): custom ops, autograd, routes.

logprob_i = -ce_i (reduction 'none') and H_i = -sum_c p_ic log p_ic come from the same pass's row
statistics; backward runs the pass again with both upstream gradients folded into each row's
coefficients (d logprob / dz = onehot - p, dH/dz = -p (log p + H)), so the two never cost two passes.
Ignored rows get 0 for both and no gradient. As in ops.py: custom ops with fake implementations (eager
and traced calls alike go through them), and the formulas under torch.func.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .kernels import forward_for
from .kernels import linear as linear_kernels
from .ops import _cast, _grads_like, cross_entropy_forward, linear_forward
from .problems import FUNC, LinearProblem, Options, Problem, make_problem, route


def _token_problem(p: LinearProblem) -> LinearProblem:
    return replace(p, options=replace(p.options, reduction="none"), statistics=("logprob", "entropy"))


def linear_token_logprobs_forward(p: LinearProblem) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) of every row of a linear head, 0 on ignored rows, in the compute dtype."""
    p = _token_problem(p)
    _, _, stats = linear_forward(p, (False, False, False))
    valid = p.target.reshape(-1).long() != p.options.ignore_index
    return stats["logprob"], torch.where(valid, stats["entropy"], 0)


def linear_token_logprobs_backward(
    p: LinearProblem, grad_logprob: Tensor, grad_entropy: Tensor, want: tuple[bool, bool, bool]
) -> list:
    """The gradients in `want` of sum_i grad_logprob_i logprob_i + grad_entropy_i H_i."""
    p = replace(_token_problem(p), statistics=())
    targets = linear_kernels.index_targets(p)
    entropy = torch.where(targets.valid, grad_entropy.reshape(-1), 0)
    with linear_kernels.no_autocast(p.input.device):
        _, gi, gw, gb = linear_kernels.linear_pass(
            p, targets.block(), targets, targets.scale(-grad_logprob), want, entropy_scale=entropy
        )
    return [gi, _cast(gw, p.linear_weight), _cast(gb, p.linear_bias)]


@torch.library.custom_op("xent::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    ignore_index: int,
    memory_budget: int,
) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of (R, H) hidden states under the head (R, each in the compute dtype)."""
    return linear_token_logprobs_forward(
        _token_linear_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget)
    )


@_linear_token_logprobs_op.register_fake
def _(input, linear_weight, linear_bias, target, ignore_index, memory_budget):
    cd = torch.float64 if linear_weight.dtype == torch.float64 else torch.float32
    return input.new_empty(input.shape[0], dtype=cd), input.new_empty(input.shape[0], dtype=cd)


@torch.library.custom_op("xent::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    grad_logprob: Tensor,
    grad_entropy: Tensor,
    ignore_index: int,
    memory_budget: int,
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    p = _token_linear_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget)
    grads = linear_token_logprobs_backward(p, grad_logprob, grad_entropy, (want_input, want_weight, want_bias))
    return tuple(g if g is not None else input.new_empty(0) for g in grads)


@_linear_token_logprobs_backward_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    grad_logprob,
    grad_entropy,
    ignore_index,
    memory_budget,
    want_input,
    want_weight,
    want_bias,
):
    return _grads_like(input, linear_weight, linear_bias, (want_input, want_weight, want_bias))


def _token_upstreams(grad_logprob, grad_entropy, rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Both upstream gradients as tensors: autograd passes None for an output that was not used."""
    zeros = torch.zeros(
        rows.shape[0], dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=rows.device
    )
    return (grad_logprob if grad_logprob is not None else zeros, grad_entropy if grad_entropy is not None else zeros)


def _token_linear_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget) -> LinearProblem:
    cd = torch.float64 if linear_weight.dtype == torch.float64 else torch.float32
    return LinearProblem(
        input,
        linear_weight,
        linear_bias,
        target,
        None,
        Options("none", ignore_index),
        (input.shape[0],),
        cd,
        0,
        None if memory_budget < 0 else memory_budget,
    )


class LinearTokenLogprobs(torch.autograd.Function):
    """Autograd for xent::linear_token_logprobs, eager and traced alike: backward recomputes the pass."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, target, ignore_index, memory_budget):
        return torch.ops.xent.linear_token_logprobs(
            input, linear_weight, linear_bias, target, ignore_index, memory_budget
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:4])
        ctx.args = inputs[4:]

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        input, linear_weight, linear_bias, target = ctx.saved_tensors
        want = tuple(ctx.needs_input_grad[:3])
        grad_logprob, grad_entropy = _token_upstreams(grad_logprob, grad_entropy, input, linear_weight.dtype)
        gi, gw, gb = torch.ops.xent.linear_token_logprobs_backward(
            input, linear_weight, linear_bias, target, grad_logprob, grad_entropy, *ctx.args, *want
        )
        return (*(g if w else None for g, w in zip((gi, gw, gb), want)), None, None, None)


def linear_token_logprobs(
    p: LinearProblem, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of p.input (the caller's `input` reshaped to (R, H)), differentiable."""
    if route(input, linear_weight, linear_bias, p.target) == FUNC:
        logits = F.linear(p.input, linear_weight, linear_bias)
        return _token_formula(logits, p.target, p.options.ignore_index)
    budget = -1 if p.memory_budget is None else p.memory_budget
    return LinearTokenLogprobs.apply(p.input, linear_weight, linear_bias, p.target, p.options.ignore_index, budget)


def _token_formula(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """The definitions, as differentiable torch ops (torch.func transforms)."""
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lp = reference.log_softmax(logits.to(cd))
    flat = target.reshape(-1).long()
    valid = flat != ignore_index
    picked = lp.gather(1, torch.where(valid, flat, 0).unsqueeze(1)).squeeze(1) if lp.shape[1] else lp.sum(1) * 0
    entropy = -torch.where(lp > -float("inf"), lp.exp() * lp, 0).sum(1)
    return torch.where(valid, picked, 0), torch.where(valid, entropy, 0)


# the same for logits at hand


def _logits_token_problem(logits: Tensor, target: Tensor, ignore_index: int, statistics: tuple) -> Problem:
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return make_problem(logits, target, None, Options("none", ignore_index), cd, statistics)


@torch.library.custom_op("xent::token_logprobs_from_logits", mutates_args=())
def _token_logprobs_from_logits_op(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of (R, V) logits, 0 on ignored rows, in the compute dtype."""
    problem = _logits_token_problem(logits, target, ignore_index, ("logprob", "entropy"))
    _, _, stats = cross_entropy_forward(problem, need_grad=False)
    valid = target.reshape(-1).long() != ignore_index
    return stats["logprob"], torch.where(valid, stats["entropy"], 0)


@_token_logprobs_from_logits_op.register_fake
def _(logits, target, ignore_index):
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[0], dtype=cd), logits.new_empty(logits.shape[0], dtype=cd)


@torch.library.custom_op("xent::token_logprobs_from_logits_backward", mutates_args=())
def _token_logprobs_from_logits_backward_op(
    logits: Tensor, target: Tensor, grad_logprob: Tensor, grad_entropy: Tensor, ignore_index: int
) -> Tensor:
    problem = _logits_token_problem(logits, target, ignore_index, ())
    valid = target.reshape(-1).long() != ignore_index
    entropy = torch.where(valid, grad_entropy, 0)
    _, grad, _ = forward_for(problem)(problem, need_grad=True, upstream=-grad_logprob, entropy_upstream=entropy)
    return grad.view(logits.shape)


@_token_logprobs_from_logits_backward_op.register_fake
def _(logits, target, grad_logprob, grad_entropy, ignore_index):
    return logits.new_empty(logits.shape)


class TokenLogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(logits, target, ignore_index):
        return torch.ops.xent.token_logprobs_from_logits(logits, target, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])
        ctx.ignore_index = inputs[2]

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, target = ctx.saved_tensors
        grad_logprob, grad_entropy = _token_upstreams(grad_logprob, grad_entropy, logits, logits.dtype)
        grad = torch.ops.xent.token_logprobs_from_logits_backward(
            logits, target, grad_logprob, grad_entropy, ctx.ignore_index
        )
        return grad, None, None


def token_logprobs_from_logits(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of (R, V) logits, differentiable with respect to the logits."""
    if route(logits, target) == FUNC:
        return _token_formula(logits, target, ignore_index)
    return TokenLogprobsFromLogits.apply(logits, target, ignore_index)
