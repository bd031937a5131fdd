"""Scenarios for 2-D meshes (data parallel x tensor parallel), FSDP2's gradient reduction, the global token
count and the torchtitan loss components; run by test_distributed.py through dist_worker.py's harness.

Each function runs on every rank; `check`, `_close`, `_require` and `_expect` are the harness's (soft
assertions, every rank making the same collective calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dist_worker import _close, _expect, _require, check

import xent
from xent.distributed import global_token_count

# the statistics the vocab-parallel exchange merges
STATISTICS = ("lse", "logprob", "entropy", "z_loss", "argmax", "correct")


def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))


def _mesh2d(rank, world, sizes):
    """DTensor logits and heads on a 2x2 ("dp", "tp") mesh: rows split on one dimension, classes (or the
    head's vocabulary) on the other, either order; loss, statistics and gradients equal the single-process
    ones (uneven splits: 7 rows, 37 classes)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    gen = torch.Generator().manual_seed(3)
    n, c, h = 7, 37, 5
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=gen)
    y[2] = -100
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    layouts = [
        (Shard(0), Shard(1)),  # batch on dp, classes on tp: FSDP x TP's logits
        (Shard(1), Shard(0)),  # the other way round
        (Shard(0), Replicate()),
        (Replicate(), Shard(-1)),
        (Replicate(), Replicate()),
    ]
    cases = [
        dict(),
        dict(reduction="sum", label_smoothing=0.1, weight=w),
        dict(reduction="none", z_loss=1e-3),
        dict(reduction="mean", weight=w, ignore_index=3),
    ]
    for placements in layouts:
        row_split = any(p.is_shard() and p.dim == 0 for p in placements)
        target_placements = tuple(p if p.is_shard() and p.dim == 0 else Replicate() for p in placements)
        for kw in cases:
            with check(f"logits {placements} {sorted(kw)} {kw.get('reduction', 'mean')}"):
                yk = torch.where(y == -100, kw.get("ignore_index", -100), y)
                ref_x = x.clone().requires_grad_()
                ref = xent.cross_entropy(ref_x, yk, **kw)
                up = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
                (ref_grad,) = torch.autograd.grad(ref, ref_x, up)
                dx = distribute_tensor(x, mesh, placements).requires_grad_()
                target = distribute_tensor(yk, mesh, target_placements) if row_split else yk
                loss = xent.cross_entropy(dx, target, **kw)
                _require(isinstance(loss, DTensor), type(loss))
                _close(loss.full_tensor(), ref, "loss")
                (grad,) = torch.autograd.grad(loss, dx, distribute_tensor(up, mesh, loss.placements))
                _require(grad.placements == dx.placements, (grad.placements, dx.placements))
                _close(grad.full_tensor(), ref_grad, "gradient")
        with check(f"logits {placements} statistics"):
            target = distribute_tensor(y, mesh, target_placements) if row_split else y
            _, stats = xent.cross_entropy(distribute_tensor(x, mesh, placements), target, return_stats=STATISTICS)
            expected = xent.cross_entropy(x, y, return_stats=STATISTICS)[1]
            for name in STATISTICS:
                a, b = getattr(stats, name).full_tensor(), getattr(expected, name)
                if a.dtype.is_floating_point:
                    _close(a, b, name)
                else:
                    _require(torch.equal(a, b), (name, a, b))
        with check(f"token_logprobs_from_logits {placements}"):
            ref_x = x.clone().requires_grad_()
            ref = xent.token_logprobs_from_logits(ref_x, y, temperature=0.8, return_entropy=True)
            ups = (
                torch.randn(n, generator=gen, dtype=torch.float64),
                torch.randn(n, generator=gen, dtype=torch.float64),
            )
            (ref_grad,) = torch.autograd.grad(ref, ref_x, ups)
            dx = distribute_tensor(x, mesh, placements).requires_grad_()
            target = distribute_tensor(y, mesh, target_placements) if row_split else y
            ours = xent.token_logprobs_from_logits(dx, target, temperature=0.8, return_entropy=True)
            for a, b, what in zip(ours, ref, ("logprob", "entropy")):
                _close(a.full_tensor(), b, what)
            dups = tuple(distribute_tensor(u, mesh, ours[0].placements) for u in ups)
            (grad,) = torch.autograd.grad(ours, dx, dups)
            _close(grad.full_tensor(), ref_grad, "gradient")
    # probability targets and nll_loss on class-split logits: the classes are made whole on that dimension
    probs = torch.softmax(torch.randn(n, c, generator=gen, dtype=torch.float64), 1)
    with check("probability targets and nll_loss, classes split on tp"):
        dx = distribute_tensor(x, mesh, (Shard(0), Shard(1))).requires_grad_()
        loss = xent.cross_entropy(dx, distribute_tensor(probs, mesh, (Shard(0), Replicate())), label_smoothing=0.1)
        ref_x = x.clone().requires_grad_()
        ref = F.cross_entropy(ref_x, probs, label_smoothing=0.1)
        _close(loss.full_tensor(), ref, "probability loss")
        (grad,) = torch.autograd.grad(loss, dx)
        _close(grad.full_tensor(), torch.autograd.grad(ref, ref_x)[0], "probability gradient")
        logp = torch.log_softmax(x, 1)
        nll = xent.nll_loss(
            distribute_tensor(logp, mesh, (Shard(0), Shard(1))), distribute_tensor(y, mesh, (Shard(0), Replicate()))
        )
        _close(nll.full_tensor(), F.nll_loss(logp, y), "nll_loss")
    with check("refused: row-split logits with a plain target"):
        dx = distribute_tensor(x, mesh, (Shard(0), Shard(1)))
        _expect(RuntimeError, "pass target as a DTensor", lambda: xent.cross_entropy(dx, y))

    # the head: hidden states split on dp (replicated on tp), the head's vocabulary on tp, and on dp either
    # replicated or sharded too (FSDP's layout over a tensor-parallel head)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    head = torch.randn(c, h, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    for head_placements in ((Replicate(), Shard(0)), (Shard(0), Shard(0))):
        for kw in (dict(), dict(reduction="sum", label_smoothing=0.1, weight=w), dict(reduction="none")):
            with check(f"head {head_placements} {sorted(kw)} {kw.get('reduction', 'mean')}"):
                ref_p = [t.clone().requires_grad_() for t in (hidden, head, bias)]
                ref = xent.linear_cross_entropy(ref_p[0], ref_p[1], y, linear_bias=ref_p[2], **kw)
                up = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
                ref_grads = torch.autograd.grad(ref, ref_p, up)
                params = [
                    distribute_tensor(hidden, mesh, (Shard(0), Replicate())).requires_grad_(),
                    distribute_tensor(head, mesh, head_placements).requires_grad_(),
                    distribute_tensor(bias, mesh, head_placements).requires_grad_(),
                ]
                target = distribute_tensor(y, mesh, (Shard(0), Replicate()))
                loss = xent.linear_cross_entropy(params[0], params[1], target, linear_bias=params[2], **kw)
                _require(isinstance(loss, DTensor), type(loss))
                _close(loss.full_tensor(), ref, "linear loss")
                grads = torch.autograd.grad(loss, params, distribute_tensor(up, mesh, loss.placements))
                for got, want, p, what in zip(grads, ref_grads, params, ("input", "weight", "bias")):
                    _require(got.placements == p.placements, (what, got.placements, p.placements))
                    _close(got.full_tensor(), want, f"linear grad {what}")
        with check(f"head {head_placements} token_logprobs and statistics"):
            ref_p = [t.clone().requires_grad_() for t in (hidden, head, bias)]
            ref = xent.token_logprobs(ref_p[0], ref_p[1], y, linear_bias=ref_p[2], temperature=0.7, return_entropy=True)
            ups = (
                torch.randn(n, generator=gen, dtype=torch.float64),
                torch.randn(n, generator=gen, dtype=torch.float64),
            )
            ref_grads = torch.autograd.grad(ref, ref_p, ups)
            params = [
                distribute_tensor(hidden, mesh, (Shard(0), Replicate())).requires_grad_(),
                distribute_tensor(head, mesh, head_placements).requires_grad_(),
                distribute_tensor(bias, mesh, head_placements).requires_grad_(),
            ]
            target = distribute_tensor(y, mesh, (Shard(0), Replicate()))
            ours = xent.token_logprobs(
                params[0], params[1], target, linear_bias=params[2], temperature=0.7, return_entropy=True
            )
            for a, b, what in zip(ours, ref, ("logprob", "entropy")):
                _close(a.full_tensor(), b, what)
            dups = tuple(distribute_tensor(u, mesh, ours[0].placements) for u in ups)
            for got, want, what in zip(torch.autograd.grad(ours, params, dups), ref_grads, ("input", "weight", "bias")):
                _close(got.full_tensor(), want, f"token_logprobs grad {what}")
            _, stats = xent.linear_cross_entropy(
                params[0].detach(), params[1].detach(), target, return_stats=STATISTICS
            )
            expected = xent.linear_cross_entropy(hidden, head, y, return_stats=STATISTICS)[1]
            _close(stats.lse.full_tensor(), expected.lse, "lse")
            _require(torch.equal(stats.argmax.full_tensor(), expected.argmax))


