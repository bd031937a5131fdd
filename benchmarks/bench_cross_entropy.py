"""xent.cross_entropy vs torch.nn.functional.cross_entropy: forward + backward time and peak memory.

Time: both run interleaved in this process (alternating which goes first), medians over --repeats.
Memory: one fresh process per implementation and size; peak resident-set growth (VmHWM) of one
forward + backward over the logits' own bytes. Usage:

    python benchmarks/bench_cross_entropy.py [--repeats 7] [--sizes 4096x32000,1024x128256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import platform

import torch

from xent.bench import CE_IMPLS, Workload, make_step, median, peak_growth_fresh, time_interleaved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4096x32000,1024x128256", help="comma-separated NxC")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"forward + backward, mean loss, {args.dtype}, {args.device}; medians of {args.repeats} interleaved runs\n")
    print(
        "| N x C | xent time (s) | torch time (s) | time ratio xent/torch | median of per-round ratios "
        "| xent peak growth / logits | torch peak growth / logits |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, c = (int(v) for v in size.lower().split("x"))
        w = Workload("ce", n, c, dtype=args.dtype, device=args.device)
        steps = {impl: make_step(w, impl)[0] for impl in CE_IMPLS}
        times = time_interleaved(steps, args.repeats, device=args.device)
        del steps
        ratios = [a / b for a, b in zip(times["xent"], times["torch"])]
        mem = {impl: peak_growth_fresh(w, impl) for impl in CE_IMPLS}
        growth = {impl: mem[impl]["peak_growth_bytes"] / mem[impl]["logits_bytes"] for impl in CE_IMPLS}
        print(
            f"| {n} x {c} | {median(times['xent']):.3f} | {median(times['torch']):.3f} | "
            f"{median(times['xent']) / median(times['torch']):.3f} | {median(ratios):.3f} | "
            f"{growth['xent']:.3f} | {growth['torch']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
