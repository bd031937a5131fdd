"""Vocab-parallel cross-entropy on torch.distributed: the loss over a vocabulary split across ranks.

Each rank of `group` holds the logits (or the lm_head rows) of a contiguous block of the classes; the
targets, the class weights and the options are the same on every rank. Each rank runs the row kernel
(kernels/rows.py) over its own block and packs, per row, its partial statistics: shift and sum of
exp(z - shift), the target logit if it owns the target, and <w, z - shift> for label smoothing. One
all-gather of those (plus a few header numbers per rank) gives every rank everything the loss needs:

    lse   = log sum_k sumexp_k * exp(shift_k)                     (merged in float64)
    z_y   = the owning rank's target logit
    <w, lse - z> = sum_k [ W_k (lse - shift_k) - <w_k, z_k - shift_k> ]     W_k = the block's weight sum

so label smoothing uses the global number of classes and the global weights (Megatron's uses the local
vocabulary size, which is wrong), and results equal the single-process loss. The gradient of the logits
is local: exp(z - lse) times the row coefficients, minus the target term on the owning rank. The logits
path needs no communication in backward; the linear path all-reduces the input gradient.

Per-token statistics ride on the same exchange: the entropy adds each block's <e, z - shift> (merged by
rows.merge_block_entropy), the argmax each block's largest logit and its global column (the first column
among the blocks that reach the maximum, rows.merge_block_argmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._validate import (
    as_index,
    check_linear,
    check_statistics,
    check_temperature,
    check_tensor,
    check_weight_shape,
    vocab_parallel_options,
)
from .kernels import backend_for, rows
from .kernels.driver import Chunk, RowPass
from .kernels.linear import linear_pass
from .kernels.portable import CHUNK_ELEMENTS
from .ops import (
    linear_problem_from_args,
    op_statistics,
    save_for_handover,
    saved_inputs,
    scale_input_grad_,
    take_handover,
)
from .problems import FUNC, TRACED, LinearProblem, Options, TokenStatistics, route

# Per-rank header in the gathered payload: what every rank must agree on, and its block of classes.
_NUMEL, _NDIM, _DIM0, _CHECKSUM, _SIZE, _START, _WEIGHT_SUM = range(7)
# ... and the options every rank must have passed alike (checked after the exchange, on every rank)
_OPTIONS = ("label_smoothing", "z_loss", "ignore_index", "reduction", "class weights")
# ... and which function the rank is in: torch.compile may order two vocab-parallel calls in one graph
# differently on different ranks (inductor's peak-memory reordering sees rank-dependent block sizes), and
# a collective paired across different calls must raise, not mix their numbers
_CALL = 7 + len(_OPTIONS)
_HEADER = _CALL + 1
_CALL_CODES = {
    "vocab_parallel_cross_entropy": 1.0,
    "vocab_parallel_linear_cross_entropy": 2.0,
    "vocab_parallel_token_logprobs": 3.0,
    "vocab_parallel_linear_token_logprobs": 4.0,
}
_REDUCTION_CODES = {"none": 0.0, "mean": 1.0, "sum": 2.0}


@dataclass(frozen=True)
class Layout:
    """How the vocabulary is split: over the ranks of `group`, this rank's block starting at `vocab_start`
    (None: blocks in rank order, sizes gathered)."""

    group: object
    vocab_start: int | None


@dataclass(frozen=True)
class Shards:
    """The group's split of the vocabulary: rank k holds classes [starts[k], starts[k] + sizes[k])."""

    rank: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def num_classes(self) -> int:
        return sum(self.sizes)


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab-parallel cross-entropy needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(mine: Tensor, group) -> Tensor:
    """(world, *mine.shape): every rank's `mine`."""
    _, world = _group_info(group)
    out = torch.empty((world, *mine.shape), dtype=mine.dtype, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), mine.reshape(-1), group=group)
    return out


def _identity(target: Tensor) -> Tensor:
    """(numel, ndim, dim 0, checksum) of the targets, float64 on their device, without a host sync: they
    differ when two ranks' targets do (the position-weighted checksum is exact in float64)."""
    flat = target.reshape(-1).long()
    positions = torch.arange(flat.numel(), device=flat.device) % 997 + 1
    checksum = (flat.double() + 1.0).mul(positions).sum().reshape(1)
    meta = torch.tensor([flat.numel(), target.dim(), target.shape[0] if target.dim() else 1], dtype=torch.float64)
    return torch.cat([meta.to(flat.device, non_blocking=True), checksum])


def _check_same_call(codes: list[float], fn: str) -> None:
    """Every rank's share of a collective must come from the same function (see _CALL)."""
    if any(code != codes[0] for code in codes):
        names = {code: name for name, code in _CALL_CODES.items()}
        raise RuntimeError(
            f"{fn}: the ranks reached this collective from different calls (per rank: "
            f"{[names.get(code, code) for code in codes]}): every rank must make its vocab-parallel calls in the "
            f"same order. Under torch.compile, inductor can reorder two such calls in one graph differently on "
            f"ranks whose blocks differ in size: compile them apart, or set "
            f"torch._inductor.config.reorder_for_peak_memory = False"
        )


def _check_same_targets(identity: list[list[float]], fn: str) -> None:
    """identity: every rank's _identity, on the host; raise on every rank alike when they differ."""
    if any(row != identity[0] for row in identity):
        raise ValueError(
            f"{fn}: the ranks' targets differ (every rank must pass the same target): per rank "
            f"(numel, ndim, dim 0) = {[tuple(int(v) for v in row[:3]) for row in identity]}, "
            f"checksums {[row[3] for row in identity]}"
        )


def _shards_from_sizes(target: Tensor, local_size: int, group, fn: str, extra: tuple[str, ...]) -> Shards:
    """vocab_start=None: gather every rank's block size (and target identity, and which statistics widen
    the main exchange) first; blocks in rank order."""
    rank, _ = _group_info(group)
    size = torch.tensor([float(local_size), _EXTRA_CODES[extra], _CALL_CODES[fn]], dtype=torch.float64)
    table = _all_gather(torch.cat([_identity(target), size.to(target.device, non_blocking=True)]), group).tolist()
    _check_same_call([row[6] for row in table], fn)
    _check_same_targets([row[:4] for row in table], fn)
    codes = [row[5] for row in table]
    if any(code != codes[0] for code in codes):
        names = {code: list(names) for names, code in _EXTRA_CODES.items()}
        raise ValueError(
            f"{fn}: every rank must ask for the same return_stats; per rank, the ones beyond lse, logprob and "
            f"z_loss: {[names[code] for code in codes]}"
        )
    sizes = tuple(int(row[4]) for row in table)
    return Shards(rank, tuple(sum(sizes[:k]) for k in range(len(sizes))), sizes)


