"""The compute backends, as objects in a registry, each saying what it serves and computing it: one chunk
of rows through the cross-entropy row math, one chunk of a distillation's row math, a whole cross-entropy
(optional), a whole fused linear pass (optional), and the in-place upstream scaling of a handed-over
gradient.

* ``TORCH``: plain torch ops over rows.py, any device (tuned for CPU); serves every problem. It is the
  full implementation: every other backend subclasses it and overrides what it does differently.
* ``TRITON``: the Triton row kernel (triton_rows.py); CUDA tensors, or CPU tensors through Triton's
  interpreter (TRITON_INTERPRET=1, how CI checks it without a GPU); fp32/bf16/fp16, never fp64. It also
  has a whole-problem cross-entropy (one launch over all rows) for class-index targets over (N, C) rows;
  other problems take the chunk driver. Distillation's row math is the torch backend's (inherited; its
  `supports` says so, and selection hands that work to ``TORCH``).

`register` adds a backend under its `name` (kernels.backend_for then picks it for ``backend=name`` or
``XENT_BACKEND=name``); ``TORCH`` and ``TRITON`` are registered at import. A backend that would take over a
whole fused linear cross-entropy (e.g. a Hopper kernel with the GEMMs and the row math in one) overrides
`linear_pass` and lists ``Work.FUSED_LINEAR`` in its capabilities; kernels/linear.py asks it first.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..problems import HALF_DTYPES, DistillProblem, LinearProblem, Problem
from . import rows
from .distill_rows import slab_gradient, torch_distill_rows


class Work(enum.Enum):
    """The kinds of work a backend can serve (Backend.supports)."""

    ROWS = "rows"  # the cross-entropy chunk step (Backend.chunk): every cross-entropy pass's row math
    CROSS_ENTROPY = "cross_entropy"  # a whole-problem cross-entropy of its own (Backend.cross_entropy_driver)
    DISTILL_ROWS = "distill_rows"  # one chunk of a distillation's row math (Backend.distill_rows)
    FUSED_LINEAR = "fused_linear"  # a whole fused linear cross-entropy pass of its own (Backend.linear_pass)


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves, before any problem is looked at. None: no restriction."""

    work: frozenset[Work]
    dtypes: frozenset[torch.dtype] | None = None  # dtypes of the tensors it computes on (and computes in)
    devices: frozenset[str] | None = None  # device types whose tensors it runs on (Backend.unavailable)


@dataclass(frozen=True, eq=False)
class ChunkStep:
    """One chunk of rows r0:r1 of a cross-entropy pass, for a backend's row math (what driver.RowPass hands
    over for each of its chunks). See rows.torch_chunk for the contract."""

    workspace: Tensor  # (r1 - r0, C): where the row math works, and leaves the gradient with `coefficients`
    r0: int
    r1: int
    stats: rows.RowStats  # the pass's statistics, filled for rows r0:r1
    load: Callable[[], object]  # puts the chunk's raw logits in `workspace` (not called with `source`)
    source: Tensor | None = None  # the chunk's logits, read in place instead of loaded
    target: Tensor | None = None  # (r1 - r0, 1) each row's target column within the workspace
    dense: Tensor | None = None  # the loss's u ((C,) or per row), only when it has a dense term
    dense_is_ones: bool = False
    softcap: float | None = None
    # the (capped) logits are divided by it in the row math (then not read in place); a tensor: per row (rows,)
    temperature: float | Tensor = 1.0
    chain_out: Tensor | None = None  # scratch of the workspace's shape for the softcap chain factor
    coefficients: rows.ChunkCoefficients | None = None  # given: leave the gradient in the workspace
    unshifted: bool = False  # exp(z) without the max shift where it is safe (a host check: CPU only)

    def positional(self) -> tuple:
        """The row kernels' positional arguments (rows.torch_chunk, triton_rows.triton_chunk)."""
        return self.workspace, self.r0, self.r1, self.stats, self.load

    def keywords(self) -> dict:
        """The keyword arguments both row kernels take (not the torch row math's chain_out and unshifted)."""
        return dict(
            source=self.source,
            target=self.target,
            dense=self.dense,
            dense_is_ones=self.dense_is_ones,
            softcap=self.softcap,
            temperature=self.temperature,
            coefficients=self.coefficients,
        )


