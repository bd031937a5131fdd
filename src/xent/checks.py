"""The argument checks that raise torch's errors and are needed on both sides of a call: by the validation
layer before it (validation/), and by the ops on values known only while they run (a target's range, a
vocab-parallel rank's block once the exchange has told it the vocabulary's size).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .problems import FUNC, TRACED, route


def shape_str(t: Tensor | torch.Size | tuple) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, Tensor) else t)) + "]"


def as_index(value, name: str, fn: str) -> int:
    """An integer argument as torch parses it: ints, numpy ints and 0-d integer tensors; not bool/float."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{fn}(): argument '{name}' must be int, not bool")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}(): argument '{name}' must be int, not {type(value).__name__}") from None
    if not -(2**63) <= result < 2**63:
        raise ValueError(f"{fn}(): argument '{name}' = {result} does not fit in a 64-bit integer")
    return result


def check_weight_shape(weight: Tensor | None, num_classes: int, prefix: str = "") -> None:
    if weight is not None and (weight.dim() != 1 or weight.numel() != num_classes):
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {num_classes} classes or no "
            f"classes but got weight tensor of shape: {shape_str(weight)}"
        )


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """IndexError naming the first target that is neither a class nor ignore_index (as torch on CPU).

    On a GPU, and while a graph is traced, a device-side assert instead (as torch's own kernels): no
    host synchronisation and nothing data-dependent in the trace. Under a torch.func transform of the
    targets themselves (vmap over them) there is no single answer to assert on, and it is skipped.
    """
    if route(target) == FUNC:
        return
    if target.numel() == 0:
        return
    flat = target.reshape(-1).long()  # uint8 compares as int64, as torch: -100 or 300 must not wrap
    bad = ((flat >= num_classes) | (flat < 0)) & (flat != ignore_index)
    if target.device.type != "cpu" or route(target) == TRACED:
        torch._assert_async(~bad.any(), "xent: a target is out of bounds (neither a class index nor ignore_index)")
        return
    if bool(bad.any()):
        first = int(flat[bad.nonzero()[0, 0]])
        raise IndexError(
            f"Target {first} is out of bounds. (It must be a class index in [0, {num_classes - 1}] "
            f"or ignore_index={ignore_index}.)"
        )
