"""The Triton backend: on CUDA tensors where there is a GPU, else through Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set by conftest.py before anything imports triton).

The same differential checks as the torch backend, on small shapes (the interpreter runs each program in
Python), for every option the Triton kernel serves: class-index targets with weights, ignore_index,
label smoothing, z_loss, softcap, every reduction, fp32/bf16/fp16; linear cross-entropy through it; and
the backend selection (XENT_BACKEND) with its errors, on both kinds of machine.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import xent
from xent import kernels

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.triton,
]
CUDA = torch.cuda.is_available()
# Where the Triton kernel runs here: the GPU, or (no GPU) CPU tensors through the interpreter.
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("XENT_BACKEND", "triton")


def _loss_and_grads(fn, x, y, up, **kw):
    xi = x.detach().clone().requires_grad_()
    loss = fn(xi, y, **kw)
    (g,) = torch.autograd.grad(loss, xi, up.to(loss.dtype)) if loss.numel() else (torch.zeros_like(xi),)
    return loss.detach(), g


def _reference(x, y, **kw):
    """The float64 formula, cast to the input dtype (torch itself has no z_loss/softcap)."""
    return xent.reference.cross_entropy(x, y, **kw).to(x.dtype)


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 6),
    c=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    use_weight=st.booleans(),
    ignore_index=st.sampled_from([-100, 1]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.3]),
    z_loss=st.sampled_from([0.0, 0.05]),
    softcap=st.sampled_from([None, 4.0]),
    unbatched=st.booleans(),
)
def test_cross_entropy_matches_the_formula(
    seed, n, c, dtype, use_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, unbatched
):
    gen = torch.Generator().manual_seed(seed)
    shape, batch = ((c,), ()) if unbatched else ((n, c), (n,))
    x = (torch.randn(shape, generator=gen) * 4).to(dtype).to(DEVICE)
    y = torch.randint(0, c, batch, generator=gen)
    if y.dim():
        y[::3] = ignore_index
    y = y.to(DEVICE)
    w = (torch.rand(c, generator=gen) + 0.2).to(dtype).to(DEVICE) if use_weight else None
    kw = dict(
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    up = torch.randn(() if reduction != "none" else batch, generator=gen).to(DEVICE)
    ours, g_ours = _loss_and_grads(xent.cross_entropy, x, y, up, **kw)
    theirs, g_theirs = _loss_and_grads(_reference, x, y, up, **kw)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert_close(ours, theirs, dtype, scale=2.0)
    assert_close(g_ours, g_theirs, dtype, scale=2.0)


@pytest.mark.parametrize("launch", [(16, 4, 1), (32, 4, 3), (64, 8, 0)])
def test_row_kernel_launch_shapes(monkeypatch, launch):
    """Blocks smaller than a row, and grids smaller than the rows (each program loops over rows), give the
    same loss and gradient: the launch shapes a GPU sweep may choose (benchmarks/sweep_rows.py)."""
    from xent.kernels import triton_rows

    monkeypatch.setattr(triton_rows, "LAUNCH_OVERRIDE", launch)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(11, 100, generator=gen) * 3).to(torch.bfloat16).to(DEVICE)
    y = torch.randint(0, 100, (11,), generator=gen)
    y[::4] = -100
    y = y.to(DEVICE)
    up = torch.randn(11, generator=gen).to(DEVICE)
    for kw in (dict(reduction="none"), dict(reduction="none", label_smoothing=0.1, softcap=5.0, z_loss=1e-3)):
        ours, g_ours = _loss_and_grads(xent.cross_entropy, x, y, up, **kw)
        theirs, g_theirs = _loss_and_grads(_reference, x, y, up, **kw)
        assert_close(ours, theirs, torch.bfloat16, scale=2.0)
        assert_close(g_ours, g_theirs, torch.bfloat16, scale=2.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(label_smoothing=0.2, weight=True), dict(reduction="none"), dict(ignore_index=2, reduction="sum")],
)
def test_cross_entropy_matches_torch_fp32(kwargs):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 53, generator=gen) * 3).to(DEVICE)
    y = torch.randint(0, 53, (7,), generator=gen).to(DEVICE)
    y[0] = 2
    kwargs = dict(kwargs)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(53, generator=gen).to(DEVICE)
    up = torch.randn(7 if kwargs.get("reduction") == "none" else (), generator=gen).to(DEVICE)
    ours, g_ours = _loss_and_grads(xent.cross_entropy, x, y, up, **kwargs)
    theirs, g_theirs = _loss_and_grads(F.cross_entropy, x, y, up, **kwargs)
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs)


def test_blocks_of_a_long_row_and_extreme_logits():
    """Rows longer than one block (online max across blocks), with logits far from zero and -inf."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5000, generator=gen) * 5
    x[0, 4321] = 120.0  # a late maximum: the running shift moves
    x[1] -= 500.0
    x[2, :100] = float("-inf")
    y = torch.tensor([4321, 7, 2000])
    for kw in (dict(), dict(label_smoothing=0.1)):
        ours, g_ours = _loss_and_grads(
            xent.cross_entropy, x.to(DEVICE), y.to(DEVICE), torch.tensor(1.0).to(DEVICE), **kw
        )
        theirs, g_theirs = _loss_and_grads(F.cross_entropy, x, y, torch.tensor(1.0), **kw)
        assert_close(ours.cpu(), theirs)
        assert_close(g_ours.cpu(), g_theirs)


