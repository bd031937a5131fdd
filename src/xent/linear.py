"""Fused linear + cross-entropy: the loss of a language-model head without ever holding its logits.

For each chunk of tokens the logits chunk (tokens x vocabulary) is computed by one matmul into a
workspace, the row kernel (kernels/rows.py) turns it into the loss and, in place, into the gradient of
the logits, and two more matmuls fold that into the gradients of the input and of the head's weight
(accumulated in fp32) before the next chunk overwrites the workspace. Peak extra memory is one chunk.

With a scalar reduction ('mean'/'sum') this happens in forward and backward only scales the gradients by
the upstream gradient. For reduction='none' the upstream gradient differs per token, so forward only
computes losses and backward recomputes the chunks (one extra matmul).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import eager_under_compile as _eager_under_compile
from ._validate import (HALF_DTYPES, Options, as_float, as_index, autocast_dtype, check_class_weight, check_float_input,
                        check_label_smoothing, check_optional_positive, check_same_device, check_target_dtype,
                        check_target_range, check_tensor, check_weight_shape, resolve_reduction, scalar_name)
from .kernels import backend_for, rows, scale_by_upstream_

# Default workspace: 1/16 of the full logits, between 16 MiB and 256 MiB (benchmarks/RESULTS.md).
MIN_CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 256 << 20


@dataclass(frozen=True, eq=False)
class LinearProblem:
    """A validated linear cross-entropy: rows of hidden states, the head and class-index targets."""

    input: Tensor  # (R, H) view of the caller's (..., H) input
    linear_weight: Tensor  # (V, H)
    linear_bias: Tensor | None  # (V,)
    target: Tensor  # (R,) class indices
    weight: Tensor | None  # (V,) class weights
    options: Options
    output_shape: tuple  # the target's shape, for reduction='none'
    rows_per_chunk: int
    output_dtype: torch.dtype  # of the returned loss (the input's unless asked otherwise)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.linear_weight.dtype == torch.float64 else torch.float32


def workspace_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits workspace for a head of `dtype`: the head's own for bf16/fp16 on the Triton
    backend (half-precision GEMMs; the kernel does fp32 math), else the compute dtype (fp32 or fp64)."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    return dtype if dtype in HALF_DTYPES and backend_for(device, cd) == "triton" else cd


def chunk_rows(num_rows: int, vocab: int, ws_dtype: torch.dtype, memory_budget: int | None) -> int:
    """Tokens per chunk so that one chunk of logits takes about `memory_budget` bytes (see module top).

    The default budget is rounded down to whole 128-row tiles, so every chunk's GEMMs run full tiles."""
    row_bytes = max(1, vocab) * torch.finfo(ws_dtype).bits // 8
    if memory_budget is not None:
        return max(1, min(num_rows, memory_budget // row_bytes))
    rows_ = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, num_rows * row_bytes // 16)) // row_bytes
    if rows_ >= 256:
        rows_ -= rows_ % 128
    return max(1, min(num_rows, rows_))


def linear_pass(p: LinearProblem, block: rows.ClassBlock, targets: rows.IndexTargets | None = None,
                scale: Tensor | None = None, want: tuple[bool, bool, bool] = (False, False, False),
                lse: Tensor | None = None):
    """One pass over the rows' logits, chunk by chunk: their statistics and, when `targets` and `scale` are
    given, the gradients in `want` (input, linear_weight, linear_bias) of sum_i scale_i * loss_i.

    `block` says which classes the head holds (all of them, or one rank's shard, whose gradient then
    needs the rows' global `lse`). Weight and bias gradients come back in fp32 (fp64 for fp64 parameters).
    """
    x, w_lin, b_lin = p.input, p.linear_weight, p.linear_bias
    num_rows, vocab = x.shape[0], w_lin.shape[0]
    cd = p.compute_dtype
    dev = x.device
    cap = p.options.softcap
    need_grad = scale is not None and any(want)
    want_input, want_weight, want_bias = want if need_grad else (False, False, False)

    smoothing = p.options.label_smoothing > 0
    stats = rows.RowStats.empty(num_rows, target=True, dense=smoothing, dtype=cd, device=dev)
    grad_input = torch.empty_like(x) if want_input else None
    grad_weight = torch.zeros(w_lin.shape, dtype=cd, device=dev) if want_weight else None
    grad_bias = torch.zeros(vocab, dtype=cd, device=dev) if want_bias else None
    coefficients = targets.coefficients(scale, lse, block) if need_grad else None
    unshifted = dev.type == "cpu"  # as in kernels/portable.py: decided per chunk with a host check
    backend = backend_for(dev, cd)

    # On the Triton backend a half-precision head keeps its workspace in that dtype: the logits come from
    # a bf16/fp16 GEMM (fp32 accumulation, as F.linear), the kernel reads them and writes the gradient in
    # place with fp32 math, and the two gradient GEMMs run on half inputs too. The torch backend's row
    # math works in the workspace itself, so it keeps fp32 there.
    ws_dtype = workspace_dtype(dev, x.dtype)
    step = p.rows_per_chunk
    work_buf = torch.empty(min(step, num_rows) * vocab, dtype=ws_dtype, device=dev) if num_rows and vocab else None
    chain_buf = torch.empty_like(work_buf) if cap is not None and need_grad and work_buf is not None \
        and backend == "torch" else None
    for r0 in range(0, num_rows if vocab else 0, step):
        r1 = min(num_rows, r0 + step)
        xc = x[r0:r1]
        ws = work_buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)

        def load(xc=xc, ws=ws) -> None:
            """The chunk's logits (as F.linear computes them, in the parameters' dtype) into the workspace."""
            if x.dtype == ws.dtype:
                if b_lin is None:
                    torch.mm(xc, w_lin.T, out=ws)
                else:
                    torch.addmm(b_lin, xc, w_lin.T, out=ws)
            else:
                ws.copy_(F.linear(xc, w_lin, b_lin))

        rows.pass_chunk(backend, ws, r0, r1, stats, load, target=block.index[r0:r1].unsqueeze(1),
                        dense=block.class_weight if smoothing else None,
                        dense_is_ones=smoothing and block.class_weight is None, softcap=cap,
                        chain_out=chain_buf[: ws.numel()].view_as(ws) if chain_buf is not None else None,
                        coefficients=coefficients, unshifted=unshifted)
        if not need_grad:
            continue
        grad_logits = ws if ws.dtype == x.dtype else ws.to(x.dtype)
        if want_input:
            torch.mm(grad_logits, w_lin, out=grad_input[r0:r1])
        if want_weight:
            accumulate_mm_(grad_weight, grad_logits.T, xc)
        if want_bias:
            grad_bias.add_(ws.sum(0, dtype=cd))
    return stats, grad_input, grad_weight, grad_bias


def accumulate_mm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32/fp64) += a @ b, with a GEMM in a's and b's dtype (half inputs never run an fp32 GEMM).

    Half inputs on CUDA accumulate straight into fp32 through the GEMM's beta = 1 (torch's
    `addmm(..., out_dtype=float32)`); where that overload is missing (CPU, older torch) the product is
    taken in half precision with fp32 accumulation inside the GEMM, rounded once, and added in fp32.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.device.type == "cuda" and _OUT_DTYPE_ADDMM.get(a.device.type, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_ADDMM[a.device.type] = False  # this torch has no such kernel: do not try again
    acc.add_(torch.mm(a, b))


_OUT_DTYPE_ADDMM: dict[str, bool] = {}


def _loss_rows(p: LinearProblem, targets: rows.IndexTargets, stats: rows.RowStats) -> Tensor:
    if p.input.shape[0] and p.linear_weight.shape[0]:
        return targets.block_losses(stats).to(p.compute_dtype)
    return torch.zeros(p.input.shape[0], dtype=p.compute_dtype, device=p.input.device)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, problem: LinearProblem):
        opts = problem.options
        targets = _targets(problem)
        want = tuple(ctx.needs_input_grad[:3])
        scalar = opts.reduction != "none"
        stats, grad_input, grad_weight, grad_bias = linear_pass(
            problem, targets.block(), targets, targets.scale() if scalar and any(want) else None, want)
        loss_rows = _loss_rows(problem, targets, stats)
        ctx.problem, ctx.want, ctx.input_shape = problem, want, input.shape
        # Gradients for a unit upstream gradient, in the parameters' dtypes (fp32 sums cast once, here).
        ctx.grads = [grad_input, _cast(grad_weight, linear_weight), _cast(grad_bias, linear_bias)] if scalar \
            and any(want) else None
        ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
        loss = targets.reduce(loss_rows)
        return (loss.reshape(problem.output_shape) if not scalar else loss).to(problem.output_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        with _no_autocast(ctx.problem.input.device):
            return LinearCrossEntropyFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        problem: LinearProblem = ctx.problem
        if torch.is_grad_enabled():
            return (*_double_backward_path(ctx, grad_loss), None, None, None)
        grads, ctx.grads = ctx.grads, None  # handed over; a second backward (retain_graph) recomputes
        if grads is None:
            ctx.saved_tensors  # raises if an input was modified in place since forward
            targets = _targets(problem)
            upstream = grad_loss if problem.options.reduction == "none" else grad_loss.expand(problem.target.shape)
            _, gi, gw, gb = linear_pass(problem, targets.block(), targets, targets.scale(upstream), ctx.want)
            grads = [gi, _cast(gw, problem.linear_weight), _cast(gb, problem.linear_bias)]
        else:
            for g in grads:
                if g is not None:
                    scale_by_upstream_(g, grad_loss)
        gi, gw, gb = grads
        return gi.view(ctx.input_shape) if gi is not None else None, gw, gb, None, None, None


def _cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
    return t if t is None or like is None or t.dtype == like.dtype else t.to(like.dtype)


def _targets(p: LinearProblem) -> rows.IndexTargets:
    o = p.options
    return rows.IndexTargets(p.target, p.weight, ignore_index=o.ignore_index, label_smoothing=o.label_smoothing,
                             z_loss=o.z_loss, reduction=o.reduction, num_classes=p.linear_weight.shape[0],
                             dtype=p.compute_dtype)


def _double_backward_path(ctx, grad_loss) -> tuple:
    """create_graph=True: differentiate the composition cross_entropy(linear(...)) with autograd.

    This materializes the logits, which double backward needs anyway; xent.cross_entropy supplies the
    differentiable softmax gradient.
    """
    from .functional import cross_entropy

    p: LinearProblem = ctx.problem
    input, w_lin, b_lin, target, weight = ctx.saved_tensors
    o = p.options
    logits = F.linear(input, w_lin, b_lin).reshape(-1, w_lin.shape[0])
    loss = cross_entropy(logits, target.reshape(-1), weight=weight, ignore_index=o.ignore_index,
                         reduction=o.reduction, label_smoothing=o.label_smoothing, z_loss=o.z_loss,
                         softcap=o.softcap)
    loss = (loss.reshape(p.output_shape) if o.reduction == "none" else loss).to(p.output_dtype)
    inputs = [t for t, w in zip((input, w_lin, b_lin), ctx.needs_input_grad[:3]) if w]
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True))
    return tuple(next(grads) if w else None for w in ctx.needs_input_grad[:3])


