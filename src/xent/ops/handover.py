"""The eager route's gradient handover: forward computes the gradient for a unit upstream gradient while
the logits are in cache, and backward scales it in place and hands it over.

Every eager autograd Function of xent whose forward computes its gradients goes through these three.
Backward scales the buffers through `.data`, which leaves the saved tensors' versions alone: a second
backward (retain_graph=True) can still unpack them, sees `handed_over`, and recomputes.
"""

from __future__ import annotations


def save_for_handover(ctx, grads: list, inputs: tuple) -> None:
    """Keep forward's gradients for backward, as saved tensors (hooks see them), and the inputs.

    The inputs are kept as references with their versions, not as saved tensors: the first backward
    does not read them, so (as with torch, which saves log-softmax) modifying the logits in place after
    forward must not fail it; only the paths that do read them (a second backward, the formulas) check.
    """
    ctx.save_for_backward(*grads)
    ctx.inputs = inputs
    ctx.versions = tuple(t._version if t is not None else None for t in inputs)
    ctx.handed_over = False


def saved_inputs(ctx) -> tuple:
    """The inputs kept by save_for_handover, after autograd's check that none was modified in place since forward."""
    for t, version in zip(ctx.inputs, ctx.versions):
        if t is not None and t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                f"expected version {version} instead (an input of an xent loss, read again by "
                f"this backward)"
            )
    return ctx.inputs


def take_handover(ctx) -> list:
    """Forward's gradients, for backward to scale in place and hand over; None for each when a previous
    backward (retain_graph=True) already took them (the inputs are checked then, since the caller
    recomputes from them), or forward computed none."""
    grads = list(ctx.saved_tensors)
    if ctx.handed_over:
        saved_inputs(ctx)
        return [None] * len(grads)
    ctx.handed_over = True
    if all(g is None for g in grads):
        saved_inputs(ctx)
    return grads
