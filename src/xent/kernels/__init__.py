"""Compute backends (kernels/backends.py: objects in a registry). They take validated problems and only
compute.

A per-call choice (``backend=``: Options.backend, DistillProblem.backend) picks one by name; without one,
``XENT_BACKEND=torch|triton|auto`` does (default auto: triton for CUDA tensors when triton is installed,
torch otherwise). Asking for an unavailable one raises. Each backend's `chunk` is the one per-chunk step
that cross-entropy, linear cross-entropy and the vocab-parallel passes all go through (kernels/driver.py);
its `distill_rows` the one the linear distillation losses go through.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import portable
from .backends import TORCH, TRITON, Backend, Work, get, names

AUTO = "auto"


def check_backend_name(name: str | None) -> str | None:
    """A user's ``backend=`` argument, normalised: None (no choice: ``XENT_BACKEND`` decides), 'auto' (the
    automatic choice, whatever the environment says) or a registered backend's name, in lower case.
    ValueError naming the registered ones for anything else, TypeError for a value that is not a string."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"backend must be a backend's name or None, got {type(name).__name__}")
    key = name.strip().lower()
    if key != AUTO and key not in names():
        raise ValueError(f"backend must be one of {', '.join((AUTO, *names()))} or None, got {name!r}")
    return key


def _auto(device: torch.device) -> Backend:
    """The automatic choice: the Triton kernel for CUDA tensors when it can run, the torch backend else."""
    return TRITON if device.type == "cuda" and TRITON.unavailable(device) is None else TORCH


def backend_for(
    device: torch.device, dtype: torch.dtype | None = None, choice: str | None = None, work: Work = Work.ROWS
) -> Backend:
    """The backend that does `work` for tensors of `dtype` on `device`.

    `choice` (a backend's name or 'auto', e.g. Options.backend; None: no choice) overrides the
    ``XENT_BACKEND`` environment variable, which overrides the automatic choice. A backend that does not
    do `work` for `dtype` hands it to the torch backend, before any check that it can run here (float64
    never needs Triton installed, nor distillation, whose row math is torch's); an explicitly chosen
    backend that cannot run here raises RuntimeError; an unknown name ValueError."""
    name = check_backend_name(choice)
    asked = f"backend={name!r} was asked for"
    if name is None:
        name = os.environ.get("XENT_BACKEND", AUTO).strip().lower() or AUTO
        if name != AUTO and name not in names():
            raise ValueError(f"XENT_BACKEND must be one of {', '.join((AUTO, *names()))}, got {name!r}")
        asked = f"XENT_BACKEND={name}"
    backend = _auto(device) if name == AUTO else get(name)
    if not backend.supports(work, dtype=dtype):
        return TORCH  # before availability: what the backend does not do never needs it installed
    if name != AUTO:
        reason = backend.unavailable(device)
        if reason:
            raise RuntimeError(f"{asked}, but {reason}")
    return backend


def forward_for(problem) -> Callable:
    """The cross-entropy forward for a Problem: (problem, need_grad, upstream=None) -> (loss, gradient for a
    unit upstream gradient, or for `upstream`). Problems the chosen backend's own driver does not serve
    (probability targets, K-dim input on Triton) take the torch chunk driver, also on CUDA."""
    backend = backend_for(problem.logits.device, problem.compute_dtype, problem.options.backend)
    driver = backend.cross_entropy_driver(problem) if backend.supports(Work.CROSS_ENTROPY, problem=problem) else None
    return driver or portable.cross_entropy_forward


def scale_by_upstream_(grad: torch.Tensor, upstream: torch.Tensor, per_row: bool = False, choice: str | None = None):
    """grad *= upstream in place, with fp32 math for half-precision gradients.

    Backward hands over a gradient computed for a unit upstream gradient; this applies the real one.
    `upstream` is a scalar, or with `per_row` one value per row of `grad` (rows = its first dimension,
    all other dimensions contiguous per row). A unit upstream (what loss.backward() passes) costs nothing:
    on CPU it is read on the host, on the Triton backend each program reads it on the device and returns
    before touching the gradient, so there is no host synchronisation and no pass over the buffer.
    `choice`: the call's backend choice (as backend_for's).
    """
    if grad.numel():
        backend_for(grad.device, grad.dtype, choice).scale_(grad, upstream, per_row)
