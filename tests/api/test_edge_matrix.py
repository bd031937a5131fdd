"""Extreme and degenerate inputs, as a matrix: every loss x reduction x backend x the edge, against torch.

Families: zero-size dimensions (no rows, no classes, no hidden units, an empty class-weight vector),
non-finite and zero upstream gradients (what gradient accumulation over a fully masked micro-batch
passes), fp16 under a gradient scaler's scales, degenerate class weights, and the argument parsing of
label_smoothing. Each case compares values, the NaN/inf pattern and gradients with torch's own losses
on the same input (the linear loss against F.cross_entropy of the materialized logits).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
REDUCTIONS = ["mean", "sum", "none"]


def _torch_linear(h, w, y, **kw):
    return F.cross_entropy(h @ w.T, y, **kw)


LOSSES = {  # name: (xent loss, torch loss, makes its own inputs from (rows, classes, hidden))
    "cross_entropy": (xent.cross_entropy, F.cross_entropy),
    "cross_entropy smoothing": (
        lambda x, y, **kw: xent.cross_entropy(x, y, label_smoothing=0.1, **kw),
        lambda x, y, **kw: F.cross_entropy(x, y, label_smoothing=0.1, **kw),
    ),
    "CrossEntropyLoss": (
        lambda x, y, **kw: xent.CrossEntropyLoss(**kw)(x, y),
        lambda x, y, **kw: torch.nn.CrossEntropyLoss(**kw)(x, y),
    ),
    "nll_loss": (
        lambda x, y, **kw: xent.nll_loss(torch.log_softmax(x, 1), y, **kw),
        lambda x, y, **kw: F.nll_loss(torch.log_softmax(x, 1), y, **kw),
    ),
    "linear_cross_entropy": (xent.linear_cross_entropy, _torch_linear),
}


def _inputs(name, rows, classes, hidden=3, seed=0, ignore_every=2):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(classes, 1), (rows,), generator=gen) if classes else torch.full((rows,), -100)
    if classes:
        y[::ignore_every] = -100
    if name == "linear_cross_entropy":
        return [torch.randn(rows, hidden, generator=gen), torch.randn(classes, hidden, generator=gen)], y
    return [torch.randn(rows, classes, generator=gen) * 2], y


def _run(fn, tensors, y, upstream=None, **kw):
    """(loss, gradients of every tensor) with the given upstream gradient (ones by default)."""
    leaves = [t.clone().to(DEVICE).requires_grad_() for t in tensors]
    loss = fn(*leaves, y.to(DEVICE), **kw)
    up = torch.ones_like(loss) if upstream is None else torch.full_like(loss, upstream)
    grads = torch.autograd.grad(loss, leaves, up, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
    return loss.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


def _same(ours, theirs, what):
    """Same values where finite, and the same positions non-finite (an inf may be NaN on the other side)."""
    assert ours.shape == theirs.shape, what
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs)), f"{what}: non-finite pattern\n{ours}\n{theirs}"
    finite = torch.isfinite(theirs)
    assert_close(ours[finite].double(), theirs[finite].double(), torch.float32, msg=what)


SHAPES = {"no rows": (0, 5, 3), "no classes": (4, 0, 3), "no rows or classes": (0, 0, 3), "no hidden units": (4, 5, 0)}
ZERO_SIZE_CASES = [  # hidden units exist only for the linear loss
    pytest.param(name, shape, id=f"{name}-{label}")
    for name in LOSSES
    for label, shape in SHAPES.items()
    if shape[2] or name == "linear_cross_entropy"
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name,shape", ZERO_SIZE_CASES)
def test_zero_size_dimensions(monkeypatch, backend, name, reduction, shape):
    monkeypatch.setenv("XENT_BACKEND", backend)
    rows, classes, hidden = shape
    ours_fn, torch_fn = LOSSES[name]
    tensors, y = _inputs(name, rows, classes, hidden)
    for weight in (None, torch.ones(classes)):
        kw = dict(reduction=reduction, weight=weight.to(DEVICE) if weight is not None else None)
        loss, grads = _run(ours_fn, tensors, y, **kw)
        ref_loss, ref_grads = _run(torch_fn, tensors, y, **kw)
        _same(loss, ref_loss, f"{name} loss")
        for g, r in zip(grads, ref_grads):
            _same(g, r, f"{name} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", [math.inf, -math.inf, math.nan, 0.0])
@pytest.mark.parametrize("masked", [False, True], ids=["some rows ignored", "every row ignored"])
def test_non_finite_and_zero_upstream(monkeypatch, backend, name, reduction, upstream, masked):
    """Ignored rows keep a zero gradient whatever the upstream gradient (transformers divides by
    num_items_in_batch, 0 for a fully masked micro-batch); other rows are non-finite where torch's are."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    ours_fn, torch_fn = LOSSES[name]
    tensors, y = _inputs(name, 6, 7, ignore_every=1 if masked else 2)
    loss, grads = _run(ours_fn, tensors, y, upstream=upstream, reduction=reduction)
    ref_loss, ref_grads = _run(torch_fn, tensors, y, upstream=upstream, reduction=reduction)
    _same(loss, ref_loss, f"{name} loss")
    for g, r in zip(grads, ref_grads):
        _same(g, r, f"{name} gradient")
    ignored = (y == -100).to(DEVICE)
    assert torch.all(grads[0][ignored] == 0), "ignored rows must keep a zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [2.0**10, 2.0**16, 2.0**20, 2.0**24])
