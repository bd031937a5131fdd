"""Token log-probabilities (and entropies) for RL fine-tuning (GRPO, PPO), without the logits.

    logprob_i = log_softmax((h_i @ W.T + b) / T)[y_i]        entropy_i = -sum_j p_ij log p_ij

`token_logprobs` takes the hidden states and the head. A half-precision head's logits are the GEMM's fp32
accumulator (logits_dtype=torch.float32, the default: RL trainers compare these log-probabilities across
the rollout engine and the policies, and rounding of the logits to bf16 shows up as a mismatch), and
the temperature divides them in fp32 inside the pass, after the GEMM (dividing the half-precision hidden
states instead would round them once more). The
log-probabilities alone are xent's fused linear cross-entropy per token
(logprob = -cross-entropy, 'none' reduction). With the entropy, both come from one fused pass over the
chunks of logits (the row kernel takes the entropy while it streams each row), and backward runs one
more pass with both upstream gradients folded into each row's gradient (ops/rl.py): the logits are
never materialized and the gradient is exact, on every backend.

Ignored tokens (target == ignore_index, e.g. the prompt or padding) get log-probability 0, entropy 0
and no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from . import dtensor
from .ops import cross_entropy as ce_ops
from .ops import linear as linear_ops
from .ops import rl as rl_ops
from .problems import TokenStatistics, compute_dtype
from .validation.cross_entropy import (
    ThroughLogits,
    check_backend,
    check_statistics,
    check_token_temperature,
    cross_entropy_problem,
    linear_cross_entropy_problem,
    linear_topk_problem,
    with_backend,
)


def token_logprobs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_requires_grad: bool = True,
    memory_budget: int | None = None,
    softcap: float | None = None,
    return_stats: str | Sequence[str] | None = None,
    backend: str | None = None,
    memory_mode: str = "auto",
    logits_dtype: torch.dtype | None = torch.float32,
) -> Tensor | tuple:
    r"""Log-probability of each chosen token under ``softmax((input @ linear_weight.T + linear_bias) / T)``.

    Args:
        input (Tensor): hidden states, shape :math:`(..., H)`.
        linear_weight (Tensor): the head, :math:`(V, H)`; linear_bias (Tensor, optional): :math:`(V,)`.
        target (Tensor): the chosen token ids, shape :math:`(...)`; ``ignore_index`` marks tokens to skip.
        temperature (float or Tensor): the sampling temperature T > 0, or one per token: a tensor that
            broadcasts to the target's shape (e.g. ``(batch, 1)``: one per sequence). It carries no gradient.
        return_entropy (bool): also return each token's entropy (differentiable too).
        entropy_requires_grad (bool): with ``False`` the entropy is returned detached (a metric) and backward
            computes no entropy term. An entropy that is returned but not used in the loss costs nothing
            in backward either way.
        memory_budget (int, optional): bytes of one chunk of logits, as in :func:`xent.linear_cross_entropy`.
        softcap (float, optional): the logits become ``softcap * tanh(logits / softcap)`` before the
            temperature divides them (Gemma 2's final-logit softcapping).
        return_stats: names of per-token statistics of the same softmax (:class:`xent.TokenStatistics`:
            e.g. ``"sum_sq_probs"``, ``"mean_logit"``, ``"correct"``), computed in the same pass over the
            logits, without gradient.
        backend (str, optional): the compute backend, as in :func:`xent.cross_entropy`.
        memory_mode (str): ``'auto'`` | ``'lean'`` | ``'fast'``: how backward computes the head's gradient,
            as in :func:`xent.linear_cross_entropy`.
        logits_dtype (torch.dtype, optional): ``torch.float32`` (default): a bf16/fp16 head's logits are
            the GEMM's fp32 accumulator, never rounded to the head's dtype, and the temperature divides
            them in fp32, as RL frameworks compute them (within verl's kernel tolerances of a float32
            reference; docs/precision.md). ``None`` or the head's dtype: rounded to it first, as
            ``F.linear`` rounds them.

    Returns:
        the log-probabilities, shape :math:`(...)` (float32 for half-precision inputs), and with
        ``return_entropy`` the entropies of the same shape. Both are 0 on ignored tokens. With
        ``return_stats``, a :class:`xent.TokenStatistics` comes last.

    Examples::

        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> head = torch.randn(1000, 64, requires_grad=True)
        >>> tokens = torch.randint(0, 1000, (2, 16))
        >>> logp, entropy = xent.token_logprobs(hidden, head, tokens, temperature=0.7, return_entropy=True)
        >>> (-(logp * torch.randn(2, 16)).sum() - 0.01 * entropy.sum()).backward()   # a policy-gradient step
    """
    if dtensor.is_dtensor(input, linear_weight, linear_bias, target):  # tensor-parallel heads: xent/dtensor.py
        if softcap is not None or return_stats is not None:
            raise NotImplementedError("token_logprobs: softcap or return_stats with a DTensor head")
        options = dict(
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            entropy_requires_grad=entropy_requires_grad,
            memory_budget=memory_budget,
            backend=backend,
            logits_dtype=logits_dtype,
        )
        return dtensor.token_logprobs(token_logprobs, input, linear_weight, target, linear_bias, options)
    cd = compute_dtype(input.dtype, linear_weight.dtype)
    t, row_t = check_token_temperature(temperature, target, cd, "token_logprobs")
    statistics = check_statistics(return_stats, "token_logprobs")
    backend = check_backend(backend, "token_logprobs")
    out_dtype = torch.float32 if input.dtype != torch.float64 else torch.float64
    described = linear_cross_entropy_problem(
        input,
        linear_weight,
        target,
        linear_bias,
        None,
        "none",
        ignore_index,
        0.0,
        0.0,
        softcap,
        None,
        memory_budget,
        out_dtype,
        fn="token_logprobs",
        temperature=t,
        memory_mode=memory_mode,
        logits_dtype=logits_dtype,
    )
    if isinstance(described, ThroughLogits):
        raise ValueError("token_logprobs: target must hold token ids (class indices) and linear_weight must be (V, H)")
    problem, input, linear_weight, linear_bias = described
    problem = replace(with_backend(problem, backend), row_temperature=row_t)
    if not return_entropy and row_t is None and not statistics:  # logprob = -(per-token linear CE), at T
        loss, _ = linear_ops.linear_cross_entropy(problem, input, linear_weight, linear_bias, problem.target, None)
        return -loss.reshape(target.shape)
    # the entropy, per-token temperatures or statistics: the RL op (an unused entropy costs no backward term)
    logprobs, entropy, stats = rl_ops.linear_token_logprobs(problem, input, linear_weight, linear_bias, statistics)
    out = [logprobs.reshape(target.shape)]
    if return_entropy:
        out.append((entropy if entropy_requires_grad else entropy.detach()).reshape(target.shape))
    if return_stats is not None:
        out.append(TokenStatistics.of(stats, target.shape))
    return out[0] if len(out) == 1 else tuple(out)


def token_logprobs_from_logits(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_requires_grad: bool = True,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` for logits already at hand, shape :math:`(..., V)`: xent's fused
    cross-entropy per token (float32 results for half-precision logits, as token_logprobs). A temperature
    other than 1 (a number, or one per token as in :func:`token_logprobs`) divides the logits in fp32
    inside the pass (no copy, no half-precision rounding). ``entropy_requires_grad`` and ``backend`` as in
    :func:`token_logprobs`."""
    if dtensor.is_dtensor(logits, target):  # vocab-parallel or row-split logits: xent/dtensor.py
        options = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)
        options.update(backend=backend, entropy_requires_grad=entropy_requires_grad)
        return dtensor.token_logprobs_from_logits(token_logprobs_from_logits, logits, target, options)
    t, row_t = check_token_temperature(temperature, target, compute_dtype(logits.dtype), "token_logprobs_from_logits")
    backend = check_backend(backend, "token_logprobs_from_logits")
    flat = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    flat_target = target.reshape(-1)
    # the checks (a class-index target per row, in range, on the logits' device)
    problem = cross_entropy_problem(
        flat,
        flat_target,
        None,
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=0.0,
        temperature=t,
        fn="token_logprobs_from_logits",
    )
    problem = with_backend(problem, backend)
    if not return_entropy and row_t is None:  # the per-row loss in the compute dtype (not rounded to bf16 first)
        loss, _ = ce_ops.cross_entropy(replace(problem, output_dtype=problem.compute_dtype), flat, flat_target, None)
        return -loss.reshape(target.shape)
    logprobs, entropy = rl_ops.token_logprobs_from_logits(flat, flat_target, problem.options, row_t)
    if not return_entropy:
        return logprobs.reshape(target.shape)
    entropy = entropy if entropy_requires_grad else entropy.detach()
    return logprobs.reshape(target.shape), entropy.reshape(target.shape)