# The statistics that need more than the global lse and target logit, each a share per block in the main
# exchange: the entropy (one number per row and rank), the argmax (the block's largest logit and its
# column). Their code goes into vocab_start=None's first gather, so that ranks asking differently raise.
_EXTRA_CODES = {(): 0.0, ("entropy",): 1.0, ("argmax",): 2.0, ("entropy", "argmax"): 3.0}


def _extra_statistics(statistics: tuple) -> tuple[str, ...]:
    """Which of the exchange's optional shares `statistics` needs ('correct' is the argmax's, as for the
    single-process ops)."""
    wanted = op_statistics(statistics)
    return tuple(name for name in ("entropy", "argmax") if name in wanted)


def _exchange_statistics(
    stats: rows.RowStats,
    block: rows.ClassBlock,
    target: Tensor,
    start: int,
    local_size: int,
    group,
    opts: Options,
    block_max: Tensor | None,
    fn: str,
) -> tuple[Tensor, ...]:
    """The one collective of the forward pass: every rank's header (with the call it comes from, `fn`) and
    per-row statistics.

    Returns the (world, _HEADER) header and shift, sumexp, target logit, owned, dense_rel, each (world, rows),
    and the list of the requested extra shares (world, rows): entropy_rel with stats.entropy_rel, the
    block's largest logit (`block_max`) and its global column with stats.argmax. All float64, still on
    the device. The payload's size never depends on the options (the smoothing term's slot is sent as
    zeros without smoothing), so ranks that disagree on them still complete the collective and then all
    raise the same error, instead of aborting in a size mismatch; it does depend on the extra statistics.
    """
    num_rows = stats.shift.numel()
    dense_rel = stats.dense_rel if stats.dense_rel is not None else torch.zeros_like(stats.shift)
    parts = [stats.shift, stats.sumexp, torch.where(block.owned, stats.target_logit, 0), block.owned, dense_rel]
    if stats.entropy_rel is not None:
        parts.append(stats.entropy_rel)
    if stats.argmax is not None:
        has_classes = stats.argmax >= 0
        parts.append(torch.where(has_classes, block_max.double(), -math.inf))
        parts.append(torch.where(has_classes, (stats.argmax + start).double(), math.inf))
    weight_sum = (
        block.class_weight.double().sum().reshape(1)
        if block.class_weight is not None
        else torch.tensor([float(local_size)], dtype=torch.float64).to(target.device, non_blocking=True)
    )
    place = torch.tensor([float(local_size), float(start)], dtype=torch.float64).to(target.device, non_blocking=True)
    options = torch.tensor(
        [
            opts.label_smoothing,
            opts.z_loss,
            float(opts.ignore_index),
            _REDUCTION_CODES[opts.reduction],
            float(block.class_weight is not None),
            _CALL_CODES[fn],
        ],
        dtype=torch.float64,
    ).to(target.device, non_blocking=True)
    mine = torch.cat([_identity(target), place, weight_sum, options] + [p.double() for p in parts])
    table = _all_gather(mine, group)
    header, bodies = table[:, :_HEADER], table[:, _HEADER:].reshape(table.shape[0], len(parts), num_rows)
    shift, sumexp, target_logit, owned, gathered_dense, *extras = bodies.unbind(1)
    return header, shift, sumexp, target_logit, owned, gathered_dense if stats.dense_rel is not None else None, extras


def _check_same_options(table: list[list[float]], fn: str) -> None:
    """Every rank must have passed the same options (else each would compute a different loss)."""
    for k, name in enumerate(_OPTIONS):
        values = [row[7 + k] for row in table]
        if any(v != values[0] for v in values):
            if name == "reduction":
                values = [{c: r for r, c in _REDUCTION_CODES.items()}[v] for v in values]
            elif name == "class weights":
                values = ["given" if v else "None" for v in values]
            raise ValueError(f"{fn}: every rank must pass the same {name}; per rank: {values}")


def _check_tiling(shards: Shards, fn: str) -> None:
    """The blocks must cover [0, C) exactly once (checked on every rank from the same gathered data)."""
    end = 0
    for start, size in sorted(zip(shards.starts, shards.sizes)):
        if start != end or size < 0:
            raise ValueError(
                f"{fn}: the ranks' vocabulary blocks (start, size) = "
                f"{list(zip(shards.starts, shards.sizes))} do not tile [0, C): pass each rank's "
                f"vocab_start, or None to place the blocks in rank order"
            )
        end = start + size


def _merge(
    header: Tensor, shift, sumexp, target_logit, owned, dense_rel, extras: list, extra: tuple, valid: Tensor, eps: float
):
    """Global lse, target logit and smoothing term per row from the gathered statistics (on the device),
    the rows whose target no rank (or two) owns, and the `extra` statistics' merged rows (entropy, argmax
    as float64)."""
    lse = rows.merge_blocks(shift, sumexp)
    dense_ce = None
    if eps > 0:
        mass, sizes = header[:, _WEIGHT_SUM].unsqueeze(1), header[:, _SIZE].unsqueeze(1)
        # a block without classes contributes nothing (its lse is -inf)
        dense_ce = torch.where(sizes > 0, rows.dense_cross_entropy(lse, shift, mass, dense_rel), 0).sum(0)
    merged = []
    if "entropy" in extra:
        merged.append(rows.merge_block_entropy(lse, shift, sumexp, extras.pop(0)))
    if "argmax" in extra:
        merged.append(rows.merge_block_argmax(*extras).double())
    return lse, target_logit.sum(0), dense_ce, valid & (owned.sum(0) != 1), merged


def _block(flat: Tensor, valid: Tensor, weight: Tensor | None, cd: torch.dtype, start: int, size: int):
    """This rank's classes [start, start + size) seen from the flat targets (and its class weights)."""
    return rows.ClassBlock.shard(flat, valid, weight.to(cd) if weight is not None else None, start, size)


def _check_weight_size(weight: Tensor | None, shards: Shards) -> None:
    check_weight_shape(weight, shards.num_classes)


