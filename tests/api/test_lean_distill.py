"""The lean memory plan of the linear distillation losses (memory_mode='lean', and 'auto' on the CPU
where the fast plan would keep an fp32 copy of a half-precision weight gradient): the row pass records
each row's log-sum-exps (and the reverse KL's or JSD's row term), then vocabulary slabs compute the head's
gradient from them. The same loss and gradients as the fast plan for every divergence and teacher form,
exact against float64, and peak memory beyond the returned gradients measured in a fresh process."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close
from test_lean_linear import DEVICE, probe_peaks

from xent.distill import LinearDistillationLoss, TeacherHead, TeacherLogits, TeacherTopK, linear_distillation_loss

N, H, V, HT = 70, 16, 90, 24
CASES = [
    (div, kind)
    for div, kind in itertools.product(("kl", "reverse_kl", "jsd"), ("head", "logits", "topk"))
    if kind != "topk" or div == "kl"
]


def _data(dtype, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen) / H**0.5 * 2
    b = torch.randn(V, generator=gen)
    target = torch.randint(0, V, (N,), generator=gen)
    target[::6] = -100
    if kind == "head":
        bias = torch.randn(V, generator=gen)
        bias[5] = -float("inf")  # a masked-out class
        teacher = TeacherHead(
            *(
                t.to(dtype).to(DEVICE)
                for t in (torch.randn(N, HT, generator=gen), torch.randn(V, HT, generator=gen) / 3, bias)
            )
        )
    elif kind == "logits":
        logits = torch.randn(N, V, generator=gen) * 2
        teacher = TeacherLogits(logits.to(dtype).to(DEVICE))
    else:
        values, indices = torch.log_softmax(torch.randn(N, V, generator=gen) * 2, 1).topk(7, 1)
        teacher = TeacherTopK(indices.to(DEVICE), values.to(dtype).to(DEVICE))
    return [t.to(dtype).to(DEVICE) for t in (x, w, b)] + [target.to(DEVICE), teacher]


def _run(mode, x, w, b, y, teacher, up=None, **kw):
    params = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = linear_distillation_loss(params[0], params[1], teacher, y, linear_bias=params[2], memory_mode=mode, **kw)
    return loss.detach(), torch.autograd.grad(loss, params, up if loss.dim() else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence, kind", CASES)
def test_lean_equals_fast(divergence, kind, reduction, dtype):
    x, w, b, y, teacher = _data(dtype, kind)
    up = (torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(DEVICE)
    kw = dict(divergence=divergence, reduction=reduction, temperature=1.5, beta=0.3, memory_budget=16 * V * 4 * 3)
    fast_loss, fast = _run("fast", x, w, b, y, teacher, up, **kw)  # several chunks of rows, and of classes
    lean_loss, lean = _run("lean", x, w, b, y, teacher, up, **kw)
    assert_close(lean_loss, fast_loss, torch.float32 if dtype == torch.float32 else dtype)
    for name, a, r in zip(("input", "weight", "bias"), lean, fast):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_close(a, r, torch.float32 if dtype == torch.float32 else dtype, msg=name)


@pytest.mark.parametrize("divergence, kind", CASES)
def test_lean_is_exact_against_float64(divergence, kind):
    x, w, b, y, teacher = _data(torch.float64, kind)
    kw = dict(divergence=divergence, temperature=2.0, beta=0.7, memory_budget=16 * V * 8 * 3)
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_kw = {k: v for k, v in kw.items() if k != "memory_budget"}  # the fast plan, in one chunk
    ref_loss = linear_distillation_loss(ref[0], ref[1], teacher, y, linear_bias=ref[2], memory_mode="fast", **ref_kw)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    loss, grads = _run("lean", x, w, b, y, teacher, **kw)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, equal_nan=True)  # reverse KL, a -inf teacher: inf


def test_auto_and_the_module():
    from xent.kernels.distill import lean_plan
    from xent.validation.distill import linear_distillation_problem

    x, w, b, y, teacher = _data(torch.bfloat16, "logits")

    def problem(budget, mode="auto", dtype=torch.bfloat16):
        args = (x.to(dtype), w.to(dtype), "logits", dict(logits=teacher.logits), y, None)
        return linear_distillation_problem(*args, "kl", 0.5, 1.0, -100, "mean", budget, None, memory_mode=mode)[0]

    want = (True, True, True)
    assert lean_plan(problem(16 * V * 4 * 3), want) == (DEVICE == "cpu")
    assert not lean_plan(problem(None), want)  # one chunk: no accumulator
    assert not lean_plan(problem(16 * V * 4 * 3, dtype=torch.float32), want)
    assert lean_plan(problem(None, "lean"), want)
    assert not lean_plan(problem(16 * V * 4 * 3, "fast"), want)
    with pytest.raises(ValueError, match="memory_mode"):
        linear_distillation_loss(x, w, teacher, y, memory_mode="small")
    criterion = LinearDistillationLoss(memory_mode="lean", memory_budget=16 * V * 4 * 3)
    params = [t.clone().requires_grad_() for t in (x, w)]
    grads = torch.autograd.grad(criterion(params[0], params[1], teacher, y), params)
    ref_params = [t.clone().requires_grad_() for t in (x, w)]
    ref = torch.autograd.grad(
        linear_distillation_loss(ref_params[0], ref_params[1], teacher, y, memory_mode="fast"), ref_params
    )
    for g, r in zip(grads, ref):
        assert_close(g, r, torch.bfloat16)


_PROBE = """
import json, sys, torch
from xent.bench import peak_growth_of
from xent.distill import TeacherHead, linear_distillation_loss
n, h, v = (int(a) for a in sys.argv[1:4])
dtype, div, mode = getattr(torch, sys.argv[4]), sys.argv[5], sys.argv[6]
gen = torch.Generator().manual_seed(0)
x = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
w = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).requires_grad_()
teacher = TeacherHead(torch.randn(n, 256, generator=gen).to(dtype), (torch.randn(v, 256, generator=gen) / 16).to(dtype))
def step():
    return torch.autograd.grad(linear_distillation_loss(x, w, teacher, divergence=div, memory_mode=mode), (x, w))
step()
grads = []
peak, exact = peak_growth_of(lambda: grads.extend(step()), "cpu")
print(json.dumps({"peak": peak, "grads": sum(g.numel() * g.element_size() for g in grads),
                  "logits": n * v * x.element_size(), "exact": exact}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_peak_memory_beyond_the_gradients(divergence):
    """bf16, N=2048, H=1024, V=32768, a teacher head: lean <= 0.1x the student's logits beyond the returned
    gradients (every workspace and accumulator counted); the fast plan keeps more than 2x."""
    if DEVICE != "cpu":
        pytest.skip("resident-set measurement: the CPU")
    extra = probe_peaks(_PROBE, ["2048", "1024", "32768", "bfloat16", divergence], ("fast", "lean"))
    assert extra["lean"] <= 0.1, extra
    assert extra["fast"] >= 1.0, extra