def test_linear_cross_entropy_through_the_triton_kernel():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 8, generator=gen).to(DEVICE)
    w = torch.randn(30, 8, generator=gen).to(DEVICE)
    b = torch.randn(30, generator=gen).to(DEVICE)
    y = torch.randint(0, 30, (9,), generator=gen).to(DEVICE)
    y[3] = -100
    for kw in (dict(), dict(label_smoothing=0.2, z_loss=0.01), dict(softcap=5.0, reduction="none")):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        ref_params = [t.clone().requires_grad_() for t in (x, w, b)]
        ours = xent.linear_cross_entropy(params[0], params[1], y, linear_bias=params[2], memory_budget=4 * 30 * 4, **kw)
        logits = F.linear(*ref_params)
        theirs = xent.reference.cross_entropy(logits, y, **kw).float()
        assert_close(ours, theirs)
        up = torch.ones_like(ours)
        for a, e in zip(torch.autograd.grad(ours, params, up), torch.autograd.grad(theirs, ref_params, up)):
            assert_close(a, e)


def test_dispatch_uses_the_triton_kernel(monkeypatch):
    from xent.kernels import triton_rows

    calls = []
    original = triton_rows.rows_
    monkeypatch.setattr(triton_rows, "rows_", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    xent.cross_entropy(torch.randn(3, 5).to(DEVICE), torch.tensor([0, 1, 2]).to(DEVICE))
    assert calls, "XENT_BACKEND=triton did not reach the Triton kernel"


def test_probability_targets_and_k_dim_fall_back_to_the_portable_kernel(monkeypatch):
    from xent.kernels import triton_rows

    calls = []
    original = triton_rows.rows_
    monkeypatch.setattr(triton_rows, "rows_", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    # on DEVICE: with XENT_BACKEND=triton, CPU tensors are refused unless Triton's interpreter is on
    x = torch.randn(2, 5, 3).to(DEVICE)
    y = torch.randint(0, 5, (2, 3)).to(DEVICE)
    assert_close(xent.cross_entropy(x, y), F.cross_entropy(x, y))
    z, p = torch.randn(4, 5).to(DEVICE), torch.rand(4, 5).to(DEVICE)
    assert_close(xent.cross_entropy(z, p, label_smoothing=0.1), F.cross_entropy(z, p, label_smoothing=0.1))
    assert not calls, "probability targets / K-dim input reached the Triton kernel"


def test_backend_selection_and_errors(monkeypatch):
    """XENT_BACKEND and TRITON_INTERPRET, set explicitly here, so that the answers are the same on a machine
    with a GPU (where conftest.py leaves TRITON_INTERPRET unset) and without one (where it sets it)."""
    cpu = torch.device("cpu")
    cuda = torch.device("cuda")  # backend_for only looks at the device type: no GPU is touched

    def backend_for(*args):
        return kernels.backend_for(*args).name

    for interpret in ("1", None):
        if interpret is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        monkeypatch.setenv("XENT_BACKEND", "torch")
        assert backend_for(cpu) == backend_for(cuda) == "torch"
        monkeypatch.setenv("XENT_BACKEND", "auto")
        assert backend_for(cpu) == "torch"  # CPU tensors take the portable kernel in auto mode, interpreter or not
        assert backend_for(cuda) == "triton"  # CUDA tensors take the Triton kernel whenever triton is installed
        assert backend_for(cuda, torch.float64) == "torch"  # float64 always takes the torch backend
        monkeypatch.setenv("XENT_BACKEND", "triton")
        assert backend_for(cuda) == "triton"
        assert backend_for(cpu, torch.float64) == "torch"
        if interpret:
            assert backend_for(cpu) == "triton"  # CPU tensors through the interpreter
        else:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
                backend_for(cpu)
        monkeypatch.setenv("XENT_BACKEND", "cuda")
        with pytest.raises(ValueError, match="XENT_BACKEND must be one of"):
            backend_for(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("XENT_BACKEND", "triton")
    with monkeypatch.context() as m:  # as if triton were not installed
        m.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "triton" else object())
        for dev in (cpu, cuda):
            with pytest.raises(RuntimeError, match="not installed"):
                backend_for(dev)
        m.setenv("XENT_BACKEND", "auto")
        assert backend_for(cpu) == backend_for(cuda) == "torch"


@pytest.mark.slow
def test_cuda_benchmark_script_runs(tmp_path):
    """benchmarks/bench_cuda.py in its smoke mode: on the GPU where there is one, else on CPU tensors through
    Triton's interpreter (what CI checks)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cuda.py"
    env = dict(os.environ, XENT_BACKEND="triton")
    if CUDA:
        # the real thing: CUDA tensors and compiled kernels, never the interpreter
        env.pop("TRITON_INTERPRET", None)
        args = ["--device", "cuda"]
        if "--no-compile" in script.read_text():  # torch.compile's first compile would dominate a smoke run
            args.append("--no-compile")
    else:
        env["TRITON_INTERPRET"] = "1"
        args = ["--device", "cpu"]
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", *args, "--repeats", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 16 x 512 | bfloat16 | xent |" in done.stdout and "| 16, 32, 512 | bfloat16 | xent |" in done.stdout