# ----------------------------------------------------------------------------------------------------
# Logits path


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_stats: str | Sequence[str] | None = None,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""Cross-entropy of logits whose classes are split across the ranks of `group`, without gathering them.

    Equals ``xent.cross_entropy(full_logits.reshape(-1, C), target.reshape(-1), ...)`` (reshaped back for
    'none') where ``full_logits`` concatenates every rank's block in class order: same loss, and each
    rank's gradient is that loss's gradient for its block.

    Args:
        local_logits (Tensor): this rank's logits, shape :math:`(..., C_{local})`.
        target (Tensor): global class indices, shape :math:`(...)`, the same on every rank.
        group: the process group over which the vocabulary is split (default: the world).
        vocab_start (int, optional): this rank's first class. None: the blocks follow rank order, their
            sizes gathered by one extra small all-gather (which also checks that all ranks have the same
            targets before the main exchange).
        weight (Tensor, optional): the full :math:`(C,)` class weights, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss: as :func:`xent.cross_entropy`.
        return_stats: names of per-token statistics, as :func:`xent.cross_entropy`: global values, the
            same on every rank, merged in the one exchange (every rank must ask for the same ones).
            Returns ``(loss, stats)`` then.

    Forward runs one all-gather (two with ``vocab_start=None``) of 5 float64 numbers per row and rank (one
    more for the entropy, two more for the argmax);
    backward needs no communication. Differing targets across ranks, blocks that do not tile the
    vocabulary, out-of-range targets and a wrong weight size raise on every rank alike; ranks with
    different *numbers* of targets are caught only with ``vocab_start=None`` (the collective itself would
    fail otherwise).
    """
    fn = "vocab_parallel_cross_entropy"
    opts = vocab_parallel_options(
        local_logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, fn, "local_logits"
    )
    statistics = check_statistics(return_stats, fn)
    if local_logits.dim() == 0 or tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(
            f"{fn}: expected target of shape {list(local_logits.shape[:-1])} (local_logits without "
            f"its class dimension), got {list(target.shape)}"
        )
    need_grad = torch.is_grad_enabled() and local_logits.requires_grad
    how = route(local_logits, target, weight)
    if how == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    if how == TRACED:  # torch.compile / export: the custom op, opaque to the tracer, collectives inside
        group_name = _group_name(group)
        # with no gradient to take, the op itself: dynamo (torch 2.13) fails tracing this autograd.Function
        # when no input requires grad
        apply = _TracedVocabParallelCrossEntropy.apply if need_grad else torch.ops.xent.vocab_parallel_cross_entropy
        loss, _, per_row = apply(
            local_logits,
            target,
            weight,
            group_name,
            vocab_start,
            opts.reduction,
            opts.ignore_index,
            opts.label_smoothing,
            opts.z_loss,
            need_grad,
            ",".join(statistics),
        )
    else:
        layout = Layout(group, vocab_start)
        if not need_grad:
            loss, _, per_row, _ = _logits_forward(local_logits, target, weight, layout, opts, False, statistics)
        else:
            loss, per_row = _VocabParallelCrossEntropy.apply(local_logits, target, weight, layout, opts, statistics)
    if return_stats is None:
        return loss
    cd = torch.float64 if local_logits.dtype == torch.float64 else torch.float32
    return loss, _statistics(statistics, per_row, target, opts, cd)


def _statistics(statistics: tuple, per_row: Tensor, target: Tensor, opts: Options, cd) -> TokenStatistics:
    """The per-token statistics from the merged rows (_vocab_parallel_loss' per_row: global lse, target
    logit, then entropy and argmax where asked), by rows.token_statistics_of_rows' formulas."""
    lse, z_target, *merged = per_row.unbind(0)
    extra = _extra_statistics(statistics)
    entropy = merged[extra.index("entropy")] if "entropy" in extra else None
    argmax = merged[extra.index("argmax")].long() if "argmax" in extra else None
    # shift = lse and sumexp = 1 give lse = shift + log 1, and entropy = log 1 - entropy_rel / 1
    stats = rows.RowStats(
        lse, torch.ones_like(lse), z_target, None, argmax, entropy.neg() if entropy is not None else None
    )
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch
    values = rows.token_statistics_of_rows(stats, statistics, flat != opts.ignore_index, flat, opts.z_loss, cd)
    return TokenStatistics.of(values, tuple(target.shape))


def _vocab_parallel_loss(
    target: Tensor,
    weight: Tensor | None,
    local_size: int,
    group,
    vocab_start,
    opts: Options,
    cd: torch.dtype,
    fn: str,
    statistics: tuple,
    local_statistics,
    block_max,
):
    """The forward of both vocab-parallel losses: this rank's block of classes, its statistics (from
    local_statistics(block) -> RowStats, with what `statistics` needs), the one exchange, and the merged
    per-row losses. block_max(stats) gives the block's largest logit per row (for the argmax).

    The checks that must raise on every rank alike read the small gathered header back to the host once.
    Returns (block, targets, lse, loss_rows, shards) for the gradient pass, and per_row: float64
    (2 + k, rows) holding the rows' global lse, target logit, then their entropy and argmax where
    `statistics` needs them (_statistics reads it).
    """
    rank, _ = _group_info(group)
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch
    valid = flat != opts.ignore_index
    extra = _extra_statistics(statistics)
    shards = None
    if vocab_start is None:
        shards = _shards_from_sizes(target, local_size, group, fn, extra)
        _check_weight_size(weight, shards)
    start = shards.start if shards is not None else as_index(vocab_start, "vocab_start", fn)
    block = _block(flat, valid, weight, cd, start, local_size)
    stats = local_statistics(block)
    local_max = block_max(stats) if stats.argmax is not None else None
    header, *gathered = _exchange_statistics(stats, block, target, start, local_size, group, opts, local_max, fn)
    lse, z_target, dense_ce, unowned, merged = _merge(header, *gathered, extra, valid, opts.label_smoothing)
    host = torch.cat([header.reshape(-1), unowned.any().double().reshape(1)]).tolist()
    table = [host[k * _HEADER : (k + 1) * _HEADER] for k in range(header.shape[0])]
    _check_same_call([row[_CALL] for row in table], fn)
    _check_same_targets([row[:_SIZE] for row in table], fn)
    _check_same_options(table, fn)
    shards = Shards(rank, tuple(int(row[_START]) for row in table), tuple(int(row[_SIZE]) for row in table))
    _check_tiling(shards, fn)
    _check_weight_size(weight, shards)
    if host[-1]:
        first = int(flat[unowned.nonzero()[0, 0]])
        raise IndexError(
            f"Target {first} is out of bounds. (It must be a class index in "
            f"[0, {shards.num_classes - 1}] or ignore_index.)"
        )
    targets = rows.IndexTargets.from_options(flat, weight, opts, shards.num_classes, cd)
    per_row = torch.stack([lse, z_target, *merged])
    return block, targets, lse, targets.row_losses(lse, z_target, dense_ce).to(cd), shards, per_row


