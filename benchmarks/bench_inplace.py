"""cross_entropy(inplace=True) against the default and torch on CPU: forward + backward time and peak memory.

    .venv/bin/python benchmarks/bench_inplace.py [--n 4096 --c 32000 --repeats 5]

Each step makes fresh logits (a copy of fixed ones: what a head's output is) and takes the loss's gradient
with respect to them (torch.autograd.grad: no leaf gradient accumulated). Time: medians of interleaved
repeats, the copy included on every side. Memory: the resident-set growth of one warm step beyond the
logits, each implementation in a fresh process (xent.bench.peak_growth_of); the default's and torch's
include the gradient they return, inplace's gradient is the logits' own storage.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

import xent
from xent.bench import median, peak_growth_of, time_interleaved

IMPLS = {
    "torch": lambda z, y: F.cross_entropy(z, y),
    "xent": lambda z, y: xent.cross_entropy(z, y),
    "xent inplace": lambda z, y: xent.cross_entropy(z, y, inplace=True),
}


def make(a, dtype):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(a.n, a.c, generator=gen).to(dtype)
    target = torch.randint(0, a.c, (a.n,), generator=gen)
    base = logits.clone().requires_grad_()
    return base, target


def step_of(impl, base, target):
    def step():
        z = base * 1  # fresh, non-leaf logits
        return torch.autograd.grad(IMPLS[impl](z, target), z)

    return step


def probe(a) -> dict:
    base, target = make(a, getattr(torch, a.dtype))
    step_of(a.probe, base, target)()  # warm

    z_holder = {}

    def measured():
        z = z_holder["z"]
        return torch.autograd.grad(IMPLS[a.probe](z, target), z)

    z_holder["z"] = base * 1  # the logits exist before the measured step
    peak, exact = peak_growth_of(measured, "cpu")
    return {"peak": peak, "exact": exact, "logits": base.numel() * base.element_size()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--c", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.probe:
        print(json.dumps(probe(a)))
        return
    print(f"N={a.n} C={a.c}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| dtype | implementation | time (s) | / torch | / xent default | peak beyond the logits / logits |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        base, target = make(a, getattr(torch, dtype))
        times = time_interleaved({name: step_of(name, base, target) for name in IMPLS}, a.repeats)
        for name in IMPLS:
            args = [sys.executable, __file__, "--probe", name, "--dtype", dtype, f"--n={a.n}", f"--c={a.c}"]
            mem = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            t = median(times[name])
            print(
                f"| {dtype} | {name} | {t:.3f} | {t / median(times['torch']):.2f} | "
                f"{t / median(times['xent']):.2f} | {mem['peak'] / mem['logits']:.2f} |"
            )


if __name__ == "__main__":
    main()
