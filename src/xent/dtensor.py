"""xent's losses on DTensors: torch's tensor-parallel and data-parallel layouts, without gathering logits.

`xent.cross_entropy` / `nll_loss` / `linear_cross_entropy` (and their modules) come here when an
argument is a DTensor (torch.distributed.tensor). On a 1-D device mesh every placement combination torch's
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
  taken for the whole head) and each rank's shard gets the ranks' gradients reduced as the FSDP module
  owning it reduces them (its gradient divide factor: the mean by default, a sum with
  ``set_gradient_divide_factor(1.0)``).

On a 2-D (or larger) mesh, e.g. ``("dp", "tp")``, each mesh dimension plays one of these parts: the one
that splits the classes (logits ``Shard(class dim)``, or a head ``Shard(0)`` beside hidden states
replicated on it) runs the vocab-parallel loss on that dimension's process group; the dimensions that split
the rows (the batch or sequence) act as the row-parallel path (each rank its rows, 'mean'/'sum' summed
across them); a head sharded on such a dimension (FSDP2 over a tensor-parallel head) is gathered on it.

Results are DTensors (Replicate for 'mean'/'sum', the logits' row placement for 'none'), as torch's
loss_parallel returns them; gradients flow back as DTensors with the inputs' placements. The per-token
statistics (`return_stats=`) and the RL log-probabilities (xent.rl) follow the same layouts.
"""

from __future__ import annotations

import math
import weakref

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
    """The mesh and the placement of a DTensor on a 1-D mesh (larger meshes take the *_nd paths below)."""
    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"{fn}: this path takes 1-D meshes; got placements {input.placements}")
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
    mesh = input.device_mesh
    for name, t in (("target", target), ("weight", weight)):
        if is_dtensor(t) and t.device_mesh != mesh:
            raise RuntimeError(f"{fn}: {name} is a DTensor on another device mesh than the input's")
    class_dim = 0 if input.dim() == 1 else 1
    # class weights are small and needed whole by every rank, whatever their placement (torch accepts
    # Replicate and Shard(0)); a pending sum of logits (Partial) is summed first
    weight_local = weight.full_tensor() if is_dtensor(weight) else weight
    if mesh.ndim > 1:
        return _cross_entropy_nd(local_loss, input, target, weight_local, mesh, class_dim, reduction, fn, options)
    placement = input.placements[0]
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
    if is_dtensor(linear_weight) and linear_weight.device_mesh.ndim > 1:
        return _linear_nd(plain_loss, input, linear_weight, target, linear_bias, weight, options)
    mesh = _vocab_sharded_head(input, linear_weight, linear_bias, target, fn)
    if not is_dtensor(input):
        # Plain hidden states with a head sharded on its classes: what fully_shard (FSDP2) leaves outside the
        # module's forward, each rank with its own batch. Gather the head (as FSDP's unshard would) and give
        # each rank's weight shard the ranks' gradients reduced as its FSDP group reduces them (the average,
        # FSDP's default, or their sum with a divide factor of 1); with identical hidden states on every rank
        # (tensor parallelism fed local tensors) that average is the gradient itself. Never a local shard
        # taken for the whole head.
        return _gathered_head_loss(plain_loss, input, linear_weight, target, linear_bias, weight, mesh, options)
    hidden = _replicated_local(input, mesh, fn, "the hidden states (with a head sharded on its classes)")
    options = {k: v for k, v in options.items() if k != "memory_mode"}  # the vocab-parallel passes: one plan
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
    """The full tensor of a Shard(0) DTensor; backward reduce-scatters the ranks' gradients as the FSDP2
    group holding it reduces them (the mean by default): see fsdp_gathered."""
    return fsdp_gathered(param)[0]


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
    options = dict(options)
    detach_entropy = not options.pop("entropy_requires_grad", True)
    if is_dtensor(linear_weight) and linear_weight.device_mesh.ndim > 1:
        return _token_logprobs_nd(plain, input, linear_weight, target, linear_bias, options, detach_entropy)
    mesh = _vocab_sharded_head(input, linear_weight, linear_bias, target, fn)
    if not is_dtensor(input):
        bias = _gathered(linear_bias, mesh) if is_dtensor(linear_bias) else linear_bias
        target = _replicated_local(target, mesh, fn, "target")
        out = plain(input, _gathered(linear_weight, mesh), target, linear_bias=bias, **options)
        return _detached_entropy(out, detach_entropy)
    out = distributed.vocab_parallel_linear_token_logprobs(
        _replicated_local(input, mesh, fn, "the hidden states (with a head sharded on its classes)"),
        linear_weight.to_local(),
        _replicated_local(target, mesh, fn, "target"),
        group=mesh.get_group(),
        linear_bias=_local_bias(linear_bias, linear_weight, fn),
        **options,
    )
    out = _detached_entropy(out, detach_entropy)
    return _each(out, lambda t: DTensor.from_local(t, mesh, [Replicate()], run_check=False))