def _fsdp_model(hidden=6, vocab=11):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, hidden, dtype=torch.float64)
            self.lm_head = torch.nn.Linear(hidden, vocab, dtype=torch.float64)

        def forward(self, h, y):
            # the head used outside its own forward: a sharded DTensor here when it is its own FSDP unit
            return xent.linear_cross_entropy(
                self.body(h), self.lm_head.weight, y, linear_bias=self.lm_head.bias, reduction="sum"
            )

    torch.manual_seed(0)
    return Model()


def _fsdp_divide(rank, world, sizes):
    """FSDP2 with the head its own unit, used outside its forward (the gathered head): the head's gradient
    follows its FSDP module's reduction, the default mean and torchtitan's sum (divide factor 1), as the
    body's gradient (reduced by FSDP itself) does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def data(r):
        gen = torch.Generator().manual_seed(100 + r)
        return torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 11, (5,), generator=gen)

    reference = _fsdp_model()
    (sum(reference(*data(r)) for r in range(world))).backward()
    summed = {n: p.grad.clone() for n, p in reference.named_parameters()}
    for factor in (None, 1.0, 3.0):
        with check(f"gradient divide factor {factor}"):
            model = _fsdp_model()
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if factor is not None:
                model.set_gradient_divide_factor(factor)
                model.lm_head.set_gradient_divide_factor(factor)
            model(*data(rank)).backward()
            divide = world if factor is None else factor
            for n, p in model.named_parameters():
                _close(p.grad.full_tensor(), summed[n] / divide, f"grad {n} (factor {factor})")
    with check("token_logprobs through the gathered head, summed"):
        model = _fsdp_model()
        fully_shard(model.lm_head, mesh=mesh)
        model.lm_head.set_gradient_divide_factor(1.0)
        hidden = [torch.nn.functional.pad(data(r)[0], (0, 2), value=0.5) for r in range(world)]
        xent.token_logprobs(hidden[rank], model.lm_head.weight, data(rank)[1]).sum().backward()
        ref = _fsdp_model()
        sum(xent.token_logprobs(hidden[r], ref.lm_head.weight, data(r)[1]).sum() for r in range(world)).backward()
        _close(model.lm_head.weight.grad.full_tensor(), ref.lm_head.weight.grad, "token_logprobs head grad")


def _fsdp_tp(rank, world, sizes):
    """FSDP2 over a tensor-parallel head on a 2x2 mesh (ColwiseParallel on "tp", fully_shard on "dp"), the
    loss outside the head's forward with plain hidden states (each dp rank its batch, the same on its tp
    ranks): the head is gathered on dp only and the vocab-parallel linear loss runs on tp; its gradient
    follows the FSDP module's divide factor (mean and sum) and equals the single-process one."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = _mesh(world)
    dp_rank = mesh.get_local_rank("dp")
    dp = mesh.size(0)

    def data(r):
        gen = torch.Generator().manual_seed(300 + r)
        return torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randint(0, 11, (5,), generator=gen)

    reference = _fsdp_model()
    sum(reference(*data(r)) for r in range(dp)).backward()
    summed = {n: p.grad.clone() for n, p in reference.named_parameters()}
    for factor in (None, 1.0):
        with check(f"fsdp x tp head, divide factor {factor}"):
            model = _fsdp_model()
            parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel())
            fully_shard(model.lm_head, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            if factor is not None:
                model.set_gradient_divide_factor(factor)
                model.lm_head.set_gradient_divide_factor(factor)
            _require(model.lm_head.weight.device_mesh.ndim == 2, model.lm_head.weight.placements)
            loss = model(*data(dp_rank))
            _close(loss, reference(*data(dp_rank)).detach(), "loss")
            loss.backward()
            divide = dp if factor is None else factor
            for n, p in model.named_parameters():
                _close(p.grad.full_tensor(), summed[n] / divide, f"grad {n} (factor {factor})")


def _token_count(rank, world, sizes):
    """global_token_count: 'sum' losses over each rank's micro-batches divided by the count give the loss and
    the gradients of one process over the whole batch, under DDP and FSDP2 with gradient accumulation,
    however unevenly the ignored tokens fall."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    micro = 3

    def batch(r, m):
        gen = torch.Generator().manual_seed(1000 + 10 * r + m)
        h = torch.randn(4 + m, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 11, (4 + m,), generator=gen)
        y[: (r + m) % 4] = -100  # a different number of ignored tokens per rank and micro-batch
        return h, y

    everything = [batch(r, m) for r in range(world) for m in range(micro)]
    all_h = torch.cat([h for h, _ in everything])
    all_y = torch.cat([y for _, y in everything])
    torch.manual_seed(0)
    reference = torch.nn.Linear(6, 11, dtype=torch.float64)
    ref_loss = xent.cross_entropy(reference(all_h), all_y, label_smoothing=0.1)
    ref_loss.backward()
    mine = [batch(rank, m) for m in range(micro)]
    with check("count"):
        count = global_token_count([y for _, y in mine])
        _require(count.dtype == torch.int64 and count.dim() == 0, (count.dtype, count.shape))
        _require(int(count) == int((all_y != -100).sum()), (count, (all_y != -100).sum()))
        wt = torch.rand(11, dtype=torch.float64) + 0.5
        weighted = global_token_count([y for _, y in mine], weight=wt)
        _close(weighted, wt[all_y[all_y != -100]].sum(), "weighted count")
        _expect(TypeError, "integer", lambda: global_token_count(torch.randn(3)))
    with check("ddp, gradient accumulation"):
        model = DistributedDataParallel(torch.nn.Linear(6, 11, dtype=torch.float64))
        model.module.load_state_dict(reference.state_dict())
        count = global_token_count([y for _, y in mine])
        total = torch.zeros((), dtype=torch.float64)
        for i, (h, y) in enumerate(mine):
            ctx = model.no_sync() if i < micro - 1 else torch.enable_grad()
            with ctx:
                loss = xent.cross_entropy(model(h), y, reduction="sum", label_smoothing=0.1) / count
                (loss * world).backward()  # DDP averages the ranks' gradients: times the world gives their sum
            total = total + loss.detach()
        dist_total = total.clone()
        torch.distributed.all_reduce(dist_total)
        _close(dist_total, ref_loss.detach(), "ddp loss")
        _close(model.module.weight.grad, reference.weight.grad, "ddp weight grad")
        _close(model.module.bias.grad, reference.bias.grad, "ddp bias grad")
    with check("fsdp2 (divide factor 1), gradient accumulation, the fused head outside its forward"):
        mesh = init_device_mesh("cpu", (world,))
        model = torch.nn.Linear(6, 11, dtype=torch.float64)
        model.load_state_dict(reference.state_dict())
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)
        count = global_token_count([y for _, y in mine])
        for h, y in mine:
            xent.linear_cross_entropy(
                h, model.weight, y, linear_bias=model.bias, reduction="sum", label_smoothing=0.1
            ).div(count).backward()
        _close(model.weight.grad.full_tensor(), reference.weight.grad, "fsdp weight grad")
        _close(model.bias.grad.full_tensor(), reference.bias.grad, "fsdp bias grad")


# torchtitan computes its losses in fp32 (it upcasts the logits); xent keeps an fp64 model's fp64
TIGHT = dict(rtol=1e-9, atol=1e-11)
FP32 = dict(rtol=1e-5, atol=1e-6)


def _tt_model(hidden=6, vocab=37, seed=0):
    """A body and a head, as torchtitan's decoder with ``_skip_lm_head``: forward returns hidden states."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, hidden, dtype=torch.float64)
            self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.float64)

        def forward(self, h):
            return self.body(h)

    torch.manual_seed(seed)
    return Model()


