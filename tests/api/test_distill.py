"""Linear distillation losses (xent.distill): against a float64 formula written here and against torch's
F.kl_div where it applies, forward and backward (input, weight, bias), for every divergence x teacher form
x reduction, with ignored tokens, temperatures, biases, fp32/bf16, one chunk or many, both backends; plus
Liger Kernel's JSD convention, gradcheck, edge cases, errors, torch.compile, torch.func and opcheck."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from xent.distill import LinearDistillationLoss, TeacherHead, TeacherLogits, TeacherTopK, linear_distillation_loss
from xent.ops.declare import Upstream
from xent.ops.distill import LINEAR_DISTILLATION, DistillCall
from xent.ops.linear import recomputes_in_backward
from xent.problems import DistillProblem

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
# (teacher form, divergence) pairs: a top-k teacher supports the forward KL only
FORMS = [(kind, div) for kind in ("head", "logits") for div in ("kl", "reverse_kl", "jsd")] + [("topk", "kl")]


# ----------------------------------------------------------------------------------------------------
# The float64 oracle


def _xlogy_terms(weight, log_ratio):
    """weight * log_ratio with 0 where weight is 0 (p log p -> 0)."""
    return torch.where(weight == 0, torch.zeros_like(log_ratio), weight * log_ratio)


def reference(student_logits, teacher, divergence, beta, temperature, valid, reduction):
    """The loss from the student's float64 logits (..., V), differentiable. `teacher`: ('logits', t) or
    ('topk', indices, logprobs); `valid`: (...) bool, the counted tokens."""
    log_p_s = torch.log_softmax(student_logits / temperature, -1)
    if teacher[0] == "topk":
        _, indices, logprobs = teacher
        log_q = logprobs.double()
        q = torch.where(valid.unsqueeze(-1), log_q.exp(), 0)
        picked = log_p_s.gather(-1, torch.where(valid.unsqueeze(-1), indices, 0))
        rows = _xlogy_terms(q, log_q - picked).sum(-1)
    else:
        log_p_t = torch.log_softmax(teacher[1].double() / temperature, -1)
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        if divergence == "jsd" and beta == 0.0:
            divergence = "kl"
        if divergence == "jsd" and beta == 1.0:
            divergence = "reverse_kl"
        if divergence == "kl":
            rows = _xlogy_terms(p_t, log_p_t - log_p_s).sum(-1)
        elif divergence == "reverse_kl":
            rows = _xlogy_terms(p_s, log_p_s - log_p_t).sum(-1)
        else:
            mix = beta * p_t + (1 - beta) * p_s
            rows = beta * _xlogy_terms(p_t, log_p_t - mix.log()).sum(-1)
            rows = rows + (1 - beta) * _xlogy_terms(p_s, log_p_s - mix.log()).sum(-1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / valid.sum()
    return rows.sum() / valid.numel()


# ----------------------------------------------------------------------------------------------------
# Data


def make_case(seed, lead=(3, 4), hidden=6, teacher_hidden=9, vocab=17, k=5, kind="head", bias=True, dtype=None):
    """Student (input, weight, bias), the teacher object, its float64 view for the oracle, and targets with
    some tokens ignored."""
    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 2 / math.sqrt(max(hidden, 1))).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    target = torch.randint(0, vocab, lead, generator=gen)
    target.view(-1)[::3] = -100
    tx = torch.randn(*lead, teacher_hidden, generator=gen).to(dtype)
    tw = (torch.randn(vocab, teacher_hidden, generator=gen) * 2 / math.sqrt(teacher_hidden)).to(dtype)
    tb = torch.randn(vocab, generator=gen).to(dtype)
    teacher_logits = F.linear(tx.double(), tw.double(), tb.double())
    if kind == "head":
        teacher = TeacherHead(tx, tw, tb)
        # the teacher's own logits, as its half-precision matmul rounds them (the oracle starts from those)
        oracle = ("logits", F.linear(tx, tw, tb).double() if dtype != torch.float32 else teacher_logits)
    elif kind == "logits":
        teacher = TeacherLogits(teacher_logits.to(dtype))
        oracle = ("logits", teacher.logits.double())
    else:
        logprobs, indices = torch.log_softmax(teacher_logits, -1).topk(min(k, vocab), -1)
        teacher = TeacherTopK(indices, logprobs.to(dtype))
        oracle = ("topk", indices, teacher.logprobs.double())
    return x, w, b, teacher, oracle, target


def ours_and_reference(x, w, b, teacher, oracle, target, up_seed=0, **options):
    """(loss, grads) of xent and of the float64 oracle, for the same random upstream gradient."""
    params = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    loss = linear_distillation_loss(
        params[0], params[1], teacher, target, linear_bias=params[2] if b is not None else None, **options
    )
    ref_params = [t.detach().double().requires_grad_() for t in params]
    logits = F.linear(ref_params[0], ref_params[1], ref_params[2] if b is not None else None)
    valid = target != options.get("ignore_index", -100) if target is not None else torch.ones(x.shape[:-1], dtype=bool)
    ref = reference(
        logits,
        oracle,
        options.get("divergence", "kl"),
        options.get("beta", 0.5),
        options.get("temperature", 1.0),
        valid,
        options.get("reduction", "mean"),
    )
    up = torch.rand(ref.shape, generator=torch.Generator().manual_seed(up_seed), dtype=torch.float64) + 0.5
    grads = (
        torch.autograd.grad(loss, params, up.to(loss.dtype)) if loss.numel() else [torch.zeros_like(p) for p in params]
    )
    ref_grads = torch.autograd.grad(ref, ref_params, up) if ref.numel() else [torch.zeros_like(p) for p in ref_params]
    return (loss.detach(), grads), (ref.detach(), ref_grads)


def check_against_reference(ours, ref, dtype, scale=4.0):
    (loss, grads), (ref_loss, ref_grads) = ours, ref
    assert loss.dtype == dtype
    assert_close(loss.double(), ref_loss, dtype, scale=scale)
    for g, e in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g.double(), e, dtype, scale=scale)


# ----------------------------------------------------------------------------------------------------
# Forward and backward against the oracle


@pytest.mark.parametrize("kind,divergence", FORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_divergence_teacher_and_reduction_matches_float64(kind, divergence, reduction):
    """Ignored tokens, T != 1, a student bias, a teacher of another hidden size, 3-D input, several chunks."""
    x, w, b, teacher, oracle, target = make_case(1, kind=kind)
    options = dict(divergence=divergence, beta=0.3, temperature=1.7, reduction=reduction, memory_budget=4 * 17 * 4 * 4)
    ours, ref = ours_and_reference(x, w, b, teacher, oracle, target, **options)
    check_against_reference(ours, ref, torch.float32)
    assert ours[0].shape == ((3, 4) if reduction == "none" else ())


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(0, 9),
    vocab=st.integers(1, 23),
    hidden=st.integers(1, 7),
    form=st.sampled_from(FORMS),
    reduction=st.sampled_from(REDUCTIONS),
    temperature=st.sampled_from([0.5, 1.0, 2.5]),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    bias=st.booleans(),
    with_target=st.booleans(),
    budget_rows=st.sampled_from([None, 1, 2, 5]),
)
@pytest.mark.slow
def test_random_problems_match_float64(
    seed, rows, vocab, hidden, form, reduction, temperature, beta, bias, with_target, budget_rows
):
    kind, divergence = form
    x, w, b, teacher, oracle, target = make_case(
        seed, lead=(rows,), hidden=hidden, teacher_hidden=4, vocab=vocab, k=3, kind=kind, bias=bias
    )
    budget = None if budget_rows is None else budget_rows * vocab * 4 * 4
    options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction)
    ours, ref = ours_and_reference(
        x, w, b, teacher, oracle, target if with_target else None, memory_budget=budget, **options
    )
    check_against_reference(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,divergence", FORMS)
def test_half_precision_matches_float64_within_its_tolerance(kind, divergence, dtype):
    x, w, b, teacher, oracle, target = make_case(2, kind=kind, dtype=dtype)
    options = dict(divergence=divergence, temperature=0.8, reduction="mean", memory_budget=5 * 17 * 4 * 4)
    ours, ref = ours_and_reference(x, w, b, teacher, oracle, target, **options)
    check_against_reference(ours, ref, dtype, scale=2)
    loss = linear_distillation_loss(x, w, teacher, target, linear_bias=b, output_dtype=torch.float32)
    assert loss.dtype == torch.float32


def test_a_bf16_teacher_head_with_an_fp32_student():
    x, w, b, teacher, _, target = make_case(23, kind="head")
    half = TeacherHead(*(t.bfloat16() for t in (teacher.input, teacher.weight, teacher.bias)))
    oracle = ("logits", F.linear(half.input, half.weight, half.bias).double())  # as its bf16 matmul rounds them
    ours, ref = ours_and_reference(x, w, b, half, oracle, target, divergence="jsd", temperature=0.6)
    check_against_reference(ours, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_both_backends_scale_the_forward_gradients_by_the_upstream(monkeypatch, backend, reduction):
    """The row math is the same torch ops on every backend; backward's in-place upstream scaling is the
    backend's (a Triton kernel on that backend)."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("these are CPU tensors: with a GPU the Triton backend runs only on CUDA tensors")
    monkeypatch.setenv("XENT_BACKEND", backend)
    x, w, b, teacher, oracle, target = make_case(3, kind="head")
    ours, ref = ours_and_reference(x, w, b, teacher, oracle, target, up_seed=7, divergence="jsd", reduction=reduction)
    check_against_reference(ours, ref, torch.float32)


