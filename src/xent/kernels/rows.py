"""The row math every xent loss shares: the one place the softmax gradient is written.

A *row* is one prediction: the logits z_1..z_C of one sample or token. Every loss in xent is, per
non-ignored row (docs/formulas.md derives each case from torch's definition),

    loss = a * (lse - z_y)  +  b * <u, lse - z>  +  z_loss * lse**2              lse = log sum_c exp(z_c)

    class-index target y:   a = (1 - eps) * w[y]    b = eps / C    u = w        (the class weights, ones if none)
    probability target P:   a = 0                   b = 1          u = w * ((1 - eps) * P + eps / C)

and its gradient with respect to the logits is

    dloss/dz = (a + b * U + 2 * z_loss * lse) * softmax(z)  -  a * onehot(y)  -  b * u          U = sum_c u_c

The functions below evaluate this in place on a *workspace*: a contiguous (rows, C) fp32/fp64 tensor that
holds one cache-sized chunk of logits. `exp_rows_` reads the logits once and leaves exp(z - shift) in the
workspace with the row sums beside it; `gradient_` turns that into the gradient without any other buffer;
`RowTerms` assembles losses and gradient coefficients from per-row statistics. Cross-entropy, linear
cross-entropy (whose workspace is a chunk of the matmul output) and the vocab-parallel loss (whose classes
are split in blocks across ranks) all use these same functions.

The distillation losses' row math (divergences between the student's and a teacher's softmaxes) is in
kernels/distill_rows.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..problems import divides


def softcap_(workspace: Tensor, softcap: float, chain_out: Tensor | None) -> Tensor | None:
    """workspace <- softcap * tanh(workspace / softcap), the logit cap of Gemma 2.

    Returns the chain-rule factor 1 - tanh(z / softcap)**2 in `chain_out` when one is given (only a
    gradient needs it), else None.
    """
    workspace.div_(softcap).tanh_()
    chain = None
    if chain_out is not None:
        chain = torch.mul(workspace, workspace, out=chain_out).neg_().add_(1.0)
    workspace.mul_(softcap)
    return chain


def exp_rows_(
    workspace: Tensor,
    shift: Tensor,
    sumexp: Tensor,
    *,
    source: Tensor | None = None,
    unshifted: bool = False,
    dense: Tensor | None = None,
    dense_is_ones: bool = False,
    dense_out: Tensor | None = None,
) -> bool:
    """workspace <- exp(z - shift), sumexp <- its row sums; z is `source`, or the workspace itself.

    Shifted (the default), shift = the row max, which keeps every row finite (as torch's log_softmax).
    With `unshifted`, shift = 0 and exp(z) is taken directly: one pass over the logits instead of three,
    valid whenever no row's sum overflows or underflows. It returns False when some row's did; the
    caller then reloads the chunk and calls again shifted.
    dense (u: (C,) shared, (rows, C) per row, or `dense_is_ones`) asks for dense_out <- <u, z - shift>,
    taken before the exp; it needs the shift, since <u, z - max> keeps the small losses of confident rows
    that <u, z> would round away.
    """
    src = workspace if source is None else source
    want_dense = dense is not None or dense_is_ones
    if unshifted and not want_dense:
        torch.exp(src, out=workspace)
        torch.sum(workspace, 1, out=sumexp)
        shift.zero_()
        # sum >= tiny * 1e12 bounds what flushed to zero below 1e-12 of the row's mass.
        low = torch.finfo(workspace.dtype).tiny * 1e12
        return bool(((sumexp >= low) & (sumexp < math.inf)).all())
    torch.amax(src, 1, keepdim=True, out=shift.unsqueeze(1))
    # a row whose logits are all -inf (here: a rank's block of a masked vocabulary) sums nothing: shift 0
    # gives exp(-inf) = 0 instead of exp(-inf - -inf) = NaN, as the Triton kernel does
    shift.masked_fill_(shift == -math.inf, 0.0)
    torch.sub(src, shift.unsqueeze(1), out=workspace)
    if dense_is_ones:
        torch.sum(workspace, 1, out=dense_out)
    elif dense is not None and dense.dim() == 1:
        torch.mv(workspace, dense, out=dense_out)
    elif dense is not None:
        torch.bmm(workspace.unsqueeze(1), dense.unsqueeze(2), out=dense_out.view(-1, 1, 1))
    workspace.exp_()
    torch.sum(workspace, 1, out=sumexp)
    return True


def e_log_e(e: Tensor) -> Tensor:
    """e * log(e), elementwise, with 0 log 0 = 0 (its limit), in a new buffer. log, mul and a NaN fill run
    vectorised: torch.xlogy and torch.special.entr were 6x slower on CPU."""
    return torch.log(e).mul_(e).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def log_sum_exp(shift: Tensor, sumexp: Tensor) -> Tensor:
    """lse = shift + log(sumexp), in float64: with shift = 0 the log carries the whole magnitude of the
    logits, and rounding lse to fp32 (an error of ulp(|lse|)) would then swamp small losses."""
    return shift.double() + sumexp.double().log()


def merge_blocks(shift: Tensor, sumexp: Tensor) -> Tensor:
    """lse (float64) of rows whose classes are split in K blocks: shift and sumexp are (K, rows)."""
    block_lse = log_sum_exp(shift, sumexp)
    top = block_lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.exp(block_lse - top).sum(0).log()


def merge_block_entropy(lse: Tensor, shift: Tensor, sumexp: Tensor, entropy_rel: Tensor) -> Tensor:
    """Entropy (float64) of rows whose classes are split in K blocks, from each block's (K, rows) shift,
    sumexp and entropy_rel = sum_c exp(z_c - shift) (z_c - shift), and the rows' global lse:

        H = sum_c p_c (lse - z_c) = sum_k exp(shift_k - lse) [ sumexp_k (lse - shift_k) - entropy_rel_k ]

    A block without mass (no classes, or all -inf) adds nothing; rows without any (lse = -inf) get 0, as
    token_statistics_of_rows gives them."""
    shift, sumexp, entropy_rel = shift.double(), sumexp.double(), entropy_rel.double()
    has_mass = (sumexp > 0) & torch.isfinite(lse)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    share = torch.exp(shift - safe_lse) * (sumexp * (safe_lse - shift) - entropy_rel)
    return torch.where(has_mass, share, 0).sum(0)


def merge_block_argmax(block_max: Tensor, index: Tensor) -> Tensor:
    """The first column of each row's largest logit over K blocks: block_max (K, rows) is each block's
    largest logit (-inf for a block without classes) and index (K, rows) its global column (inf without
    classes). The smallest column among the blocks that reach the rows' maximum; -1 when no block has
    classes (as classless_stats)."""
    top = block_max.amax(0)
    column = torch.where(block_max == top, index, torch.full_like(index, math.inf)).amin(0)
    return torch.where(torch.isfinite(column), column, -1).long()


def gradient_(
    workspace: Tensor,
    softmax_coef: Tensor,
    *,
    target: Tensor | None = None,
    target_coef: Tensor | None = None,
    dense: Tensor | None = None,
    dense_coef: Tensor | None = None,
    xlogy: Tensor | None = None,
    xlogy_coef: Tensor | None = None,
    chain: Tensor | None = None,
) -> None:
    """workspace (holding e = exp(z - shift)) <- (softmax_coef * e - target_coef * onehot - dense_coef * u
    + xlogy_coef * e log e) * chain.

    softmax_coef must already include exp(shift - lse), so that softmax_coef * e is the scaled softmax.
    Every coefficient is per row, shape (rows,). With dense=None and a dense_coef, u is all ones. `xlogy`
    holds e log e (the entropy term's, taken before this call).
    """
    workspace.mul_(softmax_coef.unsqueeze(1))
    if xlogy_coef is not None:
        workspace.addcmul_(xlogy_coef.unsqueeze(1), xlogy)
    if target is not None:
        workspace.scatter_add_(1, target, target_coef.neg().unsqueeze(1))
    if dense_coef is not None:
        if dense is None:
            workspace.sub_(dense_coef.unsqueeze(1))
        else:
            workspace.addcmul_(dense_coef.unsqueeze(1), dense if dense.dim() == 2 else dense.unsqueeze(0), value=-1.0)
    if chain is not None:
        workspace.mul_(chain)


@dataclass
class RowStats:
    """Per-row statistics of one block of classes, filled chunk by chunk by a pass over the logits."""

    shift: Tensor  # exp(z - shift) is what was summed
    sumexp: Tensor  # sum_c exp(z_c - shift)
    target_logit: Tensor | None  # z_y (0 where the row's target is not in this block)
    dense_rel: Tensor | None  # <u, z - shift>
    argmax: Tensor | None = None  # int64 column of the row's largest logit (the first, on ties); on request
    entropy_rel: Tensor | None = None  # sum_c exp(z_c - shift) * (z_c - shift), for the entropy; on request
    sumsq: Tensor | None = None  # sum_c exp(z_c - shift)^2, for sum_c p_c^2; on request
    logit_sum: Tensor | None = None  # sum_c z_c, for the mean logit; on request

    @classmethod
    def empty(
        cls,
        num_rows: int,
        *,
        target: bool,
        dense: bool,
        dtype: torch.dtype,
        device,
        argmax: bool = False,
        entropy: bool = False,
        sumsq: bool = False,
        logit_sum: bool = False,
    ) -> RowStats:
        def new():
            return torch.empty(num_rows, dtype=dtype, device=device)

        return cls(
            new(),
            new(),
            new() if target else None,
            new() if dense else None,
            torch.empty(num_rows, dtype=torch.int64, device=device) if argmax else None,
            new() if entropy else None,
            new() if sumsq else None,
            new() if logit_sum else None,
        )

    @classmethod
    def for_statistics(
        cls,
        num_rows: int,
        statistics: tuple,
        *,
        target: bool,
        dense: bool,
        dtype,
        device,
        entropy_gradient: bool = False,
    ) -> RowStats:
        """The statistics a pass fills to answer `statistics` (TokenStatistics' names) besides the loss;
        entropy_gradient: the pass's gradient has an entropy term, which needs the rows' entropies."""
        return cls.empty(
            num_rows,
            target=target,
            dense=dense,
            dtype=dtype,
            device=device,
            argmax=bool({"argmax", "correct"} & set(statistics)),
            entropy="entropy" in statistics or entropy_gradient,
            sumsq="sum_sq_probs" in statistics,
            logit_sum="mean_logit" in statistics,
        )

    def rows(self, r0: int, r1: int) -> RowStats:
        """Views of rows r0:r1 (writing them fills this object)."""
        return RowStats(
            *(
                t[r0:r1] if t is not None else None
                for t in (
                    self.shift,
                    self.sumexp,
                    self.target_logit,
                    self.dense_rel,
                    self.argmax,
                    self.entropy_rel,
                    self.sumsq,
                    self.logit_sum,
                )
            )
        )

    def chunk_(
        self,
        workspace: Tensor,
        r0: int,
        r1: int,
        load,
        *,
        source: Tensor | None = None,
        target: Tensor | None = None,
        dense: Tensor | None = None,
        dense_is_ones: bool = False,
        unshifted: bool = False,
        take_argmax: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Fill rows r0:r1 from one chunk: load() puts its logits in `workspace` (and returns the softcap
        chain, or None); then target logits, exp_rows_ and the dense dot. Returns the chain, and with the
        entropy the chunk's e log e (which an entropy term of the gradient reuses).

        take_argmax=False: load() fills the argmax itself (of the logits before the cap: tanh is monotone
        but saturates to ties in fp32)."""
        chain = load()
        src = workspace if source is None else source
        if self.logit_sum is not None:  # of the (capped, tempered) logits, before exp overwrites them
            torch.sum(src, 1, out=self.logit_sum[r0:r1])
        if target is not None and self.target_logit is not None:
            torch.gather(src, 1, target, out=self.target_logit[r0:r1].unsqueeze(1))
        if self.argmax is not None and take_argmax:
            self.argmax_(src, r0, r1)
        extra = (
            dict(dense=dense, dense_is_ones=dense_is_ones, dense_out=self.dense_rel[r0:r1])
            if self.dense_rel is not None
            else {}
        )
        # the entropy needs the max shift: without it sum e log e and s^2 overflow for logits above ~44
        unshifted = unshifted and self.entropy_rel is None and self.sumsq is None
        if not exp_rows_(workspace, self.shift[r0:r1], self.sumexp[r0:r1], source=source, unshifted=unshifted, **extra):
            chain = load()  # some row over/underflowed exp(z): redo the chunk with the max shift
            exp_rows_(workspace, self.shift[r0:r1], self.sumexp[r0:r1], source=source, **extra)
        xlogy = None
        if self.entropy_rel is not None:  # the workspace holds e = exp(z - shift): sum e * log e
            xlogy = e_log_e(workspace)
            torch.sum(xlogy, 1, out=self.entropy_rel[r0:r1])
        if self.sumsq is not None:  # sum e^2 as a row-wise dot product (no (rows, C) temporary)
            torch.bmm(workspace.unsqueeze(1), workspace.unsqueeze(2), out=self.sumsq[r0:r1].view(-1, 1, 1))
        return chain, xlogy

    def argmax_(self, logits: Tensor, r0: int, r1: int) -> None:
        """torch.max's indices: the first maximum, as torch.argmax, and faster than it on CPU."""
        self.argmax[r0:r1] = torch.max(logits, 1).indices

    def lse(self) -> Tensor:
        return log_sum_exp(self.shift, self.sumexp)


# The floating-point ones among the per-token statistics of return_stats= (problems.TokenStatistics).
FLOAT_STATISTICS = ("lse", "logprob", "entropy", "z_loss", "sum_sq_probs", "mean_logit")


def token_statistics(
    stats: RowStats,
    statistics: tuple,
    targets: IndexTargets | None,
    z_loss: float,
    dtype: torch.dtype,
    num_classes: int | None = None,
) -> dict[str, Tensor]:
    """token_statistics_of_rows for a batch's IndexTargets (None for probability targets)."""
    valid, index = (targets.valid, targets.index) if targets is not None else (None, None)
    return token_statistics_of_rows(stats, statistics, valid, index, z_loss, dtype, num_classes)


def token_statistics_of_rows(
    stats: RowStats,
    statistics: tuple,
    valid: Tensor | None,
    index: Tensor | None,
    z_loss: float,
    dtype: torch.dtype,
    num_classes: int | None = None,
) -> dict[str, Tensor]:
    """The requested statistics of every row, from one pass's RowStats (all classes in one block):

        lse      log sum_c exp(z_c)                   entropy  -sum_c p_c log p_c = log s - <e, z - shift> / s
        logprob  z_y - lse (0 on ignored rows)        z_loss   z_loss * lse**2 (0 on ignored rows)
        argmax   the first column of the largest z    correct  argmax == y (False on ignored rows)
        sum_sq_probs  sum_c p_c^2 = <e, e> / s^2      mean_logit  sum_c z_c / C (`num_classes`: C)

    (z after softcap, when there is one), floats in `dtype`. `valid` marks the rows whose target counts and
    `index` holds their class; both None for probability targets."""
    out = {}
    if not statistics:
        return out
    lse = stats.lse()
    for name in statistics:
        if name == "lse":
            value = lse
        elif name == "logprob":
            value = torch.where(valid, stats.target_logit.double() - lse, 0)
        elif name == "entropy":
            s = stats.sumexp.double()
            value = torch.where(s > 0, s.log() - stats.entropy_rel.double() / s, 0)  # no classes: 0
        elif name == "z_loss":
            value = z_loss * lse * lse
            value = torch.where(valid, value, 0) if valid is not None else value
        elif name == "sum_sq_probs":
            s = stats.sumexp.double()
            value = torch.where(s > 0, stats.sumsq.double() / (s * s), 0)  # no classes: 0
        elif name == "mean_logit":  # no classes: nan, as torch's mean over none
            value = stats.logit_sum.double() / num_classes if num_classes else torch.full_like(lse, math.nan)
        elif name == "argmax":
            out[name] = stats.argmax
            continue
        else:  # correct
            out[name] = valid & (stats.argmax == index)
            continue
        out[name] = value.to(dtype)
    return out


def dense_cross_entropy(lse: Tensor, shift: Tensor, dense_mass, dense_rel: Tensor) -> Tensor:
    """<u, lse - z> = U (lse - shift) - <u, z - shift> for one block (sum it over blocks).

    An infinite weight u_c (U = +-inf) makes the term u_c (lse - z_c) = +-inf, since lse > z_c; the split
    form would give inf - inf or inf * 0 = NaN there (the max-shifted z_c - shift of the row's largest
    logit is 0). So a non-finite U is the term itself: +-inf, or NaN for weights of both signs or a NaN
    weight, as torch's sum of w_c * -log_softmax gives."""
    value = dense_mass * (lse - shift) - dense_rel
    if not isinstance(dense_mass, Tensor):
        return value if math.isfinite(dense_mass) else torch.full_like(value, dense_mass)
    return torch.where(torch.isfinite(dense_mass), value, dense_mass.to(value.dtype))


def torch_chunk(
    workspace: Tensor,
    r0: int,
    r1: int,
    stats: RowStats,
    load,
    *,
    source: Tensor | None = None,
    target: Tensor | None = None,
    dense: Tensor | None = None,
    dense_is_ones: bool = False,
    softcap: float | None = None,
    temperature: float | Tensor = 1.0,
    chain_out: Tensor | None = None,
    coefficients: ChunkCoefficients | None = None,
    unshifted: bool = False,
) -> None:
    """One chunk of rows r0:r1 through the row math, with plain torch ops (the torch backend's chunk).

    load() puts the chunk's raw logits in `workspace` (unless `source` holds them and is read in place).
    Fills `stats` (the batch's RowStats; when `coefficients` carry a global lse, the vocab-parallel
    gradient pass, they are scratch) and, given `coefficients`, leaves the gradient in `workspace`.
    dense / dense_is_ones: the loss's u, passed only when it has a dense term. softcap is applied here,
    with its chain factor kept in `chain_out` for the gradient; then the temperature divides the (capped)
    logits in the workspace's dtype (fp32/fp64, never a half-precision rounding), and its chain factor
    1/T joins the gradient's per-row coefficients. A temperature other than 1 needs the logits loaded
    (no `source`): the division is in place.
    """
    assert source is None or not divides(temperature), "a temperature divides the workspace: load the logits"

    def load_capped() -> Tensor | None:
        if source is not None:
            return None
        load()
        chain = None
        if softcap is not None:
            if stats.argmax is not None:
                stats.argmax_(workspace, r0, r1)
            chain = softcap_(workspace, softcap, chain_out)
        if divides(temperature):  # a number, or this chunk's rows' own temperatures (rows,)
            workspace.div_(temperature.unsqueeze(1) if isinstance(temperature, Tensor) else temperature)
        return chain

    chain, xlogy = stats.chunk_(
        workspace,
        r0,
        r1,
        load_capped,
        source=source,
        target=target,
        dense=dense,
        dense_is_ones=dense_is_ones,
        unshifted=unshifted,
        take_argmax=softcap is None or source is not None,
    )
    if coefficients is not None:
        entropy_rel = stats.entropy_rel[r0:r1] if coefficients.entropy is not None else None
        coefs = coefficients(r0, r1, stats.shift[r0:r1], stats.sumexp[r0:r1], entropy_rel)
        if divides(temperature):  # d/d(raw logits) = (1/T) d/d(logits / T): every term is linear in them
            coefs = tuple(c / temperature if c is not None else None for c in coefs)
        softmax_coef, target_coef, dense_coef, xlogy_coef = coefs
        gradient_(  # the entropy term's e log e was taken with the statistics, before e turns into the gradient
            workspace,
            softmax_coef,
            target=target,
            target_coef=target_coef,
            dense=dense,
            dense_coef=dense_coef,
            xlogy=xlogy,
            xlogy_coef=xlogy_coef,
            chain=chain,
        )


@dataclass(frozen=True)
class RowTerms:
    """The coefficients a, b, z_loss of the loss above for a set of rows.

    a: (rows,) target-term weight (1 - eps) * w[y], 0 on ignored rows; None for probability targets.
    b: the dense-term weight (eps / C, or 1 for probability targets); 0 means no dense term.
    """

    a: Tensor | None
    b: float
    z_loss: float

    def rows(self, r0: int, r1: int) -> RowTerms:
        return RowTerms(self.a[r0:r1] if self.a is not None else None, self.b, self.z_loss)

    def loss(self, lse: Tensor, target_logit: Tensor | None, dense_ce: Tensor | None) -> Tensor:
        """Row losses a (lse - z_y) + b <u, lse - z> + z_loss lse^2.

        lse - z_y >= 0 exactly; without the max shift, exp's last-bit rounding can push a confident row's
        value a few 1e-8 below 0 (torch's shifted form lands on 0 there), so it is clamped (NaN stays NaN).
        """
        out = self.a * (lse - target_logit).clamp_min(0) if self.a is not None else torch.zeros_like(lse)
        if self.b:
            out = out + self.b * dense_ce
        if self.z_loss:
            out = out + self.z_loss * lse * lse
        return out

    def gradient_coefs(self, scale: Tensor, dense_mass: Tensor | float | None):
        """Per-row coefficients of the gradient, `scale` being d(reduced loss)/d(row loss):

            (softmax, zloss, target, dense):  dloss/dz = (softmax + zloss * lse) * p - target * onehot - dense * u

        None where a term is absent. None of them depends on lse, so they are formed before the pass.
        """
        softmax = self.a if self.a is not None else torch.zeros_like(scale)
        if self.b:
            softmax = softmax + self.b * dense_mass
        zloss = scale * (2.0 * self.z_loss) if self.z_loss else None
        target = scale * self.a if self.a is not None else None
        dense = scale * self.b if self.b else None
        return scale * softmax, zloss, target, dense


class ChunkCoefficients:
    """The gradient coefficients (RowTerms.gradient_coefs) of a batch, handed out chunk by chunk.

    With a dense mass U shared by all rows (class-index targets) they are formed once for all rows; a
    per-row U (probability targets) is filled in by the pass, chunk by chunk, before the chunk asks.

    lse: the rows' global log-sum-exp when the workspace holds only one block of the classes (a rank's
    shard); `owned` then marks the rows whose target lies in this block. Without lse the workspace holds
    all classes and lse = shift + log(sumexp).
    """

    def __init__(
        self,
        terms: RowTerms,
        scale: Tensor,
        dense_mass,
        lse: Tensor | None = None,
        owned: Tensor | None = None,
        entropy: Tensor | None = None,
        entropy_value: Tensor | None = None,
    ):
        self.terms, self.scale, self.dense_mass, self.lse, self.owned = terms, scale, dense_mass, lse, owned
        # entropy: a per-row coefficient c, adding c * dH/dz = -c * p * (log p + H) to the gradient. With all
        # classes in the workspace the pass takes the rows' entropies H itself; with one block of them (a
        # global lse) it cannot, and entropy_value holds the rows' global H
        assert entropy is None or (lse is None) == (entropy_value is None)
        self.entropy, self.entropy_value = entropy, entropy_value
        self.per_row_mass = isinstance(dense_mass, Tensor) and dense_mass.dim() > 0
        self.all_rows = None if self.per_row_mass else terms.gradient_coefs(scale, dense_mass)

    def rows(self, r0: int, r1: int) -> tuple:
        """(softmax, zloss, target, dense, entropy) for rows r0:r1, as the Triton kernel takes them."""
        if self.all_rows is not None:
            softmax, zloss, target, dense = (t[r0:r1] if t is not None else None for t in self.all_rows)
        else:
            softmax, zloss, target, dense = self.terms.rows(r0, r1).gradient_coefs(
                self.scale[r0:r1], self.dense_mass[r0:r1]
            )
        if self.owned is not None and target is not None:
            target = target * self.owned[r0:r1]
        return softmax, zloss, target, dense, self.entropy[r0:r1] if self.entropy is not None else None

    def __call__(self, r0: int, r1: int, shift: Tensor, sumexp: Tensor, entropy_rel: Tensor | None = None):
        """(softmax_coef, target_coef, dense_coef, xlogy_coef) for gradient_ on rows r0:r1 holding
        e = exp(z - shift) (entropy_rel: their sum e * log e, when the gradient has an entropy term).

        softmax_coef includes exp(shift - lse), so that it multiplies the workspace's e. The entropy term
        -c p (log p + H), with p = e / s and H = log s - h / s (h = sum e log e), is
        -(c / s) e log e + (c h / s^2) e: its second part joins softmax_coef, its first is xlogy_coef."""
        softmax, zloss, target, dense, entropy = self.rows(r0, r1)
        lse = self.lse[r0:r1].to(shift.dtype) if self.lse is not None else None
        if zloss is not None:
            softmax = softmax + zloss * (lse if lse is not None else shift + sumexp.log())
        if lse is None:
            softmax = softmax / sumexp
        else:
            # p = k e with k = exp(shift - lse). A block where the row has no mass (all -inf: shift 0, e = 0)
            # gets k = 0, not exp(-lse), which overflows in fp32 for lse < -88 and makes 0 * inf = NaN
            k = torch.where(sumexp > 0, torch.exp(shift - lse), 0)
            softmax = softmax * k
        xlogy_coef = None
        if entropy is not None and lse is None:
            xlogy_coef = -entropy / sumexp
            softmax = softmax + entropy * (entropy_rel / sumexp) / sumexp  # not s * s: it may overflow
        elif entropy is not None:  # one block of the classes: log p + H = log e + (shift - lse + H)
            xlogy_coef = -entropy * k
            softmax = softmax + xlogy_coef * (shift - lse + self.entropy_value[r0:r1].to(shift.dtype))
        return softmax, target, dense, xlogy_coef


@dataclass(frozen=True)
class ClassBlock:
    """The classes a workspace holds, seen from the targets: all of them, or one rank's contiguous shard."""

    index: Tensor  # (rows,) the target's column within the block (0 where it is not in the block)
    owned: Tensor | None  # (rows,) bool, the target is in the block; None when the block is every class
    class_weight: Tensor | None  # (block size,) the block's class weights; None for all ones

    @staticmethod
    def shard(target: Tensor, valid: Tensor, class_weight: Tensor | None, start: int, size: int) -> ClassBlock:
        """The classes [start, start + size) (one rank's part of the vocabulary) for targets `target`."""
        owned = valid & (target >= start) & (target < start + size)
        weight = None
        if class_weight is not None:  # zero-padded where the block overhangs the weights (caught later)
            weight = class_weight.new_zeros(size)
            lo, hi = max(start, 0), min(start + size, class_weight.shape[0])
            if hi > lo:
                weight[lo - start : hi - start] = class_weight[lo:hi]
        return ClassBlock(torch.where(owned, target - start, 0).long(), owned, weight)


class IndexTargets:
    """Class-index targets of a batch: per-row facts and loss terms, O(rows) work, computed once.

    Shared by cross-entropy, linear cross-entropy and the vocab-parallel loss.
    """

    def __init__(
        self,
        target: Tensor,
        class_weight: Tensor | None,
        *,
        ignore_index: int,
        label_smoothing: float,
        z_loss: float,
        reduction: str,
        num_classes: int,
        dtype: torch.dtype,
    ):
        target = target.reshape(-1).long()  # uint8 targets compare as int64, as torch (-100 must not wrap)
        self.valid = target != ignore_index
        self.index = torch.where(self.valid, target, 0)  # ignored rows point at class 0, harmlessly
        # contiguous: the Triton kernel reads the weights (the smoothing term's u) with unit stride
        self.class_weight = class_weight.to(dtype).contiguous() if class_weight is not None else None
        w_y = (
            self.class_weight[self.index]
            if class_weight is not None and class_weight.numel()  # no classes: every row is ignored
            else torch.ones(target.shape, dtype=dtype, device=target.device)
        )
        self.target_weight = torch.where(self.valid, w_y, 0)  # w[y_i], 0 on ignored rows
        self.reduction = reduction
        self.denominator = self.target_weight.sum()  # torch's 'mean' denominator D
        eps = label_smoothing
        self.terms = RowTerms(
            a=(1.0 - eps) * self.target_weight, b=eps / num_classes if eps > 0 and num_classes else 0.0, z_loss=z_loss
        )
        # torch's smoothing term is eps / C times a sum over the classes: NaN for any batch when C = 0
        self.classless_smoothing = num_classes == 0 and eps > 0
        # U = sum_c w_c, the mass of the smoothing term
        self.dense_mass = self.class_weight.sum() if class_weight is not None else float(num_classes)

    @classmethod
    def from_options(
        cls, target: Tensor, class_weight: Tensor | None, options, num_classes: int, dtype: torch.dtype
    ) -> IndexTargets:
        """From a problem's Options (reduction, ignore_index, label_smoothing, z_loss)."""
        return cls(
            target,
            class_weight,
            ignore_index=options.ignore_index,
            label_smoothing=options.label_smoothing,
            z_loss=options.z_loss,
            reduction=options.reduction,
            num_classes=num_classes,
            dtype=dtype,
        )

    def block(self) -> ClassBlock:
        return ClassBlock(self.index, None, self.class_weight)

    def scale(self, upstream: Tensor | None = None) -> Tensor:
        """d(reduced loss)/d(row loss), times the upstream gradient: 1/D (mean) or 1, exactly 0 on ignored rows.

        A valid row over D = 0 gets 1/0 = inf, so its gradient is 0 * inf = NaN, as torch's. An ignored
        row stays exactly 0 whatever the upstream gradient (inf or NaN included), as torch's.
        """
        one = self.denominator.reciprocal() if self.reduction == "mean" else torch.ones_like(self.denominator)
        if upstream is not None:
            one = one * upstream.reshape(-1).to(one.dtype)
        return torch.where(self.valid, one, 0)

    def coefficients(
        self,
        scale: Tensor,
        lse: Tensor | None = None,
        block: ClassBlock | None = None,
        entropy: Tensor | None = None,
        entropy_value: Tensor | None = None,
    ):
        """The gradient coefficients for d(sum_i scale_i loss_i + entropy_i H_i)/dz (entropy: per row; with
        a block of the classes, its global lse and the rows' global entropies `entropy_value`)."""
        owned = block.owned if block else None
        return ChunkCoefficients(self.terms, scale, self.dense_mass, lse, owned, entropy, entropy_value)

    def row_losses(self, lse: Tensor, target_logit: Tensor, dense_ce: Tensor | None) -> Tensor:
        """Per-row losses (float64), 0 on ignored rows even when their logits are NaN."""
        return torch.where(self.valid, self.terms.loss(lse, target_logit.double(), dense_ce), 0)

    def block_losses(self, stats: RowStats) -> Tensor:
        """row_losses from the statistics of one pass over all classes."""
        lse = stats.lse()
        dense_ce = dense_cross_entropy(lse, stats.shift, self.dense_mass, stats.dense_rel) if self.terms.b else None
        return self.row_losses(lse, stats.target_logit, dense_ce)

    def reduce(self, loss_rows: Tensor) -> Tensor:
        return reduce_rows(loss_rows, self.reduction, self.denominator, self.classless_smoothing)


def reduce_rows(loss_rows: Tensor, reduction: str, denominator: Tensor, classless_smoothing: bool = False) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if classless_smoothing:  # see classless_losses: NaN even without rows
        total = torch.full_like(total, torch.nan)
    if reduction != "mean":
        return total
    # torch divides each part of the loss by D separately: with D = 0 its cross-entropy part is 0 / 0 = NaN,
    # so the mean is NaN, even where a smoothing term alone would give x / 0 = inf
    return torch.where(denominator == 0, torch.nan, total / denominator)


def finish_loss(problem, loss_rows: Tensor, denominator: Tensor) -> Tensor:
    """Reduce a Problem's per-row losses as the caller asked, in the compute dtype, then cast."""
    classless_smoothing = problem.num_classes == 0 and problem.options.label_smoothing > 0 and not problem.probabilities
    loss = reduce_rows(loss_rows.to(problem.compute_dtype), problem.options.reduction, denominator, classless_smoothing)
    loss = loss.reshape(problem.output_shape) if problem.options.reduction == "none" else loss
    return loss.to(problem.output_dtype)


def classless_stats(stats: RowStats) -> RowStats:
    """The statistics of rows without classes (no pass runs): sum exp = 0, so lse = -inf; no argmax (-1);
    entropy 0."""
    for t in (
        stats.shift,
        stats.sumexp,
        stats.target_logit,
        stats.dense_rel,
        stats.entropy_rel,
        stats.sumsq,
        stats.logit_sum,
    ):
        if t is not None:
            t.zero_()
    if stats.argmax is not None:
        stats.argmax.fill_(-1)
    return stats


def classless_losses(num_rows: int, label_smoothing: float, dtype: torch.dtype, device) -> Tensor:
    """Row losses when there are no classes: every target is ignored, so 0, except that torch's smoothing
    term divides by C = 0 and makes every row NaN (eps / 0 * 0)."""
    return torch.full((num_rows,), torch.nan if label_smoothing > 0 else 0.0, dtype=dtype, device=device)