def _logits_forward(
    local_logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    layout: Layout,
    opts: Options,
    need_grad: bool,
    statistics: tuple = (),
    fn: str = "vocab_parallel_cross_entropy",
):
    """(loss, this rank's gradient for a unit upstream gradient or None, per_row (_vocab_parallel_loss),
    shards); `fn` names the caller in errors (and in the exchange's header)."""
    group, vocab_start = layout.group, layout.vocab_start
    x = local_logits.reshape(math.prod(local_logits.shape[:-1]), local_logits.shape[-1])  # not -1: C_local may be 0
    num_rows, local_size = x.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    smoothing = opts.label_smoothing > 0

    # Pass 1: this block's statistics; 2: after the exchange, the gradient (global lse) in place.
    def local_statistics(block):
        stats = rows.RowStats.for_statistics(
            num_rows, statistics, target=True, dense=smoothing, dtype=cd, device=x.device
        )
        _block_pass(x, stats, block, cd, smoothing)
        return stats

    def block_max(stats):  # the logit the pass found largest, read back exactly
        return x.gather(1, stats.argmax.clamp_min(0).unsqueeze(1)).squeeze(1) if local_size else stats.shift

    block, targets, lse, loss_rows, shards, per_row = _vocab_parallel_loss(
        target,
        weight,
        local_size,
        group,
        vocab_start,
        opts,
        cd,
        fn,
        statistics,
        local_statistics,
        block_max,
    )
    loss = targets.reduce(loss_rows)
    loss = (loss.reshape(target.shape) if opts.reduction == "none" else loss).to(local_logits.dtype)
    grad = (
        _logits_gradient(x, block, targets.coefficients(targets.scale(), lse, block), cd, smoothing)
        if need_grad
        else None
    )
    return loss, grad, per_row, shards


def _logits_gradient(x: Tensor, block: rows.ClassBlock, coefficients: rows.ChunkCoefficients, cd, smoothing: bool):
    """This rank's (rows, C_local) gradient, in x's dtype: one pass of the row kernel over the block with the
    rows' global coefficients (their statistics are recomputed as scratch; the entropy term's needs e log e)."""
    num_rows, local_size = x.shape
    grad = torch.empty((num_rows, local_size), dtype=x.dtype, device=x.device)
    entropy = coefficients.entropy is not None
    scratch = rows.RowStats.empty(num_rows, target=False, dense=False, dtype=cd, device=x.device, entropy=entropy)
    _block_pass(x, scratch, block, cd, smoothing, grad=grad, coefficients=coefficients)
    return grad


def _block_pass(
    x: Tensor,
    stats: rows.RowStats,
    block: rows.ClassBlock,
    cd: torch.dtype,
    smoothing: bool,
    grad: Tensor | None = None,
    coefficients: rows.ChunkCoefficients | None = None,
) -> None:
    """Chunks of this rank's logits through the row kernel: statistics, and with `grad` the gradient."""
    num_rows, size = x.shape
    if not num_rows or not size:
        rows.classless_stats(stats)
        return
    backend = backend_for(x.device, cd)
    step = max(1, CHUNK_ELEMENTS // size)
    direct = x.dtype == cd and x.stride(1) == 1
    in_grad = grad is not None and grad.dtype == cd
    scratch = None if in_grad else torch.empty(min(step, num_rows) * size, dtype=cd, device=x.device)

    def chunks():
        for r0 in range(0, num_rows, step):
            r1 = min(num_rows, r0 + step)
            ws = grad[r0:r1] if in_grad else scratch[: (r1 - r0) * size].view(r1 - r0, size)
            yield Chunk(r0, r1, ws, lambda ws=ws, r0=r0, r1=r1: ws.copy_(x[r0:r1]), source=x[r0:r1] if direct else None)
            if grad is not None and not in_grad:
                grad[r0:r1].copy_(ws)

    RowPass.over_block(
        backend, stats, block, smoothing, coefficients=coefficients, unshifted=x.device.type == "cpu"
    ).run(chunks())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, weight, layout: Layout, opts: Options, statistics: tuple):
        loss, grad, per_row, _ = _logits_forward(local_logits, target, weight, layout, opts, True, statistics)
        ctx.layout, ctx.opts, ctx.shape = layout, opts, local_logits.shape
        save_for_handover(ctx, [grad], (local_logits, target, weight))
        ctx.mark_non_differentiable(per_row)
        return loss, per_row

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row):
        if torch.is_grad_enabled():
            raise RuntimeError("vocab_parallel_cross_entropy does not support double backward (create_graph=True)")
        (grad,) = take_handover(ctx)
        if grad is None:  # a second backward (retain_graph=True): recompute, collectively, on every rank
            grad = _logits_forward(*saved_inputs(ctx), ctx.layout, ctx.opts, need_grad=True)[1]
        scale_input_grad_(grad.data, grad_loss, ctx.opts.reduction)
        return grad.view(ctx.shape), None, None, None, None, None


