"""Per-token statistics and RL log-probabilities: xent against the same numbers computed in plain torch.

* cross_entropy with every statistic of return_stats (lse, logprob, entropy, z_loss, argmax, correct)
  against xent's plain loss and against torch computing the loss and the statistics from fp32 log-softmax;
* token_logprobs with entropies (a policy-gradient objective, temperature 0.7) against the same objective
  from the materialized logits (the TRL / verl formulation), forward + backward.

Time: interleaved in this process, medians over --repeats. Memory: one fresh process per implementation,
peak resident-set growth (CUDA: max_memory_allocated) beyond the returned gradients, over the logits'
bytes. Usage:

    python benchmarks/bench_statistics.py [--tokens 4096] [--vocab 32000] [--hidden 1024] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch

from xent.bench import RL_IMPLS, STATS_IMPLS, Workload, make_step, median, peak_growth_fresh, time_interleaved


def report(w: Workload, impls: tuple, reference: str, repeats: int, device: str) -> None:
    steps = {impl: make_step(w, impl)[0] for impl in impls}
    times = time_interleaved(steps, repeats, device=device)
    del steps
    print(f"\n{w.label()}\n")
    print(f"| implementation | time (s) | time / {reference} | peak growth beyond grads / logits |")
    print("|---|---|---|---|")
    for impl in impls:
        mem = peak_growth_fresh(w, impl)
        extra = (mem["peak_growth_bytes"] - mem["grad_bytes"]) / mem["logits_bytes"]
        ratio = median([a / b for a, b in zip(times[impl], times[reference])])
        print(f"| {impl} | {median(times[impl]):.3f} | {ratio:.2f} | {extra:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, device "
        f"{args.device}; medians of {args.repeats} interleaved runs (per-round ratios)"
    )
    ce = Workload("ce", args.tokens, args.vocab, dtype=args.dtype, device=args.device)
    report(ce, ("xent",) + STATS_IMPLS, "xent", args.repeats, args.device)
    linear = Workload("linear", args.tokens, args.vocab, hidden=args.hidden, dtype=args.dtype, device=args.device)
    report(linear, RL_IMPLS, "naive-rl", args.repeats, args.device)


if __name__ == "__main__":
    main()
