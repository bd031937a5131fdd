"""Argument checking: turns the public arguments into one normalized `Problem`.

Everything torch checks is checked here, in torch's order and with torch's exception types, so that the
kernels only ever see well-formed input. The order matters to users who test error handling: torch
raises the batch-size ValueError before a target-dtype RuntimeError, the weight-shape error before an
out-of-range target, and so on (see docs/torch-semantics.md, "Error order").
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from ..checks import as_index, check_weight_shape, shape_str
from ..kernels import check_backend_name
from ..problems import (
    EAGER,
    HALF_DTYPES,
    DistillProblem,
    LinearProblem,
    Options,
    Problem,
    ThroughLogits,
    TokenStatistics,
    autocast_dtype,
    compute_dtype,
    make_problem,
    route,
)

REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# torch's C++ names for scalar types, used in its messages ("expected scalar type Float but found Double").
_SCALAR_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def loss_dtype(dtype: torch.dtype, autocast: bool) -> torch.dtype:
    """Under autocast, losses follow its float32 policy: half-precision arguments count as float32."""
    return torch.float32 if autocast and dtype in HALF_DTYPES else dtype


def scalar_name(dtype: torch.dtype) -> str:
    return _SCALAR_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------------------
# Scalar arguments


def resolve_reduction(reduction, size_average=None, reduce=None) -> str:
    """Map legacy `size_average`/`reduce` (with torch's warning) and check `reduction`."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    if isinstance(reduction, str) and reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.", stacklevel=3)
        return "mean"
    if not (isinstance(reduction, str) and reduction in REDUCTIONS):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def legacy_reduction(size_average, reduce) -> str:
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    result = "mean" if (size_average and reduce) else ("sum" if reduce else "none")
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{result}' instead.", stacklevel=3
    )
    return result


def check_tensor(value, name: str, fn: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(value).__name__}")


def as_float(value, name: str, fn: str) -> float:
    """A float argument as torch's parser takes it: Python and numpy reals (bools too) and 0-d tensors that
    do not require grad; not 1-element tensors of other shapes, nor strings or None."""
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.requires_grad and not value.dtype.is_complex:
            return float(value)
    elif isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")


def check_label_smoothing(eps: float) -> float:
    """torch: > 1 raises, < 0 and NaN mean 'no smoothing'."""
    if eps > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps:g}")
    return eps if eps > 0.0 else 0.0


def check_float_input(input: Tensor, fn: str) -> None:
    if input.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"{fn}: input must hold floating point scores (float32, float64, bfloat16 or float16), "
            f"but got {scalar_name(input.dtype)}"
        )


def check_same_device(t: Tensor, input: Tensor, what: str) -> None:
    if t.device != input.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device: {what} is on {t.device}, input is on {input.device}"
        )


def check_optional_positive(value, name: str, fn: str, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    v = as_float(value, name, fn)
    if not v >= 0 or (allow_none and v == 0):  # `not >=` also catches NaN (and traces, unlike math.isnan)
        raise ValueError(f"{fn}: {name} must be {'> 0' if allow_none else '>= 0'}, got {v:g}")
    return v


# ----------------------------------------------------------------------------------------------------
# The normalized problem


def check_index_target(input: Tensor, target: Tensor) -> None:
    """torch's nll_loss shape and dtype checks, in its order (batch, rank, dtype)."""
    if input.dim() == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    if input.dim() != 1:
        target_batch = target.shape[0] if target.dim() > 0 else 0
        if input.shape[0] != target_batch:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target_batch})."
            )
    if input.dim() <= 2 and target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    if input.dim() >= 3:
        expected = (input.shape[0],) + tuple(input.shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(f"Expected target size {shape_str(expected)}, got {shape_str(target)}")
    check_target_dtype(target)
    if input.dim() == 1 and target.numel() != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    check_same_device(target, input, "target")


def check_target_dtype(target: Tensor) -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {scalar_name(target.dtype)}")


def check_index_weight(input: Tensor, weight: Tensor | None, autocast: bool = False) -> None:
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    check_weight_shape(weight, num_classes)
    check_class_weight(input, weight, autocast)


def check_class_weight(input: Tensor, weight: Tensor | None, autocast: bool = False) -> None:
    """Class weights with class-index targets: the input's dtype and device, and not differentiable."""
    if weight is None:
        return
    if loss_dtype(weight.dtype, autocast) != loss_dtype(input.dtype, autocast):
        raise RuntimeError(
            f"expected scalar type {scalar_name(loss_dtype(input.dtype, autocast))} but found "
            f"{scalar_name(loss_dtype(weight.dtype, autocast))}"
        )
    check_same_device(weight, input, "weight")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "the loss is not differentiable with respect to 'weight' when target holds class "
            "indices (as in torch); pass weight.detach() or use class-probability targets"
        )