@torch.library.custom_op("xent::vocab_parallel_cross_entropy", mutates_args=())
def _vocab_parallel_op(
    local_logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    group_name: str,
    vocab_start: Optional[int],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    need_grad: bool,
    statistics: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss and, with need_grad, this rank's (rows, C_local) gradient for a unit upstream gradient; the
    merged rows (_vocab_parallel_loss' per_row, for the per-token `statistics`, comma-separated names)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    layout = Layout(_resolve_process_group(group_name), vocab_start)
    opts = Options(reduction, ignore_index, label_smoothing, z_loss, None)
    loss, grad, per_row, _ = _logits_forward(
        local_logits, target, weight, layout, opts, need_grad, _statistics_of(statistics)
    )
    return loss.clone(), grad if grad is not None else local_logits.new_empty(0), per_row


@_vocab_parallel_op.register_fake
def _(
    local_logits,
    target,
    weight,
    group_name,
    vocab_start,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    need_grad,
    statistics,
):
    rows, size = math.prod(local_logits.shape[:-1]), local_logits.shape[-1]
    loss = local_logits.new_empty(() if reduction != "none" else target.shape)
    grad = local_logits.new_empty((rows, size) if need_grad else (0,))
    return loss, grad, _per_row_like(statistics, rows, local_logits)


def _statistics_of(names: str) -> tuple:
    """The ops' comma-separated statistics as a tuple of names."""
    return tuple(names.split(",")) if names else ()


def _per_row_like(statistics: str, num_rows: int, like: Tensor) -> Tensor:
    """The shape and dtype of _vocab_parallel_loss' per_row for the ops' `statistics` (their fakes)."""
    k = 2 + len(_extra_statistics(_statistics_of(statistics)))
    return like.new_empty((k, num_rows), dtype=torch.float64)


class _TracedVocabParallelCrossEntropy(torch.autograd.Function):
    """Autograd for xent::vocab_parallel_cross_entropy while traced: the op's unit-upstream gradient is
    saved and scaled in place by xent::scale_grad_ (no communication in backward)."""

    @staticmethod
    def forward(local_logits, target, weight, *options):
        return torch.ops.xent.vocab_parallel_cross_entropy(local_logits, target, weight, *options)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.reduction, ctx.shape = inputs[5], inputs[0].shape
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_buffer, _grad_per_row):
        (grad,) = ctx.saved_tensors
        torch.ops.xent.scale_grad_(grad, grad_loss, ctx.reduction)
        return grad.view(ctx.shape), None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Linear path


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    memory_budget: int | None = None,
    return_stats: str | Sequence[str] | None = None,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""Linear cross-entropy with the head's rows split across the ranks of `group`.

    ``input`` :math:`(..., H)` is replicated (the same on every rank); ``local_linear_weight``
    :math:`(C_{local}, H)` and ``linear_bias`` :math:`(C_{local},)` are this rank's rows of the head. The
    local logits are never materialized in full: forward runs the linear cross-entropy's chunk loop for
    this block's statistics, one all-gather (two with ``vocab_start=None``), and backward recomputes the
    chunks for the gradients (one more matmul than the single-process path) and all-reduces the input
    gradient, so every rank holds the full gradient of ``input``. Options (``return_stats`` too) as
    :func:`vocab_parallel_cross_entropy`.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    opts = vocab_parallel_options(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, fn, "input")
    statistics = check_statistics(return_stats, fn)
    check_tensor(local_linear_weight, "local_linear_weight", fn)
    check_tensor(linear_bias, "linear_bias", fn, optional=True)
    check_linear(input, local_linear_weight, linear_bias)
    if local_linear_weight.dim() != 2:
        raise RuntimeError(f"{fn}: local_linear_weight must be (C_local, H), got {list(local_linear_weight.shape)}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: expected target of shape {list(input.shape[:-1])} (input without its hidden "
            f"dimension), got {list(target.shape)}"
        )
    x2 = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])  # not -1: ambiguous when H = 0
    problem = LinearProblem(
        x2,
        local_linear_weight,
        linear_bias,
        target.reshape(-1),
        weight,
        opts,
        tuple(target.shape),
        input.dtype,
        memory_budget=memory_budget,
        statistics=statistics,
    )
    how = route(input, local_linear_weight, linear_bias, target, weight)
    if how == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    if how == TRACED:  # torch.compile / export: custom ops, collectives inside
        group_name = _group_name(group)
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, local_linear_weight, linear_bias)
        )
        apply = _TracedVocabParallelLinear.apply if wants_grad else torch.ops.xent.vocab_parallel_linear_cross_entropy
        loss, per_row, _ = apply(
            x2,
            local_linear_weight,
            linear_bias,
            problem.target,
            weight,
            group_name,
            vocab_start,
            opts.reduction,
            opts.ignore_index,
            opts.label_smoothing,
            opts.z_loss,
            -1 if memory_budget is None else memory_budget,
            ",".join(statistics),
        )
        loss = loss.reshape(problem.output_shape) if opts.reduction == "none" else loss
    else:
        loss, per_row = _VocabParallelLinear.apply(
            input, local_linear_weight, linear_bias, target, weight, Layout(group, vocab_start), problem
        )
    if return_stats is None:
        return loss
    return loss, _statistics(statistics, per_row, target, opts, problem.compute_dtype)


def _linear_forward(p: LinearProblem, layout: Layout, fn: str = "vocab_parallel_linear_cross_entropy"):
    """(loss, lse, block, targets, shards, per_row): this rank's block's statistics and the one exchange."""
    block, targets, lse, loss_rows, shards, per_row = _vocab_parallel_loss(
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
        lambda stats: _linear_logit_at(p, stats.argmax),
    )
    loss = targets.reduce(loss_rows)
    loss = (loss.reshape(p.output_shape) if p.options.reduction == "none" else loss).to(p.output_dtype)
    return loss, lse, block, targets, shards, per_row


def _linear_logit_at(p: LinearProblem, column: Tensor) -> Tensor:
    """Each row's logit at `column` of this rank's head (its largest, for the argmax across blocks): one
    dot product per row in the compute dtype, rounded to the input's dtype as F.linear rounds the logits
    the pass compared (so that ties in bf16 logits stay ties). A dot product can still round differently
    from the GEMM's blocked sum: blocks whose maxima differ by less than that may resolve either way
    (README: limitations). Rows go in chunks, so that the gathered head rows stay within CHUNK_ELEMENTS."""
    if not p.linear_weight.shape[0]:
        return torch.full(column.shape, -math.inf, dtype=p.compute_dtype, device=column.device)
    cd, index = p.compute_dtype, column.clamp_min(0)
    out = torch.empty(column.shape, dtype=cd, device=column.device)
    step = max(1, CHUNK_ELEMENTS // max(1, p.input.shape[1]))
    for r0 in range(0, column.shape[0], step):
        rows_at = index[r0 : r0 + step]
        logit = torch.linalg.vecdot(p.input[r0 : r0 + step].to(cd), p.linear_weight.index_select(0, rows_at).to(cd))
        if p.linear_bias is not None:
            logit = logit + p.linear_bias.index_select(0, rows_at).to(cd)
        out[r0 : r0 + step] = logit.to(p.input.dtype)
    return out


def _row_scale(p: LinearProblem, targets: rows.IndexTargets, grad_loss: Tensor) -> Tensor:
    """d(loss)/d(row loss) times the upstream gradient of the loss (a scalar, or per row for 'none')."""
    return targets.scale(grad_loss if p.options.reduction == "none" else grad_loss.expand(p.output_shape))


def _linear_backward(
    p: LinearProblem, group, block, targets, lse, scale, want, entropy_scale=None, entropy_value=None
) -> tuple:
    """The gradients of sum_i scale_i loss_i (+ entropy_scale_i H_i, H the rows' global `entropy_value`),
    recomputing the chunks with the global lse; the input's is all-reduced, so every rank runs this (even
    one whose input does not require grad)."""
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
    dist.all_reduce(gi, group=group)
    gw = gw.to(p.linear_weight.dtype) if gw is not None else None
    gb = gb.to(p.linear_bias.dtype) if gb is not None else None
    return gi, gw, gb


class _VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, local_linear_weight, linear_bias, target, weight, layout: Layout, p: LinearProblem):
        loss, lse, block, targets, _, per_row = _linear_forward(p, layout)
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
        gi, gw, gb = _linear_backward(
            p,
            ctx.layout.group,
            ctx.block,
            ctx.targets,
            ctx.lse,
            _row_scale(p, ctx.targets, grad_loss),
            ctx.needs_input_grad[:3],
        )
        return (gi.view(ctx.input_shape) if ctx.needs_input_grad[0] else None), gw, gb, None, None, None, None


