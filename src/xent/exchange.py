"""The vocab-parallel losses' one-collective protocol: each rank's block statistics, one all-gather, the
checks every rank makes alike on what it gathered, and the merged rows.

Each rank of a group holds the logits (or the lm_head rows) of a contiguous block of the classes; the
targets, the class weights and the options are the same on every rank. Each rank runs the row kernel over
its own block (kernels/blocks.py, kernels/linear.py) and packs, per row, its partial statistics: shift and
sum of exp(z - shift), the target logit if it owns the target, and <w, z - shift> for label smoothing. One
all-gather of those (plus a header of a few numbers per rank) gives every rank everything the loss needs:

    lse   = log sum_k sumexp_k * exp(shift_k)                     (merged in float64)
    z_y   = the owning rank's target logit
    <w, lse - z> = sum_k [ W_k (lse - shift_k) - <w_k, z_k - shift_k> ]     W_k = the block's weight sum

so label smoothing uses the global number of classes and the global weights (Megatron's uses the local
vocabulary size, which is wrong), and results equal the single-process loss. The gradient of the logits is
then local: exp(z - lse) times the row coefficients, minus the target term on the owning rank.

Per-token statistics ride on the same exchange: the entropy adds each block's <e, z - shift> (merged by
rows.merge_block_entropy), the argmax each block's largest logit and its global column (the first column
among the blocks that reach the maximum, rows.merge_block_argmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .checks import as_index, check_weight_shape
from .kernels import rows
from .problems import Options, TokenStatistics

# Per-rank header in the gathered payload: what every rank must agree on, and its block of classes.
_NUMEL, _NDIM, _DIM0, _CHECKSUM, _SIZE, _START, _WEIGHT_SUM = range(7)
# ... and the options every rank must have passed alike (checked after the exchange, on every rank)
_OPTIONS = ("label_smoothing", "z_loss", "ignore_index", "reduction", "class weights", "softcap", "temperature")
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


def group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "vocab-parallel cross-entropy needs torch.distributed to be initialized "
            "(torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(mine: Tensor, group) -> Tensor:
    """(world, *mine.shape): every rank's `mine`."""
    _, world = group_info(group)
    out = torch.empty((world, *mine.shape), dtype=mine.dtype, device=mine.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.view(-1), mine.reshape(-1), group=group)
    return out


def identity(target: Tensor) -> Tensor:
    """(numel, ndim, dim 0, checksum) of the targets, float64 on their device, without a host sync: they
    differ when two ranks' targets do (the position-weighted checksum is exact in float64)."""
    flat = target.reshape(-1).long()
    positions = torch.arange(flat.numel(), device=flat.device) % 997 + 1
    checksum = (flat.double() + 1.0).mul(positions).sum().reshape(1)
    meta = torch.tensor([flat.numel(), target.dim(), target.shape[0] if target.dim() else 1], dtype=torch.float64)
    return torch.cat([meta.to(flat.device, non_blocking=True), checksum])


def check_same_call(codes: list[float], fn: str) -> None:
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


def check_same_targets(identities: list[list[float]], fn: str) -> None:
    """identities: every rank's identity(target), on the host; raise on every rank alike when they differ."""
    if any(row != identities[0] for row in identities):
        raise ValueError(
            f"{fn}: the ranks' targets differ (every rank must pass the same target): per rank "
            f"(numel, ndim, dim 0) = {[tuple(int(v) for v in row[:3]) for row in identities]}, "
            f"checksums {[row[3] for row in identities]}"
        )


