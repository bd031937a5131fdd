"""The vocab-parallel losses and RL log-probabilities (xent.distributed) as ops: each rank's block pass
(kernels/blocks.py, kernels/linear.py), the one exchange (exchange.py), and their autograd.

Eager calls of the losses hand the forward's gradient to backward (ops/handover.py); traced calls and
the RL log-probabilities go through declared custom ops whose collectives run inside them (opaque to the
tracer, named by their process group). The logits path needs no communication in backward; the linear
path recomputes the chunks with the rows' global lse and all-reduces the input's gradient, so every rank
runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from .. import exchange
from ..kernels import rows
from ..kernels.blocks import block_pass, linear_logit_at, logits_gradient, token_gradient_coefficients
from ..kernels.linear import linear_pass
from ..problems import LinearProblem, Options, compute_dtype, handover_keeps_range
from .cross_entropy import SCALE_GRAD, ScaleGrad, scale_input_grad_
from .declare import BackwardContext, OpFamily
from .handover import save_for_handover, saved_inputs, take_handover
from .linear import PARAMETERS

# The public API reaches the exchange's layout and its statistics through the ops.
Layout = exchange.Layout
token_statistics = exchange.token_statistics


def _resolve(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _meta(shards: exchange.Shards) -> Tensor:
    """[this rank's first class, C] on the CPU: what backward needs of the exchange, without a device sync."""
    return torch.tensor([shards.start, shards.num_classes], dtype=torch.int64, device="cpu")


def logit_transform(opts: Options, row_temperature: Tensor | None = None) -> dict:
    """What the block passes do to each logit before the row math: the cap, then the temperature (the
    options', or each row's)."""
    return dict(softcap=opts.softcap, temperature=row_temperature if row_temperature is not None else opts.temperature)


def _block_and_targets(target: Tensor, weight, opts: Options, meta: Tensor, local_size: int, cd):
    """This rank's block and the rows' targets again in backward, from forward's `meta`."""
    start, num_classes = (int(v) for v in meta.tolist())  # a CPU tensor: no device synchronisation
    flat = target.reshape(-1).long()
    w = weight.to(cd) if weight is not None else None
    block = rows.ClassBlock.shard(flat, flat != opts.ignore_index, w, start, local_size)
    return block, rows.IndexTargets.from_options(flat, weight, opts, num_classes, cd)


# ----------------------------------------------------------------------------------------------------
# The forward passes: this rank's block, the exchange, the merged rows


def logits_block_forward(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    layout: Layout,
    opts: Options,
    need_grad: bool,
    statistics: tuple = (),
    fn: str = "vocab_parallel_cross_entropy",
    row_temperature: Tensor | None = None,
    grad_out: Tensor | None = None,
):
    """(loss, this rank's (rows, C_local) gradient for a unit upstream gradient or None, per_row
    (exchange.vocab_parallel_loss), shards) of the (rows, C_local) logits `x`; `fn` names the caller in
    errors and in the exchange's header; `row_temperature`: each row's, instead of the options'; `grad_out`:
    where the gradient goes (x itself for inplace=True)."""
    num_rows, local_size = x.shape
    cd = compute_dtype(x.dtype)
    smoothing = opts.label_smoothing > 0

    # Pass 1: this block's statistics; 2: after the exchange, the gradient (global lse) in place.
    def local_statistics(block):
        stats = rows.RowStats.for_statistics(
            num_rows, statistics, target=True, dense=smoothing, dtype=cd, device=x.device
        )
        block_pass(x, stats, block, cd, smoothing, backend=opts.backend, **logit_transform(opts, row_temperature))
        return stats

    def block_max(stats):  # the logit the pass found largest, read back exactly
        return x.gather(1, stats.argmax.clamp_min(0).unsqueeze(1)).squeeze(1) if local_size else stats.shift

    block, targets, lse, loss_rows, shards, per_row = exchange.vocab_parallel_loss(
        target,
        weight,
        local_size,
        layout.group,
        layout.vocab_start,
        opts,
        cd,
        fn,
        statistics,
        local_statistics,
        block_max,
    )
    loss = targets.reduce(loss_rows)
    loss = (loss.reshape(target.shape) if opts.reduction == "none" else loss).to(x.dtype)
    grad = (
        logits_gradient(
            x,
            block,
            targets.coefficients(targets.scale(), lse, block),
            cd,
            smoothing,
            opts.backend,
            **logit_transform(opts, row_temperature),
            out=grad_out,
        )
        if need_grad
        else None
    )
    return loss, grad, per_row, shards


def linear_block_forward(p: LinearProblem, layout: Layout, fn: str = "vocab_parallel_linear_cross_entropy"):
    """(loss, lse, block, targets, shards, per_row): this rank's block's statistics and the one exchange."""
    block, targets, lse, loss_rows, shards, per_row = exchange.vocab_parallel_loss(
        p.target,
        p.weight,
        p.linear_weight.shape[0],
        layout.group,
        layout.vocab_start,
        p.options,
        p.compute_dtype,
        fn,
        p.statistics,
        lambda block: linear_pass(p, block)[0],
        lambda stats: linear_logit_at(p, stats.argmax),
    )
    loss = targets.reduce(loss_rows)
    loss = (loss.reshape(p.output_shape) if p.options.reduction == "none" else loss).to(p.output_dtype)
    return loss, lse, block, targets, shards, per_row


def row_scale(p: LinearProblem, targets: rows.IndexTargets, grad_loss: Tensor) -> Tensor:
    """d(loss)/d(row loss) times the upstream gradient of the loss (a scalar, or per row for 'none')."""
    return targets.scale(grad_loss if p.options.reduction == "none" else grad_loss.expand(p.output_shape))


def linear_backward(
    p: LinearProblem,
    group,
    block,
    targets,
    lse,
    scale,
    want,
    entropy_scale=None,
    entropy_value=None,
    reduce_input_grad: bool = True,
) -> tuple:
    """The gradients of sum_i scale_i loss_i (+ entropy_scale_i H_i, H the rows' global `entropy_value`),
    recomputing the chunks with the global lse; the input's is all-reduced (unless `reduce_input_grad` is
    False: each rank's part of it, for a caller whose own collective sums them), so every rank runs this
    (even one whose input does not require grad)."""
    _, gi, gw, gb = linear_pass(
        p,
        block,
        targets,
        scale,
        (True, *want[1:]),
        lse=lse,
        entropy_scale=entropy_scale,
        entropy_value=entropy_value,
    )
    if reduce_input_grad:
        dist.all_reduce(gi, group=group)
    gw = gw.to(p.linear_weight.dtype) if gw is not None else None
    gb = gb.to(p.linear_bias.dtype) if gb is not None else None
    return gi, gw, gb


# ----------------------------------------------------------------------------------------------------
# Eager: the forward's gradient handed to backward (logits), or the chunks recomputed (linear)


class VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, layout: Layout, opts: Options, statistics: tuple, inplace: bool = False):
        # fp16 computes its gradient in backward, with the upstream folded in (problems.handover_keeps_range):
        # from the merged rows, with no communication
        handover = handover_keeps_range(x.dtype)
        # inplace=True: the gradient over this rank's logits (as ops/cross_entropy.py's inplace Function);
        # forward bumps their version, so other saved uses of them raise autograd's error
        out = x if inplace and handover and x.is_contiguous() else None
        loss, grad, per_row, shards = logits_block_forward(
            x, target, weight, layout, opts, handover, statistics, grad_out=out
        )
        if inplace:
            if grad is not None and out is None:
                x.copy_(grad)
                grad = x
            torch.autograd.graph.increment_version(x)
        ctx.layout, ctx.opts, ctx.per_row, ctx.meta, ctx.inplace = layout, opts, per_row, _meta(shards), inplace
        save_for_handover(ctx, [grad], (x, target, weight))
        ctx.mark_non_differentiable(per_row)
        return loss, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_cross_entropy does not support double backward (create_graph=True)")
        if ctx.inplace and ctx.handed_over:
            raise RuntimeError(
                "vocab_parallel_cross_entropy(inplace=True): backward ran twice, but the logits were overwritten "
                "by their gradient the first time (retain_graph=True needs inplace=False)"
            )
        (grad,) = take_handover(ctx)
        if grad is None:  # fp16, or a second backward (retain_graph=True): from forward's merged rows
            x, target, weight = saved_inputs(ctx)
            out = x.detach() if ctx.inplace and x.is_contiguous() else None
            grad = logits_block_gradient(x, target, weight, ctx.opts, ctx.per_row, ctx.meta, grad_loss, out)
            if ctx.inplace and out is None:
                x.detach().copy_(grad)
                grad = x.detach()
            return grad, *(None,) * 6
        scale_input_grad_(grad.data, grad_loss, ctx.opts.reduction, ctx.opts.backend)
        return grad, None, None, None, None, None, None


