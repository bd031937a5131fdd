"""The per-call backend choice (`backend=`) of every loss: it overrides XENT_BACKEND, reaches the kernels on
the eager and the traced route alike, and is checked like any other argument."""

from __future__ import annotations

import pytest
import torch

import xent
from xent.kernels import backends


class CountingBackend(backends.TorchBackend):
    """The torch backend under another name, counting the chunk steps it is handed."""

    def __init__(self, name: str):
        self.name = name
        self.chunks = 0

    def chunk(self, step):
        self.chunks += 1
        super().chunk(step)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.delenv("XENT_BACKEND", raising=False)
    backend = backends.register(CountingBackend("counting"))
    yield backend
    backends.unregister("counting")


def _head(seed=0, n=12, h=8, v=40):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    head = torch.randn(v, h, generator=gen, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=gen)
    target[3] = -100
    return hidden, head, target


CALLS = {
    "linear_cross_entropy": lambda h, w, y, **kw: xent.linear_cross_entropy(h, w, y, label_smoothing=0.1, **kw),
    "LinearCrossEntropyLoss": lambda h, w, y, **kw: _module_loss(h, w, y, **kw),
    "token_logprobs": lambda h, w, y, **kw: xent.token_logprobs(h, w, y, temperature=0.7, return_entropy=True, **kw)[
        1
    ].sum(),
}


def _module_loss(h, w, y, backend=None):
    module = xent.LinearCrossEntropyLoss(h.shape[1], w.shape[0], backend=backend)
    with torch.no_grad():
        module.linear.weight.copy_(w)
    return module(h, y)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_chosen_backend_computes_forward_and_backward(name, counting):
    h, w, y = _head()
    expected = CALLS[name](h, w, y)
    expected_grad = torch.autograd.grad(expected, h)[0]
    got = CALLS[name](h, w, y, backend="counting")
    forward_chunks = counting.chunks
    assert forward_chunks > 0, "the chosen backend was not asked for a single chunk"
    got_grad = torch.autograd.grad(got, h)[0]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
    if name == "token_logprobs":  # its backward recomputes the chunks, with the same backend
        assert counting.chunks > forward_chunks


@pytest.mark.compile
def test_the_choice_reaches_the_kernels_through_the_traced_op(counting):
    """The option is a field of the problem, so the declared custom op carries it with no list of its own."""
    h, w, y = _head(1)
    compiled = torch.compile(
        lambda h, w, y: xent.linear_cross_entropy(h, w, y, reduction="none", backend="counting").sum(),
        backend="aot_eager",
        fullgraph=True,
    )
    loss = compiled(h, w, y)
    forward_chunks = counting.chunks
    assert forward_chunks > 0
    loss.backward()
    assert counting.chunks > forward_chunks  # 'none': the backward op recomputes the chunks, same backend
    torch.testing.assert_close(loss, xent.linear_cross_entropy(h, w, y, reduction="none").sum())


@pytest.mark.triton
def test_the_argument_overrides_the_environment(monkeypatch):
    """XENT_BACKEND=triton (the Triton interpreter on CPU in the tests) is overridden by backend='torch'."""
    pytest.importorskip("triton")
    monkeypatch.setenv("XENT_BACKEND", "triton")
    calls = []
    original = backends.TRITON.cross_entropy_driver

    def spy(problem):
        calls.append(problem.options.backend)
        return original(problem)

    monkeypatch.setattr(backends.TRITON, "cross_entropy_driver", spy)
    x, y = torch.randn(5, 7), torch.tensor([0, 6, 2, -100, 3])
    default = xent.cross_entropy(x, y)
    assert calls == [None]  # the environment's choice
    torch.testing.assert_close(xent.cross_entropy(x, y, backend="torch"), default)
    torch.testing.assert_close(xent.CrossEntropyLoss(backend="torch")(x, y), default)
    assert calls == [None]  # the torch backend was asked, not Triton


@pytest.mark.parametrize(
    "call",
    [
        lambda b: xent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), backend=b),
        lambda b: xent.linear_cross_entropy(torch.randn(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 2]), backend=b),
        lambda b: xent.token_logprobs_from_logits(torch.randn(3, 4), torch.tensor([0, 1, 2]), backend=b),
        lambda b: xent.linear_distillation_loss(
            torch.randn(3, 2), torch.randn(4, 2), xent.TeacherLogits(torch.randn(3, 4)), backend=b
        ),
    ],
)
def test_unknown_and_malformed_choices_raise(call):
    with pytest.raises(ValueError, match="backend"):
        call("cuda")
    with pytest.raises(TypeError, match="backend"):
        call(1)
    call("TORCH")  # names are case-insensitive, as XENT_BACKEND
    call("auto")


def test_modules_show_their_backend():
    assert "backend='torch'" in repr(xent.CrossEntropyLoss(backend="torch"))
    assert "backend" not in repr(xent.CrossEntropyLoss())


def test_distillation_needs_no_triton_for_its_row_math(monkeypatch):
    """XENT_BACKEND=triton where Triton cannot run: the distillation row math is the torch backend's on
    every backend, so the forward pass works (the backward's upstream scaling is a Triton kernel, which
    does raise there)."""
    monkeypatch.setenv("XENT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w = torch.randn(5, 4), torch.randn(9, 4)
    teacher = xent.TeacherLogits(torch.randn(5, 9))
    expected = xent.linear_distillation_loss(h, w, teacher, backend="torch")
    torch.testing.assert_close(xent.linear_distillation_loss(h, w, teacher), expected)
    torch.testing.assert_close(xent.linear_distillation_loss(h, w, teacher, reduction="none").mean(), expected)


@pytest.mark.parametrize("budget", [0, -1])
def test_a_memory_budget_must_be_positive(budget):
    h, w, y = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 5])
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        xent.linear_cross_entropy(h, w, y, memory_budget=budget)
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        xent.token_logprobs(h, w, y, return_entropy=True, memory_budget=budget)
