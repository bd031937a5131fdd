"""fp16 gradients under a gradient scaler's upstreams: nothing flushed that torch keeps.

A pure-fp16 model trains with a GradScaler: backward receives the loss's gradient scaled by 2^k (up to
2^15-2^16), so that the small entries of the logits' gradient survive fp16's range (2^-24..65504). A
gradient that forward stored already divided by the number of tokens ('mean'), and that backward only
then scales, has lost those entries before the scale arrives (91% of the nonzero entries at 2048 x 32000
with an upstream of 2^15). xent computes fp16 gradients in backward with the upstream folded into each
row's coefficients (problems.handover_keeps_range), one rounding from fp32.

Each case compares with the float64 gradient of the same fp16 values: the relative error (Frobenius) must
be no worse than 2x torch's own fp16 gradient's, and no more entries may come back 0 than in torch's
gradient among those whose exact value is at least fp16's smallest subnormal ("flushed"). Upstreams span
2^-14..2^15.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
UPSTREAMS = [2.0**-14, 2.0**-6, 1.0, 2.0**8, 2.0**15]


def _error_and_flushed(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    """(relative Frobenius error, entries that come back 0 where the exact value is at least fp16's smallest
    subnormal 2^-24: those lost their whole value; below it a last-bit difference decides either way)."""
    got = got.double()
    err = float((got - exact).norm() / exact.norm()) if exact.norm() > 0 else float((got - exact).norm())
    flushed = int(((got == 0) & (exact.abs() >= 2.0**-24)).sum())
    return err, flushed


def _grads(fn, tensors, upstream, dtype=None):
    leaves = [t.detach().clone().to(dtype or t.dtype).requires_grad_() for t in tensors]
    loss = fn(*leaves)
    up = torch.full_like(loss, upstream)
    return torch.autograd.grad(loss, leaves, up)


def _check(ours, theirs, exact, what, gemm=False):
    """`gemm`: the gradients are GEMM outputs (of a linear head), sums whose cancellation can land on 0 or
    not by a last bit on either side: a slack of 1 in 10^4 entries in the flush count (the fault this
    guards against flushed most of them)."""
    for g_ours, g_theirs, g_exact, name in zip(ours, theirs, exact, ("input", "weight")):
        err, flushed = _error_and_flushed(g_ours, g_exact)
        err_torch, flushed_torch = _error_and_flushed(g_theirs, g_exact)
        slack = g_exact.numel() // 10_000 if gemm else 0
        assert err <= 2 * err_torch + 1e-7, f"{what} {name}: relative error {err:.3g} (torch {err_torch:.3g})"
        assert flushed <= flushed_torch + slack, (
            f"{what} {name}: {flushed} entries flushed to 0 (torch {flushed_torch})"
        )


def _logits(rows: int, classes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, classes, generator=gen) * 2).half().to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("shape", ["many rows", "long rows", "both"])
def test_cross_entropy_keeps_what_torch_keeps(backend, reduction, upstream, shape):
    # on the CPU the Triton kernel runs through its interpreter (per program): smaller shapes there
    small = backend == "triton" and DEVICE == "cpu"
    rows, classes = {
        "many rows": (256, 8) if small else (4096, 8),
        "long rows": (2, 16384) if small else (4, 65536),
        "both": (32, 1024) if small else (256, 2048),
    }[shape]
    x = _logits(rows, classes)
    y = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y[::7] = -100

    def loss(fn, **kw):
        return lambda t: fn(t, y, reduction=reduction, **kw)

    exact = _grads(loss(F.cross_entropy), [x], upstream, torch.float64)
    theirs = _grads(loss(F.cross_entropy), [x], upstream)
    ours = _grads(loss(xent.cross_entropy, backend=backend), [x], upstream)
    _check(ours, theirs, exact, f"{backend} {reduction} {upstream} {rows}x{classes}")


@pytest.mark.slow
@pytest.mark.parametrize("upstream", [2.0**-14, 2.0**15])
def test_cross_entropy_at_the_reported_size(upstream):
    """The reported case: 2048 x 32000 fp16 logits, 'mean', a GradScaler's 2^15 (and the other end)."""
    x = _logits(2048, 32000)
    y = torch.randint(0, 32000, (2048,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    exact = _grads(lambda t: F.cross_entropy(t, y), [x], upstream, torch.float64)
    theirs = _grads(lambda t: F.cross_entropy(t, y), [x], upstream)
    ours = _grads(lambda t: xent.cross_entropy(t, y), [x], upstream)
    _check(ours, theirs, exact, f"2048x32000 {upstream}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_linear_cross_entropy_keeps_what_torch_keeps(backend, reduction, upstream):
    rows, hidden, vocab = (1024, 32, 4096) if backend == "torch" or DEVICE == "cuda" else (64, 16, 512)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=gen).half().to(DEVICE)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).half().to(DEVICE)
    y = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)

    def naive(a, b):
        return F.cross_entropy(a @ b.T, y, reduction=reduction)

    exact = _grads(naive, [h, w], upstream, torch.float64)
    theirs = _grads(naive, [h, w], upstream)
    # small chunks: the weight's gradient is accumulated over several of them
    ours = _grads(
        lambda a, b: xent.linear_cross_entropy(a, b, y, reduction=reduction, memory_budget=1 << 18, backend=backend),
        [h, w],
        upstream,
    )
    _check(ours, theirs, exact, f"linear {backend} {reduction} {upstream}", gemm=True)


