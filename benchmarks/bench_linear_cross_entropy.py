"""xent.linear_cross_entropy vs naive F.cross_entropy(input @ W.T) and torch's chunked F.linear_cross_entropy.

Time: the three run interleaved in this process, medians over --repeats (forward + backward, gradients for
input and weight). Memory: one fresh process per implementation; peak resident-set growth of a (warm)
forward + backward beyond the two returned gradients, over the full logits' bytes. Usage:

    python benchmarks/bench_linear_cross_entropy.py [--tokens 2048] [--hidden 1024] [--vocab 32768] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch

from xent.bench import LINEAR_IMPLS, Workload, make_step, median, peak_growth_fresh, time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    w = Workload("linear", args.tokens, args.vocab, hidden=args.hidden, dtype=args.dtype, device=args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; {w.label()}; "
        f"medians of {args.repeats} interleaved runs\n"
    )
    steps = {impl: make_step(w, impl)[0] for impl in LINEAR_IMPLS}
    times = time_interleaved(steps, args.repeats, device=args.device)
    del steps
    print(
        "| implementation | time (s) | xent time / this | per-round ratio (median) "
        "| peak growth beyond grads / logits |"
    )
    print("|---|---|---|---|---|")
    for impl in LINEAR_IMPLS:
        mem = peak_growth_fresh(w, impl)
        extra = (mem["peak_growth_bytes"] - mem["grad_bytes"]) / mem["logits_bytes"]
        per_round = median([a / b for a, b in zip(times["xent"], times[impl])])
        print(
            f"| {impl} | {median(times[impl]):.3f} | {median(times['xent']) / median(times[impl]):.3f} | "
            f"{per_round:.3f} | {extra:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
