"""Fused linear + cross-entropy: the loss of a language-model head without ever holding its logits.

For each chunk of tokens the logits chunk (tokens x vocabulary) is computed by one matmul into a
workspace, the row kernel (kernels/rows.py) turns it into the loss and, in place, into the gradient of
the logits, and two more matmuls fold that into the gradients of the input and of the head's weight
(accumulated in fp32) before the next chunk overwrites the workspace (kernels/linear.py). Peak extra
memory is one chunk.

With a scalar reduction ('mean'/'sum') this happens in forward and backward only scales the gradients by
the upstream gradient. For reduction='none' the upstream gradient differs per token, so forward only
computes losses and backward recomputes the chunks (one extra matmul).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dtensor
from .functional import cross_entropy
from .ops import linear as linear_ops
from .problems import TokenStatistics
from .validation.cross_entropy import ThroughLogits, check_backend, linear_cross_entropy_problem, with_backend


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    options=None,
    memory_budget: int | None = None,
    output_dtype: torch.dtype | None = None,
    return_stats: str | Sequence[str] | None = None,
    backend: str | None = None,
    memory_mode: str = "auto",
    logits_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""``cross_entropy(linear(input, linear_weight, linear_bias), target)`` without materializing the logits.

    Extends :func:`torch.nn.functional.linear_cross_entropy` (torch 2.13): code written for it runs
    unchanged. Unlike torch's chunked path, every option is kept: class weights, ignore_index, label
    smoothing and ``reduction='none'``, plus ``z_loss`` and ``softcap``; double backward works.

    Args:
        input (Tensor): hidden states, shape :math:`(..., H)` (any leading dimensions).
        linear_weight (Tensor): the head's weight, shape :math:`(V, H)`.
        target (Tensor): class indices, shape :math:`(...)` (``input``'s leading dimensions).
        linear_bias (Tensor, optional): the head's bias, shape :math:`(V,)`.
        weight (Tensor, optional): a weight per class, shape :math:`(V,)`.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``.
        ignore_index (int, optional): target value to skip; ``None`` (the default) means -100, as torch.
            Class-index targets only: with probability targets an explicit one raises RuntimeError, as
            torch's.
        label_smoothing (float): in [0, 1], as in :func:`xent.cross_entropy`.
        z_loss (float): adds ``z_loss * lse**2`` per non-ignored token (unweighted; 'mean' divides by the
            same denominator as the cross-entropy).
        softcap (float, optional): logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        options: torch's ``LinearCrossEntropyOptions``; only ``batch_chunk_size`` is used (tokens per chunk).
        memory_budget (int, optional): bytes for one chunk of logits (fp32; bf16/fp16 heads on the Triton
            backend keep their own dtype); default 1/16 of the full logits, clamped to [16 MiB, 256 MiB],
            or on CUDA, when the head's gradient is wanted, up to its fp32 accumulator's size (V x H x 4
            bytes, at most 4 GiB), rounded to 128-row tiles. The result does not depend on it beyond
            rounding.
        memory_mode (str): how the gradients are computed when the head's gradient is wanted:
            ``'fast'``, one pass over chunks of rows (3 matmuls; a half-precision head whose tokens take
            more than one chunk keeps an fp32 copy of the weight gradient, V x H x 4 bytes); ``'lean'``,
            that pass for the input's gradient, then vocabulary slabs for the weight's (4 matmuls; the
            weight gradient accumulated in fp32 over all tokens, memory beyond the returned gradients about
            two chunks of 1/64 of the logits); ``'auto'`` (default): ``'lean'`` where ``'fast'`` would keep
            the fp32 copy, on the CPU; ``'fast'`` otherwise (on a GPU until measured there).
        logits_dtype (torch.dtype, optional): ``torch.float32`` keeps a bf16/fp16 head's logits in fp32:
            the GEMM's fp32 accumulator goes to the softmax without being rounded to the head's dtype
            (docs/precision.md). ``None`` (default) or the head's dtype: rounded to it, as
            ``F.linear`` followed by ``F.cross_entropy`` computes them.
        output_dtype (torch.dtype, optional): dtype of the returned loss; default the input's (as torch).
            ``torch.float32`` keeps a bf16 model's loss unrounded (it is computed in fp32 either way).
        return_stats (str or sequence of str): per-token statistics to return as well, from the same pass
            (``'lse'``, ``'logprob'``, ``'entropy'``, ``'z_loss'``, ``'argmax'``, ``'correct'``; see
            :class:`xent.TokenStatistics`); the call then returns ``(loss, stats)``, each statistic of
            ``target``'s shape. Class-index targets with a 2-D head only.
        backend (str): the compute backend for this call: ``'torch'``, ``'triton'`` (any
            registered name) or None: ``XENT_BACKEND``, else the automatic choice (docs/backends.md).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``; with bf16/fp16 parameters the
    weight and bias gradients are accumulated in fp32 and cast once. Probability targets and K-dim
    weights ``(C, d1, ..., H)`` (accepted by torch) are computed through the materialized logits.

    Shape:
        - Output: scalar, or ``target``'s shape for ``reduction='none'``.

    Examples::

        >>> hidden = torch.randn(4, 128, 64, requires_grad=True)      # (batch, tokens, H)
        >>> lm_head = torch.randn(32000, 64, requires_grad=True)        # (V, H)
        >>> labels = torch.randint(0, 32000, (4, 128))
        >>> loss = xent.linear_cross_entropy(hidden, lm_head, labels, label_smoothing=0.1)
        >>> loss.backward()
    """
    if dtensor.is_dtensor(input, linear_weight, linear_bias):  # tensor parallel heads: xent/dtensor.py
        return dtensor.linear_cross_entropy(
            linear_cross_entropy,
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            dict(
                reduction=reduction,
                ignore_index=-100 if ignore_index is None else ignore_index,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                softcap=softcap,
                options=options,
                memory_budget=memory_budget,
                output_dtype=output_dtype,
                return_stats=return_stats,
                backend=backend,
                memory_mode=memory_mode,
                logits_dtype=logits_dtype,
            ),
        )
    backend = check_backend(backend, "linear_cross_entropy")
    described = linear_cross_entropy_problem(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        options,
        memory_budget,
        output_dtype,
        return_stats,
        memory_mode=memory_mode,
        logits_dtype=logits_dtype,
    )
    if isinstance(described, ThroughLogits):
        return _through_logits(with_backend(described, backend))
    problem, input, linear_weight, linear_bias = described
    problem = with_backend(problem, backend)
    loss, stats = linear_ops.linear_cross_entropy(problem, input, linear_weight, linear_bias, target, weight)
    if return_stats is None:
        return loss
    return loss, TokenStatistics.of(stats, problem.output_shape)


