"""Compute backends (kernels/backends.py). They take validated problems and only compute.

``XENT_BACKEND=torch|triton|auto`` picks one (default auto: triton for CUDA tensors when triton is
installed, torch otherwise); asking for an unavailable one raises. Each backend's `chunk` is the one
per-chunk step that cross-entropy, linear cross-entropy and the vocab-parallel passes all go through.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import portable
from .backends import TORCH, TRITON, TorchBackend

BACKENDS = ("auto", "torch", "triton")


def backend_for(device: torch.device, dtype: torch.dtype | None = None) -> TorchBackend:
    """The backend for tensors on `device` (float64 always takes the torch backend)."""
    choice = os.environ.get("XENT_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"XENT_BACKEND must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch" or dtype == torch.float64:
        return TORCH
    reason = TRITON.unavailable(device)
    if choice == "triton":
        if reason:
            raise RuntimeError(f"XENT_BACKEND=triton, but {reason}")
        return TRITON
    return TRITON if device.type == "cuda" and reason is None else TORCH


def forward_for(problem) -> Callable:
    """The cross-entropy forward for a Problem: (problem, need_grad, upstream=None) -> (loss, gradient for a
    unit upstream gradient, or for `upstream`). Problems the chosen backend's driver does not serve
    (probability targets, K-dim input on Triton) take the torch driver, also on CUDA."""
    backend = backend_for(problem.logits.device, problem.compute_dtype)
    return backend.cross_entropy_driver(problem) or portable.cross_entropy_forward


def scale_by_upstream_(grad: torch.Tensor, upstream: torch.Tensor, per_row: bool = False) -> None:
    """grad *= upstream in place, with fp32 math for half-precision gradients.

    Backward hands over a gradient computed for a unit upstream gradient; this applies the real one.
    `upstream` is a scalar, or with `per_row` one value per row of `grad` (rows = its first dimension,
    all other dimensions contiguous per row). A unit upstream (what loss.backward() passes) costs nothing:
    on CPU it is read on the host, on the Triton backend each program reads it on the device and returns
    before touching the gradient, so there is no host synchronisation and no pass over the buffer.
    """
    if grad.numel():
        backend_for(grad.device, grad.dtype).scale_(grad, upstream, per_row)