def logits_block_gradient(
    x, target, weight, opts: Options, per_row: Tensor, meta: Tensor, upstream: Tensor, out: Tensor | None = None
) -> Tensor:
    """This rank's (rows, C_local) gradient for the loss's `upstream` gradient (folded into each row's
    coefficients), from forward's merged rows (the global lse first) and meta: no communication. `out`:
    where it goes (x itself for inplace=True)."""
    cd = compute_dtype(x.dtype)
    block, targets = _block_and_targets(target, weight, opts, meta, x.shape[1], cd)
    coefficients = targets.coefficients(targets.scale(upstream), per_row[0], block)
    transform = logit_transform(opts)
    return logits_gradient(x, block, coefficients, cd, opts.label_smoothing > 0, opts.backend, **transform, out=out)


class VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, local_linear_weight, linear_bias, target, weight, layout: Layout, p: LinearProblem):
        loss, lse, block, targets, _, per_row = linear_block_forward(p, layout)
        ctx.layout, ctx.problem, ctx.input_shape = layout, p, input.shape
        ctx.lse, ctx.targets, ctx.block = lse, targets, block
        ctx.save_for_backward(input, local_linear_weight, linear_bias)
        ctx.mark_non_differentiable(per_row)
        return loss, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "vocab_parallel_linear_cross_entropy does not support double backward (create_graph=True)"
            )
        _ = ctx.saved_tensors  # raises if an input was modified in place since forward
        p = ctx.problem
        gi, gw, gb = linear_backward(
            p,
            ctx.layout.group,
            ctx.block,
            ctx.targets,
            ctx.lse,
            row_scale(p, ctx.targets, grad_loss),
            ctx.needs_input_grad[:3],
        )
        return (gi.view(ctx.input_shape) if ctx.needs_input_grad[0] else None), gw, gb, None, None, None, None


