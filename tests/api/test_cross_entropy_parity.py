"""Differential tests: xent.cross_entropy against torch (and xent.reference) over random configurations.

Each example draws a layout (unbatched, (N, C), K-dim), dtype, target kind (indices or probabilities,
with their dtypes), class weights, ignore_index and how many targets use it, label smoothing, reduction,
a non-contiguous input, the chunk size of the kernel and a random upstream gradient; it then checks the
loss, every gradient torch defines, output dtype/shape, and that no input was modified.

Every test runs on each `device` (conftest.py): the CPU, and the GPU where there is one. Inputs are drawn
on the CPU and moved; torch's reference runs on the same device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, loosest, on
from hypothesis import given
from hypothesis import strategies as st

import xent
from xent.kernels import portable


@dataclass
class Case:
    input: torch.Tensor
    target: torch.Tensor
    kwargs: dict
    grad_target: bool
    grad_weight: bool
    chunk: int | None
    seed: int

    def __repr__(self) -> str:
        kw = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return (
            f"Case(input={tuple(self.input.shape)}/{self.input.dtype}/contig={self.input.is_contiguous()}, "
            f"target={tuple(self.target.shape)}/{self.target.dtype}, {kw}, grad_target={self.grad_target}, "
            f"grad_weight={self.grad_weight}, chunk={self.chunk}, seed={self.seed})"
        )


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64), probabilities=None, z_loss=False, softcap=False):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layout = draw(st.sampled_from(["unbatched", "2d", "2d", "kdim"]))
    c = draw(st.integers(1, 9))
    if layout == "unbatched":
        shape, batch = (c,), ()
    elif layout == "2d":
        n = draw(st.integers(0, 7))
        shape, batch = (n, c), (n,)
    else:
        n = draw(st.integers(0, 3))
        extra = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
        shape, batch = (n, c) + extra, (n,) + extra
    dtype = draw(st.sampled_from(dtypes))
    spread = draw(st.sampled_from([0.5, 3.0, 30.0]))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(dtype)
    if draw(st.booleans()):
        x = _strided(x)

    probs = draw(st.booleans()) if probabilities is None else probabilities
    weight = None
    if draw(st.booleans()):
        w_dtype = dtype if not probs else draw(st.sampled_from([dtype, torch.float32, torch.float64]))
        weight = (torch.rand(c, generator=gen, dtype=torch.float64) * 2).to(w_dtype)
    if probs:
        ignore_index = draw(st.sampled_from([-100, -1]))
        t_dtype = draw(st.sampled_from([dtype, torch.float32, torch.float64]))
        target = torch.rand(shape, generator=gen, dtype=torch.float64)
        if draw(st.booleans()):
            target = target / target.sum(0 if len(shape) == 1 else 1, keepdim=True)
        target = target.to(t_dtype)
    else:
        ignore_index = draw(st.sampled_from([-100, -1, 0, c - 1, c + 2]))
        target = torch.randint(0, c, batch, generator=gen)
        frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
        target[torch.rand(batch, generator=gen) < frac] = ignore_index
        if 0 <= ignore_index < 256 and draw(st.booleans()):
            target = target.to(torch.uint8)
    kwargs = dict(
        weight=weight,
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.45, 1.0, -0.3])),
    )
    if z_loss:
        kwargs["z_loss"] = draw(st.sampled_from([0.0, 1e-3, 0.5]))
    if softcap:
        kwargs["softcap"] = draw(st.sampled_from([None, 1.0, 30.0]))
    grad_target = probs and draw(st.booleans())
    grad_weight = probs and weight is not None and draw(st.booleans())
    chunk = draw(st.sampled_from([None, 1, 3, 8, 40]))
    return Case(x, target, kwargs, grad_target, grad_weight, chunk, seed)


@contextlib.contextmanager
def chunk_budget(elements: int | None):
    saved = portable.CHUNK_ELEMENTS
    portable.CHUNK_ELEMENTS = elements or saved
    try:
        yield
    finally:
        portable.CHUNK_ELEMENTS = saved


def on_device(case: Case, device) -> Case:
    """The case with its tensors on `device` (the same object on the CPU); strides are kept."""
    x, t, w = on(device, case.input, case.target, case.kwargs["weight"])
    if x is case.input:
        return case
    return Case(x, t, dict(case.kwargs, weight=w), case.grad_target, case.grad_weight, case.chunk, case.seed)


def run(fn, case: Case, upstream_seed: int):
    """Loss and gradients (input, target?, weight?) of fn under a random upstream gradient."""
    x = case.input.detach().requires_grad_()  # detach keeps the (possibly non-contiguous) strides
    t = case.target.detach().requires_grad_(case.grad_target)
    kwargs = dict(case.kwargs)
    if kwargs["weight"] is not None:
        kwargs["weight"] = kwargs["weight"].detach().requires_grad_(case.grad_weight)
    loss = fn(x, t, **kwargs)
    gen = torch.Generator().manual_seed(upstream_seed)  # drawn on the CPU: the same values on every device
    upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(device=loss.device, dtype=loss.dtype)
    wrt = [x] + ([t] if case.grad_target else []) + ([kwargs["weight"]] if case.grad_weight else [])
    grads = torch.autograd.grad(loss, wrt, upstream) if loss.numel() else [torch.zeros_like(w) for w in wrt]
    return loss.detach(), [g.detach() for g in grads]


def check_case(case: Case, torch_fn=F.cross_entropy, device="cpu"):
    case = on_device(case, device)
    before = [case.input.clone(), case.target.clone()] + (
        [case.kwargs["weight"].clone()] if case.kwargs["weight"] is not None else []
    )
    with chunk_budget(case.chunk):
        ours, our_grads = run(xent.cross_entropy, case, case.seed)
    # torch 2.13 fails on some uint8-target paths (K-dim backward, weight + smoothing): its int64 twin
    # has the same meaning, so it is the oracle there. xent takes uint8 everywhere.
    theirs, their_grads = run(
        lambda x, t, **kw: torch_fn(x, t.long() if t.dtype == torch.uint8 else t, **kw), case, case.seed
    )

    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, repr(case)
    low_precision = case.input.dtype in (torch.bfloat16, torch.float16)
    # torch's precision is bounded by its least precise argument even when the output is promoted:
    # float32 logits with float64 probabilities run log_softmax in float32, a float32 target is
    # smoothed in float32. xent computes in the promoted dtype.
    args = [case.input] + [t for t in (case.target, case.kwargs["weight"]) if t is not None and t.is_floating_point()]
    floor = loosest(*(t.dtype for t in args))
    assert_close(ours, theirs, loosest(floor, theirs.dtype), msg=repr(case))
    for name, g_ours, g_theirs in zip(["input", "target", "weight"], our_grads, their_grads):
        assert g_ours.dtype == g_theirs.dtype and g_ours.shape == g_theirs.shape, (name, repr(case))
        assert_close(
            g_ours,
            g_theirs,
            loosest(floor, g_theirs.dtype),
            scale=4.0 if low_precision else 1.0,
            msg=f"grad {name}: {case!r}",
        )

    after = [case.input, case.target] + ([case.kwargs["weight"]] if case.kwargs["weight"] is not None else [])
    for b, a in zip(before, after):
        assert torch.equal(b, a) or (b.isnan() == a.isnan()).all(), f"an input was modified: {case!r}"


@given(case=cases())
@pytest.mark.slow
def test_matches_torch_fp32_fp64(device, case):
    check_case(case, device=device)


def reference(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None):
    """xent.reference in float64, cast to the dtype torch would return."""
    out_dtype = x.dtype
    if x.shape == t.shape:
        for other in (t, weight):
            out_dtype = torch.promote_types(out_dtype, other.dtype) if other is not None else out_dtype
    return xent.reference.cross_entropy(x, t, weight, ignore_index, reduction, label_smoothing, z_loss, softcap).to(
        out_dtype
    )


@given(case=cases(dtypes=(torch.bfloat16, torch.float16)))
@pytest.mark.slow
def test_half_precision_matches_float64_formula_and_torch(device, case):
    """Half precision: the exact value (float64 formula) is the oracle, since torch's own result carries
    half-precision accumulation error; torch must still agree loosely."""
    case = on_device(case, device)
    check_case(case, torch_fn=reference, device=device)
    with chunk_budget(case.chunk):
        ours, _ = run(xent.cross_entropy, case, case.seed)
    theirs, _ = run(
        lambda x, t, **kw: F.cross_entropy(x, t.long() if t.dtype == torch.uint8 else t, **kw), case, case.seed
    )
    scale = max(1.0, float(theirs.float().abs().nan_to_num().max())) if theirs.numel() else 1.0
    all_ignored = case.target.dtype != torch.float and bool((case.target == case.kwargs["ignore_index"]).all())
    if device.type == "cuda" and all_ignored and case.kwargs["reduction"] == "mean":
        # torch 2.11's CUDA loss gives 0 for the 0/0 mean of an unbatched half-precision row whose target is
        # ignored; the formula and torch on CPU give NaN, as xent does (README, "Edge cases")
        theirs = torch.where(ours.isnan() & (theirs == 0), ours, theirs)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.05, atol=0.05 * scale, equal_nan=True)


@given(case=cases(dtypes=(torch.float64,)))
def test_matches_reference_including_z_loss_and_softcap(device, case):
    """z_loss and softcap have no torch equivalent: the float64 reference (the formulas) is the oracle."""
    case.kwargs["z_loss"] = 0.25
    case.kwargs["softcap"] = 2.5
    check_case(case, torch_fn=reference, device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_mean_is_closer_to_float64_than_torch(dtype, device):
    """The one intended difference from torch: fp32 accumulation. bf16 mean of 1000 rows of ln 4."""
    x = torch.zeros(1000, 4, dtype=dtype, device=device)
    y = torch.zeros(1000, dtype=torch.long, device=device)
    exact = float(torch.log(torch.tensor(4.0, dtype=torch.float64)))
    ours = float(xent.cross_entropy(x, y))
    theirs = float(F.cross_entropy(x, y))
    assert abs(ours - exact) <= abs(theirs - exact)
    assert abs(ours - exact) <= torch.finfo(dtype).eps * exact


def test_fp16_mean_over_many_rows_stays_finite(device):
    """An fp16 'mean' over 70000 rows: xent sums in fp32 and returns the nearest fp16 value of ln 4, where
    torch's half-precision accumulation gives NaN on the CPU (inf at 50000 rows)."""
    x = torch.zeros(70000, 4, dtype=torch.float16, device=device)
    y = torch.zeros(70000, dtype=torch.long, device=device)
    ours = xent.cross_entropy(x, y, reduction="mean")
    assert torch.isfinite(ours) and abs(float(ours) - 1.3862943611198906) < 1e-3