def token_logprobs_from_logits(plain, logits, target, options: dict):
    """xent.token_logprobs_from_logits on DTensor logits: sharded on the classes (the last dimension), the
    vocab-parallel path (replicated results); sharded on a leading dimension or replicated, each rank's
    rows locally (results split like them). `plain` is xent.token_logprobs_from_logits."""
    fn = "token_logprobs_from_logits"
    options = dict(options)
    detach_entropy = not options.pop("entropy_requires_grad", True)
    if logits.device_mesh.ndim > 1:
        return _token_logprobs_from_logits_nd(plain, logits, target, options, detach_entropy)
    return _detached_entropy(_token_logprobs_from_logits_1d(plain, logits, target, options, fn), detach_entropy)


def _token_logprobs_from_logits_1d(plain, logits, target, options, fn):
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


# ----------------------------------------------------------------------------------------------------
# 2-D (and larger) meshes: each mesh dimension splits the classes, splits the rows, or replicates


def _normalized(placements, ndim: int, fn: str):
    """The placements with Shard dims made non-negative; NotImplementedError for what no path takes."""
    out = []
    for p in placements:
        if p.is_shard():
            out.append(Shard(p.dim % max(ndim, 1)) if type(p) is Shard else p)
        elif p.is_replicate():
            out.append(p)
        else:
            raise NotImplementedError(f"{fn}: a DTensor placement {p} on a multi-dimensional mesh")
    return out


def _split_roles(placements, class_dim: int, fn: str):
    """(the mesh dimension that splits the classes or None, {mesh dimension: the tensor dimension it splits
    the rows on}) of logits' normalized placements."""
    class_mdim, rows = None, {}
    for i, p in enumerate(placements):
        if not p.is_shard():
            continue
        if p.dim == class_dim:
            if class_mdim is not None:
                raise NotImplementedError(f"{fn}: two mesh dimensions split the classes ({placements})")
            class_mdim = i
        else:
            rows[i] = p.dim
    return class_mdim, rows


def _rows_placements(ndim_mesh: int, rows: dict, out_dim) -> list:
    """A per-row result's placements: split like the rows on their mesh dimensions, replicated elsewhere."""
    return [Shard(out_dim(rows[i])) if i in rows else Replicate() for i in range(ndim_mesh)]


def _target_local_nd(target, mesh, want, rows: dict, fn: str):
    """This rank's part of the target, laid out as `want` (the logits' rows); a plain target only where
    every rank holds all rows."""
    if is_dtensor(target):
        want = tuple(want)
        return (target if tuple(target.placements) == want else target.redistribute(mesh, want)).to_local()
    if rows:
        raise RuntimeError(
            f"{fn}: with rows split across the mesh ({[f'mesh dim {i}' for i in rows]}), pass target as a "
            f"DTensor (which rows would this rank's part of a plain target be?)"
        )
    return target


def _reduce_rows(rows_loss, count, mesh, rows: dict, reduction: str, placements, shape):
    """The 'none' / 'sum' / 'mean' result of each rank's per-row losses, summed over the row-splitting
    mesh dimensions (`count`: this rank's part of the 'mean' denominator)."""
    if reduction == "none":
        return _rows_dtensor(rows_loss, mesh, placements, shape)
    partial = [Partial() if i in rows else Replicate() for i in range(mesh.ndim)]
    replicate = [Replicate()] * mesh.ndim
    total = DTensor.from_local(rows_loss.sum(), mesh, partial, run_check=False).redistribute(mesh, replicate)
    if reduction != "sum":
        count = DTensor.from_local(count.to(total.dtype), mesh, partial, run_check=False).redistribute(mesh, replicate)
        total = total / count
    return total


