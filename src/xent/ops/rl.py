"""RL token log-probabilities and entropies (xent.rl) as declared custom ops, with the formulas under torch.func.

logprob_i = -ce_i (reduction 'none') and H_i = -sum_c p_ic log p_ic come from the same pass's row
statistics; backward runs the pass again with both upstream gradients folded into each row's
coefficients (d logprob / dz = onehot - p, dH/dz = -p (log p + H)), so the two never cost two passes.
Ignored rows get 0 for both and no gradient. Eager and traced calls alike go through the ops (their
registered autograd recomputes in backward).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .. import reference
from ..kernels import forward_for
from ..kernels import linear as linear_kernels
from ..problems import FUNC, LinearProblem, Options, Problem, compute_dtype, make_problem, route
from .cross_entropy import cross_entropy_forward
from .declare import BackwardContext, OpFamily
from .linear import PARAMETERS, cast_like, linear_forward
from .statistics import op_statistics, pack_statistics, packed_statistics_like, unpack_statistics

TOKEN_STATISTICS = ("logprob", "entropy")


@dataclass(frozen=True)
class TokenUpstreams:
    """The backward ops' extra arguments: both outputs' upstream gradients (zeros for an unused one)."""

    grad_logprob: Tensor
    grad_entropy: Tensor | None  # None: the entropy is unused (or detached), its gradient term is skipped


def _upstreams(ctx: BackwardContext, like: Tensor, dtype: torch.dtype) -> TokenUpstreams:
    """The log-probabilities' upstream gradient (zeros when unused) and the entropy's (None when unused:
    backward then computes no entropy term)."""
    n, cd = like.shape[0], compute_dtype(dtype)
    return TokenUpstreams(ctx.grad_or_zeros("logprob", n, cd, like.device), ctx.grads["entropy"])


def _valid(target: Tensor, ignore_index: int) -> Tensor:
    return target.reshape(-1).long() != ignore_index


# ----------------------------------------------------------------------------------------------------
# From a linear head


def token_linear_problem(p: LinearProblem, extra: tuple = ()) -> LinearProblem:
    """The op's problem for a validated linear head: 'none', no class weights or other terms (only
    ignore_index, the softcap, the temperature and the backend carried over), both statistics and the
    `extra` ones (op_statistics' names, computed without gradient in the same pass), outputs in the
    compute dtype."""
    o = p.options
    options = Options("none", o.ignore_index, softcap=o.softcap, temperature=o.temperature, backend=o.backend)
    n = p.input.shape[0]
    return LinearProblem(
        p.input,
        p.linear_weight,
        p.linear_bias,
        p.target,
        None,
        options,
        (n,),
        p.compute_dtype,
        0,
        p.memory_budget,
        TOKEN_STATISTICS + tuple(n for n in extra if n not in TOKEN_STATISTICS),
        p.row_temperature,
        p.memory_mode,
        p.logits_dtype,
    )


def _extra(p: LinearProblem) -> tuple:
    return tuple(n for n in p.statistics if n not in TOKEN_STATISTICS)


def _linear_forward(p: LinearProblem) -> tuple[Tensor, ...]:
    """(logprob, entropy) of every row of a linear head, 0 on ignored rows, in the compute dtype; then the
    extra statistics, packed (ops/statistics.py)."""
    _, _, stats = linear_forward(p, (False, False, False))
    entropy = torch.where(_valid(p.target, p.options.ignore_index), stats["entropy"], 0)
    extra = {n: stats[n] for n in _extra(p)}
    return stats["logprob"], entropy, *pack_statistics(extra, p.input.shape[0], p.input, p.compute_dtype)


def _linear_fake(p: LinearProblem) -> tuple[Tensor, ...]:
    n = p.input.shape[0]
    packed = packed_statistics_like(_extra(p), n, p.input, p.compute_dtype)
    return p.input.new_empty(n, dtype=p.compute_dtype), p.input.new_empty(n, dtype=p.compute_dtype), *packed


def _linear_backward(p: LinearProblem, up: TokenUpstreams, want: dict) -> dict:
    """The wanted gradients of sum_i grad_logprob_i logprob_i + grad_entropy_i H_i."""
    p = replace(p, statistics=())
    targets = linear_kernels.index_targets(p)
    entropy = torch.where(targets.valid, up.grad_entropy.reshape(-1), 0) if up.grad_entropy is not None else None
    with linear_kernels.no_autocast(p.input.device):
        _, gi, gw, gb = linear_kernels.gradient_pass(
            p,
            targets.block(),
            targets,
            targets.scale(-up.grad_logprob),
            tuple(want[n] for n in PARAMETERS),
            entropy_scale=entropy,
        )
    return dict(zip(PARAMETERS, (gi, cast_like(gw, p.linear_weight), cast_like(gb, p.linear_bias))))


LINEAR_TOKEN_LOGPROBS = OpFamily(
    "linear_token_logprobs",
    LinearProblem,
    (*TOKEN_STATISTICS, "packed", "argmax"),
    _linear_forward,
    _linear_fake,
    differentiable=PARAMETERS,
    differentiable_outputs=TOKEN_STATISTICS,
    backward_args=TokenUpstreams,
    backward_impl=_linear_backward,
    save=lambda p, out: {
        "input": p.input,
        "linear_weight": p.linear_weight,
        "linear_bias": p.linear_bias,
        "target": p.target,
        "row_temperature": p.row_temperature,
    },
    backward=lambda ctx: ctx.backward_op(_upstreams(ctx, ctx.args.input, ctx.args.linear_weight.dtype)),
)


def linear_token_logprobs(
    p: LinearProblem, input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, statistics: tuple = ()
) -> tuple[Tensor, Tensor, dict]:
    """(logprob, entropy) per row of p.input (the caller's `input` reshaped to (R, H)), differentiable, and
    the per-token `statistics` (TokenStatistics' names) by name, from the same pass, without gradient."""
    if route(input, linear_weight, linear_bias, p.target) == FUNC:
        logits = linear_kernels.formula_logits(p.input, linear_weight, linear_bias, p.logits_dtype)
        o = p.options
        if statistics and isinstance(p.temperature, Tensor):  # the formulas' statistics take one temperature
            raise NotImplementedError("token_logprobs: return_stats with per-token temperatures under torch.func")
        logprob, entropy = _token_formula(logits, p.target, o.ignore_index, p.temperature, o.softcap)
        stats = {}
        if statistics:
            cd, temperature = p.compute_dtype, p.temperature
            stats = reference.token_statistics(
                logits, p.target, statistics, o.ignore_index, 0.0, o.softcap, cd, temperature
            )
        return logprob, entropy, {name: value.detach() for name, value in stats.items()}
    out = LINEAR_TOKEN_LOGPROBS(token_linear_problem(p, op_statistics(statistics)))
    stats = unpack_statistics(out["packed"], out["argmax"], statistics, p.target, p.options.ignore_index)
    return out["logprob"], out["entropy"], stats


def _token_formula(
    logits: Tensor, target: Tensor, ignore_index: int, temperature: float | Tensor, softcap: float | None = None
) -> tuple[Tensor, Tensor]:
    """The definitions, as differentiable torch ops (torch.func transforms); the (capped) logits over T in
    fp32 (T a number, or one per row)."""
    z = logits.to(compute_dtype(logits.dtype))
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = reference.log_softmax(z / (temperature.unsqueeze(1) if isinstance(temperature, Tensor) else temperature))
    flat = target.reshape(-1).long()
    valid = flat != ignore_index
    picked = lp.gather(1, torch.where(valid, flat, 0).unsqueeze(1)).squeeze(1) if lp.shape[1] else lp.sum(1) * 0
    entropy = -torch.where(lp > -float("inf"), lp.exp() * lp, 0).sum(1)
    return torch.where(valid, picked, 0), torch.where(valid, entropy, 0)


# ----------------------------------------------------------------------------------------------------
# From logits at hand


def _logits_forward(p: Problem) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of (R, V) logits, 0 on ignored rows, in the compute dtype."""
    _, _, stats = cross_entropy_forward(p, need_grad=False)
    return stats["logprob"], torch.where(_valid(p.target, p.options.ignore_index), stats["entropy"], 0)


def _logits_fake(p: Problem) -> tuple[Tensor, Tensor]:
    n = p.num_rows
    return p.logits.new_empty(n, dtype=p.compute_dtype), p.logits.new_empty(n, dtype=p.compute_dtype)


def _logits_backward(p: Problem, up: TokenUpstreams, want: dict) -> dict:
    p = replace(p, statistics=())
    entropy = None
    if up.grad_entropy is not None:
        entropy = torch.where(_valid(p.target, p.options.ignore_index), up.grad_entropy, 0)
    _, grad, _ = forward_for(p)(p, need_grad=True, upstream=-up.grad_logprob, entropy_upstream=entropy)
    return {"logits": grad.view(p.logits.shape)}


TOKEN_LOGPROBS_FROM_LOGITS = OpFamily(
    "token_logprobs_from_logits",
    Problem,
    TOKEN_STATISTICS,
    _logits_forward,
    _logits_fake,
    differentiable=("logits",),
    differentiable_outputs=TOKEN_STATISTICS,
    backward_args=TokenUpstreams,
    backward_impl=_logits_backward,
    save=lambda p, out: {"logits": p.logits, "target": p.target, "row_temperature": p.row_temperature},
    backward=lambda ctx: ctx.backward_op(_upstreams(ctx, ctx.args.logits, ctx.args.logits.dtype)),
)


def token_logprobs_from_logits(
    logits: Tensor, target: Tensor, options: Options, row_temperature: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(logprob, entropy) per row of (R, V) logits, differentiable with respect to the logits; of `options`
    only ignore_index, the temperature and the backend are read (`row_temperature`: one per row instead)."""
    if route(logits, target) == FUNC:
        t = row_temperature if row_temperature is not None else options.temperature
        return _token_formula(logits, target, options.ignore_index, t)
    options = Options("none", options.ignore_index, temperature=options.temperature, backend=options.backend)
    problem = make_problem(logits, target, None, options, compute_dtype(logits.dtype), TOKEN_STATISTICS)
    problem = replace(problem, row_temperature=row_temperature)
    out = TOKEN_LOGPROBS_FROM_LOGITS(problem)
    return out["logprob"], out["entropy"]


# ----------------------------------------------------------------------------------------------------
# Top-k tokens of a linear head (no gradient)


def linear_topk(p: LinearProblem, k: int) -> tuple[Tensor, Tensor]:
    """(log-probabilities, token ids), each (R, k), of every row's k most probable classes."""
    return linear_kernels.linear_topk(p, k)
