"""The row kernel (rows.py) as one Triton kernel, for CUDA tensors (and the Triton interpreter on CPU).

One program per row. Its first loop streams the row's logits once with an online max (the running shift),
accumulating the sum of exp(z - shift), the target logit and <u, z - shift>; its second loop (in the same
launch) writes the gradient

    (softmax_coef + zloss_coef * lse) * exp(z - lse)  -  target_coef * onehot(y)  -  dense_coef * u

times the softcap chain factor, re-reading the row (from L2 on a GPU, where a row was just streamed). The
coefficients are the same per-row vectors rows.RowTerms / ChunkCoefficients form for the torch path, so
the loss math lives in one place; the kernel only applies it. With STATS off it reads a given lse (the
vocab-parallel gradient after the exchange); with GRAD off it only produces statistics.

WHOLE_ROW (behind a switch, WHOLE_ROW_MAX_COLUMNS, off by default): a row of up to that many columns is one
block, read once; the gradient loop takes the logits (capped, over T) and the cap's tanh from registers
instead of re-reading the row. That is the read-once kernel a GPU run must still measure (whether 16-32
warps hold a 32768-column row without spilling, and whether it beats the two-read launch); the
interpreter tests check that it computes the same values.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..problems import divides
from . import rows

DENSE_NONE, DENSE_ONES, DENSE_SHARED, DENSE_PER_ROW = 0, 1, 2, 3


@triton.jit
def _tanh(x):
    # tl has no portable tanh (libdevice is CUDA-only); this is accurate to ~1e-7 relative everywhere.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    t = tl.where(ax < 0.0625, small, big)
    return tl.where(x < 0, -t, t)


# Triton's interpreter (how CI runs these kernels) truncates fp32 -> bf16, which would make the CPU tests see
# a gradient twice as coarse as the GPU's: there the rounding is done on the bits. A GPU's conversion
# already rounds to nearest even, in one instruction.
_EMULATE_RTNE = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _downcast(x, dtype: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even as torch's casts and the GPU's conversions do."""
    if dtype == tl.bfloat16 and _EMULATE_RTNE:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif dtype == tl.float32:
        return x
    else:
        return x.to(dtype)


