"""fp32 logits from half-precision heads (logits_dtype): the RL paths' default, an option elsewhere.

RL trainers compare log-probabilities across the rollout engine and the policies, so they compute the
head's logits in fp32. verl's test of its fused linear cross-entropy kernel sets the bar, reimplemented
here (not imported): bf16 hidden states and head, the reference upcasts both to fp32, divides the logits
by T, and takes log-probabilities and the entropy lse - sum(p * z); the kernel must match it within
atol 1e-3 / rtol 2e-4 (log-probabilities), 5e-3 / 5e-4 (entropy) and 2e-2 / 4e-2 (gradients, for
upstreams U(-1, 1) on the log-probabilities and U(-0.5, 0.5) on the entropy), inputs U(-0.5, 0.5).
verl's five shapes keep their hidden and vocabulary sizes here; the token counts are cut for a CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import xent
from xent.distill import TeacherHead

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])

# verl's (tokens, hidden, vocabulary) and the tokens kept on a CPU (all of them on a GPU)
VERL_SHAPES = [(1937, 3584, 152064), (2169, 896, 151936), (1530, 2048, 32256), (1388, 4096, 102400)]
VERL_LARGE = (8192, 4096, 102400)
CPU_TOKENS = 48
TEMPERATURE = 1.5
LOGPROB_TOL = dict(atol=1e-3, rtol=2e-4)
ENTROPY_TOL = dict(atol=5e-3, rtol=5e-4)
GRAD_TOL = dict(atol=2e-2, rtol=4e-2)


def _verl_inputs(tokens, hidden, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.rand(tokens, hidden, generator=gen, dtype=torch.bfloat16) - 0.5).to(DEVICE)
    w = (torch.rand(vocab, hidden, generator=gen, dtype=torch.bfloat16) - 0.5).to(DEVICE)
    y = torch.randint(0, vocab, (tokens,), generator=gen).to(DEVICE)
    g_logp = (torch.rand(tokens, generator=gen) * 2 - 1).to(DEVICE)
    g_entropy = (torch.rand(tokens, generator=gen) - 0.5).to(DEVICE)
    return h, w, y, g_logp, g_entropy


def _verl_reference(h, w, y, temperature):
    """verl's torch reference: the upcast operands' logits in fp32, over T; log-probs and lse - sum p z."""
    logits = (h.float() @ w.float().T) / temperature
    logp = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    p = logits.softmax(-1)
    entropy = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
    return logp, entropy


def _check_against_verl(shape, backend="torch", **kwargs):
    tokens, hidden, vocab = shape
    h, w, y, g_logp, g_entropy = _verl_inputs(tokens, hidden, vocab)
    ours_in = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    logp, entropy = xent.token_logprobs(
        *ours_in, y, temperature=TEMPERATURE, return_entropy=True, backend=backend, **kwargs
    )
    ref_in = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    ref_logp, ref_entropy = _verl_reference(*ref_in, y, TEMPERATURE)
    torch.testing.assert_close(logp, ref_logp, **LOGPROB_TOL)
    torch.testing.assert_close(entropy, ref_entropy, **ENTROPY_TOL)
    grads = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_entropy).sum(), ours_in)
    ref_grads = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_entropy * g_entropy).sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        _assert_close_in_blocks(g, r, **GRAD_TOL)


def _assert_close_in_blocks(actual, expected, atol, rtol, block=1 << 22):
    """torch.testing.assert_close's criterion |a - e| <= atol + rtol |e|, a block of rows at a time (a
    (152064, 3584) gradient whole would take several GiB of temporaries)."""
    a, e = actual.reshape(-1), expected.reshape(-1)
    worst = 0.0
    for i in range(0, a.numel(), block):
        ai, ei = a[i : i + block].float(), e[i : i + block].float()
        excess = (ai - ei).abs() - (atol + rtol * ei.abs())
        worst = max(worst, float(excess.max()))
    assert worst <= 0, f"a gradient exceeds atol {atol} + rtol {rtol} |expected| by {worst:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("shape", VERL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_logprobs_pass_verls_tolerances(shape):
    tokens = shape[0] if DEVICE == "cuda" else CPU_TOKENS
    _check_against_verl((tokens, *shape[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("memory_mode", ["fast", "lean"])
def test_verls_large_shape_in_both_memory_plans(memory_mode):
    tokens = VERL_LARGE[0] if DEVICE == "cuda" else 2 * CPU_TOKENS
    _check_against_verl((tokens, *VERL_LARGE[1:]), memory_mode=memory_mode, memory_budget=None)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.triton
def test_verls_tolerances_on_the_triton_backend():
    # the interpreter on a CPU is slow: a verl hidden size, a smaller vocabulary
    shape = (VERL_SHAPES[2][0], *VERL_SHAPES[2][1:]) if DEVICE == "cuda" else (8, 896, 4096)
    _check_against_verl(shape, backend="triton")


def test_bf16_logits_miss_verls_tolerance():
    """The control: logits rounded to bf16 (as F.linear rounds them) miss the log-probability tolerance
    at verl's shape, so the test above can fail."""
    tokens, hidden, vocab = VERL_SHAPES[2]
    h, w, y, _, _ = _verl_inputs(CPU_TOKENS, hidden, vocab)
    logp = xent.token_logprobs(h, w, y, temperature=TEMPERATURE, logits_dtype=torch.bfloat16)
    ref_logp, _ = _verl_reference(h, w, y, TEMPERATURE)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logp, ref_logp, **LOGPROB_TOL)
    naive = ((h @ w.T).float() / TEMPERATURE).log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, naive, atol=1e-5, rtol=1e-5)  # = the naive bf16 formulation


