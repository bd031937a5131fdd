"""Answers that are infinite in exact arithmetic come back infinite, as torch gives them (issue 20, items 5-6).

- An infinite class weight with label smoothing: torch's smoothing term is weight * (-log p) summed over the
  classes, so an infinite weight makes the loss +inf (never NaN), on every backend and on the fused-linear path.
- Reverse KL (and JSD with beta=1, which is the reverse KL) of a student with mass where the teacher has
  none (a teacher logit of -inf) is +inf, even where the student's fp32 probability underflows to 0 while its
  log-probability stays finite: the test is on the log, never on the probability.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import on

import xent
from xent.distill import TeacherLogits, linear_distillation_loss

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


def _weighted_smoothed_case():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3, 4, 1])
    weight = torch.tensor([1.0, math.inf, 0.5, 2.0, 1.0], dtype=torch.float64)
    return x, target, weight


def _same_non_finite_pattern(ours, theirs):
    """Equal where both are finite (to float64 precision) and the same inf/-inf/NaN elsewhere."""
    assert ours.shape == theirs.shape
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), (ours, theirs)
    assert torch.equal(torch.isposinf(ours), torch.isposinf(theirs)), (ours, theirs)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), (ours, theirs)
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_infinite_class_weight_with_label_smoothing_is_inf(backend, reduction, device):
    x, target, weight = on(device, *_weighted_smoothed_case())
    for dtype in (torch.float64, torch.float32):
        xs = x.to(dtype)
        ours = xent.cross_entropy(
            xs, target, weight=weight.to(dtype), label_smoothing=0.1, reduction=reduction, backend=backend
        )
        theirs = F.cross_entropy(xs, target, weight=weight.to(dtype), label_smoothing=0.1, reduction=reduction)
        if reduction != "mean":  # torch's mean divides inf by an inf total weight: NaN, and so do we
            assert torch.isinf(theirs).any()
        _same_non_finite_pattern(ours.double(), theirs.double())


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_infinite_class_weight_with_label_smoothing_gradient(reduction, device):
    """The gradient of an infinite loss is torch's too: inf/NaN exactly where torch has them."""
    x, target, weight = on(device, *_weighted_smoothed_case())
    grads = []
    for fn in (xent.cross_entropy, F.cross_entropy):
        leaf = x.clone().requires_grad_()
        fn(leaf, target, weight=weight, label_smoothing=0.1, reduction=reduction).sum().backward()
        grads.append(leaf.grad)
    _same_non_finite_pattern(*grads)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_linear_cross_entropy_infinite_class_weight_with_label_smoothing(reduction, device):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    _, target, weight = _weighted_smoothed_case()
    h, w, target, weight = on(device, h, w, target, weight)
    ours = xent.linear_cross_entropy(h, w, target, weight=weight, label_smoothing=0.1, reduction=reduction)
    theirs = F.cross_entropy(h @ w.T, target, weight=weight, label_smoothing=0.1, reduction=reduction)
    assert torch.isinf(theirs).any()
    _same_non_finite_pattern(ours, theirs)


def _forbidden_class_case(gap, device):
    """One token whose teacher forbids class 0 (logit -inf) while the student gives it a logit `gap` below
    the rest: fp32 exp(-gap) underflows for gap >= ~104 but its log-probability is a finite -gap."""
    h = torch.tensor([[1.0, 0.0, 0.0]])
    w = torch.zeros(3, 3)
    w[1, 0] = w[2, 0] = gap  # student logits: [0, gap, gap]
    teacher = torch.tensor([[-math.inf, 0.0, 0.0]])
    return on(device, h, w, teacher)


@pytest.mark.parametrize("gap", [50.0, 120.0])
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 1.0)])
def test_reverse_kl_of_a_forbidden_class_is_inf(gap, divergence, beta, device):
    h, w, teacher = _forbidden_class_case(gap, device)
    loss = linear_distillation_loss(h, w, TeacherLogits(teacher), divergence=divergence, beta=beta, reduction="sum")
    assert loss.item() == math.inf


@pytest.mark.parametrize("gap", [50.0, 120.0])
def test_reverse_kl_of_a_forbidden_class_is_inf_under_torch_func(gap, device):
    """torch.func transforms take the materialized-logits formula: the same answer there."""
    h, w, teacher = _forbidden_class_case(gap, device)

    def loss(w_):
        return linear_distillation_loss(h, w_, TeacherLogits(teacher), divergence="reverse_kl", reduction="sum")

    _, value = torch.func.grad_and_value(loss)(w)
    assert value.item() == math.inf
    batched = torch.func.vmap(lambda w_: loss(w_))(w.unsqueeze(0).expand(2, 3, 3))
    assert (batched == math.inf).all()


def test_reverse_kl_finite_where_the_teacher_allows_the_class(device):
    """The same student against a teacher that allows every class: finite (the +inf is the forbidden mass)."""
    h, w, _ = _forbidden_class_case(120.0, device)
    teacher = on(device, torch.tensor([[-5.0, 0.0, 0.0]]))
    loss = linear_distillation_loss(h, w, TeacherLogits(teacher), divergence="reverse_kl", reduction="sum")
    assert math.isfinite(loss.item())
