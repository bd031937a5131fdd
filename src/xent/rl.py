"""Token log-probabilities (and entropies) for RL fine-tuning (GRPO, PPO), without the logits.

    logprob_i = log_softmax((h_i @ W.T + b) / T)[y_i]        entropy_i = -sum_j p_ij log p_ij

`token_logprobs` takes the hidden states and the head; the log-probabilities come from xent's fused
linear cross-entropy (logprob = -cross-entropy of one token, 'none' reduction), so the logits are never
materialized and the gradient is exact, on every backend. The temperature divides the hidden states and
the bias, not the logits: (h W^T + b) / T = (h / T) W^T + b / T, which costs O(tokens x hidden), not
O(tokens x vocabulary). The entropy, on request, is one more chunked pass over the logits (recomputed
chunk by chunk with the head's matmul, in forward and again in backward), with plain torch ops.

Ignored tokens (target == ignore_index, e.g. the prompt or padding) get log-probability 0, entropy 0
and no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .functional import cross_entropy
from .linear import linear_cross_entropy

# Bytes of fp32 logits per chunk of the entropy pass (the workspace the row statistics are taken in).
ENTROPY_CHUNK_BYTES = 64 << 20


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
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Log-probability of each chosen token under ``softmax((input @ linear_weight.T + linear_bias) / T)``.

    Args:
        input (Tensor): hidden states, shape :math:`(..., H)`.
        linear_weight (Tensor): the head, :math:`(V, H)`; linear_bias (Tensor, optional): :math:`(V,)`.
        target (Tensor): the chosen token ids, shape :math:`(...)`; ``ignore_index`` marks tokens to skip.
        temperature (float): the sampling temperature T > 0.
        return_entropy (bool): also return each token's entropy (differentiable too).
        memory_budget (int, optional): bytes of one chunk of logits, as in :func:`xent.linear_cross_entropy`.

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
    t = _check_temperature(temperature)
    scaled_input = input / t if t != 1.0 else input
    scaled_bias = linear_bias / t if linear_bias is not None and t != 1.0 else linear_bias
    logprobs = -linear_cross_entropy(
        scaled_input,
        linear_weight,
        target,
        linear_bias=scaled_bias,
        reduction="none",
        ignore_index=ignore_index,
        memory_budget=memory_budget,
        output_dtype=torch.float32 if input.dtype != torch.float64 else torch.float64,
    )
    if not return_entropy:
        return logprobs
    rows = scaled_input.reshape(math.prod(scaled_input.shape[:-1]), scaled_input.shape[-1])
    valid = (target != ignore_index).reshape(-1)
    entropy = _LinearEntropy.apply(rows, linear_weight, scaled_bias, valid, memory_budget)
    return logprobs, entropy.reshape(target.shape)


def token_logprobs_from_logits(
    logits: Tensor, target: Tensor, *, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`token_logprobs` for logits already at hand, shape :math:`(..., V)`: xent's fused
    cross-entropy per token. A temperature other than 1 divides a copy of the logits."""
    t = _check_temperature(temperature)
    flat = logits.reshape(math.prod(logits.shape[:-1]), logits.shape[-1])
    flat = flat / t if t != 1.0 else flat
    logprobs = -cross_entropy(flat, target.reshape(-1), reduction="none", ignore_index=ignore_index)
    logprobs = logprobs.reshape(target.shape)
    if not return_entropy:
        return logprobs
    valid = (target != ignore_index).reshape(-1)
    entropy = _LogitsEntropy.apply(flat, valid)
    return logprobs, entropy.reshape(target.shape)


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