STATISTICS = TokenStatistics._fields


def check_statistics(return_stats, fn: str, probabilities: bool = False) -> tuple:
    """`return_stats` (None, a name, or names from TokenStatistics' fields) as a tuple of distinct names."""
    if return_stats is None:
        return ()
    names = (return_stats,) if isinstance(return_stats, str) else return_stats
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(
            f"{fn}(): return_stats must be a name or a sequence of names from {', '.join(STATISTICS)}, "
            f"got {type(return_stats).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str) or name not in STATISTICS:
            raise ValueError(f"{fn}(): return_stats takes names from {', '.join(STATISTICS)}, got {name!r}")
        if probabilities and name in ("logprob", "correct"):
            raise ValueError(f"{fn}(): return_stats={name!r} needs class-index targets, not class probabilities")
    return tuple(dict.fromkeys(names))


def cross_entropy_problem(
    input,
    target,
    weight,
    *,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss=0.0,
    softcap=None,
    return_stats=None,
    temperature: float = 1.0,
    fn: str = "cross_entropy",
) -> Problem:
    """Validate cross_entropy's arguments, in torch's order, into a Problem.

    `reduction` must already be resolved (torch checks it before anything else). `temperature` (the RL
    functions', already checked by check_temperature) divides the logits inside the pass.
    """
    problem = _cross_entropy_problem(
        input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, fn
    )
    if temperature != 1.0:
        problem = replace(problem, options=replace(problem.options, temperature=temperature))
    statistics = check_statistics(return_stats, fn, problem.probabilities)
    return replace(problem, statistics=statistics) if statistics else problem


def _cross_entropy_problem(
    input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, fn: str
) -> Problem:
    check_tensor(input, "input", fn)
    check_tensor(target, "target", fn)
    check_tensor(weight, "weight", fn, optional=True)
    ignore_index = as_index(ignore_index, "ignore_index", fn)
    label_smoothing = as_float(label_smoothing, "label_smoothing", fn)
    z_loss = check_optional_positive(z_loss, "z_loss", fn, allow_none=False)
    softcap = check_optional_positive(softcap, "softcap", fn, allow_none=True)
    options = Options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    autocast = autocast_dtype(input.device) is not None
    if input.shape == target.shape:
        return _probability_problem(input, target, weight, options, fn, autocast)
    options = replace(options, label_smoothing=check_label_smoothing(label_smoothing))
    check_float_input(input, fn)
    if input.dim() == 0:
        raise IndexError(f"{fn}: input must have a class dimension, got a 0-d tensor")
    check_index_target(input, target)
    check_index_weight(input, weight, autocast)
    return make_problem(input, target, weight, options, loss_dtype(input.dtype, autocast))


def _probability_problem(input: Tensor, target: Tensor, weight, options: Options, fn: str, autocast: bool) -> Problem:
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {scalar_name(target.dtype)}"
        )
    if options.ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if input.dim() == 0:
        raise IndexError(f"{fn}: input must have a class dimension, got a 0-d tensor")
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    check_weight_shape(weight, num_classes, prefix="cross_entropy: ")
    check_float_input(input, fn)
    options = replace(options, label_smoothing=check_label_smoothing(options.label_smoothing))
    check_same_device(target, input, "target")
    dtypes = [loss_dtype(t.dtype, autocast) for t in (input, target, weight) if t is not None]
    output_dtype = dtypes[0]
    for d in dtypes[1:]:
        output_dtype = torch.promote_types(output_dtype, d)
    if weight is not None:
        check_same_device(weight, input, "weight")
    return make_problem(input, target, weight, options, output_dtype)


def check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> None:
    """F.linear's own checks, with torch's exception types."""
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.dim() == 0:
        raise RuntimeError("expected input with at least one (hidden) dimension, got a 0-d tensor")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            f"expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    out_shape = tuple(linear_weight.shape[:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != out_shape:
        raise RuntimeError(f"expected linear_bias shape {out_shape}, got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(
                f"expected input and {name} to have the same dtype, but got: "
                f"{scalar_name(input.dtype)} != {scalar_name(t.dtype)}"
            )
        if t is not None:
            check_same_device(t, input, name)


