"""Token log-probabilities (and entropies) for RL fine-tuning (GRPO, PPO), without the logits.

    logprob_i = log_softmax((h_i @ W.T + b) / T)[y_i]        entropy_i = -sum_j p_ij log p_ij

`token_logprobs` takes the hidden states and the head. The temperature divides the logits in fp32 inside
the pass, after the GEMM (whose fp32 accumulator a half-precision head rounds once to its dtype, as
F.linear does): dividing the half-precision hidden states instead would round them once more. The
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
from dataclasses import replace

import torch
from torch import Tensor

from . import dtensor
from .ops import cross_entropy as ce_ops
from .ops import linear as linear_ops
from .ops import rl as rl_ops
from .validation.cross_entropy import (
    ThroughLogits,
    check_backend,
    check_temperature,
    cross_entropy_problem,
    linear_cross_entropy_problem,
    with_backend,
)


def token_logprobs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    memory_budget: int | None = None,
    softcap: float | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Log-probability of each chosen token under ``softmax((input @ linear_weight.T + linear_bias) / T)``.

    Args:
        input (Tensor): hidden states, shape :math:`(..., H)`.
        linear_weight (Tensor): the head, :math:`(V, H)`; linear_bias (Tensor, optional): :math:`(V,)`.
        target (Tensor): the chosen token ids, shape :math:`(...)`; ``ignore_index`` marks tokens to skip.
        temperature (float): the sampling temperature T > 0.
        return_entropy (bool): also return each token's entropy (differentiable too).
        memory_budget (int, optional): bytes of one chunk of logits, as in :func:`xent.linear_cross_entropy`.
        softcap (float, optional): the logits become ``softcap * tanh(logits / softcap)`` before the
            temperature divides them (Gemma 2's final-logit softcapping).
        backend (str, optional): the compute backend, as in :func:`xent.cross_entropy`.

    Returns:
        the log-probabilities, shape :math:`(...)` (float32 for half-precision inputs), and with
        ``return_entropy`` the entropies of the same shape. Both are 0 on ignored tokens.

    Examples::

        >>> hidden = torch.randn(2, 16, 64, requires_grad=True)
        >>> head = torch.randn(1000, 64, requires_grad=True)
        >>> tokens = torch.randint(0, 1000, (2, 16))
        >>> logp, entropy = xent.token_logprobs(hidden, head, tokens, temperature=0.7, return_entropy=True)
        >>> (-(logp * torch.randn(2, 16)).sum() - 0.01 * entropy.sum()).backward()   # a policy-gradient step
    """
    if dtensor.is_dtensor(input, linear_weight, linear_bias, target):  # tensor-parallel heads: xent/dtensor.py
        if softcap is not None:
            raise NotImplementedError("token_logprobs: softcap with a DTensor head")
        options = dict(
            temperature=temperature,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            memory_budget=memory_budget,
            backend=backend,
        )
        return dtensor.token_logprobs(token_logprobs, input, linear_weight, target, linear_bias, options)
    t = check_temperature(temperature)
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
    )
    if isinstance(described, ThroughLogits):
        raise ValueError("token_logprobs: target must hold token ids (class indices) and linear_weight must be (V, H)")
    problem, input, linear_weight, linear_bias = described
    problem = with_backend(problem, backend)
    if not return_entropy:  # logprob = -(the per-token linear cross-entropy), at the temperature
        loss, _ = linear_ops.linear_cross_entropy(problem, input, linear_weight, linear_bias, problem.target, None)
        return -loss.reshape(target.shape)
    logprobs, entropy = rl_ops.linear_token_logprobs(problem, input, linear_weight, linear_bias)
    return logprobs.reshape(target.shape), entropy.reshape(target.shape)


def token_logprobs_from_logits(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` for logits already at hand, shape :math:`(..., V)`: xent's fused
    cross-entropy per token (float32 results for half-precision logits, as token_logprobs). A temperature
    other than 1 divides the logits in fp32 inside the pass (no copy, no half-precision rounding).
    ``backend`` as in :func:`xent.cross_entropy`."""
    if dtensor.is_dtensor(logits, target):  # vocab-parallel or row-split logits: xent/dtensor.py
        options = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy)
        options.update(backend=backend)
        return dtensor.token_logprobs_from_logits(token_logprobs_from_logits, logits, target, options)
    t = check_temperature(temperature)
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
    if not return_entropy:  # the per-row loss in the compute dtype (not rounded to bf16 first)
        loss, _ = ce_ops.cross_entropy(replace(problem, output_dtype=problem.compute_dtype), flat, flat_target, None)
        return -loss.reshape(target.shape)
    logprobs, entropy = rl_ops.token_logprobs_from_logits(flat, flat_target, problem.options)
    return logprobs.reshape(target.shape), entropy.reshape(target.shape)