def _entropy_chunk_rows(num_rows: int, vocab: int, memory_budget: int | None) -> int:
    budget = memory_budget or ENTROPY_CHUNK_BYTES
    return max(1, min(num_rows, budget // (4 * max(vocab, 1))))


def _entropy_rows(chunks, num_rows: int, valid: Tensor, dtype: torch.dtype, device) -> Tensor:
    out = torch.zeros(num_rows, dtype=dtype, device=device)
    for r0, r1, _, z, mean_z in chunks:
        out[r0:r1] = torch.logsumexp(z, 1) - mean_z
    return torch.where(valid, out, 0)


def _entropy_gradients(chunks, upstream: Tensor):
    """(r0, r1, d entropy / d logits) per chunk, times the upstream gradient: -p (z - E_p[z]) g, in place."""
    for r0, r1, p, z, mean_z in chunks:
        yield r0, r1, p.mul_(z.sub_(mean_z.unsqueeze(1))).mul_(-upstream[r0:r1].unsqueeze(1))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _LinearEntropy(torch.autograd.Function):
    """Entropy of softmax(x W^T + b) per row, chunk by chunk (fp32 math, matmuls in the input dtype).

    H = lse - E_p[z];  dH/dz_j = -p_j (z_j - E_p[z]). Backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, x, w, b, valid, memory_budget):
        ctx.save_for_backward(x, w, b, valid)
        ctx.memory_budget = memory_budget
        chunks = _linear_chunks(x, w, b, memory_budget)
        return _entropy_rows(chunks, x.shape[0], valid, _compute_dtype(x), x.device)

    @staticmethod
    def backward(ctx, grad_entropy):
        x, w, b, valid = ctx.saved_tensors
        upstream = torch.where(valid, grad_entropy, 0)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gx = torch.zeros_like(x) if want_x else None
        gw = torch.zeros(w.shape, dtype=upstream.dtype, device=w.device) if want_w else None
        gb = torch.zeros(w.shape[0], dtype=upstream.dtype, device=w.device) if want_b and b is not None else None
        for r0, r1, gz in _entropy_gradients(_linear_chunks(x, w, b, ctx.memory_budget), upstream):
            gz_in = gz.to(x.dtype)  # the two gradient matmuls in the input dtype, as the logits' matmul
            if gx is not None:
                gx[r0:r1] = gz_in @ w
            if gw is not None:
                gw += (gz_in.T @ x[r0:r1]).to(gw.dtype)
            if gb is not None:
                gb += gz.sum(0)
        return (gx, gw.to(w.dtype) if gw is not None else None, gb.to(b.dtype) if gb is not None else None, None, None)


class _LogitsEntropy(torch.autograd.Function):
    """Entropy of softmax(z) per row of ready logits, chunk by chunk; the gradient is the only big buffer."""

    @staticmethod
    def forward(ctx, logits, valid):
        ctx.save_for_backward(logits, valid)
        return _entropy_rows(_logits_chunks(logits), logits.shape[0], valid, _compute_dtype(logits), logits.device)

    @staticmethod
    def backward(ctx, grad_entropy):
        logits, valid = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for r0, r1, gz in _entropy_gradients(_logits_chunks(logits), torch.where(valid, grad_entropy, 0)):
            grad[r0:r1] = gz
        return grad, None


def _linear_chunks(x, w, b, memory_budget):
    """(r0, r1, softmax p, logits z, E_p[z]) per chunk of rows, in fp32 (fp64 for fp64 inputs)."""
    step = _entropy_chunk_rows(x.shape[0], w.shape[0], memory_budget)
    for r0 in range(0, x.shape[0], step):
        r1 = min(x.shape[0], r0 + step)
        yield _softmax_chunk(r0, r1, torch.nn.functional.linear(x[r0:r1], w, b).to(_compute_dtype(x)))


def _logits_chunks(logits):
    step = _entropy_chunk_rows(logits.shape[0], logits.shape[1], None)
    for r0 in range(0, logits.shape[0], step):
        r1 = min(logits.shape[0], r0 + step)
        yield _softmax_chunk(r0, r1, logits[r0:r1].to(_compute_dtype(logits), copy=True))  # never the caller's


def _softmax_chunk(r0, r1, z):
    p = torch.softmax(z, 1)
    return r0, r1, p, z, (p * z).sum(1)
