"""Shared helpers for the differential tests."""

from __future__ import annotations

import torch

# Parity tolerances against torch (docs/torch-semantics.md, "Numerics"). Half precision is
# looser because torch itself accumulates in half precision; we compare those against float64 instead.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


def loosest(*dtypes):
    """The dtype with the widest tolerance among `dtypes`."""
    return max(dtypes, key=lambda d: TOL[d]["rtol"])


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    dtype = dtype or expected.dtype
    tol = TOL.get(dtype, TOL[torch.float32])
    torch.testing.assert_close(
        actual,
        expected,
        rtol=tol["rtol"] * scale,
        atol=tol["atol"] * scale,
        equal_nan=True,
        check_dtype=True,
        msg=lambda m: f"{msg}\n{m}",
    )


def on(device, *tensors):
    """The tensors moved to `device` (None stays None); on the CPU the very same objects.

    A non-contiguous tensor stays non-contiguous: `.to()` would copy it densely, so its values go into a
    strided view of a wider buffer on the device, as the tests' strided inputs are built.
    """
    out = []
    for t in tensors:
        moved = t.to(device) if t is not None else None
        if moved is t:  # None, or already there
            out.append(t)
            continue
        if not t.is_contiguous() and moved.is_contiguous() and t.dim():
            big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=moved.device)
            big[..., ::2] = moved
            moved = big[..., ::2]
        out.append(moved)
    return out[0] if len(out) == 1 else out
