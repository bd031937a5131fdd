"""The lean memory plan of linear cross-entropy (memory_mode='lean', and 'auto' on the CPU where the fast
plan would keep an fp32 copy of a half-precision weight gradient): the same loss and gradients as the fast
plan for every option, an fp32-accumulated weight gradient no less exact against float64, and its peak
memory beyond the returned gradients measured in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0),
    dict(weight=True, reduction="sum"),
    dict(reduction="none"),
]


def _data(dtype, n=150, h=16, v=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    head = torch.randn(v, h, generator=gen) / h**0.5 * 2
    bias = torch.randn(v, generator=gen)
    target = torch.randint(0, v, (n,), generator=gen)
    target[::7] = -100
    return [t.to(dtype).to(DEVICE) for t in (hidden, head, bias)] + [target.to(DEVICE)]


def _run(mode, h, w, b, y, up, budget, backend, **kw):
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = xent.linear_cross_entropy(
        *params[:2], y, linear_bias=params[2], memory_mode=mode, memory_budget=budget, backend=backend, **kw
    )
    return loss.detach(), torch.autograd.grad(loss, params, up if loss.dim() else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_lean_equals_fast(backend, dtype, options):
    h, w, b, y = _data(dtype)
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = (torch.rand(300, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype).to(DEVICE)
    up = (torch.rand(150, generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE)
    budget = 32 * 300 * 4  # several chunks of rows, and several slabs
    fast_loss, fast = _run("fast", h, w, b, y, up.to(dtype), budget, backend, **kw)
    lean_loss, lean = _run("lean", h, w, b, y, up.to(dtype), budget, backend, **kw)
    assert torch.equal(lean_loss, fast_loss)  # the same forward pass
    tol = torch.float32 if dtype == torch.float32 else dtype
    for name, a, r in zip(("input", "weight", "bias"), lean, fast):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert_close(a, r, tol, msg=name)


def test_lean_weight_gradient_is_no_less_exact_than_fast():
    """bf16 head, many chunks: both accumulate the weight gradient in fp32 over all tokens; against the
    float64 gradient the lean plan's error is within the fast plan's (up to rounding noise)."""
    h, w, b, y = _data(torch.bfloat16, n=600, v=500)
    budget = 64 * 500 * 4
    errors = {}
    ref = [t.double().requires_grad_() for t in (h, w, b)]
    (rw,) = torch.autograd.grad(xent.linear_cross_entropy(ref[0], ref[1], y, linear_bias=ref[2]), ref[1])
    for mode in ("fast", "lean"):
        _, (gi, gw, gb) = _run(mode, h, w, b, y, None, budget, None)
        errors[mode] = (gw.double() - rw).abs().max().item()
    assert errors["lean"] <= 1.25 * errors["fast"] + 1e-6, errors


def test_auto_takes_the_lean_plan_on_cpu_where_fast_would_keep_an_accumulator():
    from xent.kernels.linear import lean_plan
    from xent.validation.cross_entropy import linear_cross_entropy_problem

    def problem(dtype, budget, mode="auto"):
        h, w, b, y = _data(dtype)
        args = (h, w, y, b, None, "mean", None, 0.0, 0.0, None, None, budget, None)
        return linear_cross_entropy_problem(*args, memory_mode=mode)[0]

    want = (True, True, True)
    on_cpu = DEVICE == "cpu"
    assert lean_plan(problem(torch.bfloat16, 32 * 300 * 4), want) == on_cpu
    assert not lean_plan(problem(torch.bfloat16, None), want)  # one chunk: no accumulator
    assert not lean_plan(problem(torch.float32, 32 * 300 * 4), want)  # fp32: accumulates in the result
    assert lean_plan(problem(torch.float32, None, "lean"), want)
    assert not lean_plan(problem(torch.bfloat16, 32 * 300 * 4, "fast"), want)
    assert not lean_plan(problem(torch.bfloat16, 32 * 300 * 4), (True, False, False))  # no head gradient


def test_a_bad_memory_mode_is_a_clear_error():
    h, w, b, y = _data(torch.float32)
    with pytest.raises(ValueError, match="memory_mode"):
        xent.linear_cross_entropy(h, w, y, memory_mode="tiny")


def test_rl_log_probabilities_take_the_lean_plan_too():
    h, w, b, y = _data(torch.bfloat16)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = xent.token_logprobs(
        *params[:2], y, linear_bias=params[2], return_entropy=True, memory_budget=32 * 300 * 4
    )
    grads = torch.autograd.grad(logp.sum() + 0.1 * entropy.sum(), params)
    ref = [t.detach().double().requires_grad_() for t in params]
    rl, re = xent.token_logprobs(*ref[:2], y, linear_bias=ref[2], return_entropy=True)
    ref_grads = torch.autograd.grad(rl.sum() + 0.1 * re.sum(), ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g.double(), r, torch.bfloat16, scale=4)


_PROBE = """
import json, sys, torch, xent
from xent.bench import peak_growth_of
n, h, v, dtype, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4]), sys.argv[5]
gen = torch.Generator().manual_seed(0)
x = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
w = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).requires_grad_()
y = torch.randint(0, v, (n,), generator=gen)
def step():
    return torch.autograd.grad(xent.linear_cross_entropy(x, w, y, memory_mode=mode), (x, w))