@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy smoothing", "CrossEntropyLoss"])
def test_fp16_gradient_scaler_scales(monkeypatch, backend, scale, name):
    """Under fp16 autocast, (loss * scale).backward() for any scale a GradScaler uses: finite wherever
    torch's gradient is, and at least as close to the float64 gradient."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    ours_fn, torch_fn = LOSSES[name]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(32, 200, generator=gen) * 3).half().to(DEVICE)
    y = torch.randint(0, 200, (32,), generator=gen).to(DEVICE)
    y[::5] = -100
    grads = []
    for fn in (ours_fn, torch_fn):
        leaf = x.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = fn(leaf, y)
        assert loss.dtype == torch.float32
        (loss * scale).backward()
        grads.append(leaf.grad.double())
    exact = x.double().requires_grad_()
    (torch_fn(exact, y) * scale).backward()
    ours, theirs = grads
    assert torch.all(torch.isfinite(ours) | ~torch.isfinite(theirs)), "non-finite where torch's is finite"
    finite = torch.isfinite(ours) & torch.isfinite(theirs)
    err = (ours - exact.grad)[finite].abs().max()
    ref_err = (theirs - exact.grad)[finite].abs().max()
    assert err <= ref_err * 1.01 + 1e-12, (err, ref_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "weight",
    [[0.0, 1.0, 1.0, 1.0, 1.0], [1.0, math.inf, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 0.5, 0.0, 1.0, 3.0]],
    ids=["zero weight on the targets", "inf weight", "all zero", "mixed"],
)
def test_degenerate_class_weights(monkeypatch, backend, smoothing, reduction, weight):
    monkeypatch.setenv("XENT_BACKEND", backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=gen)
    y = torch.tensor([0, 0, 2, -100])
    w = torch.tensor(weight).to(DEVICE)
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    loss, (grad,) = _run(xent.cross_entropy, [x], y, **kw)
    ref_loss, (ref_grad,) = _run(F.cross_entropy, [x], y, **kw)
    _same(loss, ref_loss, "loss")
    _same(grad, ref_grad, "gradient")


LABEL_SMOOTHING_ARGUMENTS = [
    True,
    False,
    1,
    0.1,
    np.float32(0.1),
    torch.tensor(0.1),
    torch.tensor(True),
    torch.tensor(1),
    torch.tensor([0.1]),
    torch.tensor(0.1, requires_grad=True),
    "0.1",
    None,
]


@pytest.mark.parametrize("value", LABEL_SMOOTHING_ARGUMENTS, ids=repr)
@pytest.mark.parametrize("fn", ["cross_entropy", "CrossEntropyLoss"])
def test_label_smoothing_argument_is_parsed_as_torch_does(value, fn):
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 3])
    ours, theirs = (
        (xent.cross_entropy, F.cross_entropy)
        if fn == "cross_entropy"
        else (
            lambda *a, label_smoothing: xent.CrossEntropyLoss(label_smoothing=label_smoothing)(*a),
            lambda *a, label_smoothing: torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)(*a),
        )
    )
    try:
        expected = theirs(x, y, label_smoothing=value)
    except Exception as exc:  # noqa: BLE001 - the exception type is what is compared
        with pytest.raises(type(exc)):
            ours(x, y, label_smoothing=value)
        return
    assert_close(ours(x, y, label_smoothing=value), expected)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_one_hot_takes_torchs_argument_names_and_meta_tensors(device):
    labels = torch.tensor([0, 2, 1], device=device)
    ours = xent.one_hot(input=labels, num_classes=3)
    theirs = F.one_hot(input=labels, num_classes=3)
    assert ours.shape == theirs.shape and ours.device == theirs.device
    if device == "cpu":
        assert torch.equal(ours, theirs)
    with pytest.raises(RuntimeError):
        xent.one_hot(labels.new_empty(0) if device == "cpu" else labels)  # nothing to infer the classes from


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_strided_class_weights(monkeypatch, backend, smoothing):
    """A class-weight view with a stride (w[::2]) is read as the values it shows, by every kernel."""
    monkeypatch.setenv("XENT_BACKEND", backend)
    gen = torch.Generator().manual_seed(3)
    w = (torch.rand(14, generator=gen) + 0.1)[::2].to(DEVICE)
    x = torch.randn(5, 7, generator=gen).to(DEVICE)
    y = torch.randint(0, 7, (5,), generator=gen).to(DEVICE)
    assert_close(
        xent.cross_entropy(x, y, weight=w, label_smoothing=smoothing),
        F.cross_entropy(x, y, weight=w, label_smoothing=smoothing),
    )
    h, head = torch.randn(5, 3, generator=gen).to(DEVICE), torch.randn(7, 3, generator=gen).to(DEVICE)
    assert_close(
        xent.linear_cross_entropy(h, head, y, weight=w, label_smoothing=smoothing),
        F.cross_entropy(h @ head.T, y, weight=w, label_smoothing=smoothing),
    )
