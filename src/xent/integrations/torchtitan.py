"""torchtitan: its language-model loss computed by xent, selected with one line of the trainer's config.

    from xent.integrations.torchtitan import CrossEntropyLoss, LinearCrossEntropyLoss

    config = Trainer.Config(..., loss=LinearCrossEntropyLoss.Config())   # the fused head: no logits at all
    config = Trainer.Config(..., loss=CrossEntropyLoss.Config())         # or xent's loss on the logits

torchtitan (0.3) builds its loss from the config (``config.loss.build(compile_config=...)``: a
``BaseLoss.Config`` whose owner class is the loss) and calls it as ``loss_fn(pred, labels,
global_valid_tokens) -> (loss, metrics)``: the cross-entropy *summed* over this rank's micro-batch, divided by
the valid tokens of the whole step (every micro-batch of every data-parallel rank, counted once before the
first forward), with FSDP's gradient division turned off (``set_gradient_divide_factor(1.0)``), so the
ranks' summed gradients are those of the global mean. Both classes keep that contract:

* :class:`CrossEntropyLoss` takes the logits torchtitan's model returns and computes
  :func:`xent.cross_entropy` with ``reduction='sum'``, on each of torchtitan's tensor-parallel paths: plain
  logits; the ``spmd_types`` backend's plain local vocabulary shard (the vocab-parallel loss on the mesh's
  ``"tp"`` group, :func:`xent.distributed.vocab_parallel_cross_entropy`); the ``partial_dtensor`` backend's
  ``Shard(-1)`` DTensor logits (xent's DTensor path); and DTensor logits with DTensor labels (the
  ``full_dtensor`` backend: each rank its rows, the result ``Partial`` on the row-splitting mesh dimensions
  as torchtitan's own ``local_map`` gives it).
* :class:`LinearCrossEntropyLoss` replaces torchtitan's ``ChunkedLossWrapper`` (it subclasses it, so the
  trainer hands it the ``lm_head`` and runs the model without it): :func:`xent.linear_cross_entropy` on the
  hidden states and the head's weight, never holding the logits, in one call (no chunk loop, no
  per-chunk backward). A head that is its own FSDP unit is gathered as FSDP would and its gradient is
  reduced as its FSDP module says (torchtitan's sum); a ``ColwiseParallel`` head (``Shard(0)`` DTensor) or
  the ``spmd_types`` backend's local vocabulary rows run the vocab-parallel linear loss on the ``"tp"`` group.

Both return fp32 losses (fp64 for an fp64 model), as torchtitan's, and take ``label_smoothing`` and ``z_loss``
(which torchtitan's do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed as xent_distributed
from .. import dtensor as xent_dtensor
from ..functional import cross_entropy
from ..linear import linear_cross_entropy

try:
    import spmd_types as spmd
    from torchtitan.components.loss import IGNORE_INDEX, BaseLoss, ChunkedLossWrapper
    from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend
except ImportError as e:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "xent.integrations.torchtitan needs torchtitan >= 0.3 (its BaseLoss / ChunkedLossWrapper loss "
        "components): pip install torchtitan"
    ) from e

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "cross_entropy_sum", "linear_cross_entropy_sum"]


def _loss_dtype(t: Tensor) -> torch.dtype:
    """fp32 as torchtitan's losses (half precision is upcast), fp64 kept."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_not_type_checking(fn: str) -> None:
    if spmd.is_type_checking():
        raise NotImplementedError(
            f"{fn}: torchtitan's debug.spmd_typechecking is on; xent's ops carry no SPMD types (turn it off)"
        )


def _tp_group():
    """The tensor-parallel group of torchtitan's spmd_types backend when its "tp" axis is active, else None."""
    if get_spmd_backend() == "spmd_types" and spmd_mesh_size("tp") > 1:
        return current_spmd_mesh().get_group("tp")
    return None


def _vocab_start(global_vocab_size: int | None, group) -> int | None:
    """This rank's first class under torchtitan's split (ceil(V / tp) classes a rank, the last ones fewer);
    None (xent gathers the blocks' sizes) when the vocabulary size is not given."""
    if global_vocab_size is None:
        return None
    world, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return min(global_vocab_size, math.ceil(global_vocab_size / world) * rank)


