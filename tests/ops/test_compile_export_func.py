"""xent inside the tools users wrap around a loss: torch.compile(fullgraph=True), torch.export,
torch.func transforms, torch.library.opcheck and saved-tensor hooks.

Every case compares with eager xent (and, where torch has the same loss, with torch under the same tool).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch.func import grad, hessian, jacfwd, jacrev, vjp, vmap
from torch.library import opcheck

import xent
from xent.ops.cross_entropy import CROSS_ENTROPY, SCALE_GRAD, ScaleGrad
from xent.ops.declare import Upstream
from xent.ops.linear import LINEAR_CROSS_ENTROPY, LinearCall, recomputes_in_backward
from xent.problems import LinearProblem, Options, make_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _data(seed=0, n=6, c=10, h=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype).to(DEVICE)
    target = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    target[0] = -100
    return hidden, target


def _head(c=10, h=8, bias=True, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Linear(h, c, bias=bias).to(DEVICE)


LOSSES = {
    "cross_entropy": lambda m, hdn, y: xent.cross_entropy(m(hdn), y, label_smoothing=0.1, z_loss=1e-3),
    "cross_entropy none": lambda m, hdn, y: (
        xent.cross_entropy(m(hdn), y, reduction="none", softcap=5.0) * torch.arange(hdn.shape[0], device=hdn.device)
    ).sum(),
    "CrossEntropyLoss weighted": lambda m, hdn, y: xent.CrossEntropyLoss(
        weight=torch.linspace(0.5, 2, 10, device=hdn.device), reduction="sum"
    )(m(hdn), y),
    "probabilities": lambda m, hdn, y: xent.cross_entropy(m(hdn), torch.softmax(hdn.flip(0) @ m.weight.T.detach(), 1)),
    "K-dim": lambda m, hdn, y: xent.cross_entropy(m(hdn).T.unsqueeze(0), y.unsqueeze(0)),
    "nll_loss": lambda m, hdn, y: xent.nll_loss(torch.log_softmax(m(hdn), 1), y),
    "NLLLoss": lambda m, hdn, y: xent.NLLLoss(reduction="sum")(torch.log_softmax(m(hdn), 1), y),
    "linear_cross_entropy": lambda m, hdn, y: xent.linear_cross_entropy(
        hdn, m.weight, y, linear_bias=m.bias, label_smoothing=0.1
    ),
    "linear none": lambda m, hdn, y: (
        xent.linear_cross_entropy(hdn, m.weight, y, linear_bias=m.bias, reduction="none").pow(2).sum()
    ),
}


def _loss_and_grads(fn, m, hdn, y):
    hdn = hdn.clone().requires_grad_()
    loss = fn(m, hdn, y)
    grads = torch.autograd.grad(loss, [hdn, *m.parameters()])
    return loss.detach(), grads


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend,dynamic", [("inductor", False), ("inductor", True), ("aot_eager", True)])
@pytest.mark.compile
def test_compile_fullgraph_equals_eager(name, backend, dynamic):
    torch._dynamo.reset()
    m = _head()
    hdn, y = _data()
    fn = LOSSES[name]
    expected, expected_grads = _loss_and_grads(fn, m, hdn, y)
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)  # raises on a graph break
    for n in (6, 9):  # a second shape: recompiles (static) or reuses the dynamic graph
        hdn_n, y_n = _data(seed=n, n=n)
        expected, expected_grads = _loss_and_grads(fn, m, hdn_n, y_n)
        loss, grads = _loss_and_grads(compiled, m, hdn_n, y_n)
        assert_close(loss, expected, scale=2)
        for a, e in zip(grads, expected_grads):
            assert_close(a, e, scale=2)


@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.compile
def test_compiled_retain_graph_second_backward(name):
    torch._dynamo.reset()
    m = _head()
    hdn, y = _data()
    compiled = torch.compile(lambda m, h, t: LOSSES[name](m, h, t) * 3.0, fullgraph=True)
    loss = compiled(m, hdn, y)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in m.parameters()]
    loss.backward()
    for p, g in zip(m.parameters(), first):
        assert_close(p.grad, 2 * g)


@pytest.mark.compile
def test_compiled_module_with_xent_loss_has_no_graph_break():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU())
            self.head = torch.nn.Linear(16, 10)
            self.loss = xent.CrossEntropyLoss(label_smoothing=0.05)

        def forward(self, x, y):
            return self.loss(self.head(self.body(x)), y) + xent.linear_cross_entropy(self.body(x), self.head.weight, y)

    torch._dynamo.reset()
    model = Model().to(DEVICE)
    x, y = _data()
    explanation = torch._dynamo.explain(model)(x, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.skipif(DEVICE == "cuda", reason="a device-side assert ends the CUDA context for the whole session")
@pytest.mark.compile
def test_compiled_out_of_range_target_still_raises():
    torch._dynamo.reset()
    m = _head()
    hdn, y = _data()
    y[1] = 10
    compiled = torch.compile(lambda h, t: xent.cross_entropy(m(h), t), fullgraph=True)
    expected = IndexError if DEVICE == "cpu" else RuntimeError
    with pytest.raises(expected):
        compiled(hdn, y)
        torch.cuda.synchronize() if DEVICE == "cuda" else None


@pytest.mark.parametrize(
    "name", ["cross_entropy", "CrossEntropyLoss weighted", "nll_loss", "linear_cross_entropy", "linear none", "K-dim"]
)
@pytest.mark.compile
def test_export_runs_like_eager(name):
    m = _head()
    hdn, y = _data()
    fn = LOSSES[name]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, hdn, y):
            return fn(self.m, hdn, y)

    program = torch.export.export(Wrapped(), (hdn, y))
    assert_close(program.module()(hdn, y), fn(m, hdn, y))
    if name in ("cross_entropy", "linear_cross_entropy"):
        assert "torch.ops.xent." in program.graph_module.code  # the op itself, not its inlined pieces


# torch.func: xent against torch's own losses under the same transform (float64, so the comparison is tight)
X = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([1, -100, 6, 0, 3])
W = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
FUNC_CASES = [dict(), dict(label_smoothing=0.2, weight=W), dict(reduction="none"), dict(reduction="sum", weight=W)]


@pytest.mark.parametrize("kw", FUNC_CASES)
@pytest.mark.parametrize("transform", [grad, jacrev, jacfwd, hessian])
def test_func_transforms_match_torch(kw, transform):
    ours = transform(lambda x: xent.cross_entropy(x, Y, **kw).sum())(X)
    theirs = transform(lambda x: F.cross_entropy(x, Y, **kw).sum())(X)
    assert_close(ours, theirs)


def test_func_vjp_vmap_and_per_sample_gradients():
    y = Y.clamp(min=0)
    out, pullback = vjp(lambda x: xent.cross_entropy(x, y, reduction="none"), X)
    t_out, t_pullback = vjp(lambda x: F.cross_entropy(x, y, reduction="none"), X)
    up = torch.arange(5, dtype=torch.float64)
    assert_close(out, t_out)
    assert_close(pullback(up)[0], t_pullback(up)[0])
    per_sample = vmap(grad(lambda x, t: xent.cross_entropy(x, t, label_smoothing=0.1)))(X, y)
    t_per_sample = vmap(grad(lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1)))(X, y)
    assert_close(per_sample, t_per_sample)
    assert_close(vmap(xent.nll_loss)(torch.log_softmax(X, 1), y), vmap(F.nll_loss)(torch.log_softmax(X, 1), y))


def test_func_linear_cross_entropy():
    h = torch.randn(5, 4, dtype=torch.float64)
    w = torch.randn(7, 4, dtype=torch.float64)
    b = torch.randn(7, dtype=torch.float64)
    ours = grad(lambda w, b: xent.linear_cross_entropy(h, w, Y, linear_bias=b, label_smoothing=0.1), (0, 1))(w, b)
    theirs = grad(lambda w, b: F.cross_entropy(F.linear(h, w, b), Y, label_smoothing=0.1), (0, 1))(w, b)
    for a, e in zip(ours, theirs):
        assert_close(a, e)
    per_token = vmap(lambda hi, yi: xent.linear_cross_entropy(hi, w, yi))(h, Y.clamp(min=0))
    assert_close(per_token, vmap(lambda hi, yi: F.cross_entropy(hi @ w.T, yi))(h, Y.clamp(min=0)))


def _ce_args(x, y, w=None, reduction="mean", ignore_index=-100, eps=0.0, z=0.0, cap=None):
    return (x, y, w, reduction, ignore_index, eps, z, cap, torch.float32 if x.dtype != torch.float64 else x.dtype)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, generator=gen)
    y = torch.randint(0, 9, (6,), generator=gen)
    y[0] = -100
    w = torch.rand(9, generator=gen)
    return [
        _ce_args(x, y),
        _ce_args(x, y, w, "none", -100, 0.1, 0.01, 5.0),
        _ce_args(x.bfloat16(), torch.where(y < 0, 3, y), None, "sum", 3, 0.1),
        _ce_args(x.half(), y, w.half(), "mean", -100, 0.2),
        _ce_args(x.double(), y, w.double(), "mean", -100, 0.3),
        _ce_args(torch.randn(2, 9, 3, generator=gen), torch.randint(0, 9, (2, 3), generator=gen), None, "none"),
        _ce_args(x, torch.rand(6, 9, generator=gen).softmax(1), w, "mean", -100, 0.2),
        _ce_args(x[0], y[2], None, "none"),
    ]


@pytest.mark.parametrize("args", _opcheck_cases())
@pytest.mark.parametrize("statistics", [(), ("lse", "entropy", "z_loss", "argmax")])
@pytest.mark.slow
def test_opcheck_cross_entropy_ops(args, statistics):
    x, y, w, reduction, ignore_index, eps, z, cap, out_dtype = args
    problem = make_problem(x, y, w, Options(reduction, ignore_index, eps, z, cap), out_dtype, statistics)
    opcheck(CROSS_ENTROPY.op, CROSS_ENTROPY.arguments(problem))
    up = torch.rand(() if reduction != "none" or x.dim() == 1 else (x.shape[0], *x.shape[2:]))
    opcheck(CROSS_ENTROPY.backward_overload, CROSS_ENTROPY.backward_arguments(problem, Upstream(up), {"logits": True}))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.slow
def test_opcheck_linear_ops(reduction, dtype):
    gen = torch.Generator().manual_seed(6)
    h, w, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((6, 4), (9, 4), (9,)))
    y = torch.randint(0, 9, (6,), generator=gen)
    cw = torch.rand(9, generator=gen).to(dtype)
    options = Options(reduction, -100, 0.1, 0.01, None)

    def problem(bias, weight, statistics=()):
        return LinearProblem(h, w, bias, y, weight, options, (6,), torch.float32, 0, 4 * 9 * 4, statistics)

    op = LINEAR_CROSS_ENTROPY
    # fp16 with a reduction: forward computes no gradient, backward recomputes with the upstream
    recompute = recomputes_in_backward(reduction, dtype)
    wants = (False,) * 3 if recompute else (True, True, True)
    opcheck(op.op, op.arguments(LinearCall(problem(b, cw), wants, recompute)))
    opcheck(
        op.op,
        op.arguments(LinearCall(problem(None, None, ("lse", "logprob", "entropy", "argmax")), (True, False, False))),
    )
    up = torch.rand(() if reduction != "none" else (6,))
    want = dict(input=True, linear_weight=True, linear_bias=True)
    opcheck(
        op.backward_overload,
        op.backward_arguments(LinearCall(problem(b, cw), wants, recompute), Upstream(up), want),
    )
    opcheck(SCALE_GRAD.op, SCALE_GRAD.arguments(ScaleGrad(torch.randn(6, 9).to(dtype), torch.tensor(2.0), "mean")))


def test_saved_tensor_hooks_see_the_gradient_buffer():
    """Eager: the gradients handed from forward to backward are saved tensors, so offloading hooks see
    and move them (here each is packed as a copy, as an offloading hook would)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 50, generator=gen)
    y = torch.randint(0, 30, (8,), generator=gen)
    head = torch.randn(30, 50, generator=gen)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.clone()

    ours = [t.clone().requires_grad_() for t in (x, head)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = xent.cross_entropy(ours[0], y) + xent.linear_cross_entropy(ours[0], ours[1], y)
    assert (8, 50) in packed and (30, 50) in packed  # the logits' gradient and the head's
    loss.backward()
    ref = [t.clone().requires_grad_() for t in (x, head)]
    (F.cross_entropy(ref[0], y) + F.cross_entropy(ref[0] @ ref[1].T, y)).backward()
    for a, e in zip(ours, ref):
        assert_close(a.grad, e.grad)

    x2 = x.clone().requires_grad_()
    with torch.autograd.graph.save_on_cpu():
        xent.cross_entropy(x2, y).backward()
    assert_close(x2.grad, torch.autograd.grad(F.cross_entropy(ref[0], y), ref[0])[0])