def _op_problem(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    memory_budget,
    statistics: str = "",
) -> LinearProblem:
    """The linear ops' problem (ops.linear_problem_from_args) for a vocab-parallel head: no softcap, the
    input's dtype for the loss, chunks sized from the budget, the ops' `statistics`."""
    problem = linear_problem_from_args(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        None,
        input.dtype,
        0,
        memory_budget,
    )
    return replace(problem, statistics=_statistics_of(statistics))


@torch.library.custom_op("xent::vocab_parallel_linear_cross_entropy", mutates_args=())
def _vocab_parallel_linear_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    group_name: str,
    vocab_start: Optional[int],
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    memory_budget: int,
    statistics: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss of the (R, H) rows, the merged rows (_vocab_parallel_loss' per_row: global lse first, which
    the backward op takes), [this rank's first class, C] on the CPU)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    p = _op_problem(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        memory_budget,
        statistics,
    )
    loss, _, _, _, shards, per_row = _linear_forward(p, Layout(_resolve_process_group(group_name), vocab_start))
    meta = torch.tensor([shards.start, shards.num_classes], dtype=torch.int64)
    return loss.clone(), per_row, meta


@_vocab_parallel_linear_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    group_name,
    vocab_start,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    memory_budget,
    statistics,
):
    loss = input.new_empty(() if reduction != "none" else (input.shape[0],))
    per_row = _per_row_like(statistics, input.shape[0], input)
    return loss, per_row, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("xent::vocab_parallel_linear_cross_entropy_backward", mutates_args=())
def _vocab_parallel_linear_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    weight: Optional[Tensor],
    lse: Tensor,
    meta: Tensor,
    upstream: Tensor,
    group_name: str,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    memory_budget: int,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients for `upstream` (the input's all-reduced; empty tensors for those not wanted)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    p = _op_problem(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        z_loss,
        memory_budget,
    )
    start, num_classes = (int(v) for v in meta.tolist())  # a CPU tensor: no device synchronisation
    flat = target.reshape(-1).long()
    block = _block(flat, flat != ignore_index, weight, p.compute_dtype, start, linear_weight.shape[0])
    targets = rows.IndexTargets.from_options(flat, weight, p.options, num_classes, p.compute_dtype)
    grads = _linear_backward(
        p,
        _resolve_process_group(group_name),
        block,
        targets,
        lse,
        _row_scale(p, targets, upstream),
        (True, want_weight, want_bias),
    )
    return tuple(g if g is not None else input.new_empty(0) for g in grads)


@_vocab_parallel_linear_backward_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    weight,
    lse,
    meta,
    upstream,
    group_name,
    reduction,
    ignore_index,
    label_smoothing,
    z_loss,
    memory_budget,
    want_weight,
    want_bias,
):
    return (
        input.new_empty(input.shape),
        linear_weight.new_empty(linear_weight.shape) if want_weight else input.new_empty(0),
        linear_bias.new_empty(linear_bias.shape) if want_bias and linear_bias is not None else input.new_empty(0),
    )


class _TracedVocabParallelLinear(torch.autograd.Function):
    """Autograd for xent::vocab_parallel_linear_cross_entropy while traced: backward recomputes the chunks
    with the saved global lse and all-reduces the input's gradient (xent::..._backward)."""

    @staticmethod
    def forward(input, linear_weight, linear_bias, target, weight, group_name, vocab_start, *options):
        return torch.ops.xent.vocab_parallel_linear_cross_entropy(
            input, linear_weight, linear_bias, target, weight, group_name, vocab_start, *options
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group_name, ctx.options = inputs[5], inputs[7:12]  # not the statistics: backward needs none
        ctx.want = (inputs[1].requires_grad, inputs[2] is not None and inputs[2].requires_grad)
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*inputs[:5], output[1], output[2])

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_row, _grad_meta):
        input, w, b, target, weight, per_row, meta = ctx.saved_tensors
        gi, gw, gb = torch.ops.xent.vocab_parallel_linear_cross_entropy_backward(
            input, w, b, target, weight, per_row[0], meta, grad_loss, ctx.group_name, *ctx.options, *ctx.want
        )
        return (gi, gw if ctx.want[0] else None, gb if ctx.want[1] else None) + (None,) * 10


# ----------------------------------------------------------------------------------------------------
# Token log-probabilities and entropies (RL) over a vocabulary split across ranks


