"""What RL frameworks ask of the head: per-token temperatures, sum p^2 and the mean logit as statistics,
entropy without its gradient, the top-k tokens from the hidden states, and verl's and OpenRLHF's own
formulas (reimplemented here from their sources, not imported) matched by the xent forms the docs show."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from helpers import assert_close

import xent
import xent.integrations.verl as xent_verl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


def _data(dtype, seed=0, shape=(3, 5), hidden=8, vocab=40, bias=True, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    b = torch.randn(vocab, generator=gen) if bias else None
    y = torch.randint(0, vocab, shape, generator=gen)
    if ignore:
        y.view(-1)[::4] = -100
    cast = [t.to(dtype).to(DEVICE) if t is not None else None for t in (h, w, b)]
    return (*cast, y.to(DEVICE))


def _formulas(logits, y, temperature, softcap=None, ignore_index=-100):
    """float64 log_softmax(softcap(z) / T)[y] and its entropy, T a number or broadcasting to y (per token)."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    t = temperature.double().expand(y.shape).unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    logp = torch.log_softmax(z / t, -1)
    valid = y != ignore_index
    chosen = logp.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, chosen, 0), torch.where(valid, entropy, 0)


def _tolerance(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Per-token temperatures


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t_shape", ["per token", "per sequence", "0-d"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_per_token_temperature_from_a_head(backend, dtype, t_shape, softcap):
    """Each row's logits (after the cap) over its own temperature, forward and backward of both outputs,
    against float64 formulas (half-precision heads too: their logits are the GEMM's fp32 accumulator, by
    default never rounded to bf16)."""
    h, w, b, y = _data(dtype)
    gen = torch.Generator().manual_seed(1)
    shape = {"per token": (3, 5), "per sequence": (3, 1), "0-d": ()}[t_shape]
    temperature = (torch.rand(shape, generator=gen) + 0.5).to(DEVICE)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = xent.token_logprobs(
        *params[:2],
        y,
        linear_bias=params[2],
        temperature=temperature,
        softcap=softcap,
        return_entropy=True,
        memory_budget=4 * 40 * 4,  # several chunks
        backend=backend,
    )
    ref_params = [t.detach().to(torch.float64).requires_grad_() for t in params]
    logits = torch.nn.functional.linear(*ref_params).detach()  # the bf16 values' exact products
    ref_logp, ref_entropy = _formulas(logits, y, temperature, softcap)
    tol = _tolerance(dtype)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(logp.double(), ref_logp, tol, scale=8)
    assert_close(entropy.double(), ref_entropy, tol, scale=8)
    up = torch.randn(logp.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((logp * up).sum() + (0.3 * entropy).sum(), params)
    exact_logits = torch.nn.functional.linear(*ref_params)
    ref_logp, ref_entropy = _formulas(exact_logits, y, temperature, softcap)
    ref_grads = torch.autograd.grad((ref_logp * up.double()).sum() + (0.3 * ref_entropy).sum(), ref_params)
    for g, r in zip(grads, ref_grads):
        assert_close(g.double(), r, dtype if dtype != torch.float32 else torch.float32, scale=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_temperature_from_logits(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(2, 6, 33, generator=gen) * 3).to(dtype).to(DEVICE).requires_grad_()
    y = torch.randint(0, 33, (2, 6), generator=gen).to(DEVICE)
    y[0, 1] = -100
    temperature = (torch.rand(2, 1, generator=gen) + 0.5).to(DEVICE)
    logp, entropy = xent.token_logprobs_from_logits(z, y, temperature=temperature, return_entropy=True, backend=backend)
    alone = xent.token_logprobs_from_logits(z, y, temperature=temperature, backend=backend)
    zz = z.detach().double().requires_grad_()
    ref_logp, ref_entropy = _formulas(zz, y, temperature)
    assert_close(logp.double(), ref_logp.detach(), torch.float32, scale=4)
    assert_close(alone.double(), ref_logp.detach(), torch.float32, scale=4)
    assert_close(entropy.double(), ref_entropy.detach(), torch.float32, scale=4)
    up = torch.randn(2, 6, generator=gen).to(DEVICE)
    (g,) = torch.autograd.grad((logp * up).sum() - entropy.sum(), z)
    (r,) = torch.autograd.grad((ref_logp * up.double()).sum() - ref_entropy.sum(), zz)
    assert_close(g.double(), r, dtype, scale=4)


def test_per_token_temperature_gradcheck():
    h, w, b, y = _data(torch.float64, shape=(2, 3), vocab=7, hidden=4)
    temperature = torch.tensor([[0.6], [1.7]], dtype=torch.float64, device=DEVICE)

    def f(h, w, b):
        return xent.token_logprobs(h, w, y, linear_bias=b, temperature=temperature, return_entropy=True)

    assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (h, w, b)])


def test_a_uniform_temperature_tensor_equals_the_number():
    h, w, b, y = _data(torch.float32)
    by_number = xent.token_logprobs(h, w, y, linear_bias=b, temperature=0.7, return_entropy=True)
    by_tensor = xent.token_logprobs(
        h, w, y, linear_bias=b, temperature=torch.full((3, 5), 0.7, device=DEVICE), return_entropy=True
    )
    for a, t in zip(by_number, by_tensor):
        assert_close(a, t, torch.float32)


def test_bad_temperature_tensors_are_clear_errors():
    h, w, b, y = _data(torch.float32)
    with pytest.raises(ValueError, match="positive finite"):
        xent.token_logprobs(h, w, y, temperature=torch.tensor([[1.0], [0.0], [1.0]], device=DEVICE))
    with pytest.raises(ValueError, match="positive finite"):
        xent.token_logprobs_from_logits(h, y, temperature=torch.full((3, 5), float("inf"), device=DEVICE))
    with pytest.raises(ValueError, match="does not broadcast"):
        xent.token_logprobs(h, w, y, temperature=torch.ones(4, device=DEVICE))
    with pytest.raises(TypeError, match="floating point"):
        xent.token_logprobs(h, w, y, temperature=torch.ones(3, 5, dtype=torch.int64, device=DEVICE))


def test_the_temperature_tensor_is_not_modified_and_gets_no_gradient():
    h, w, b, y = _data(torch.float32)
    temperature = (torch.rand(3, 1) + 0.5).to(DEVICE).requires_grad_()
    before = temperature.detach().clone()
    logp = xent.token_logprobs(h.requires_grad_(), w, y, temperature=temperature)
    logp.sum().backward()
    assert temperature.grad is None and torch.equal(temperature.detach(), before)


# ----------------------------------------------------------------------------------------------------
# Entropy without its gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_without_its_gradient(backend):
    """entropy_requires_grad=False: the same values, detached, and the gradient of the log-probabilities
    alone (an entropy that is returned but unused costs no backward term either)."""
    h, w, b, y = _data(torch.float64)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    logp, entropy = xent.token_logprobs(
        *params[:2], y, linear_bias=params[2], return_entropy=True, entropy_requires_grad=False, backend=backend
    )
    _, with_grad = xent.token_logprobs(*params[:2], y, linear_bias=params[2], return_entropy=True, backend=backend)
    assert not entropy.requires_grad and torch.equal(entropy, with_grad.detach())
    grads = torch.autograd.grad(logp.sum(), params)
    alone = xent.token_logprobs(*params[:2], y, linear_bias=params[2], backend=backend)
    expected = torch.autograd.grad(alone.sum(), params)
    for g, e in zip(grads, expected):
        assert_close(g, e, torch.float64)
    z = torch.randn(4, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 9, (4,), device=DEVICE)
    lp, ent = xent.token_logprobs_from_logits(z, t, return_entropy=True, entropy_requires_grad=False, backend=backend)
    assert not ent.requires_grad and lp.requires_grad


# ----------------------------------------------------------------------------------------------------
# sum p^2 and the mean logit as statistics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sum_of_squared_probabilities_and_mean_logit(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    z = (torch.randn(9, 70, generator=gen) * 6).to(dtype).to(DEVICE)
    z[2, :10] = -float("inf")  # a masked part of the vocabulary
    y = torch.randint(10, 70, (9,), generator=gen).to(DEVICE)
    for softcap in (None, 5.0):
        _, stats = xent.cross_entropy(
            z, y, reduction="none", softcap=softcap, return_stats=("sum_sq_probs", "mean_logit"), backend=backend
        )
        ref = xent.reference.token_statistics(z, y, ("sum_sq_probs", "mean_logit"), softcap=softcap)
        assert_close(stats.sum_sq_probs.double(), ref["sum_sq_probs"], _tolerance(dtype))
        finite = ref["mean_logit"].isfinite()
        assert_close(stats.mean_logit.double()[finite], ref["mean_logit"][finite], _tolerance(dtype))
        assert torch.equal(stats.mean_logit[~finite], ref["mean_logit"][~finite].to(stats.mean_logit.dtype))
    h, w, b, t = _data(dtype)
    logp, entropy, stats = xent.token_logprobs(
        h, w, t, linear_bias=b, temperature=0.8, return_entropy=True, return_stats=("sum_sq_probs", "mean_logit")
    )
    logits = torch.nn.functional.linear(h.double(), w.double(), b.double()) / 0.8  # fp32 logits, not rounded
    p = logits.softmax(-1)
    assert_close(stats.sum_sq_probs.double(), (p * p).sum(-1), torch.float32)
    assert_close(stats.mean_logit.double(), logits.mean(-1), torch.float32)
    assert stats.sum_sq_probs.shape == (3, 5) and not stats.sum_sq_probs.requires_grad
    # 1 / V <= sum p^2 <= 1
    assert bool(((stats.sum_sq_probs >= 1 / 40 - 1e-6) & (stats.sum_sq_probs <= 1 + 1e-6)).all())


def test_statistics_without_classes():
    z = torch.empty(3, 0, device=DEVICE)
    _, stats = xent.cross_entropy(
        z, torch.full((3,), -100, device=DEVICE), reduction="none", return_stats=("sum_sq_probs", "mean_logit")
    )
    assert torch.equal(stats.sum_sq_probs, torch.zeros(3, device=DEVICE)) and stats.mean_logit.isnan().all()


# ----------------------------------------------------------------------------------------------------
# Top-k tokens from the hidden states


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [0, 1, 5, 40])
def test_topk_from_hidden_states(dtype, k):
    h, w, b, _ = _data(dtype)
    gen = torch.Generator().manual_seed(4)
    temperature = (torch.rand(3, 1, generator=gen) + 0.5).to(DEVICE)
    for t, cap in ((1.0, None), (0.7, 3.0), (temperature, None)):
        logp, ids = xent.token_topk(h, w, k, linear_bias=b, temperature=t, softcap=cap, memory_budget=2 * 40 * 4)
        # the logits of the head's values in fp32 (bf16 heads: the GEMM's accumulator, not rounded to bf16)
        logits = torch.nn.functional.linear(*(x.to(_tolerance(dtype)) for x in (h, w, b)))
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        logits = logits / (t.unsqueeze(-1) if isinstance(t, torch.Tensor) else t)
        ref = logits.log_softmax(-1)
        assert logp.shape == ids.shape == (3, 5, k) and ids.dtype == torch.int64
        assert logp.dtype == _tolerance(dtype) and not logp.requires_grad
        # the ids' own log-probabilities, and no token outside them more probable than the k-th
        assert_close(logp, ref.gather(-1, ids), _tolerance(dtype))
        if k:
            assert bool((logp[..., :-1] >= logp[..., 1:]).all())
            assert bool((ref.topk(k, -1).values[..., -1] <= logp[..., -1] + 1e-6).all())