def shards_from_sizes(target: Tensor, local_size: int, group, fn: str, extra: tuple[str, ...]) -> Shards:
    """vocab_start=None: gather every rank's block size (and target identity, and which statistics widen
    the main exchange) first; blocks in rank order."""
    rank, _ = group_info(group)
    size = torch.tensor([float(local_size), _extra_code(extra), _CALL_CODES[fn]], dtype=torch.float64)
    table = all_gather(torch.cat([identity(target), size.to(target.device, non_blocking=True)]), group).tolist()
    check_same_call([row[6] for row in table], fn)
    check_same_targets([row[:4] for row in table], fn)
    codes = [row[5] for row in table]
    if any(code != codes[0] for code in codes):
        raise ValueError(
            f"{fn}: every rank must ask for the same return_stats; per rank, the ones beyond lse, logprob and "
            f"z_loss: {[_extra_names(code) for code in codes]}"
        )
    sizes = tuple(int(row[4]) for row in table)
    return Shards(rank, tuple(sum(sizes[:k]) for k in range(len(sizes))), sizes)


# The statistics that need more than the global lse and target logit, each a share per block in the main
# exchange: the entropy (one number per row and rank), the argmax (the block's largest logit and its
# column), sum p^2 (the block's sum of e^2) and the mean logit (the block's sum of logits). Their code (a
# bit each) goes into vocab_start=None's first gather, so that ranks asking differently raise.
EXTRA = ("entropy", "argmax", "sum_sq_probs", "mean_logit")


def _extra_code(extra: tuple[str, ...]) -> float:
    return float(sum(1 << EXTRA.index(name) for name in extra))


def _extra_names(code: float) -> list[str]:
    return [name for k, name in enumerate(EXTRA) if int(code) >> k & 1]


def extra_statistics(statistics: tuple) -> tuple[str, ...]:
    """Which of the exchange's optional shares `statistics` needs ('correct' is the argmax's, as for the
    single-process ops), in the exchange's order."""
    wanted = TokenStatistics.computed(statistics)
    return tuple(name for name in EXTRA if name in wanted)


def exchange_statistics(
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
    block's largest logit (`block_max`) and its global column with stats.argmax, sumsq and logit_sum with
    theirs. All float64, still on
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
    parts += [t for t in (stats.sumsq, stats.logit_sum) if t is not None]
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
            opts.softcap if opts.softcap is not None else 0.0,  # a softcap is > 0: 0 means none
            opts.temperature,
            _CALL_CODES[fn],
        ],
        dtype=torch.float64,
    ).to(target.device, non_blocking=True)
    mine = torch.cat([identity(target), place, weight_sum, options] + [p.double() for p in parts])
    table = all_gather(mine, group)
    header, bodies = table[:, :_HEADER], table[:, _HEADER:].reshape(table.shape[0], len(parts), num_rows)
    shift, sumexp, target_logit, owned, gathered_dense, *extras = bodies.unbind(1)
    return header, shift, sumexp, target_logit, owned, gathered_dense if stats.dense_rel is not None else None, extras


def check_same_options(table: list[list[float]], fn: str) -> None:
    """Every rank must have passed the same options (else each would compute a different loss)."""
    for k, name in enumerate(_OPTIONS):
        values = [row[7 + k] for row in table]
        if any(v != values[0] for v in values):
            if name == "reduction":
                values = [{c: r for r, c in _REDUCTION_CODES.items()}[v] for v in values]
            elif name == "class weights":
                values = ["given" if v else "None" for v in values]
            elif name == "softcap":
                values = [v if v else None for v in values]
            raise ValueError(f"{fn}: every rank must pass the same {name}; per rank: {values}")


def check_tiling(shards: Shards, fn: str) -> None:
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


def merge(
    header: Tensor, shift, sumexp, target_logit, owned, dense_rel, extras: list, extra: tuple, valid: Tensor, eps: float
):
    """Global lse, target logit and smoothing term per row from the gathered statistics (on the device),
    the rows whose target no rank (or two) owns, and the `extra` statistics' merged rows (entropy, argmax
    as float64, sum p^2, mean logit)."""
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
        merged.append(rows.merge_block_argmax(extras.pop(0), extras.pop(0)).double())
    if "sum_sq_probs" in extra:  # sum_k exp(2 (shift_k - lse)) sum_c e_kc^2; a block without classes adds 0
        sumsq = extras.pop(0)
        merged.append(torch.where(sumsq > 0, torch.exp(2 * (shift - lse)) * sumsq, 0).sum(0))
    if "mean_logit" in extra:  # all blocks' sums over all classes (no classes: nan, as torch's mean)
        merged.append(extras.pop(0).sum(0) / header[:, _SIZE].sum())
    return lse, target_logit.sum(0), dense_ce, valid & (owned.sum(0) != 1), merged


