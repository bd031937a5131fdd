"""Shared helpers for the differential tests."""

from __future__ import annotations

import torch

# Parity tolerances against torch (../shared/reference/torch-semantics.md, "Numerics"). Half precision is
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
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale,
                               equal_nan=True, check_dtype=True, msg=lambda m: f"{msg}\n{m}")


def raises_like(fn_ours, fn_torch):
    """Run both; return (our exception, torch's exception), either possibly None."""
    def run(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - we compare whatever is raised
            return exc
        return None
    return run(fn_ours), run(fn_torch)