def _tt_data(r, b=2, seq=4, vocab=37):
    gen = torch.Generator().manual_seed(500 + r)
    labels = torch.randint(0, vocab, (b, seq), generator=gen)
    labels[0, : (r % 3) + 1] = -100  # a different number of valid tokens per rank
    return torch.randn(b, seq, 4, generator=gen, dtype=torch.float64), labels


def _grads(model):
    return {
        n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad) for n, p in model.named_parameters()
    }


def _torchtitan(rank, world, sizes):
    """xent's torchtitan components against torchtitan's own on 2 ranks: FSDP2 with torchtitan's summed
    gradients (the fused head vs its ChunkedLossWrapper), tensor parallelism on its partial_dtensor backend
    (Shard(-1) logits, a ColwiseParallel head) and on its spmd_types backend (plain local vocabulary
    shards); losses and gradients equal, and equal to one process over the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torchtitan.components import loss as tt_loss
    from torchtitan.distributed import utils as tt_utils
    from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
    from torchtitan.distributed.spmd_types import set_current_spmd_mesh

    import xent.integrations.torchtitan as xent_tt

    vocab = 37
    # single-process answer: every rank's summed loss over the global valid-token count
    reference = _tt_model()
    everything = [_tt_data(r) for r in range(world)]
    total_tokens = sum(int((y != -100).sum()) for _, y in everything)
    ref_loss = (
        sum(
            F.cross_entropy(reference.lm_head(reference(h)).flatten(0, 1), y.flatten(), reduction="sum")
            for h, y in everything
        )
        / total_tokens
    )
    ref_loss.backward()
    ref_grads = _grads(reference)
    h, y = _tt_data(rank)
    count = global_token_count(y)

    with check("fsdp2, divide factor 1: fused head vs ChunkedLossWrapper"):
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        _require(int(count) == total_tokens, (count, total_tokens))
        results = []
        for config in (xent_tt.LinearCrossEntropyLoss.Config(), tt_loss.ChunkedLossWrapper.Config(num_chunks=2)):
            model = _tt_model()
            fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
            disable_fsdp_gradient_division(model)
            fn = config.build()
            fn.set_lm_head(model.lm_head)
            loss, _ = fn(model(h), y, count)
            loss.backward()
            summed = loss.detach().clone()
            torch.distributed.all_reduce(summed)  # torchtitan's global_avg_loss: the ranks' sum
            results.append((summed, _grads(model)))
        for (loss, grads), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
            _close(loss.double(), ref_loss.detach(), f"{what} loss", **tol)
            for n, g in grads.items():
                _close(g, ref_grads[n], f"{what} grad {n}", **tol)

    tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    # tensor parallelism: every rank the same batch
    h, y = _tt_data(0)
    count = (y != -100).sum()  # no data parallelism: this batch is the whole step
    reference = _tt_model()
    live_hidden = reference(h)
    ref_hidden = live_hidden.detach()
    ref_loss = F.cross_entropy(reference.lm_head(live_hidden).flatten(0, 1), y.flatten(), reduction="sum") / count
    live_hidden.retain_grad()
    ref_loss.backward()
    ref_grads = _grads(reference)
    ref_hidden_grad = live_hidden.grad
    logits = reference.lm_head(ref_hidden).detach()
    try:
        tt_utils.set_spmd_backend("partial_dtensor")
        with check("partial_dtensor: Shard(-1) logits"):
            results = []
            for cls in (xent_tt.CrossEntropyLoss, tt_loss.CrossEntropyLoss):
                x = distribute_tensor(logits, tp_mesh, [Shard(2)]).requires_grad_()
                loss, _ = cls.Config().build()(x, y, count)
                _require(not hasattr(loss, "full_tensor"), type(loss))  # plain, as torchtitan's
                loss.backward()
                results.append((loss.detach(), x.grad.full_tensor()))
            expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / count
            for (loss, _), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
                _close(loss.double(), expected, f"{what} loss", **tol)
            _close(results[0][1], results[1][1], "logits gradient", **FP32)
        for hidden_layout in ("plain", "replicated"):
            with check(f"partial_dtensor: ColwiseParallel head, {hidden_layout} hidden states"):
                results = []
                for config in (
                    xent_tt.LinearCrossEntropyLoss.Config(),
                    tt_loss.ChunkedLossWrapper.Config(num_chunks=2),
                ):
                    model = _tt_model()
                    parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(use_local_output=False))
                    fn = config.build()
                    fn.set_lm_head(model.lm_head)
                    hidden = model(h)
                    if hidden_layout == "replicated":
                        hidden = distribute_tensor(hidden.detach(), tp_mesh, [Replicate()]).requires_grad_()
                    loss, _ = fn(hidden, y, count)
                    loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
                    loss.backward()
                    results.append((loss.detach(), _grads(model)))
                for (loss, grads), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
                    _close(loss.double(), ref_loss.detach(), f"{what} loss", **tol)
                    names = grads if hidden_layout == "plain" else ["lm_head.weight"]
                    for n in names:
                        _close(grads[n], ref_grads[n], f"{what} grad {n}", **tol)
    finally:
        tt_utils.set_spmd_backend("spmd_types")

    # the spmd_types backend (torchtitan's default): plain tensors, this rank's vocabulary block
    chunk = -(-vocab // world)
    start, stop = min(vocab, chunk * rank), min(vocab, chunk * (rank + 1))
    with check("spmd_types: local vocabulary shard of the logits"), set_current_spmd_mesh(tp_mesh):
        results = []
        for cls in (xent_tt.CrossEntropyLoss, tt_loss.CrossEntropyLoss):
            x = logits[..., start:stop].clone().requires_grad_()
            loss, _ = cls.Config(global_vocab_size=vocab).build()(x, y, count)
            loss.backward()
            results.append((loss.detach(), x.grad))
        expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / count
        for (loss, _), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
            _close(loss.double(), expected, f"{what} loss", **tol)
        _close(results[0][1], results[1][1], "logits gradient", **FP32)
    with check("spmd_types: local rows of the head, fused vs ChunkedLossWrapper"), set_current_spmd_mesh(tp_mesh):
        results = []
        for config in (
            xent_tt.LinearCrossEntropyLoss.Config(global_vocab_size=vocab),
            tt_loss.ChunkedLossWrapper.Config(loss_fn=tt_loss.CrossEntropyLoss.Config(global_vocab_size=vocab)),
        ):
            head = torch.nn.Linear(6, stop - start, bias=False, dtype=torch.float64)
            with torch.no_grad():
                head.weight.copy_(reference.lm_head.weight[start:stop])
            fn = config.build()
            fn.num_chunks = 2  # torchtitan's wrapper: 2 chunks of the 4 positions (xent's: unused)
            fn.set_lm_head(head)
            x = ref_hidden.clone().requires_grad_()
            loss, _ = fn(x, y, count)
            loss.backward()
            results.append((loss.detach(), x.grad, head.weight.grad))
        for (loss, _, g_head), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
            _close(loss.double(), ref_loss.detach(), f"{what} loss", **tol)
            _close(g_head, ref_grads["lm_head.weight"][start:stop], f"{what} head rows grad", **tol)
        # each rank a partial gradient of the hidden states (spmd_types all-reduces it at the root norm's
        # I -> R boundary); summed over the ranks, the full one
        partial = [r[1].clone() for r in results]
        for g in partial:
            torch.distributed.all_reduce(g)
        _close(partial[0], partial[1], "hidden gradient, summed over tp", **FP32)
        _close(partial[0], ref_hidden_grad, "hidden gradient, summed over tp, vs one process")


def _torchtitan_2d(rank, world, sizes):
    """On a 2x2 ("dp", "tp") mesh: torchtitan's full_dtensor layout (DTensor logits and labels: a Partial sum
    per dp rank) against torchtitan's own local_map loss, and the fused head under FSDP2 x TP with
    torchtitan's summed gradients against one process over the whole batch."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torchtitan.components import loss as tt_loss
    from torchtitan.distributed.fsdp import disable_fsdp_gradient_division

    import xent.integrations.torchtitan as xent_tt

    mesh = _mesh(world)
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    everything = [_tt_data(r) for r in range(dp)]
    reference = _tt_model()
    logits = torch.cat([reference.lm_head(reference(h)) for h, _ in everything]).detach()
    labels = torch.cat([y for _, y in everything])
    with check("full_dtensor: DTensor logits and labels vs torchtitan's local_map loss"):
        results = []
        for cls in (xent_tt.CrossEntropyLoss, tt_loss.CrossEntropyLoss):
            x = distribute_tensor(logits, mesh, [Shard(0), Shard(2)]).requires_grad_()
            target = distribute_tensor(labels, mesh, [Shard(0), Replicate()])
            loss, _ = cls.Config().build()(x, target, None)
            _require(tuple(loss.placements) == tuple(tt_loss.Partial() if i == 0 else Replicate() for i in range(2)))
            loss.full_tensor().backward()
            results.append((loss.full_tensor().detach(), x.grad.full_tensor()))
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        for (loss, _), what, tol in zip(results, ("xent", "torchtitan"), (TIGHT, FP32)):
            _close(loss.double(), expected, f"{what} loss", **tol)
        _close(results[0][1], results[1][1], "logits gradient", **FP32)
    with check("fsdp2 x tp head, divide factor 1: fused head vs one process"):
        count = global_token_count(everything[dp_rank][1], group=mesh.get_group("dp"))
        total = sum(int((y != -100).sum()) for _, y in everything)
        _require(int(count) == total, (count, total))
        ref_loss = (
            sum(
                F.cross_entropy(reference.lm_head(reference(h)).flatten(0, 1), y.flatten(), reduction="sum")
                for h, y in everything
            )
            / total
        )
        ref_loss.backward()
        ref_grads = _grads(reference)
        model = _tt_model()
        parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel(use_local_output=False))
        fully_shard(model.lm_head, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        disable_fsdp_gradient_division(model)
        fn = xent_tt.LinearCrossEntropyLoss.Config().build()
        fn.set_lm_head(model.lm_head)
        h, y = everything[dp_rank]
        loss, _ = fn(model(h), y, count)
        loss.backward()
        summed = loss.detach().clone()
        torch.distributed.all_reduce(summed, group=mesh.get_group("dp"))
        _close(summed, ref_loss.detach(), "loss")
        for n, g in _grads(model).items():
            _close(g, ref_grads[n], f"grad {n}")


SCENARIOS_2D = {
    "torchtitan": _torchtitan,
    "torchtitan_2d": _torchtitan_2d,
    "mesh2d": _mesh2d,
    "fsdp_divide": _fsdp_divide,
    "fsdp_tp": _fsdp_tp,
    "token_count": _token_count,
}