def linear_cross_entropy_problem(
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
    return_stats=None,
    fn: str = "linear_cross_entropy",
    temperature: float = 1.0,
    memory_mode: str = "auto",
    logits_dtype: torch.dtype | None = None,
):
    """Validate linear_cross_entropy's arguments (torch 2.13's F.linear_cross_entropy order) into either
    (LinearProblem, input, linear_weight, linear_bias), the tensors as autocast casts them, or ThroughLogits.
    `temperature` (the RL functions', already checked) divides the logits inside the pass."""
    for name, t, optional in (
        ("input", input, False),
        ("linear_weight", linear_weight, False),
        ("target", target, False),
        ("linear_bias", linear_bias, True),
        ("weight", weight, True),
    ):
        check_tensor(t, name, fn, optional=optional)
    explicit_ignore_index = ignore_index is not None  # torch refuses one with probability targets
    ignore_index = -100 if ignore_index is None else as_index(ignore_index, "ignore_index", fn)
    memory_budget = check_memory_budget(memory_budget, fn)
    memory_mode = check_memory_mode(memory_mode, fn)
    z_loss = check_optional_positive(z_loss, "z_loss", fn, allow_none=False)
    softcap = check_optional_positive(softcap, "softcap", fn, allow_none=True)
    output_dtype = check_output_dtype(output_dtype, fn)
    autocast = autocast_dtype(input.device)
    if autocast is not None:  # as under autocast F.linear casts, then cross_entropy returns float32
        input, linear_weight, linear_bias = (_autocast(t, autocast) for t in (input, linear_weight, linear_bias))
        output_dtype = output_dtype or torch.float32
    check_linear(input, linear_weight, linear_bias)
    logits_dtype = check_logits_dtype(logits_dtype, input.dtype, fn)

    vocab = linear_weight.shape[0]
    # torch's test: the target has the logits' shape (a non-float one then fails cross_entropy's dtype check)
    probabilities = tuple(target.shape) == (*input.shape[:-1], *linear_weight.shape[:-1])
    if linear_weight.dim() > 2 and input.dim() != 2:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires "
            f"batched input, (N, {input.shape[-1]}), got input with shape {tuple(input.shape)}"
        )
    if probabilities and explicit_ignore_index:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    # then cross_entropy's own checks, in its order: the reduction, then the smoothing's type
    reduction = resolve_reduction(reduction)
    label_smoothing = as_float(label_smoothing, "label_smoothing", fn)
    statistics = check_statistics(return_stats, fn)
    if linear_weight.dim() > 2 or probabilities:
        if statistics:
            raise NotImplementedError(f"{fn}: return_stats with probability targets or a K-dimensional head")
        options = Options(reduction, ignore_index, label_smoothing, z_loss, softcap, temperature)
        return ThroughLogits(input, linear_weight, linear_bias, target, weight, options, output_dtype, logits_dtype)

    label_smoothing = check_label_smoothing(label_smoothing)
    check_float_input(input, fn)
    if input.dim() <= 2:
        # torch's domain: cross_entropy's own checks on the logits, in its order; a zero-stride view stands
        # in for them (their shape, dtype and device, no memory)
        check_index_target(input.new_empty(()).expand(*input.shape[:-1], vocab), target)
    elif tuple(target.shape) != tuple(input.shape[:-1]):  # xent's (..., H) inputs: classes last
        raise ValueError(
            f"Expected target of shape {list(input.shape[:-1])} (input without its last, hidden "
            f"dimension), got {list(target.shape)}"
        )
    check_target_dtype(target)
    check_same_device(target, input, "target")
    check_weight_shape(weight, vocab)
    check_class_weight(input, weight, autocast is not None)
    chunk_size = chunk_size_of(options)
    problem = LinearProblem(
        input.reshape(math.prod(input.shape[:-1]), input.shape[-1]),  # not -1: ambiguous when H = 0
        linear_weight,
        linear_bias,
        target.reshape(-1),
        weight,
        Options(reduction, ignore_index, label_smoothing, z_loss, softcap, temperature),
        tuple(target.shape),
        output_dtype or input.dtype,
        chunk_size,
        memory_budget,
        statistics,
        memory_mode=memory_mode,
        logits_dtype=logits_dtype,
    )
    return problem, input, linear_weight, linear_bias