def check_weight_size(weight: Tensor | None, shards: Shards) -> None:
    check_weight_shape(weight, shards.num_classes)


def vocab_parallel_loss(
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
    `statistics` needs them (token_statistics reads it).
    """
    rank, _ = group_info(group)
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch
    valid = flat != opts.ignore_index
    extra = extra_statistics(statistics)
    shards = None
    if vocab_start is None:
        shards = shards_from_sizes(target, local_size, group, fn, extra)
        check_weight_size(weight, shards)
    start = shards.start if shards is not None else as_index(vocab_start, "vocab_start", fn)
    block = rows.ClassBlock.shard(flat, valid, weight.to(cd) if weight is not None else None, start, local_size)
    stats = local_statistics(block)
    local_max = block_max(stats) if stats.argmax is not None else None
    header, *gathered = exchange_statistics(stats, block, target, start, local_size, group, opts, local_max, fn)
    lse, z_target, dense_ce, unowned, merged = merge(header, *gathered, extra, valid, opts.label_smoothing)
    host = torch.cat([header.reshape(-1), unowned.any().double().reshape(1)]).tolist()
    table = [host[k * _HEADER : (k + 1) * _HEADER] for k in range(header.shape[0])]
    check_same_call([row[_CALL] for row in table], fn)
    check_same_targets([row[:_SIZE] for row in table], fn)
    check_same_options(table, fn)
    shards = Shards(rank, tuple(int(row[_START]) for row in table), tuple(int(row[_SIZE]) for row in table))
    check_tiling(shards, fn)
    check_weight_size(weight, shards)
    if host[-1]:
        first = int(flat[unowned.nonzero()[0, 0]])
        raise IndexError(
            f"Target {first} is out of bounds. (It must be a class index in "
            f"[0, {shards.num_classes - 1}] or ignore_index.)"
        )
    targets = rows.IndexTargets.from_options(flat, weight, opts, shards.num_classes, cd)
    per_row = torch.stack([lse, z_target, *merged])
    return block, targets, lse, targets.row_losses(lse, z_target, dense_ce).to(cd), shards, per_row


def group_name(group) -> str:
    group_info(group)  # a clear error without a process group
    return (group if group is not None else dist.group.WORLD).group_name


def token_statistics(statistics: tuple, per_row: Tensor, target: Tensor, opts: Options, cd) -> TokenStatistics:
    """The per-token statistics from the merged rows (vocab_parallel_loss' per_row: global lse, target
    logit, then the extra ones where asked), by rows.token_statistics_of_rows' formulas."""
    lse, z_target, *merged = per_row.unbind(0)
    got = dict(zip(extra_statistics(statistics), merged))
    entropy, argmax = got.get("entropy"), got.get("argmax")
    # shift = lse and sumexp = 1 give lse = shift + log 1, entropy = log 1 - entropy_rel / 1 and
    # sum p^2 = sumsq / 1^2; the merged mean logit is the sum of the logits over one class
    stats = rows.RowStats(
        lse,
        torch.ones_like(lse),
        z_target,
        None,
        argmax.long() if argmax is not None else None,
        entropy.neg() if entropy is not None else None,
        got.get("sum_sq_probs"),
        got.get("mean_logit"),
    )
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch
    valid = flat != opts.ignore_index
    values = rows.token_statistics_of_rows(stats, statistics, valid, flat, opts.z_loss, cd, num_classes=1)
    return TokenStatistics.of(values, tuple(target.shape))
