"""The temperature divides the fp32 logits, inside the pass, on every path that takes one.

RL trainers compute a bf16 head's logits and divide them by T in fp32 (TRL; the naive formulation
`(h @ W.T).float() / T`). Dividing the bf16 hidden states (or the bf16 logits) by T instead adds a bf16
rounding: 1.2-1.8x the log-probability, entropy and gradient errors at T = 0.7 and 1.3. Each path here must
be no worse than that fp32-logits formulation, against a float64 reference of the same bf16/fp16 values
(T = 0.5 is a power of two: no rounding either way, kept as a control).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
SLACK = 1.05  # fp32 summation-order noise between two fp32 formulations


def _inputs(dtype, rows=128, hidden=64, vocab=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.25).to(dtype).to(DEVICE)
    y = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    y[::9] = -100
    return h, w, y


def _fp32_logits(h, w, temperature):
    """The formulation RL trainers use: the half-precision logits, then / T in fp32."""
    return (h @ w.T).float() / temperature


def _logprob_entropy(logits, y):
    lp = logits.log_softmax(-1)
    valid = y != -100
    picked = lp.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, 0), torch.where(valid, -(lp.exp() * lp).sum(-1), 0)


def _errors(fn, h, w, y, exact_out, exact_grads, g_lp, g_ent):
    """Max errors of (logprob, entropy) and relative errors of (d hidden, d head) for the upstreams."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(hh, ww)
    ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
    out = [float((a.double() - b).abs().max()) for a, b in zip((lp, ent), exact_out)]
    grads = [float((a.double() - b).norm() / b.norm()) for a, b in zip((hh.grad, ww.grad), exact_grads)]
    return out + grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.3])
@pytest.mark.parametrize("path", ["token_logprobs", "token_logprobs_from_logits"])
def test_no_worse_than_dividing_fp32_logits(backend, dtype, temperature, path):
    small = backend == "triton" and DEVICE == "cpu"  # Triton's interpreter: a smaller vocabulary
    h, w, y = _inputs(dtype, vocab=700 if small else 3000)
    gen = torch.Generator().manual_seed(1)
    g_lp = (torch.rand(h.shape[0], generator=gen, dtype=torch.float64) * 2 - 1).to(DEVICE)
    g_ent = (torch.rand(h.shape[0], generator=gen, dtype=torch.float64) - 0.5).to(DEVICE)

    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    exact_lp, exact_ent = _logprob_entropy((hd @ wd.T) / temperature, y)
    ((exact_lp * g_lp).sum() + (exact_ent * g_ent).sum()).backward()
    exact = ((exact_lp.detach(), exact_ent.detach()), (hd.grad, wd.grad))

    def naive(a, b):
        return _logprob_entropy(_fp32_logits(a, b, temperature), y)

    def ours(a, b):
        if path == "token_logprobs":
            return xent.token_logprobs(a, b, y, temperature=temperature, return_entropy=True, backend=backend)
        return xent.token_logprobs_from_logits(
            a @ b.T, y, temperature=temperature, return_entropy=True, backend=backend
        )

    theirs = _errors(naive, h, w, y, *exact, g_lp, g_ent)
    mine = _errors(ours, h, w, y, *exact, g_lp, g_ent)
    for name, e_ours, e_naive in zip(("logprob", "entropy", "d hidden", "d head"), mine, theirs):
        assert e_ours <= SLACK * e_naive + 1e-7, f"{name}: {e_ours:.3g} against the fp32 logits' {e_naive:.3g}"


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_log_probabilities_alone_too(temperature):
    """Without the entropy token_logprobs is the per-token linear cross-entropy: the same precision."""
    h, w, y = _inputs(torch.bfloat16)
    exact, _ = _logprob_entropy((h.double() @ w.double().T) / temperature, y)
    naive, _ = _logprob_entropy(_fp32_logits(h, w, temperature), y)
    ours = xent.token_logprobs(h, w, y, temperature=temperature)
    assert float((ours.double() - exact).abs().max()) <= SLACK * float((naive.double() - exact).abs().max()) + 1e-7


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_distillation_divides_fp32_logits(temperature):
    """Distillation's student and teacher logits are divided after the GEMM, in the fp32 workspace."""
    h, w, _ = _inputs(torch.bfloat16)
    teacher_logits = (torch.randn(h.shape[0], w.shape[0], generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    teacher_logits = teacher_logits.to(DEVICE)

    def kl(student, teacher):
        log_p_s, log_p_t = student.log_softmax(-1), teacher.log_softmax(-1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)

    exact = kl((h.double() @ w.double().T) / temperature, teacher_logits.double() / temperature)
    naive = kl(_fp32_logits(h, w, temperature), teacher_logits.float() / temperature)
    ours = xent.linear_distillation_loss(
        h,
        w,
        xent.TeacherLogits(teacher_logits),
        temperature=temperature,
        reduction="none",
        output_dtype=torch.float32,  # the naive formulation's dtype: compare the math, not the final rounding
    )
    assert float((ours.double() - exact).abs().max()) <= SLACK * float((naive.double() - exact).abs().max()) + 1e-7
