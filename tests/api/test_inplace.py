"""cross_entropy(inplace=True): the gradient written over the logits, with autograd told.

Against inplace=False (the same kernels): the same loss (to the last bits: on CPU the in-place pass always
takes the max shift) and the same gradient, which the logits hold afterwards; the version counter bumped,
so a saved use of the logits raises autograd's error; what it refuses (leaf logits, target or weight
gradients, a second backward, create_graph); the peak memory of one step, measured in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
CASES = [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3),
    dict(softcap=5.0),
    dict(weight=True, ignore_index=2),
    dict(probabilities=True, label_smoothing=0.2),
    dict(spatial=True),
]


def _case(dtype, case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(case)
    shape = (6, 40, 3) if kw.pop("spatial", False) else (37, 40)
    base = (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)
    if kw.pop("probabilities", False):
        target = torch.randn(*shape, generator=gen).softmax(1).to(dtype).to(DEVICE)
    else:
        target = torch.randint(0, 40, (shape[0], *shape[2:]), generator=gen).to(DEVICE)
        target.view(-1)[::5] = kw.get("ignore_index", -100)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(40, generator=gen) + 0.5).to(dtype).to(DEVICE)
    return base, target, kw


def _tolerance(dtype):
    return torch.float32 if dtype == torch.float32 else dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c) or "plain")
def test_inplace_gives_the_same_loss_and_gradient(backend, dtype, reduction, case):
    base, target, kw = _case(dtype, case)
    leaf = base.clone().requires_grad_()
    ref_leaf = base.clone().requires_grad_()
    logits = leaf * 1  # not a leaf: the logits a head computed
    loss = xent.cross_entropy(logits, target, reduction=reduction, inplace=True, backend=backend, **kw)
    ref = xent.cross_entropy(ref_leaf * 1, target, reduction=reduction, backend=backend, **kw)
    assert_close(loss, ref.detach(), _tolerance(dtype))
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.dtype).to(DEVICE) + 0.5
    (g,) = torch.autograd.grad(loss, leaf, up)
    (r,) = torch.autograd.grad(ref, ref_leaf, up)
    assert_close(g, r, _tolerance(dtype))
    assert torch.equal(logits.detach(), g)  # the logits hold the gradient now


def test_the_logits_version_is_bumped_and_a_saved_use_raises():
    w = torch.randn(30, 8, requires_grad=True, device=DEVICE)
    h = torch.randn(12, 8, device=DEVICE)
    y = torch.randint(0, 30, (12,), device=DEVICE)
    logits = h @ w.T
    before = logits._version
    xent.cross_entropy(logits, y, inplace=True)
    assert logits._version > before
    capped = torch.tanh(h @ w.T)  # tanh saves its output for backward
    loss = xent.cross_entropy(capped, y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    z = h @ w.T
    square = (z * z).sum()  # saves z (a use before the loss; one after it reads the gradient: consumed)
    loss = xent.cross_entropy(z, y, inplace=True) + square
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_what_inplace_refuses():
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        xent.cross_entropy(torch.randn(4, 5, requires_grad=True, device=DEVICE), y, inplace=True)
    base = torch.randn(4, 5, requires_grad=True, device=DEVICE)
    probs = torch.rand(4, 5, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="target or the class weights"):
        xent.cross_entropy(base * 1, probs, inplace=True)
    loss = xent.cross_entropy(base * 1, y, inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    loss = xent.cross_entropy(base * 1, y, inplace=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, base, create_graph=True)


def test_without_gradients_the_logits_are_left_alone():
    logits = torch.randn(6, 9, device=DEVICE)
    before = logits.clone()
    y = torch.randint(0, 9, (6,), device=DEVICE)
    loss = xent.cross_entropy(logits, y, inplace=True)
    assert torch.equal(logits, before) and torch.equal(loss, xent.cross_entropy(before, y))
    with torch.no_grad():
        base = torch.randn(6, 9, device=DEVICE, requires_grad=True)
        z = base * 1
        xent.cross_entropy(z, y, inplace=True)
        assert torch.equal(z, base)


def test_strided_logits_get_their_gradient_in_place():
    base = torch.randn(40, 11, requires_grad=True, device=DEVICE)
    y = torch.randint(0, 40, (11,), device=DEVICE)
    logits = (base * 1).t()  # (11, 40), not contiguous
    loss = xent.cross_entropy(logits, y, reduction="none", inplace=True)
    up = torch.rand(11, device=DEVICE)
    (g,) = torch.autograd.grad(loss, base, up)
    ref_base = base.detach().clone().requires_grad_()
    (r,) = torch.autograd.grad(xent.cross_entropy(ref_base.t(), y, reduction="none"), ref_base, up)
    assert_close(g, r, torch.float32)
    assert torch.equal(logits.detach(), g.t())


def test_the_module_takes_inplace():
    module = xent.CrossEntropyLoss(label_smoothing=0.1, inplace=True)
    assert "inplace=True" in repr(module)
    base = torch.randn(5, 7, requires_grad=True, device=DEVICE)
    y = torch.randint(0, 7, (5,), device=DEVICE)
    z = base * 1
    module(z, y).backward()
    ref = base.detach().clone().requires_grad_()
    xent.cross_entropy(ref, y, label_smoothing=0.1).backward()
    assert_close(base.grad, ref.grad, torch.float32)
    assert torch.equal(z.detach(), base.grad)


@pytest.mark.compile
def test_under_compile_the_logits_are_left_alone_and_gradients_match():
    base = torch.randn(9, 13, requires_grad=True, device=DEVICE)
    y = torch.randint(0, 13, (9,), device=DEVICE)

    def step(b):
        z = b * 2
        return xent.cross_entropy(z, y, inplace=True, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(compiled(base), base)
    (r,) = torch.autograd.grad(step(base), base)
    assert_close(g, r, torch.float32)


_PROBE = """
import json, sys, torch, xent
from xent.bench import peak_growth_of
n, c, dtype, inplace = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4] == "1"
base = torch.randn(n, c, dtype=dtype, requires_grad=True)
y = torch.randint(0, c, (n,))
def step():
    z = base * 1
    xent.cross_entropy(z, y, inplace=inplace).backward()
    base.grad = None
step()
z = base * 1  # the logits exist before the measured step, as a head's output would
def measured():
    return torch.autograd.grad(xent.cross_entropy(z, y, inplace=inplace), z)
peak, exact = peak_growth_of(measured, "cpu")
print(json.dumps({"peak": peak, "logits": z.numel() * z.element_size(), "exact": exact}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_of_a_step_in_a_fresh_process(dtype):
    """Beyond the logits, forward + backward: inplace=True holds (nearly) nothing (its gradient is the
    logits' storage), the default one gradient-sized buffer (the gradient it returns). torch.autograd.grad
    with respect to the logits: no leaf's gradient is accumulated on either side."""
    if DEVICE != "cpu":
        pytest.skip("resident-set measurement: the CPU")
    out = {}
    for inplace in ("0", "1"):
        args = [sys.executable, "-c", _PROBE, "2048", "8192", dtype, inplace]
        out[inplace] = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
    if not out["1"]["exact"]:
        pytest.skip("this kernel cannot reset the resident-set high-water mark")
    logits = out["1"]["logits"]
    assert out["0"]["peak"] >= 0.9 * logits
    assert out["1"]["peak"] <= 0.1 * logits + (1 << 22)
