"""Regressions from a review of the statistics, RL and distillation paths: large and peaked logits on the
portable kernel, masked (-inf / most-negative) prefixes of a row streamed in blocks by the Triton kernel,
the argmax under a saturating softcap, uint8 targets, and the distillation's masked vocabulary and mixed
teacher dtypes. Each compares with the float64 definition."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_close

import xent
from xent import reference
from xent.distill import TeacherHead, TeacherLogits, linear_distillation_loss

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("XENT_BACKEND", request.param)
    return request.param


def _entropy_and_grad(z: torch.Tensor, y: torch.Tensor):
    """The entropy and its gradient -p (log p + H) in float64, 0 log 0 = 0 (autograd through a masked
    p log p would give NaN at -inf logits)."""
    lp = torch.log_softmax(z.detach().double(), 1)
    p = lp.exp()
    lp = torch.where(p > 0, lp, 0)
    entropy = -(p * lp).sum(1)
    return entropy, -p * (lp + entropy.unsqueeze(1))


def test_entropy_gradient_of_large_peaked_logits(backend):
    """exp(z) without the max shift overflows s^2 (and loses sum e log e) above ~44: the entropy path
    always shifts."""
    x = torch.zeros(2, 100)
    x[:, 0], x[:, 1] = 50.0, 45.0
    x[1] *= 2
    y = torch.tensor([0, 1])
    xx = x.clone().to(DEVICE).requires_grad_()
    _, entropy = xent.token_logprobs_from_logits(xx, y.to(DEVICE), return_entropy=True)
    entropy.sum().backward()
    ref_entropy, ref_grad = _entropy_and_grad(x, y)
    assert_close(entropy.double().cpu(), ref_entropy, torch.float32, scale=10)
    assert_close(xx.grad.double().cpu(), ref_grad, torch.float32, scale=10)
    _, stats = xent.cross_entropy(x.to(DEVICE), y.to(DEVICE), return_stats="entropy")
    assert_close(stats.entropy.double().cpu(), ref_entropy, torch.float32, scale=10)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("prefix", ["min", "-inf"])
@pytest.mark.triton
def test_masked_prefix_streamed_in_blocks(monkeypatch, prefix):
    """A row whose first blocks are the most negative float (or -inf) and whose later ones are far below
    0: the sums are re-based without 0 * inf, and without keeping a shift of 0 for the -inf prefix."""
    from xent.kernels import triton_rows

    monkeypatch.setenv("XENT_BACKEND", "triton")
    monkeypatch.setattr(triton_rows, "LAUNCH_OVERRIDE", (64, 4, 0))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, generator=gen) - 200.0
    x[:, :128] = torch.finfo(torch.float32).min if prefix == "min" else -float("inf")
    y = torch.tensor([200, 299])
    names = ("lse", "logprob", "entropy", "argmax")
    loss, stats = xent.cross_entropy(x.to(DEVICE), y.to(DEVICE), reduction="none", return_stats=names)
    ref = reference.token_statistics(x, y, names)
    assert_close(loss.double().cpu(), -ref["logprob"], torch.float32, scale=300)
    for name in ("lse", "logprob", "entropy"):
        assert_close(getattr(stats, name).double().cpu(), ref[name], torch.float32, scale=300)
    assert torch.equal(stats.argmax.cpu(), ref["argmax"])
    xx = x.clone().to(DEVICE).requires_grad_()
    _, entropy = xent.token_logprobs_from_logits(xx, y.to(DEVICE), return_entropy=True)
    entropy.sum().backward()
    assert torch.isfinite(xx.grad).all()
    _, ref_grad = _entropy_and_grad(x, y)
    assert_close(xx.grad.double().cpu(), ref_grad, torch.float32, scale=10)


def test_argmax_under_a_saturating_softcap(backend):
    """tanh(z / cap) is 1.0 in fp32 for z / cap above ~9: the argmax is taken of the logits before the cap."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 50, generator=gen) * 30
    y = torch.randint(0, 50, (8,), generator=gen)
    _, stats = xent.cross_entropy(x.to(DEVICE), y.to(DEVICE), softcap=5.0, return_stats=("argmax", "correct"))
    assert torch.equal(stats.argmax.cpu(), x.argmax(1))
    assert torch.equal(stats.correct.cpu(), x.argmax(1) == y)