def test_topk_errors():
    h, w, b, _ = _data(torch.float32)
    with pytest.raises(RuntimeError, match="between 0 and"):
        xent.token_topk(h, w, 41)
    with pytest.raises(TypeError, match="int"):
        xent.token_topk(h, w, 2.0)
    with pytest.raises(RuntimeError, match="last dimensions"):
        xent.token_topk(h, w[:, :3], 2)


def test_topk_is_a_top_k_teacher():
    """What token_topk returns is what TeacherTopK takes (a teacher head's top-k as a sparse target)."""
    h, w, b, y = _data(torch.float64)
    logp, ids = xent.token_topk(h, w, 40)  # every token: the sparse KL is the dense one
    student = torch.randn(40, 8, dtype=torch.float64, device=DEVICE)
    sparse = xent.linear_distillation_loss(h, student, xent.TeacherTopK(ids, logp))
    dense = xent.linear_distillation_loss(h, student, xent.TeacherHead(h, w))
    assert_close(sparse, dense, torch.float64, scale=4)


# ----------------------------------------------------------------------------------------------------
# verl's fused kernel contract and OpenRLHF's formulas (reimplemented from their sources)


def _verl_reference(hidden, weight, labels, temperature, reduction="none"):
    """verl's tests/utils/test_linear_cross_entropy.py reference: fp32 logits / T, logprobs = -CE,
    entropy = logsumexp - sum p * logits."""
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T
    logits = logits / temperature
    pd = logits.softmax(-1)
    entropy = torch.logsumexp(logits, -1) - (pd * logits).sum(-1)
    logprobs = -torch.nn.functional.cross_entropy(logits, labels.reshape(-1), reduction=reduction)
    return logprobs, entropy