@pytest.mark.compile
def test_compiled_cross_entropy_and_linear_keep_the_scale():
    """The traced routes: the custom ops' backward computes fp16 gradients with the upstream folded in."""
    x = _logits(512, 4096)
    y = torch.randint(0, 4096, (512,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    exact = _grads(lambda t: F.cross_entropy(t, y), [x], 2.0**15, torch.float64)
    theirs = _grads(lambda t: F.cross_entropy(t, y), [x], 2.0**15)
    compiled = torch.compile(lambda t: xent.cross_entropy(t, y), fullgraph=True)
    _check(_grads(compiled, [x], 2.0**15), theirs, exact, "compiled cross-entropy")

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(512, 32, generator=gen).half().to(DEVICE)
    w = (torch.randn(2048, 32, generator=gen) * 0.3).half().to(DEVICE)
    z = torch.randint(0, 2048, (512,), generator=gen).to(DEVICE)
    exact = _grads(lambda a, b: F.cross_entropy(a @ b.T, z), [h, w], 2.0**15, torch.float64)
    theirs = _grads(lambda a, b: F.cross_entropy(a @ b.T, z), [h, w], 2.0**15)
    compiled = torch.compile(lambda a, b: xent.linear_cross_entropy(a, b, z, memory_budget=1 << 18), fullgraph=True)
    _check(_grads(compiled, [h, w], 2.0**15), theirs, exact, "compiled linear cross-entropy", gemm=True)


@pytest.mark.parametrize("upstream", [2.0**-10, 2.0**15])
def test_linear_distillation_keeps_what_the_naive_loss_keeps(upstream):
    """The distillation losses store their gradients the same way: fp16 recomputes in backward too."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(512, 16, generator=gen).half().to(DEVICE)
    w = (torch.randn(3000, 16, generator=gen) * 0.3).half().to(DEVICE)
    teacher_logits = (torch.randn(512, 3000, generator=gen) * 2).half().to(DEVICE)
    teacher = xent.TeacherLogits(teacher_logits)

    def naive(a, b):
        log_p_s = F.log_softmax((a @ b.T).float(), -1)
        return F.kl_div(log_p_s, F.log_softmax(teacher_logits.float(), -1), log_target=True, reduction="batchmean")

    exact = _grads(naive, [h, w], upstream, torch.float64)
    theirs = _grads(naive, [h, w], upstream)
    ours = _grads(lambda a, b: xent.linear_distillation_loss(a, b, teacher, reduction="batchmean"), [h, w], upstream)
    _check(ours, theirs, exact, f"distillation {upstream}", gemm=True)


def test_bf16_and_fp32_keep_the_forward_gradient():
    """The unit-upstream handover stays where it is exact (bf16 has fp32's range): backward of a unit
    upstream leaves forward's gradient as it is, with no second pass over the logits."""
    x = torch.randn(64, 1000).bfloat16().to(DEVICE).requires_grad_()
    y = torch.randint(0, 1000, (64,)).to(DEVICE)
    loss = xent.cross_entropy(x, y)
    fn = loss.grad_fn
    assert len(fn.saved_tensors) == 1 and fn.saved_tensors[0] is not None  # the gradient, handed over
    loss.backward()
    reference = x.detach().float().requires_grad_()
    F.cross_entropy(reference, y).backward()
    torch.testing.assert_close(x.grad.float(), reference.grad, rtol=1e-2, atol=1e-5)

    h = torch.randn(64, 1000).half().to(DEVICE).requires_grad_()
    assert xent.cross_entropy(h, y).grad_fn.saved_tensors[0] is None  # fp16: computed in backward
