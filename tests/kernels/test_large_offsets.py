"""More than 2^31 elements and bytes (issue 20, item 7): 32-bit index arithmetic would wrap there.

- the portable path end to end, above 2^31 elements (bf16 logits, 4.3 GB) and above 2^31 bytes (fp32), and
  linear cross-entropy whose N x V logits exceed 2^31 elements (never materialized). The far rows (those
  whose first element lies beyond 2^31) are checked against float64 formulas; slow-marked, within the CI
  machine's 24 GB.
- the Triton kernels' index arithmetic: test_large_offsets_triton.py.

The logits are periodic in the row index with a period of 1000 rows, not a power of two: an offset that
wrapped by 2^32 elements would land on a different row of the period, so a wrapped read cannot pass.
"""

from __future__ import annotations

import pytest
import torch

import xent

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PERIOD = 1000


def _periodic_logits(n, c, dtype, device=DEVICE, seed=0):
    base = (torch.randn(PERIOD, c, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype).to(device)
    x = torch.empty(n, c, dtype=dtype, device=device)
    full = n // PERIOD * PERIOD
    x[:full].view(-1, PERIOD, c).copy_(base.expand(n // PERIOD, PERIOD, c))
    x[full:] = base[: n - full]
    return x, base


def _targets(n, c, device=DEVICE):
    return (torch.arange(n, device=device) * 7919 + 13) % c


def _far_rows(n, c, itemsize=1):
    """The first rows, the rows around element 2^31 and byte 2^31 (where there are that many), and the
    last rows: a few dozen, so that their float64 reference stays small."""
    picked = [torch.arange(3), torch.arange(n - 8, n)]
    for first_far in {(2**31) // c, (2**31) // (c * itemsize)}:
        if first_far < n:
            picked.append(torch.arange(first_far - 2, min(first_far + 6, n)))
    return torch.unique(torch.cat(picked))


def _row_reference(base, rows, target):
    z = base[rows % PERIOD].double().cpu()
    t = target[rows].cpu()
    lse = z.logsumexp(-1)
    loss = lse - z.gather(1, t[:, None])[:, 0]
    grad = (z - lse[:, None]).exp()
    grad[torch.arange(len(rows)), t] -= 1
    return loss, grad


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,n,c",
    [
        (torch.bfloat16, 65544, 32768),  # 2^31 + 262144 elements (4.3 GB of logits, as much of gradient)
        (torch.float32, 16400, 32768),  # 5.4e8 elements, 2^31 + 524288 bytes
    ],
)
def test_portable_cross_entropy_above_2_31(dtype, n, c):
    assert n * c > 2**31 or n * c * dtype.itemsize > 2**31
    x, base = _periodic_logits(n, c, dtype)
    target = _targets(n, c)
    x.requires_grad_()
    loss = xent.cross_entropy(x, target, reduction="none", backend="torch")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    rows = _far_rows(n, c, dtype.itemsize)
    ref_loss, ref_grad = _row_reference(base, rows, target)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach()[rows].double().cpu(), ref_loss, **tol)
    torch.testing.assert_close(grad[rows].double().cpu(), ref_grad, **tol)
    # and the mean over every row: the far rows are counted, once each
    mean = xent.cross_entropy(x.detach(), target, backend="torch")
    torch.testing.assert_close(mean.double().cpu(), loss.detach().double().mean().cpu(), **tol)


@pytest.mark.slow
def test_linear_cross_entropy_logits_above_2_31_elements():
    """N x V = 2^31 + 262144 logits, never materialized: chunks start beyond 2^31."""
    n, v, hdim = 65544, 32768, 16
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(n, hdim, generator=gen).bfloat16().to(DEVICE).requires_grad_()
    w = (torch.randn(v, hdim, generator=gen) / 2).bfloat16().to(DEVICE).requires_grad_()
    target = _targets(n, v)
    loss = xent.linear_cross_entropy(h, w, target, reduction="none", backend="torch")
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), torch.ones_like(loss))
    rows = _far_rows(n, v)
    z = h.detach()[rows].double().cpu() @ w.detach().double().cpu().T
    t = target[rows].cpu()
    lse = z.logsumexp(-1)
    ref_loss = lse - z.gather(1, t[:, None])[:, 0]
    p = (z - lse[:, None]).exp()
    p[torch.arange(len(rows)), t] -= 1
    ref_grad_h = p @ w.detach().double().cpu()
    torch.testing.assert_close(loss.detach()[rows].double().cpu(), ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_h[rows].double().cpu(), ref_grad_h, rtol=2e-2, atol=2e-2)
    assert torch.isfinite(grad_w).all()
    # grad_w's column sums: sum_i (p_i - onehot_i) summed over classes is 0 for every row, so the rows of
    # grad_w (one per class) add up to sum_i h_i * 0 = 0 in exact arithmetic
    torch.testing.assert_close(
        grad_w.double().sum(0).cpu(), torch.zeros(hdim, dtype=torch.float64), atol=n * 1e-3, rtol=0
    )
