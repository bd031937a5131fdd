"""gradcheck / gradgradcheck in float64, and the autograd contract (retain_graph, no work without grad).

Each test runs on every `device` (conftest.py): inputs are drawn on the CPU and moved there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, on
from torch.autograd import gradcheck, gradgradcheck

import xent

INDEX_OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(label_smoothing=0.3),
    dict(weight=True, label_smoothing=0.2, ignore_index=1),
    dict(weight=True, reduction="none", ignore_index=0),
    dict(z_loss=0.1, softcap=3.0, label_smoothing=0.1),
]


def _index_inputs(shape=(4, 5), seed=0, device="cpu"):
    """Logits (float64, requiring grad) and class indices on `device`, drawn on the CPU; and the generator."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    batch = () if len(shape) == 1 else (shape[0],) + shape[2:]
    y = torch.randint(0, shape[0 if len(shape) == 1 else 1], batch, generator=gen)
    x, y = on(device, x, y)
    return x.requires_grad_(), y, gen


@pytest.mark.parametrize("options", INDEX_OPTIONS)
@pytest.mark.parametrize("shape", [(4, 5), (5,), (2, 3, 4)])
def test_gradcheck_and_gradgradcheck_class_indices(options, shape, device):
    x, y, gen = _index_inputs(shape)
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(shape[0 if len(shape) == 1 else 1], generator=gen, dtype=torch.float64)
    if options.get("ignore_index") is not None:  # one ignored row, unless that would be the only row
        ii = options["ignore_index"]
        if y.dim():
            y.view(-1)[0] = ii
        elif y == ii:
            y = (y + 1) % x.shape[0]
    x, y, options["weight"] = on(device, x.detach(), y, options.get("weight"))
    x.requires_grad_()
    fn = lambda inp: xent.cross_entropy(inp, y, **options)  # noqa: E731
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_probability_targets_wrt_input_target_and_weight(label_smoothing, reduction, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    p = torch.rand(3, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(4, generator=gen, dtype=torch.float64)
    x, p, w = (t.requires_grad_() for t in on(device, x, p, w))

    def fn(a, b, c):
        return xent.cross_entropy(a, b, weight=c, reduction=reduction, label_smoothing=label_smoothing)

    assert gradcheck(fn, (x, p, w))
    assert gradgradcheck(fn, (x, p, w))


def test_double_backward_matches_torch_hessian_vector_product(device):
    x, y, _ = _index_inputs((6, 7), seed=3, device=device)
    v = torch.randn(x.shape, dtype=x.dtype).to(device)
    hvps = []
    for fn in (xent.cross_entropy, F.cross_entropy):
        (g,) = torch.autograd.grad(fn(x, y, label_smoothing=0.1), x, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), x)
        hvps.append(hvp)
    assert_close(hvps[0], hvps[1])


def test_retain_graph_second_backward_gives_the_same_gradient(device):
    x, y = on(device, torch.randn(8, 11), torch.randint(0, 11, (8,)))
    x.requires_grad_()
    loss = xent.cross_entropy(x, y, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(torch.tensor(2.0, device=device))
    assert_close(x.grad, 3 * first)


def test_retain_graph_detects_logits_modified_in_place(device):
    x = torch.randn(4, 5).to(device).requires_grad_()
    logits = x * 1.0
    loss = xent.cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=device))
    loss.backward(retain_graph=True)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_logits_modified_after_forward_do_not_break_the_first_backward(device):
    """As with torch (which saves log_softmax, not the logits), the first backward uses no saved logits."""
    x = torch.randn(4, 5).to(device).requires_grad_()
    logits = x * 1.0
    y = torch.tensor([0, 1, 2, 3], device=device)
    expected = torch.autograd.grad(F.cross_entropy(x * 1.0, y), x)[0]
    loss = xent.cross_entropy(logits, y)
    with torch.no_grad():
        logits.mul_(0.0)
    loss.backward()
    assert_close(x.grad, expected)