def vocab_parallel_token_logprobs(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r""":func:`xent.token_logprobs_from_logits` for logits whose classes are split across the ranks of
    `group`: each token's log-probability under ``softmax(full_logits / T)`` (and with ``return_entropy``
    its entropy), both differentiable, without gathering the logits.

    Args:
        local_logits (Tensor): this rank's logits, shape :math:`(..., C_{local})`.
        target (Tensor): the chosen token ids (global), shape :math:`(...)`, the same on every rank.
        group, vocab_start: as :func:`vocab_parallel_cross_entropy`.
        temperature (float): T > 0 (a copy of the logits is divided when T != 1).
        ignore_index (int): tokens to skip: log-probability 0, entropy 0, no gradient.
        return_entropy (bool): also return the entropies.

    Returns:
        the log-probabilities, shape :math:`(...)`, float32 (float64 for float64 logits), the same on every
        rank, and with ``return_entropy`` the entropies. Forward runs the loss's one exchange (one more
        float64 per token and rank for the entropy); backward needs no communication: each rank's gradient
        is the full gradient's block, one pass of the row kernel over its logits.
    """
    fn = "vocab_parallel_token_logprobs"
    t = check_temperature(temperature)
    vocab_parallel_options(local_logits, target, None, "none", ignore_index, 0.0, 0.0, fn, "local_logits")
    if local_logits.dim() == 0 or tuple(target.shape) != tuple(local_logits.shape[:-1]):
        raise ValueError(
            f"{fn}: expected target of shape {list(local_logits.shape[:-1])} (local_logits without its class "
            f"dimension), got {list(target.shape)}"
        )
    if route(local_logits, target) == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    flat = local_logits.reshape(math.prod(local_logits.shape[:-1]), local_logits.shape[-1])
    flat = flat / t if t != 1.0 else flat
    logprobs, entropy, _, _ = torch.ops.xent.vocab_parallel_token_logprobs(
        flat, target.reshape(-1), _group_name(group), vocab_start, int(ignore_index), bool(return_entropy)
    )
    if not return_entropy:
        return logprobs.reshape(target.shape)
    return logprobs.reshape(target.shape), entropy.reshape(target.shape)


def vocab_parallel_linear_token_logprobs(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    memory_budget: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r""":func:`xent.token_logprobs` with the head's rows split across the ranks of `group` (tensor-parallel
    RL): ``input`` :math:`(..., H)` replicated, ``local_linear_weight`` :math:`(C_{local}, H)` and
    ``linear_bias`` this rank's rows. Log-probabilities (and entropies) of the full head, differentiable
    with respect to the input and this rank's rows, never materializing even the local logits.

    Forward runs the chunk loop for this block's statistics and the one exchange; backward recomputes the
    chunks with the global lse and entropy (both upstream gradients folded into each row's gradient) and
    all-reduces the input's gradient, so every rank holds the full gradient of ``input``. Returns as
    :func:`vocab_parallel_token_logprobs`; ``memory_budget`` as :func:`xent.linear_cross_entropy`.
    """
    fn = "vocab_parallel_linear_token_logprobs"
    t = check_temperature(temperature)
    vocab_parallel_options(input, target, None, "none", ignore_index, 0.0, 0.0, fn, "input")
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
    if route(input, local_linear_weight, linear_bias, target) == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    # (h W^T + b) / T = (h / T) W^T + b / T: O(tokens x hidden), not O(tokens x vocabulary)
    x2 = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    x2 = x2 / t if t != 1.0 else x2
    bias = linear_bias / t if linear_bias is not None and t != 1.0 else linear_bias
    logprobs, entropy, _, _ = torch.ops.xent.vocab_parallel_linear_token_logprobs(
        x2,
        local_linear_weight,
        bias,
        target.reshape(-1),
        _group_name(group),
        vocab_start,
        int(ignore_index),
        -1 if memory_budget is None else int(memory_budget),
        bool(return_entropy),
    )
    if not return_entropy:
        return logprobs.reshape(target.shape)
    return logprobs.reshape(target.shape), entropy.reshape(target.shape)


def _group_name(group) -> str:
    _group_info(group)  # a clear error without a process group
    return (group if group is not None else dist.group.WORLD).group_name


def _rl_options(ignore_index: int) -> Options:
    """A token's log-probability is minus its cross-entropy with reduction='none' and no other term."""
    return Options("none", ignore_index, 0.0, 0.0, None)


def _token_outputs(per_row: Tensor, target: Tensor, ignore_index: int, with_entropy: bool, cd):
    """(log-probabilities, entropies or an empty tensor) from the merged rows: z_y - lse, and H; 0 on
    ignored tokens."""
    valid = target.long() != ignore_index
    lse, z_target = per_row[0], per_row[1]
    logprobs = torch.where(valid, z_target - lse, 0).to(cd)
    entropy = torch.where(valid, per_row[2], 0).to(cd) if with_entropy else per_row.new_empty(0, dtype=cd)
    return logprobs, entropy


def _token_gradient_coefficients(targets: rows.IndexTargets, per_row, block, grad_logprobs, grad_entropy, cd):
    """The row kernel's coefficients for d(sum_i g_i logprob_i + c_i H_i)/dz: the cross-entropy's with
    scale -g (logprob = -loss), plus the entropy term with the rows' global lse and H. Ignored rows: 0,
    whatever their upstream gradients (inf or NaN included)."""
    entropy = None
    if grad_entropy is not None:
        entropy = torch.where(targets.valid, grad_entropy.reshape(-1).to(cd), 0)
    entropy_value = per_row[2].to(cd) if entropy is not None else None
    scale = targets.scale(grad_logprobs.neg())
    return targets.coefficients(scale, per_row[0], block, entropy, entropy_value)


@torch.library.custom_op("xent::vocab_parallel_token_logprobs", mutates_args=())
def _vocab_parallel_token_logprobs_op(
    logits: Tensor,
    target: Tensor,
    group_name: str,
    vocab_start: Optional[int],
    ignore_index: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log-probabilities, entropies (empty without), the merged rows (global lse, target logit[, H]) and
    [this rank's first class, C] on the CPU, both for backward) of the (R, C_local) logits."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    layout = Layout(_resolve_process_group(group_name), vocab_start)
    statistics = ("entropy",) if with_entropy else ()
    _, _, per_row, shards = _logits_forward(
        logits, target, None, layout, _rl_options(ignore_index), False, statistics, "vocab_parallel_token_logprobs"
    )
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs, entropy = _token_outputs(per_row, target, ignore_index, with_entropy, cd)
    return logprobs, entropy, per_row, torch.tensor([shards.start, shards.num_classes], dtype=torch.int64)


@_vocab_parallel_token_logprobs_op.register_fake
def _(logits, target, group_name, vocab_start, ignore_index, with_entropy):
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows_ = logits.shape[0]
    entropy = logits.new_empty(rows_ if with_entropy else 0, dtype=cd)
    per_row = logits.new_empty((3 if with_entropy else 2, rows_), dtype=torch.float64)
    return logits.new_empty(rows_, dtype=cd), entropy, per_row, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("xent::vocab_parallel_token_logprobs_backward", mutates_args=())
def _vocab_parallel_token_logprobs_backward_op(
    logits: Tensor,
    target: Tensor,
    per_row: Tensor,
    meta: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    ignore_index: int,
) -> Tensor:
    """This rank's (R, C_local) gradient (no communication: the global lse and H are in per_row)."""
    start, num_classes = (int(v) for v in meta.tolist())  # a CPU tensor: no device synchronisation
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = target.long()
    block = _block(flat, flat != ignore_index, None, cd, start, logits.shape[1])
    targets = rows.IndexTargets.from_options(flat, None, _rl_options(ignore_index), num_classes, cd)
    coefficients = _token_gradient_coefficients(targets, per_row, block, grad_logprobs, grad_entropy, cd)
    return _logits_gradient(logits, block, coefficients, cd, False)


@_vocab_parallel_token_logprobs_backward_op.register_fake
def _(logits, target, per_row, meta, grad_logprobs, grad_entropy, ignore_index):
    return logits.new_empty(logits.shape)  # contiguous, as _logits_gradient's, whatever the logits' strides


def _token_logprobs_setup(ctx, inputs, output) -> None:
    ctx.ignore_index, ctx.with_entropy = inputs[4], inputs[5]
    ctx.save_for_backward(inputs[0], inputs[1], output[2], output[3])


def _token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_per_row, _grad_meta):
    logits, target, per_row, meta = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(logits.shape[0], dtype=per_row.dtype, device=logits.device)
    if not ctx.with_entropy:
        grad_entropy = None
    elif grad_entropy is None:
        grad_entropy = torch.zeros(logits.shape[0], dtype=per_row.dtype, device=logits.device)
    grad = torch.ops.xent.vocab_parallel_token_logprobs_backward(
        logits, target, per_row, meta, grad_logprobs, grad_entropy, ctx.ignore_index
    )
    return grad, None, None, None, None, None


torch.library.register_autograd(
    "xent::vocab_parallel_token_logprobs", _token_logprobs_backward, setup_context=_token_logprobs_setup
)


@torch.library.custom_op("xent::vocab_parallel_linear_token_logprobs", mutates_args=())
def _vocab_parallel_linear_token_logprobs_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    group_name: str,
    vocab_start: Optional[int],
    ignore_index: int,
    memory_budget: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """As xent::vocab_parallel_token_logprobs, from the (R, H) rows and this rank's rows of the head."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    p = _rl_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget, with_entropy)
    layout = Layout(_resolve_process_group(group_name), vocab_start)
    _, _, _, _, shards, per_row = _linear_forward(p, layout, "vocab_parallel_linear_token_logprobs")
    logprobs, entropy = _token_outputs(per_row, target, ignore_index, with_entropy, p.compute_dtype)
    return logprobs, entropy, per_row, torch.tensor([shards.start, shards.num_classes], dtype=torch.int64)


@_vocab_parallel_linear_token_logprobs_op.register_fake
def _(input, linear_weight, linear_bias, target, group_name, vocab_start, ignore_index, memory_budget, with_entropy):
    cd = torch.float64 if linear_weight.dtype == torch.float64 else torch.float32
    rows_ = input.shape[0]
    entropy = input.new_empty(rows_ if with_entropy else 0, dtype=cd)
    per_row = input.new_empty((3 if with_entropy else 2, rows_), dtype=torch.float64)
    return input.new_empty(rows_, dtype=cd), entropy, per_row, torch.empty(2, dtype=torch.int64, device="cpu")


def _rl_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget, with_entropy):
    """The linear problem of the RL ops: 'none' reduction, no other term, the entropy on request; the
    per-token outputs in the compute dtype."""
    p = _op_problem(input, linear_weight, linear_bias, target, None, "none", ignore_index, 0.0, 0.0, memory_budget, "")
    cd = p.compute_dtype
    return replace(p, output_dtype=cd, statistics=("entropy",) if with_entropy else ())


@torch.library.custom_op("xent::vocab_parallel_linear_token_logprobs_backward", mutates_args=())
def _vocab_parallel_linear_token_logprobs_backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Optional[Tensor],
    target: Tensor,
    per_row: Tensor,
    meta: Tensor,
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    group_name: str,
    ignore_index: int,
    memory_budget: int,
    want_weight: bool,
    want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (the input's all-reduced; empty tensors for those not wanted)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    with_entropy = grad_entropy is not None
    p = _rl_problem(input, linear_weight, linear_bias, target, ignore_index, memory_budget, with_entropy)
    start, num_classes = (int(v) for v in meta.tolist())  # a CPU tensor: no device synchronisation
    cd = p.compute_dtype
    flat = target.long()
    block = _block(flat, flat != ignore_index, None, cd, start, linear_weight.shape[0])
    targets = rows.IndexTargets.from_options(flat, None, p.options, num_classes, cd)
    coefficients = _token_gradient_coefficients(targets, per_row, block, grad_logprobs, grad_entropy, cd)
    grads = _linear_backward(
        p,
        _resolve_process_group(group_name),
        block,
        targets,
        per_row[0],
        coefficients.scale,
        (True, want_weight, want_bias),
        coefficients.entropy,
        coefficients.entropy_value,
    )
    return tuple(g if g is not None else input.new_empty(0) for g in grads)


@_vocab_parallel_linear_token_logprobs_backward_op.register_fake
def _(
    input,
    linear_weight,
    linear_bias,
    target,
    per_row,
    meta,
    grad_logprobs,
    grad_entropy,
    group_name,
    ignore_index,
    memory_budget,
    want_weight,
    want_bias,
):
    return (
        input.new_empty(input.shape),
        linear_weight.new_empty(linear_weight.shape) if want_weight else input.new_empty(0),
        linear_bias.new_empty(linear_bias.shape) if want_bias and linear_bias is not None else input.new_empty(0),
    )


def _linear_token_logprobs_setup(ctx, inputs, output) -> None:
    ctx.group_name, ctx.vocab_start, ctx.ignore_index, ctx.memory_budget, ctx.with_entropy = inputs[4:9]
    ctx.want = (inputs[1].requires_grad, inputs[2] is not None and inputs[2].requires_grad)
    ctx.save_for_backward(*inputs[:4], output[2], output[3])


def _linear_token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_per_row, _grad_meta):
    input, w, b, target, per_row, meta = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(input.shape[0], dtype=per_row.dtype, device=input.device)
    if not ctx.with_entropy:
        grad_entropy = None
    elif grad_entropy is None:
        grad_entropy = torch.zeros(input.shape[0], dtype=per_row.dtype, device=input.device)
    gi, gw, gb = torch.ops.xent.vocab_parallel_linear_token_logprobs_backward(
        input,
        w,
        b,
        target,
        per_row,
        meta,
        grad_logprobs,
        grad_entropy,
        ctx.group_name,
        ctx.ignore_index,
        ctx.memory_budget,
        *ctx.want,
    )
    return (gi, gw if ctx.want[0] else None, gb if ctx.want[1] else None) + (None,) * 6


torch.library.register_autograd(
    "xent::vocab_parallel_linear_token_logprobs",
    _linear_token_logprobs_backward,
    setup_context=_linear_token_logprobs_setup,
)
