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