def test_no_gradient_buffer_without_autograd(monkeypatch, device):
    """no_grad, inference_mode and inputs that do not require grad never build the gradient buffer."""
    import xent.ops.cross_entropy as autograd_module

    calls = []
    select = autograd_module.forward_for

    def spying_select(problem):
        forward = select(problem)

        def spy(problem, need_grad, **kw):
            calls.append(need_grad)
            return forward(problem, need_grad, **kw)

        return spy

    monkeypatch.setattr(autograd_module, "forward_for", spying_select)
    x, y = on(device, torch.randn(5, 6), torch.randint(0, 6, (5,)))
    x.requires_grad_()
    with torch.no_grad():
        xent.cross_entropy(x, y)
    with torch.inference_mode():
        xent.cross_entropy(x, y)
    xent.cross_entropy(x.detach(), y)
    assert calls == [False, False, False]
    xent.cross_entropy(x, y)
    assert calls[-1] is True


def test_upstream_gradient_scales_per_row_for_reduction_none(device):
    x, y, up = on(
        device,
        torch.randn(3, 4, 2, dtype=torch.float64),
        torch.randint(0, 4, (3, 2)),
        torch.randn(3, 2, dtype=torch.float64),
    )
    x.requires_grad_()
    ours = torch.autograd.grad(xent.cross_entropy(x, y, reduction="none"), x, up)[0]
    theirs = torch.autograd.grad(F.cross_entropy(x, y, reduction="none"), x, up)[0]
    assert_close(ours, theirs)


def test_weight_requiring_grad_with_class_indices_raises_like_torch(device):
    w, x, y = on(device, torch.rand(4), torch.randn(3, 4), torch.tensor([0, 1, 2]))
    w.requires_grad_()
    x.requires_grad_()
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, y, weight=w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to 'weight'"):
        xent.cross_entropy(x, y, weight=w)
    with torch.no_grad():  # without autograd there is nothing to differentiate: both accept it
        assert_close(xent.cross_entropy(x, y, weight=w), F.cross_entropy(x, y, weight=w))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.compile
def test_torch_compile_gives_the_eager_result(backend, device):
    """Under torch.compile the losses run eagerly behind one graph break: the same loss and gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 11, generator=gen)
    h = torch.randn(8, 5, generator=gen)
    w = torch.randn(11, 5, generator=gen)
    y = torch.randint(0, 11, (8,), generator=gen)
    y[2] = -100
    x, h, w, y = on(device, x, h, w, y)
    for t in (x, h, w):
        t.requires_grad_()

    def step(x, h, w, y):
        return (
            xent.cross_entropy(x * 2, y, label_smoothing=0.1, z_loss=0.01)
            + xent.linear_cross_entropy(h.tanh(), w, y, reduction="sum")
            + xent.nll_loss(x.log_softmax(1), y)
        )

    compiled = torch.compile(step, backend=backend)
    ours = compiled(x, h, w, y)
    expected = step(x, h, w, y)
    assert_close(ours, expected)
    for a, e in zip(torch.autograd.grad(ours, (x, h, w)), torch.autograd.grad(expected, (x, h, w))):
        assert_close(a, e)


def test_under_autocast_losses_follow_its_float32_policy(device):
    x = torch.randn(5, 7, dtype=torch.bfloat16).to(device).requires_grad_()
    y = torch.tensor([0, 1, 6, 3, -100], device=device)
    w = torch.rand(7).to(device)  # float32 weight with bf16 logits: fine under autocast, as in torch
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for fn_ours, fn_torch in ((xent.cross_entropy, F.cross_entropy), (xent.nll_loss, F.nll_loss)):
            ours, theirs = fn_ours(x, y, weight=w), fn_torch(x, y, weight=w)
            assert ours.dtype == theirs.dtype == torch.float32
            assert_close(ours, theirs, torch.bfloat16)
            (g_ours,), (g_theirs,) = torch.autograd.grad(ours, x), torch.autograd.grad(theirs, x)
            assert g_ours.dtype == g_theirs.dtype == torch.bfloat16
            assert_close(g_ours, g_theirs, torch.bfloat16)
    with pytest.raises(RuntimeError):  # outside autocast the dtypes must agree, as torch
        xent.cross_entropy(x, y, weight=w)