@pytest.mark.parametrize("shape", [(64, 1000), (6, 50, 7, 3)])
@pytest.mark.parametrize("chunk", [1, 7, 100, 5000, None])
def test_result_does_not_depend_on_chunk_size(shape, chunk, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
    w = torch.rand(shape[1], generator=gen, dtype=torch.float64)
    x, y, w = on(device, x, y, w)
    x.requires_grad_()
    with chunk_budget(chunk):
        loss = xent.cross_entropy(x, y, weight=w, label_smoothing=0.2)
        (grad,) = torch.autograd.grad(loss, x)
    expected = F.cross_entropy(x, y, weight=w, label_smoothing=0.2)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


def test_channels_last_input(device):
    x = torch.randn(2, 5, 4, 3).to(device=device, memory_format=torch.channels_last).requires_grad_()
    y = torch.randint(0, 5, (2, 4, 3)).to(device)
    loss = xent.cross_entropy(x, y, reduction="none")
    expected = F.cross_entropy(x, y, reduction="none")
    assert_close(loss, expected)
    g = torch.randn_like(loss)
    assert_close(torch.autograd.grad(loss, x, g)[0], torch.autograd.grad(expected, x, g)[0])


def test_module_matches_functional_and_torch(device):
    w = torch.rand(6)
    ours = xent.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.3, reduction="sum").to(device)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.3, reduction="sum").to(device)
    x, y = on(device, torch.randn(9, 6), torch.randint(0, 6, (9,)))
    assert_close(ours(x, y), theirs(x, y))