def token_topk(
    input: Tensor,
    linear_weight: Tensor,
    k: int,
    *,
    linear_bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    softcap: float | None = None,
    memory_budget: int | None = None,
    logits_dtype: torch.dtype | None = torch.float32,
) -> tuple[Tensor, Tensor]:
    r"""The k most probable next tokens at each position and their log-probabilities, from the hidden
    states and the head, without materializing the logits (one chunk of rows at a time).

    Args:
        input (Tensor): hidden states, shape :math:`(..., H)`.
        linear_weight (Tensor): the head, :math:`(V, H)`; linear_bias (Tensor, optional): :math:`(V,)`.
        k (int): how many tokens per position, :math:`0 \le k \le V`.
        temperature, softcap, memory_budget, logits_dtype: as :func:`token_logprobs` (the
            log-probabilities are those of ``softmax(softcap(logits) / T)``).

    Returns:
        ``(logprobs, token_ids)``, both of shape :math:`(..., k)`, most probable first: the log-probabilities
        (float32; float64 for float64 inputs) and the int64 token ids. No gradient (a sampling or
        distillation-target helper; :func:`token_logprobs` differentiates chosen tokens).

    Examples::

        >>> hidden, head = torch.randn(2, 16, 64), torch.randn(1000, 64)
        >>> logp, ids = xent.token_topk(hidden, head, 5)                   # (2, 16, 5) each
        >>> teacher = xent.TeacherTopK(ids, logp)                           # a top-k distillation target
    """
    problem, k = linear_topk_problem(
        input, linear_weight, k, linear_bias, temperature, softcap, memory_budget, logits_dtype=logits_dtype
    )
    values, ids = rl_ops.linear_topk(problem, k)
    shape = (*problem.output_shape, k)
    return values.reshape(shape), ids.reshape(shape)