@dataclass(frozen=True, eq=False)
class DistillStep:
    """One chunk of a distillation pass for a backend's distillation row math (what driver.DistillRowPass
    hands over). Every (rows x V) tensor here is a workspace of the pass: the math may overwrite them all.
    See kernels/distill_rows.py for the math and its conventions."""

    divergence: str  # 'kl' | 'reverse_kl' | 'jsd' (a top-k teacher: 'kl' over the given support)
    beta: float  # jsd's weight of KL(p_t || m)
    student: Tensor  # (rows, V): the student's logits / T
    teacher: Tensor | None  # (rows, V): a dense teacher's logits / T; None for a top-k teacher
    scratch: tuple[Tensor, ...]  # (rows, V) workspaces: one, two for jsd
    counted: Tensor  # (rows, 1) bool: the tokens that count
    coef: Tensor | None  # (rows, 1): d loss / d divergence / T, 0 on ignored rows; None: no gradient
    teacher_indices: Tensor | None = None  # top-k: (rows, k)
    teacher_logprobs: Tensor | None = None  # top-k: (rows, k)
    # the lean plan (kernels/distill.py): (rows, 3) per-row (lse_s, lse_t, aux) that a whole-row step fills,
    # or that a step over a slab of the classes starting at `class_start` reads to return only the gradient
    row_stats: Tensor | None = None
    class_start: int | None = None


# (the rows' statistics, the gradients of the input, the head's weight and its bias): kernels/linear.py
LinearPassResult = tuple[rows.RowStats, Tensor | None, Tensor | None, Tensor | None]
CrossEntropyForward = Callable[..., tuple]  # (problem, need_grad, upstream=None, entropy_upstream=None)


class Backend:
    """The interface every backend implements (TorchBackend: all of it; the others subclass that)."""

    name: str = ""
    capabilities: Capabilities = Capabilities(frozenset())
    # The chunk step reads and writes a bf16/fp16 workspace itself, with fp32 math: a half-precision linear
    # head then keeps its logits (and their gradient) in its own dtype (kernels/linear.py workspace_dtype).
    half_precision_workspace: bool = False
    # The chunk step needs ChunkStep.chain_out (scratch for the softcap chain factor) for a softcap gradient.
    softcap_chain_scratch: bool = False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this backend cannot run on `device`'s tensors here (a sentence for an error), or None."""
        devices = self.capabilities.devices
        if devices is not None and device.type not in devices:
            return f"the {self.name} backend runs on {', '.join(sorted(devices))} tensors (got {device.type})"
        return None

    def supports(
        self,
        work: Work = Work.ROWS,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        problem: Problem | LinearProblem | DistillProblem | None = None,
    ) -> bool:
        """Whether this backend serves `work` (for tensors of `dtype` on `device`, for `problem`: each
        only looked at when given). Selection hands what it does not serve to the torch backend."""
        caps = self.capabilities
        if work not in caps.work:
            return False
        if dtype is not None and caps.dtypes is not None and dtype not in caps.dtypes:
            return False
        return device is None or caps.devices is None or device.type in caps.devices

    def chunk(self, step: ChunkStep) -> None:
        """One chunk of a cross-entropy pass through the row math: statistics of rows r0:r1 into
        step.stats and, with step.coefficients, the gradient in step.workspace."""
        raise NotImplementedError

    def distill_rows(self, step: DistillStep) -> tuple[Tensor, Tensor | None]:
        """One chunk of a distillation pass: the rows' divergences (rows,) and, with step.coef, coef * d
        divergence / d (student logits / T) (rows, V), in one of the step's workspaces (else None). A step
        over a slab of the classes (step.class_start) returns (None, the slab's gradient)."""
        raise NotImplementedError

    def scale_(self, grad: Tensor, upstream: Tensor, per_row: bool) -> None:
        """grad *= upstream in place (one value per row with per_row), fp32 math; entries that are exactly
        0 stay 0 (ignored rows, as torch keeps them, even for an inf or NaN upstream)."""
        raise NotImplementedError

    def cross_entropy_driver(self, problem: Problem) -> CrossEntropyForward | None:
        """A whole-problem cross-entropy of this backend's own for `problem` (portable.cross_entropy_forward's
        signature), or None: the chunk driver (kernels/portable.py) then runs it over the torch backend."""
        return None

    def linear_pass(
        self,
        problem: LinearProblem,
        block: rows.ClassBlock,
        *,
        targets: rows.IndexTargets | None,
        scale: Tensor | None,
        want: tuple[bool, bool, bool],
        lse: Tensor | None,
        entropy_scale: Tensor | None,
        entropy_value: Tensor | None,
    ) -> LinearPassResult | None:
        """A whole fused linear cross-entropy pass of this backend's own (kernels/linear.py linear_pass's
        contract and result), or None: the generic chunked GEMM path of kernels/linear.py then runs it,
        with this backend's `chunk` as its row math. Asked only when `supports(Work.FUSED_LINEAR)`."""
        return None

    def __repr__(self) -> str:
        return f"<xent backend {self.name}>"


