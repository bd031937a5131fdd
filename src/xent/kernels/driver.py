"""The one chunk driver: cross-entropy, linear cross-entropy and the vocab-parallel passes all run their
rows through the row kernel here, one workspace-sized chunk at a time.

A caller describes what is the same for every chunk (`RowPass`: the backend, the statistics to fill, the
targets, the loss's dense term, softcap, the gradient coefficients) and yields its chunks from a
generator: each `Chunk` says which rows it holds and how its logits get into the workspace (a copy, a
matmul, or read in place). The driver runs the backend's chunk step on it; the generator resumes after
its `yield` with the chunk done (the gradient in the workspace, when asked for) and does what its layout
needs next: copy the gradient out, or fold it into the next matmuls, before the workspace is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import Tensor

from . import rows
from .backends import TorchBackend


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
    backend: TorchBackend
    stats: rows.RowStats
    target_index: Tensor | None = None  # (rows,) each row's target column within the workspace
    dense: Tensor | None = None  # u shared by all rows (C,), when the loss has a dense term
    dense_is_ones: bool = False
    softcap: float | None = None
    coefficients: rows.ChunkCoefficients | None = None  # given: leave the gradient in each workspace
    chain_buf: Tensor | None = None  # scratch for the softcap chain factor (torch backend)
    unshifted: bool = False  # exp(z) without the max shift (a host check per chunk: CPU only)

    @classmethod
    def over_block(
        cls, backend: TorchBackend, stats: rows.RowStats, block: rows.ClassBlock, smoothing: bool, **kwargs
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

    def run(self, chunks: Iterator[Chunk]) -> None:
        for chunk in chunks:
            ws = chunk.workspace
            self.backend.chunk(
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
                chain_out=self.chain_buf[: ws.numel()].view_as(ws) if self.chain_buf is not None else None,
                coefficients=self.coefficients,
                unshifted=self.unshifted,
            )