# ----------------------------------------------------------------------------------------------------
# Against float64 over options, dtypes and backends


def _head(dtype, rows=37, hidden=24, vocab=300, seed=1, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 4).to(dtype).to(DEVICE)
    b = torch.randn(vocab, generator=gen).to(dtype).to(DEVICE) if bias else None
    y = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    y[::5] = -100
    return h, w, b, y


def _exact_logits(h, w, b):
    return torch.nn.functional.linear(h.double(), w.double(), b.double() if b is not None else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_mode", ["fast", "lean"])
@pytest.mark.parametrize(
    "options",
    [{}, dict(label_smoothing=0.1), dict(z_loss=1e-3, softcap=5.0), dict(reduction="sum"), dict(reduction="none")],
    ids=["plain", "smoothing", "zloss-softcap", "sum", "none"],
)
def test_linear_cross_entropy_fp32_logits_match_float64(backend, dtype, memory_mode, options):
    h, w, b, y = _head(dtype)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = xent.linear_cross_entropy(
        params[0],
        params[1],
        y,
        linear_bias=params[2],
        logits_dtype=torch.float32,
        output_dtype=torch.float32,
        memory_budget=8 * 300 * 4,  # several chunks
        memory_mode=memory_mode,
        backend=backend,
        **options,
    )
    ref_params = [t.detach().double().requires_grad_() for t in (h, w, b)]
    opts = dict(options)
    z_loss, cap = opts.pop("z_loss", 0.0), opts.pop("softcap", None)
    z = torch.nn.functional.linear(*ref_params)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ref = torch.nn.functional.cross_entropy(z, y, **opts)
    if z_loss:
        valid = y != -100
        ref = ref + z_loss * (torch.logsumexp(z, -1)[valid] ** 2).sum() / valid.sum()
    # fp32 logits: only fp32 rounding separates the two (bf16-rounded logits err ~1e-2 here)
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad((loss * up).sum(), params)
    ref_grads = torch.autograd.grad((ref * up.double()).sum(), ref_params)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, atol=2e-2, rtol=2e-2)  # the gradients' own rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_logits_are_closer_to_float64_than_rounded_ones(dtype):
    h, w, b, y = _head(dtype, rows=64, vocab=2000)
    exact = torch.nn.functional.cross_entropy(_exact_logits(h, w, b), y, reduction="none")
    errs = {}
    for logits_dtype in (None, torch.float32):
        loss = xent.linear_cross_entropy(h, w, y, linear_bias=b, reduction="none", logits_dtype=logits_dtype)
        loss32 = xent.linear_cross_entropy(
            h, w, y, linear_bias=b, reduction="none", logits_dtype=logits_dtype, output_dtype=torch.float32
        )
        assert loss.dtype == dtype and loss32.dtype == torch.float32
        errs[logits_dtype] = float((loss32.double() - exact).abs().max())
    assert errs[torch.float32] < 1e-5 < errs[None]
    # the default stays F.linear's rounding: the naive half-precision formulation
    naive = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).float(), y, reduction="none")
    ours = xent.linear_cross_entropy(h, w, y, linear_bias=b, reduction="none", output_dtype=torch.float32)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


