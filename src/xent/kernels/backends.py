"""The compute backends, as objects that say what they support and compute: one chunk of rows through
the row math, a whole cross-entropy, and the in-place upstream scaling of a handed-over gradient.

* ``TORCH``: plain torch ops over rows.py, any device (tuned for CPU); serves every problem.
* ``TRITON``: the Triton row kernel (triton_rows.py); CUDA tensors, or CPU tensors through Triton's
  interpreter (TRITON_INTERPRET=1, how CI checks it without a GPU). It also has a whole-problem
  cross-entropy (one launch over all rows) for class-index targets over (N, C) rows in fp32/bf16/fp16;
  other problems take the chunk driver.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from . import rows


class TorchBackend:
    name = "torch"

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def cross_entropy_driver(self, problem):
        """A whole-problem cross-entropy of this backend's own for `problem`, or None: the chunk driver
        (kernels/portable.py) then runs it, chunk by chunk, through `chunk`."""
        return None

    def chunk(self, *args, **kwargs) -> None:
        rows.torch_chunk(*args, **kwargs)

    def scale_(self, grad: Tensor, upstream: Tensor, per_row: bool) -> None:
        """grad *= upstream (one value per row with per_row), fp32 math; entries that are exactly 0 stay 0
        (ignored rows, as torch keeps them, even for an inf or NaN upstream)."""
        u = upstream.reshape(grad.shape[0], *([1] * (grad.dim() - 1))) if per_row else upstream
        if upstream.device.type == "cpu":  # reading a CPU value costs nothing
            if not per_row and float(upstream) == 1.0:
                return  # skip the pass over the buffer
            if bool(torch.isfinite(upstream).all()):
                # 0 * finite = 0. In-place ops compute in the promoted dtype and cast once: an fp32
                # upstream of 65536 stays finite here, where casting it to fp16 first would make it inf.
                grad.mul_(u)
                return
        # not a 0-d tensor: on CUDA a 0-d fp32 operand would be cast to the gradient's half dtype first
        # (65536 -> inf in fp16); a 1-element one promotes the product to fp32 and rounds once
        u = u if per_row else upstream.reshape(1)
        grad.copy_(torch.where((grad == 0) | (u == 1), grad, grad * u))

    def __repr__(self) -> str:
        return f"<xent backend {self.name}>"


class TritonBackend(TorchBackend):
    name = "triton"

    def unavailable(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'xent[cuda]')"
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None  # CUDA tensors, or CPU tensors through Triton's interpreter
        return (
            f"the Triton backend runs on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run its "
            f"kernels on CPU through Triton's interpreter"
        )

    @staticmethod
    def _kernels():
        from . import triton_rows  # imported on first use: triton is optional

        return triton_rows

    def cross_entropy_driver(self, problem):
        kernels = self._kernels()
        return kernels.cross_entropy_forward if kernels.supports(problem) else None

    def chunk(self, *args, chain_out=None, unshifted=False, **kwargs) -> None:
        # The kernel applies the softcap chain factor itself and always shifts by the running max: it
        # needs neither the chain scratch nor the unshifted shortcut of the torch row math.
        self._kernels().triton_chunk(*args, **kwargs)

    def scale_(self, grad: Tensor, upstream: Tensor, per_row: bool) -> None:
        if not grad.is_contiguous():
            super().scale_(grad, upstream, per_row)
            return
        self._kernels().scale_(grad, upstream, per_row)


TORCH = TorchBackend()
TRITON = TritonBackend()