@pytest.mark.parametrize("kind,divergence", FORMS)
def test_chunking_does_not_change_the_result(kind, divergence):
    x, w, b, teacher, _, target = make_case(4, lead=(37,), vocab=29, kind=kind)
    results = []
    for budget in (None, 1, 29 * 4 * 4 * 3, 29 * 4 * 4 * 16):  # one chunk, 1 row per chunk, 3 and 16 rows
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = linear_distillation_loss(
            params[0], params[1], teacher, target, linear_bias=params[2], divergence=divergence, memory_budget=budget
        )
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in params)])
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            assert_close(a, e, scale=2)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_forward_and_reverse_kl_equal_torch_kl_div(reduction):
    """F.kl_div(input=log q, target=log p, log_target=True) is KL(p || q) summed per token."""
    x, w, b, teacher, _, _ = make_case(5, lead=(11,), kind="logits")
    x, w, b, t = (v.double() for v in (x, w, b, teacher.logits))
    temperature = 2.0
    log_p_s = torch.log_softmax(F.linear(x, w, b) / temperature, -1)
    log_p_t = torch.log_softmax(t / temperature, -1)
    for divergence, (inp, tgt) in (("kl", (log_p_s, log_p_t)), ("reverse_kl", (log_p_t, log_p_s))):
        torch_loss = F.kl_div(inp, tgt, log_target=True, reduction=reduction)
        torch_loss = torch_loss.sum(-1) if reduction == "none" else torch_loss
        ours = linear_distillation_loss(
            x, w, TeacherLogits(t), linear_bias=b, divergence=divergence, temperature=temperature, reduction=reduction
        )
        assert_close(ours, torch_loss, scale=10)


