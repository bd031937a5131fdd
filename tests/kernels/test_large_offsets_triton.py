"""The Triton kernels' index arithmetic above 2^31 elements (issue 20, item 7).

Through Triton's interpreter on a machine without a GPU (natively on one), on strided views of a buffer of
more than 2^31 elements: rows 2^30 + 64 elements apart put the third row's offsets above 2^31, so a row
index or block index left in int32 would read and write the wrong memory. Only the touched rows are
computed, so this runs in seconds (the buffers are allocated, about 4.3 GB each, never filled).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from xent.kernels import rows as rows_mod

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.triton,
]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

ROW_STRIDE = 2**30 + 64  # row 2 starts at 2^31 + 128 elements


def _strided_rows(c, dtype):
    """Three rows of c logits at ROW_STRIDE apart in one buffer of more than 2^31 elements, and their
    compact copy."""
    buf = torch.empty(2 * ROW_STRIDE + c, dtype=dtype, device=DEVICE)
    view = buf.as_strided((3, c), (ROW_STRIDE, 1))
    compact = (torch.randn(3, c, generator=torch.Generator().manual_seed(5)) * 3).to(dtype).to(DEVICE)
    view.copy_(compact)
    return buf, view, compact


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_triton_rows_kernel_offsets_above_2_31(dtype, softcap):
    from xent.kernels import triton_rows

    c = 300
    buf, view, compact = _strided_rows(c, dtype)
    assert view.storage_offset() + 2 * view.stride(0) > 2**31
    target = torch.tensor([4, 150, 299], device=DEVICE)

    def stats_of(z):
        stats = rows_mod.RowStats.empty(3, target=True, dense=False, dtype=torch.float32, device=DEVICE)
        triton_rows.rows_(z, stats=stats, target=target, softcap=softcap)
        return stats

    far, near = stats_of(view), stats_of(compact)
    for name in ("shift", "sumexp", "target_logit"):
        torch.testing.assert_close(getattr(far, name), getattr(near, name), rtol=0, atol=0)

    # the gradient pass, written in place into the far rows (out = z), against the same pass on the copy
    lse = near.shift + near.sumexp.log()
    ones = torch.ones(3, device=DEVICE)
    coefs = (ones, None, -ones, None, None)
    before_gap = buf[ROW_STRIDE + c : ROW_STRIDE + c + 64].clone()
    triton_rows.rows_(view, target=target, softcap=softcap, out=view, coefs=coefs, lse=lse)
    out_near = compact.clone()
    triton_rows.rows_(out_near, target=target, softcap=softcap, out=out_near, coefs=coefs, lse=lse)
    torch.testing.assert_close(view, out_near, rtol=0, atol=0)
    assert torch.equal(buf[ROW_STRIDE + c : ROW_STRIDE + c + 64], before_gap)  # nothing between rows written


@pytest.mark.parametrize("per_row", [False, True])
def test_triton_scale_kernel_offsets_above_2_31(per_row):
    """The in-place upstream scaling: a program that strides over blocks reaches offsets beyond 2^31."""
    import triton

    from xent.kernels import triton_rows

    block = 2048
    if per_row:
        # grid (rows, column blocks) over rows of 2^30 + 64 elements: row 2 starts beyond 2^31; only the
        # first column block of each row is launched (the kernel's column blocks are independent programs)
        n_cols, rows = ROW_STRIDE, 3
        g = torch.empty(rows * n_cols, dtype=torch.bfloat16, device=DEVICE)
        up = torch.tensor([2.0, 3.0, 5.0], device=DEVICE)
        heads = [slice(r * n_cols, r * n_cols + block) for r in range(rows)]
        for r, s in enumerate(heads):
            g[s] = torch.arange(block, device=DEVICE).to(torch.bfloat16) % 17 + r
        expected = [g[s].float() * up[r] for r, s in enumerate(heads)]
        grid, stride = (rows, 1), triton.cdiv(n_cols, block)  # one block per row: the loop stops after it
        triton_rows._scale_kernel[grid](g, up, n_cols, n_cols, stride, PER_ROW=True, BLOCK=block)
    else:
        n = 2**31 + 2 * block
        g = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
        up = torch.tensor([3.0], device=DEVICE)
        blocks = triton.cdiv(n, block)
        stride = blocks - 1  # one program visits block 0 and the last block, 2^31 + 2048 elements in
        heads = [slice(0, block), slice((blocks - 1) * block, n)]
        for i, s in enumerate(heads):
            g[s] = torch.arange(s.stop - s.start, device=DEVICE).to(torch.bfloat16) % 13 + 1 + i
        expected = [g[s].float() * 3.0 for s in heads]
        triton_rows._scale_kernel[(1,)](g, up, n, 0, stride, PER_ROW=False, BLOCK=block)
    for s, e in zip(heads, expected):
        torch.testing.assert_close(g[s].float(), e.to(torch.bfloat16).float(), rtol=0, atol=0)