# ----------------------------------------------------------------------------------------------------
# Public API


@_eager_under_compile
def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *, linear_bias: Tensor | None = None,
                         weight: Tensor | None = None, reduction: str = "mean", ignore_index: int | None = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         options=None, memory_budget: int | None = None,
                         output_dtype: torch.dtype | None = None) -> Tensor:
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
        ignore_index (int): target value to skip; ``None`` means -100 (as torch). Default: -100.
        label_smoothing (float): in [0, 1], as in :func:`xent.cross_entropy`.
        z_loss (float): adds ``z_loss * lse**2`` per non-ignored token (unweighted; 'mean' divides by the
            same denominator as the cross-entropy).
        softcap (float, optional): logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        options: torch's ``LinearCrossEntropyOptions``; only ``batch_chunk_size`` is used (tokens per chunk).
        memory_budget (int, optional): bytes for one chunk of logits (fp32; bf16/fp16 heads on the Triton
            backend keep their own dtype); default 1/16 of the full logits, clamped to [16 MiB, 256 MiB]
            and rounded to 128-row tiles. The result does not depend on it beyond rounding.
        output_dtype (torch.dtype, optional): dtype of the returned loss; default the input's (as torch).
            ``torch.float32`` keeps a bf16 model's loss unrounded (it is computed in fp32 either way).

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
    reduction = resolve_reduction(reduction)
    fn = "linear_cross_entropy"
    for name, t, optional in (("input", input, False), ("linear_weight", linear_weight, False),
                              ("target", target, False), ("linear_bias", linear_bias, True), ("weight", weight, True)):
        check_tensor(t, name, fn, optional=optional)
    ignore_index = -100 if ignore_index is None else as_index(ignore_index, "ignore_index", fn)
    label_smoothing = as_float(label_smoothing, "label_smoothing", fn)
    z_loss = check_optional_positive(z_loss, "z_loss", fn, allow_none=False)
    softcap = check_optional_positive(softcap, "softcap", fn, allow_none=True)
    autocast = autocast_dtype(input.device)
    if autocast is not None:  # as under autocast F.linear casts, then cross_entropy returns float32
        input, linear_weight, linear_bias = (_autocast(t, autocast) for t in (input, linear_weight, linear_bias))
        output_dtype = output_dtype or torch.float32
    _check_linear(input, linear_weight, linear_bias)

    vocab = linear_weight.shape[0]
    probabilities = target.is_floating_point() and tuple(target.shape) == (*input.shape[:-1], vocab)
    if linear_weight.dim() > 2 and input.dim() != 2:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires "
                           f"batched input, (N, {input.shape[-1]}), got input with shape {tuple(input.shape)}")
    if linear_weight.dim() > 2 or probabilities:
        return _through_logits(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                               label_smoothing, z_loss, softcap).to(output_dtype or input.dtype)

    label_smoothing = check_label_smoothing(label_smoothing)
    check_float_input(input, fn)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        if input.dim() == 2 and target.dim() >= 1:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0]}).")
        raise ValueError(f"Expected target of shape {list(input.shape[:-1])} (input without its last, hidden "
                         f"dimension), got {list(target.shape)}")
    check_target_dtype(target)
    check_same_device(target, input, "target")
    check_weight_shape(weight, vocab)
    check_class_weight(input, weight, autocast is not None)
    check_target_range(target, vocab, ignore_index)

    options_ = Options(reduction, ignore_index, label_smoothing, z_loss, softcap)
    x2 = input.reshape(-1, input.shape[-1])
    step = getattr(options, "batch_chunk_size", None) or chunk_rows(
        x2.shape[0], vocab, workspace_dtype(input.device, input.dtype), memory_budget)
    problem = LinearProblem(x2, linear_weight, linear_bias, target.reshape(-1), weight, options_,
                            tuple(target.shape), int(step), output_dtype or input.dtype)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (input, linear_weight, linear_bias))
    with _no_autocast(input.device):  # the chunk matmuls write fixed-dtype workspaces
        if not needs_grad:
            targets = _targets(problem)
            stats = linear_pass(problem, targets.block())[0]
            loss = targets.reduce(_loss_rows(problem, targets, stats))
            return (loss.reshape(problem.output_shape) if reduction == "none" else loss).to(problem.output_dtype)
        return LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight, problem)


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """What autocast does to F.linear's arguments: float32 (and the other half type) become `dtype`."""
    return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if autocast_dtype(device) is not None \
        else contextlib.nullcontext()


