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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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


def exp_rows_(workspace: Tensor, shift: Tensor, sumexp: Tensor, *, source: Tensor | None = None,
              unshifted: bool = False, dense: Tensor | None = None, dense_is_ones: bool = False,
              dense_out: Tensor | None = None) -> bool:
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


def log_sum_exp(shift: Tensor, sumexp: Tensor) -> Tensor:
    """lse = shift + log(sumexp), in float64: with shift = 0 the log carries the whole magnitude, and
    lse - z_y must not lose the small losses of confident rows to fp32 rounding."""
    return shift.double() + sumexp.double().log()


def merge_blocks(shift: Tensor, sumexp: Tensor) -> Tensor:
    """lse (float64) of rows whose classes are split in K blocks: shift and sumexp are (K, rows)."""
    block_lse = log_sum_exp(shift, sumexp)
    top = block_lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + torch.exp(block_lse - top).sum(0).log()


def gradient_(workspace: Tensor, softmax_coef: Tensor, *, target: Tensor | None = None,
              target_coef: Tensor | None = None, dense: Tensor | None = None, dense_coef: Tensor | None = None,
              chain: Tensor | None = None) -> None:
    """workspace (holding e = exp(z - shift)) <- (softmax_coef * e - target_coef * onehot - dense_coef * u) * chain.

    softmax_coef must already include exp(shift - lse), so that softmax_coef * e is the scaled softmax.
    Every coefficient is per row, shape (rows,). With dense=None and a dense_coef, u is all ones.
    """
    workspace.mul_(softmax_coef.unsqueeze(1))
    if target is not None:
        workspace.scatter_add_(1, target, target_coef.neg().unsqueeze(1))
    if dense_coef is not None:
        if dense is None:
            workspace.sub_(dense_coef.unsqueeze(1))
        else:
            workspace.addcmul_(dense_coef.unsqueeze(1), dense if dense.dim() == 2 else dense.unsqueeze(0),
                               value=-1.0)
    if chain is not None:
        workspace.mul_(chain)


@dataclass(frozen=True)
class RowTerms:
    """The coefficients a, b, z_loss of the loss above for a set of rows.

    a: (rows,) target-term weight (1 - eps) * w[y], 0 on ignored rows; None for probability targets.
    b: the dense-term weight (eps / C, or 1 for probability targets); 0 means no dense term.
    """

    a: Tensor | None
    b: float
    z_loss: float

    def rows(self, r0: int, r1: int) -> "RowTerms":
        return RowTerms(self.a[r0:r1] if self.a is not None else None, self.b, self.z_loss)

    def loss(self, lse: Tensor, target_logit: Tensor | None, shift: Tensor, dense_mass,
             dense_rel: Tensor | None) -> Tensor:
        """Row losses a (lse - z_y) + b (U (lse - shift) - <u, z - shift>) + z_loss lse^2."""
        out = self.a * (lse - target_logit) if self.a is not None else torch.zeros_like(lse)
        if self.b:
            out = out + self.b * (dense_mass * (lse - shift) - dense_rel)
        if self.z_loss:
            out = out + self.z_loss * lse * lse
        return out

    def gradient_coefs(self, lse: Tensor | None, scale: Tensor, dense_mass: Tensor | float | None):
        """(softmax, target, dense) coefficients of the gradient; `scale` is d(reduced loss)/d(row loss).

        lse is only needed with z_loss, so without it the coefficients can be formed before the pass.
        """
        softmax = self.a if self.a is not None else torch.zeros_like(scale)
        if self.b:
            softmax = softmax + self.b * dense_mass
        if self.z_loss:
            softmax = softmax + (2.0 * self.z_loss) * lse
        target = scale * self.a if self.a is not None else None
        dense = scale * self.b if self.b else None
        return scale * softmax, target, dense


