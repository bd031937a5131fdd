"""The linear cross-entropy chunk loop: a matmul fills a workspace with one chunk of logits, the row
kernel turns it into the loss statistics and, in place, the logits' gradient, and two more matmuls fold
that into the gradients of the input and the head before the next chunk reuses the workspace.

Serves xent.linear_cross_entropy (all classes) and the vocab-parallel linear loss (one rank's block of
classes, whose gradient pass gets the global log-sum-exp). The chosen backend is asked first for a whole
fused pass of its own (Backend.linear_pass); without one, the generic chunked GEMM path below runs.

The pieces every chunked pass over a linear head shares live here too, for kernels/distill.py as well:
`row_ranges` (the chunks' rows), `Head` (a chunk's logits into a workspace) and `HeadGradients` (a
chunk's logits gradient folded into the gradients of the hidden states, the head's weight and its bias).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problems import HALF_DTYPES, LinearProblem, autocast_dtype, compute_dtype
from . import backend_for, rows
from .backends import Work
from .driver import Chunk, RowPass

# Default workspace: 1/16 of the full logits, between 16 MiB and 256 MiB (benchmarks/RESULTS.md).
MIN_CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 256 << 20
# On a GPU, up to the size of the head's fp32 weight-gradient accumulator (V x H x 4 bytes), at most 4 GiB:
# every chunk reads and writes that accumulator, which took 55% of the time at 8192 x 4096 x 128256 with
# 512-row chunks on an H100 (62 ms; 40 ms with one chunk). Peak memory stays within twice the accumulator,
# and a single chunk needs no accumulator at all (benchmarks/RESULTS.md).
MAX_GPU_CHUNK_BYTES = 4 << 30


def workspace_dtype(
    device: torch.device, dtype: torch.dtype, choice: str | None = None, logits_dtype: torch.dtype | None = None
) -> torch.dtype:
    """The dtype of the logits workspace for a head of `dtype`: the head's own for bf16/fp16 on a backend
    whose chunk step works in half-precision workspaces (Triton: half-precision GEMMs, fp32 math in the
    kernel), else the compute dtype (fp32 or fp64). `choice`: the call's backend choice; `logits_dtype`:
    the problem's (fp32 logits keep an fp32 workspace on every backend)."""
    cd = compute_dtype(dtype)
    if logits_dtype is not None or dtype not in HALF_DTYPES:
        return cd
    return dtype if backend_for(device, cd, choice).half_precision_workspace else cd


