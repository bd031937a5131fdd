"""Per-token statistics returned by the losses (`return_stats=`): lse, logprob, entropy, z_loss, argmax and
correct, from the same pass as the loss, against their float64 definitions (xent.reference.token_statistics),
on both backends and every device, through eager, compiled and torch.func calls; and the loss and its
gradient are exactly those of a call without statistics."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch
from helpers import assert_close
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import xent
from xent import reference

NAMES = xent.TokenStatistics._fields  # every statistic: lse, logprob, entropy, z_loss, argmax, correct, ...
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


@contextlib.contextmanager
def backend(name: str):
    """XENT_BACKEND for one Hypothesis example (monkeypatch is not reset between examples)."""
    before = os.environ.get("XENT_BACKEND")
    os.environ["XENT_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["XENT_BACKEND"]
        else:
            os.environ["XENT_BACKEND"] = before


def _same_or_last_bits(names, backend_name: str, device, dtype):
    """The check that statistics leave the loss and its gradient alone: bit for bit, except where the
    portable kernel on CPU (which skips the max shift when it can) takes the shifted pass for the entropy
    and sum p^2: then the last bits may differ."""
    on_cpu_torch = torch.device(device).type == "cpu" and (backend_name == "torch" or dtype == torch.float64)
    if {"entropy", "sum_sq_probs"} & set(names) and on_cpu_torch:
        return lambda a, b: assert_close(a, b, dtype if dtype != torch.float16 else torch.float32)
    return lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _runs_here(backend_name: str, device) -> bool:
    """With a GPU the Triton backend takes CUDA tensors only (the interpreter serves CPU-only machines)."""
    return not (backend_name == "triton" and torch.device(device).type == "cpu" and torch.cuda.is_available())


def _check_statistics(stats, expected: dict, shape: tuple, dtype: torch.dtype, scale: float = 1.0, msg=""):
    """Floats in the compute dtype against float64 (fp32 tolerance: the logits are exact in any dtype);
    argmax and correct exactly; fields not asked for are None."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for name in NAMES:
        value = getattr(stats, name)
        if name not in expected:
            assert value is None, name
            continue
        assert value.shape == shape, (name, value.shape, shape)
        assert not value.requires_grad, name
        ref = expected[name].reshape(shape)
        if name in ("argmax", "correct"):
            assert value.dtype == ref.dtype and torch.equal(value.cpu(), ref.cpu()), (name, value, ref, msg)
        else:
            assert value.dtype == cd, (name, value.dtype)
            # lse and z_loss grow with the logits: relative to the largest magnitude in the row set
            size = max(1.0, float(ref.abs().nan_to_num(posinf=0, neginf=0).max())) if ref.numel() else 1.0
            assert_close(value.double(), ref.to(value.device), torch.float32, scale=scale * size, msg=f"{name} {msg}")


@settings(max_examples=60)
@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(["unbatched", "rows", "kdim"]),
    n=st.integers(0, 5),
    c=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    backend_name=st.sampled_from(BACKENDS),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    use_weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    z_loss=st.sampled_from([0.0, 0.01]),
    softcap=st.sampled_from([None, 3.0]),
    names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True),
)
def test_cross_entropy_statistics_match_their_definitions(
    device, seed, layout, n, c, dtype, backend_name, reduction, use_weight, label_smoothing, z_loss, softcap, names
):
    assume(_runs_here(backend_name, device))
    with backend(backend_name):
        gen = torch.Generator().manual_seed(seed)
        shape = {"unbatched": (c,), "rows": (n, c), "kdim": (n, c, 3)}[layout]
        target_shape = {"unbatched": (), "rows": (n,), "kdim": (n, 3)}[layout]
        x = (torch.randn(shape, generator=gen) * 4).to(dtype)
        if x.numel() > 1:  # a tie for the largest logit: argmax is the first
            flat = x.view(-1)
            flat[0] = flat[min(1, flat.numel() - 1)] = 50
        y = torch.randint(0, c, target_shape, generator=gen)
        if y.dim() and y.numel():
            y.view(-1)[::3] = -100
        w = (torch.rand(c, generator=gen) + 0.2).to(dtype) if use_weight else None
        x, y = x.to(device), y.to(device)
        w = w.to(device) if w is not None else None
        kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)

        xa = x.clone().requires_grad_()
        loss, stats = xent.cross_entropy(xa, y, return_stats=names, **kw)
        xb = x.clone().requires_grad_()
        plain = xent.cross_entropy(xb, y, **kw)
        # asking for statistics changes nothing in the loss or its gradient
        same = _same_or_last_bits(names, backend_name, device, dtype)
        same(loss, plain)
        if loss.numel():
            up = torch.ones_like(loss)
            (ga,) = torch.autograd.grad(loss, xa, up)
            (gb,) = torch.autograd.grad(plain, xb, up)
            same(ga, gb)

        expected = reference.token_statistics(x, y, tuple(names), -100, z_loss, softcap)
        _check_statistics(stats, expected, tuple(target_shape), dtype, msg=f"{backend_name} {device} {dtype}")


