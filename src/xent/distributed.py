"""Vocab-parallel cross-entropy on torch.distributed: the loss over a vocabulary split across ranks.

Each rank of `group` holds the logits (or the lm_head rows) of a contiguous block of the classes; the
targets, the class weights and the options are the same on every rank. One all-gather of each rank's
per-row statistics gives every rank the global log-sum-exp (exchange.py has the protocol), so results
equal the single-process loss, with label smoothing over the global classes and weights. The gradient of
the logits is local: the logits path needs no communication in backward; the linear path all-reduces the
input gradient. Per-token statistics and RL log-probabilities ride on the same exchange.

This module is the public API: it checks the arguments and calls the ops (ops/vocab_parallel.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from .ops import vocab_parallel as ops
from .ops.vocab_parallel import Layout
from .problems import FUNC, TRACED, LinearProblem, TokenStatistics, compute_dtype, route
from .validation.cross_entropy import (
    check_backend,
    check_local_head,
    check_local_logits_target,
    check_logits_dtype,
    check_memory_budget,
    check_output_dtype,
    check_statistics,
    check_token_temperature,
    chunk_size_of,
    vocab_parallel_options,
    with_backend,
)

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_linear_token_logprobs",
    "global_token_count",
]


# ----------------------------------------------------------------------------------------------------
# Logits path


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_stats: str | Sequence[str] | None = None,
    backend: str | None = None,
    inplace: bool = False,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""Cross-entropy of logits whose classes are split across the ranks of `group`, without gathering them.

    Equals ``xent.cross_entropy(full_logits.reshape(-1, C), target.reshape(-1), ...)`` (reshaped back for
    'none') where ``full_logits`` concatenates every rank's block in class order: same loss, and each
    rank's gradient is that loss's gradient for its block.

    Args:
        local_logits (Tensor): this rank's logits, shape :math:`(..., C_{local})`.
        target (Tensor): global class indices, shape :math:`(...)`, the same on every rank.
        group: the process group over which the vocabulary is split (default: the world).
        vocab_start (int, optional): this rank's first class. None: the blocks follow rank order, their
            sizes gathered by one extra small all-gather (which also checks that all ranks have the same
            targets before the main exchange).
        weight (Tensor, optional): the full :math:`(C,)` class weights, the same on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap: as :func:`xent.cross_entropy` (every
            rank must pass the same).
        return_stats: names of per-token statistics, as :func:`xent.cross_entropy`: global values, the
            same on every rank, merged in the one exchange (every rank must ask for the same ones).
            Returns ``(loss, stats)`` then.
        backend (str, optional): the compute backend of this rank's block passes, as
            :func:`xent.cross_entropy`'s.
        inplace (bool): write this rank's gradient over ``local_logits`` (consumed), as
            :func:`xent.cross_entropy`'s ``inplace``.

    Forward runs one all-gather (two with ``vocab_start=None``) of 5 float64 numbers per row and rank (one
    more for the entropy, two more for the argmax);
    backward needs no communication. Differing targets across ranks, blocks that do not tile the
    vocabulary, out-of-range targets and a wrong weight size raise on every rank alike; ranks with
    different *numbers* of targets are caught only with ``vocab_start=None`` (the collective itself would
    fail otherwise).
    """
    fn = "vocab_parallel_cross_entropy"
    opts = vocab_parallel_options(
        local_logits, target, weight, reduction, ignore_index, label_smoothing, z_loss, fn, "local_logits", softcap
    )
    statistics = check_statistics(return_stats, fn)
    opts = with_backend(opts, check_backend(backend, fn))
    check_local_logits_target(local_logits, target, fn)
    how = route(local_logits, target, weight)
    if how == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    x = local_logits.reshape(math.prod(local_logits.shape[:-1]), local_logits.shape[-1])  # not -1: C_local may be 0
    layout = Layout(group, vocab_start)
    if inplace and torch.is_grad_enabled() and local_logits.requires_grad and local_logits.is_leaf:
        raise RuntimeError(
            f"{fn}(inplace=True): a leaf Variable that requires grad is being used in an in-place operation"
        )
    loss, per_row = ops.vocab_parallel_cross_entropy(
        x, target, weight, layout, opts, statistics, how == TRACED, bool(inplace)
    )
    if return_stats is None:
        return loss
    return loss, ops.token_statistics(statistics, per_row, target, opts, compute_dtype(local_logits.dtype))