class TorchBackend(Backend):
    name = "torch"
    capabilities = Capabilities(frozenset({Work.ROWS, Work.DISTILL_ROWS}))
    softcap_chain_scratch = True

    def chunk(self, step: ChunkStep) -> None:
        rows.torch_chunk(*step.positional(), **step.keywords(), chain_out=step.chain_out, unshifted=step.unshifted)

    def distill_rows(self, step: DistillStep) -> tuple[Tensor | None, Tensor | None]:
        if step.class_start is not None:
            grad = slab_gradient(
                step.divergence,
                step.beta,
                step.student,
                step.teacher,
                step.scratch,
                step.coef,
                step.row_stats,
                step.class_start,
                step.counted,
                step.teacher_indices,
                step.teacher_logprobs,
            )
            return None, grad
        return torch_distill_rows(
            step.divergence,
            step.beta,
            step.student,
            step.teacher,
            step.scratch,
            step.counted,
            step.coef,
            step.teacher_indices,
            step.teacher_logprobs,
            step.row_stats,
        )

    def scale_(self, grad: Tensor, upstream: Tensor, per_row: bool) -> None:
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


class TritonBackend(TorchBackend):
    name = "triton"
    capabilities = Capabilities(
        frozenset({Work.ROWS, Work.CROSS_ENTROPY}),
        dtypes=frozenset({torch.float32, *HALF_DTYPES}),
        devices=frozenset({"cuda", "cpu"}),  # CPU tensors only through Triton's interpreter (unavailable)
    )
    half_precision_workspace = True
    # The kernel applies the softcap chain factor itself and always shifts by the running max: it needs
    # neither the chain scratch nor the unshifted shortcut of the torch row math.
    softcap_chain_scratch = False

    def unavailable(self, device: torch.device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install -e '.[cuda]' from the xent clone)"
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return None  # CUDA tensors, or CPU tensors through Triton's interpreter
        return (
            f"the Triton backend runs on CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run its "
            f"kernels on CPU through Triton's interpreter"
        )

    def supports(
        self,
        work: Work = Work.ROWS,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        problem: Problem | LinearProblem | DistillProblem | None = None,
    ) -> bool:
        if not super().supports(work, dtype=dtype, device=device, problem=problem):
            return False
        if work is Work.CROSS_ENTROPY and isinstance(problem, Problem):
            # the whole-problem kernel's cases: class-index targets over (N, C) rows, fp32 math
            return (
                not problem.probabilities
                and problem.logits.shape[2] == 1
                and problem.compute_dtype == torch.float32
                and problem.logits.dtype in self.capabilities.dtypes
            )
        return True

    @staticmethod
    def _kernels():
        from . import triton_rows  # imported on first use: triton is optional

        return triton_rows

    def cross_entropy_driver(self, problem: Problem) -> CrossEntropyForward | None:
        return self._kernels().cross_entropy_forward if self.supports(Work.CROSS_ENTROPY, problem=problem) else None

    def chunk(self, step: ChunkStep) -> None:
        # The kernel applies the softcap chain factor itself and always shifts by the running max: it
        # needs neither the chain scratch nor the unshifted shortcut of the torch row math.
        self._kernels().triton_chunk(*step.positional(), **step.keywords())

    def scale_(self, grad: Tensor, upstream: Tensor, per_row: bool) -> None:
        if not grad.is_contiguous():
            super().scale_(grad, upstream, per_row)
            return
        self._kernels().scale_(grad, upstream, per_row)


# ----------------------------------------------------------------------------------------------------
# The registry

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Adds `backend` under its name (lower case; not 'auto', which means the automatic choice). A name
    already taken raises: unregister it first."""
    name = backend.name
    if not name or name != name.strip().lower() or name == "auto":
        raise ValueError(f"a backend needs a lower-case name other than 'auto', got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"a backend named {name!r} is already registered")
    _REGISTRY[name] = backend
    return backend


def unregister(name: str) -> Backend:
    """Removes the backend registered as `name` and returns it (torch's cannot be: it is the fallback)."""
    if name == TORCH.name:
        raise ValueError("the torch backend cannot be unregistered: every fallback takes it")
    return _REGISTRY.pop(get(name).name)


def get(name: str) -> Backend:
    """The backend registered as `name`; ValueError naming the registered ones for any other."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}: the registered ones are {', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """The registered backends' names, in registration order."""
    return tuple(_REGISTRY)


TORCH = register(TorchBackend())
TRITON = register(TritonBackend())