step()
grads = []
peak, exact = peak_growth_of(lambda: grads.extend(step()), "cpu")
print(json.dumps({"peak": peak, "grads": sum(g.numel() * g.element_size() for g in grads),
                  "logits": n * v * x.element_size(), "exact": exact}))
"""

# glibc returns every buffer above 64 KiB to the system when it is freed, so the resident set's
# high-water mark counts each allocation of the measured step instead of reusing the warm-up's
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def probe_peaks(probe: str, args: list, modes) -> dict:
    """{mode: extra memory beyond the returned gradients, in logits' bytes}, each in a fresh process."""
    out = {}
    env = {**os.environ, **EXACT_MALLOC}
    for mode in modes:
        run = subprocess.run([sys.executable, "-c", probe, *args, mode], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        r = json.loads(run.stdout)
        if not r["exact"]:
            pytest.skip("this kernel cannot reset the resident-set high-water mark")
        out[mode] = (r["peak"] - r["grads"]) / r["logits"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, shape",
    [
        ("bfloat16", ("2048", "1024", "32768")),  # the filer's case
        ("float32", ("2048", "1024", "32768")),
        ("float16", ("1024", "512", "16384")),  # smaller: a CPU's fp16 GEMMs run at ~1 GFLOP/s
    ],
)
def test_peak_memory_beyond_the_gradients(dtype, shape):
    """lean <= 0.1x the logits beyond the returned gradients, every accumulator counted; the fast plan's
    fp32 weight-gradient copy alone is 1.0x (bf16)."""
    if DEVICE != "cpu":
        pytest.skip("resident-set measurement: the CPU")
    extra = probe_peaks(_PROBE, [*shape, dtype], ("fast", "lean") if dtype == "bfloat16" else ("lean",))
    assert extra["lean"] <= 0.1, extra
    if "fast" in extra:
        assert extra["fast"] >= 0.9, extra


def test_the_module_and_token_logprobs_take_memory_mode():
    h, w, b, y = _data(torch.bfloat16)
    module = xent.LinearCrossEntropyLoss(16, 300, memory_mode="lean", dtype=torch.bfloat16, device=DEVICE)
    assert "memory_mode='lean'" in repr(module)
    with torch.no_grad():
        module.linear.weight.copy_(w)
    loss = module(h, y)
    (gw,) = torch.autograd.grad(loss, module.linear.weight)
    w2 = w.clone().requires_grad_()
    (ref,) = torch.autograd.grad(xent.linear_cross_entropy(h, w2, y, memory_mode="fast"), w2)
    assert_close(gw, ref, torch.bfloat16)
    with pytest.raises(ValueError, match="memory_mode"):
        xent.LinearCrossEntropyLoss(16, 300, memory_mode="small")(h.float(), y)
    grads = {}
    for mode in ("fast", "lean"):
        w3 = w.clone().requires_grad_()
        logp = xent.token_logprobs(h, w3, y, memory_mode=mode, memory_budget=32 * 300 * 4)
        (grads[mode],) = torch.autograd.grad(logp.sum(), w3)
    assert_close(grads["lean"], grads["fast"], torch.bfloat16)
    with pytest.raises(ValueError, match="memory_mode"):
        xent.token_logprobs(h, w, y, memory_mode="small")
