"""A/B of eager speed between two source trees of xent (for example before and after a restructuring).

Each round runs every workload in one fresh process per tree (PYTHONPATH=<tree>/src), the trees
alternating which goes first; each process times `--steps` forward + backward steps after a warm-up and
reports their median. Printed: per workload, the median over rounds of each tree's median, and the median
of the per-round ratios B / A. Usage:

    python benchmarks/ab_trees.py --a /path/to/old/checkout --b . [--rounds 5] [--steps 9]

The head sizes are small: on the 2-core CI-like machine, matmuls run at a few GFLOP/s, and what a
restructuring can change is the per-call and per-chunk work around them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# Each workload: (setup, step), run in the child; the step is timed.
WORKLOADS = {
    "cross_entropy 1024x128256 fp32": (
        "x = torch.randn(1024, 128256, requires_grad=True); y = torch.randint(0, 128256, (1024,))",
        "xent.cross_entropy(x, y).backward()",
    ),
    "linear_cross_entropy 512, 256, 16384 fp32": (
        "h = torch.randn(512, 256, requires_grad=True); w = torch.randn(16384, 256, requires_grad=True);"
        " y = torch.randint(0, 16384, (512,))",
        "xent.linear_cross_entropy(h, w, y).backward()",
    ),
    "token_logprobs + entropy 512, 256, 16000 fp32": (
        "h = torch.randn(512, 256, requires_grad=True); w = torch.randn(16000, 256, requires_grad=True);"
        " y = torch.randint(0, 16000, (512,))",
        "lp, ent = xent.token_logprobs(h, w, y, temperature=0.7, return_entropy=True);"
        " (lp.sum() + ent.sum()).backward()",
    ),
    "linear_distillation_loss jsd 512, 256, 16000 fp32": (
        "h = torch.randn(512, 256, requires_grad=True); w = torch.randn(16000, 256, requires_grad=True);"
        " t = xent.TeacherLogits(torch.randn(512, 16000))",
        "xent.linear_distillation_loss(h, w, t, divergence='jsd').backward()",
    ),
    "cross_entropy 64x1000 fp32 (per-call overhead)": (
        "x = torch.randn(64, 1000, requires_grad=True); y = torch.randint(0, 1000, (64,))",
        "xent.cross_entropy(x, y, label_smoothing=0.1).backward()",
    ),
}

CHILD = """
import json, statistics, sys, time, torch, xent
torch.set_num_threads({threads})
{setup}
def step():
    {step}
for _ in range(2):
    step()
times = []
for _ in range({steps}):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({{"median": statistics.median(times), "file": xent.__file__}}))
"""


def run(tree: str, setup: str, step: str, steps: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.abspath(tree), "src"))
    code = CHILD.format(setup=setup, step=step, steps=steps, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["file"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"imported {result['file']}, not the tree {tree}")
    return result["median"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="checkout A (the baseline)")
    ap.add_argument("--b", default=".", help="checkout B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    args = ap.parse_args()
    names = [n for n in WORKLOADS if not args.only or any(s in n for s in args.only.split(","))]
    print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds, median of {args.steps} steps per process\n")
    print("| workload | A (s) | B (s) | B / A (median of per-round ratios) |")
    print("|---|---|---|---|")
    for name in names:
        setup, step = WORKLOADS[name]
        a_times, b_times = [], []
        for r in range(args.rounds):
            order = ((args.a, a_times), (args.b, b_times))
            for tree, sink in order if r % 2 == 0 else order[::-1]:
                sink.append(run(tree, setup, step, args.steps, args.threads))
        ratios = [b / a for a, b in zip(a_times, b_times)]
        print(
            f"| {name} | {statistics.median(a_times):.4f} | {statistics.median(b_times):.4f} | "
            f"{statistics.median(ratios):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
