"""Typed descriptions of the computations xent runs, and how a call is being made.

The bottom of the package: the validation layer (validation/) builds these, the ops (ops/) and the
kernels (kernels/) take them. Nothing here checks arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype xent computes and reduces in for tensors of `dtypes`: fp64 if any is fp64, else fp32
    (math and reductions never run in half precision)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def divides(temperature: float | Tensor) -> bool:
    """Whether a temperature divides the logits: a per-row tensor always does (no host check of its
    values), a number when it is not 1."""
    return isinstance(temperature, Tensor) or temperature != 1.0


def handover_keeps_range(dtype: torch.dtype) -> bool:
    """Whether a gradient that forward computes for a unit upstream gradient and stores in `dtype`, for
    backward to scale by the real one, loses nothing that a gradient computed with the upstream folded in
    would keep.

    Not in fp16: its range is 2^-24..65504, and a stored 'mean' gradient is already divided by the number
    of tokens, so with a gradient scaler's upstream (2^15-2^16) most softmax entries of a long row land
    below 2^-24 before the scale could lift them (91% of the nonzero entries at 2048 x 32000) while torch,
    which applies the upstream first, keeps them. fp16 losses therefore compute their gradients in
    backward, with the upstream folded into each row's coefficients and one rounding to fp16. bf16 has
    fp32's exponent range: its stored gradient only rounds once more, as torch's own bf16 gradients do."""
    return dtype != torch.float16


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """torch.autocast's lower-precision dtype when it is on for `device`'s type, else None."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except (TypeError, RuntimeError, AttributeError):  # device types autocast does not know
        return None


class TokenStatistics(NamedTuple):
    """Per-token statistics a loss returns with ``return_stats=``, from the same pass over the logits.

    Each field has the shape of the loss with ``reduction='none'`` (one value per row, i.e. per token);
    fields that were not asked for are None. z below is the row's logits after ``softcap``.

    * ``lse``: log-sum-exp of z (float32; float64 for float64 inputs).
    * ``logprob``: the target's log-probability z_y - lse; 0 on ignored rows.
    * ``entropy``: -sum_c p_c log p_c of softmax(z).
    * ``z_loss``: the z-loss term z_loss * lse**2 the loss adds for the row; 0 on ignored rows.
    * ``argmax``: int64, the class of the largest logit (the first one on ties); -1 without classes.
    * ``correct``: bool, argmax == target; False on ignored rows.
    * ``sum_sq_probs``: sum_c p_c**2 of softmax(z) (the collision probability; 1 / exp of the Rényi-2
      entropy), what some policy-gradient baselines weight by. 0 without classes.
    * ``mean_logit``: the mean of z over the classes (nan without classes).

    They carry no gradient (differentiable log-probabilities and entropies: :func:`xent.token_logprobs`).
    """

    lse: Tensor | None = None
    logprob: Tensor | None = None
    entropy: Tensor | None = None
    z_loss: Tensor | None = None
    argmax: Tensor | None = None
    correct: Tensor | None = None
    sum_sq_probs: Tensor | None = None
    mean_logit: Tensor | None = None

    @staticmethod
    def computed(statistics: tuple) -> tuple:
        """The statistics a pass computes for `statistics`: 'correct' is formed from the argmax (target
        kept and argmax == target), so it brings the argmax in its place."""
        wanted = [n for n in statistics if n != "correct"]
        if "correct" in statistics and "argmax" not in wanted:
            wanted.append("argmax")
        return tuple(wanted)

    @classmethod
    def of(cls, stats: dict, shape: tuple) -> TokenStatistics:
        """From the ops' flat per-row statistics, each reshaped to `shape`."""
        return cls(**{name: t.reshape(shape) for name, t in stats.items()})


