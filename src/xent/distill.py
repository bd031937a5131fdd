r"""Knowledge-distillation losses of a linear head, without ever materializing the student's logits.

The student is given as hidden states and its LM head; its logits (tokens x vocabulary) are computed one
chunk of tokens at a time, turned into the loss and the gradient of the logits in place, and folded into
the gradients of the hidden states and the head before the next chunk reuses the memory (as
:func:`xent.linear_cross_entropy` does). The teacher comes in one of three forms:

* :class:`TeacherHead` — its own hidden states and head (any hidden size, the same vocabulary): its logits
  are computed chunk by chunk too;
* :class:`TeacherLogits` — its logits, ready;
* :class:`TeacherTopK` — sparse: the indices and log-probabilities of its top-k tokens.

With :math:`s = z_s / T`, :math:`t = z_t / T` (temperature ``T``), :math:`p_s = \mathrm{softmax}(s)`,
:math:`p_t = \mathrm{softmax}(t)`, each counted token's loss is

* ``'kl'`` (forward): :math:`\sum_v p_t (\log p_t - \log p_s)`;
* ``'reverse_kl'``: :math:`\sum_v p_s (\log p_s - \log p_t)`;
* ``'jsd'`` (generalised Jensen-Shannon, Liger Kernel's convention):
  :math:`\beta\,\mathrm{KL}(p_t \| m) + (1 - \beta)\,\mathrm{KL}(p_s \| m)` with
  :math:`m = \beta p_t + (1 - \beta) p_s`, for :math:`0 < \beta < 1`; :math:`\beta = 0` is the forward KL
  and :math:`\beta = 1` the reverse KL (as Liger defines them; the mixture formula itself tends to 0 at
  both ends);
* top-k teacher (forward KL only): :math:`\sum_k q_k (\log q_k - \log p_s[i_k])` with
  :math:`q = \exp(\text{logprobs})` used as given (not renormalised over the k tokens, not divided by
  ``T``: pass the teacher's log-probabilities at the temperature you want).

No :math:`T^2` factor is applied (multiply the loss by ``T**2`` for Hinton's scaling). A term whose
probability weight is exactly 0 (e.g. a ``-inf`` teacher logit) counts as 0, its limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import dtensor
from .ops import distill as distill_ops
from .validation.cross_entropy import check_backend, with_backend
from .validation.distill import linear_distillation_problem


@dataclass(frozen=True, eq=False)
class TeacherHead:
    """The teacher as hidden states and LM head: its logits are ``input @ weight.T + bias``.

    Args:
        input (Tensor): the teacher's hidden states, :math:`(..., H_t)`, the student's leading dimensions.
        weight (Tensor): its head, :math:`(V, H_t)` (the student's vocabulary).
        bias (Tensor, optional): :math:`(V,)`.
    """

    input: Tensor
    weight: Tensor
    bias: Tensor | None = None


@dataclass(frozen=True, eq=False)
class TeacherLogits:
    """The teacher's logits, :math:`(..., V)`: the student's leading dimensions and vocabulary."""

    logits: Tensor


@dataclass(frozen=True, eq=False)
class TeacherTopK:
    """A sparse teacher: the token ids :math:`(..., k)` (int64) and their log-probabilities :math:`(..., k)`
    (e.g. ``torch.topk(teacher_logits.log_softmax(-1), k)``). Supports ``divergence='kl'`` only. Entries
    with log-probability ``-inf`` (padding, when fewer than k tokens are kept) contribute nothing; repeated
    ids add up."""

    indices: Tensor
    logprobs: Tensor


Teacher = TeacherHead | TeacherLogits | TeacherTopK


def linear_distillation_loss(
    input: Tensor,
    linear_weight: Tensor,
    teacher: Teacher,
    target: Tensor | None = None,
    *,
    linear_bias: Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    memory_budget: int | None = None,
    output_dtype: torch.dtype | None = None,
    backend: str | None = None,
    memory_mode: str = "auto",
    logits_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Distillation loss of the student ``linear(input, linear_weight, linear_bias)`` towards ``teacher``,
    without materializing the student's logits.

    See the module's documentation (:mod:`xent.distill`) for the divergences' formulas.

    Args:
        input (Tensor): the student's hidden states, :math:`(..., H)`.
        linear_weight (Tensor): the student's head, :math:`(V, H)`.
        teacher (TeacherHead | TeacherLogits | TeacherTopK): the teacher. It gets no gradient (its tensors
            are detached).
        target (Tensor, optional): token ids :math:`(...)`; tokens equal to ``ignore_index`` (prompt,
            padding) are skipped: loss 0, no gradient, not counted by ``'mean'``. Only compared with
            ``ignore_index``. Default: every token counts.
        linear_bias (Tensor, optional): the student's bias, :math:`(V,)`.
        divergence (str): ``'kl'`` (forward, KL(teacher || student)) | ``'reverse_kl'`` | ``'jsd'``.
        beta (float): the generalised JSD's :math:`\beta \in [0, 1]` (``divergence='jsd'`` only).
        temperature (float): divides both the student's and the teacher's logits. Default: 1.
        ignore_index (int): the ``target`` value of skipped tokens. Default: -100.
        reduction (str): ``'none'`` (per token) | ``'sum'`` | ``'mean'`` (over counted tokens; NaN when
            none counts, as torch's 0 / 0) | ``'batchmean'`` (the sum over the number of tokens, counted or
            not, as ``F.kl_div(..., reduction='batchmean')`` on ``(tokens, V)``). Default: ``'mean'``.
        memory_budget (int, optional): bytes of one chunk's fp32 workspaces together (2 to 4 buffers of
            chunk x V: the student's logits, the teacher's, scratch); default: each buffer 1/16 of the full
            logits within [16 MiB, 256 MiB]. The result does not depend on it beyond rounding.
        memory_mode (str): how the gradients are computed when the head's gradient is wanted, as in
            :func:`xent.linear_cross_entropy`: ``'fast'`` (one pass over chunks of tokens; a half-precision
            head keeps an fp32 copy of its weight gradient, V x H x 4 bytes), ``'lean'`` (that pass for the
            input's gradient, then vocabulary slabs for the head's: one more matmul, memory beyond the
            returned gradients about 1/64 of the logits and one slab's accumulator), ``'auto'`` (default:
            ``'lean'`` where ``'fast'`` would keep the fp32 copy, on the CPU).
        logits_dtype (torch.dtype, optional): ``torch.float32`` keeps bf16/fp16 heads' logits (the
            student's and a teacher head's) in fp32, the GEMMs' fp32 accumulators never rounded to half;
            ``None`` (default): rounded to the heads' dtype, as ``F.linear`` rounds them (docs/precision.md).
        output_dtype (torch.dtype, optional): of the returned loss; default the input's (float32 under
            autocast). The loss is computed in fp32 (fp64 for fp64 inputs) either way.
        backend (str, optional): the compute backend, as in :func:`xent.cross_entropy` (the distillation
            row math is the torch backend's on every backend today).

    Gradients flow to ``input``, ``linear_weight`` and ``linear_bias``; with bf16/fp16 parameters the
    matmuls run in that dtype (fp32 accumulation) and the weight and bias gradients are summed in fp32 and
    cast once.

    Shape:
        - Output: scalar, or the input's leading dimensions :math:`(...)` for ``reduction='none'``.

    Examples::

        >>> hidden = torch.randn(4, 64, 256, requires_grad=True)      # student (batch, tokens, H)
        >>> head = torch.randn(32000, 256, requires_grad=True)
        >>> teacher = TeacherHead(torch.randn(4, 64, 1024), torch.randn(32000, 1024))
        >>> labels = torch.randint(0, 32000, (4, 64))                  # -100 on prompt/padding
        >>> loss = linear_distillation_loss(hidden, head, teacher, labels, divergence="jsd", temperature=2.0)
        >>> loss.backward()
    """
    if isinstance(teacher, TeacherHead):
        kind, tensors = "head", dict(input=teacher.input, weight=teacher.weight, bias=teacher.bias)
    elif isinstance(teacher, TeacherLogits):
        kind, tensors = "logits", dict(logits=teacher.logits)
    elif isinstance(teacher, TeacherTopK):
        kind, tensors = "topk", dict(indices=teacher.indices, logprobs=teacher.logprobs)
    else:
        raise TypeError(
            f"linear_distillation_loss(): teacher must be a TeacherHead, TeacherLogits or TeacherTopK, "
            f"not {type(teacher).__name__}"
        )
    if dtensor.is_dtensor(input, linear_weight, linear_bias, target, *tensors.values()):
        raise NotImplementedError("linear_distillation_loss: DTensor inputs are not supported")
    backend = check_backend(backend, "linear_distillation_loss")
    problem, input, linear_weight, linear_bias = linear_distillation_problem(
        input,
        linear_weight,
        kind,
        tensors,
        target,
        linear_bias,
        divergence,
        beta,
        temperature,
        ignore_index,
        reduction,
        memory_budget,
        output_dtype,
        memory_mode=memory_mode,
        logits_dtype=logits_dtype,
    )
    return distill_ops.linear_distillation(with_backend(problem, backend), input, linear_weight, linear_bias)


class LinearDistillationLoss(nn.Module):
    r"""Module form of :func:`linear_distillation_loss`: holds the options; the student's head and the
    teacher are given to ``forward``.

    Args:
        divergence, beta, temperature, ignore_index, reduction, memory_budget, backend, memory_mode, logits_dtype: as
            :func:`linear_distillation_loss`.

    Examples::

        >>> criterion = LinearDistillationLoss(divergence="reverse_kl", temperature=2.0)
        >>> loss = criterion(hidden, student.lm_head.weight, TeacherLogits(teacher_logits), labels)
    """

    backend: str | None = None  # (class defaults: modules pickled before the attributes existed load)
    memory_mode: str = "auto"
    logits_dtype: torch.dtype | None = None

    def __init__(
        self,
        divergence: str = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        memory_budget: int | None = None,
        backend: str | None = None,
        memory_mode: str = "auto",
        logits_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.memory_budget = memory_budget
        self.backend = backend
        self.memory_mode = memory_mode
        self.logits_dtype = logits_dtype

    def forward(
        self,
        input: Tensor,
        linear_weight: Tensor,
        teacher: Teacher,
        target: Tensor | None = None,
        linear_bias: Tensor | None = None,
    ) -> Tensor:
        return linear_distillation_loss(
            input,
            linear_weight,
            teacher,
            target,
            linear_bias=linear_bias,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            memory_budget=self.memory_budget,
            backend=self.backend,
            memory_mode=self.memory_mode,
            logits_dtype=self.logits_dtype,
        )

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "jsd" else ""
        return (
            f"divergence={self.divergence!r}{beta}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"
        )
