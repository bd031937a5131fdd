"""Tensor-parallel RL: token log-probabilities and entropies with the vocabulary split across ranks.

xent.distributed.vocab_parallel_[linear_]token_logprobs against the naive formulation: each rank computes
its logits, all-gathers them (backward keeps each rank's block, as Megatron's gather region), and takes
log-softmax, the chosen tokens' log-probabilities and the entropies from the full logits. Where the
hidden states feed the rank's logits, backward all-reduces their gradient, so every implementation ends
with the full input gradient on every rank (checked equal before timing). The objective is a
policy-gradient step, -(logp * advantage).sum() - 0.01 * entropy.sum(), at temperature 0.7, forward +
backward.

Time: the implementations interleaved in the same processes, medians over --repeats (rank 0's clock).
Memory: one fresh set of processes per implementation, rank 0's peak resident-set growth (CUDA:
max_memory_allocated) beyond the gradients, over the bytes of one rank's logits (N x V / world). Usage:

    python benchmarks/bench_vocab_parallel.py [--world 2] [--tokens 2048] [--vocab 32000] [--hidden 1024]

CPU: gloo, one thread per rank. CUDA (--device cuda): NCCL, one GPU per rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xent.bench import median, peak_growth_of, time_interleaved
from xent.distributed import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs

IMPLS = ("xent linear", "xent logits", "naive gather")
TEMPERATURE = 0.7


def _data(args, rank: int, device: str):
    gen = torch.Generator().manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = torch.randn(n, h, generator=gen) / h**0.5
    head = torch.randn(v, h, generator=gen)
    tokens = torch.randint(0, v, (n,), generator=gen)
    tokens[: n // 8] = -100  # a prompt
    advantages = torch.randn(n, generator=gen)
    size = v // args.world
    local_head = head[rank * size : (rank + 1) * size]
    return [t.to(device) for t in (hidden, local_head, tokens, advantages)]


class _ReplicatedInput(torch.autograd.Function):
    """Identity forward, all-reduce backward: replicated hidden states feeding a vocab-sharded head (what
    Megatron's copy-to-tensor-parallel region does), so every rank ends with the full input gradient, as
    vocab_parallel_linear_token_logprobs gives it."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


class _GatheredColumns(torch.autograd.Function):
    """All-gather the ranks' column blocks into the full (N, V) logits; backward keeps this rank's block
    (Megatron's gather-from-tensor-parallel region: every rank computes the same loss from them)."""

    @staticmethod
    def forward(ctx, local):
        blocks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(blocks, local.contiguous())
        ctx.rank, ctx.size = dist.get_rank(), local.shape[1]
        return torch.cat(blocks, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size].contiguous()


def _step(impl: str, hidden, local_head, tokens, advantages):
    """One forward + backward; returns the gradients it made (hidden's, the local head's)."""
    h = hidden.clone().requires_grad_()
    w = local_head.clone().requires_grad_()
    if impl == "xent linear":
        logp, entropy = vocab_parallel_linear_token_logprobs(h, w, tokens, temperature=TEMPERATURE, return_entropy=True)
    elif impl == "xent logits":
        local = _ReplicatedInput.apply(h) @ w.T
        logp, entropy = vocab_parallel_token_logprobs(local, tokens, temperature=TEMPERATURE, return_entropy=True)
    else:
        # gathered along the columns: every rank's block side by side, (N, V)
        local = (_ReplicatedInput.apply(h) @ w.T) / TEMPERATURE
        full = _GatheredColumns.apply(local)
        logp_all = torch.log_softmax(full.float(), dim=1)
        valid = tokens != -100
        logp = torch.where(valid, logp_all.gather(1, tokens.clamp_min(0).unsqueeze(1)).squeeze(1), 0)
        entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(1), 0)
    objective = -(logp * advantages).sum() - 0.01 * entropy.sum()
    objective.backward()
    return [h.grad, w.grad]


def _init(rank: int, args, rendezvous: str) -> str:
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        torch.set_num_threads(1)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=600),
    )
    return device


def _time_worker(rank: int, args, rendezvous: str, out: str) -> None:
    device = _init(rank, args, rendezvous)
    data = _data(args, rank, device)
    # the implementations compute the same gradients (else the comparison would mean nothing)
    reference = _step("naive gather", *data)
    for impl in IMPLS[:-1]:
        for got, want in zip(_step(impl, *data), reference):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=lambda m, impl=impl: f"{impl}: {m}")
    steps = {impl: (lambda impl=impl: _step(impl, *data)) for impl in IMPLS}
    times = time_interleaved(steps, args.repeats, device=device)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()


def _memory_worker(rank: int, args, rendezvous: str, out: str, impl: str) -> None:
    device = _init(rank, args, rendezvous)
    data = _data(args, rank, device)
    _step(impl, *data)  # warm: one-time allocations (BLAS buffers, lazy init) are not counted
    grads = []
    peak, exact = peak_growth_of(lambda: grads.extend(_step(impl, *data)), device)
    if rank == 0:
        grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        with open(out, "w") as f:
            json.dump({"peak": peak, "grads": grad_bytes, "exact": exact}, f)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(fn, args, *extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.start_processes(
            fn, args=(args, os.path.join(tmp, "rdv"), out, *extra), nprocs=args.world, start_method="spawn"
        )
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    local_logits_bytes = args.tokens * (args.vocab // args.world) * 4
    times = _spawn(_time_worker, args)
    print(
        f"\n{args.world} ranks ({args.device}, {platform.processor() or platform.machine()}), "
        f"{args.tokens} tokens, H={args.hidden}, V={args.vocab} fp32 ({args.vocab // args.world} per rank), "
        f"T={TEMPERATURE}, forward + backward, {args.repeats} repeats\n"
    )
    print("| implementation | time (s) | time / naive | rank 0's peak growth beyond grads / its logits |")
    print("|---|---|---|---|")
    for impl in IMPLS:
        mem = _spawn(_memory_worker, args, impl)
        ratio = median([a / b for a, b in zip(times[impl], times["naive gather"])])
        extra = (mem["peak"] - mem["grads"]) / local_logits_bytes
        print(f"| {impl} | {median(times[impl]):.3f} | {ratio:.2f} | {extra:.2f} |", flush=True)


if __name__ == "__main__":
    main()