def linear_topk_problem(
    input,
    linear_weight,
    k,
    linear_bias,
    temperature,
    softcap,
    memory_budget,
    fn: str = "token_topk",
    logits_dtype: torch.dtype | None = torch.float32,
) -> tuple[LinearProblem, int]:
    """token_topk's arguments as a LinearProblem over the (R, H) rows (no targets: an empty one) and k."""
    for t, name, optional in ((input, "input", False), (linear_weight, "linear_weight", False)):
        check_tensor(t, name, fn, optional=optional)
    check_tensor(linear_bias, "linear_bias", fn, optional=True)
    autocast = autocast_dtype(input.device)
    if autocast is not None:  # the head's GEMM in autocast's dtype, as F.linear under autocast
        input, linear_weight, linear_bias = (_autocast(t, autocast) for t in (input, linear_weight, linear_bias))
    check_linear(input, linear_weight, linear_bias)
    logits_dtype = check_logits_dtype(logits_dtype, input.dtype, fn)
    if linear_weight.dim() != 2:
        raise RuntimeError(f"{fn}: linear_weight must be (V, H), got {list(linear_weight.shape)}")
    check_float_input(input, fn)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    vocab = linear_weight.shape[0]
    if not 0 <= k <= vocab:  # torch.topk's RuntimeError
        raise RuntimeError(f"{fn}: k ({k}) must be between 0 and the number of classes ({vocab})")
    cd = compute_dtype(input.dtype, linear_weight.dtype)
    rows = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    t, row_t = check_token_temperature(temperature, rows.new_empty(input.shape[:-1], dtype=torch.int64), cd, fn)
    softcap = check_optional_positive(softcap, "softcap", fn, allow_none=True)
    problem = LinearProblem(
        rows,
        linear_weight,
        linear_bias,
        rows.new_empty(0, dtype=torch.int64),
        None,
        Options("none", softcap=softcap, temperature=t),
        tuple(input.shape[:-1]),
        cd,
        0,
        check_memory_budget(memory_budget, fn),
        (),
        row_t,
        logits_dtype=logits_dtype,
    )
    return problem, int(k)


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """What autocast does to F.linear's arguments: float32 (and the other half type) become `dtype`."""
    return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t


MEMORY_MODES = ("auto", "lean", "fast")  # kernels/linear.py describes the plans


def check_memory_mode(memory_mode, fn: str) -> str:
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"{fn}: memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
    return memory_mode


def check_logits_dtype(logits_dtype, head_dtype: torch.dtype, fn: str) -> torch.dtype | None:
    """The dtype a head's logits are computed in, as LinearProblem.logits_dtype holds it: None (rounded to
    the head's dtype, as F.linear) or torch.float32 for a half-precision head. Accepted: None or the head's
    dtype (F.linear's rounding), or torch.float32 (fp32 logits; an fp32 or fp64 head's own are already at
    least that)."""
    if logits_dtype is not None and not isinstance(logits_dtype, torch.dtype):
        raise TypeError(f"{fn}: logits_dtype must be a torch.dtype or None, got {type(logits_dtype).__name__}")
    if logits_dtype not in (None, head_dtype, torch.float32):
        raise ValueError(
            f"{fn}: logits_dtype must be None, torch.float32 or the head's dtype ({head_dtype}), got {logits_dtype}"
        )
    return torch.float32 if logits_dtype == torch.float32 and head_dtype in HALF_DTYPES else None


def check_memory_budget(memory_budget, fn: str) -> int | None:
    """A chunk budget in bytes: None (the default) or a positive integer (ValueError otherwise)."""
    if memory_budget is None:
        return None
    memory_budget = as_index(memory_budget, "memory_budget", fn)
    if memory_budget <= 0:
        raise ValueError(f"{fn}: memory_budget must be a positive number of bytes, got {memory_budget}")
    return memory_budget


def check_output_dtype(output_dtype, fn: str) -> torch.dtype | None:
    """The dtype a linear loss is returned in: None (the input's) or a floating-point torch.dtype."""
    if output_dtype is None:
        return None
    if not isinstance(output_dtype, torch.dtype) or output_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}(): output_dtype must be None or a floating-point torch.dtype, got {output_dtype!r}")
    return output_dtype


def chunk_size_of(options) -> int:
    """Tokens per chunk from torch's LinearCrossEntropyOptions (its batch_chunk_size); 0: sized from the budget."""
    return int(getattr(options, "batch_chunk_size", None) or 0)


def check_backend(backend, fn: str) -> str | None:
    """A registered backend's name (kernels/backends.py), or None for the default: ``XENT_BACKEND``, else
    the automatic choice. ValueError for an unknown name, TypeError for a value that is not a string."""
    try:
        return check_backend_name(backend)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}(): backend: {e}") from None


