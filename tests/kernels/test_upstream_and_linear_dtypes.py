"""The GPU hot paths, checked where they run: the upstream-gradient scaling that backward does on the
gradient handed over from forward, and the dtypes linear cross-entropy's GEMMs run in.

On a CPU machine the Triton cases run through Triton's interpreter (conftest sets TRITON_INTERPRET=1);
on a GPU machine they run on CUDA, where the host-synchronisation check also runs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import xent
from xent import kernels
from xent.kernels.linear import chunk_rows, workspace_dtype

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_by_upstream_matches_an_fp32_product(monkeypatch, backend, dtype, per_row):
    monkeypatch.setenv("XENT_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    grad = (torch.randn(37, 3001, generator=gen) * 1e-3).to(dtype).to(DEVICE)
    up = torch.randn(37 if per_row else (), generator=gen)
    if per_row:
        up[::4] = 1.0  # rows with a unit upstream are left as they are, the others scaled
    up = up.to(DEVICE)
    expected = (grad.float() * (up.view(-1, 1) if per_row else up)).to(dtype)
    out = grad.clone()
    kernels.scale_by_upstream_(out, up, per_row=per_row)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_scales_every_row(monkeypatch, backend):
    """loss.sum().backward() hands reduction='none' an upstream expanded from a scalar (stride 0)."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    grad = torch.randn(6, 300).to(DEVICE)
    out = grad.clone()
    kernels.scale_by_upstream_(out, torch.tensor(3.0, device=DEVICE).expand(6), per_row=True)
    torch.testing.assert_close(out, grad * 3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_upstream_leaves_the_gradient_bit_for_bit(monkeypatch, backend):
    monkeypatch.setenv("XENT_BACKEND", backend)
    grad = torch.randn(5, 700).to(DEVICE)
    grad[0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    out = grad.clone()
    kernels.scale_by_upstream_(out, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(out.view(torch.int32), grad.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp16_gradient_scaler_upstream_stays_finite(monkeypatch, backend, reduction):
    """Under fp16 autocast the loss is fp32 and GradScaler's default 65536 (which does not fit in fp16)
    arrives as the upstream gradient: the scale must be applied in fp32 math."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 300, generator=gen).half().to(DEVICE)
    y = torch.randint(0, 300, (64,), generator=gen).to(DEVICE)
    ours = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = xent.cross_entropy(ours, y, reduction=reduction, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    (loss * 65536.0).sum().backward()
    ref = x.double().requires_grad_()
    (F.cross_entropy(ref, y, reduction=reduction, label_smoothing=0.1) * 65536.0).sum().backward()
    assert torch.isfinite(ours.grad).all()
    assert_close(ours.grad.double(), ref.grad, torch.float16, scale=2.0)


@pytest.mark.parametrize("upstream", [1.0, -2.5, 1e3])
def test_linear_cross_entropy_scalar_upstream_scales_every_gradient(upstream):
    gen = torch.Generator().manual_seed(2)
    x, w, b = (
        torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
        for s in ((12, 8), (40, 8), (40,))
    )
    y = torch.randint(0, 40, (12,), generator=gen).to(DEVICE)
    ours = torch.autograd.grad(xent.linear_cross_entropy(x, w, y, linear_bias=b) * upstream, (x, w, b))
    theirs = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), y) * upstream, (x, w, b))
    for a, e in zip(ours, theirs):
        assert_close(a, e)


class _GemmDtypes(TorchDispatchMode):
    """Records the dtypes of the matrices every matmul sees."""

    GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.GEMMS:
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
            self.seen.append((name, tuple(m.dtype for m in mats[-2:])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_runs_half_precision_gemms(monkeypatch, backend, dtype, bias):
    """bf16/fp16 heads: every GEMM (logits, input gradient, weight gradient) takes half inputs; the weight
    gradient still accumulates in fp32 (its result is checked against float64 below)."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 16, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(100, 16, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(100, generator=gen).to(dtype).to(DEVICE).requires_grad_() if bias else None
    y = torch.randint(0, 100, (48,), generator=gen).to(DEVICE)
    with _GemmDtypes() as mode:
        loss = xent.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1, memory_budget=16 * 100 * 2)
        loss.backward()
    assert len(mode.seen) >= 3 * 2, mode.seen  # three GEMMs per chunk, several chunks
    assert all(d == (dtype, dtype) for _, d in mode.seen), mode.seen
    assert x.grad.dtype == w.grad.dtype == dtype
    if backend == "triton":
        assert workspace_dtype(torch.device(DEVICE), dtype) == dtype


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks", [8, 1])
@pytest.mark.slow
@pytest.mark.triton
def test_half_precision_weight_gradient_is_as_precise_as_the_naive_path(monkeypatch, dtype, chunks):
    """Against float64, over many chunks (an fp32 accumulator) or one (one GEMM into the head's dtype): the
    weight and input gradients are no worse than the plain `F.cross_entropy((x @ W.T).float(), y)` in the
    same dtype (one GEMM per gradient, fp32 accumulation)."""
    monkeypatch.setenv("XENT_BACKEND", "triton")
    gen = torch.Generator().manual_seed(4)
    n, h, v = 256, 64, 512
    x = torch.randn(n, h, generator=gen).to(dtype)
    w = (torch.randn(v, h, generator=gen) * 3 / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)

    def grads(fn, cast):
        xi, wi = (t.to(DEVICE).to(cast).clone().requires_grad_() for t in (x, w))
        fn(xi, wi, y.to(DEVICE)).backward()
        return xi.grad.double().cpu(), wi.grad.double().cpu()

    exact = grads(lambda a, b, t: F.cross_entropy(a @ b.T, t), torch.float64)
    naive = grads(lambda a, b, t: F.cross_entropy((a @ b.T).float(), t), dtype)
    budget = n // chunks * v * 2
    ours = grads(lambda a, b, t: xent.linear_cross_entropy(a, b, t, memory_budget=budget), dtype)

    def error(g, ref):
        return float((g - ref).norm() / ref.norm())

    for o, nv, e in zip(ours, naive, exact):
        assert error(o, e) <= 1.1 * error(nv, e), (error(o, e), error(nv, e))


def test_default_chunks_are_whole_gemm_tiles():
    assert chunk_rows(8192, 128256, torch.bfloat16, None) % 128 == 0
    assert chunk_rows(8192, 128256, torch.bfloat16, None) * 128256 * 2 <= 256 << 20
    assert chunk_rows(100, 50, torch.float32, None) == 100  # small problems: one chunk
    assert chunk_rows(1000, 100, torch.float32, 4 * 100 * 7) == 7  # an explicit budget is taken as given
    # on a GPU, computing the weight's gradient: chunks up to the size of its fp32 accumulator (V x H x 4)
    assert chunk_rows(8192, 128256, torch.bfloat16, None, accumulator_bytes=128256 * 4096 * 4) == 8192
    assert chunk_rows(65536, 128256, torch.bfloat16, None, accumulator_bytes=128256 * 4096 * 4) == 8192
    assert chunk_rows(65536, 128256, torch.bfloat16, None, accumulator_bytes=128256 * 8192 * 4) * 128256 * 2 <= 4 << 30


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.triton
@pytest.mark.cuda
def test_no_host_synchronisation_in_forward_and_backward():
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 4096, (256,), device="cuda")
    h = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for step in (
        lambda: xent.cross_entropy(x, y, label_smoothing=0.1).backward(),
        lambda: xent.cross_entropy(x, y, reduction="none").sum().backward(),
        lambda: xent.linear_cross_entropy(h, w, y).backward(),
        lambda: xent.cross_entropy(x, y, return_stats=("correct", "entropy", "lse"))[0].backward(),
        lambda: xent.linear_cross_entropy(h, w, y, return_stats=("logprob", "argmax"))[0].backward(),
        lambda: sum(t.sum() for t in xent.token_logprobs(h, w, y, return_entropy=True)).backward(),
    ):
        step()  # compile the kernels first (triton's launcher may synchronise once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.triton
@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    """Forward and backward of cross-entropy, linear cross-entropy (with statistics) and the RL
    log-probabilities captured in one CUDA graph, replayed on new inputs: the eager results."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 1000, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    h = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = torch.randn(1000, 32, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    y = torch.randint(0, 1000, (64,), device="cuda", generator=gen)

    def step():
        loss = xent.cross_entropy(x, y, label_smoothing=0.1)
        lin, stats = xent.linear_cross_entropy(h, w, y, return_stats=("lse", "correct"))
        logp, entropy = xent.token_logprobs(h, w, y, return_entropy=True)
        (loss + lin + logp.sum() * 1e-3 + entropy.sum() * 1e-3).backward()
        return loss, lin, stats.lse, logp, entropy

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: kernels compiled, allocator settled
            for t in (x, h, w):
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (x, h, w):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():  # new inputs in the same buffers
        for t in (x, h, w):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in captured] + [t.grad.clone() for t in (x, h, w)]
    for t in (x, h, w):
        t.grad = None
    eager = list(step()) + [t.grad for t in (x, h, w)]
    for a, b in zip(replayed, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
