"""xent.linear_cross_entropy against F.linear + torch's cross_entropy (and the formulas for z_loss/softcap).

The numerical tests run on every `device` (conftest.py): inputs are drawn on the CPU and moved there, and the
reference composition runs on the same device. Tests of drop-in compatibility with torch's own
F.linear_cross_entropy / nn.LinearCrossEntropyLoss (torch >= 2.13) are skipped on a torch without them.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, on
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import xent

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(
    not HAS_TORCH_LCE, reason=f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)"
)


def _reference(x, w, t, b=None, **kw):
    """cross_entropy over F.linear's logits: torch's where it has the option, the float64 formula else."""
    logits = F.linear(x, w, b)
    flat_logits, flat_t = logits.reshape(-1, logits.shape[-1]), t.reshape(-1)
    if kw.get("z_loss") or kw.get("softcap"):
        loss = xent.reference.cross_entropy(flat_logits, flat_t, **kw).to(x.dtype)
    else:
        loss = F.cross_entropy(flat_logits, flat_t.long(), **kw)
    return loss.reshape(t.shape) if kw.get("reduction") == "none" else loss


@given(
    seed=st.integers(0, 2**31 - 1),
    lead=st.sampled_from([(), (0,), (5,), (3, 4), (2, 3, 2)]),
    hidden=st.integers(1, 9),
    vocab=st.integers(1, 13),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    use_weight=st.booleans(),
    ignore_index=st.sampled_from([-100, 0, 3]),
    ignored=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.2, 1.0]),
    extras=st.sampled_from([{}, {"z_loss": 0.1}, {"softcap": 3.0}, {"z_loss": 1e-3, "softcap": 1.5}]),
    budget=st.sampled_from([None, 1, 40, 200]),
    wants=st.sampled_from(["all", "input", "weight", "bias"]),
)
def test_matches_linear_then_cross_entropy(
    device,
    seed,
    lead,
    hidden,
    vocab,
    dtype,
    bias,
    use_weight,
    ignore_index,
    ignored,
    reduction,
    label_smoothing,
    extras,
    budget,
    wants,
):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen, dtype=dtype) * 2
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    t[torch.rand(lead, generator=gen) < ignored] = ignore_index
    class_weight = torch.rand(vocab, generator=gen, dtype=dtype) if use_weight else None
    x, w, b, t, class_weight = on(device, x, w, b, t, class_weight)
    kw = dict(
        weight=class_weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, **extras
    )
    originals = [v.clone() for v in (x, w, t) + ((b,) if bias else ())]
    results = []
    for fn in (
        lambda *a, **k: xent.linear_cross_entropy(*a[:3], linear_bias=a[3], memory_budget=budget, **k),
        _reference,
    ):
        params = [
            x.clone().requires_grad_(wants in ("all", "input")),
            w.clone().requires_grad_(wants in ("all", "weight")),
            b.clone().requires_grad_(wants in ("all", "bias")) if bias else None,
        ]
        loss = fn(params[0], params[1], t, params[2], **kw)
        up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)
        wrt = [p for p in params if p is not None and p.requires_grad]
        grads = torch.autograd.grad(loss, wrt, up, allow_unused=True) if wrt and loss.requires_grad else []
        results.append((loss.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, wrt)]))
    (ours, g_ours), (theirs, g_theirs) = results
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert_close(ours, theirs, scale=3.0)
    for a, e in zip(g_ours, g_theirs):
        assert_close(a, e, scale=3.0)
    for before, after in zip(originals, (x, w, t) + ((b,) if bias else ())):
        assert torch.equal(before, after)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_all_parameters_and_double_backward(reduction, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    x, w, b, t = on(device, x, w, b, torch.tensor([0, 6, -100, 3, 3]))
    for p in (x, w, b):
        p.requires_grad_()

    def fn(x, w, b):
        return xent.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, z_loss=0.01, memory_budget=16 * 7
        )  # two rows per chunk

    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("budget", [1, 3 * 4 * 97, 1 << 30])
def test_chunk_size_does_not_change_the_result(budget, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=gen)
    w = torch.randn(97, 16, generator=gen)
    t = torch.randint(0, 97, (37,), generator=gen)
    x, w, t = on(device, x, w, t)
    x.requires_grad_()
    w.requires_grad_()
    loss = xent.linear_cross_entropy(x, w, t, label_smoothing=0.1, memory_budget=budget)
    gx, gw = torch.autograd.grad(loss, (x, w))
    ref = xent.linear_cross_entropy(x, w, t, label_smoothing=0.1, memory_budget=1 << 30)
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert_close(loss, ref)
    assert_close(gx, rx)
    assert_close(gw, rw)


def test_batch_chunk_size_from_torch_options_is_honoured(device):
    x, w, t = on(device, torch.randn(10, 8), torch.randn(12, 8), torch.randint(0, 12, (10,)))
    x.requires_grad_()
    options_class = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    # torch < 2.13 has no options class: any object with batch_chunk_size is read the same way
    opts = options_class(batch_chunk_size=3) if options_class else types.SimpleNamespace(batch_chunk_size=3)
    assert_close(xent.linear_cross_entropy(x, w, t, options=opts), _reference(x, w, t))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_get_half_precision_gradients_from_fp32_sums(dtype, device):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(50, 32, generator=gen) / 4).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(50, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, 50, (64,), generator=gen).to(device)
    loss = xent.linear_cross_entropy(x, w, t, linear_bias=b, memory_budget=8 * 50 * 4)
    assert loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == dtype
    # against the float64 composition: within half-precision rounding of the gradients themselves
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, w, b))
    ref = F.cross_entropy(F.linear(x64, w64, b64), t)
    ref.backward()
    for ours, exact in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert_close(ours.double(), exact, dtype)


def test_all_targets_ignored(device):
    x, w, t = on(device, torch.randn(6, 5), torch.randn(9, 5), torch.full((6,), -100))
    x.requires_grad_()
    w.requires_grad_()
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        loss = xent.linear_cross_entropy(x, w, t, reduction=reduction)
        assert_close(loss, torch.tensor(expected, device=device))
        gx, gw = torch.autograd.grad(loss, (x, w))
        assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gw, torch.zeros_like(w))
    assert torch.equal(xent.linear_cross_entropy(x, w, t, reduction="none"), torch.zeros(6, device=device))


def test_retain_graph_and_second_backward(device):
    x, w, t = on(device, torch.randn(8, 6), torch.randn(10, 6), torch.randint(0, 10, (8,)))
    x.requires_grad_()
    w.requires_grad_()
    for reduction in ("mean", "none"):
        x.grad = w.grad = None
        loss = xent.linear_cross_entropy(x, w, t, reduction=reduction).sum()
        loss.backward(retain_graph=True)
        first = (x.grad.clone(), w.grad.clone())
        loss.backward()
        assert_close(x.grad, 2 * first[0])
        assert_close(w.grad, 2 * first[1])


def test_upstream_gradient_scales_every_parameter(device):
    x, w, t = on(
        device,
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(5, 3, dtype=torch.float64),
        torch.randint(0, 5, (4,)),
    )
    x.requires_grad_()
    w.requires_grad_()
    ours = torch.autograd.grad(xent.linear_cross_entropy(x, w, t) * 3.5, (x, w))
    theirs = torch.autograd.grad(_reference(x, w, t) * 3.5, (x, w))
    for a, e in zip(ours, theirs):
        assert_close(a, e)


def test_no_gradients_under_no_grad_and_for_frozen_parameters(device):
    x, w, t = on(device, torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,)))
    w.requires_grad_()
    with torch.no_grad():
        assert not xent.linear_cross_entropy(x, w, t).requires_grad
    (gw,) = torch.autograd.grad(xent.linear_cross_entropy(x, w, t), (w,))
    assert_close(gw, torch.autograd.grad(_reference(x, w, t), (w,))[0])


@needs_torch_lce
def test_probability_targets_and_k_dim_heads_like_torch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    w = torch.randn(5, 6, generator=gen, requires_grad=True)
    p = torch.rand(4, 5, generator=gen)
    assert_close(xent.linear_cross_entropy(x, w, p), F.linear_cross_entropy(x, w, p))
    wk = torch.randn(5, 2, 6, generator=gen)
    tk = torch.randint(0, 5, (4, 2), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(xent.linear_cross_entropy(x, wk, tk), F.linear_cross_entropy(x, wk, tk))


@needs_torch_lce
def test_torch_signature_works_unchanged():
    x = torch.randn(6, 4)
    w = torch.randn(7, 4)
    b = torch.randn(7)
    t = torch.tensor([0, -100, 6, 2, 2, 1])
    for kwargs in (
        dict(),
        dict(ignore_index=None),
        dict(linear_bias=b, reduction="sum", label_smoothing=0.2),
        dict(options=torch.nn.LinearCrossEntropyOptions()),
        dict(weight=torch.rand(7), reduction="none"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = F.linear_cross_entropy(x, w, t, **kwargs)
        assert_close(xent.linear_cross_entropy(x, w, t, **kwargs), expected)


ERRORS = [
    ("hidden mismatch", (torch.randn(4, 8), torch.randn(5, 7), torch.tensor([0, 1, 2, 3])), {}),
    (
        "bias shape",
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])),
        dict(linear_bias=torch.randn(4)),
    ),
    ("batch mismatch", (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2])), {}),
    ("target out of range", (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 5, 2])), {}),
    ("target int32", (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3], dtype=torch.int32)), {}),
    (
        "integer input",
        (torch.zeros(4, 8, dtype=torch.long), torch.zeros(5, 8, dtype=torch.long), torch.tensor([0, 1, 2, 3])),
        {},
    ),
    ("dtype mismatch", (torch.randn(4, 8, dtype=torch.float64), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])), {}),
    (
        "class weight dtype",
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])),
        dict(weight=torch.ones(5, dtype=torch.float64)),
    ),
    (
        "class weight shape",
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])),
        dict(weight=torch.ones(4)),
    ),
    (
        "label_smoothing > 1",
        (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])),
        dict(label_smoothing=1.1),
    ),
    ("invalid reduction", (torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])), dict(reduction="x")),
    ("1-d linear weight", (torch.randn(4, 8), torch.randn(8), torch.tensor([0, 1, 2, 3])), {}),
]


@needs_torch_lce
@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_errors_have_torch_types(case):
    _, args, kwargs = case
    with pytest.raises(Exception) as theirs:
        F.linear_cross_entropy(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        xent.linear_cross_entropy(*args, **kwargs)
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)


@pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyLoss"),
    reason=f"torch {torch.__version__} has no nn.LinearCrossEntropyLoss (torch >= 2.13)",
)
def test_module_is_drop_in_for_torch_linear_cross_entropy_loss():
    torch.manual_seed(4)
    theirs = torch.nn.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1, weight=torch.rand(9))
    ours = xent.LinearCrossEntropyLoss(6, 9, bias=True, label_smoothing=0.1, weight=torch.rand(9))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(11, 6)
    t = torch.randint(0, 9, (11,))
    assert_close(ours(x, t), theirs(x, t))
    ours(x, t).backward()
    theirs(x, t).backward()
    assert_close(ours.linear.weight.grad, theirs.linear.weight.grad)
    assert_close(ours.linear.bias.grad, theirs.linear.bias.grad)


@needs_torch_lce
def test_under_autocast_like_linear_then_cross_entropy():
    """autocast: the head's matmul runs in bf16 (as F.linear's), the loss comes back in float32."""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(6, 8, generator=gen, requires_grad=True)
    w = torch.randn(11, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = xent.linear_cross_entropy(h, w, y, weight=torch.rand(11, generator=gen))
        theirs = F.linear_cross_entropy(h, w, y)
        mixed = xent.linear_cross_entropy(h.detach().bfloat16(), w.detach(), y)  # mixed dtypes, as F.linear
    assert ours.dtype == theirs.dtype == mixed.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = xent.linear_cross_entropy(h, w, y)
    assert_close(ours, theirs)
    for a, e in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(theirs, (h, w))):
        assert a.dtype == e.dtype == torch.float32
        assert_close(a, e, torch.bfloat16)


def test_k_dim_head_needs_batched_input_as_in_torch():
    with pytest.raises(RuntimeError, match="requires batched input"):
        xent.linear_cross_entropy(torch.randn(8), torch.randn(6, 2, 8), torch.tensor([0, 1]))
    if HAS_TORCH_LCE:
        with pytest.raises(RuntimeError) as theirs:
            F.linear_cross_entropy(torch.randn(8), torch.randn(6, 2, 8), torch.tensor([0, 1]))
        assert "batched input" in str(theirs.value)