# ----------------------------------------------------------------------------------------------------
# Linear path


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    options=None,
    memory_budget: int | None = None,
    output_dtype=None,
    return_stats: str | Sequence[str] | None = None,
    backend: str | None = None,
    logits_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, TokenStatistics]:
    r"""Linear cross-entropy with the head's rows split across the ranks of `group`.

    ``input`` :math:`(..., H)` is replicated (the same on every rank); ``local_linear_weight``
    :math:`(C_{local}, H)` and ``linear_bias`` :math:`(C_{local},)` are this rank's rows of the head. The
    local logits are never materialized in full: forward runs the linear cross-entropy's chunk loop for
    this block's statistics, one all-gather (two with ``vocab_start=None``), and backward recomputes the
    chunks for the gradients (one more matmul than the single-process path) and all-reduces the input
    gradient, so every rank holds the full gradient of ``input``. Options (``return_stats`` too) as
    :func:`vocab_parallel_cross_entropy`; ``options`` (torch's ``LinearCrossEntropyOptions``: its
    ``batch_chunk_size``), ``memory_budget``, ``output_dtype`` and ``logits_dtype`` as
    :func:`xent.linear_cross_entropy`.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    opts = vocab_parallel_options(
        input, target, weight, reduction, ignore_index, label_smoothing, z_loss, fn, "input", softcap
    )
    statistics = check_statistics(return_stats, fn)
    opts = with_backend(opts, check_backend(backend, fn))
    check_local_head(input, local_linear_weight, linear_bias, target, fn)
    memory_budget = check_memory_budget(memory_budget, fn)
    output_dtype = check_output_dtype(output_dtype, fn)
    logits_dtype = check_logits_dtype(logits_dtype, local_linear_weight.dtype, fn)
    x2 = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])  # not -1: ambiguous when H = 0
    problem = LinearProblem(
        x2,
        local_linear_weight,
        linear_bias,
        target.reshape(-1),
        weight,
        opts,
        tuple(target.shape),
        output_dtype or input.dtype,
        chunk_size=chunk_size_of(options),
        memory_budget=memory_budget,
        statistics=statistics,
        logits_dtype=logits_dtype,
    )
    how = route(input, local_linear_weight, linear_bias, target, weight)
    if how == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    layout = Layout(group, vocab_start)
    loss, per_row = ops.vocab_parallel_linear_cross_entropy(problem, input, target, layout, how == TRACED)
    if return_stats is None:
        return loss
    return loss, ops.token_statistics(statistics, per_row, target, opts, problem.compute_dtype)


# ----------------------------------------------------------------------------------------------------
# Token log-probabilities and entropies (RL) over a vocabulary split across ranks


def vocab_parallel_token_logprobs(
    local_logits: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_requires_grad: bool = True,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r""":func:`xent.token_logprobs_from_logits` for logits whose classes are split across the ranks of
    `group`: each token's log-probability under ``softmax(full_logits / T)`` (and with ``return_entropy``
    its entropy), both differentiable, without gathering the logits.

    Args:
        local_logits (Tensor): this rank's logits, shape :math:`(..., C_{local})`.
        target (Tensor): the chosen token ids (global), shape :math:`(...)`, the same on every rank.
        group, vocab_start: as :func:`vocab_parallel_cross_entropy`.
        temperature (float or Tensor): T > 0, or one per token (a tensor that broadcasts to the target's
            shape, the same on every rank); it divides the logits in fp32 inside the pass (no copy).
        ignore_index (int): tokens to skip: log-probability 0, entropy 0, no gradient.
        return_entropy (bool): also return the entropies.
        entropy_requires_grad (bool): ``False`` returns the entropies detached (backward skips their term).
        backend (str, optional): the compute backend of this rank's block passes, as
            :func:`xent.cross_entropy`'s.

    Returns:
        the log-probabilities, shape :math:`(...)`, float32 (float64 for float64 logits), the same on every
        rank, and with ``return_entropy`` the entropies. Forward runs the loss's one exchange (one more
        float64 per token and rank for the entropy); backward needs no communication: each rank's gradient
        is the full gradient's block, one pass of the row kernel over its logits.
    """
    fn = "vocab_parallel_token_logprobs"
    t, row_t = check_token_temperature(temperature, target, compute_dtype(local_logits.dtype), fn)
    vocab_parallel_options(local_logits, target, None, "none", ignore_index, 0.0, 0.0, fn, "local_logits")
    check_local_logits_target(local_logits, target, fn)
    if route(local_logits, target) == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    flat = local_logits.reshape(math.prod(local_logits.shape[:-1]), local_logits.shape[-1])
    options = ops.rl_options(int(ignore_index), t, check_backend(backend, fn))
    layout = Layout(group, vocab_start)
    logprobs, entropy = ops.vocab_parallel_token_logprobs(
        flat, target.reshape(-1), layout, options, bool(return_entropy), row_t
    )
    return _token_results(logprobs, entropy, target.shape, return_entropy, entropy_requires_grad)


def _token_results(logprobs, entropy, shape, return_entropy: bool, entropy_requires_grad: bool):
    """The RL functions' results in the targets' shape: the log-probabilities, and the entropies (detached
    unless their gradient is wanted) when asked."""
    if not return_entropy:
        return logprobs.reshape(shape)
    return logprobs.reshape(shape), (entropy if entropy_requires_grad else entropy.detach()).reshape(shape)


def vocab_parallel_linear_token_logprobs(
    input: Tensor,
    local_linear_weight: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    linear_bias: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_requires_grad: bool = True,
    memory_budget: int | None = None,
    backend: str | None = None,
    reduce_input_grad: bool = True,
    logits_dtype: torch.dtype | None = torch.float32,
) -> Tensor | tuple[Tensor, Tensor]:
    r""":func:`xent.token_logprobs` with the head's rows split across the ranks of `group` (tensor-parallel
    RL): ``input`` :math:`(..., H)` replicated, ``local_linear_weight`` :math:`(C_{local}, H)` and
    ``linear_bias`` this rank's rows. Log-probabilities (and entropies) of the full head, differentiable
    with respect to the input and this rank's rows, never materializing even the local logits.

    Forward runs the chunk loop for this block's statistics and the one exchange; backward recomputes the
    chunks with the global lse and entropy (both upstream gradients folded into each row's gradient) and
    all-reduces the input's gradient, so every rank holds the full gradient of ``input``. Returns as
    :func:`vocab_parallel_token_logprobs` (``temperature`` and ``entropy_requires_grad`` too);
    ``memory_budget`` and ``backend`` as :func:`xent.linear_cross_entropy`; ``logits_dtype`` as
    :func:`xent.token_logprobs` (default fp32 logits). ``reduce_input_grad=False``
    leaves each rank its own part of the input's gradient (the sum over ranks is the gradient): for a
    caller whose hidden states come through a collective that sums in backward (Megatron's
    sequence-parallel gather), as verl's fused kernel does.
    """
    fn = "vocab_parallel_linear_token_logprobs"
    t, row_t = check_token_temperature(temperature, target, compute_dtype(local_linear_weight.dtype), fn)
    vocab_parallel_options(input, target, None, "none", ignore_index, 0.0, 0.0, fn, "input")
    check_local_head(input, local_linear_weight, linear_bias, target, fn)
    memory_budget = check_memory_budget(memory_budget, fn)
    logits_dtype = check_logits_dtype(logits_dtype, local_linear_weight.dtype, fn)
    if route(input, local_linear_weight, linear_bias, target) == FUNC:
        raise NotImplementedError(f"{fn} under torch.func transforms")
    # the temperature divides the logits in fp32 inside the block passes (not the half-precision hidden states),
    # by default the GEMM's fp32 accumulator (logits_dtype)
    x2 = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    options = ops.rl_options(int(ignore_index), t, check_backend(backend, fn))
    budget = None if memory_budget is None else int(memory_budget)
    p = ops.rl_linear_problem(
        x2, local_linear_weight, linear_bias, target.reshape(-1), options, budget, bool(return_entropy), row_t
    )
    p = replace(p, logits_dtype=logits_dtype)
    logprobs, entropy = ops.vocab_parallel_linear_token_logprobs(p, Layout(group, vocab_start), bool(reduce_input_grad))
    return _token_results(logprobs, entropy, target.shape, return_entropy, entropy_requires_grad)


# ----------------------------------------------------------------------------------------------------
# Global normalisation across data-parallel ranks and gradient-accumulation steps


def global_token_count(
    targets: Tensor | Sequence[Tensor],
    *,
    ignore_index: int = -100,
    weight: Tensor | None = None,
    group=None,
) -> Tensor:
    r"""The 'mean' denominator of one optimizer step: the valid targets of every micro-batch on every
    data-parallel rank, counted with one all-reduce.

    ``sum(loss(micro_batch, reduction='sum') for each micro-batch) / global_token_count(targets)`` on each
    rank, with gradients summed across the ranks (DDP's average times the world size, or FSDP2 with
    ``set_gradient_divide_factor(1.0)``: torchtitan's setup), gives the loss and the gradients of one
    process computing ``reduction='mean'`` over the whole global batch, however the tokens are spread over
    ranks and micro-batches (transformers #34191 is the bug of dividing each micro-batch by its own count).

    Args:
        targets (Tensor or sequence of Tensors): this rank's class-index targets of the whole step: all its
            gradient-accumulation micro-batches (any shapes), known before the first forward as a data
            loader yields them.
        ignore_index (int): targets that do not count (default -100, as the losses').
        weight (Tensor, optional): class weights :math:`(C,)`: then the sum of the counted targets' weights,
            torch's weighted-mean denominator, in float64 (a class-weighted 'sum' divided by it is the
            weighted mean).
        group: the data-parallel process group to sum over (default: the world; no communication without an
            initialized process group). On a 2-D mesh pass the data-parallel dimension's group
            (``mesh.get_group("dp")``), not the tensor-parallel one, whose ranks hold the same tokens.

    Returns:
        a 0-dim tensor on the targets' device, the same on every rank: int64 counts, float64 weight sums.
        It stays on the device (no host sync); the all-reduce is the only communication.
    """
    fn = "global_token_count"
    if isinstance(targets, Tensor):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError(f"{fn}: no targets (pass this rank's micro-batches' targets, a tensor or a list of them)")
    for t in targets:
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(
                f"{fn}: targets must be class-index (integer) tensors, got "
                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}"
            )
        if type(t) is not Tensor and hasattr(t, "device_mesh"):
            raise TypeError(
                f"{fn}: a DTensor target; pass its local tensor (this rank's rows) and the data-parallel group"
            )
    device = targets[0].device
    if weight is None:
        count = torch.zeros((), dtype=torch.int64, device=device)
        for t in targets:
            count = count + (t != ignore_index).sum()
    else:
        if weight.dim() != 1:
            raise ValueError(f"{fn}: weight must be a 1-D tensor of class weights, got shape {tuple(weight.shape)}")
        w = weight.to(device=device, dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for t in targets:
            valid = t != ignore_index
            # ignored targets pick class 0's weight and are then masked: no out-of-range gather
            picked = w[torch.where(valid, t, torch.zeros_like(t)).reshape(-1)]
            count = count + torch.where(valid.reshape(-1), picked, torch.zeros_like(picked)).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    elif group is not None:
        raise RuntimeError(f"{fn}: a process group was given, but torch.distributed is not initialized")
    return count