def _liger_jsd(student_logits, teacher_logits, beta):
    """Liger Kernel's chunked-loss JSD (LigerFusedLinearJSDFunction.distillation_loss_fn), per token, as
    published: beta = 0 and 1 are its forward and reverse KL, else the beta-weighted mixture."""
    s = torch.log_softmax(student_logits, -1)
    t = torch.log_softmax(teacher_logits, -1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    log_mean = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), 0)
    student_kl = F.kl_div(log_mean, s, reduction="none", log_target=True).sum(-1)
    teacher_kl = F.kl_div(log_mean, t, reduction="none", log_target=True).sum(-1)
    return beta * teacher_kl + (1 - beta) * student_kl


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_jsd_follows_liger_kernels_convention(beta):
    x, w, b, teacher, _, target = make_case(6, lead=(9,), kind="logits")
    x, w, b, t = (v.double() for v in (x, w, b, teacher.logits))
    ours = linear_distillation_loss(
        x, w, TeacherLogits(t), target, linear_bias=b, divergence="jsd", beta=beta, temperature=1.3, reduction="none"
    )
    valid = target != -100
    liger = torch.where(valid, _liger_jsd(F.linear(x, w, b) / 1.3, t / 1.3, beta), 0)
    assert_close(ours, liger)
    mean = linear_distillation_loss(
        x, w, TeacherLogits(t), target, linear_bias=b, divergence="jsd", beta=beta, temperature=1.3
    )
    assert_close(mean, liger.sum() / valid.sum())  # Liger's normalisation: the sum over the counted tokens


