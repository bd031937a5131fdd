"""The one chunk driver: cross-entropy, linear cross-entropy, the vocab-parallel passes and the linear
distillation losses all run their rows through a backend's row math here, one workspace-sized chunk at a
time.

A caller describes what is the same for every chunk in a *step* object (`RowPass` for cross-entropy: the
backend, the statistics to fill, the targets, the loss's dense term, softcap, the gradient coefficients;
`DistillRowPass` for distillation: the backend, the divergence, the per-token losses to fill, the
coefficients) and yields its chunks from a generator: each chunk says which rows it holds and how its
logits get into the workspaces (a copy, a matmul, or read in place). `drive` runs the step on each; the
generator resumes after its `yield` with the chunk done (the gradient in the workspace, when asked for)
and does what its layout needs next: copy the gradient out, or fold it into the next matmuls, before the
workspaces are reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

from . import rows
from .backends import Backend, ChunkStep, DistillStep

ChunkT = TypeVar("ChunkT")


def drive(step: Callable[[ChunkT], None], chunks: Iterable[ChunkT]) -> None:
    """Each chunk through `step`, in order. The chunks' generator resumes after each yield with that chunk
    done, so that what it does next (copy out, fold into GEMMs) happens before it builds the next one."""
    for chunk in chunks:
        step(chunk)


@dataclass
class Chunk:
    r0: int  # rows r0:r1 of the pass
    r1: int
    workspace: Tensor  # (r1 - r0, C): where the row kernel works (and leaves the gradient)
    load: Callable[[], object]  # puts the chunk's logits in the workspace
    source: Tensor | None = None  # the logits, read in place instead (load is then not called)
    dense: Tensor | None = None  # this chunk's per-row u, when the dense term varies by row


@dataclass(frozen=True, eq=False)
class RowPass:
    """The cross-entropy step: each Chunk through the backend's chunk step (Backend.chunk)."""

    backend: Backend
    stats: rows.RowStats
    target_index: Tensor | None = None  # (rows,) each row's target column within the workspace
    dense: Tensor | None = None  # u shared by all rows (C,), when the loss has a dense term
    dense_is_ones: bool = False
    softcap: float | None = None
    # divides the (capped) logits in the row math (a chunk with `source` needs 1); a tensor: each row's (R,)
    temperature: float | Tensor = 1.0
    coefficients: rows.ChunkCoefficients | None = None  # given: leave the gradient in each workspace
    chain_buf: Tensor | None = None  # scratch for the softcap chain factor (torch backend)
    unshifted: bool = False  # exp(z) without the max shift (a host check per chunk: CPU only)

    @classmethod
    def over_block(
        cls, backend: Backend, stats: rows.RowStats, block: rows.ClassBlock, smoothing: bool, **kwargs
    ) -> RowPass:
        """A pass over a block of classes (all of them, or one rank's shard): its targets' columns and, with
        label smoothing, its class weights (or ones) as the dense term."""
        return cls(
            backend,
            stats,
            target_index=block.index,
            dense=block.class_weight if smoothing else None,
            dense_is_ones=smoothing and block.class_weight is None,
            **kwargs,
        )

    def step(self, chunk: Chunk) -> None:
        ws = chunk.workspace
        t = self.temperature
        self.backend.chunk(
            ChunkStep(
                ws,
                chunk.r0,
                chunk.r1,
                self.stats,
                chunk.load,
                source=chunk.source,
                target=self.target_index[chunk.r0 : chunk.r1].unsqueeze(1) if self.target_index is not None else None,
                dense=chunk.dense if chunk.dense is not None else self.dense,
                dense_is_ones=self.dense_is_ones and chunk.dense is None,
                softcap=self.softcap,
                temperature=t[chunk.r0 : chunk.r1] if isinstance(t, Tensor) else t,
                chain_out=self.chain_buf[: ws.numel()].view_as(ws) if self.chain_buf is not None else None,
                coefficients=self.coefficients,
                unshifted=self.unshifted,
            )
        )

    def run(self, chunks: Iterable[Chunk]) -> None:
        drive(self.step, chunks)


@dataclass
class DistillChunk:
    """One chunk of a distillation pass. `workspaces` are (r1 - r0, V) views of the pass's buffers: [0]
    the student's logits / T and, for a dense teacher, [2] the teacher's, both put there by `load`; the
    others are scratch. The step sets `gradient`: where it left the logits' gradient (one of them)."""

    r0: int
    r1: int
    workspaces: tuple[Tensor, ...]
    load: Callable[[], object]
    counted: Tensor  # (r1 - r0, 1) bool: the tokens that count
    gradient: Tensor | None = None


@dataclass(frozen=True, eq=False)
class DistillRowPass:
    """The distillation step: each DistillChunk through the backend's distillation row math
    (Backend.distill_rows), its rows' divergences into `losses` (0 on ignored tokens)."""

    backend: Backend
    divergence: str
    beta: float
    dense_teacher: bool  # the teacher's logits come in a workspace (a head or ready logits), not as top-k
    losses: Tensor  # (R,) filled, in the compute dtype
    coefficients: Tensor | None = None  # (R,) d loss / d divergence / T, 0 on ignored rows; given: gradients
    teacher_indices: Tensor | None = None  # top-k: (R, k)
    teacher_logprobs: Tensor | None = None  # top-k: (R, k)
    row_stats: Tensor | None = None  # (R, 3), the lean plan's (backends.DistillStep): filled, or read by slabs
    class_start: int | None = None  # the chunks hold a slab of the classes from here (the lean plan)

    def step(self, chunk: DistillChunk) -> None:
        r0, r1, ws = chunk.r0, chunk.r1, chunk.workspaces
        chunk.load()
        topk = not self.dense_teacher
        divergences, chunk.gradient = self.backend.distill_rows(
            DistillStep(
                self.divergence,
                self.beta,
                student=ws[0],
                teacher=None if topk else ws[2],
                scratch=(ws[1], *ws[3:]),
                counted=chunk.counted,
                coef=self.coefficients[r0:r1].unsqueeze(1) if self.coefficients is not None else None,
                teacher_indices=self.teacher_indices[r0:r1] if topk else None,
                teacher_logprobs=self.teacher_logprobs[r0:r1] if topk else None,
                row_stats=self.row_stats[r0:r1] if self.row_stats is not None else None,
                class_start=self.class_start,
            )
        )
        if divergences is not None:  # a slab's step returns only its gradient
            self.losses[r0:r1] = divergences.masked_fill_(~chunk.counted.squeeze(1), 0)

    def run(self, chunks: Iterable[DistillChunk]) -> None:
        drive(self.step, chunks)