def chunk_rows(
    num_rows: int, vocab: int, ws_dtype: torch.dtype, memory_budget: int | None, accumulator_bytes: int = 0
) -> int:
    """Tokens per chunk so that one chunk of logits takes about `memory_budget` bytes (see the top).

    Without a budget: 1/16 of the logits within [16 MiB, 256 MiB], or up to `accumulator_bytes` (the
    weight gradient's accumulator, on a GPU) when that is more. Rounded down to whole 128-row tiles, so
    every chunk's GEMMs run full tiles."""
    row_bytes = max(1, vocab) * torch.finfo(ws_dtype).bits // 8
    if memory_budget is not None:
        return max(1, min(num_rows, memory_budget // row_bytes))
    budget = min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, num_rows * row_bytes // 16))
    budget = max(budget, min(accumulator_bytes, MAX_GPU_CHUNK_BYTES))
    rows_ = budget // row_bytes
    if rows_ >= 256:
        rows_ -= rows_ % 128
    return max(1, min(num_rows, rows_))


def rows_per_chunk(p: LinearProblem, weight_grad: bool = False) -> int:
    """Tokens per chunk: the caller's chunk size, or as many as the memory budget holds (by default more
    on a GPU when the pass accumulates the weight's gradient)."""
    if p.chunk_size:
        return p.chunk_size
    vocab, hidden = p.linear_weight.shape
    return chunk_rows(
        p.input.shape[0],
        vocab,
        workspace_dtype(p.input.device, p.input.dtype, p.options.backend, p.logits_dtype),
        p.memory_budget,
        accumulator_bytes=vocab * hidden * 4 if weight_grad and p.input.device.type == "cuda" else 0,
    )


# The memory plans of a pass that computes the head's gradients (LinearProblem.memory_mode):
#   "fast": one pass over row chunks (3 GEMMs); a half-precision head whose rows take more than one chunk
#           keeps an fp32 accumulator of the weight's gradient, V x H x 4 bytes (with few tokens, more than
#           the logits themselves), and on a GPU its chunks grow to that size to avoid re-reading it;
#   "lean": that pass for the input's gradient and the rows' statistics only (no weight accumulator, small
#           chunks), then vocabulary slabs for the weight's and bias's gradients: each slab recomputes its
#           logits with the rows' lse and accumulates its rows of the weight gradient in fp32 over all
#           tokens (an accumulator of one slab). 4 GEMMs; memory beyond the returned gradients two chunks;
#   "auto": "lean" where "fast" would keep the accumulator, on the CPU (where it was measured); "fast" on a
#           GPU until a GPU measurement says otherwise, and wherever no accumulator is needed.
MEMORY_MODES = ("auto", "lean", "fast")  # validation checks against the same names
# The lean plan's default budgets, as fractions of the logits in the head's dtype (at least 1 MiB each):
# the row pass holds only its chunk's workspaces, the slab pass also a slab's accumulator and gradient.
# The row pass's chunks are the larger: with 1/64 there, CPU distillation took 3.3x the fast plan's time
# (chunks of 5 rows at V = 32768), with 1/20 ~1.3x (benchmarks/RESULTS.md).
LEAN_ROW_FRACTION = 20
LEAN_SLAB_FRACTION = 64
LEAN_HEAD_FRACTION = 64  # the row pass's floor, a fraction of the head's bytes (lean_budgets)


def lean_plan(p: LinearProblem, want: tuple[bool, bool, bool]) -> bool:
    """Whether a pass computing the gradients in `want` takes the lean plan (see MEMORY_MODES)."""
    return takes_lean_plan(p.memory_mode, want, p.input, p.linear_weight, lambda: rows_per_chunk(p, want[1]))


def takes_lean_plan(mode: str, want: tuple[bool, ...], input: Tensor, weight: Tensor, fast_rows) -> bool:
    """The rule of MEMORY_MODES for any loss over a linear head; `fast_rows()`: the fast plan's tokens per
    chunk (more tokens than that and a half-precision head keeps the fp32 accumulator)."""
    if mode == "fast" or not (want[1] or want[2]) or weight.shape[0] == 0 or input.shape[0] == 0:
        return False
    if mode == "lean":
        return True
    return weight.dtype in HALF_DTYPES and input.device.type == "cpu" and input.shape[0] > fast_rows()


def statistics_problem(p: LinearProblem) -> LinearProblem:
    """The problem a pass without gradients (the forward of a loss whose backward recomputes, inference)
    runs: under the plan a gradient pass over this head would take, so that the lean plan's forward stays
    as lean as its backward (for 'auto', also where no gradient follows: the same rule as with one)."""
    if p.chunk_size or p.memory_budget is not None or not lean_plan(p, (False, True, False)):
        return p
    return replace(p, memory_budget=lean_budgets(p.input, p.linear_weight.shape[0], None)[0])


def lean_budgets(input: Tensor, vocab: int, memory_budget: int | None) -> tuple[int, int]:
    """Bytes of one chunk of the lean plan's row pass and of its slab pass: the caller's budget for both,
    or LEAN_ROW_FRACTION / LEAN_SLAB_FRACTION of the (R x V) logits in the head's dtype (at least 1 MiB).

    The row pass's chunks take at least LEAN_HEAD_FRACTION of the head's own bytes: every row chunk reads
    the whole head, and with few tokens over a large vocabulary 1/20 of the logits is a row or two (48
    tokens x 152064 classes: 48 chunks, each reading a 1 GiB head; its fp32 logits upcast it in pieces too),
    while the head's gradient the pass returns is that size anyway."""
    if memory_budget is not None:
        return memory_budget, memory_budget
    item = torch.finfo(input.dtype).bits // 8
    logits = input.shape[0] * vocab * item
    head = vocab * input.shape[-1] * item
    row = max(1 << 20, logits // LEAN_ROW_FRACTION, head // LEAN_HEAD_FRACTION)
    return row, max(1 << 20, logits // LEAN_SLAB_FRACTION)


def gradient_pass(
    p: LinearProblem,
    block: rows.ClassBlock,
    targets: rows.IndexTargets,
    scale: Tensor,
    want: tuple[bool, bool, bool],
    entropy_scale: Tensor | None = None,
):
    """linear_pass with the gradients of sum_i scale_i loss_i (+ entropy_scale_i H_i) over every class, in
    the plan lean_plan chooses: (stats, grad input, grad weight, grad bias), the weight's gradient in the
    weight's dtype under the lean plan (fp32 accumulation over every token inside), as linear_pass's
    otherwise."""
    if not lean_plan(p, want):
        return linear_pass(p, block, targets, scale, want, entropy_scale=entropy_scale)
    row_budget, budget = lean_budgets(p.input, p.linear_weight.shape[0], p.memory_budget)
    lean = replace(p, memory_budget=budget)
    stats, gi, _, _ = linear_pass(
        replace(p, memory_budget=row_budget),
        block,
        targets,
        scale,
        (want[0], False, False),
        entropy_scale=entropy_scale,
    )
    lse = stats.lse()
    entropy_value = None
    if entropy_scale is not None:  # the rows' entropies, for the slabs' entropy terms
        entropy_value = rows.token_statistics(stats, ("entropy",), targets, 0.0, torch.float64)["entropy"]
    w, b = p.linear_weight, p.linear_bias

    def slab_pass(v0: int, v1: int, want_slab: tuple[bool, bool, bool]):
        part = replace(lean, linear_weight=w[v0:v1], linear_bias=b[v0:v1] if b is not None else None, statistics=())
        sub = rows.ClassBlock.shard(targets.index, targets.valid, targets.class_weight, v0, v1 - v0)
        _, _, gw_s, gb_s = linear_pass(
            part, sub, targets, scale, want_slab, lse=lse, entropy_scale=entropy_scale, entropy_value=entropy_value
        )
        return gw_s, gb_s

    return (stats, gi, *slab_gradients(w, b, want, budget, p.compute_dtype, slab_pass))


def slab_gradients(w: Tensor, b: Tensor | None, want: tuple[bool, ...], budget: int, cd: torch.dtype, slab_pass):
    """The lean plan's second half, for any loss over a linear head: the head's (weight, bias) gradients
    (None where not in `want`), the weight's in its dtype, filled slab by slab of the vocabulary by
    `slab_pass(v0, v1, want)` -> (the slab's weight gradient, its bias gradient)."""
    vocab, hidden = w.shape
    gw = torch.empty_like(w, memory_format=torch.contiguous_format) if want[1] else None
    gb = torch.empty(vocab, dtype=cd, device=w.device) if want[2] and b is not None else None
    # a slab's weight-gradient accumulator (and the gradient it returns) take half the budget each
    slab = max(1, min(vocab, budget // 2 // max(1, hidden * torch.finfo(cd).bits // 8)))
    for v0 in range(0, vocab, slab):
        v1 = min(vocab, v0 + slab)
        gw_s, gb_s = slab_pass(v0, v1, (False, want[1], gb is not None))
        if gw is not None:
            gw[v0:v1] = gw_s
        if gb is not None:
            gb[v0:v1] = gb_s
    return gw, gb


def linear_pass(
    p: LinearProblem,
    block: rows.ClassBlock,
    targets: rows.IndexTargets | None = None,
    scale: Tensor | None = None,
    want: tuple[bool, bool, bool] = (False, False, False),
    lse: Tensor | None = None,
    entropy_scale: Tensor | None = None,
    entropy_value: Tensor | None = None,
):
    """One pass over the rows' logits, chunk by chunk: their statistics and, when `targets` and `scale` are
    given, the gradients in `want` (input, linear_weight, linear_bias) of sum_i scale_i * loss_i.

    `block` says which classes the head holds (all of them, or one rank's shard, whose gradient then
    needs the rows' global `lse`). `entropy_scale` (per row) adds the gradient of sum_i entropy_scale_i *
    H_i, H_i the row's entropy (with one block of the classes, `entropy_value` holds the rows' global H).
    Weight and bias gradients come back in fp32 (fp64 for fp64 parameters), except a weight gradient that
    one chunk covers: one GEMM in the workspace's dtype (fp32 accumulation inside it, as F.linear's
    backward), with no accumulator.
    """
    fusing = backend_for(p.input.device, p.compute_dtype, p.options.backend, work=Work.FUSED_LINEAR)
    if fusing.supports(Work.FUSED_LINEAR, problem=p):  # the torch backend never: the chunked GEMMs below
        fused = fusing.linear_pass(
            p,
            block,
            targets=targets,
            scale=scale,
            want=want,
            lse=lse,
            entropy_scale=entropy_scale,
            entropy_value=entropy_value,
        )
        if fused is not None:
            return fused
    backend = backend_for(p.input.device, p.compute_dtype, p.options.backend)

    x, w_lin, b_lin = p.input, p.linear_weight, p.linear_bias
    num_rows, vocab = x.shape[0], w_lin.shape[0]
    cd = p.compute_dtype
    dev = x.device
    cap = p.options.softcap
    need_grad = scale is not None and any(want)
    want = want if need_grad else (False, False, False)

    smoothing = p.options.label_smoothing > 0
    stats = rows.RowStats.for_statistics(
        num_rows,
        p.statistics,
        target=True,
        dense=smoothing,
        dtype=cd,
        device=dev,
        entropy_gradient=entropy_scale is not None,
    )
    if not vocab:  # no classes in this head (or this rank's block): sum exp = 0, lse = -inf, no chunk runs
        rows.classless_stats(stats)
    step = rows_per_chunk(p, want[1])
    ws_dtype = workspace_dtype(dev, x.dtype, p.options.backend, p.logits_dtype)
    grads = HeadGradients(
        x, w_lin, want, cd, one_chunk=0 < num_rows <= step and vocab > 0 and ws_dtype == x.dtype == w_lin.dtype
    )
    entropy = entropy_scale.to(cd) if entropy_scale is not None else None
    coefficients = targets.coefficients(scale, lse, block, entropy, entropy_value) if need_grad else None
    unshifted = dev.type == "cpu"  # as in kernels/portable.py: decided per chunk with a host check

    # On the Triton backend a half-precision head keeps its workspace in that dtype: the logits come from
    # a bf16/fp16 GEMM (fp32 accumulation, as F.linear), the kernel reads them and writes the gradient in
    # place with fp32 math, and the two gradient GEMMs run on half inputs too. The torch backend's row
    # math works in the workspace itself, so it keeps fp32 there.
    work_buf = torch.empty(min(step, num_rows) * vocab, dtype=ws_dtype, device=dev) if num_rows and vocab else None
    chain_buf = (
        torch.empty_like(work_buf)
        if cap is not None and need_grad and work_buf is not None and backend.softcap_chain_scratch
        else None
    )
    head = Head(w_lin, b_lin, fp32_logits=p.logits_dtype is not None)

    def chunks():
        for r0, r1 in row_ranges(num_rows if vocab else 0, step):
            xc = x[r0:r1]
            ws = work_buf[: (r1 - r0) * vocab].view(r1 - r0, vocab)
            yield Chunk(r0, r1, ws, lambda xc=xc, ws=ws: head.logits_into_(ws, xc))
            if need_grad:  # the workspace holds the chunk's logits gradient: fold it into the parameters'
                grads.fold_(r0, r1, xc, ws if ws.dtype == x.dtype else ws.to(x.dtype), ws)

    RowPass.over_block(
        backend,
        stats,
        block,
        smoothing,
        softcap=cap,
        temperature=p.temperature,
        coefficients=coefficients,
        chain_buf=chain_buf,
        unshifted=unshifted,
    ).run(chunks())
    return (stats, *grads.result())


@torch.no_grad()
def linear_topk(p: LinearProblem, k: int) -> tuple[Tensor, Tensor]:
    """The k most probable classes of every row of a linear head and their log-probabilities under
    softmax(softcap(logits) / T): (R, k) in the compute dtype and (R, k) int64, most probable first (ties
    in torch.topk's order). No gradient. The logits of one chunk of rows at a time, in the compute dtype (a
    half-precision head's GEMM in its dtype with fp32 accumulation, rounded to it as F.linear rounds, unless
    p.logits_dtype keeps them in fp32)."""
    x, w, b = p.input, p.linear_weight, p.linear_bias
    num_rows, vocab = x.shape[0], w.shape[0]
    cd, dev = p.compute_dtype, x.device
    values = torch.empty((num_rows, k), dtype=cd, device=dev)
    indices = torch.empty((num_rows, k), dtype=torch.int64, device=dev)
    if not num_rows:
        return values, indices
    step = p.chunk_size or chunk_rows(num_rows, vocab, cd, p.memory_budget)
    work = torch.empty(min(step, num_rows) * vocab, dtype=cd, device=dev)
    head, cap, t = Head(w, b, fp32_logits=p.logits_dtype is not None), p.options.softcap, p.temperature
    with no_autocast(dev):
        for r0, r1 in row_ranges(num_rows, step):
            z = work[: (r1 - r0) * vocab].view(r1 - r0, vocab)
            head.logits_into_(z, x[r0:r1])
            if cap is not None:
                z.div_(cap).tanh_().mul_(cap)
            if isinstance(t, Tensor):
                z.div_(t[r0:r1].unsqueeze(1))
            elif t != 1.0:
                z.div_(t)
            top = torch.topk(z, k, dim=1, sorted=True)
            values[r0:r1] = top.values - torch.logsumexp(z, 1, keepdim=True)
            indices[r0:r1] = top.indices
    return values, indices


def row_ranges(num_rows: int, step: int):
    """(r0, r1): the rows of each chunk of `step` rows (the last one shorter)."""
    for r0 in range(0, num_rows, step):
        yield r0, min(num_rows, r0 + step)


class Head:
    """A linear head whose chunk logits come out as F.linear computes them, divided by the temperature.

    fp32/fp64 heads divide the chunk's hidden states and the bias instead of the logits ((h W^T + b) / T =
    (h / T) W^T + b / T: O(rows x H) work, not O(rows x V)); heads in another dtype than the workspace's
    (half precision) run their GEMM in their dtype and divide while copying into the workspace. With
    `fp32_logits` a half-precision head's logits are the GEMM's fp32 accumulator itself, never rounded to
    the head's dtype (fp32_linear_into_), and the temperature divides them in fp32. With `finite`, a -inf
    bias entry (a masked-out token) is clamped to the dtype's most negative finite value divided by T: its
    probability stays exactly 0, and its log-probability finite, so 0 * log 0 terms vanish without a mask
    (distillation)."""

    def __init__(
        self,
        weight: Tensor | None,
        bias: Tensor | None,
        temperature: float = 1.0,
        finite: bool = False,
        fp32_logits: bool = False,
    ):
        self.weight, self.temperature, self.fp32_logits = weight, temperature, fp32_logits
        if bias is not None and finite:
            bias = bias.clamp(min=torch.finfo(bias.dtype).min * min(1.0, temperature))
        self.raw_bias = bias  # for a GEMM in another dtype than the workspace's, which divides its output
        if bias is not None and temperature != 1.0 and bias.dtype in (torch.float32, torch.float64):
            bias = bias / temperature
        self.bias = bias

    def logits_into_(self, out: Tensor, x: Tensor) -> None:
        t, w, b = self.temperature, self.weight, self.bias
        if x.dtype != out.dtype and self.fp32_logits:  # the fp32 accumulator, divided in fp32
            fp32_linear_into_(out, x, w, self.raw_bias)
            if t != 1.0:
                out.div_(t)
            return
        if x.dtype != out.dtype:  # another dtype (half precision): the GEMM in it, the division on the copy
            divide_into_(out, F.linear(x, w, self.raw_bias), t)
            return
        x = x / t if t != 1.0 else x
        if b is None:
            torch.mm(x, w.T, out=out)
        else:
            torch.addmm(b, x, w.T, out=out)


def fp32_linear_into_(out: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> None:
    """out (fp32) = x @ w.T + b for half-precision x, w, b: the GEMM's fp32 accumulator, never rounded to half.

    CUDA: a half-precision GEMM with an fp32 output (torch.mm(..., out_dtype=float32)). Elsewhere (the
    CPU has no such kernel) an fp32 GEMM of the exactly upcast operands, the head upcast a piece of at
    most FP32_HEAD_PIECE_BYTES at a time into one reused buffer (never a whole fp32 copy of the head); for a
    bf16 head that GEMM runs in oneDNN's bf16 math mode (bf16 products, fp32 accumulation: exact on
    operands that are bf16 values, at about the bf16 GEMM's speed instead of 3.5x its time)."""
    if x.device.type == "cuda" and _OUT_DTYPE_MM.get("mm", True):
        try:
            torch.mm(x, w.T, out_dtype=out.dtype, out=out)
            if b is not None:
                out.add_(b)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_MM["mm"] = False  # this torch has no such kernel: the upcast GEMMs below
    x32 = x.to(out.dtype)
    vocab, hidden = w.shape
    # pieces no larger than the chunk's own logits (within the memory plan), at least 1 MiB (smaller ones
    # took up to 5x the time of 8 MiB ones: a GEMM call per piece)
    piece_bytes = min(FP32_HEAD_PIECE_BYTES, max(1 << 20, out.numel() * out.element_size()))
    piece = max(1, min(vocab, piece_bytes // max(1, hidden * out.element_size())))
    w32 = torch.empty((piece, hidden), dtype=out.dtype, device=w.device)
    with bf16_math(w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"):
        for v0 in range(0, vocab, piece):
            v1 = min(vocab, v0 + piece)
            head = w32[: v1 - v0].copy_(w[v0:v1])
            if b is None:
                torch.mm(x32, head.T, out=out[:, v0:v1])
            else:
                torch.addmm(b[v0:v1].to(out.dtype), x32, head.T, out=out[:, v0:v1])


_OUT_DTYPE_MM: dict[str, bool] = {}
FP32_HEAD_PIECE_BYTES = 8 << 20


@contextlib.contextmanager
def bf16_math(enabled: bool):
    """fp32 CPU matmuls in oneDNN's bf16 math mode inside (torch.backends.mkldnn.matmul.fp32_precision:
    a process-wide setting, restored on exit); a no-op where this torch lacks it or `enabled` is False."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def formula_logits(x: Tensor, w: Tensor, b: Tensor | None, logits_dtype: torch.dtype | None) -> Tensor:
    """The logits as the formula paths (torch.func, double backward) differentiate them: F.linear's, or with
    `logits_dtype` (fp32 logits of a half-precision head) F.linear of the exactly upcast operands."""
    if logits_dtype is None or x.dtype == logits_dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(logits_dtype), w.to(logits_dtype), b.to(logits_dtype) if b is not None else None)


def divide_into_(out: Tensor, logits: Tensor, temperature: float) -> None:
    """out = logits / temperature, computed in out's dtype (a half-precision division would round again)."""
    if temperature == 1.0:
        out.copy_(logits)
    elif logits.dtype == out.dtype:
        torch.div(logits, temperature, out=out)
    else:
        out.copy_(logits).div_(temperature)


class HeadGradients:
    """The gradients a chunked pass over a linear head folds each chunk's logits gradient into: the
    hidden states' (their dtype), the weight's and the bias's (accumulated in the compute dtype `cd`).

    A weight gradient that one chunk covers (`one_chunk`) is one GEMM straight into the returned tensor,
    in the hidden states' dtype (fp32 accumulation inside it, as F.linear's backward): no accumulator.
    Without classes no chunk runs: the input's gradient is then zeros (contiguous whatever the input's
    strides, as the custom ops' fakes say), as are the others."""

    def __init__(self, x: Tensor, weight: Tensor, want: tuple[bool, bool, bool], cd: torch.dtype, one_chunk: bool):
        want_input, want_weight, want_bias = want
        vocab, dev = weight.shape[0], x.device
        self.weight, self.cd, self.one_chunk = weight, cd, one_chunk
        self.input = (torch.empty if vocab else torch.zeros)(x.shape, dtype=x.dtype, device=dev) if want_input else None
        self.linear_weight = None
        if want_weight:
            self.linear_weight = (torch.empty if one_chunk else torch.zeros)(
                weight.shape, dtype=x.dtype if one_chunk else cd, device=dev
            )
        self.linear_bias = torch.zeros(vocab, dtype=cd, device=dev) if want_bias else None

    def fold_(self, r0: int, r1: int, x_rows: Tensor, grad_logits: Tensor, grad_for_bias: Tensor) -> None:
        """Adds rows r0:r1's share: `grad_logits` (their logits gradient, in x_rows's dtype: what the GEMMs
        read) and `grad_for_bias` (the same, as computed: what the bias sums)."""
        if self.input is not None:
            torch.mm(grad_logits, self.weight, out=self.input[r0:r1])
        if self.linear_weight is not None and self.one_chunk:
            torch.mm(grad_logits.T, x_rows, out=self.linear_weight)
        elif self.linear_weight is not None:
            accumulate_mm_(self.linear_weight, grad_logits.T, x_rows)
        if self.linear_bias is not None:
            self.linear_bias.add_(grad_for_bias.sum(0, dtype=self.cd))

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        return self.input, self.linear_weight, self.linear_bias


def accumulate_mm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32/fp64) += a @ b, with a GEMM in a's and b's dtype (half inputs never run an fp32 GEMM on a GPU).

    Half inputs on CUDA accumulate straight into fp32 through the GEMM's beta = 1 (torch's
    `addmm(..., out_dtype=float32)`). Where that overload is missing (CPU, older torch) a bf16 product is
    taken with fp32 accumulation inside the GEMM, rounded once, and added in fp32. An fp16 product on the
    CPU is instead an fp32 GEMM of the exactly upcast inputs: rounded to fp16, a chunk's partial sums of a
    small gradient (a tiny upstream, or 'mean' over many tokens) fall below fp16's 2^-24 and flush to 0
    where the whole sum would not, and torch's CPU fp16 GEMM accumulates in fp32 anyway (here it also took
    78x the fp32 GEMM's time: no fp16 hardware).
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
    if a.dtype == torch.float16 and a.device.type == "cpu":
        # the inner dimension (tokens) in pieces, so that the upcast copies stay within 256 KiB however many
        # tokens one GEMM covers (the lean plan's slabs cover them all); the sum stays in fp32 throughout
        piece = max(1, UPCAST_PIECE_BYTES // (torch.finfo(acc.dtype).bits // 8 * (a.shape[0] + b.shape[1])))
        for k0 in range(0, a.shape[1], piece):
            acc.addmm_(a[:, k0 : k0 + piece].to(acc.dtype), b[k0 : k0 + piece].to(acc.dtype))
        return
    acc.add_(torch.mm(a, b))


_OUT_DTYPE_ADDMM: dict[str, bool] = {}
UPCAST_PIECE_BYTES = 256 << 10


def loss_rows(p: LinearProblem, targets: rows.IndexTargets, stats: rows.RowStats) -> Tensor:
    if p.input.shape[0] and p.linear_weight.shape[0]:
        return targets.block_losses(stats).to(p.compute_dtype)
    if not p.linear_weight.shape[0]:
        return rows.classless_losses(p.input.shape[0], p.options.label_smoothing, p.compute_dtype, p.input.device)
    return torch.zeros(p.input.shape[0], dtype=p.compute_dtype, device=p.input.device)


def index_targets(p: LinearProblem) -> rows.IndexTargets:
    return rows.IndexTargets.from_options(p.target, p.weight, p.options, p.linear_weight.shape[0], p.compute_dtype)


def no_autocast(device: torch.device):
    return (
        torch.autocast(device.type, enabled=False) if autocast_dtype(device) is not None else contextlib.nullcontext()
    )