def _check_linear(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> None:
    """F.linear's own checks, with torch's exception types."""
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.dim() == 0:
        raise RuntimeError("expected input with at least one (hidden) dimension, got a 0-d tensor")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(f"expected equal input and linear_weight last dimensions (in_features), got "
                           f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    out_shape = tuple(linear_weight.shape[:-1])
    if linear_bias is not None and tuple(linear_bias.shape) not in (out_shape, (math.prod(out_shape),)):
        raise RuntimeError(f"expected linear_bias shape {out_shape}, got {tuple(linear_bias.shape)}")
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"expected input and {name} to have the same dtype, but got: "
                               f"{scalar_name(input.dtype)} != {scalar_name(t.dtype)}")
        if t is not None:
            check_same_device(t, input, name)


def _through_logits(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing,
                    z_loss, softcap) -> Tensor:
    """Probability targets and K-dim heads, which torch also accepts: via the materialized logits."""
    from .functional import cross_entropy

    hidden = input.shape[-1]
    logits = F.linear(input, linear_weight.reshape(-1, hidden),
                      linear_bias.reshape(-1) if linear_bias is not None else None)
    lead = input.shape[:-1]
    if linear_weight.dim() > 2:  # (N, C * d...) -> (N, C, d...), torch's K-dim convention
        logits = logits.reshape(*lead, *linear_weight.shape[:-1])
    elif len(lead) > 1:  # probability targets over (..., V): rows of (V,)
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1, target.shape[-1]),
                             weight=weight, ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        return loss.reshape(lead) if reduction == "none" else loss
    return cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
