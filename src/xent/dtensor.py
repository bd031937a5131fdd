"""xent's losses on DTensors: torch's tensor-parallel and data-parallel layouts, without gathering logits.

`xent.cross_entropy` / `nll_loss` / `linear_cross_entropy` (and their modules) come here when an
argument is a DTensor (torch.distributed.tensor), on a 1-D device mesh. Every placement combination torch's
DTensor `cross_entropy` / `nll_loss` accepts is accepted, with torch's values (docs/distributed.md, "DTensor
layouts"); the arguments are first brought to one of these layouts:

* logits sharded on the **class** dimension (what ``ColwiseParallel(use_local_output=False)`` on an
  lm_head gives, and what torch's ``loss_parallel()`` handles): the vocab-parallel loss
  (xent.distributed) on the local shards, one collective, every option (torch's loss_parallel refuses
  label smoothing with class weights; xent does not). The target (any placement) is made whole.
  Probability targets and nll_loss, which the vocab-parallel loss does not take, redistribute the logits
  to a row split first.
* logits sharded on the **batch** (or a spatial) dimension, or replicated: each rank computes its rows
  with the ordinary kernels; the reduction sums the loss (and the 'mean' denominator) across ranks as a
  DTensor, so autograd brings each rank its rows' gradient. A DTensor target in another placement is
  redistributed to the logits' rows.
* Partial logits (a pending sum) are redistributed to Replicate; DTensor class weights are made whole.
* linear_cross_entropy with a head sharded on the vocabulary and replicated hidden states (DTensors on
  the same mesh): the vocab-parallel linear loss. A sharded head with plain hidden states is what
  fully_shard (FSDP2) leaves outside the module's forward: the head is gathered (never a local shard
  taken for the whole head) and each rank's shard gets the ranks' averaged gradient, as FSDP gives it.

Results are DTensors (Replicate for 'mean'/'sum', the logits' row placement for 'none'), as torch's
loss_parallel returns them; gradients flow back as DTensors with the inputs' placements. The per-token
statistics (`return_stats=`) and the RL log-probabilities (xent.rl) follow the same layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .ops import cross_entropy as ce_ops

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # torch built without distributed support: nothing can be a DTensor
    DTensor = None


def is_dtensor(*tensors: Tensor | None) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def _mesh_and_placement(input, fn: str):
    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"{fn}: DTensor inputs on a {mesh.ndim}-D device mesh are not supported yet (1-D meshes only); "
            f"got placements {input.placements}"
        )
    return mesh, input.placements[0]


def _replicated_local(t: Tensor | None, mesh, fn: str, name: str) -> Tensor | None:
    """A tensor every rank must hold whole: a plain tensor, or a replicated DTensor on the same mesh."""
    if t is None or not is_dtensor(t):
        return t
    if t.device_mesh != mesh or any(not p.is_replicate() for p in t.placements):
        raise ValueError(
            f"{fn}: {name} must be replicated on the logits' mesh (a plain tensor or a Replicate DTensor), "
            f"got placements {t.placements}"
        )
    return t.to_local()


def cross_entropy(local_loss, input, target, weight, *, reduction: str, fn: str = "cross_entropy", **options):
    """`local_loss(input, target, weight=..., reduction=..., **options)` is the plain-tensor loss.

    With options' `return_stats`, (loss, TokenStatistics of DTensors): laid out like the loss with
    reduction='none' (replicated for logits sharded on their classes, whose statistics every rank merges
    from the one exchange; split like the rows otherwise)."""
    if not is_dtensor(input):
        # torch refuses a plain input beside DTensor target/weight ("mixed torch.Tensor and DTensor")
        raise RuntimeError(
            f"{fn}: the input is a plain tensor but the target or weight is a DTensor; pass all of them as "
            f"DTensors, or all as plain tensors"
        )
    mesh, placement = _mesh_and_placement(input, fn)
    for name, t in (("target", target), ("weight", weight)):
        if is_dtensor(t) and t.device_mesh != mesh:
            raise RuntimeError(f"{fn}: {name} is a DTensor on another device mesh than the input's")
    class_dim = 0 if input.dim() == 1 else 1
    # class weights are small and needed whole by every rank, whatever their placement (torch accepts
    # Replicate and Shard(0)); a pending sum of logits (Partial) is summed first
    weight_local = weight.full_tensor() if is_dtensor(weight) else weight
    if placement.is_partial():
        input = input.redistribute(mesh, [Replicate()])
        placement = Replicate()
    class_sharded = placement.is_shard() and placement.dim % max(input.dim(), 1) == class_dim
    probabilities = input.shape == target.shape
    if class_sharded and (fn != "cross_entropy" or probabilities or input.dim() == 1):
        # the vocab-parallel loss takes class-index targets only: split the rows instead (a 1-D input, one
        # row, is replicated); the gradient comes back in the caller's class split
        row_placement = Shard(0) if input.dim() > 1 else Replicate()
        input = input.redistribute(mesh, [row_placement])
        placement, class_sharded = row_placement, False
    if class_sharded:
        return _class_sharded(input, target, weight_local, mesh, class_dim, reduction, fn, options)
    return _row_parallel(local_loss, input, target, weight_local, mesh, placement, class_dim, reduction, fn, options)


def _with_statistics(loss, stats, mesh, placements, shape=None):
    """(loss, stats) with every statistic a DTensor of `placements` (global `shape`: see _rows_dtensor); the
    loss alone without stats."""
    if stats is None:
        return loss
    wrapped = {n: _rows_dtensor(t, mesh, placements, shape) for n, t in stats._asdict().items() if t is not None}
    return loss, type(stats)(**wrapped)


def _rows_dtensor(local: Tensor, mesh, placements, shape=None) -> DTensor:
    """A DTensor of per-row values from this rank's `local` ones. `shape`: the global shape, needed when the
    rows are split unevenly (from_local would otherwise assume even splits)."""
    if shape is None:
        return DTensor.from_local(local, mesh, placements, run_check=False)
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def _class_sharded(input, target, weight, mesh, class_dim, reduction, fn, options):
    # every rank needs every row's target (index targets are small): whatever its placement, made whole
    target_local = target.full_tensor() if is_dtensor(target) else target
    local = input.to_local().movedim(class_dim, -1)  # vocab_parallel_cross_entropy: classes last
    out = distributed.vocab_parallel_cross_entropy(
        local,
        target_local,
        group=mesh.get_group(),
        weight=weight,
        reduction=reduction,
        ignore_index=options.get("ignore_index", -100),
        label_smoothing=options.get("label_smoothing", 0.0),
        z_loss=options.get("z_loss", 0.0),
        softcap=options.get("softcap"),
        return_stats=options.get("return_stats"),
        backend=options.get("backend"),
    )
    loss, stats = out if isinstance(out, tuple) else (out, None)
    return _with_statistics(DTensor.from_local(loss, mesh, [Replicate()], run_check=False), stats, mesh, [Replicate()])


def _row_parallel(local_loss, input, target, weight, mesh, placement, class_dim, reduction, fn, options):
    """Rows (batch or spatial positions) split across ranks, or every rank holding all of them."""
    local = input.to_local()
    probabilities = input.shape == target.shape
    if is_dtensor(target):
        # torch redistributes a target laid out otherwise (replicated, split on another dimension, a
        # probability target split on its classes) to the logits' rows; so does xent
        want = (_target_placement(placement, class_dim, probabilities),)
        target_local = (target if target.placements == want else target.redistribute(mesh, want)).to_local()
    elif placement.is_replicate():
        target_local = target
    else:
        if target.dim() and input.dim() > 1 and target.shape[0] != input.shape[0]:
            # torch compares the plain target with the global logits first
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]})."
            )
        # torch: "aten.nll_loss_forward.default: got mixed torch.Tensor and DTensor" (a RuntimeError)
        raise RuntimeError(
            f"{fn}: with logits split on their rows ({input.placements}), pass target as a DTensor (torch "
            f"refuses a plain target there: which rows would this rank's part be?)"
        )
    with_stats = options.get("return_stats") is not None
    if placement.is_replicate():  # every rank computes the same loss
        out = local_loss(local, target_local, weight=weight, reduction=reduction, **options)
        loss, stats = out if with_stats else (out, None)
        return _with_statistics(
            DTensor.from_local(loss, mesh, [Replicate()], run_check=False), stats, mesh, [Replicate()]
        )
    out = local_loss(local, target_local, weight=weight, reduction="none", **options)
    rows, stats = out if with_stats else (out, None)
    out_dim = placement.dim if placement.dim < class_dim or input.dim() == 1 else placement.dim - 1
    rows_shape = tuple(n for d, n in enumerate(input.shape) if d != class_dim)  # the 'none' loss's, global
    if reduction == "none":
        loss = _rows_dtensor(rows, mesh, [Shard(out_dim)], rows_shape)
        return _with_statistics(loss, stats, mesh, [Shard(out_dim)], rows_shape)
    total = DTensor.from_local(rows.sum(), mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
    if reduction != "sum":
        count = _mean_denominator(local, target_local, weight, probabilities, class_dim, options).to(total.dtype)
        count = DTensor.from_local(count, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
        total = total / count
    return _with_statistics(total, stats, mesh, [Shard(out_dim)], rows_shape)


def _target_placement(placement, class_dim, probabilities):
    if placement.is_replicate() or probabilities or placement.dim < class_dim:
        return placement
    return Shard(placement.dim - 1)  # index targets have no class dimension


def _mean_denominator(local, target, weight, probabilities, class_dim, options) -> Tensor:
    """This rank's part of the 'mean' denominator: its rows (probabilities), or the class weights of its
    non-ignored targets (torch's weighted mean)."""
    if probabilities:
        return torch.full((), float(local.numel() // max(local.shape[class_dim], 1)), device=local.device)
    return ce_ops.mean_denominator(target, weight, options.get("ignore_index", -100), local.shape[class_dim])


def _vocab_sharded_head(input, linear_weight, linear_bias, target, fn: str):
    """The mesh of a head sharded on its classes (Shard(0)); NotImplementedError for the other layouts."""
    if not is_dtensor(linear_weight):
        raise NotImplementedError(
            f"{fn}: DTensor hidden states with a plain head; pass the hidden states' local tensor "
            f"(input.to_local() or input.full_tensor())"
        )
    mesh, placement = _mesh_and_placement(linear_weight, fn)
    if not (placement.is_shard() and placement.dim == 0):
        if placement.is_replicate() and not is_dtensor(input, linear_bias, target):
            raise NotImplementedError(f"{fn}: a replicated DTensor head: pass linear_weight.to_local()")
        raise NotImplementedError(f"{fn}: a head with placements {linear_weight.placements} (only Shard(0))")
    return mesh


def _local_bias(linear_bias, linear_weight, fn: str):
    """This rank's rows of a bias that must be sharded like the head."""
    if linear_bias is None:
        return None
    if not is_dtensor(linear_bias) or linear_bias.placements != linear_weight.placements:
        raise ValueError(f"{fn}: linear_bias must be sharded like linear_weight (Shard(0))")
    return linear_bias.to_local()


def linear_cross_entropy(plain_loss, input, linear_weight, target, linear_bias, weight, options: dict):
    """linear_cross_entropy with DTensor hidden states or head; `plain_loss` is the plain-tensor loss. With
    options' `return_stats`, (loss, TokenStatistics): replicated DTensors for a head sharded on its classes,
    plain tensors (the input's rows) where plain hidden states meet a gathered head."""
    fn = "linear_cross_entropy"
    mesh = _vocab_sharded_head(input, linear_weight, linear_bias, target, fn)
    if not is_dtensor(input):
        # Plain hidden states with a head sharded on its classes: what fully_shard (FSDP2) leaves outside the
        # module's forward, each rank with its own batch. Gather the head (as FSDP's unshard would) and give
        # each rank's weight shard the average of the ranks' gradients (FSDP's default reduction); with
        # identical hidden states on every rank (tensor parallelism fed local tensors) that average is the
        # gradient itself. Never a local shard taken for the whole head.
        return _gathered_head_loss(plain_loss, input, linear_weight, target, linear_bias, weight, mesh, options)
    hidden = _replicated_local(input, mesh, fn, "the hidden states (with a head sharded on its classes)")
    out = distributed.vocab_parallel_linear_cross_entropy(
        hidden,
        linear_weight.to_local(),
        _replicated_local(target, mesh, fn, "target"),
        group=mesh.get_group(),
        linear_bias=_local_bias(linear_bias, linear_weight, fn),
        weight=_replicated_local(weight, mesh, fn, "weight"),
        **options,
    )
    loss, stats = out if options.get("return_stats") is not None else (out, None)
    return _with_statistics(DTensor.from_local(loss, mesh, [Replicate()], run_check=False), stats, mesh, [Replicate()])


def _gathered(param: Tensor, mesh) -> Tensor:
    """The full tensor of a Shard(0) DTensor; backward reduce-scatters the ranks' gradients, averaged."""
    full = param.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    if full.requires_grad:
        world = mesh.size()
        full.register_hook(lambda g: g / world)
    return full


def _gathered_head_loss(plain_loss, input, linear_weight, target, linear_bias, weight, mesh, options):
    bias = None
    if linear_bias is not None:
        bias = _gathered(linear_bias, mesh) if is_dtensor(linear_bias) else linear_bias
    weight = _replicated_local(weight, mesh, "linear_cross_entropy", "weight")
    return plain_loss(input, _gathered(linear_weight, mesh), target, linear_bias=bias, weight=weight, **options)


# ----------------------------------------------------------------------------------------------------
# RL token log-probabilities (xent.rl)


def token_logprobs(plain, input, linear_weight, target, linear_bias, options: dict):
    """xent.token_logprobs with a head sharded on its classes: replicated DTensor hidden states take the
    vocab-parallel path (replicated DTensor results); plain hidden states (FSDP2 outside the module's
    forward) take the gathered head, as linear_cross_entropy. `plain` is xent.token_logprobs."""
    fn = "token_logprobs"
    mesh = _vocab_sharded_head(input, linear_weight, linear_bias, target, fn)
    if not is_dtensor(input):
        bias = _gathered(linear_bias, mesh) if is_dtensor(linear_bias) else linear_bias
        target = _replicated_local(target, mesh, fn, "target")
        return plain(input, _gathered(linear_weight, mesh), target, linear_bias=bias, **options)
    out = distributed.vocab_parallel_linear_token_logprobs(
        _replicated_local(input, mesh, fn, "the hidden states (with a head sharded on its classes)"),
        linear_weight.to_local(),
        _replicated_local(target, mesh, fn, "target"),
        group=mesh.get_group(),
        linear_bias=_local_bias(linear_bias, linear_weight, fn),
        **options,
    )
    return _each(out, lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False))


def token_logprobs_from_logits(plain, logits, target, options: dict):
    """xent.token_logprobs_from_logits on DTensor logits: sharded on the classes (the last dimension), the
    vocab-parallel path (replicated results); sharded on a leading dimension or replicated, each rank's
    rows locally (results split like them). `plain` is xent.token_logprobs_from_logits."""
    fn = "token_logprobs_from_logits"
    mesh, placement = _mesh_and_placement(logits, fn)
    class_dim = logits.dim() - 1
    if placement.is_shard() and placement.dim % logits.dim() == class_dim:
        out = distributed.vocab_parallel_token_logprobs(
            logits.to_local(),
            _replicated_local(target, mesh, fn, "target (with logits sharded on the class dimension)"),
            group=mesh.get_group(),
            **options,
        )
        return _each(out, lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False))
    if placement.is_replicate():
        out = plain(logits.to_local(), _replicated_local(target, mesh, fn, "target"), **options)
        return _each(out, lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False))
    if not is_dtensor(target) or target.device_mesh != mesh or target.placements != (placement,):
        raise ValueError(
            f"{fn}: with logits split on their rows ({logits.placements}), pass target as a DTensor split alike"
        )
    out = plain(logits.to_local(), target.to_local(), **options)
    return _each(out, lambda t: _rows_dtensor(t, mesh, [placement], tuple(logits.shape[:-1])))


def _each(out, wrap):
    """wrap() applied to a result or to each of a tuple of them."""
    return tuple(wrap(t) for t in out) if isinstance(out, tuple) else wrap(out)
