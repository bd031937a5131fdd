"""Differential sweep: xent.linear_cross_entropy against torch 2.13's F.linear_cross_entropy (its reference
path, options=None) over its argument combinations, as the cross-entropy parity tests sweep
F.cross_entropy.

Each example draws an input layout torch accepts ((H,) or (N, H), N and H possibly 0), a head (V, H) or a
K-dimensional one (V, d, H), a bias of the right or a wrong shape, a target (class indices of either dtype
torch takes or of a wrong one, class probabilities, or the wrong shape), class weights (right, wrong
size, wrong dtype), ignore_index (None, -100 or a class, explicit or not), label smoothing (including
the values torch treats as none and the out-of-range ones), the reduction (an invalid one too) and the
dtype. Both must raise the same exception type, or both return the same loss (NaN/inf pattern
included) and the same gradients of the input, the head and its bias; neither may modify its inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import xent


@st.composite
def linear_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # half of the examples draw only arguments torch computes with (values and gradients compared), the
    # others any argument (the error types compared too)
    clean = draw(st.booleans())

    def choose(values, valid):
        return draw(st.sampled_from(valid if clean else values))

    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batched = draw(st.booleans())
    n = draw(st.sampled_from([0, 1, 3, 5])) if batched else None
    hidden = draw(st.sampled_from([0, 1, 4]))
    vocab = draw(st.sampled_from([0, 1, 2, 7]))
    # K-dim heads with no classes: torch's K-dim cross_entropy fails in an internal reshape ("size
    # mismatch"), where xent gives the losses of no classes (docs/edge-cases.md): not swept
    kdim = draw(st.sampled_from([(), (), (), (2,)])) if vocab else ()
    lead = (n,) if batched else ()

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt)

    x = randn(*lead, hidden)
    w = randn(vocab, *kdim, hidden) * 0.7
    logits_shape = (*lead, vocab, *kdim)
    bias_kind = choose(["none", "none", "right", "flat", "wrong"], ["none", "right"])
    bias = {
        "none": None,
        "right": randn(vocab, *kdim) if True else None,
        "flat": randn(vocab * math.prod(kdim)),
        "wrong": randn(vocab + 1),
    }[bias_kind]

    target_kind = choose(
        ["index", "index", "uint8", "int32", "probabilities", "wrong shape"], ["index", "uint8", "probabilities"]
    )
    index_shape = (*lead, *kdim)
    if target_kind == "probabilities":
        target = torch.rand(*logits_shape, generator=gen, dtype=torch.float64).to(dtype)
        class_dim = 1 if batched else 0
        target = target / target.sum(class_dim, keepdim=True).clamp_min(1e-6) if vocab else target
    elif target_kind == "wrong shape":
        target = torch.randint(0, max(vocab, 1), (*index_shape, 2), generator=gen)
    else:
        target = torch.randint(0, max(vocab, 1), index_shape, generator=gen)
        if vocab == 0:
            target.fill_(-100)
        elif target.numel() and draw(st.booleans()):
            target.view(-1)[0] = -100  # ignored as int64; 156 as uint8
        target = target.to({"index": torch.int64, "uint8": torch.uint8, "int32": torch.int32}[target_kind])

    weight_kind = choose(["none", "none", "right", "wrong size", "wrong dtype"], ["none", "right"])
    weight = {
        "none": None,
        "right": torch.rand(vocab, generator=gen, dtype=torch.float64).to(dtype) + 0.1,
        "wrong size": torch.rand(vocab + 2, generator=gen, dtype=torch.float64).to(dtype),
        "wrong dtype": torch.rand(vocab, generator=gen).to(torch.float64 if dtype == torch.float32 else torch.float32),
    }[weight_kind]
    kwargs = dict(
        linear_bias=bias,
        weight=weight,
        reduction=choose(["mean", "sum", "none", "mean", "avg"], ["mean", "sum", "none"]),
        label_smoothing=choose([0.0, 0.0, 0.2, 1.0, -0.5, 1.5, float("nan")], [0.0, 0.2, 1.0, -0.5, float("nan")]),
    )
    probabilities = target_kind == "probabilities"
    ignore = choose(["default", "default", None, -100, 0, 1], ["default", None] if probabilities else ["default", -100])
    if clean and target_kind == "uint8":
        target.masked_fill_(target == 156, 0)  # -100 wrapped: not a class of these heads
    if ignore != "default":
        kwargs["ignore_index"] = ignore
    return x, w, target, kwargs, seed


def _run(fn, x, w, target, kwargs):
    """('raised', exception type) or ('ok', loss, gradients of input, head, bias)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    kw = dict(kwargs)
    if kw["linear_bias"] is not None:
        kw["linear_bias"] = kw["linear_bias"].clone().requires_grad_()
    try:
        loss = fn(x, w, target, **kw)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return ("raised", type(e), str(e))
    leaves = [t for t in (x, w, kw["linear_bias"]) if t is not None]
    up = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(1)) + 0.5
    grads = torch.autograd.grad(loss, leaves, up, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    return ("ok", loss.detach(), grads)


def _same(ours, theirs, what, dtype):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, f"{what}: {ours.shape}/{ours.dtype}"
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), f"{what}: NaN pattern\n{ours}\n{theirs}"
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"{what}: inf pattern\n{ours}\n{theirs}"
    finite = torch.isfinite(theirs)
    assert_close(ours[finite], theirs[finite], dtype, msg=what)


@given(linear_cases())
def test_linear_cross_entropy_matches_torch_everywhere(case):
    x, w, target, kwargs, seed = case
    before = [t.clone() if t is not None else None for t in (x, w, target, kwargs["linear_bias"], kwargs["weight"])]
    # torch 2.13 fails on some uint8-target paths (weight + smoothing: gather wants int64); its int64 twin
    # has the same meaning, so it is the oracle there, as in the cross-entropy sweep. xent takes uint8.
    oracle_target = target.long() if target.dtype == torch.uint8 else target
    theirs = _run(F.linear_cross_entropy, x, w, oracle_target, kwargs)
    ours = _run(xent.linear_cross_entropy, x, w, target, kwargs)
    what = f"seed={seed} x={tuple(x.shape)} w={tuple(w.shape)} target={tuple(target.shape)}/{target.dtype} " + str(
        {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    )
    assert ours[0] == theirs[0], f"{what}: torch {theirs[:3]}, xent {ours[:3]}"
    if theirs[0] == "raised":
        assert ours[1] is theirs[1], f"{what}: torch raised {theirs[1].__name__} ({theirs[2]}), xent {ours[1].__name__}"
    else:
        _same(ours[1], theirs[1], f"{what}: loss", x.dtype)
        for g_ours, g_theirs, name in zip(ours[2], theirs[2], ("input", "linear_weight", "linear_bias")):
            _same(g_ours, g_theirs, f"{what}: grad {name}", x.dtype)
    for t, b in zip((x, w, target, kwargs["linear_bias"], kwargs["weight"]), before):
        assert t is None or torch.equal(t, b) or (t.isnan() == b.isnan()).all()