@dataclass(frozen=True)
class Options:
    """The scalar options of one loss computation, after validation."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0  # 0 when torch would not smooth (eps <= 0 or NaN)
    z_loss: float = 0.0
    softcap: float | None = None
    temperature: float = 1.0  # the (capped) logits are divided by it, in fp32, inside the pass (RL sampling)
    backend: str | None = None  # a registered backend's name (kernels/backends.py); None: XENT_BACKEND, else auto


@dataclass(frozen=True, eq=False)
class Problem:
    """One cross-entropy, normalized to a (N, C, D) layout.

    Every input shape torch accepts maps onto it: unbatched (C,) is (1, C, 1), (N, C) is (N, C, 1) and
    (N, C, d1..dk) is (N, C, d1*...*dk). A *row* is one (n, d) position, R = N * D rows in all, ordered
    n-major so that `target.reshape(-1)` and the per-row loss line up.
    """

    logits: Tensor  # (N, C, D) view of the caller's input (no copy)
    target: Tensor  # class indices (N, D), or class probabilities (N, C, D)
    weight: Tensor | None  # (C,)
    probabilities: bool
    options: Options
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]  # shape of the reduction='none' result
    output_dtype: torch.dtype
    statistics: tuple[str, ...] = ()  # per-token statistics to return besides the loss (TokenStatistics' names)
    row_temperature: Tensor | None = None  # (R,) each row's temperature (RL), compute dtype; None: the options'

    @property
    def temperature(self) -> float | Tensor:
        """What divides each row's (capped) logits: the per-row tensor, or the options' number."""
        return self.row_temperature if self.row_temperature is not None else self.options.temperature

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0] * self.logits.shape[2]

    @property
    def compute_dtype(self) -> torch.dtype:
        """fp32 for fp32/bf16/fp16 (our math and reductions never run in half precision), else fp64."""
        return compute_dtype(self.output_dtype, self.logits.dtype)


@dataclass(frozen=True, eq=False)
class LinearProblem:
    """A validated linear cross-entropy: rows of hidden states, the head and class-index targets."""

    input: Tensor  # (R, H) view of the caller's (..., H) input
    linear_weight: Tensor  # (V, H)
    linear_bias: Tensor | None  # (V,)
    target: Tensor  # (R,) class indices
    weight: Tensor | None  # (V,) class weights
    options: Options
    output_shape: tuple[int, ...]  # the target's shape, for reduction='none'
    output_dtype: torch.dtype  # of the returned loss (the input's unless asked otherwise)
    chunk_size: int = 0  # tokens per chunk; 0: sized from memory_budget (kernels/linear.py)
    memory_budget: int | None = None  # bytes of one chunk's logits; None: the default
    statistics: tuple[str, ...] = ()  # per-token statistics to return besides the loss (TokenStatistics' names)
    row_temperature: Tensor | None = None  # (R,) each row's temperature (RL), compute dtype; None: the options'
    memory_mode: str = "auto"  # the gradient passes' plan: "auto" | "lean" | "fast" (kernels/linear.py)
    # None: a half-precision head's logits rounded to its dtype, as F.linear rounds them; torch.float32: the
    # GEMM's fp32 accumulator itself (only ever set for a half-precision head; kernels/linear.py Head)
    logits_dtype: torch.dtype | None = None

    @property
    def temperature(self) -> float | Tensor:
        """What divides each row's (capped) logits: the per-row tensor, or the options' number."""
        return self.row_temperature if self.row_temperature is not None else self.options.temperature

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.linear_weight.dtype)


DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("none", "sum", "mean", "batchmean")
TEACHER_KINDS = ("head", "logits", "topk")


@dataclass(frozen=True, eq=False)
class DistillProblem:
    """A validated linear distillation: the student's rows and head, one teacher form, the options.

    Tensors are flattened to rows: R = the number of tokens (the product of the input's leading
    dimensions). The teacher's tensors are detached: the loss gives them no gradient."""

    input: Tensor  # (R, H) student hidden states
    linear_weight: Tensor  # (V, H)
    linear_bias: Tensor | None  # (V,)
    teacher_kind: str  # one of TEACHER_KINDS
    teacher_input: Tensor | None  # head: (R, H_t)
    teacher_weight: Tensor | None  # head: (V, H_t)
    teacher_bias: Tensor | None  # head: (V,)
    teacher_logits: Tensor | None  # logits: (R, V)
    teacher_indices: Tensor | None  # topk: (R, k) int64
    teacher_logprobs: Tensor | None  # topk: (R, k)
    target: Tensor | None  # (R,): tokens equal to ignore_index are skipped; None: none is
    divergence: str  # 'kl' | 'reverse_kl' | 'jsd' (a jsd with beta 0 or 1 arrives as 'kl' / 'reverse_kl')
    beta: float
    temperature: float
    ignore_index: int
    reduction: str  # one of REDUCTIONS
    output_shape: tuple[int, ...]  # of the reduction='none' result (the input's leading dimensions)
    output_dtype: torch.dtype
    memory_budget: int | None = None  # bytes of all of one chunk's workspaces together; None: the default
    backend: str | None = None  # as Options.backend
    memory_mode: str = "auto"  # the gradient passes' plan: "auto" | "lean" | "fast" (kernels/distill.py)
    logits_dtype: torch.dtype | None = None  # as LinearProblem.logits_dtype, for the student's and teacher's heads

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.input.dtype)

    @property
    def teacher_tensors(self) -> tuple:
        return (
            self.teacher_input,
            self.teacher_weight,
            self.teacher_bias,
            self.teacher_logits,
            self.teacher_indices,
            self.teacher_logprobs,
        )