def test_jsd_swapping_student_and_teacher_swaps_beta():
    """m = beta p_t + (1 - beta) p_s, weighted beta / (1 - beta): exchanging the two distributions is
    exchanging beta and 1 - beta (an identity head makes the student's logits its hidden states)."""
    gen = torch.Generator().manual_seed(22)
    s, t = torch.randn(2, 7, 11, generator=gen, dtype=torch.float64)
    eye = torch.eye(11, dtype=torch.float64)
    for beta in (0.2, 0.5, 0.7):
        ours = linear_distillation_loss(s, eye, TeacherLogits(t), divergence="jsd", beta=beta, reduction="none")
        swapped = linear_distillation_loss(t, eye, TeacherLogits(s), divergence="jsd", beta=1 - beta, reduction="none")
        assert_close(ours, swapped)
    asymmetric = linear_distillation_loss(s, eye, TeacherLogits(t), divergence="jsd", beta=0.2, reduction="none")
    assert not torch.allclose(asymmetric, swapped)


def test_top_k_with_the_whole_vocabulary_is_the_dense_forward_kl():
    x, w, b, teacher, _, target = make_case(7, lead=(8,), vocab=13, kind="logits")
    logprobs, indices = torch.log_softmax(teacher.logits, -1).topk(13, -1)
    dense = linear_distillation_loss(x, w, teacher, target, linear_bias=b, reduction="none")
    sparse = linear_distillation_loss(x, w, TeacherTopK(indices, logprobs), target, linear_bias=b, reduction="none")
    assert_close(sparse, dense)


def test_top_k_padding_repeats_and_ignored_rows():
    """-inf log-probabilities add nothing, repeated ids add up, ignored tokens' indices are never read."""
    x, w, b, _, _, _ = make_case(8, lead=(4,), vocab=10, kind="head")
    indices = torch.tensor([[1, 2, 0], [3, 3, 5], [99, -7, 0], [4, 0, 0]])
    logprobs = torch.tensor(
        [[-0.5, -1.5, -math.inf], [-1.0, -2.0, -0.7], [math.nan, 0.0, 0.0], [-0.1, -math.inf, -math.inf]]
    )
    target = torch.tensor([0, 1, -100, 2])
    oracle = ("topk", indices, logprobs.double())
    ours, ref = ours_and_reference(x, w, b, TeacherTopK(indices, logprobs), oracle, target, reduction="none")
    check_against_reference(ours, ref, torch.float32)
    assert torch.isfinite(ours[0]).all() and ours[0][2] == 0 and (ours[1][0][2] == 0).all()


def test_non_finite_teacher_logits():
    """A -inf teacher logit on a counted token adds 0 to the forward KL; NaN/inf logits on ignored tokens
    leave the loss finite and their gradients exactly 0."""
    x, w, b, teacher, _, target = make_case(9, lead=(6,), vocab=8, kind="logits")
    logits = teacher.logits.clone()
    logits[1, 3] = -math.inf
    ignored = (target == -100).nonzero()[0, 0]
    oracle = ("logits", logits.double())  # the oracle sees finite logits on the ignored token: it must not matter
    logits[ignored] = math.nan
    for divergence in ("kl", "jsd"):
        ours, ref = ours_and_reference(
            x, w, b, TeacherLogits(logits), oracle, target, divergence=divergence, reduction="sum"
        )
        assert torch.isfinite(ours[0])
        check_against_reference(ours, ref, torch.float32)
        assert (ours[1][0][ignored] == 0).all()
    reverse = linear_distillation_loss(x, w, TeacherLogits(logits), target, divergence="reverse_kl", reduction="none")
    assert reverse[1] == math.inf  # KL(p_s || p_t) is infinite where the teacher has no mass


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_masked_out_teacher_token(divergence, temperature, dtype):
    """A -inf teacher bias entry (a token the teacher never emits): probability exactly 0, and its terms
    add 0 to the forward KL and the JSD, at any temperature (also T < 1, where -huge / T overflows)."""
    x, w, b, teacher, _, target = make_case(24, kind="head", dtype=dtype)
    bias = teacher.bias.clone()
    bias[[2, 5]] = -math.inf
    masked = TeacherHead(teacher.input, teacher.weight, bias)
    oracle = ("logits", F.linear(masked.input, masked.weight, masked.bias).double())
    ours, ref = ours_and_reference(
        x, w, b, masked, oracle, target, divergence=divergence, temperature=temperature, reduction="none"
    )
    assert torch.isfinite(ours[0]).all() and all(torch.isfinite(g).all() for g in ours[1])
    check_against_reference(ours, ref, dtype, scale=2)


