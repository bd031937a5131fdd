"""Token log-probabilities and entropies for RL: against log_softmax(logits / T) in float64, forward and
backward, with ignored tokens, every backend, and within the memory bound."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_close

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


def _reference(h, w, b, y, temperature, ignore_index=-100):
    """float64 log_softmax(logits / T).gather(...) and -(p * log p).sum(), 0 on ignored tokens."""
    logits = (h.double() @ w.double().T + (b.double() if b is not None else 0)) / temperature
    logp = torch.log_softmax(logits, -1)
    valid = y != ignore_index
    chosen = logp.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, chosen, 0), torch.where(valid, entropy, 0)


def _data(dtype, seed=0, shape=(3, 5), hidden=8, vocab=40, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    b = torch.randn(vocab, generator=gen) if bias else None
    y = torch.randint(0, vocab, shape, generator=gen)
    y.view(-1)[::4] = -100
    cast = [t.to(dtype).to(DEVICE) if t is not None else None for t in (h, w, b)]
    return (*cast, y.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("bias", [True, False])
def test_token_logprobs_and_entropy_match_the_formulas(monkeypatch, backend, dtype, temperature, bias):
    monkeypatch.setenv("XENT_BACKEND", backend)
    h, w, b, y = _data(dtype, bias=bias)
    params = [t.clone().requires_grad_() for t in (h, w, b) if t is not None]
    ref_params = [t.detach().double().requires_grad_() for t in params]
    logp, entropy = xent.token_logprobs(
        params[0],
        params[1],
        y,
        linear_bias=params[2] if bias else None,
        temperature=temperature,
        return_entropy=True,
        memory_budget=4 * 40 * 4,
    )
    ref_logp, ref_entropy = _reference(*ref_params[:2], ref_params[2] if bias else None, y, temperature)
    tol = torch.float64 if dtype == torch.float64 else (torch.float32 if dtype == torch.float32 else dtype)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(logp.double(), ref_logp, tol, scale=4)
    assert_close(entropy.double(), ref_entropy, tol, scale=4)
    gen = torch.Generator().manual_seed(1)
    advantages, coef = torch.randn(y.shape, generator=gen).to(DEVICE), 0.3
    objective = (logp * advantages.to(logp.dtype)).sum() + coef * entropy.sum()
    ref_objective = (ref_logp * advantages.double()).sum() + coef * ref_entropy.sum()
    for got, want in zip(torch.autograd.grad(objective, params), torch.autograd.grad(ref_objective, ref_params)):
        assert_close(got.double(), want, tol, scale=8)
    ignored = y == -100
    assert torch.all(logp[ignored] == 0) and torch.all(entropy[ignored] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_from_logits(temperature):
    h, w, b, y = _data(torch.float64)
    logits = (h @ w.T + b).requires_grad_()
    before = logits.detach().clone()
    logp, entropy = xent.token_logprobs_from_logits(logits, y, temperature=temperature, return_entropy=True)
    assert torch.equal(logits.detach(), before)  # the caller's logits are never modified
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logp, ref_entropy = _reference(
        ref_logits, torch.eye(40, dtype=torch.float64, device=DEVICE), None, y, temperature
    )
    assert_close(logp, ref_logp)
    assert_close(entropy, ref_entropy)
    up = torch.randn(y.shape, dtype=torch.float64).to(DEVICE)
    (g,) = torch.autograd.grad((logp * up).sum() + entropy.sum(), logits)
    (ref_g,) = torch.autograd.grad((ref_logp * up).sum() + ref_entropy.sum(), ref_logits)
    assert_close(g, ref_g)


def test_without_entropy_only_log_probabilities_and_a_bounded_workspace(monkeypatch):
    """The log-probabilities go through the fused linear loss: its chunk workspace is the only
    vocabulary-sized buffer (here at most 8 rows x V of fp32 at a time)."""
    from xent.kernels import linear as linear_kernels

    seen = []
    original = linear_kernels.linear_pass

    def spy(p, *a, **k):
        seen.append(linear_kernels.rows_per_chunk(p))
        return original(p, *a, **k)

    monkeypatch.setattr(linear_kernels, "linear_pass", spy)
    h, w, b, y = _data(torch.float32, shape=(64,), vocab=300)
    out = xent.token_logprobs(h, w.requires_grad_(), y, linear_bias=b, memory_budget=8 * 300 * 4)
    assert out.shape == y.shape and seen and max(seen) == 8
    out.sum().backward()


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_must_be_positive(temperature):
    h, w, b, y = _data(torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        xent.token_logprobs(h, w, y, temperature=temperature)


def test_entropy_alone_and_log_probabilities_alone_are_differentiable():
    """Backward gets None for an output that is not used: the other's gradient alone."""
    h, w, b, y = _data(torch.float64)
    for pick in (0, 1):
        params = [t.clone().requires_grad_() for t in (h, w, b)]
        out = xent.token_logprobs(params[0], params[1], y, linear_bias=params[2], return_entropy=True)[pick]
        ref_h, ref_w, ref_b = (t.detach().clone().requires_grad_() for t in params)
        ref_out = _reference(ref_h, ref_w, ref_b, y, 1.0)[pick]
        got = torch.autograd.grad(out.sum(), params)
        want = torch.autograd.grad(ref_out.sum(), (ref_h, ref_w, ref_b))
        for g, r in zip(got, want):
            assert_close(g, r)