def with_backend(problem, backend: str | None):
    """The problem (any of problems.py's, or its Options) computed by `backend`."""
    if backend is None:
        return problem
    if isinstance(problem, (DistillProblem, Options)):
        return replace(problem, backend=backend)
    return replace(problem, options=replace(problem.options, backend=backend))


def check_temperature(temperature) -> float:
    """A sampling temperature: a positive finite number (ValueError otherwise)."""
    if isinstance(temperature, Tensor):
        raise TypeError("temperature must be a number here (a per-token tensor is taken by the RL functions)")
    t = float(temperature)
    if not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return t


def check_token_temperature(temperature, target: Tensor, dtype: torch.dtype, fn: str) -> tuple[float, Tensor | None]:
    """An RL function's temperature: a positive number, or a tensor of per-token temperatures that
    broadcasts to the target's shape (one per token, e.g. (batch, 1) for one per sequence).

    Returns (the number, 1.0 for a tensor; the tensor as (R,) contiguous in `dtype`, or None). A CPU
    tensor's values are checked (positive, finite: ValueError); a GPU tensor's are not, as that would wait
    for the device (a non-positive temperature there gives nan or inf results)."""
    if not isinstance(temperature, Tensor):
        return check_temperature(temperature), None
    if not temperature.is_floating_point():
        raise TypeError(f"{fn}: a temperature tensor must be floating point, got {temperature.dtype}")
    if temperature.device != target.device:
        raise RuntimeError(f"{fn}: the temperature tensor is on {temperature.device}, the targets on {target.device}")
    try:
        rows = torch.broadcast_to(temperature, target.shape)
    except RuntimeError as e:
        raise ValueError(
            f"{fn}: temperature of shape {list(temperature.shape)} does not broadcast to the targets' shape "
            f"{list(target.shape)} (one temperature per token)"
        ) from e
    rows = rows.detach().to(dtype).reshape(-1).contiguous()  # no gradient: a temperature is a setting
    if (
        rows.device.type == "cpu"
        and route(rows) == EAGER
        and rows.numel()
        and not bool(((rows > 0) & rows.isfinite()).all())
    ):
        raise ValueError(f"{fn}: every temperature must be a positive finite number")
    return 1.0, rows


def check_local_head(input: Tensor, local_linear_weight, linear_bias, target: Tensor, fn: str) -> None:
    """A vocab-parallel linear call's head: this rank's (C_local, H) rows, and targets shaped as the input's
    leading dimensions."""
    check_tensor(local_linear_weight, "local_linear_weight", fn)
    check_tensor(linear_bias, "linear_bias", fn, optional=True)
    check_linear(input, local_linear_weight, linear_bias)
    if local_linear_weight.dim() != 2:
        raise RuntimeError(f"{fn}: local_linear_weight must be (C_local, H), got {list(local_linear_weight.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: expected target of shape {list(input.shape[:-1])} (input without its hidden dimension), "
            f"got {list(target.shape)}"
        )


def check_local_logits_target(local_logits: Tensor, target: Tensor, fn: str) -> None:
    """A vocab-parallel call's targets: shaped as this rank's logits without their class dimension."""
    if local_logits.dim() == 0 or tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(
            f"{fn}: expected target of shape {list(local_logits.shape[:-1])} (local_logits without its class "
            f"dimension), got {list(target.shape)}"
        )


def vocab_parallel_options(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    fn: str,
    logits_name: str,
    softcap=None,
) -> Options:
    """The vocab-parallel losses' local checks (those that need the other ranks run after the exchange)."""
    reduction = resolve_reduction(reduction)
    check_tensor(local_logits, logits_name, fn)
    check_tensor(target, "target", fn)
    check_tensor(weight, "weight", fn, optional=True)
    options = Options(
        reduction,
        as_index(ignore_index, "ignore_index", fn),
        check_label_smoothing(as_float(label_smoothing, "label_smoothing", fn)),
        check_optional_positive(z_loss, "z_loss", fn, allow_none=False),
        check_optional_positive(softcap, "softcap", fn, allow_none=True),
    )
    check_float_input(local_logits, fn)
    check_target_dtype(target)
    check_same_device(target, local_logits, "target")
    if weight is not None and weight.dim() != 1:
        raise RuntimeError(f"weight must be the full (C,) class-weight tensor, got shape {list(weight.shape)}")
    check_class_weight(local_logits, weight)  # its size is checked against the gathered shards
    return options
