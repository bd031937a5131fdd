"""Argument checking for the linear distillation losses: the public arguments -> one DistillProblem.

Exception types follow torch's habits: TypeError for an argument of the wrong kind, ValueError for a bad
option value or mismatched batch shapes, RuntimeError for what F.linear / gather would reject (hidden
sizes, dtypes, devices), IndexError (raised by the op, on real tensors) for an out-of-range top-k index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checks import as_index
from ..problems import DIVERGENCES, HALF_DTYPES, REDUCTIONS, DistillProblem, autocast_dtype
from .cross_entropy import (
    as_float,
    check_float_input,
    check_linear,
    check_logits_dtype,
    check_memory_budget,
    check_memory_mode,
    check_same_device,
    check_target_dtype,
    check_tensor,
    resolve_reduction,
    scalar_name,
)

FN = "linear_distillation_loss"


def linear_distillation_problem(
    input,
    linear_weight,
    teacher_kind: str,
    teacher_tensors: dict,
    target,
    linear_bias,
    divergence,
    beta,
    temperature,
    ignore_index,
    reduction,
    memory_budget,
    output_dtype,
    fn: str = FN,
    memory_mode: str = "auto",
    logits_dtype: torch.dtype | None = None,
):
    """(DistillProblem, input, linear_weight, linear_bias): the student's tensors as autocast casts them.

    `teacher_tensors` holds the teacher's fields by name: input/weight/bias ('head'), logits ('logits'),
    indices/logprobs ('topk')."""
    reduction = _check_reduction(reduction)
    if not (isinstance(divergence, str) and divergence in DIVERGENCES):
        raise ValueError(f"{fn}: divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    for name, t, optional in (
        ("input", input, False),
        ("linear_weight", linear_weight, False),
        ("target", target, True),
        ("linear_bias", linear_bias, True),
    ):
        check_tensor(t, name, fn, optional=optional)
    for name, t in teacher_tensors.items():
        check_tensor(t, f"teacher.{name}", fn, optional=name == "bias")
    ignore_index = as_index(ignore_index, "ignore_index", fn)
    beta = as_float(beta, "beta", fn)
    if not 0.0 <= beta <= 1.0:  # also NaN
        raise ValueError(f"{fn}: beta must be in [0, 1], got {beta:g}")
    temperature = as_float(temperature, "temperature", fn)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{fn}: temperature must be a positive finite number, got {temperature:g}")
    memory_budget = check_memory_budget(memory_budget, fn)
    memory_mode = check_memory_mode(memory_mode, fn)
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"{fn}: output_dtype must be a floating point torch.dtype, got {output_dtype!r}")
    # Liger Kernel's convention: the generalised JSD is the forward KL at beta = 0 and the reverse KL at 1
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "kl" if beta == 0.0 else "reverse_kl"

    autocast = autocast_dtype(input.device)
    if autocast is not None:  # as F.linear under autocast: the heads' matmuls in its dtype, the loss fp32
        input, linear_weight, linear_bias = (_autocast(t, autocast) for t in (input, linear_weight, linear_bias))
        if teacher_kind == "head":
            teacher_tensors = {k: _autocast(t, autocast) for k, t in teacher_tensors.items()}
        output_dtype = output_dtype or torch.float32
    check_linear(input, linear_weight, linear_bias)
    requested = logits_dtype
    logits_dtype = check_logits_dtype(logits_dtype, input.dtype, fn)
    if requested == torch.float32 and teacher_kind == "head" and teacher_tensors["input"].dtype in HALF_DTYPES:
        logits_dtype = torch.float32  # an fp32 student over a half-precision teacher head: the teacher's too
    if linear_weight.dim() != 2:
        raise RuntimeError(f"{fn}: linear_weight must be 2-D (V, H), got shape {list(linear_weight.shape)}")
    check_float_input(input, fn)
    lead = tuple(input.shape[:-1])
    num_rows, vocab = math.prod(lead), linear_weight.shape[0]
    if target is not None:
        if tuple(target.shape) != lead:
            raise ValueError(
                f"{fn}: expected target of shape {list(lead)} (input without its last, hidden dimension), "
                f"got {list(target.shape)}"
            )
        check_target_dtype(target)
        check_same_device(target, input, "target")

    fields = dict(input=None, weight=None, bias=None, logits=None, indices=None, logprobs=None)
    if teacher_kind == "head":
        _check_teacher_head(input, vocab, teacher_tensors, fn)
        t_in = teacher_tensors["input"]
        fields.update(input=t_in.reshape(num_rows, t_in.shape[-1]), weight=teacher_tensors["weight"])
        fields.update(bias=teacher_tensors["bias"])
    elif teacher_kind == "logits":
        logits = teacher_tensors["logits"]
        _check_teacher_logits(input, vocab, logits, fn)
        fields.update(logits=logits.reshape(num_rows, vocab))
    else:
        if divergence != "kl":
            raise ValueError(
                f"{fn}: divergence={divergence!r} needs the teacher's whole distribution; a top-k teacher "
                f"supports the forward KL only (divergence='kl', or 'jsd' with beta=0)"
            )
        indices, logprobs = teacher_tensors["indices"], teacher_tensors["logprobs"]
        _check_teacher_topk(input, indices, logprobs, fn)
        k = indices.shape[-1]
        fields.update(indices=indices.reshape(num_rows, k), logprobs=logprobs.reshape(num_rows, k))
    # the teacher gets no gradient: its tensors enter the computation detached
    teacher = {k: t.detach() if t is not None else None for k, t in fields.items()}

    problem = DistillProblem(
        input.reshape(num_rows, input.shape[-1]),  # not -1: ambiguous when H = 0
        linear_weight,
        linear_bias,
        teacher_kind,
        teacher["input"],
        teacher["weight"],
        teacher["bias"],
        teacher["logits"],
        teacher["indices"],
        teacher["logprobs"],
        target.reshape(-1) if target is not None else None,
        divergence,
        beta,
        temperature,
        ignore_index,
        reduction,
        lead,
        output_dtype or input.dtype,
        memory_budget,
        memory_mode=memory_mode,
        logits_dtype=logits_dtype,
    )
    return problem, input, linear_weight, linear_bias


def _check_reduction(reduction) -> str:
    if isinstance(reduction, str) and reduction == "batchmean":
        return reduction
    try:
        return resolve_reduction(reduction)
    except ValueError:
        raise ValueError(f"{reduction} is not a valid value for reduction (one of {', '.join(REDUCTIONS)})") from None


def _check_teacher_head(input: Tensor, vocab: int, teacher: dict, fn: str) -> None:
    t_in, t_w, t_b = teacher["input"], teacher["weight"], teacher["bias"]
    if t_w.dim() != 2:
        raise RuntimeError(f"{fn}: teacher.weight must be 2-D (V, H_teacher), got shape {list(t_w.shape)}")
    if t_in.dim() == 0 or t_in.shape[-1] != t_w.shape[1]:
        raise RuntimeError(
            f"{fn}: expected equal teacher.input and teacher.weight last dimensions (in_features), got "
            f"{list(t_in.shape)} and {list(t_w.shape)}"
        )
    if t_w.shape[0] != vocab:
        raise ValueError(f"{fn}: the teacher's head has {t_w.shape[0]} classes, the student's {vocab}")
    if tuple(t_in.shape[:-1]) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: teacher.input's leading dimensions {list(t_in.shape[:-1])} differ from the student's "
            f"{list(input.shape[:-1])} (one teacher row per token)"
        )
    if t_b is not None and tuple(t_b.shape) != (vocab,):
        raise RuntimeError(f"{fn}: expected teacher.bias shape ({vocab},), got {tuple(t_b.shape)}")
    check_float_input(t_in, fn)
    for name, t in (("teacher.weight", t_w), ("teacher.bias", t_b)):
        if t is not None and t.dtype != t_in.dtype:
            raise RuntimeError(
                f"{fn}: expected teacher.input and {name} to have the same dtype, but got: "
                f"{scalar_name(t_in.dtype)} != {scalar_name(t.dtype)}"
            )
    for name, t in (("teacher.input", t_in), ("teacher.weight", t_w), ("teacher.bias", t_b)):
        if t is not None:
            check_same_device(t, input, name)


def _check_teacher_logits(input: Tensor, vocab: int, logits: Tensor, fn: str) -> None:
    expected = (*input.shape[:-1], vocab)
    if tuple(logits.shape) != expected:
        raise ValueError(f"{fn}: expected teacher logits of shape {list(expected)}, got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise RuntimeError(f"{fn}: teacher logits must be floating point, got {scalar_name(logits.dtype)}")
    check_same_device(logits, input, "teacher.logits")


def _check_teacher_topk(input: Tensor, indices: Tensor, logprobs: Tensor, fn: str) -> None:
    lead = tuple(input.shape[:-1])
    if indices.dim() != len(lead) + 1 or tuple(indices.shape[:-1]) != lead:
        raise ValueError(f"{fn}: expected teacher indices of shape {list(lead)} + [k], got {list(indices.shape)}")
    if tuple(logprobs.shape) != tuple(indices.shape):
        raise ValueError(
            f"{fn}: teacher logprobs of shape {list(logprobs.shape)} do not match its indices' {list(indices.shape)}"
        )
    if indices.dtype != torch.int64:
        raise RuntimeError(f"{fn}: teacher indices must be int64 (Long), got {scalar_name(indices.dtype)}")
    if not logprobs.is_floating_point():
        raise RuntimeError(f"{fn}: teacher logprobs must be floating point, got {scalar_name(logprobs.dtype)}")
    check_same_device(indices, input, "teacher.indices")
    check_same_device(logprobs, input, "teacher.logprobs")


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """What autocast does to F.linear's arguments: float32 (and the other half type) become `dtype`."""
    return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t
