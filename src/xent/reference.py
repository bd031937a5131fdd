"""Cross-entropy written straight from the formulas, in float64: the executable form of docs/formulas.md.

Readable rather than fast: it builds log-softmax and the smoothed target over the whole batch. Tests and
`xent verify` use it as a second oracle beside torch, and xent differentiates it (in the input's compute
dtype) for the rare gradients its fused kernel does not produce: double backward, and gradients with
respect to a probability target or class weights. It expects arguments the public API has validated.

Notation: rows i, classes c, lp = log_softmax(z) over classes, w = class weights (ones if None),
eps = label_smoothing, C = number of classes, v_i = [y_i != ignore_index].
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_softmax(z: Tensor, dim: int = -1) -> Tensor:
    """lp = z - max - log(sum(exp(z - max))): the max only keeps exp() finite, it cancels exactly."""
    shifted = z - z.amax(dim, keepdim=True).detach()
    return shifted - shifted.exp().sum(dim, keepdim=True).log()


def logsumexp(z: Tensor, dim: int = -1) -> Tensor:
    m = z.amax(dim, keepdim=True).detach()
    return (m + (z - m).exp().sum(dim, keepdim=True).log()).squeeze(dim)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
    temperature: float = 1.0,
) -> Tensor:
    """torch.nn.functional.cross_entropy's value (plus xent's z_loss and softcap), computed in `dtype`,
    of the logits z = softcap * tanh(input / softcap) (without softcap: the input), divided by `temperature`.

    class indices (input.shape != target.shape):
        l_i = v_i * [ (1-eps) * w[y_i] * (-lp[i, y_i])  +  (eps/C) * sum_c w[c] * (-lp[i, c])  +  z_loss * lse_i^2 ]
        mean = sum_i l_i / sum_i v_i * w[y_i]
    class probabilities P (same shape as input):
        T = (1-eps) * P + eps/C;   l_i = -sum_c w[c] * T[i, c] * lp[i, c]  +  z_loss * lse_i^2
        mean = sum_i l_i / (number of rows)
    """
    class_dim = 0 if input.dim() == 1 else 1
    z = input.to(dtype).movedim(class_dim, -1)  # rows x classes, class dimension last
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    num_classes = z.shape[-1]
    w = weight.to(dtype) if weight is not None else torch.ones(num_classes, dtype=dtype, device=z.device)
    eps = label_smoothing if label_smoothing > 0 else 0.0
    lp = log_softmax(z)
    lse = logsumexp(z)

    if input.shape == target.shape:  # class probabilities
        p = target.to(dtype).movedim(class_dim, -1)
        t = (1 - eps) * p + eps / num_classes if eps > 0 else p
        loss = -(w * t * lp).sum(-1) + z_loss * lse**2
        denominator = loss.numel()
    else:  # class indices
        target = target.long()
        valid = target != ignore_index
        y = torch.where(valid, target, 0)
        nll = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        smooth = -(w * lp).sum(-1)
        w_y = torch.where(valid, w.gather(0, y.reshape(-1)).reshape(y.shape), 0)  # not w[y]: vmap-safe
        loss = torch.where(valid, (1 - eps) * w_y * nll + (eps / num_classes) * smooth + z_loss * lse**2, 0)
        denominator = w_y.sum()

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """l_i = -v_i * w[y_i] * input[i, y_i];  mean = sum_i l_i / sum_i v_i * w[y_i]."""
    class_dim = 0 if input.dim() == 1 else 1
    x = input.to(dtype).movedim(class_dim, -1)
    w = weight.to(dtype) if weight is not None else torch.ones(x.shape[-1], dtype=dtype, device=x.device)
    target = target.long()
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    w_y = torch.where(valid, w.gather(0, y.reshape(-1)).reshape(y.shape), 0)  # not w[y]: vmap-safe
    loss = torch.where(valid, -w_y * x.gather(-1, y.unsqueeze(-1)).squeeze(-1), 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / w_y.sum()


def linear_cross_entropy(
    input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None = None, **options
) -> Tensor:
    """cross_entropy(input @ linear_weight.T + linear_bias, target) over the last dimension of input."""
    logits = input.to(torch.float64) @ linear_weight.to(torch.float64).T
    if linear_bias is not None:
        logits = logits + linear_bias.to(torch.float64)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), **options).reshape(
        target.shape if options.get("reduction") == "none" else ()
    )


def token_statistics(
    input: Tensor,
    target: Tensor,
    statistics: tuple,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
    temperature: float = 1.0,
) -> dict:
    """The per-token statistics of `return_stats=`, straight from their definitions, per row (the shape of
    reduction='none'), with z the (softcapped) logits in `dtype`, divided by `temperature`:

        lse = log sum_c exp(z_c)            logprob = lp[y] (0 where y is ignored)
        entropy = -sum_c p_c lp_c           z_loss = z_loss * lse^2 (0 where y is ignored)
        argmax = the first c of max z       correct = argmax == y (False where y is ignored)
        sum_sq_probs = sum_c p_c^2          mean_logit = sum_c z_c / C
        (the argmax of the logits before the cap: the cap is monotone, and fp32 saturates it to ties)

    For probability targets (target.shape == input.shape) every row counts; logprob and correct need
    class indices."""
    class_dim = 0 if input.dim() == 1 else 1
    raw = input.to(dtype).movedim(class_dim, -1)
    z = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
    z = z / temperature if temperature != 1.0 else z
    lse = logsumexp(z)
    indices = input.shape != target.shape
    # uint8 targets compare as int64: -100 must not wrap to class 156
    valid = target.long() != ignore_index if indices else torch.ones(lse.shape, dtype=torch.bool, device=z.device)
    safe = torch.where(valid, target.long(), 0) if indices else None
    out = {}
    for name in statistics:
        if name == "lse":
            out[name] = lse
        elif name == "logprob":
            picked = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) if z.shape[-1] else torch.zeros_like(lse)
            out[name] = torch.where(valid, picked - lse, 0)
        elif name == "entropy":
            lp = log_softmax(z)
            p = lp.exp()
            out[name] = -torch.where(p > 0, p * lp, 0).sum(-1)  # 0 log 0 = 0; no classes: 0
        elif name == "z_loss":
            out[name] = torch.where(valid, z_loss * lse * lse, 0)
        elif name == "sum_sq_probs":
            out[name] = log_softmax(z).mul(2).exp().sum(-1)  # no classes: 0
        elif name == "mean_logit":
            out[name] = z.mean(-1)
        elif name == "argmax":  # of the raw logits (the cap is monotone)
            out[name] = raw.argmax(-1) if z.shape[-1] else torch.full(lse.shape, -1, device=z.device)
        elif name == "correct":
            top = raw.argmax(-1) if z.shape[-1] else torch.full(lse.shape, -1, device=z.device)
            out[name] = valid & (top == safe)
    return out
