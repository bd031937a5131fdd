"""The edge-case table of docs/torch-semantics.md ("Edge cases"), each row checked against torch.

Each case runs on every `device` (conftest.py): inputs are built on the CPU and moved, and torch's result is
taken on the same device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, on

import xent

inf, nan = math.inf, math.nan


def both(fn_args, device="cpu", **kwargs):
    """(ours, torch's) loss and input gradient for the same arguments, moved to `device`."""
    out = []
    kwargs = {k: on(device, v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    for fn in (xent.cross_entropy, F.cross_entropy):
        x, t = on(device, *fn_args)
        x = x.detach().clone().requires_grad_()
        loss = fn(x, t, **kwargs)
        grad = torch.autograd.grad(loss.sum(), x, allow_unused=True)[0] if loss.requires_grad else None
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("reduction,expected", [("mean", nan), ("sum", 0.0), ("none", [0.0, 0.0, 0.0])])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_all_targets_ignored(reduction, expected, label_smoothing, device):
    (ours, g_ours), (theirs, g_theirs) = both(
        (torch.randn(3, 5), torch.full((3,), -100)), device, reduction=reduction, label_smoothing=label_smoothing
    )
    assert_close(ours, torch.tensor(expected, device=device))
    assert_close(ours, theirs)
    zeros = torch.zeros(3, 5, device=device)
    assert torch.equal(g_ours, zeros) and torch.equal(g_theirs, zeros)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,target_shape", [((0, 4), (0,)), ((0, 4, 3), (0, 3)), ((2, 4, 0), (2, 0))])
def test_no_rows(reduction, shape, target_shape, device):
    (ours, g_ours), (theirs, g_theirs) = both(
        (torch.randn(shape), torch.zeros(target_shape, dtype=torch.long)), device, reduction=reduction
    )
    assert ours.shape == theirs.shape
    assert_close(ours, theirs)
    assert g_ours.shape == torch.Size(shape)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_unbatched_gives_a_scalar(reduction, probabilities, device):
    x = torch.randn(6)
    t = torch.rand(6) if probabilities else torch.tensor(4)
    (ours, g_ours), (theirs, g_theirs) = both((x, t), device, reduction=reduction)
    assert ours.shape == () == theirs.shape
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs)


def test_unbatched_with_a_one_element_target(device):
    """torch accepts a (1,) target for a (C,) input but its backward then fails ('size mismatch');
    xent differentiates it like the 0-d target it stands for."""
    x = torch.randn(6).to(device).requires_grad_()
    ours = xent.cross_entropy(x, torch.tensor([4], device=device), reduction="none")
    theirs = F.cross_entropy(x, torch.tensor([4], device=device), reduction="none")
    assert ours.shape == theirs.shape == ()
    assert_close(ours, theirs)
    expected = torch.autograd.grad(F.cross_entropy(x, torch.tensor(4, device=device)), x)[0]
    assert_close(torch.autograd.grad(ours, x)[0], expected)


@pytest.mark.parametrize(
    "row,target,label_smoothing",
    [
        ([1.0, nan, 0.5], 0, 0.0),  # NaN anywhere in a row: that row is NaN
        ([1.0, inf, 0.5], 0, 0.0),  # +inf logit: NaN
        ([1.0, inf, 0.5], 1, 0.0),
        ([1.0, -inf, 0.5], 1, 0.0),  # -inf at the target: inf
        ([1.0, -inf, 0.5], 0, 0.0),  # -inf elsewhere: finite
        ([1.0, -inf, 0.5], 0, 0.1),  # ... but smoothing puts weight on it: inf
        ([-inf, -inf, -inf], 0, 0.0),  # every logit -inf: NaN
    ],
)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_non_finite_logits(row, target, label_smoothing, reduction, device):
    x = torch.tensor([row, [0.3, 0.2, 0.1]])
    y = torch.tensor([target, 2])
    (ours, g_ours), (theirs, g_theirs) = both((x, y), device, reduction=reduction, label_smoothing=label_smoothing)
    assert_close(ours, theirs)
    assert_close(g_ours, g_theirs)


def test_nan_in_an_ignored_row_leaves_the_loss_finite(device):
    x = torch.tensor([[1.0, nan, 0.5], [0.3, 0.2, 0.1]])
    y = torch.tensor([-100, 2])
    (ours, g_ours), (theirs, g_theirs) = both((x, y), device, reduction="none")
    assert_close(ours, theirs)
    assert torch.isfinite(ours).all()
    assert_close(g_ours, g_theirs)  # torch: NaN gradient on the NaN row, exactly 0 elsewhere


def test_zero_class_weights_give_torch_nan_mean(device):
    (ours, g_ours), (theirs, g_theirs) = both(
        (torch.randn(3, 4), torch.tensor([0, 1, 3])), device, weight=torch.zeros(4)
    )
    assert ours.isnan() and theirs.isnan()
    assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes(reduction, device):
    for t in (torch.full((3,), -100), torch.randn(3, 0)):
        (ours, _), (theirs, _) = both((torch.randn(3, 0), t), device, reduction=reduction)
        assert_close(ours, theirs)


@pytest.mark.parametrize("ignore_index", [-100, -1, 2, 7, 255])
def test_ignore_index_in_range_out_of_range_and_negative(ignore_index, device):
    y = torch.tensor([0, ignore_index, 3, 1, ignore_index])
    x = torch.randn(5, 4)
    for kwargs in (dict(), dict(weight=torch.rand(4), label_smoothing=0.3)):
        (ours, g_ours), (theirs, g_theirs) = both((x, y), device, ignore_index=ignore_index, **kwargs)
        assert_close(ours, theirs)
        assert_close(g_ours, g_theirs)


def test_probability_target_with_negative_ignore_index_is_accepted_and_ignored(device):
    (ours, _), (theirs, _) = both((torch.randn(3, 4), torch.rand(3, 4)), device, ignore_index=-7)
    assert_close(ours, theirs)


def test_dtype_promotion_of_probability_targets(device):
    for x_dtype, t_dtype, w_dtype in [
        (torch.bfloat16, torch.float32, None),
        (torch.float32, torch.bfloat16, None),
        (torch.float32, torch.float32, torch.float64),
        (torch.float16, torch.float64, None),
    ]:
        x = torch.randn(3, 4, dtype=x_dtype).to(device)
        t = torch.rand(3, 4, dtype=t_dtype).to(device)
        w = torch.rand(4, dtype=w_dtype).to(device) if w_dtype else None
        ours, theirs = xent.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w)
        assert ours.dtype == theirs.dtype


def test_worked_example_weight_and_smoothing(device):
    """docs/torch-semantics.md, "Worked example": weights + label smoothing, whose code (not formula) torch follows."""
    logits = torch.tensor([[1.5, 2.0, 0.5], [1.0, 0.5, 2.5]], device=device)
    targets = torch.tensor([1, 2], device=device)
    loss = xent.cross_entropy(logits, targets, weight=torch.tensor([0.7, 0.2, 0.1], device=device), label_smoothing=0.1)
    assert abs(float(loss) - 0.7722168564796448) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 95.0, -120.0, 800.0, -900.0])