def test_statistics_come_back_in_the_order_of_the_fields_and_a_single_name_works():
    x = torch.randn(4, 10)
    y = torch.tensor([1, 2, -100, 3])
    loss, stats = xent.cross_entropy(x, y, return_stats="entropy")
    assert isinstance(stats, xent.TokenStatistics) and stats.lse is None and stats.entropy.shape == (4,)
    loss, stats = xent.cross_entropy(x, y, return_stats=["correct", "lse", "correct"])
    assert stats.correct[2].item() is False and stats.lse is not None and stats.entropy is None
    assert xent.cross_entropy(x, y, return_stats=None).shape == ()


def test_the_modules_forward_statistics(device):
    """CrossEntropyLoss and LinearCrossEntropyLoss take return_stats= in forward: their functional's values
    with the module's options; without it the module returns the loss alone, as torch's."""
    x = torch.randn(5, 11, dtype=torch.float64, device=device)
    y = torch.tensor([1, 2, -100, 3, 10], device=device)
    module = xent.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, reduction="sum")
    loss, stats = module(x, y, return_stats=NAMES)
    want_loss, want = xent.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, reduction="sum", return_stats=NAMES)
    assert torch.equal(loss, want_loss) and all(torch.equal(a, b) for a, b in zip(stats, want))
    assert torch.equal(module(x, y), want_loss)
    head = xent.LinearCrossEntropyLoss(4, 11, bias=True, dtype=torch.float64, device=device, ignore_index=3)
    h = torch.randn(5, 4, dtype=torch.float64, device=device)
    y = torch.tensor([1, 2, 3, 3, 10], device=device)
    loss, stats = head(h, y, return_stats=("logprob", "correct"))
    want_loss, want = xent.linear_cross_entropy(
        h, head.linear.weight, y, linear_bias=head.linear.bias, ignore_index=3, return_stats=("logprob", "correct")
    )
    assert not stats.correct[2] and stats.logprob[3] == 0
    assert torch.equal(loss, want_loss) and torch.equal(stats.logprob, want.logprob)
    assert torch.equal(stats.correct, want.correct) and stats.lse is None


def test_ignored_rows_and_rows_without_classes():
    x = torch.tensor([[1.0, 5.0, 5.0], [0.0, 0.0, 9.0]])
    y = torch.tensor([1, -100])
    _, stats = xent.cross_entropy(x, y, z_loss=0.1, return_stats=NAMES)
    assert stats.argmax.tolist() == [1, 2]  # the first of a tie; ignored rows still have an argmax
    assert stats.correct.tolist() == [True, False]
    assert stats.logprob[1] == 0 and stats.z_loss[1] == 0  # ignored: 0, as in the loss
    assert stats.lse[1] > 8.9 and stats.entropy[1] > 0  # functions of the logits alone
    # no classes (every target ignored): lse = -inf, no argmax, entropy 0
    _, stats = xent.cross_entropy(torch.empty(2, 0), torch.full((2,), -100), return_stats=NAMES)
    assert stats.lse.tolist() == [-float("inf")] * 2 and stats.argmax.tolist() == [-1, -1]
    assert stats.entropy.tolist() == [0.0, 0.0] and stats.correct.tolist() == [False, False]
    assert stats.logprob.tolist() == [0.0, 0.0]
    # no rows
    _, stats = xent.cross_entropy(torch.empty(0, 5), torch.empty(0, dtype=torch.long), return_stats=NAMES)
    assert all(getattr(stats, n).shape == (0,) for n in NAMES)


def test_uint8_targets():
    x = torch.randn(3, 6)
    y = torch.tensor([1, 5, 200], dtype=torch.uint8)
    _, stats = xent.cross_entropy(x, y, ignore_index=200, return_stats=("correct", "logprob"))
    ref = reference.token_statistics(x, y.long(), ("correct", "logprob"), 200)
    assert torch.equal(stats.correct, ref["correct"])
    assert_close(stats.logprob.double(), ref["logprob"], torch.float32)


def test_probability_targets_have_the_statistics_of_the_logits():
    x = torch.randn(4, 7, dtype=torch.float64)
    p = torch.rand(4, 7, dtype=torch.float64).softmax(1)
    _, stats = xent.cross_entropy(x, p, z_loss=0.5, return_stats=("lse", "entropy", "z_loss", "argmax"))
    ref = reference.token_statistics(x, p, ("lse", "entropy", "z_loss", "argmax"), z_loss=0.5)
    _check_statistics(stats, ref, (4,), torch.float64)
    for name in ("logprob", "correct"):
        with pytest.raises(ValueError, match="class-index targets"):
            xent.cross_entropy(x, p, return_stats=name)


@pytest.mark.parametrize(
    "value, error", [("accuracy", ValueError), (("lse", 3), ValueError), (5, TypeError), (("lse", None), ValueError)]
)
def test_bad_names_raise(value, error):
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(error, match="return_stats"):
        xent.cross_entropy(x, y, return_stats=value)
    with pytest.raises(error, match="return_stats"):
        xent.linear_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), y, return_stats=value)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.triton
