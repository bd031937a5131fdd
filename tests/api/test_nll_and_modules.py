"""nll_loss against torch, and the Module classes (state_dict, legacy arguments, drop-in use)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import xent


@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(["unbatched", "2d", "kdim"]),
    c=st.integers(1, 8),
    n=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    use_weight=st.booleans(),
    ignore_index=st.sampled_from([-100, 0, 2, 9]),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    uint8=st.booleans(),
)
def test_nll_loss_matches_torch(seed, layout, c, n, dtype, use_weight, ignore_index, reduction, uint8):
    gen = torch.Generator().manual_seed(seed)
    shape = {"unbatched": (c,), "2d": (n, c), "kdim": (n, c, 3, 2)}[layout]
    batch = () if layout == "unbatched" else (n,) + shape[2:]
    x = torch.randn(shape, generator=gen, dtype=torch.float64).log_softmax(0 if layout == "unbatched" else 1)
    x = x.to(dtype)
    y = torch.randint(0, c, batch, generator=gen)
    y[torch.rand(batch, generator=gen) < 0.3] = ignore_index
    if uint8 and ignore_index >= 0:
        y = y.to(torch.uint8)
    w = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype) if use_weight else None
    results = []
    for fn in (xent.nll_loss, F.nll_loss):
        xi = x.detach().requires_grad_()
        t = y if fn is xent.nll_loss or layout != "kdim" else y.long()  # torch's K-dim uint8 backward fails
        loss = fn(xi, t, weight=w, ignore_index=ignore_index, reduction=reduction)
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
        grad = torch.autograd.grad(loss, xi, up)[0] if loss.numel() else torch.zeros_like(xi)
        results.append((loss.detach(), grad))
    (ours, g_ours), (theirs, g_theirs) = results
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert_close(ours, theirs, dtype, scale=2.0)
    assert_close(g_ours, g_theirs, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_gradcheck_and_gradgradcheck(reduction):
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, -100, 2])
    w = torch.rand(5, dtype=torch.float64)
    fn = lambda a: xent.nll_loss(a, y, weight=w, reduction=reduction)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def test_nll_of_log_softmax_equals_cross_entropy():
    x = torch.randn(6, 7)
    y = torch.randint(0, 7, (6,))
    assert_close(xent.nll_loss(xent.reference.log_softmax(x, 1), y), xent.cross_entropy(x, y))


def test_cross_entropy_module_state_dict_matches_torch():
    w = torch.rand(5)
    ours, theirs = xent.CrossEntropyLoss(weight=w), torch.nn.CrossEntropyLoss(weight=w)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    assert torch.equal(ours.state_dict()["weight"], theirs.state_dict()["weight"])
    assert list(xent.CrossEntropyLoss().state_dict()) == list(torch.nn.CrossEntropyLoss().state_dict()) == []
    fresh = xent.CrossEntropyLoss(weight=torch.zeros(5))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, w)


def test_modules_follow_to_and_dtype():
    m = xent.CrossEntropyLoss(weight=torch.rand(3)).double()
    assert m.weight.dtype == torch.float64
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_close(m(x, torch.tensor([0, 1, 2, 1])), F.cross_entropy(x, torch.tensor([0, 1, 2, 1]), weight=m.weight))


@pytest.mark.parametrize(
    "cls,torch_cls", [(xent.CrossEntropyLoss, torch.nn.CrossEntropyLoss), (xent.NLLLoss, torch.nn.NLLLoss)]
)
def test_module_legacy_arguments(cls, torch_cls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = cls(size_average=False)
        theirs = torch_cls(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"
    assert str(caught[0].message) == str(caught[1].message)


def test_modules_are_drop_in():
    x = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, -100, 2])
    for ours, theirs in [
        (
            xent.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.2, reduction="none"),
            torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.2, reduction="none"),
        ),
        (xent.NLLLoss(reduction="sum"), torch.nn.NLLLoss(reduction="sum")),
    ]:
        a, b = ours(x, y), theirs(x, y)
        assert_close(a, b)
        assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])
    assert isinstance(xent.CrossEntropyLoss(), torch.nn.Module)
    assert repr(xent.CrossEntropyLoss()) == "CrossEntropyLoss()"
    assert "z_loss=0.1" in repr(xent.CrossEntropyLoss(z_loss=0.1))