class ChunkCoefficients:
    """Gradient coefficients for chunks of rows (see RowTerms.gradient_coefs), divided by the chunk's sums.

    Without z_loss, and with a dense mass U shared by all rows (class-index targets), they do not depend
    on the pass, so they are formed once for all rows before it. A per-row U (probability targets) is
    filled in by the pass, chunk by chunk, before the chunk asks for its coefficients.
    """

    def __init__(self, terms: RowTerms, scale: Tensor, dense_mass):
        self.terms, self.scale, self.dense_mass = terms, scale, dense_mass
        self.per_row_mass = isinstance(dense_mass, Tensor) and dense_mass.dim() > 0
        self.early = None if terms.z_loss or self.per_row_mass else terms.gradient_coefs(None, scale, dense_mass)

    def __call__(self, r0: int, r1: int, shift: Tensor, sumexp: Tensor):
        """(softmax_coef, target_coef, dense_coef) for rows r0:r1; shift, sumexp are those rows' stats."""
        if self.early is not None:
            softmax, target, dense = (t[r0:r1] if t is not None else None for t in self.early)
        else:
            mass = self.dense_mass[r0:r1] if self.per_row_mass else self.dense_mass
            lse = shift + sumexp.log() if self.terms.z_loss else None
            softmax, target, dense = self.terms.rows(r0, r1).gradient_coefs(lse, self.scale[r0:r1], mass)
        return softmax / sumexp, target, dense


class IndexTargets:
    """Class-index targets of a batch: per-row facts and loss terms, O(rows) work, computed once.

    Shared by cross-entropy, linear cross-entropy and the vocab-parallel loss.
    """

    def __init__(self, target: Tensor, class_weight: Tensor | None, *, ignore_index: int,
                 label_smoothing: float, z_loss: float, reduction: str, num_classes: int, dtype: torch.dtype):
        target = target.reshape(-1)
        self.valid = target != ignore_index
        self.index = torch.where(self.valid, target, 0).long()  # ignored rows point at class 0, harmlessly
        self.class_weight = class_weight.to(dtype) if class_weight is not None else None
        w_y = self.class_weight[self.index] if class_weight is not None else \
            torch.ones(target.shape, dtype=dtype, device=target.device)
        self.target_weight = torch.where(self.valid, w_y, 0)  # w[y_i], 0 on ignored rows
        self.reduction = reduction
        self.denominator = self.target_weight.sum()  # torch's 'mean' denominator D
        eps = label_smoothing
        self.terms = RowTerms(a=(1.0 - eps) * self.target_weight, b=eps / num_classes if eps > 0 else 0.0,
                              z_loss=z_loss)
        # U = sum_c w_c, the mass of the smoothing term
        self.dense_mass = self.class_weight.sum() if class_weight is not None else float(num_classes)

    def scale(self, upstream: Tensor | None = None) -> Tensor:
        """d(reduced loss)/d(row loss), times the upstream gradient: 1/D (mean) or 1, exactly 0 on ignored rows.

        A valid row over D = 0 gets 1/0 = inf, so its gradient is 0 * inf = NaN, as torch's.
        """
        one = self.denominator.reciprocal() if self.reduction == "mean" else torch.ones_like(self.denominator)
        scale = torch.where(self.valid, one, 0)
        return scale if upstream is None else scale * upstream.reshape(-1).to(scale.dtype)

    def coefficients(self, scale: Tensor) -> ChunkCoefficients:
        return ChunkCoefficients(self.terms, scale, self.dense_mass)

    def row_losses(self, shift: Tensor, sumexp: Tensor, target_logit: Tensor, dense_rel: Tensor | None) -> Tensor:
        """Per-row losses (float64), 0 on ignored rows even when their logits are NaN."""
        loss = self.terms.loss(log_sum_exp(shift, sumexp), target_logit.double(), shift, self.dense_mass, dense_rel)
        return torch.where(self.valid, loss, 0)

    def reduce(self, loss_rows: Tensor) -> Tensor:
        return reduce_rows(loss_rows, self.reduction, self.denominator)


def reduce_rows(loss_rows: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / denominator if reduction == "mean" else total
