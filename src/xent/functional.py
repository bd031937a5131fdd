"""xent's functional API: drop-in replacements for torch.nn.functional.cross_entropy and nll_loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import dtensor
from .checks import check_target_range
from .ops import cross_entropy as ce_ops
from .problems import TokenStatistics, _as_3d, autocast_dtype, compute_dtype
from .validation.cross_entropy import (
    as_index,
    check_backend,
    check_float_input,
    check_index_target,
    check_index_weight,
    check_tensor,
    cross_entropy_problem,
    loss_dtype,
    resolve_reduction,
    with_backend,
)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: str | Sequence[str] | None = None,
    backend: str | None = None,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""Cross-entropy between logits and targets; the same signature, result and errors as
    :func:`torch.nn.functional.cross_entropy`, computed by xent's fused kernel.

    The loss and its gradient come from one read of the logits per cache-sized chunk of rows; backward
    scales the gradient buffer in place. Peak extra memory is the gradient itself (torch: about three
    times the logits). bf16/fp16 inputs are computed and reduced in fp32, so the result is *more*
    accurate than torch's, which accumulates in half precision.

    Args:
        input (Tensor): unnormalized scores (logits), shape :math:`(C)`, :math:`(N, C)` or
            :math:`(N, C, d_1, ..., d_K)`; float32, float64, bfloat16 or float16.
        target (Tensor): class indices in :math:`[0, C)` (int64 or uint8, shape :math:`()`, :math:`(N)` or
            :math:`(N, d_1, ..., d_K)`), or class probabilities of the same shape as ``input``.
        weight (Tensor, optional): a weight per class, shape :math:`(C)`.
        size_average, reduce: deprecated; mapped to ``reduction`` with torch's warning.
        ignore_index (int): a target value that contributes neither to the loss nor to the 'mean'
            denominator (class-index targets only). Default: -100.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        label_smoothing (float): in [0, 1]; mixes the target with the uniform distribution. With class
            weights, the uniform part is weighted per class, as torch does (not by the target's weight).
        z_loss (float, keyword-only): adds ``z_loss * lse**2`` per non-ignored row (lse = log-sum-exp of
            its logits), unweighted; 'mean' divides by the same denominator as the cross-entropy.
        softcap (float, keyword-only): replaces the logits by ``softcap * tanh(logits / softcap)`` first.
        return_stats (str or sequence of str, keyword-only): per-token statistics to return as well, from
            the same pass over the logits: any of ``'lse'``, ``'logprob'``, ``'entropy'``, ``'z_loss'``,
            ``'argmax'``, ``'correct'`` (see :class:`xent.TokenStatistics`). The call then returns
            ``(loss, stats)``. Default: None (the loss alone, computed exactly as without the argument).
        backend (str, keyword-only): the compute backend for this call: ``'torch'``, ``'triton'`` (any
            registered name) or None: ``XENT_BACKEND``, else the automatic choice (docs/backends.md).
        inplace (bool, keyword-only): write the gradient over ``input`` instead of a buffer of its own (no
            memory beyond the logits). The logits are consumed: after forward (fp16: after backward) they
            hold the gradient, and their version counter is bumped, so any other use of them saved for
            backward raises autograd's in-place error. Not for leaf logits, gradients of the target or
            weights, or a second backward. Under torch.compile / torch.func the logits are left unchanged.

    Shape:
        - Output: scalar for 'mean'/'sum'; for 'none' the target's shape without the class dimension:
          :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`.
        - Statistics: each of the 'none' output's shape, whatever the reduction.

    Examples::

        >>> logits = torch.randn(3, 5, requires_grad=True)
        >>> target = torch.tensor([1, 0, 4])
        >>> loss = xent.cross_entropy(logits, target, label_smoothing=0.1)
        >>> loss.backward()
        >>> probs = torch.randn(3, 5).softmax(dim=1)
        >>> xent.cross_entropy(logits, probs, reduction="none").shape
        torch.Size([3])
        >>> loss, stats = xent.cross_entropy(logits, target, return_stats=("correct", "entropy"))
        >>> accuracy = stats.correct.float().mean()
    """
    reduction = resolve_reduction(reduction, size_average, reduce)
    options = dict(
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_stats=return_stats,
    )
    if dtensor.is_dtensor(input, target, weight):
        if inplace:  # DTensor's to_local is a view made inside an autograd Function: autograd forbids
            # writing over it (the vocab-parallel loss on the local shards takes inplace=True)
            raise NotImplementedError(
                "cross_entropy(inplace=True) with DTensor inputs; pass the local shards to "
                "xent.distributed.vocab_parallel_cross_entropy(..., inplace=True)"
            )  # tensor or data parallel layouts: xent/dtensor.py
        return dtensor.cross_entropy(
            cross_entropy, input, target, weight, reduction=reduction, backend=backend, **options
        )
    backend = check_backend(backend, "cross_entropy")
    problem = cross_entropy_problem(input, target, weight, reduction=reduction, **options)
    loss, stats = ce_ops.cross_entropy(with_backend(problem, backend), input, target, weight, inplace=bool(inplace))
    if return_stats is None:
        return loss
    return loss, TokenStatistics.of(stats, problem.output_shape)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood of log-probabilities; the same signature, result and errors as
    :func:`torch.nn.functional.nll_loss`.

    ``loss_i = -weight[y_i] * input[i, y_i]`` for non-ignored rows; 'mean' divides by the sum of
    ``weight[y_i]`` over them. bf16/fp16 are reduced in fp32.

    Args:
        input (Tensor): log-probabilities, shape :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        target (Tensor): class indices (int64 or uint8), shape :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`.
        weight (Tensor, optional): a weight per class, shape :math:`(C)`, same dtype as ``input``.
        size_average, reduce: deprecated; mapped to ``reduction`` with torch's warning.
        ignore_index (int): a target value that is skipped. Default: -100.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.

    Shape:
        - Output: scalar for 'mean'/'sum'; the target's shape for 'none'.

    Examples::

        >>> log_probs = torch.randn(3, 5).log_softmax(dim=1).requires_grad_()
        >>> xent.nll_loss(log_probs, torch.tensor([1, 0, 4])).backward()
    """
    reduction = resolve_reduction(reduction, size_average, reduce)
    fn = "nll_loss"
    if dtensor.is_dtensor(input, target, weight):
        return dtensor.cross_entropy(
            nll_loss, input, target, weight, reduction=reduction, fn=fn, ignore_index=ignore_index
        )
    check_tensor(input, "input", fn)
    check_tensor(target, "target", fn)
    check_tensor(weight, "weight", fn, optional=True)
    ignore_index = as_index(ignore_index, "ignore_index", fn)
    autocast = autocast_dtype(input.device) is not None
    check_index_target(input, target)
    check_index_weight(input, weight, autocast)
    check_float_input(input, fn)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    check_target_range(target, num_classes, ignore_index)

    # A gather of the target column: autograd's own backward (a scatter) gives the gradient and its
    # derivative, so no custom kernel is needed.
    cd = compute_dtype(input.dtype)
    x = _as_3d(input)
    n, _, d = x.shape
    t = target.reshape(n, 1, d).long()  # uint8 targets compare as int64, as torch (-100 must not wrap)
    valid = t != ignore_index
    index = torch.where(valid, t, 0)
    if num_classes:
        picked = x.gather(1, index).to(cd)
    else:  # no classes, so every target is ignore_index: nothing to pick, still connected to the input
        picked = (x.sum() * 0).to(cd).expand(n, 1, d)
    w_y = weight.to(cd)[index] if weight is not None and num_classes else torch.ones_like(picked)
    w_y = torch.where(valid, w_y, 0)
    loss = torch.where(valid, -w_y * picked, 0)
    if reduction == "none":
        out = loss.reshape(() if input.dim() == 1 else (n,) + tuple(input.shape[2:]))
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / w_y.sum()
    return out.to(loss_dtype(input.dtype, autocast))