def test_argmax_ties_across_the_kernels_blocks(monkeypatch):
    """The Triton kernel streams a row in blocks: a tie between blocks keeps the earlier column, as
    torch.argmax; and the entropy is re-based correctly when a later block raises the max."""
    from xent.kernels import triton_rows

    monkeypatch.setenv("XENT_BACKEND", "triton")
    monkeypatch.setattr(triton_rows, "LAUNCH_OVERRIDE", (16, 4, 0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 70) * 2
    x[0, 5] = x[0, 40] = 9.0  # tie in blocks 0 and 2
    x[1, 66] = 30.0  # max in the last block, after smaller ones
    x[2] = -1.0  # a whole row of ties
    y = torch.tensor([40, 66, 3])
    _, stats = xent.cross_entropy(x.to(device), y.to(device), return_stats=NAMES)
    ref = reference.token_statistics(x, y, NAMES)
    _check_statistics(stats, ref, (3,), torch.float32)
    assert stats.argmax.tolist() == [5, 66, 0]


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 12),
    vocab=st.integers(1, 50),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    backend_name=st.sampled_from(BACKENDS),
    chunk_rows=st.sampled_from([None, 1, 5]),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "none"]),
    softcap=st.sampled_from([None, 4.0]),
    names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True),
)
def test_linear_cross_entropy_statistics(
    device, seed, n, vocab, dtype, backend_name, chunk_rows, bias, reduction, softcap, names
):
    assume(_runs_here(backend_name, device))
    with backend(backend_name):
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(n, 8, generator=gen).to(dtype).to(device)
        w = (torch.randn(vocab, 8, generator=gen) * 0.7).to(dtype).to(device)
        b = torch.randn(vocab, generator=gen).to(dtype).to(device) if bias else None
        y = torch.randint(0, vocab, (n,), generator=gen)
        y[::4] = -100
        y = y.to(device)
        budget = None if chunk_rows is None else chunk_rows * vocab * 4
        kw = dict(linear_bias=b, reduction=reduction, z_loss=0.01, softcap=softcap, memory_budget=budget)
        ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = xent.linear_cross_entropy(ha, wa, y, return_stats=names, **kw)
        hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
        plain = xent.linear_cross_entropy(hb, wb, y, **kw)
        same = _same_or_last_bits(names, backend_name, device, dtype)
        same(loss, plain)
        if n:
            up = torch.ones_like(loss)
            for a, b_ in zip(torch.autograd.grad(loss, (ha, wa), up), torch.autograd.grad(plain, (hb, wb), up)):
                same(a, b_)
        # the reference sees the logits as the head computes them (rounded to bf16 for a bf16 head)
        logits = torch.nn.functional.linear(h, w, b)
        expected = reference.token_statistics(logits, y, tuple(names), -100, 0.01, softcap)
        _check_statistics(stats, expected, (n,), dtype, msg=f"{backend_name} {device} {dtype}")


@pytest.mark.compile
def test_statistics_under_compile_and_torch_func():
    x = torch.randn(6, 20, requires_grad=True)
    y = torch.tensor([1, 2, 3, -100, 5, 6])
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)

    def both(x, y, h, w):
        loss, stats = xent.cross_entropy(x, y, return_stats=("lse", "correct", "entropy"))
        lin_loss, lin_stats = xent.linear_cross_entropy(h, w, y, return_stats=("logprob", "argmax"))
        return loss + lin_loss, stats, lin_stats

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    loss_c, stats_c, lin_c = compiled(x, y, h, w)
    loss_e, stats_e, lin_e = both(x, y, h, w)
    assert_close(loss_c, loss_e, torch.float32)
    for a, b in zip(stats_c + lin_c, stats_e + lin_e):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a.double(), b.double(), torch.float32)
    loss_c.backward()
    grads_c = [t.grad.clone() for t in (x, h, w)]
    for t in (x, h, w):
        t.grad = None
    loss_e.backward()
    for g, t in zip(grads_c, (x, h, w)):
        assert_close(g, t.grad, torch.float32)

    # torch.func: the statistics come from the formulas, and the loss stays differentiable
    def loss_only(x):
        loss, stats = xent.cross_entropy(x, y, return_stats=("entropy", "argmax"))
        return loss, stats.entropy

    (g, entropy) = torch.func.grad(loss_only, has_aux=True)(x.detach())
    assert_close(g, torch.func.grad(lambda x: xent.cross_entropy(x, y))(x.detach()), torch.float32)
    assert_close(entropy.double(), reference.token_statistics(x.detach(), y, ("entropy",))["entropy"], torch.float32)


def test_linear_statistics_refuse_what_goes_through_the_logits():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(NotImplementedError, match="return_stats"):
        xent.linear_cross_entropy(h, w, torch.rand(3, 5).softmax(1), return_stats="lse")