def _cross_entropy_nd(local_loss, input, target, weight, mesh, class_dim, reduction, fn, options):
    ndim = input.dim()
    if any(p.is_partial() for p in input.placements):  # a pending sum: summed first, as on a 1-D mesh
        input = input.redistribute(mesh, [Replicate() if p.is_partial() else p for p in input.placements])
    placements = _normalized(input.placements, ndim, fn)
    class_mdim, rows = _split_roles(placements, class_dim, fn)
    probabilities = input.shape == target.shape
    if class_mdim is not None and (fn != "cross_entropy" or probabilities or ndim == 1):
        # the vocab-parallel loss takes class-index targets only: the classes are made whole on that mesh
        # dimension (the gradient comes back in the caller's split)
        placements[class_mdim] = Replicate()
        input = input.redistribute(mesh, placements)
        class_mdim = None
    want = [
        Replicate() if i == class_mdim or p.is_replicate() else _target_placement(p, class_dim, probabilities)
        for i, p in enumerate(placements)
    ]
    target_local = _target_local_nd(target, mesh, want, rows, fn)
    local = input.to_local()
    row_reduction = "none" if rows else reduction
    if class_mdim is not None:
        out = distributed.vocab_parallel_cross_entropy(
            local.movedim(class_dim, -1),
            target_local,
            group=mesh.get_group(class_mdim),
            weight=weight,
            reduction=row_reduction,
            ignore_index=options.get("ignore_index", -100),
            label_smoothing=options.get("label_smoothing", 0.0),
            z_loss=options.get("z_loss", 0.0),
            softcap=options.get("softcap"),
            return_stats=options.get("return_stats"),
            backend=options.get("backend"),
        )
    else:
        out = local_loss(local, target_local, weight=weight, reduction=row_reduction, **options)
    loss, stats = out if options.get("return_stats") is not None else (out, None)
    out_dim = lambda d: d if d < class_dim or ndim == 1 else d - 1  # noqa: E731 - the rows' dims without the classes
    out_placements = _rows_placements(mesh.ndim, rows, out_dim)
    rows_shape = tuple(n for d, n in enumerate(input.shape) if d != class_dim or ndim == 1)
    if not rows:
        replicated = [Replicate()] * mesh.ndim
        return _with_statistics(DTensor.from_local(loss, mesh, replicated, run_check=False), stats, mesh, replicated)
    count = None
    if reduction == "mean":
        if probabilities:
            count = torch.full((), float(local.numel() // max(local.shape[class_dim], 1)), device=local.device)
        else:
            ii = options.get("ignore_index", -100)
            count = ce_ops.mean_denominator(target_local, weight, ii, input.shape[class_dim])
    total = _reduce_rows(loss, count, mesh, rows, reduction, out_placements, rows_shape)
    return _with_statistics(total, stats, mesh, out_placements, rows_shape)


def _fsdp_group(param):
    """The FSDP2 parameter group (fully_shard) that holds `param` as one of its sharded parameters, or None.

    torch keeps no map from a parameter to its FSDP state, so the FSDP states of the live modules are
    searched (a host-side walk over their parameter lists, no communication)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a torch without FSDP2's internals: the mean, FSDP's default
        return None
    for ref in list(_module_state_mapping.values()):
        state = ref() if isinstance(ref, weakref.ref) else ref
        if not isinstance(state, FSDPState):
            continue
        for group in state._fsdp_param_groups:
            if any(fsdp_param.sharded_param is param for fsdp_param in group.fsdp_params):
                return group
    return None


def _fsdp_dims(param) -> tuple[tuple[int, ...], float | None, torch.dtype | None]:
    """(the mesh dimensions of `param` that its FSDP2 group shards or replicates over, the group's gradient
    divide factor (None: FSDP's mean), its mixed-precision param_dtype (None: the parameter's own)); no
    dimension (and None, None) for a parameter FSDP does not hold."""
    group = _fsdp_group(param)
    if group is None:
        return (), None, None
    # FSDP puts its data-parallel dimensions first, before a tensor-parallel parameter's own
    param_dtype = getattr(getattr(group, "mp_policy", None), "param_dtype", None)
    return tuple(range(group.mesh_info.mesh.ndim)), group.gradient_divide_factor, param_dtype


def _gather_dims(param: Tensor, mesh, dims, divide: float | None) -> Tensor:
    """This rank's block of a DTensor parameter made whole on the mesh dimensions `dims` (kept as it is on
    the others): backward sums the ranks' gradients over `dims` (a reduce-scatter onto a shard, an
    all-reduce onto a replica), divided by `divide` when given."""
    placements = list(param.placements)
    grads = list(param.placements)
    for i in dims:
        placements[i], grads[i] = Replicate(), Partial()
    full = param.redistribute(mesh, placements).to_local(grad_placements=grads)
    if full.requires_grad and divide is not None and divide != 1:
        full.register_hook(lambda g: g / divide)
    return full


def held_by_fsdp(param: Tensor) -> bool:
    """Whether an FSDP2 (fully_shard) group holds `param` as one of its sharded parameters."""
    return _fsdp_group(param) is not None


def fsdp_gathered(param: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """A head (or bias) beside plain hidden states, each rank with its own batch (FSDP2 outside the
    module's forward): gathered on the dimensions FSDP holds it on, in FSDP's param_dtype when its
    mixed-precision policy sets one, each rank's shard receiving the ranks' gradients reduced as that FSDP
    group reduces them (summed, then divided by its gradient divide factor; the mean by default). For a
    parameter FSDP does not hold, every mesh dimension is gathered and the gradient averaged (FSDP's
    default). Returns the local tensor and the mesh dimensions left as they were (a tensor-parallel split)."""
    mesh = param.device_mesh
    dims, factor, param_dtype = _fsdp_dims(param)
    if not dims:
        dims = tuple(range(mesh.ndim))
    if factor is None:
        factor = float(math.prod(mesh.size(i) for i in dims))
    if param_dtype is not None and param_dtype != param.dtype:
        param = param.to(param_dtype)  # cast before the gather, as FSDP does
    kept = tuple(i for i in range(mesh.ndim) if i not in dims)
    return _gather_dims(param, mesh, dims, factor), kept


def _head_roles_nd(input, linear_weight, fn: str):
    """For DTensor hidden states and head on one N-D mesh: (the mesh dimension that splits the vocabulary
    or None, {mesh dimension: the hidden states' row dimension it splits}). The head may be split (FSDP) or
    replicated on a row dimension; it is gathered there."""
    if input.device_mesh != linear_weight.device_mesh:
        raise ValueError(f"{fn}: the hidden states and the head are DTensors on different meshes")
    hidden_p = _normalized(input.placements, input.dim(), fn)
    vocab_mdim, rows = None, {}
    for i, (hp, wp) in enumerate(zip(hidden_p, linear_weight.placements)):
        if hp.is_shard() and hp.dim < input.dim() - 1 and (wp.is_replicate() or (wp.is_shard() and wp.dim == 0)):
            rows[i] = hp.dim
        elif hp.is_replicate() and wp.is_shard() and wp.dim == 0:
            if vocab_mdim is not None:
                raise NotImplementedError(f"{fn}: two mesh dimensions split the head's vocabulary")
            vocab_mdim = i
        elif not (hp.is_replicate() and wp.is_replicate()):
            raise NotImplementedError(
                f"{fn}: hidden states {input.placements} with a head {linear_weight.placements} (per mesh "
                f"dimension: hidden Shard(row) beside a head Replicate/Shard(0), or hidden Replicate beside a head "
                f"Shard(0) or Replicate)"
            )
    return vocab_mdim, rows


def _head_nd(input, linear_weight, linear_bias, fn: str):
    """The local pieces of an N-D head: (hidden states, head block, bias block, vocab mesh dim or None,
    {row mesh dim: row dim}, plain hidden states?)."""
    mesh = linear_weight.device_mesh
    if linear_bias is not None and (not is_dtensor(linear_bias) or linear_bias.placements != linear_weight.placements):
        raise ValueError(f"{fn}: linear_bias must be a DTensor placed like linear_weight ({linear_weight.placements})")
    if not is_dtensor(input):
        head, kept = fsdp_gathered(linear_weight)
        bias = fsdp_gathered(linear_bias)[0] if linear_bias is not None else None
        vocab = [i for i in kept if linear_weight.placements[i].is_shard()]
        if len(vocab) > 1:
            raise NotImplementedError(f"{fn}: two mesh dimensions split the head's vocabulary")
        return input, head, bias, (vocab[0] if vocab else None), {}, True
    vocab_mdim, rows = _head_roles_nd(input, linear_weight, fn)
    # on a row dimension the loss is the DTensor's global one: the head's gradient is the exact sum of the
    # ranks' parts, with no FSDP divide factor
    head = _gather_dims(linear_weight, mesh, [i for i in range(mesh.ndim) if i != vocab_mdim], None)
    bias = None
    if linear_bias is not None:
        bias = _gather_dims(linear_bias, mesh, [i for i in range(mesh.ndim) if i != vocab_mdim], None)
    return input.to_local(), head, bias, vocab_mdim, rows, False


def _head_target(target, mesh, rows: dict, fn: str):
    want = [Shard(rows[i]) if i in rows else Replicate() for i in range(mesh.ndim)]
    return _target_local_nd(target, mesh, want, rows, fn)


def _linear_nd(plain_loss, input, linear_weight, target, linear_bias, weight, options: dict):
    fn = "linear_cross_entropy"
    mesh = linear_weight.device_mesh
    hidden, head, bias, vocab_mdim, rows, plain = _head_nd(input, linear_weight, linear_bias, fn)
    if is_dtensor(weight):
        weight = weight.full_tensor()
    target_local = target if plain else _head_target(target, mesh, rows, fn)
    reduction = options["reduction"]
    opts = dict(options, reduction="none" if rows else reduction)
    if vocab_mdim is not None:
        opts.pop("memory_mode", None)  # the vocab-parallel passes have the one plan
        out = distributed.vocab_parallel_linear_cross_entropy(
            hidden, head, target_local, group=mesh.get_group(vocab_mdim), linear_bias=bias, weight=weight, **opts
        )
    else:
        out = plain_loss(hidden, head, target_local, linear_bias=bias, weight=weight, **opts)
    if plain:  # each rank its own batch: plain results, as on a 1-D mesh
        return out
    loss, stats = out if options.get("return_stats") is not None else (out, None)
    if not rows:
        replicated = [Replicate()] * mesh.ndim
        return _with_statistics(DTensor.from_local(loss, mesh, replicated, run_check=False), stats, mesh, replicated)
    placements = _rows_placements(mesh.ndim, rows, lambda d: d)
    shape = tuple(input.shape[:-1])
    count = None
    if reduction == "mean":
        ii = options.get("ignore_index", -100)
        count = ce_ops.mean_denominator(target_local.reshape(-1), weight, ii, linear_weight.shape[0])
    total = _reduce_rows(loss, count, mesh, rows, reduction, placements, shape)
    return _with_statistics(total, stats, mesh, placements, shape)


def _token_logprobs_nd(plain, input, linear_weight, target, linear_bias, options: dict, detach_entropy: bool):
    fn = "token_logprobs"
    mesh = linear_weight.device_mesh
    hidden, head, bias, vocab_mdim, rows, plain_hidden = _head_nd(input, linear_weight, linear_bias, fn)
    target_local = target if plain_hidden else _head_target(target, mesh, rows, fn)
    if vocab_mdim is not None:
        out = distributed.vocab_parallel_linear_token_logprobs(
            hidden, head, target_local, group=mesh.get_group(vocab_mdim), linear_bias=bias, **options
        )
    else:
        out = plain(hidden, head, target_local, linear_bias=bias, **options)
    out = _detached_entropy(out, detach_entropy)
    if plain_hidden:
        return out
    placements = _rows_placements(mesh.ndim, rows, lambda d: d)
    return _each(out, lambda t: _rows_dtensor(t, mesh, placements, tuple(input.shape[:-1])))


def _token_logprobs_from_logits_nd(plain, logits, target, options: dict, detach_entropy: bool):
    fn = "token_logprobs_from_logits"
    mesh = logits.device_mesh
    if any(p.is_partial() for p in logits.placements):
        logits = logits.redistribute(mesh, [Replicate() if p.is_partial() else p for p in logits.placements])
    class_dim = logits.dim() - 1
    placements = _normalized(logits.placements, logits.dim(), fn)
    class_mdim, rows = _split_roles(placements, class_dim, fn)
    want = [Shard(rows[i]) if i in rows else Replicate() for i in range(mesh.ndim)]
    target_local = _target_local_nd(target, mesh, want, rows, fn)
    if class_mdim is not None:
        out = distributed.vocab_parallel_token_logprobs(
            logits.to_local(), target_local, group=mesh.get_group(class_mdim), **options
        )
    else:
        out = plain(logits.to_local(), target_local, **options)
    out = _detached_entropy(out, detach_entropy)
    return _each(out, lambda t: _rows_dtensor(t, mesh, want, tuple(logits.shape[:-1])))


def _detached_entropy(out, detach: bool):
    """(logprobs, entropy) with the entropy detached when asked (entropy_requires_grad=False)."""
    if detach and isinstance(out, tuple):
        return out[0], out[1].detach()
    return out