def test_uint8_targets_under_torch_func():
    """uint8 != -100 wraps -100 to 156 in torch: every comparison with ignore_index widens first."""
    x = torch.randn(2, 200)
    y = torch.tensor([156, 1], dtype=torch.uint8)

    def loss_and_stats(z):
        loss, stats = xent.cross_entropy(z, y, return_stats=("logprob", "correct"))
        return loss, (stats.logprob, stats.correct)

    _, (logprob, correct) = torch.func.grad(loss_and_stats, has_aux=True)(x)
    _, eager = xent.cross_entropy(x, y, return_stats=("logprob", "correct"))
    assert_close(logprob, eager.logprob)
    assert torch.equal(correct, eager.correct)
    assert logprob[0] != 0  # class 156 counts


def _distill_reference(divergence, s_logits, t_logits, temperature, beta=0.5):
    s = torch.log_softmax(s_logits.double() / temperature, -1)
    t = torch.log_softmax(t_logits.double() / temperature, -1)

    def kl(p_log, q_log):  # sum p (log p - log q), 0 where p = 0
        return torch.where(p_log.exp() == 0, 0, p_log.exp() * (p_log - q_log)).sum(-1)

    if divergence == "kl":
        return kl(t, s).mean()
    if divergence == "reverse_kl":
        return kl(s, t).mean()
    m = torch.logaddexp(s + torch.tensor(1 - beta).log(), t + torch.tensor(beta).log())
    return (beta * kl(t, m) + (1 - beta) * kl(s, m)).mean()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_with_a_teacher_head_of_another_dtype(divergence):
    """An fp32 teacher head with a bias beside an fp64 student: the bias is divided by T once."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(50, 8, generator=gen, dtype=torch.float64)
    ti, tw, tb = torch.randn(6, 12, generator=gen), torch.randn(50, 12, generator=gen), torch.randn(50, generator=gen)
    ours = linear_distillation_loss(x, w, TeacherHead(ti, tw, tb), divergence=divergence, temperature=2.0)
    assert_close(ours, _distill_reference(divergence, x @ w.T, ti @ tw.T + tb, 2.0), torch.float32)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_form", ["head", "logits"])
def test_distillation_with_a_vocabulary_masked_on_both_sides(divergence, teacher_form):
    """-inf biases on the same entries for student and teacher: those terms are 0 (their limit), not NaN."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(6, 8, generator=gen), torch.randn(50, 8, generator=gen)
    ti, tw = torch.randn(6, 12, generator=gen), torch.randn(50, 12, generator=gen)
    sb, tb = torch.zeros(50), torch.randn(50, generator=gen)
    sb[-5:] = tb[-5:] = -float("inf")
    teacher = TeacherHead(ti, tw, tb) if teacher_form == "head" else TeacherLogits(ti @ tw.T + tb)
    params = [t.clone().requires_grad_() for t in (x, w)]
    ours = linear_distillation_loss(
        params[0], params[1], teacher, linear_bias=sb, divergence=divergence, temperature=2.0
    )
    ours.backward()
    assert_close(ours.double(), _distill_reference(divergence, x @ w.T + sb, ti @ tw.T + tb, 2.0), torch.float32)
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_distillation_uint8_targets():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 8, generator=gen), torch.randn(200, 8, generator=gen)
    teacher = TeacherLogits(torch.randn(2, 200, generator=gen))
    as_uint8 = linear_distillation_loss(x, w, teacher, torch.tensor([156, 1], dtype=torch.uint8), reduction="none")
    as_long = linear_distillation_loss(x, w, teacher, torch.tensor([156, 1]), reduction="none")
    assert_close(as_uint8, as_long)
    assert as_uint8[0] > 0
