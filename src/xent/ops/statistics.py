"""Per-token statistics through a custom op: an op returns a fixed set of tensors, so the float
statistics travel stacked (k, rows) and the argmax as its own int64 tensor; 'correct' is formed outside."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.rows import FLOAT_STATISTICS
from ..problems import TokenStatistics

# What the custom ops compute for asked statistics: 'correct' is formed outside the op, from the argmax.
op_statistics = TokenStatistics.computed


def pack_statistics(stats: dict, num_rows: int, like: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """The statistics as a custom op returns them: the float ones stacked (k, rows) in `dtype`, in the
    order asked, and the argmax (rows,) int64, or an empty tensor when not asked for."""
    floats = [t for n, t in stats.items() if n in FLOAT_STATISTICS]
    packed = torch.stack(floats) if floats else like.new_empty((0, num_rows), dtype=dtype)
    argmax = stats.get("argmax")
    return packed, argmax if argmax is not None else like.new_empty(0, dtype=torch.int64)


def packed_statistics_like(statistics: tuple, num_rows: int, like: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """pack_statistics' shapes and dtypes, for op_statistics(...) (the custom ops' fake implementations)."""
    k = sum(n in FLOAT_STATISTICS for n in statistics)
    return (
        like.new_empty((k, num_rows), dtype=dtype),
        like.new_empty(num_rows if "argmax" in statistics else 0, dtype=torch.int64),
    )


def unpack_statistics(packed: Tensor, argmax: Tensor, statistics: tuple, target: Tensor, ignore_index: int) -> dict:
    """pack_statistics undone, in the order of `statistics` (what the caller asked)."""
    floats = dict(zip([n for n in op_statistics(statistics) if n in FLOAT_STATISTICS], packed.unbind(0)))
    out = {}
    for name in statistics:
        if name == "argmax":
            out[name] = argmax
        elif name == "correct":
            flat = target.reshape(-1).long()  # uint8 targets compare as int64 (ignore_index -100 must not wrap)
            out[name] = (flat != ignore_index) & (argmax == flat)
        else:
            out[name] = floats[name]
    return out
