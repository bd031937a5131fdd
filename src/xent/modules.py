"""nn.Module forms of the losses: drop-in for torch.nn.CrossEntropyLoss and torch.nn.NLLLoss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import functional as F
from .linear import linear_cross_entropy
from .validation.cross_entropy import legacy_reduction


class _WeightedLoss(nn.Module):
    """Holds `weight` as a buffer and `reduction` as torch's _WeightedLoss does, so state_dicts match."""

    def __init__(self, weight: Tensor | None, size_average, reduce, reduction: str) -> None:
        super().__init__()
        self.reduction = (
            legacy_reduction(size_average, reduce) if (size_average is not None or reduce is not None) else reduction
        )
        self.register_buffer("weight", weight)
        self.weight: Tensor | None


class CrossEntropyLoss(_WeightedLoss):
    r"""Module form of :func:`xent.cross_entropy`, drop-in for :class:`torch.nn.CrossEntropyLoss`.

    Args:
        weight, size_average, ignore_index, reduce, reduction, label_smoothing: as torch's
            CrossEntropyLoss; see :func:`xent.cross_entropy`.
        z_loss (float, keyword-only): weight of the ``lse**2`` auxiliary term. Default: 0.
        softcap (float, keyword-only): logit soft-capping value. Default: None.
        backend (str, keyword-only): the compute backend, as in :func:`xent.cross_entropy`. Default: None.
        inplace (bool, keyword-only): write the gradient over the input logits (consumed), as in
            :func:`xent.cross_entropy`. Default: False.

    Shape:
        - Input: :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        - Target: class indices of shape :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)`, or class
          probabilities of the input's shape.
        - Output: scalar, or the target's batch shape for ``reduction='none'``.

    ``forward(input, target, *, return_stats=None)``: with ``return_stats`` (per-token statistics, as
    :func:`xent.cross_entropy`), ``(loss, xent.TokenStatistics)``.

    Examples::

        >>> loss_fn = xent.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2, 1, 1]))
        >>> loss.backward()
        >>> loss, stats = loss_fn(torch.randn(4, 3), torch.tensor([0, 2, 1, 1]), return_stats="correct")
    """

    backend: str | None = None  # (class defaults: modules pickled before the attributes existed load)
    inplace: bool = False

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        backend: str | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend
        self.inplace = inplace

    def forward(self, input: Tensor, target: Tensor, *, return_stats: str | Sequence[str] | None = None):
        options = _cross_entropy_options(self)
        return F.cross_entropy(input, target, return_stats=return_stats, inplace=self.inplace, **options)

    def extra_repr(self) -> str:
        extras = [f"z_loss={self.z_loss}"] if self.z_loss else []
        extras += [f"softcap={self.softcap}"] if self.softcap is not None else []
        extras += ["inplace=True"] if self.inplace else []
        return ", ".join(extras + ([f"backend={self.backend!r}"] if self.backend is not None else []))


class NLLLoss(_WeightedLoss):
    r"""Module form of :func:`xent.nll_loss`, drop-in for :class:`torch.nn.NLLLoss`.

    Args:
        weight, size_average, ignore_index, reduce, reduction: as torch's NLLLoss.

    Shape:
        - Input: log-probabilities :math:`(C)`, :math:`(N, C)` or :math:`(N, C, d_1, ..., d_K)`.
        - Target: :math:`()`, :math:`(N)` or :math:`(N, d_1, ..., d_K)` class indices.
        - Output: scalar, or the target's shape for ``reduction='none'``.

    Examples::

        >>> loss_fn = xent.NLLLoss()
        >>> loss = loss_fn(torch.randn(4, 3).log_softmax(1), torch.tensor([0, 2, 1, 1]))
    """

    __constants__ = ["ignore_index", "reduction"]

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class LinearCrossEntropyLoss(_WeightedLoss):
    r"""A linear layer and cross-entropy in one module, drop-in for :class:`torch.nn.LinearCrossEntropyLoss`.

    Owns ``self.linear`` (an :class:`nn.Linear` of ``in_features -> num_classes``), so state_dicts match
    torch's (``linear.weight``, ``linear.bias``, and ``weight`` for class weights). The loss is computed by
    :func:`xent.linear_cross_entropy`, never materializing the logits.

    Args:
        in_features (int): size of each input sample (the hidden size H).
        num_classes (int): number of classes V.
        out_features (tuple): K-dim loss dimensions, as torch (computed through the logits).
        bias (bool): whether ``self.linear`` has a bias. Default: False.
        device, dtype: of the linear layer's parameters.
        weight, reduction, ignore_index, label_smoothing: as :func:`xent.linear_cross_entropy`
            (``ignore_index=None`` means -100, as torch).
        z_loss, softcap, options, memory_budget, backend, memory_mode, logits_dtype: as
            :func:`xent.linear_cross_entropy`.

    Shape:
        - Input: :math:`(..., H)`; target: :math:`(...)` class indices; output: scalar or target's shape.

    ``forward(input, target, *, return_stats=None)``: with ``return_stats`` (per-token statistics, as
    :func:`xent.linear_cross_entropy`), ``(loss, xent.TokenStatistics)``.

    Examples::

        >>> head = xent.LinearCrossEntropyLoss(64, 32000, label_smoothing=0.1)
        >>> loss = head(torch.randn(8, 64), torch.randint(0, 32000, (8,)))
    """

    backend: str | None = None  # (class defaults: modules pickled before the attributes existed load)
    memory_mode: str = "auto"
    logits_dtype: torch.dtype | None = None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        options=None,
        memory_budget: int | None = None,
        backend: str | None = None,
        memory_mode: str = "auto",
        logits_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(weight, None, None, reduction)
        self.in_features, self.num_classes, self.out_features = in_features, num_classes, tuple(out_features)
        self.linear = nn.Linear(
            in_features, num_classes * math.prod(self.out_features), bias=bias, device=device, dtype=dtype
        )
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.z_loss, self.softcap, self.options, self.memory_budget = z_loss, softcap, options, memory_budget
        self.backend, self.memory_mode, self.logits_dtype = backend, memory_mode, logits_dtype

    def forward(self, input: Tensor, target: Tensor, *, return_stats: str | Sequence[str] | None = None):
        shape = (self.num_classes, *self.out_features)
        w = self.linear.weight.reshape(*shape, self.in_features)
        b = self.linear.bias.reshape(shape) if self.linear.bias is not None else None
        return linear_cross_entropy(
            input,
            w,
            target,
            linear_bias=b,
            options=self.options,
            memory_budget=self.memory_budget,
            memory_mode=self.memory_mode,
            logits_dtype=self.logits_dtype,
            return_stats=return_stats,
            **_cross_entropy_options(self),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, out_features={self.out_features}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}"
            + (f", backend={self.backend!r}" if self.backend is not None else "")
            + (f", memory_mode={self.memory_mode!r}" if self.memory_mode != "auto" else "")
            + (f", logits_dtype={self.logits_dtype}" if self.logits_dtype is not None else "")
        )


# What a cross-entropy module passes to its functional, read from its attributes at each call (a user may
# change them between calls).
_CROSS_ENTROPY_OPTIONS = ("weight", "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "backend")


def _cross_entropy_options(module) -> dict:
    return {name: getattr(module, name) for name in _CROSS_ENTROPY_OPTIONS}


__all__ = ["CrossEntropyLoss", "NLLLoss", "LinearCrossEntropyLoss"]
