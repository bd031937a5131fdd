"""The Triton kernel's read-once launch (WHOLE_ROW, off by default until a GPU measures it) computes what
the two-read launch computes: every option, through Triton's interpreter on a machine without a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xent

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _calls(fn, *args):
    """fn's results and its gradients with respect to its first argument, for an upstream of ones/randn."""
    x = args[0].clone().requires_grad_()
    out = fn(x, *args[1:])
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    ups = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    (grad,) = torch.autograd.grad(sum((o.float() * u).sum() for o, u in zip(outs, ups)), x)
    return [o.detach() for o in outs], grad


CASES = {
    "plain": lambda z, y, w: xent.cross_entropy(z, y, backend="triton"),
    "smoothing + weights": lambda z, y, w: xent.cross_entropy(z, y, weight=w, label_smoothing=0.1, backend="triton"),
    "z-loss + softcap": lambda z, y, w: xent.cross_entropy(z, y, z_loss=1e-3, softcap=4.0, backend="triton"),
    "none": lambda z, y, w: xent.cross_entropy(z, y, reduction="none", backend="triton"),
    "logprobs + entropy, T": lambda z, y, w: xent.token_logprobs_from_logits(
        z, y, temperature=0.7, return_entropy=True, backend="triton"
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 4096])
@pytest.mark.parametrize("case", list(CASES))
def test_read_once_launch_matches_the_two_read_launch(case, vocab, dtype, monkeypatch):
    from xent.kernels import triton_rows

    gen = torch.Generator().manual_seed(vocab)
    z = (torch.randn(6, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    y = torch.randint(0, vocab, (6,), generator=gen).to(DEVICE)
    y[1] = -100
    w = torch.rand(vocab, generator=gen).to(dtype).to(DEVICE)
    monkeypatch.setattr(triton_rows, "WHOLE_ROW_MAX_COLUMNS", 0)
    ref_outs, ref_grad = _calls(CASES[case], z, y, w)
    launches = []
    real = triton_rows._whole_row_launch
    monkeypatch.setattr(triton_rows, "_whole_row_launch", lambda *a: launches.append(a) or real(*a))
    monkeypatch.setattr(triton_rows, "WHOLE_ROW_MAX_COLUMNS", 4096)
    outs, grad = _calls(CASES[case], z, y, w)
    assert launches, "the read-once launch did not run"
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


def test_rows_longer_than_the_switch_keep_the_two_read_launch(monkeypatch):
    from xent.kernels import triton_rows

    monkeypatch.setattr(triton_rows, "WHOLE_ROW_MAX_COLUMNS", 512)
    monkeypatch.setattr(triton_rows, "_whole_row_launch", lambda *a: pytest.fail("read-once launch for a long row"))
    z = torch.randn(3, 1000, device=DEVICE, requires_grad=True)
    xent.cross_entropy(z, torch.tensor([1, 2, 3], device=DEVICE), backend="triton").backward()


def test_the_switch_is_off_by_default():
    from xent.kernels import triton_rows

    assert triton_rows.WHOLE_ROW_MAX_COLUMNS == 0 or "XENT_TRITON_WHOLE_ROW" in __import__("os").environ