# verl's five test shapes, with the token counts cut for a CPU
VERL_SHAPES = [(37, 3584, 1520), (43, 896, 1519), (30, 2048, 3225), (27, 4096, 1024), (64, 4096, 1024)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", VERL_SHAPES[:3] if DEVICE == "cpu" else VERL_SHAPES)
def test_verl_linear_cross_entropy_matches_verls_reference(shape, reduction, dtype):
    """verl's own tolerances (log-probs atol 1e-3 / rtol 2e-4, entropy 5e-3 / 5e-4, gradients 2e-2 / 4e-2
    for upstreams U(-1, 1) and U(-0.5, 0.5)) at T = 1.5, in verl's (1, N, H) layout; fp32 inputs, and bf16
    ones (the reference upcasts them; xent's default fp32 logits, tests/api/test_fp32_logits.py)."""
    n, hidden_size, vocab = shape
    gen = torch.Generator().manual_seed(5)
    hidden = (torch.rand(1, n, hidden_size, generator=gen) - 0.5).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.rand(vocab, hidden_size, generator=gen) - 0.5).to(dtype).to(DEVICE).requires_grad_()
    labels = torch.randint(0, vocab, (1, n), generator=gen).to(DEVICE)
    logprobs, entropy = xent_verl.linear_cross_entropy(hidden, weight, labels, 1.5, reduction)
    ref_logprobs, ref_entropy = _verl_reference(hidden, weight, labels, 1.5, reduction)
    assert logprobs.shape == ref_logprobs.shape and entropy.shape == (n,)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-3, rtol=2e-4)
    torch.testing.assert_close(entropy, ref_entropy, atol=5e-3, rtol=5e-4)
    g_logprobs = (torch.rand(logprobs.shape, generator=gen) * 2 - 1).to(DEVICE)
    g_entropy = (torch.rand(n, generator=gen) - 0.5).to(DEVICE)
    grads = torch.autograd.grad((logprobs * g_logprobs).sum() + (entropy * g_entropy).sum(), (hidden, weight))
    refs = torch.autograd.grad((ref_logprobs * g_logprobs).sum() + (ref_entropy * g_entropy).sum(), (hidden, weight))
    for g, r in zip(grads, refs):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=4e-2)