def _through_logits(d: ThroughLogits) -> Tensor:
    """Probability targets and K-dim heads, which torch also accepts: via the materialized logits."""
    hidden = d.input.shape[-1]
    x, w, b = d.input, d.linear_weight, d.linear_bias
    if d.logits_dtype is not None:
        x, w, b = (t.to(d.logits_dtype) if t is not None else t for t in (x, w, b))
    bias = b.reshape(-1) if b is not None else None
    # not -1: ambiguous when H = 0 (fp32 logits of a half head: F.linear of the exactly upcast operands)
    logits = F.linear(x, w.reshape(math.prod(w.shape[:-1]), hidden), bias)
    lead = d.input.shape[:-1]
    o = d.options
    names = ("ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "backend")
    options = {"weight": d.weight, **{name: getattr(o, name) for name in names}}
    if len(lead) > 1 and d.linear_weight.dim() == 2:  # probability targets over (..., V): rows of (V,)
        rows, vocab = math.prod(lead), logits.shape[-1]  # not -1: ambiguous when V = 0
        loss = cross_entropy(logits.reshape(rows, vocab), d.target.reshape(rows, vocab), **options)
        loss = loss.reshape(lead) if o.reduction == "none" else loss
    else:
        if d.linear_weight.dim() > 2:  # (N, C * d...) -> (N, C, d...), torch's K-dim convention
            logits = logits.reshape(*lead, *d.linear_weight.shape[:-1])
        loss = cross_entropy(logits, d.target, **options)
    return loss.to(d.output_dtype) if d.output_dtype is not None else loss
