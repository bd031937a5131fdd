"""xent's torchtitan loss components against torchtitan's own (0.3: torchtitan.components.loss), one process.

The distributed paths (tensor parallel, FSDP2 with torchtitan's summed gradients, the full_dtensor layout)
are tested with gloo in tests/distributed (the "torchtitan" scenarios of dist_mesh2d.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

tt_loss = pytest.importorskip("torchtitan.components.loss", reason="torchtitan is not installed")
xent_tt = pytest.importorskip("xent.integrations.torchtitan")


def _batch(dtype=torch.float32, b=2, seq=8, hidden=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, seq, hidden, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (b, seq), generator=gen)
    labels[0, :3] = tt_loss.IGNORE_INDEX
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen).to(dtype) / 4)
    return h, labels, head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_loss_equals_torchtitans(dtype):
    h, labels, head = _batch(dtype)
    logits = head(h).detach()
    count = (labels != tt_loss.IGNORE_INDEX).sum()
    ours_fn = xent_tt.CrossEntropyLoss.Config().build()
    theirs_fn = tt_loss.CrossEntropyLoss.Config().build()
    results = []
    for fn in (ours_fn, theirs_fn):
        x = logits.clone().requires_grad_()
        loss, metrics = fn(x, labels, count)
        assert metrics == {}
        loss.backward()
        results.append((loss, x.grad))
    (ours, g_ours), (theirs, g_theirs) = results
    assert ours.dtype == torch.float32 == theirs.dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=4e-3, atol=1e-3)
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), **tol)
    assert g_ours.dtype == dtype


def test_label_smoothing_and_z_loss_options():
    h, labels, head = _batch()
    logits = head(h).detach()
    fn = xent_tt.CrossEntropyLoss.Config(label_smoothing=0.1).build()
    loss, _ = fn(logits, labels, torch.tensor(10))
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1, reduction="sum") / 10
    torch.testing.assert_close(loss, expected)
    with_z, _ = xent_tt.CrossEntropyLoss.Config(z_loss=1e-2).build()(logits, labels, None)
    plain, _ = xent_tt.CrossEntropyLoss.Config().build()(logits, labels, None)
    lse = torch.logsumexp(logits.flatten(0, 1), 1)[labels.flatten() != -100]
    torch.testing.assert_close(with_z - plain, 1e-2 * (lse**2).sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_loss_equals_torchtitans_chunked_loss(dtype):
    """xent's fused head against torchtitan's ChunkedLossWrapper (lm_head per chunk + torchtitan's CE):
    the loss, the hidden states' gradient (through the decoder) and the head's gradient."""
    h, labels, head = _batch(dtype, seq=8)
    count = (labels != tt_loss.IGNORE_INDEX).sum()
    results = []
    for config in (xent_tt.LinearCrossEntropyLoss.Config(), tt_loss.ChunkedLossWrapper.Config(num_chunks=4)):
        fn = config.build()
        assert isinstance(fn, tt_loss.ChunkedLossWrapper)  # the trainer then hands it lm_head and skips it
        model_head = torch.nn.Linear(h.shape[-1], 50, bias=False).to(dtype)
        model_head.load_state_dict(head.state_dict())
        fn.set_lm_head(model_head)
        x = h.clone().requires_grad_()
        decoder_out = x * 1.0  # a graph before the loss, as the decoder's
        loss, _ = fn(decoder_out, labels, count)
        loss.backward()
        results.append((loss.detach(), x.grad, model_head.weight.grad))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for ours, theirs, what in zip(results[0], results[1], ("loss", "hidden grad", "head grad")):
        assert ours.dtype == theirs.dtype, what
        torch.testing.assert_close(ours.float(), theirs.float(), **tol, msg=what)


def test_linear_loss_validation_mode_and_missing_head():
    h, labels, head = _batch()
    fn = xent_tt.LinearCrossEntropyLoss.Config().build()
    with pytest.raises(RuntimeError, match="set_lm_head"):
        fn(h, labels, None)
    fn.set_lm_head(head)
    with torch.no_grad():
        loss, _ = fn(h, labels, None)
    expected = F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-5)
    assert not loss.requires_grad