def test_statistics_and_topk_use_fp32_logits():
    h, w, b, y = _head(torch.bfloat16, vocab=500)
    z = _exact_logits(h, w, b) / 0.7
    _, _, stats = xent.token_logprobs(
        h, w, y, linear_bias=b, temperature=0.7, return_entropy=True, return_stats=("sum_sq_probs", "mean_logit")
    )
    p = z.softmax(-1)
    torch.testing.assert_close(stats.sum_sq_probs.double(), (p * p).sum(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats.mean_logit.double(), z.mean(-1), atol=1e-5, rtol=1e-5)
    logp, ids = xent.token_topk(h, w, 5, linear_bias=b, temperature=0.7)
    torch.testing.assert_close(logp.double(), z.log_softmax(-1).gather(-1, ids), atol=1e-5, rtol=1e-5)
    # with logits_dtype=torch.bfloat16 the old rounding: the naive formulation
    logp16, ids16 = xent.token_topk(h, w, 5, linear_bias=b, temperature=0.7, logits_dtype=torch.bfloat16)
    naive = (torch.nn.functional.linear(h, w, b).float() / 0.7).log_softmax(-1)
    torch.testing.assert_close(logp16, naive.gather(-1, ids16), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("memory_mode", ["fast", "lean"])
def test_distillation_fp32_logits_match_float64(divergence, memory_mode):
    h, w, b, y = _head(torch.bfloat16, rows=20, vocab=200)
    th, tw, tb, _ = _head(torch.bfloat16, rows=20, hidden=16, vocab=200, seed=5)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = xent.linear_distillation_loss(
        params[0],
        params[1],
        TeacherHead(th, tw, tb),
        y,
        linear_bias=params[2],
        divergence=divergence,
        temperature=1.3,
        output_dtype=torch.float32,
        memory_budget=4 * 3 * 200 * 4,
        memory_mode=memory_mode,
        logits_dtype=torch.float32,
    )
    ref_params = [t.detach().double().requires_grad_() for t in (h, w, b)]
    log_s = (torch.nn.functional.linear(*ref_params) / 1.3).log_softmax(-1)
    log_t = (_exact_logits(th, tw, tb) / 1.3).log_softmax(-1)
    kl = lambda a, c: (a.exp() * (a - c)).sum(-1)  # noqa: E731  KL(a || c) from log-probabilities
    if divergence == "kl":
        rows = kl(log_t, log_s)
    elif divergence == "reverse_kl":
        rows = kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s, log_t) - torch.log(torch.tensor(2.0, dtype=torch.float64))
        rows = 0.5 * kl(log_t, log_m) + 0.5 * kl(log_s, log_m)
    valid = y != -100
    ref = rows[valid].mean()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, ref_params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=1e-3, rtol=2e-2)