@pytest.mark.compile
def test_token_logprobs_under_compile_and_torch_func():
    h, w, b, y = _data(torch.float32)
    params = [t.clone().requires_grad_() for t in (h, w, b)]

    def objective(h, w, b):
        logp, entropy = xent.token_logprobs(h, w, y, linear_bias=b, temperature=0.8, return_entropy=True)
        return (logp * 0.5).sum() + 0.1 * entropy.sum()

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*params), params)
    want = torch.autograd.grad(objective(*params), params)
    for g, r in zip(got, want):
        assert_close(g, r)
    # torch.func: the formulas
    g_func = torch.func.grad(objective, argnums=(0, 1, 2))(*[t.detach() for t in params])
    for g, r in zip(g_func, want):
        assert_close(g, r, scale=4)

    logits = (h @ w.T + b).requires_grad_()

    def from_logits(z):
        logp, entropy = xent.token_logprobs_from_logits(z, y, return_entropy=True)
        return logp.sum() + entropy.sum()

    compiled_logits = torch.compile(from_logits, fullgraph=True, backend="aot_eager")
    assert_close(
        torch.autograd.grad(compiled_logits(logits), logits)[0], torch.autograd.grad(from_logits(logits), logits)[0]
    )


def test_opcheck_token_ops():
    from torch.library import opcheck

    from xent.ops.rl import LINEAR_TOKEN_LOGPROBS, TOKEN_LOGPROBS_FROM_LOGITS, TOKEN_STATISTICS, TokenUpstreams
    from xent.problems import LinearProblem, Options, make_problem

    h, w, b, y = _data(torch.float32)
    rows = h.reshape(-1, h.shape[-1])
    flat = y.reshape(-1)
    n = flat.shape[0]

    def linear(budget):
        return LinearProblem(rows, w, b, flat, None, Options("none"), (n,), torch.float32, 0, budget, TOKEN_STATISTICS)

    op = LINEAR_TOKEN_LOGPROBS
    opcheck(op.op, op.arguments(linear(None)))
    up = torch.randn(n).to(DEVICE)
    want = dict(input=True, linear_weight=True, linear_bias=True)
    opcheck(op.backward_overload, op.backward_arguments(linear(3 * 40 * 4), TokenUpstreams(up, up * 2), want))
    problem = make_problem(rows @ w.T, flat, None, Options("none"), torch.float32, TOKEN_STATISTICS)
    op = TOKEN_LOGPROBS_FROM_LOGITS
    opcheck(op.op, op.arguments(problem))
    opcheck(op.backward_overload, op.backward_arguments(problem, TokenUpstreams(up, up * 2), {"logits": True}))


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if importlib.util.find_spec("triton") else []))
@pytest.mark.parametrize("return_entropy", [False, True])
def test_token_logprobs_softcap_then_temperature_equal_float64(backend, return_entropy):
    """softcap caps the logits, then the temperature divides them: values and gradients of the formula."""
    gen = torch.Generator().manual_seed(3)
    h, w, b = (
        torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True) for s in ((7, 5), (11, 5), (11,))
    )
    y = torch.randint(0, 11, (7,), generator=gen)
    y[2] = -100
    z = 2.0 * torch.tanh(torch.nn.functional.linear(h, w, b) / 2.0) / 0.7
    logp = z.log_softmax(-1)
    valid = y != -100
    ref = (logp.gather(1, y.clamp(min=0)[:, None])[:, 0] * valid, -(logp.exp() * logp).sum(-1) * valid)
    out = xent.token_logprobs(
        h, w, y, linear_bias=b, temperature=0.7, softcap=2.0, return_entropy=return_entropy, backend=backend
    )
    out = out if return_entropy else (out,)
    ups = [torch.randn(7, generator=gen, dtype=torch.float64) for _ in out]
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out, ups)), (h, w, b))
    want_grads = torch.autograd.grad(sum((r * u).sum() for r, u in zip(ref, ups)), (h, w, b))
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want)