def cross_entropy_sum(
    pred: Tensor,
    labels: Tensor,
    *,
    global_vocab_size: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """torchtitan's ``cross_entropy_loss`` computed by xent: the cross-entropy of logits ``(B, L, V)``
    (or a local vocabulary shard, or DTensors) summed over this rank's tokens, as an fp32 tensor."""
    fn = "xent torchtitan cross_entropy_sum"
    _check_not_type_checking(fn)
    options = dict(reduction="sum", label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index)
    if xent_dtensor.is_dtensor(pred) and xent_dtensor.is_dtensor(labels):
        return _local_map_sum(pred, labels, options)
    if xent_dtensor.is_dtensor(pred):
        # the partial_dtensor backend's loss-parallel logits (Shard(-1)) or any other layout xent's DTensor
        # path takes; torchtitan returns a plain tensor there, so does this
        loss = cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1), **options)
        return (loss.to_local() if xent_dtensor.is_dtensor(loss) else loss).to(_loss_dtype(pred))
    group = _tp_group()
    if group is not None:  # spmd_types: this rank's vocabulary block, plain tensors
        loss = xent_distributed.vocab_parallel_cross_entropy(
            pred, labels, group=group, vocab_start=_vocab_start(global_vocab_size, group), **options
        )
        return loss.to(_loss_dtype(pred))
    return cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1), **options).to(_loss_dtype(pred))


def _local_map_sum(pred, labels, options: dict) -> Tensor:
    """DTensor logits and labels (torchtitan's full_dtensor backend): each rank sums its rows' losses, the
    vocab-parallel loss on the mesh dimension that splits the classes; a DTensor Partial on the dimensions
    that split the rows, as torchtitan's local_map returns it."""
    mesh = pred.device_mesh
    vocab_dim = pred.dim() - 1
    vocab_mdims = [i for i, p in enumerate(pred.placements) if p.is_shard() and p.dim % pred.dim() == vocab_dim]
    want = tuple(Replicate() if i in vocab_mdims else p for i, p in enumerate(pred.placements))
    if tuple(labels.placements) != want:
        raise ValueError(f"cross_entropy_sum: expected labels placements {want}, got {labels.placements}")
    local, local_labels = pred.to_local(), labels.to_local()
    if vocab_mdims:
        (vdim,) = vocab_mdims
        loss = xent_distributed.vocab_parallel_cross_entropy(local, local_labels, group=mesh.get_group(vdim), **options)
    else:
        loss = cross_entropy(local.flatten(0, 1), local_labels.flatten(0, 1), **options)
    out = [Partial() if p.is_shard() and i not in vocab_mdims else Replicate() for i, p in enumerate(pred.placements)]
    return DTensor.from_local(loss.to(_loss_dtype(local)), mesh, out, run_check=False)


def linear_cross_entropy_sum(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    labels: Tensor,
    *,
    global_vocab_size: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    memory_budget: int | None = None,
) -> Tensor:
    """The summed cross-entropy of ``lm_head(hidden)`` without materializing the logits: hidden states
    ``(B, L, H)`` (plain, or a replicated DTensor), the head a Linear (plain, a ColwiseParallel ``Shard(0)``
    DTensor, FSDP-sharded, or both). An fp32 tensor, plain, of this rank's tokens."""
    fn = "xent torchtitan linear_cross_entropy_sum"
    _check_not_type_checking(fn)
    if xent_dtensor.is_dtensor(labels):
        raise NotImplementedError(f"{fn}: DTensor labels (torchtitan's full_dtensor backend)")
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    options = dict(
        reduction="sum",
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        ignore_index=ignore_index,
        memory_budget=memory_budget,
        output_dtype=_loss_dtype(hidden),
    )
    group = _tp_group()
    if group is not None:
        # spmd_types: the head's weight is this rank's vocabulary rows (an FSDP-sharded DTensor over the
        # data-parallel mesh, or plain): gathered as FSDP would, then the vocab-parallel loss on "tp"
        if xent_dtensor.is_dtensor(weight):
            weight = xent_dtensor.fsdp_gathered(weight)[0]
        if xent_dtensor.is_dtensor(bias):
            bias = xent_dtensor.fsdp_gathered(bias)[0]
        return xent_distributed.vocab_parallel_linear_cross_entropy(
            _SharedGradient.apply(hidden, torch.distributed.get_world_size(group)),
            weight,
            labels,
            group=group,
            vocab_start=_vocab_start(global_vocab_size, group),
            linear_bias=bias,
            **options,
        )
    if (
        xent_dtensor.is_dtensor(weight)
        and not xent_dtensor.is_dtensor(hidden)
        and weight.device_mesh.ndim == 1
        and weight.placements[0] == Shard(0)
        and not xent_dtensor.held_by_fsdp(weight)
    ):
        # a ColwiseParallel head (no FSDP) beside plain hidden states, the same on every tensor-parallel rank
        # (torchtitan's root norm replicates them before the head): the vocab-parallel loss, not a gather
        hidden = DTensor.from_local(hidden, weight.device_mesh, [Replicate()], run_check=False)
    if xent_dtensor.is_dtensor(hidden) and (
        not xent_dtensor.is_dtensor(weight) or hidden.device_mesh != weight.device_mesh
    ):
        # replicated hidden states on the tensor-parallel mesh beside a head on a larger (FSDP x TP) mesh
        # or a plain one: every rank holds all of them, so the local tensor is the same input
        if any(not p.is_replicate() for p in hidden.placements):
            raise NotImplementedError(f"{fn}: hidden states {hidden.placements} beside a head on another mesh")
        hidden = hidden.to_local()
    loss = linear_cross_entropy(hidden, weight, labels, linear_bias=bias, **options)
    return loss.to_local() if xent_dtensor.is_dtensor(loss) else loss