def test_verl_form_takes_per_token_temperatures_and_refuses_unknown_reductions():
    h, w, _, y = _data(torch.float32, ignore=False)
    temperature = (torch.rand(3, 5) + 0.5).to(DEVICE)
    logprobs, entropy = xent_verl.linear_cross_entropy(h, w, y, temperature)
    ref_logp, ref_entropy = _formulas(torch.nn.functional.linear(h, w), y, temperature)
    assert_close(logprobs.double(), ref_logp.reshape(-1), torch.float32, scale=4)
    assert_close(entropy.double(), ref_entropy.reshape(-1), torch.float32, scale=4)
    with pytest.raises(ValueError, match="reduction"):
        xent_verl.linear_cross_entropy(h, w, y, 1.0, "batchmean")


def _openrlhf_log_probs(logits, labels, temperature=1.0):
    """OpenRLHF's models/utils.py log_probs_from_logits on fp32 logits: logits / T, the label's logit
    minus the logsumexp (on a copy here: OpenRLHF divides the caller's logits in place)."""
    logits = logits / temperature
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _openrlhf_entropy(logits):
    """OpenRLHF's compute_entropy: at T = 1 (the actor computes it before dividing by the temperature)."""
    pd = logits.softmax(-1)
    return torch.logsumexp(logits, -1) - (pd * logits).sum(-1)