def test_torch_func_route_computes_the_same_fp32_logits():
    h, w, b, y = _head(torch.bfloat16, rows=6, vocab=50)

    def logp_sum(x):
        return xent.token_logprobs(x, w, y, linear_bias=b, temperature=1.5).sum()

    g_func = torch.func.grad(logp_sum)(h)
    x = h.clone().requires_grad_()
    (g_eager,) = torch.autograd.grad(logp_sum(x), x)
    torch.testing.assert_close(g_func.float(), g_eager.float(), atol=1e-2, rtol=1e-2)
    ref = torch.func.vmap(lambda x: xent.token_logprobs(x, w, y, linear_bias=b, temperature=1.5))(h.unsqueeze(0))
    eager = xent.token_logprobs(h, w, y, linear_bias=b, temperature=1.5)
    torch.testing.assert_close(ref[0], eager, atol=1e-5, rtol=1e-5)


def test_module_options_and_repr():
    h, _, _, y = _head(torch.bfloat16, hidden=24)
    module = xent.LinearCrossEntropyLoss(24, 300, dtype=torch.bfloat16, logits_dtype=torch.float32).to(DEVICE)
    assert "logits_dtype=torch.float32" in repr(module)
    ref = xent.linear_cross_entropy(h, module.linear.weight, y, logits_dtype=torch.float32)
    torch.testing.assert_close(module(h, y), ref, atol=0, rtol=0)
    distill = xent.LinearDistillationLoss(logits_dtype=torch.float32)
    assert distill.logits_dtype == torch.float32


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("float32", TypeError, "logits_dtype must be a torch.dtype"),
        (torch.float64, ValueError, "logits_dtype must be None, torch.float32 or the head's dtype"),
        (torch.float16, ValueError, "logits_dtype must be None"),
        (torch.int32, ValueError, "logits_dtype must be None"),
    ],
)
def test_bad_logits_dtype_is_refused(value, error, match):
    h, w, b, y = _head(torch.bfloat16)
    for call in (
        lambda: xent.linear_cross_entropy(h, w, y, logits_dtype=value),
        lambda: xent.token_logprobs(h, w, y, logits_dtype=value),
        lambda: xent.token_topk(h, w, 3, logits_dtype=value),
        lambda: xent.linear_distillation_loss(h, w, TeacherHead(h, w), logits_dtype=value),
    ):
        with pytest.raises(error, match=match):
            call()


def test_fp32_and_fp64_heads_accept_float32_and_are_unchanged():
    for dtype in (torch.float32, torch.float64):
        h, w, b, y = _head(dtype)
        a = xent.token_logprobs(h, w, y, linear_bias=b)
        c = xent.token_logprobs(h, w, y, linear_bias=b, logits_dtype=dtype)
        assert torch.equal(a, c)


def test_inputs_are_left_unmodified():
    h, w, b, y = _head(torch.bfloat16)
    copies = [t.clone() for t in (h, w, b, y)]
    xent.token_logprobs(h, w, y, linear_bias=b, temperature=0.8, return_entropy=True, memory_budget=4096)
    for t, c in zip((h, w, b, y), copies):
        assert torch.equal(t, c)


@pytest.mark.compile
def test_fullgraph_compile_keeps_fp32_logits():
    h, w, b, y = _head(torch.bfloat16, rows=12, vocab=80)

    def objective(x, head):
        logp, entropy = xent.token_logprobs(x, head, y, linear_bias=b, temperature=1.5, return_entropy=True)
        loss = xent.linear_cross_entropy(x, head, y, linear_bias=b, logits_dtype=torch.float32)
        return (logp - 0.1 * entropy).sum() + loss.float()

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    params = [t.clone().requires_grad_() for t in (h, w)]
    eager_params = [t.clone().requires_grad_() for t in (h, w)]
    out, ref = compiled(*params), objective(*eager_params)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, eager_params)):
        torch.testing.assert_close(g, r, atol=0, rtol=0)