@triton.jit
def _rows_kernel(
    Z,
    stride_z,
    OUT,
    stride_out,
    TARGET,
    DENSE,
    stride_dense,
    SHIFT,
    SUMEXP,
    TARGET_LOGIT,
    DENSE_REL,
    ARGMAX,
    ENTROPY_REL,
    SUMSQ,
    LOGIT_SUM,
    LSE,
    C_SOFTMAX,
    C_ZLOSS,
    C_TARGET,
    C_DENSE,
    C_ENTROPY,
    n_rows,
    n_cols,
    softcap,
    temperature,
    ROW_TEMPERATURE,
    BLOCK: tl.constexpr,
    STATS: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    STORE_TARGET: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    DENSE_MODE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    TEMPERATURE: tl.constexpr,
    PER_ROW_TEMPERATURE: tl.constexpr,
    ZLOSS: tl.constexpr,
    STORE_ARGMAX: tl.constexpr,
    STORE_ENTROPY: tl.constexpr,
    STORE_SUMSQ: tl.constexpr,
    STORE_LOGIT_SUM: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    WHOLE_ROW: tl.constexpr,
):
    # A grid smaller than the rows makes each program loop over rows (fewer rows in flight, so that the
    # gradient loop's second read of a row still finds it in L2); a grid of one program per row loops once.
    for row_i in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = tl.cast(row_i, tl.int64)
        z_row = Z + row * stride_z
        dense_row = DENSE + row * stride_dense
        cols = tl.arange(0, BLOCK)
        if HAS_TARGET:
            target = tl.load(TARGET + row)
        if PER_ROW_TEMPERATURE:  # each row's own temperature (RL with per-token temperatures)
            t_row = tl.load(ROW_TEMPERATURE + row).to(tl.float32)
        else:
            t_row = temperature

        if STATS:
            if STORE_TARGET:
                # One load before the row is streamed (no reduction per block; and before any gradient store,
                # which may overwrite the logits in place, as linear CE does). A target outside this row's
                # columns (an ignored row, another rank's class) contributes 0.
                inside = (target >= 0) & (target < n_cols)
                zt = tl.load(z_row + tl.where(inside, target, 0)).to(tl.float32)
                if SOFTCAP:
                    zt = softcap * _tanh(zt / softcap)
                if TEMPERATURE:
                    zt = zt / t_row
                zt = tl.where(inside, zt, 0.0)
            m = -float("inf")  # the running max (-inf while every logit so far is -inf)
            shift = 0.0  # what the sums below are relative to: the running max, or 0 while it is -inf
            s = 0.0
            d = 0.0
            u_seen = 0.0
            h = 0.0  # sum e * (z - shift), for the entropy
            q = 0.0  # sum e^2, for sum p^2
            zsum = 0.0  # sum z, for the mean logit
            best = -float("inf")
            best_col = 0
            z_keep = tl.zeros([BLOCK], dtype=tl.float32)  # WHOLE_ROW: the row, for the gradient loop
            th_keep = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                idx = start + cols
                mask = idx < n_cols
                z = tl.load(z_row + idx, mask=mask, other=-float("inf")).to(tl.float32)
                if STORE_ARGMAX:  # of the raw logits: the cap is monotone, and saturates to ties in fp32
                    # strictly greater: an earlier block keeps a tie (torch.argmax's first index)
                    raw_max = tl.max(z, 0)
                    best_col = tl.where(raw_max > best, start + tl.argmax(z, 0), best_col)
                    best = tl.maximum(best, raw_max)
                if SOFTCAP:  # the cap would turn the padding's -inf into -softcap
                    th_block = _tanh(z / softcap)
                    z = tl.where(mask, softcap * th_block, -float("inf"))
                    if WHOLE_ROW:
                        th_keep = th_block
                if TEMPERATURE:  # the (capped) logits over T, in fp32: the half-precision input is not rounded again
                    z = z / t_row
                if WHOLE_ROW:
                    z_keep = z
                m_new = tl.maximum(m, tl.max(z, 0))
                new_shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # all -inf so far: keep exp() finite
                # the sums so far, re-based from `shift` to `new_shift`: exp(shift - new_shift) <= 1, and 0 when
                # nothing has been summed yet (then shift = 0 may lie above new_shift, and exp() overflow)
                alpha = tl.where(m == -float("inf"), 0.0, tl.exp(shift - new_shift))
                moved = shift - new_shift
                e = tl.exp(z - new_shift)
                if STORE_ENTROPY:  # e' = e alpha, z - new_shift = (z - shift) + moved; alpha * s first (0 * -inf)
                    h = alpha * h + (alpha * s) * moved + tl.sum(e * tl.where(e > 0.0, z - new_shift, 0.0), 0)
                s = s * alpha + tl.sum(e, 0)
                if STORE_SUMSQ:  # e' = e alpha, so e'^2 = e^2 alpha^2
                    q = q * (alpha * alpha) + tl.sum(e * e, 0)
                if STORE_LOGIT_SUM:
                    zsum += tl.sum(tl.where(mask, z, 0.0), 0)
                if DENSE_MODE != 0:
                    if DENSE_MODE == 1:
                        u = tl.where(mask, 1.0, 0.0)
                    else:
                        u = tl.load(dense_row + idx, mask=mask, other=0.0).to(tl.float32)
                    # <u, z - shift> relative to the running shift: re-base the blocks seen so far
                    d += u_seen * moved
                    d += tl.sum(u * tl.where(mask, z - new_shift, 0.0), 0)
                    u_seen += tl.sum(u, 0)
                m = m_new
                shift = new_shift
            m = shift
            tl.store(SHIFT + row, m)
            tl.store(SUMEXP + row, s)
            if STORE_ARGMAX:
                tl.store(ARGMAX + row, best_col.to(tl.int64))
            if STORE_ENTROPY:
                tl.store(ENTROPY_REL + row, h)
            if STORE_SUMSQ:
                tl.store(SUMSQ + row, q)
            if STORE_LOGIT_SUM:
                tl.store(LOGIT_SUM + row, zsum)
            if STORE_DENSE:
                tl.store(DENSE_REL + row, d)
            if STORE_TARGET:
                tl.store(TARGET_LOGIT + row, zt)  # already capped with the rest of the row
            log_s = tl.log(s)
            lse = m + log_s
        else:
            lse = tl.load(LSE + row).to(tl.float32)
            m = lse
            log_s = 0.0

        if GRAD:
            c_softmax = tl.load(C_SOFTMAX + row)
            if ZLOSS:
                c_softmax += tl.load(C_ZLOSS + row) * lse
            if HAS_TARGET:
                c_target = tl.load(C_TARGET + row)
            if DENSE_MODE != 0:
                c_dense = tl.load(C_DENSE + row)
            if ENTROPY_GRAD:  # -c p (log p + H), log p + H = (z - m) - h / s (the entropy's own statistics)
                c_entropy = tl.load(C_ENTROPY + row)
                if STATS:
                    h_over_s = h / s
                else:  # one block of the classes, m = the global lse: log p + H = (z - lse) + H, H given
                    h_over_s = -tl.load(ENTROPY_REL + row).to(tl.float32)
            out_row = OUT + row * stride_out
            for start in range(0, n_cols, BLOCK):
                idx = start + cols
                mask = idx < n_cols
                if WHOLE_ROW:  # the one block the statistics loop read (the padding at -inf: p = 0 there)
                    z = z_keep
                    if SOFTCAP:
                        th = th_keep
                else:
                    z = tl.load(z_row + idx, mask=mask, other=-float("inf")).to(tl.float32)
                    if SOFTCAP:
                        th = _tanh(z / softcap)
                        z = softcap * th
                    if TEMPERATURE:
                        z = z / t_row
                # exp((z - m) - log s), not exp(z - lse): lse rounded to fp32 would cost absolute precision
                # in proportion to the largest logit.
                p = tl.exp((z - m) - log_s)
                g = c_softmax * p
                if ENTROPY_GRAD:
                    g -= c_entropy * p * tl.where(p > 0.0, (z - m) - h_over_s, 0.0)
                if HAS_TARGET:
                    g -= tl.where(idx == target, c_target, 0.0)
                if DENSE_MODE == 1:
                    g -= c_dense
                elif DENSE_MODE != 0:
                    g -= c_dense * tl.load(dense_row + idx, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    g *= 1.0 - th * th
                if TEMPERATURE:  # the chain rule's 1/T
                    g = g / t_row
                tl.store(out_row + idx, _downcast(g, OUT.dtype.element_ty), mask=mask)


def _on_device(t: Tensor):
    """Launch on the tensors' GPU, not the current one (a head on cuda:1 under a device map)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_size(n_cols: int, largest: int = 4096) -> int:
    return max(16, min(largest, triton.next_power_of_2(max(1, n_cols))))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (block, warps, programs per multiprocessor or 0 for one program per row): a sweep on the GPU may set it
# (benchmarks/sweep_rows.py); None takes the defaults below.
LAUNCH_OVERRIDE: tuple[int, int, int] | None = None
# Rows of up to this many columns whose pass computes statistics and gradient together run as one block,
# read once (WHOLE_ROW, module docstring). 0: off, the default until a GPU measurement shows it faster;
# XENT_TRITON_WHOLE_ROW=32768 (or setting this) turns it on for such a measurement.
WHOLE_ROW_MAX_COLUMNS = int(os.environ.get("XENT_TRITON_WHOLE_ROW", "0"))


def _whole_row_launch(num_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, num_warps, grid) of the read-once launch: the row in one power-of-two block, one program per
    row, a warp per 1024 columns (4 to 32)."""
    block = triton.next_power_of_2(max(16, n_cols))
    return block, max(4, min(32, block // 1024)), num_rows


def _launch(z: Tensor, num_rows: int, n_cols: int, softcap: bool = False) -> tuple[int, int, int]:
    """(BLOCK, num_warps, grid) for the row kernel."""
    if LAUNCH_OVERRIDE is not None:
        largest, warps, per_sm = LAUNCH_OVERRIDE
        block = _block_size(n_cols, largest)
    elif softcap:
        # the cap's tanh in both loops: 16384-column blocks took 2.16x the plain case's time on an H100
        # (bf16, 8192 x 128256), 4096 x 16 warps 1.42x (in an earlier build of the kernel); the latter kept
        block = _block_size(n_cols, 4096)
        warps, per_sm = max(4, min(16, block // 256)), 0
    elif z.element_size() >= 4:
        # fp32 rows: 16384-column blocks over 32 warps, one program per row (the fastest of an H100 sweep of
        # blocks 2048-16384, 4-32 warps and 1-4 programs per multiprocessor: 74% of copy speed at
        # 32768 x 32000, 60% at 8192 x 128256; benchmarks/RESULTS.md)
        block = _block_size(n_cols, 16384)
        warps, per_sm = max(4, min(32, block // 512)), 0
    else:
        # half-precision rows: 16384-column blocks for long rows, 8192 for shorter ones, 16 warps
        block = _block_size(n_cols, 16384 if n_cols > 65536 else 8192)
        warps, per_sm = max(4, min(16, block // 512)), 0
    grid = num_rows
    if per_sm:  # the interpreter (CPU) counts as one multiprocessor
        sms = _multiprocessors(z.device.index if z.device.index is not None else 0) if z.is_cuda else 1
        grid = min(num_rows, per_sm * sms)
    return block, warps, grid


def rows_(
    z: Tensor,
    *,
    stats=None,
    target: Tensor | None = None,
    dense: Tensor | None = None,
    dense_is_ones: bool = False,
    softcap: float | None = None,
    temperature: float | Tensor = 1.0,
    out: Tensor | None = None,
    coefs=None,
    lse: Tensor | None = None,
    row_entropy: Tensor | None = None,
) -> None:
    """Run the kernel over the rows of z (rows, C), last dimension contiguous; fp32/bf16/fp16 logits.

    stats: a rows.RowStats (fp32 views for these rows) to fill, or None (then `lse` must be given).
    target: (rows,) int64 column of each row's target. dense: u, (C,) or (rows, C); dense_is_ones for u = 1;
    pass u only when the loss has a dense term (then stats.dense_rel and the dense coefficient exist).
    out + coefs = (softmax, zloss, target, dense, entropy; None where absent) per-row fp32 vectors: write the
    gradient into `out` (rows, C), which may be z itself (each element is read before it is written).
    With `lse` and an entropy coefficient, `row_entropy` holds the rows' (global) entropies. The logits
    are (softcap, then) divided by `temperature` in fp32 as they are read; the gradient is with respect to
    the raw logits (the chain rule's 1/T included). A tensor `temperature` holds each row's (rows,).
    """
    num_rows, n_cols = z.shape
    if num_rows == 0 or n_cols == 0:
        return
    assert (z.stride(1) == 1 or n_cols == 1) and (out is None or out.stride(1) == 1 or n_cols == 1)
    dummy = torch.empty(1, dtype=torch.float32, device=z.device)
    dense_mode = DENSE_NONE
    if dense is not None:
        dense_mode = DENSE_PER_ROW if dense.dim() == 2 else DENSE_SHARED
    elif dense_is_ones:
        dense_mode = DENSE_ONES
    softmax_c, zloss_c, target_c, dense_c, entropy_c = coefs if coefs is not None else (None,) * 5
    assert entropy_c is None or (stats.entropy_rel is not None if stats is not None else row_entropy is not None)

    def arg(t: Tensor | None) -> Tensor:
        return t if t is not None else dummy

    per_row_t = isinstance(temperature, Tensor)
    whole_row = stats is not None and coefs is not None and n_cols <= WHOLE_ROW_MAX_COLUMNS
    if whole_row:
        block, warps, grid = _whole_row_launch(num_rows, n_cols)
    else:
        block, warps, grid = _launch(z, num_rows, n_cols, softcap is not None)
    with _on_device(z):
        _rows_kernel[(grid,)](
            z,
            z.stride(0),
            arg(out),
            out.stride(0) if out is not None else 0,
            arg(target),
            arg(dense),
            dense.stride(0) if dense is not None and dense.dim() == 2 else 0,
            arg(stats and stats.shift),
            arg(stats and stats.sumexp),
            arg(stats and stats.target_logit),
            arg(stats and stats.dense_rel),
            arg(stats and stats.argmax),
            arg(stats.entropy_rel if stats is not None else row_entropy),
            arg(stats and stats.sumsq),
            arg(stats and stats.logit_sum),
            arg(lse),
            arg(softmax_c),
            arg(zloss_c),
            arg(target_c),
            arg(dense_c),
            arg(entropy_c),
            num_rows,
            n_cols,
            float(softcap) if softcap is not None else 1.0,
            1.0 if per_row_t else float(temperature),
            temperature if per_row_t else dummy,
            BLOCK=block,
            STATS=stats is not None,
            GRAD=coefs is not None,
            HAS_TARGET=target is not None,
            STORE_TARGET=stats is not None and stats.target_logit is not None and target is not None,
            STORE_DENSE=stats is not None and stats.dense_rel is not None and dense_mode != DENSE_NONE,
            DENSE_MODE=dense_mode,
            SOFTCAP=softcap is not None,
            TEMPERATURE=divides(temperature),
            PER_ROW_TEMPERATURE=per_row_t,
            ZLOSS=zloss_c is not None,
            STORE_ARGMAX=stats is not None and stats.argmax is not None,
            STORE_ENTROPY=stats is not None and stats.entropy_rel is not None,
            STORE_SUMSQ=stats is not None and stats.sumsq is not None,
            STORE_LOGIT_SUM=stats is not None and stats.logit_sum is not None,
            ENTROPY_GRAD=entropy_c is not None,
            WHOLE_ROW=whole_row,
            num_warps=warps,
        )


def triton_chunk(
    workspace: Tensor,
    r0: int,
    r1: int,
    stats: rows.RowStats,
    load,
    *,
    source: Tensor | None = None,
    target: Tensor | None = None,
    dense: Tensor | None = None,
    dense_is_ones: bool = False,
    softcap: float | None = None,
    temperature: float | Tensor = 1.0,
    coefficients=None,
) -> None:
    """rows.torch_chunk's contract, in one launch of the kernel."""
    if source is None:
        load()
    lse = coefficients.lse[r0:r1] if coefficients is not None and coefficients.lse is not None else None
    row_entropy = None
    if lse is not None and coefficients.entropy_value is not None:
        row_entropy = coefficients.entropy_value[r0:r1]
    rows_(
        workspace if source is None else source,
        stats=stats.rows(r0, r1) if lse is None else None,
        target=target.view(-1) if target is not None else None,
        dense=dense,
        dense_is_ones=dense_is_ones,
        softcap=softcap,
        temperature=temperature,
        out=workspace if coefficients is not None else None,
        coefs=coefficients.rows(r0, r1) if coefficients is not None else None,
        lse=lse,
        row_entropy=row_entropy,
    )


def cross_entropy_forward(
    problem,
    need_grad: bool,
    upstream: Tensor | None = None,
    entropy_upstream: Tensor | None = None,
    grad_out: Tensor | None = None,
):
    """Loss, the gradient for a unit upstream gradient (or for `upstream`, the loss's gradient; plus that
    of sum_i entropy_upstream_i * H_i) and the requested per-token statistics, in one launch over all rows
    (no host sync)."""
    x = problem.logits[:, :, 0]
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    n, c = x.shape
    opts = problem.options
    targets = rows.IndexTargets.from_options(problem.target, problem.weight, opts, c, torch.float32)
    smoothing = bool(targets.terms.b)
    entropy = entropy_upstream.reshape(-1).float() if entropy_upstream is not None else None
    stats = rows.RowStats.for_statistics(
        n,
        problem.statistics,
        target=True,
        dense=smoothing,
        dtype=torch.float32,
        device=x.device,
        entropy_gradient=entropy is not None,
    )
    grad = None
    if need_grad:  # grad_out: as the portable driver's (the logits themselves: each element read, then written)
        grad = grad_out if grad_out is not None else torch.empty((n, c, 1), dtype=x.dtype, device=x.device)
    rows_(
        x,
        stats=stats,
        target=targets.index,
        dense=targets.class_weight if smoothing else None,
        dense_is_ones=smoothing and targets.class_weight is None,
        softcap=opts.softcap,
        temperature=problem.temperature,
        out=grad[:, :, 0] if grad is not None else None,
        coefs=targets.coefficients(targets.scale(upstream), entropy=entropy).rows(0, n) if need_grad else None,
    )
    if not c:
        rows.classless_stats(stats)
    loss_rows = (
        targets.block_losses(stats) if c else rows.classless_losses(n, opts.label_smoothing, torch.float64, x.device)
    )
    token_stats = rows.token_statistics(stats, problem.statistics, targets, opts.z_loss, problem.compute_dtype, c)
    return rows.finish_loss(problem, loss_rows, targets.denominator), grad, token_stats


@triton.jit
def _scale_kernel(G, UP, n_cols, stride_row, STRIDE, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    # PER_ROW: grid (rows, column blocks), one upstream value per row; else grid (blocks,) over a flat buffer.
    if PER_ROW:
        row = tl.program_id(0).to(tl.int64)
        col_block = tl.program_id(1).to(tl.int64)
        u = tl.load(UP + row).to(tl.float32)
    else:
        row = 0
        col_block = tl.program_id(0).to(tl.int64)
        u = tl.load(UP).to(tl.float32)
    if u != 1.0:  # the unit upstream of loss.backward(): leave the buffer untouched, no memory traffic
        # the grid may be smaller than the blocks (a few programs per multiprocessor, so that a unit
        # upstream costs a few thousand programs that return at once, not one per block)
        for b in range(col_block, tl.cdiv(n_cols, BLOCK), STRIDE):
            # the block's start in 64 bits on the scalar side, the lanes' 32-bit offsets from it: no
            # element offset is ever formed in 32 bits (flat buffers above 2^31 elements)
            start = b * BLOCK
            lanes = tl.arange(0, BLOCK)
            mask = lanes < n_cols - start
            ptr = G + row * stride_row + start + lanes
            g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            # exact zeros (ignored rows) stay zero even for an inf or NaN upstream, as torch's
            tl.store(ptr, _downcast(tl.where(g == 0.0, g, g * u), G.dtype.element_ty), mask=mask)


def scale_(grad: Tensor, upstream: Tensor, per_row: bool) -> None:
    """grad (contiguous) *= upstream (a scalar, or one per row of grad's first dimension), fp32 math."""
    up = upstream.reshape(-1).contiguous()  # an expanded upstream (loss.sum().backward()) has stride 0
    if up.device != grad.device:
        up = up.to(grad.device)
    block = 2048
    if per_row:
        rows, n_cols = grad.shape[0], grad[0].numel() if grad.shape[0] else 0
        if rows == 0 or n_cols == 0:
            return
        block = min(block, triton.next_power_of_2(n_cols))
        col_blocks = triton.cdiv(n_cols, block)
        with _on_device(grad):
            _scale_kernel[(rows, col_blocks)](
                grad, up, n_cols, n_cols, col_blocks, PER_ROW=True, BLOCK=block, num_warps=4
            )
    else:
        n = grad.numel()
        if n == 0:
            return
        programs = triton.cdiv(n, block)
        if grad.is_cuda:
            programs = min(programs, 16 * _multiprocessors(grad.device.index if grad.device.index is not None else 0))
        with _on_device(grad):
            _scale_kernel[(programs,)](grad, up, n, 0, programs, PER_ROW=False, BLOCK=block, num_warps=4)