def test_openrlhf_snippet_matches_openrlhfs_formulas():
    """The docs' OpenRLHF form: log-probabilities at the sampling temperature, the entropy at T = 1, both
    from the actor's fp32 logits, without OpenRLHF's in-place division of them."""
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(2, 9, 50, generator=gen) * 2).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 50, (2, 9), generator=gen).to(DEVICE)
    before = logits.detach().clone()
    log_probs = xent.token_logprobs_from_logits(logits, labels, temperature=0.6)
    _, entropy = xent.token_logprobs_from_logits(logits, labels, return_entropy=True)
    assert torch.equal(logits.detach(), before)
    ref = _openrlhf_log_probs(logits, labels, 0.6)
    ref_entropy = _openrlhf_entropy(logits)
    assert_close(log_probs, ref.detach(), torch.float32)
    assert_close(entropy, ref_entropy.detach(), torch.float32)
    up = torch.randn(2, 9, generator=gen).to(DEVICE)
    (g,) = torch.autograd.grad((log_probs * up).sum() + entropy.sum(), logits)
    (r,) = torch.autograd.grad((ref * up).sum() + ref_entropy.sum(), logits)
    assert_close(g, r, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Under torch.compile, and the ops' declarations


@pytest.mark.compile
def test_per_token_temperature_statistics_and_topk_under_compile():
    h, w, b, y = _data(torch.float32)
    temperature = (torch.rand(3, 1) + 0.5).to(DEVICE)
    params = [t.clone().requires_grad_() for t in (h, w, b)]

    def objective(h, w, b):
        logp, entropy, stats = xent.token_logprobs(
            h, w, y, linear_bias=b, temperature=temperature, return_entropy=True, return_stats="sum_sq_probs"
        )
        return (logp * 0.5).sum() + 0.1 * entropy.sum(), stats.sum_sq_probs

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    value, sq = compiled(*params)
    ref_value, ref_sq = objective(*params)
    assert_close(sq, ref_sq)
    for g, r in zip(torch.autograd.grad(value, params), torch.autograd.grad(ref_value, params)):
        assert_close(g, r)

    def topk(h, w):
        return xent.token_topk(h, w, 3, temperature=0.9)

    got, want = torch.compile(topk, fullgraph=True, backend="aot_eager")(h, w), topk(h, w)
    assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_opcheck_token_op_with_row_temperatures_and_statistics():
    from torch.library import opcheck

    from xent.ops.rl import LINEAR_TOKEN_LOGPROBS, TOKEN_LOGPROBS_FROM_LOGITS, TOKEN_STATISTICS, TokenUpstreams
    from xent.problems import LinearProblem, Options, make_problem

    h, w, b, y = _data(torch.float32)
    rows, flat = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    n = flat.shape[0]
    t_rows = (torch.rand(n) + 0.5).to(DEVICE)
    statistics = (*TOKEN_STATISTICS, "sum_sq_probs", "argmax")
    problem = LinearProblem(
        rows, w, b, flat, None, Options("none"), (n,), torch.float32, 0, 3 * 40 * 4, statistics, t_rows
    )
    op = LINEAR_TOKEN_LOGPROBS
    opcheck(op.op, op.arguments(problem))
    up = torch.randn(n).to(DEVICE)
    want = dict(input=True, linear_weight=True, linear_bias=True)
    opcheck(op.backward_overload, op.backward_arguments(problem, TokenUpstreams(up, None), want))
    opcheck(op.backward_overload, op.backward_arguments(problem, TokenUpstreams(up, up * 2), want))
    logits_problem = make_problem(rows @ w.T, flat, None, Options("none"), torch.float32, TOKEN_STATISTICS)
    logits_problem = dataclasses.replace(logits_problem, row_temperature=t_rows)
    op = TOKEN_LOGPROBS_FROM_LOGITS
    opcheck(op.op, op.arguments(logits_problem))
    opcheck(op.backward_overload, op.backward_arguments(logits_problem, TokenUpstreams(up, None), {"logits": True}))