def _as_3d(t: Tensor) -> Tensor:
    """(C,) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d...) -> (N, C, D). A view whenever torch can make one."""
    if t.dim() == 1:
        return t.view(1, t.shape[0], 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def make_problem(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    options: Options,
    output_dtype: torch.dtype,
    statistics: tuple = (),
) -> Problem:
    """The Problem of arguments that passed the checks above: layout only, no checks (the ops rebuild
    it from their flat arguments with this). The target range is checked by the op itself."""
    output_shape = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    probabilities = input.shape == target.shape
    if probabilities:
        target = _as_3d(target)
    elif input.dim() == 1:
        target = target.reshape(1, 1)
    else:
        target = target.reshape(input.shape[0], math.prod(input.shape[2:]))
    return Problem(
        _as_3d(input),
        target,
        weight,
        probabilities,
        options,
        tuple(input.shape),
        output_shape,
        output_dtype,
        statistics,
    )


@dataclass(frozen=True, eq=False)
class ThroughLogits:
    """A linear cross-entropy computed through its materialized logits: probability targets and K-dim
    heads (C, d1, ..., H), which torch accepts; arguments after autocast's casts."""

    input: Tensor
    linear_weight: Tensor
    linear_bias: Tensor | None
    target: Tensor
    weight: Tensor | None
    options: Options
    output_dtype: torch.dtype | None  # None: cross_entropy's (its dtype promotion of logits, target and weight)
    logits_dtype: torch.dtype | None = None  # as LinearProblem.logits_dtype


# How a loss is being called; the ops (ops/) pick their implementation by it.
EAGER, TRACED, FUNC = "eager", "traced", "func"


def route(*tensors: Tensor | None) -> str:
    """FUNC under a torch.func transform of these tensors (grad, vjp, jacrev, vmap...); TRACED while
    torch.compile, torch.export or make_fx traces (fake or proxy tensors); EAGER otherwise."""
    if _is_compiling():  # first: dynamo folds it to a constant and traces nothing below
        return TRACED
    present = [t for t in tensors if t is not None]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return FUNC
    if any(isinstance(t, _FakeTensor) for t in present) or (_proxy_mode is not None and _proxy_mode() is not None):
        return TRACED
    return EAGER


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


try:  # private but long-stable homes of the fake tensor and of make_fx's tracing mode
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover
    _FakeTensor = ()
try:
    from torch.fx.experimental.proxy_tensor import get_proxy_mode as _proxy_mode
except ImportError:  # pragma: no cover
    _proxy_mode = None
