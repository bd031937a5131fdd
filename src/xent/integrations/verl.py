"""verl: its fused LM-head kernel's contract, computed by xent.

verl's fused path (``use_fused_kernels``: its transformers forwards and its Megatron-core forward) calls

    logprobs, entropy = linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)

from ``verl.utils.kernel.linear_cross_entropy``: per-token log-probabilities of the labels under
``softmax(hidden @ weight.T / T)`` and the entropies, from the hidden states and the head (the local
vocabulary rows under tensor parallelism, with the tensor-parallel group), without the logits.
:func:`linear_cross_entropy` here has that signature and those results, computed by
:func:`xent.token_logprobs` (one process) or :func:`xent.distributed.vocab_parallel_linear_token_logprobs`
(a tensor-parallel group). Installing it is one assignment, before the model's forward first runs::

    import verl.utils.kernel.linear_cross_entropy as verl_kernel
    import xent.integrations.verl as xent_verl

    verl_kernel.linear_cross_entropy = xent_verl.linear_cross_entropy
    # verl's Megatron forward imported the name at module level: replace it there too
    import verl.models.mcore.model_forward_fused as fused
    fused.linear_cross_entropy = xent_verl.linear_cross_entropy

As verl's kernel, under tensor parallelism backward leaves each rank its own part of the hidden states'
gradient (verl's sequence-parallel gather sums them); the head's gradient is the rank's rows. Beyond
verl's kernel, ``temperature`` may be a per-token tensor, and :func:`xent.token_logprobs` gives Σπ²
(``return_stats="sum_sq_probs"``) and :func:`xent.token_topk` the top-k tokens from the same inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import vocab_parallel_linear_token_logprobs
from ..rl import token_logprobs

REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float | Tensor = 1.0,
    reduction: str = "none",
    dist_process_group=None,
) -> tuple[Tensor, Tensor]:
    r"""verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``.

    Args:
        hidden (Tensor): hidden states, :math:`(..., H)` (verl passes ``(1, total_nnz, H)`` or
            ``(batch, seq, H)``).
        weight (Tensor): the head, :math:`(V, H)`; under tensor parallelism this rank's
            :math:`(V_{local}, H)` rows, in rank order.
        labels (Tensor): the next tokens, shape :math:`(...)` (the hidden states' leading dimensions).
        temperature (float or Tensor): T > 0, or one per token (a tensor that broadcasts to the labels).
        reduction (str): ``'none'`` (per token), ``'sum'`` or ``'mean'`` of the log-probabilities over all
            tokens, as verl's kernel; the entropies are always per token.
        dist_process_group: the tensor-parallel group the vocabulary is split over, or None.

    Returns:
        ``(logprobs, entropy)``, float32 (float64 for float64 inputs), flattened to :math:`(N,)` over the
        tokens as verl's kernel returns them (a scalar log-probability for ``'sum'``/``'mean'``); both
        differentiable.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    t = temperature
    if isinstance(t, Tensor) and t.dim() <= labels.dim():  # per token: against the labels' own shape, flattened
        try:
            t = torch.broadcast_to(t, labels.shape).reshape(-1)
        except RuntimeError:
            pass  # token_logprobs names the mismatch
    if dist_process_group is None:
        logprobs, entropy = token_logprobs(h, weight, y, temperature=t, return_entropy=True)
    else:
        logprobs, entropy = vocab_parallel_linear_token_logprobs(
            h, weight, y, group=dist_process_group, temperature=t, return_entropy=True, reduce_input_grad=False
        )
    if reduction == "sum":
        logprobs = logprobs.sum()
    elif reduction == "mean":
        logprobs = logprobs.mean()
    return logprobs, entropy