@pytest.mark.parametrize("kind,divergence", FORMS)
def test_non_finite_hidden_states_on_ignored_tokens_stay_out(kind, divergence):
    """Padding positions may hold NaN hidden states (a fully masked attention row): they must not reach
    the loss nor, through the weight's GEMM, any gradient."""
    x, w, b, teacher, oracle, target = make_case(25, kind=kind)
    ignored = target == -100
    x = x.masked_fill(ignored.unsqueeze(-1), math.nan)
    if kind == "head":
        t_in = teacher.input.masked_fill(ignored.unsqueeze(-1), math.inf)
        teacher = TeacherHead(t_in, teacher.weight, teacher.bias)
    for reduction in ("mean", "none"):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = linear_distillation_loss(
            params[0], params[1], teacher, target, linear_bias=params[2], divergence=divergence, reduction=reduction
        )
        loss.sum().backward()
        assert torch.isfinite(loss).all()
        assert all(torch.isfinite(p.grad).all() for p in params)
        assert (params[0].grad[ignored] == 0).all()
    clean = torch.where(ignored.unsqueeze(-1), 0, x)
    ours, ref = ours_and_reference(clean, w, b, teacher, oracle, target, divergence=divergence)
    check_against_reference(ours, ref, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Autograd details


@pytest.mark.parametrize("kind,divergence", FORMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.slow
def test_gradcheck_float64(kind, divergence, reduction):
    x, w, b, teacher, _, target = make_case(
        10, lead=(5,), hidden=3, teacher_hidden=2, vocab=6, k=3, kind=kind, dtype=torch.float64
    )
    params = [t.double().requires_grad_() for t in (x, w, b)]

    def fn(x_, w_, b_):
        return linear_distillation_loss(
            x_,
            w_,
            teacher,
            target,
            linear_bias=b_,
            divergence=divergence,
            beta=0.4,
            temperature=1.5,
            reduction=reduction,
            memory_budget=2 * 6 * 8 * 4,
        )

    assert torch.autograd.gradcheck(fn, params)


def test_double_backward_differentiates_the_formula():
    x, w, b, teacher, _, target = make_case(11, lead=(4,), hidden=3, vocab=5, kind="logits")
    params = [t.double().requires_grad_() for t in (x, w, b)]
    teacher = TeacherLogits(teacher.logits.double())

    def fn(x_, w_, b_):
        return linear_distillation_loss(
            x_, w_, teacher, target, linear_bias=b_, divergence="reverse_kl", temperature=2.0
        )

    assert torch.autograd.gradgradcheck(fn, params)


def test_the_teacher_gets_no_gradient_and_no_input_is_modified():
    x, w, b, teacher, _, target = make_case(12, kind="head")
    t_in, t_w, t_b = (t.clone().requires_grad_() for t in (teacher.input, teacher.weight, teacher.bias))
    logits = F.linear(t_in, t_w, t_b).detach().requires_grad_()
    logprobs, indices = torch.log_softmax(logits.detach(), -1).topk(4, -1)
    logprobs.requires_grad_()
    params = [t.clone().requires_grad_() for t in (x, w, b)]
    everything = [*params, t_in, t_w, t_b, logits, logprobs, indices, target]
    before = [t.detach().clone() for t in everything]
    total = 0
    for divergence, teach in (
        ("jsd", TeacherHead(t_in, t_w, t_b)),
        ("reverse_kl", TeacherLogits(logits)),
        ("kl", TeacherTopK(indices, logprobs)),
    ):
        for reduction in ("mean", "none"):
            loss = linear_distillation_loss(
                params[0],
                params[1],
                teach,
                target,
                linear_bias=params[2],
                divergence=divergence,
                temperature=0.7,
                reduction=reduction,
            )
            total = total + loss.sum()
    total.backward()
    for t, saved in zip(everything, before):
        assert torch.equal(t.detach(), saved)
    assert all(t.grad is None for t in (t_in, t_w, t_b, logits, logprobs))
    assert all(p.grad is not None for p in params)


def test_retain_graph_second_backward_recomputes_the_same_gradients():
    x, w, b, teacher, _, target = make_case(13, kind="head")
    params = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = linear_distillation_loss(params[0], params[1], teacher, target, linear_bias=params[2], divergence="jsd")
    first = torch.autograd.grad(loss, params, torch.tensor(3.0), retain_graph=True)
    second = torch.autograd.grad(loss, params, torch.tensor(3.0))
    for a, e in zip(second, first):
        assert_close(a, e)


def test_module_equals_the_function_and_only_the_input_may_need_a_gradient():
    x, w, b, teacher, _, target = make_case(14, kind="logits")
    criterion = LinearDistillationLoss(divergence="jsd", beta=0.2, temperature=1.5, reduction="sum")
    assert "beta=0.2" in repr(criterion)
    expected = linear_distillation_loss(
        x, w, teacher, target, linear_bias=b, divergence="jsd", beta=0.2, temperature=1.5, reduction="sum"
    )
    assert_close(criterion(x, w, teacher, target, b), expected)
    xi = x.clone().requires_grad_()
    criterion(xi, w, teacher, target, b).backward()
    ref = xi.detach().double().requires_grad_()
    logits = F.linear(ref, w.double(), b.double())
    reference(logits, ("logits", teacher.logits.double()), "jsd", 0.2, 1.5, target != -100, "sum").backward()
    assert_close(xi.grad.double(), ref.grad, torch.float32, scale=4)


def test_autocast_runs_the_heads_in_its_dtype_and_returns_float32():
    x, w, b, teacher, _, target = make_case(15, kind="head")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_distillation_loss(x, w, teacher, target, linear_bias=b)
    assert loss.dtype == torch.float32
    bf16 = [t.bfloat16() for t in (x, w, b)]
    bf16_teacher = TeacherHead(*(t.bfloat16() for t in (teacher.input, teacher.weight, teacher.bias)))
    expected = linear_distillation_loss(
        bf16[0], bf16[1], bf16_teacher, target, linear_bias=bf16[2], output_dtype=torch.float32
    )
    assert_close(loss, expected)


# ----------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("kind,divergence", FORMS)
def test_all_tokens_ignored(kind, divergence):
    """As torch's losses: 'mean' of nothing is NaN (0 / 0), 'sum' and 'batchmean' 0, 'none' zeros; the
    gradients are zero."""
    x, w, b, teacher, _, target = make_case(16, kind=kind)
    target = torch.full_like(target, -100)
    for reduction, expected in (("mean", math.nan), ("sum", 0.0), ("batchmean", 0.0), ("none", 0.0)):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = linear_distillation_loss(
            params[0], params[1], teacher, target, linear_bias=params[2], divergence=divergence, reduction=reduction
        )
        torch.testing.assert_close(loss, torch.full_like(loss, expected), equal_nan=True)
        loss.sum().backward()
        assert all((p.grad == 0).all() for p in params)


@pytest.mark.parametrize("kind,divergence", FORMS)
def test_zero_tokens(kind, divergence):
    x, w, b, teacher, _, target = make_case(17, lead=(0,), kind=kind)
    for reduction, expected in (("mean", math.nan), ("sum", 0.0), ("batchmean", math.nan)):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = linear_distillation_loss(
            params[0], params[1], teacher, target, linear_bias=params[2], divergence=divergence, reduction=reduction
        )
        torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
        loss.backward()
        assert [p.grad.shape for p in params] == [p.shape for p in params]
        assert all((p.grad == 0).all() for p in params)
    none = linear_distillation_loss(x, w, teacher, target, divergence=divergence, reduction="none")
    assert none.shape == (0,)


def test_no_hidden_units_and_a_single_class():
    """H = 0 (the logits are the bias) and V = 1 (every divergence is 0)."""
    gen = torch.Generator().manual_seed(18)
    x, w, b = torch.randn(5, 0), torch.randn(7, 0), torch.randn(7, generator=gen)
    t = torch.randn(5, 7, generator=gen)
    ours, ref = ours_and_reference(x, w, b, TeacherLogits(t), ("logits", t.double()), None, reduction="sum")
    check_against_reference(ours, ref, torch.float32)
    one = linear_distillation_loss(
        torch.randn(4, 3), torch.randn(1, 3), TeacherLogits(torch.randn(4, 1)), reduction="none"
    )
    assert (one == 0).all()


# ----------------------------------------------------------------------------------------------------
# Errors

x2, w2, t2 = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5)
y2 = torch.tensor([0, -100, 2])
HEAD = TeacherHead(torch.randn(3, 6), torch.randn(5, 6))
TOPK = TeacherTopK(torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), -1.0))