class _SharedGradient(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the tensor-parallel size.

    Under spmd_types the hidden states reach the head typed R (replicated) on "tp", whose backward
    all-reduces the gradient (the root norm's I -> R boundary): torchtitan's own head hands back each rank's
    partial gradient. xent's vocab-parallel linear loss already all-reduces it, so every rank holds the full
    gradient; a 1/tp share of it on each rank is a partial gradient the boundary sums back to the full one."""

    @staticmethod
    def forward(ctx, x, parts):
        ctx.parts = parts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.parts, None


def _scaled(loss: Tensor, global_valid_tokens: Tensor | None) -> Tensor:
    return loss if global_valid_tokens is None else loss / global_valid_tokens


class CrossEntropyLoss(BaseLoss):
    """torchtitan's ``CrossEntropyLoss`` computed by :func:`xent.cross_entropy`: select it with
    ``loss=xent.integrations.torchtitan.CrossEntropyLoss.Config()`` in the trainer's config."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """The full vocabulary size (the spmd_types backend's vocabulary split); None: gathered."""
        label_smoothing: float = 0.0
        z_loss: float = 0.0

    def __init__(self, config: Config, *, compile_config=None):
        self.config = config
        self.fn = cross_entropy_sum
        self._maybe_compile(compile_config)

    def __call__(
        self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        del kwargs
        c = self.config
        loss = self.fn(
            pred,
            labels,
            global_vocab_size=c.global_vocab_size,
            label_smoothing=c.label_smoothing,
            z_loss=c.z_loss,
        )
        return _scaled(loss, global_valid_tokens), {}


class LinearCrossEntropyLoss(ChunkedLossWrapper):
    """The fused head: torchtitan's ``ChunkedLossWrapper`` replaced by :func:`xent.linear_cross_entropy`
    (no logits, no chunk loop). Select it with ``loss=xent.integrations.torchtitan.LinearCrossEntropyLoss.
    Config()``; the trainer calls ``set_lm_head`` and runs the model without its head, as for the wrapper."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """The full vocabulary size (the spmd_types backend's vocabulary split); None: gathered."""
        label_smoothing: float = 0.0
        z_loss: float = 0.0
        memory_budget: int | None = None
        """Bytes of one chunk of logits (xent.linear_cross_entropy's); None: its default."""

    def __init__(self, config: Config, *, compile_config=None):
        # torch.compile of the loss (compile_config's "loss" component) is not applied: xent's fused head
        # is one opaque op with its own chunk loop
        del compile_config
        self.config = config
        self.lm_head: torch.nn.Module | None = None

    def __call__(
        self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None = None, **loss_inputs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``pred``: the hidden states the model returns without its head (``_skip_lm_head``)."""
        if self.lm_head is None:
            raise RuntimeError(
                "LinearCrossEntropyLoss: call set_lm_head(model.lm_head) first (torchtitan's trainer does)"
            )
        c = self.config
        loss = linear_cross_entropy_sum(
            pred,
            self.lm_head,
            labels,
            global_vocab_size=c.global_vocab_size,
            label_smoothing=c.label_smoothing,
            z_loss=c.z_loss,
            memory_budget=c.memory_budget,
        )
        return _scaled(loss, global_valid_tokens), {}
