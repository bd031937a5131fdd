"""Compute backends. They take validated problems and only compute.

* ``torch`` (kernels/portable.py over kernels/rows.py): plain torch ops, any device; tuned for CPU.
* ``triton`` (kernels/triton_rows.py): one Triton kernel for the row math; CUDA tensors, or CPU tensors
  through Triton's interpreter (TRITON_INTERPRET=1, how CI checks it without a GPU).

``XENT_BACKEND=torch|triton|auto`` picks one (default auto: triton for CUDA tensors when triton is
installed, torch otherwise); asking for an unavailable one raises. `rows.pass_chunk` is the one
per-chunk step that cross-entropy, linear cross-entropy and the vocab-parallel passes all go through, on
either backend.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

from . import portable

BACKENDS = ("auto", "torch", "triton")


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'xent[cuda]')"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # CPU tensors through Triton's interpreter
    return (f"the Triton backend runs on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run its "
            f"kernels on CPU through Triton's interpreter")


def backend_for(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'torch' or 'triton' for tensors on `device` (float64 always takes the torch backend)."""
    choice = os.environ.get("XENT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"XENT_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch" or dtype == torch.float64:
        return "torch"
    reason = triton_unavailable(device)
    if choice == "triton":
        if reason:
            raise RuntimeError(f"XENT_BACKEND=triton, but {reason}")
        return "triton"
    return "triton" if device.type == "cuda" and reason is None else "torch"


def forward_for(problem) -> Callable:
    """The cross-entropy forward for a Problem: (problem, need_grad) -> (loss, grad for a unit upstream).

    The Triton driver serves class-index targets over (N, C) rows; probability targets and K-dim input
    take the portable driver (also on CUDA).
    """
    if backend_for(problem.logits.device, problem.compute_dtype) == "triton":
        from . import triton_rows

        if triton_rows.supports(problem):
            return triton_rows.cross_entropy_forward
    return portable.cross_entropy_forward


def scale_by_upstream_(grad: torch.Tensor, upstream: torch.Tensor, per_row: bool = False) -> None:
    """grad *= upstream in place, with fp32 math for half-precision gradients.

    Backward hands over a gradient computed for a unit upstream gradient; this applies the real one.
    `upstream` is a scalar, or with `per_row` one value per row of `grad` (rows = its first dimension,
    all other dimensions contiguous per row). A unit upstream (what loss.backward() passes) costs nothing:
    on CPU it is read on the host, on the Triton backend each program reads it on the device and returns
    before touching the gradient, so there is no host synchronisation and no pass over the buffer.
    """
    if grad.numel() == 0:
        return
    if backend_for(grad.device, grad.dtype) == "triton" and grad.is_contiguous():
        from . import triton_rows

        triton_rows.scale_(grad, upstream, per_row)
        return
    if not per_row and upstream.device.type == "cpu" and float(upstream) == 1.0:
        return
    # In-place ops compute in the promoted dtype and cast once: an fp32 upstream of 65536 stays finite
    # here, where casting it to fp16 first would make it inf.
    grad.mul_(upstream.reshape(grad.shape[0], *([1] * (grad.dim() - 1))) if per_row else upstream)