ERRORS = [
    ("teacher not a teacher", (x2, w2, t2), {}, TypeError, "TeacherHead, TeacherLogits or TeacherTopK"),
    ("input not a tensor", (x2.tolist(), w2, HEAD), {}, TypeError, "'input' must be Tensor"),
    ("teacher field not a tensor", (x2, w2, TeacherLogits([1.0])), {}, TypeError, "'teacher.logits' must be Tensor"),
    ("bad reduction", (x2, w2, HEAD), dict(reduction="avg"), ValueError, "not a valid value for reduction"),
    ("bad divergence", (x2, w2, HEAD), dict(divergence="js"), ValueError, "divergence must be one of"),
    ("beta above 1", (x2, w2, HEAD), dict(divergence="jsd", beta=1.5), ValueError, "beta must be in [0, 1]"),
    ("beta NaN", (x2, w2, HEAD), dict(beta=math.nan), ValueError, "beta must be in [0, 1]"),
    ("temperature 0", (x2, w2, HEAD), dict(temperature=0.0), ValueError, "temperature must be a positive"),
    ("temperature inf", (x2, w2, HEAD), dict(temperature=math.inf), ValueError, "temperature must be a positive"),
    ("temperature a string", (x2, w2, HEAD), dict(temperature="2"), TypeError, "'temperature' must be float"),
    ("ignore_index float", (x2, w2, HEAD), dict(ignore_index=1.5), TypeError, "'ignore_index' must be int"),
    ("memory_budget 0", (x2, w2, HEAD), dict(memory_budget=0), ValueError, "memory_budget must be a positive"),
    ("output_dtype int", (x2, w2, HEAD), dict(output_dtype=torch.int64), TypeError, "output_dtype"),
    ("hidden mismatch", (x2, torch.randn(5, 3), HEAD), {}, RuntimeError, "in_features"),
    ("3-d head", (x2, torch.randn(5, 1, 4), HEAD), {}, RuntimeError, "must be 2-D"),
    ("bias shape", (x2, w2, HEAD), dict(linear_bias=torch.randn(4)), RuntimeError, "linear_bias shape"),
    ("weight dtype", (x2, w2.double(), HEAD), {}, RuntimeError, "same dtype"),
    ("integer input", (x2.long(), w2.long(), HEAD), {}, NotImplementedError, "floating point"),
    ("target shape", (x2, w2, HEAD, y2[:2]), {}, ValueError, "expected target of shape [3]"),
    ("target dtype", (x2, w2, HEAD, y2.float()), {}, RuntimeError, "Long or Byte"),
    ("teacher vocabulary", (x2, w2, TeacherHead(torch.randn(3, 6), torch.randn(4, 6))), {}, ValueError, "4 classes"),
    ("teacher hidden", (x2, w2, TeacherHead(torch.randn(3, 6), torch.randn(5, 7))), {}, RuntimeError, "in_features"),
    ("teacher tokens", (x2, w2, TeacherHead(torch.randn(2, 6), torch.randn(5, 6))), {}, ValueError, "one teacher row"),
    (
        "teacher bias shape",
        (x2, w2, TeacherHead(torch.randn(3, 6), torch.randn(5, 6), torch.randn(6))),
        {},
        RuntimeError,
        "teacher.bias shape",
    ),
    (
        "teacher dtype mix",
        (x2, w2, TeacherHead(torch.randn(3, 6), torch.randn(5, 6).double())),
        {},
        RuntimeError,
        "same dtype",
    ),
    ("teacher logits shape", (x2, w2, TeacherLogits(torch.randn(3, 4))), {}, ValueError, "teacher logits of shape"),
    ("teacher logits dtype", (x2, w2, TeacherLogits(t2.long())), {}, RuntimeError, "floating point"),
    ("top-k reverse KL", (x2, w2, TOPK), dict(divergence="reverse_kl"), ValueError, "forward KL only"),
    ("top-k JSD", (x2, w2, TOPK), dict(divergence="jsd", beta=0.5), ValueError, "forward KL only"),
    ("top-k int32", (x2, w2, TeacherTopK(TOPK.indices.int(), TOPK.logprobs)), {}, RuntimeError, "int64"),
    ("top-k shapes", (x2, w2, TeacherTopK(TOPK.indices, TOPK.logprobs[:, :1])), {}, ValueError, "do not match"),
    ("top-k tokens", (x2, w2, TeacherTopK(TOPK.indices[:2], TOPK.logprobs[:2])), {}, ValueError, "[3] + [k]"),
    (
        "top-k index out of range",
        (x2, w2, TeacherTopK(torch.tensor([[0, 1], [9, 9], [5, 0]]), TOPK.logprobs), y2),
        {},
        IndexError,
        "index 5 is out of bounds",
    ),
]