def test_large_and_small_logits_stay_exact(dtype, offset, device):
    """Rows far from zero (where exp(z) over/underflows without a max shift) match torch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 3
    x[1] += offset  # one row shifted far out, the others not: mixed in one chunk
    x[4, 7] += offset  # one logit far out
    x = x.to(dtype)
    y = torch.randint(0, 50, (6,), generator=gen)
    x, y = on(device, x, y)
    for kwargs in (dict(reduction="none"), dict(label_smoothing=0.2, reduction="none")):
        (ours, g_ours), (theirs, g_theirs) = both((x, y), device, **kwargs)
        if dtype == torch.bfloat16:  # torch's own bf16 rounding differs; the float64 formula decides
            theirs = xent.reference.cross_entropy(x, y, **kwargs).to(dtype)
        assert_close(ours, theirs, scale=4.0)
        assert_close(g_ours.float(), g_theirs.float(), torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)


@pytest.mark.parametrize("c", [200, 300])
def test_uint8_targets_compare_as_int64(c, device):
    """A uint8 target of 156 is a class, not ignore_index=-100 wrapped to 156; C=300 is not 44."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, c, generator=gen)
    t = torch.tensor([156, 1, 199, 44], dtype=torch.uint8)
    small = torch.randn(2, 100, generator=gen)
    x, t = on(device, x, t)
    for fn_ours, fn_torch in ((xent.cross_entropy, F.cross_entropy), (xent.nll_loss, F.nll_loss)):
        assert_close(fn_ours(x, t, reduction="none"), fn_torch(x, t, reduction="none"))
    assert_close(xent.linear_cross_entropy(x, torch.eye(c, device=device), t), F.cross_entropy(x, t.long()))
    if device.type == "cpu":  # on a GPU a bad target is a device-side assert (as torch's), which ends the process
        with pytest.raises(IndexError, match="Target 156"):
            xent.cross_entropy(small, torch.tensor([156, 1], dtype=torch.uint8))