def vocab_parallel_cross_entropy(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    layout: Layout,
    opts: Options,
    statistics: tuple,
    traced: bool,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """(loss, per_row) of the (rows, C_local) logits `x`; differentiable with respect to them (`inplace`: the
    eager gradient written over them; traced calls leave them alone)."""
    need_grad = torch.is_grad_enabled() and x.requires_grad
    if traced:
        group = exchange.group_name(layout.group)
        handover = need_grad and handover_keeps_range(x.dtype)
        call = VocabParallelCall(x, target, weight, opts, group, layout.vocab_start, handover, statistics)
        out = VOCAB_PARALLEL_CROSS_ENTROPY(call)
        return out["loss"], out["per_row"]
    if not need_grad:
        loss, _, per_row, _ = logits_block_forward(x, target, weight, layout, opts, False, statistics)
        return loss, per_row
    return VocabParallelCrossEntropy.apply(x, target, weight, layout, opts, statistics, inplace)


def vocab_parallel_linear_cross_entropy(
    p: LinearProblem, input: Tensor, target: Tensor, layout: Layout, traced: bool
) -> tuple[Tensor, Tensor]:
    """(loss, per_row) of the (R, H) rows p.input (a view of the caller's `input`) under this rank's head."""
    if traced:
        out = VOCAB_PARALLEL_LINEAR_CROSS_ENTROPY(
            VocabParallelLinearCall(p, exchange.group_name(layout.group), layout.vocab_start)
        )
        return out["loss"], out["per_row"]
    return VocabParallelLinear.apply(input, p.linear_weight, p.linear_bias, target, p.weight, layout, p)


# ----------------------------------------------------------------------------------------------------
# Traced: the declared ops, collectives inside


@dataclass(frozen=True)
class VocabParallelCall:
    logits: Tensor  # (rows, C_local)
    target: Tensor
    weight: Tensor | None
    options: Options
    group_name: str
    vocab_start: int | None
    need_grad: bool  # forward computes the unit-upstream gradient (else backward computes it, if wanted)
    statistics: tuple[str, ...]


def _logits_op(call: VocabParallelCall) -> tuple:
    """The loss and, with need_grad, this rank's (rows, C_local) gradient for a unit upstream gradient; the
    merged rows (exchange.vocab_parallel_loss' per_row, for the per-token statistics and a backward that
    computes the gradient) and the meta."""
    layout = Layout(_resolve(call.group_name), call.vocab_start)
    loss, grad, per_row, shards = logits_block_forward(
        call.logits, call.target, call.weight, layout, call.options, call.need_grad, call.statistics
    )
    return loss.clone(), grad if grad is not None else call.logits.new_empty(0), per_row, _meta(shards)


def _logits_op_fake(call: VocabParallelCall) -> tuple:
    x = call.logits
    loss = x.new_empty(() if call.options.reduction != "none" else call.target.shape)
    grad = x.new_empty(x.shape if call.need_grad else (0,))
    meta = torch.empty(2, dtype=torch.int64, device="cpu")
    return loss, grad, _per_row_like(call.statistics, x.shape[0], x), meta


def _per_row_like(statistics: tuple, num_rows: int, like: Tensor) -> Tensor:
    """The shape and dtype of exchange.vocab_parallel_loss' per_row for `statistics` (the fakes)."""
    k = 2 + len(exchange.extra_statistics(statistics))
    return like.new_empty((k, num_rows), dtype=torch.float64)


def _logits_backward(ctx: BackwardContext) -> dict:
    """No communication in backward: the op's unit-upstream gradient scaled in place, or (fp16: forward
    computed none) the gradient from the merged rows with the upstream folded in."""
    if not ctx.args.need_grad:
        return ctx.backward_op(MergedUpstream(ctx.saved["per_row"], ctx.saved["meta"], ctx.grads["loss"]))
    grad = ctx.saved["grad"]
    SCALE_GRAD(ScaleGrad(grad, ctx.grads["loss"], ctx.args.options.reduction, ctx.args.options.backend))
    return {"logits": grad}


def _save_grad_or_rows(call: VocabParallelCall, out: dict) -> dict:
    if call.need_grad:
        return {"grad": out["grad"]}
    return {
        "logits": call.logits,
        "target": call.target,
        "weight": call.weight,
        "per_row": out["per_row"],
        "meta": out["meta"],
    }


def _logits_op_backward(call: VocabParallelCall, up: MergedUpstream, want: dict) -> dict:
    grad = logits_block_gradient(call.logits, call.target, call.weight, call.options, up.per_row, up.meta, up.upstream)
    return {"logits": grad}


@dataclass(frozen=True)
class VocabParallelLinearCall:
    problem: LinearProblem  # (R, H) rows, this rank's rows of the head
    group_name: str
    vocab_start: int | None
    reduce_input_grad: bool = True  # False: backward leaves each rank its part of the input's gradient


@dataclass(frozen=True)
class MergedRows:
    """What a vocab-parallel backward op takes of its forward: the merged rows (global lse first, then the
    target logit and the entropy where computed) and [this rank's first class, C] on the CPU."""

    per_row: Tensor
    meta: Tensor


@dataclass(frozen=True)
class MergedUpstream(MergedRows):
    upstream: Tensor


VOCAB_PARALLEL_CROSS_ENTROPY = OpFamily(
    "vocab_parallel_cross_entropy",
    VocabParallelCall,
    ("loss", "grad", "per_row", "meta"),
    _logits_op,
    _logits_op_fake,
    differentiable=("logits",),
    backward_args=MergedUpstream,
    backward_impl=_logits_op_backward,
    save=_save_grad_or_rows,
    backward=_logits_backward,
)


def _linear_op(call: VocabParallelLinearCall) -> tuple:
    """(loss of the (R, H) rows, the merged rows (global lse first, which backward takes), the meta)."""
    loss, _, _, _, shards, per_row = linear_block_forward(
        call.problem, Layout(_resolve(call.group_name), call.vocab_start)
    )
    return loss.clone(), per_row, _meta(shards)


def _linear_op_fake(call: VocabParallelLinearCall) -> tuple:
    p = call.problem
    loss = p.input.new_empty(() if p.options.reduction != "none" else p.output_shape)
    return loss, _per_row_like(p.statistics, p.input.shape[0], p.input), torch.empty(2, dtype=torch.int64, device="cpu")


def _linear_op_backward(call: VocabParallelLinearCall, up: MergedUpstream, want: dict) -> dict:
    """The gradients for `upstream` (the input's all-reduced)."""
    p = replace(call.problem, statistics=())
    block, targets = _block_and_targets(
        p.target, p.weight, p.options, up.meta, p.linear_weight.shape[0], p.compute_dtype
    )
    grads = linear_backward(
        p,
        _resolve(call.group_name),
        block,
        targets,
        up.per_row[0],
        row_scale(p, targets, up.upstream),
        tuple(want[n] for n in PARAMETERS),
    )
    return dict(zip(PARAMETERS, grads))


def _save_inputs_and_rows(call, out: dict) -> dict:
    p = call.problem
    return {
        "input": p.input,
        "linear_weight": p.linear_weight,
        "linear_bias": p.linear_bias,
        "target": p.target,
        "weight": p.weight,
        "per_row": out["per_row"],
        "meta": out["meta"],
    }


def _every_rank_input(ctx: BackwardContext) -> dict:
    """The input's gradient is all-reduced: every rank computes it, wanted or not."""
    return {**ctx.want, "input": True}


VOCAB_PARALLEL_LINEAR_CROSS_ENTROPY = OpFamily(
    "vocab_parallel_linear_cross_entropy",
    VocabParallelLinearCall,
    ("loss", "per_row", "meta"),
    _linear_op,
    _linear_op_fake,
    differentiable=PARAMETERS,
    backward_args=MergedUpstream,
    backward_impl=_linear_op_backward,
    save=_save_inputs_and_rows,
    backward=lambda ctx: ctx.backward_op(
        MergedUpstream(ctx.saved["per_row"], ctx.saved["meta"], ctx.grads["loss"]), _every_rank_input(ctx)
    ),
)


# ----------------------------------------------------------------------------------------------------
# Token log-probabilities and entropies (RL) over a vocabulary split across ranks


def rl_options(ignore_index: int, temperature: float = 1.0, backend: str | None = None) -> Options:
    """A token's log-probability is minus its cross-entropy with reduction='none' and no other term, at
    the temperature (which the block passes apply to the logits in fp32)."""
    return Options("none", ignore_index, temperature=temperature, backend=backend)


def _token_outputs(per_row: Tensor, target: Tensor, ignore_index: int, with_entropy: bool, cd):
    """(log-probabilities, entropies or an empty tensor) from the merged rows: z_y - lse, and H; 0 on
    ignored tokens."""
    valid = target.long() != ignore_index
    lse, z_target = per_row[0], per_row[1]
    logprobs = torch.where(valid, z_target - lse, 0).to(cd)
    entropy = torch.where(valid, per_row[2], 0).to(cd) if with_entropy else per_row.new_empty(0, dtype=cd)
    return logprobs, entropy


def _token_outputs_like(rows_: int, like: Tensor, cd, with_entropy: bool) -> tuple:
    entropy = like.new_empty(rows_ if with_entropy else 0, dtype=cd)
    per_row = like.new_empty((3 if with_entropy else 2, rows_), dtype=torch.float64)
    return like.new_empty(rows_, dtype=cd), entropy, per_row, torch.empty(2, dtype=torch.int64, device="cpu")


@dataclass(frozen=True)
class MergedTokenUpstreams(MergedRows):
    grad_logprobs: Tensor
    grad_entropy: Tensor | None  # None without the entropy


def _token_upstreams(ctx: BackwardContext, num_rows: int, device) -> MergedTokenUpstreams:
    """Both upstream gradients (zeros for an output autograd passed None for), and forward's merged rows."""
    per_row = ctx.saved["per_row"]
    with_entropy = per_row.shape[0] > 2
    entropy = ctx.grads["entropy"] if with_entropy else None  # None when unused: no entropy term in backward
    logprob = ctx.grad_or_zeros("logprob", num_rows, per_row.dtype, device)
    return MergedTokenUpstreams(per_row, ctx.saved["meta"], logprob, entropy)


@dataclass(frozen=True)
class VocabParallelTokenCall:
    logits: Tensor  # (R, C_local)
    target: Tensor  # (R,)
    options: Options  # rl_options
    group_name: str
    vocab_start: int | None
    with_entropy: bool
    row_temperature: Tensor | None = None  # (R,) each row's temperature; None: the options'


def _token_op(call: VocabParallelTokenCall) -> tuple:
    """(log-probabilities, entropies (empty without), the merged rows (global lse, target logit[, H]), the
    meta) of the (R, C_local) logits."""
    layout = Layout(_resolve(call.group_name), call.vocab_start)
    statistics = ("entropy",) if call.with_entropy else ()
    o = call.options
    _, _, per_row, shards = logits_block_forward(
        call.logits,
        call.target,
        None,
        layout,
        o,
        False,
        statistics,
        "vocab_parallel_token_logprobs",
        call.row_temperature,
    )
    cd = compute_dtype(call.logits.dtype)
    logprobs, entropy = _token_outputs(per_row, call.target, o.ignore_index, call.with_entropy, cd)
    return logprobs, entropy, per_row, _meta(shards)


def _token_op_backward(call: VocabParallelTokenCall, up: MergedTokenUpstreams, want: dict) -> dict:
    """This rank's (R, C_local) gradient (no communication: the global lse and H are in per_row)."""
    x, cd = call.logits, compute_dtype(call.logits.dtype)
    block, targets = _block_and_targets(call.target, None, call.options, up.meta, x.shape[1], cd)
    coefficients = token_gradient_coefficients(targets, up.per_row, block, up.grad_logprobs, up.grad_entropy, cd)
    o = call.options
    transform = logit_transform(o, call.row_temperature)
    return {"logits": logits_gradient(x, block, coefficients, cd, False, o.backend, **transform)}


VOCAB_PARALLEL_TOKEN_LOGPROBS = OpFamily(
    "vocab_parallel_token_logprobs",
    VocabParallelTokenCall,
    ("logprob", "entropy", "per_row", "meta"),
    _token_op,
    lambda c: _token_outputs_like(c.logits.shape[0], c.logits, compute_dtype(c.logits.dtype), c.with_entropy),
    differentiable=("logits",),
    differentiable_outputs=("logprob", "entropy"),
    backward_args=MergedTokenUpstreams,
    backward_impl=_token_op_backward,
    save=lambda c, out: {
        "logits": c.logits,
        "target": c.target,
        "row_temperature": c.row_temperature,
        "per_row": out["per_row"],
        "meta": out["meta"],
    },
    backward=lambda ctx: ctx.backward_op(_token_upstreams(ctx, ctx.args.logits.shape[0], ctx.args.logits.device)),
)


def rl_linear_problem(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    options: Options,
    memory_budget: int | None,
    with_entropy: bool,
    row_temperature: Tensor | None = None,
) -> LinearProblem:
    """The linear problem of the RL ops: 'none' reduction, no other term, the entropy on request; the
    per-token outputs in the compute dtype."""
    cd = compute_dtype(linear_weight.dtype)
    statistics = ("entropy",) if with_entropy else ()
    n = input.shape[0]
    return LinearProblem(
        input,
        linear_weight,
        linear_bias,
        target,
        None,
        options,
        (n,),
        cd,
        0,
        memory_budget,
        statistics,
        row_temperature,
    )


def _linear_token_op(call: VocabParallelLinearCall) -> tuple:
    """As xent::vocab_parallel_token_logprobs, from the (R, H) rows and this rank's rows of the head."""
    p = call.problem
    layout = Layout(_resolve(call.group_name), call.vocab_start)
    _, _, _, _, shards, per_row = linear_block_forward(p, layout, "vocab_parallel_linear_token_logprobs")
    with_entropy = "entropy" in p.statistics
    logprobs, entropy = _token_outputs(per_row, p.target, p.options.ignore_index, with_entropy, p.compute_dtype)
    return logprobs, entropy, per_row, _meta(shards)


def _linear_token_op_backward(call: VocabParallelLinearCall, up: MergedTokenUpstreams, want: dict) -> dict:
    """The gradients (the input's all-reduced)."""
    p = call.problem
    cd = p.compute_dtype
    block, targets = _block_and_targets(p.target, None, p.options, up.meta, p.linear_weight.shape[0], cd)
    c = token_gradient_coefficients(targets, up.per_row, block, up.grad_logprobs, up.grad_entropy, cd)
    grads = linear_backward(
        p,
        _resolve(call.group_name),
        block,
        targets,
        up.per_row[0],
        c.scale,
        tuple(want[n] for n in PARAMETERS),
        c.entropy,
        c.entropy_value,
        call.reduce_input_grad,
    )
    return dict(zip(PARAMETERS, grads))


VOCAB_PARALLEL_LINEAR_TOKEN_LOGPROBS = OpFamily(
    "vocab_parallel_linear_token_logprobs",
    VocabParallelLinearCall,
    ("logprob", "entropy", "per_row", "meta"),
    _linear_token_op,
    lambda c: _token_outputs_like(
        c.problem.input.shape[0], c.problem.input, c.problem.compute_dtype, "entropy" in c.problem.statistics
    ),
    differentiable=PARAMETERS,
    differentiable_outputs=("logprob", "entropy"),
    backward_args=MergedTokenUpstreams,
    backward_impl=_linear_token_op_backward,
    save=lambda c, out: {
        "input": c.problem.input,
        "linear_weight": c.problem.linear_weight,
        "linear_bias": c.problem.linear_bias,
        "target": c.problem.target,
        "row_temperature": c.problem.row_temperature,
        "per_row": out["per_row"],
        "meta": out["meta"],
    },
    backward=lambda ctx: ctx.backward_op(
        _token_upstreams(ctx, ctx.args.problem.input.shape[0], ctx.args.problem.input.device), _every_rank_input(ctx)
    ),
)


def vocab_parallel_token_logprobs(
    x: Tensor, target: Tensor, layout: Layout, options: Options, with_entropy: bool, row_temperature=None
) -> tuple[Tensor, Tensor]:
    """(log-probabilities, entropies or empty) of the (R, C_local) logits, differentiable."""
    call = VocabParallelTokenCall(
        x, target, options, exchange.group_name(layout.group), layout.vocab_start, with_entropy, row_temperature
    )
    out = VOCAB_PARALLEL_TOKEN_LOGPROBS(call)
    return out["logprob"], out["entropy"]


def vocab_parallel_linear_token_logprobs(
    p: LinearProblem, layout: Layout, reduce_input_grad: bool = True
) -> tuple[Tensor, Tensor]:
    """(log-probabilities, entropies or empty) of the (R, H) rows under this rank's head, differentiable."""
    out = VOCAB_PARALLEL_LINEAR_TOKEN_LOGPROBS(
        VocabParallelLinearCall(p, exchange.group_name(layout.group), layout.vocab_start, reduce_input_grad)
    )
    return out["logprob"], out["entropy"]