@pytest.mark.parametrize("args,kwargs,error,message", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_arguments_raise_clear_errors(args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        linear_distillation_loss(*args, **kwargs)


def test_top_k_with_jsd_at_beta_zero_is_the_forward_kl():
    kl = linear_distillation_loss(x2, w2, TOPK, y2)
    assert_close(linear_distillation_loss(x2, w2, TOPK, y2, divergence="jsd", beta=0.0), kl)


# ----------------------------------------------------------------------------------------------------
# torch.compile, torch.func, opcheck


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.compile
def test_compile_fullgraph_equals_eager(reduction):
    torch._dynamo.reset()
    x, w, b, teacher, _, target = make_case(19, kind="head")
    tx, tw, tb = teacher.input, teacher.weight, teacher.bias

    def fn(x_, w_, b_):
        loss = linear_distillation_loss(
            x_,
            w_,
            TeacherHead(tx, tw, tb),
            target,
            linear_bias=b_,
            divergence="jsd",
            temperature=1.5,
            reduction=reduction,
            memory_budget=4 * 17 * 4 * 4,
        )
        return loss.sum() * 2 if reduction == "none" else loss * 2

    def loss_and_grads(f):
        params = [t.clone().requires_grad_() for t in (x, w, b)]
        loss = f(*params)
        return loss.detach(), torch.autograd.grad(loss, params)

    expected = loss_and_grads(fn)
    actual = loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    assert_close(actual[0], expected[0])
    for a, e in zip(actual[1], expected[1]):
        assert_close(a, e)


def test_torch_func_grad_and_vmap_use_the_formula():
    x, w, b, teacher, _, target = make_case(20, lead=(6,), kind="topk")

    def loss_of(x_):
        return linear_distillation_loss(x_, w, teacher, target, linear_bias=b, temperature=0.9)

    xi = x.clone().requires_grad_()
    loss_of(xi).backward()
    assert_close(torch.func.grad(loss_of)(x), xi.grad)
    per_token = torch.func.vmap(
        lambda row: linear_distillation_loss(row, w, TeacherLogits(row @ w.T * 0.5), divergence="jsd")
    )
    rows = per_token(x.unsqueeze(1))
    expected = torch.stack(
        [linear_distillation_loss(r, w, TeacherLogits(r @ w.T * 0.5), divergence="jsd") for r in x.unsqueeze(1)]
    )
    assert_close(rows, expected)


def _op_problem(kind, reduction, dtype=torch.float32) -> DistillProblem:
    gen = torch.Generator().manual_seed(21)
    x, w, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((6, 4), (9, 4), (9,)))
    target = torch.tensor([0, -100, 2, 3, 4, 5])
    teacher = [None] * 6
    if kind == "head":
        teacher[:3] = [torch.randn(6, 3, generator=gen).to(dtype), torch.randn(9, 3, generator=gen).to(dtype), None]
    elif kind == "logits":
        teacher[3] = torch.randn(6, 9, generator=gen).to(dtype)
    else:
        logprobs, indices = torch.randn(6, 9, generator=gen).log_softmax(-1).topk(3, -1)
        teacher[4:] = [indices, logprobs.to(dtype)]
    divergence = "jsd" if kind != "topk" else "kl"
    return DistillProblem(
        x, w, b, kind, *teacher, target, divergence, 0.3, 1.5, -100, reduction, (6,), torch.float32, 2 * 9 * 4 * 4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["head", "logits", "topk"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.slow
def test_opcheck(kind, reduction, dtype):
    p = _op_problem(kind, reduction, dtype)
    op = LINEAR_DISTILLATION
    recompute = recomputes_in_backward(reduction, dtype)  # fp16 'mean': backward recomputes with the upstream
    wants = (False,) * 3 if recompute else (True, True, True)
    opcheck(op.op, op.arguments(DistillCall(p, wants, recompute)))
    opcheck(op.op, op.arguments(DistillCall(p, (True, False, False) if not recompute else wants, recompute)))
    up = torch.rand(() if reduction != "none" else (6,))
    want = dict(input=True, linear_weight=True, linear_bias=True)
    opcheck(op.backward_overload, op.backward_arguments(DistillCall(p, wants, recompute), Upstream(up), want))
